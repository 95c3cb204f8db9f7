"""What the diagnostic runs on: the concept (its prompts and detector) and the base pipeline, with its family's
sampling defaults."""

from typing import Optional

import torch

from ..errors import UsageError
from ..settings import with_values


DEFAULT_NUM_INFERENCE_STEPS = 20
FLUX_SCHNELL_STEPS = 4  # FLUX.1-schnell is timestep-distilled for 4 steps (as duo_plugin.pairs samples it)


def resolve_preset(args):
    from ..concepts import read_prompt_list
    from ..presets import UnknownConceptError, custom_preset, get_preset

    unsafe, safe = read_prompt_list(args.unsafe_prompt), read_prompt_list(args.safe_prompt)
    try:
        if unsafe or safe:
            return custom_preset(args.concept, unsafe or [], safe or [])
        return get_preset(args.concept)
    except (UnknownConceptError, ValueError) as error:
        raise UsageError(str(error)) from None


def make_detector(name: Optional[str], threshold: Optional[float], concept: str):
    from ..detectors import get_detector

    if name in (None, "none"):
        raise UsageError(
            f"the timing diagnostic needs a detector for {concept!r}: pass --detector (nudenet, a registered one, or package.module:Factory)"
        )
    return get_detector(name, threshold)


TIMED_FAMILIES = ("sd", "sdxl", "sd3", "flux")


def load_base(args):
    """``(pipe, family, settings)``: the base pipeline, its family, and ``args`` with the family's sampling defaults
    filled into the flags left unset (guidance, steps) as a new ``Settings``; ``args`` is only read."""
    from diffusers import DiffusionPipeline

    from ..families import FAMILY_NAMES, detect_pipeline_class, pipeline_family
    from ..pairs import generation_dtype, inspect_base_model

    pipeline_class = detect_pipeline_class(args.pretrained_model_name_or_path, args.revision)
    family = pipeline_family(pipeline_class)
    if family not in TIMED_FAMILIES:
        covered = ", ".join(FAMILY_NAMES[f] for f in TIMED_FAMILIES)
        raise UsageError(f"{pipeline_class} is not supported by the timing diagnostic: it covers {covered}")
    args = resolve_family_defaults(args, inspect_base_model(args.pretrained_model_name_or_path, args.revision))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    kwargs = {
        "revision": args.revision,
        "variant": args.variant,
        "dtype": generation_dtype(args.dtype, device, family),
    }
    if family == "sd":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe, family, args


def resolve_family_defaults(args, info):
    """``args`` with the sampling defaults of the base model's family filled into the flags left unset, as a new
    ``Settings`` (``args`` is only read).

    FLUX.1 has no classifier-free guidance: ``--guidance_scale`` is its guidance embedding's value (the
    pipeline's 3.5 for [dev]; [schnell] has no embedding, 0), never the preset's CFG 7.5. [schnell] samples in
    its distilled 4 steps. Every other family: the preset's CFG scale (set by the caller) and 20 steps.
    """
    steps, guidance = args.num_inference_steps, args.guidance_scale
    if steps is None:
        schnell = info.family == "flux" and info.guidance_embeds is False
        steps = FLUX_SCHNELL_STEPS if schnell else DEFAULT_NUM_INFERENCE_STEPS
    if guidance is None and info.default_guidance_scale is not None:
        guidance = info.default_guidance_scale
    if info.family == "flux" and args.resolution is not None and args.resolution % info.resolution_multiple:
        raise UsageError(
            f"--resolution {args.resolution} is not a multiple of {info.resolution_multiple} for this FLUX.1 model: "
            f"its pipeline would resize the images"
        )
    return with_values(args, num_inference_steps=steps, guidance_scale=guidance)
