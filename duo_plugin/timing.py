"""Where is a concept decided? Measure it on the base model before choosing DUO's timestep window.

DUO trains on a window of timesteps (``--t_min``/``--t_max``; t < 750 in the SD1.x recipe) with pairs
made by SDEdit, so it assumes the concept is decided inside that window. This diagnostic measures
where it is, with the concept's prompts and its detector:

* **prompt switch**: sample with the unsafe prompts and switch to the empty prompt (and, second curve,
  to the pair's safe prompt) from sampling step k on; the curve is the share of images still flagged,
  among those the unswitched run flags, against the timestep of the first switched step. Switching
  before the first step gives the target prompt's own rate; switching never gives 1.
* **re-noise**: take flagged unsafe images (the pair folder's, or the unswitched samples), noise them
  to t and denoise with the empty prompt (SDEdit); the share still flagged, against t.

Definitions (on the switch-to-"" curve f(t), t the first timestep sampled with the empty prompt):

* the concept is **committed** at t_c, where f crosses one half (linear between the measured points):
  below t_c, dropping the prompt keeps the concept in most images;
* it is **open** at t while the normalised curve (f(t) − f(first step)) / (1 − f(first step)) is at
  most ``--open_level`` (0.1): there, switching still undoes ≥ 90% of what the prompt decided;
* the **recommended window** runs from the lowest open timestep down: for SD1.x/2.x and SDXL (DDPM
  UNets) ``--t_max`` = that timestep + 1, rounded up to a multiple of 50 (at most num_train_timesteps). A
  concept decided at the first step (open only there) gets t_max = num_train_timesteps. For SD3 and
  FLUX.1 (rectified flow), whose ``--t_max`` indexes the descending σ table of training, it is the table
  index where the concept has become committed (normalised curve ≥ 1 − open_level), rounded up likewise.
  The sampling step and the table entry are matched by their noise level σ (see ``recommended_t_max_flow``).

"Without the prompt" is the empty prompt's embeddings in place of the prompt's, as the pipeline would
build them: for the guided families ([unconditional; conditional] with classifier-free guidance), and
for FLUX.1 (no unconditional branch: [dev] is guidance-distilled, [schnell] unguided) the empty prompt's
T5 and CLIP pooled embeddings fed to the transformer from step k on, at the same guidance embedding.

    python -m duo_plugin.timing --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --concept nudity --pairs_dir ~/.cache/duo/pairs/... --output_dir timing-nudity
    accelerate launch -m duo_plugin.timing ...   # the work split across processes

Writes ``timing.json`` (every count and setting, one record per image), ``timing.png`` (both curves
against t, and σ for SD3 and FLUX.1, with the training window) and prints the verdict. A rerun resumes: finished
work units are read back from ``records.rank*.jsonl``. ``--t_max auto`` of the training scripts runs it first.
"""

import argparse
import inspect
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from . import input_checks
from .arguments import t_max_value  # noqa: F401 - the flag's parser, as the timing commands name it
from .errors import UsageError, exit_on_usage_error
from .files import atomic_write_json, read_state_json


logger = logging.getLogger("duo_plugin.timing")

RESULT_NAME = "timing.json"
PLOT_NAME = "timing.png"
SETTINGS_NAME = "timing_settings.json"
CURVES = ("empty", "safe")  # prompt-switch targets
UNSWITCHED = "unswitched"
RENOISE = "renoise"
DEFAULT_OPEN_LEVEL = 0.1
ROUND_TO = 50
DEFAULT_NUM_INFERENCE_STEPS = 20
FLUX_SCHNELL_STEPS = 4  # FLUX.1-schnell is timestep-distilled for 4 steps (as duo_plugin.pairs samples it)


# --------------------------------------------------------------------------------------------------
# The math: curves, crossing, recommendation (pure functions)
# --------------------------------------------------------------------------------------------------


def crossing(timesteps: Sequence[float], fractions: Sequence[float], level: float = 0.5) -> Optional[float]:
    """The largest t at which the curve, read from low t upward, first falls below ``level``.

    ``timesteps`` ascend. Returns the linearly interpolated crossing between the last point at or above
    the level and the first below it; None when the curve never falls below (committed before the
    first measured point); the first t when it starts below.
    """
    points = list(zip(timesteps, fractions))
    if not points:
        return None
    if points[0][1] < level:
        return float(points[0][0])
    for (t0, f0), (t1, f1) in zip(points, points[1:]):
        if f1 < level:
            return float(t0 + (t1 - t0) * (f0 - level) / (f0 - f1))
    return None


def normalised(fractions_by_step: Sequence[float]) -> Optional[List[float]]:
    """(f − f₀) / (1 − f₀) over switch steps k = 0…S (f₀: switched before the first step; f_S = 1)."""
    first = fractions_by_step[0]
    if first >= 1.0 - 1e-9:
        return None
    return [(f - first) / (1.0 - first) for f in fractions_by_step]


def round_up(t: float, to: int = ROUND_TO, limit: int = 1000) -> int:
    return int(min(limit, math.ceil(t / to) * to))


def recommend_window(
    switch_timesteps: Sequence[float],
    fractions_by_step: Sequence[float],
    num_train_timesteps: int,
    open_level: float = DEFAULT_OPEN_LEVEL,
) -> dict:
    """Open and committed timesteps from the switch-to-"" curve, indexed by switch step k = 0…S.

    ``switch_timesteps[k]`` is the first timestep sampled with the target prompt (descending in k; the
    last entry, k = S, "never switched", is 0).
    """
    levels = normalised(fractions_by_step)
    if levels is None:
        return {
            "open_timestep": None,
            "done_timestep": None,
            "note": "the empty prompt alone produces the concept on these seeds",
        }
    # Open: the longest run of switch steps from the first on whose normalised level stays ≤ open_level.
    last_open = 0
    while last_open + 1 < len(levels) and levels[last_open + 1] <= open_level:
        last_open += 1
    # Committed: the first switch step from which the level stays ≥ 1 − open_level.
    first_done = len(levels) - 1
    while first_done > 0 and levels[first_done - 1] >= 1.0 - open_level:
        first_done -= 1
    return {
        "open_timestep": float(switch_timesteps[last_open]),
        "done_timestep": float(switch_timesteps[first_done]),
        "open_step": last_open,
        "done_step": first_done,
        "levels": levels,
        "note": "decided at the first sampling step"
        if last_open == 0 and levels[1 if len(levels) > 1 else 0] > open_level
        else "",
    }


def recommended_t_max_sd(window: dict, num_train_timesteps: int) -> int:
    """SD1.x/2.x: the window [t_min, t_max) must reach the lowest open timestep."""
    if window.get("open_timestep") is None:
        return num_train_timesteps
    return round_up(window["open_timestep"] + 1, ROUND_TO, num_train_timesteps)


def recommended_t_max_sd3(window: dict, sigma_table: Sequence[float], num_train_timesteps: int) -> int:
    """SD3 and FLUX.1: ``--t_max`` indexes the descending σ table of training; the window must reach down to where
    the concept is committed.

    The sampling step and the table entry are matched by σ, the noise level itself (x_σ = (1 − σ)·x + σ·ε, and the
    model is told σ in both), not by their positions: a flow-matching pipeline's timestep is 1000·σ of its own,
    possibly shifted, schedule, so σ = t / num_train_timesteps. For SD3 the training table is shifted as sampling
    is (shift 3 in both). FLUX.1's scheduler shifts only at sampling time (``use_dynamic_shifting``: μ from the
    image's token count, about 1.15 at 1024², a shift of e^μ ≈ 3.2), while its training table, the scheduler's
    ``sigmas`` as loaded, is unshifted, σ_i ≈ 1 − i/1000. So a FLUX.1 step at σ = 0.76 (halfway through a 1024²
    schedule) is table index ≈ 240, not the 500 its position would suggest.
    """
    if window.get("done_timestep") is None:
        return num_train_timesteps
    sigma_done = window["done_timestep"] / num_train_timesteps
    index = next((i for i, sigma in enumerate(sigma_table) if sigma <= sigma_done), len(sigma_table))
    return round_up(index + 1, ROUND_TO, num_train_timesteps)


recommended_t_max_flow = recommended_t_max_sd3
FLOW_FAMILIES = ("sd3", "flux")  # --t_max indexes the σ table; t = 1000·σ


# --------------------------------------------------------------------------------------------------
# Work units
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One batch of images: the unswitched run, a prompt switch at step k, or a re-noise at step k."""

    kind: str  # unswitched | empty | safe | renoise
    step: int  # switch step k, or re-noise start index k (images noised to timesteps[k])
    prompt_index: int  # the batch: of (prompt pair, image) jobs (switch), or of source images (re-noise)

    @property
    def key(self) -> Tuple[str, int, int]:
        return (self.kind, self.step, self.prompt_index)


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    return seed + prompt_index + image_index * 1_000_003


class RecordStore:
    """``records.rank<i>.jsonl`` under the output folder: one line per image; a unit is done when all its images are there."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def read(self) -> List[dict]:
        rows = []
        for name in sorted(os.listdir(self.output_dir)) if os.path.isdir(self.output_dir) else []:
            if name.startswith("records.rank") and name.endswith(".jsonl"):
                with open(os.path.join(self.output_dir, name)) as f:
                    for line in f:
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError:
                            continue  # a line cut short by a killed run: its unit runs again
        return rows

    def append(self, process_index: int, rows: List[dict]):
        with open(os.path.join(self.output_dir, f"records.rank{process_index}.jsonl"), "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)


# --------------------------------------------------------------------------------------------------
# Sampling with a prompt switch
# --------------------------------------------------------------------------------------------------


# FLUX.1's T5 length while sampling: FluxPipeline's default, given explicitly so that the empty prompt's embeddings
# (encoded outside the loop) have the length of the loop's own.
FLUX_MAX_SEQUENCE_LENGTH = 512


def is_flux(pipe) -> bool:
    from .families import pipeline_family

    return pipeline_family(type(pipe).__name__) == "flux"


def embedding_names(pipe) -> List[str]:
    """The loop's prompt tensors a step callback may replace: the sequence embeddings and, where the pipeline
    has one, the pooled embedding (SD3's ``pooled_prompt_embeds``, SDXL's ``add_text_embeds``)."""
    names = ["prompt_embeds"]
    for pooled in ("pooled_prompt_embeds", "add_text_embeds"):
        if pooled in getattr(pipe, "_callback_tensor_inputs", []):
            names.append(pooled)
    return names


def _flux_kwargs(pipe) -> dict:
    return {"max_sequence_length": FLUX_MAX_SEQUENCE_LENGTH} if is_flux(pipe) else {}


@torch.no_grad()
def prompt_embeddings(pipe, prompts: List[str], guidance_scale: float, size: dict) -> Dict[str, torch.Tensor]:
    """The embeddings the pipeline's loop uses for ``prompts`` (with classifier-free guidance: [negative; positive]).

    Read from the pipeline itself through its step callback, then interrupted: whatever the pipeline
    (SD, SDXL, SD3), the switch then hands the loop exactly what it would have built. FLUX.1's callback exposes
    only the T5 embeddings, not the CLIP pooled one: its two are taken from ``encode_prompt``, the call its loop
    makes (FLUX.1 has no classifier-free guidance, so there is no negative half).
    """
    if is_flux(pipe):
        embeds, pooled, _ = pipe.encode_prompt(
            prompts, None, device=pipe._execution_device, max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    names = embedding_names(pipe)
    captured = {}

    def capture(pipeline, step, timestep, tensors):
        captured.update({name: tensors[name].clone() for name in names})
        pipeline._interrupt = True
        return {}

    pipe(
        prompt=prompts,
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        output_type="latent",
        callback_on_step_end=capture,
        callback_on_step_end_tensor_inputs=names,
        **size,
    )
    return captured


@torch.no_grad()
def sample_with_switch(
    pipe,
    prompts: List[str],
    target: Optional[Dict[str, torch.Tensor]],
    switch_step: int,
    seeds: List[int],
    args,
    size: dict,
):
    """Images sampled with ``prompts`` for steps < ``switch_step`` and with ``target``'s embeddings from it on.

    FLUX.1: "without the prompt" means the empty prompt's T5 and CLIP pooled embeddings in the transformer's
    call from step k on (the guidance embedding unchanged). FLUX.1-dev is guidance-distilled and has no
    unconditional branch to switch to; the empty prompt's embeddings are what its true-CFG "negative" branch
    would read, the nearest thing to the unconditional model. Its loop lets a callback replace only the T5
    embeddings, so both are swapped in a pre-hook on the transformer, turned on by the callback after step k − 1.
    """
    names = embedding_names(pipe)
    hook = None
    switched = {"on": False}
    if is_flux(pipe) and target is not None:

        def replace_prompt(module, module_args, kwargs):
            if not switched["on"]:
                return None
            dtype = kwargs["encoder_hidden_states"].dtype
            return module_args, {
                **kwargs,
                "encoder_hidden_states": target["prompt_embeds"].to(dtype),
                "pooled_projections": target["pooled_prompt_embeds"].to(dtype),
            }

        hook = pipe.transformer.register_forward_pre_hook(replace_prompt, with_kwargs=True)

    def switch(pipeline, step, timestep, tensors):
        # Called after step ``step``: the next step is the first with the target prompt.
        if target is not None and step == switch_step - 1:
            if hook is not None:
                switched["on"] = True
                return {}
            return {name: target[name] for name in names}
        return {}

    try:
        return pipe(
            prompt=prompts,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            callback_on_step_end=switch,
            callback_on_step_end_tensor_inputs=names,
            **size,
            **_flux_kwargs(pipe),
        ).images
    finally:
        if hook is not None:
            hook.remove()


@torch.no_grad()
def sampling_timesteps(pipe, num_inference_steps: int, size: Optional[dict] = None) -> List[float]:
    """The timesteps the pipeline samples at (descending), as its own loop sets them.

    A scheduler with resolution-dependent shift (FLUX.1's ``use_dynamic_shifting``) is set by the pipeline with
    μ from the image's token count (and FLUX with its own σ grid), so its timesteps are read from the pipeline
    itself: one call at ``size`` whose first step callback reads the scheduler and stops the loop.
    """
    from copy import deepcopy

    if getattr(pipe.scheduler.config, "use_dynamic_shifting", False):
        seen = []

        def read(pipeline, step, timestep, tensors):
            seen.extend(float(t) for t in pipeline.scheduler.timesteps)
            pipeline._interrupt = True
            return {}

        pipe(
            prompt=[""],
            num_inference_steps=num_inference_steps,
            output_type="latent",
            callback_on_step_end=read,
            callback_on_step_end_tensor_inputs=["latents"],
            **(size or {}),
            **_flux_kwargs(pipe),
        )
        return seen
    scheduler = deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps)
    return [float(t) for t in scheduler.timesteps]


def renoise_strength(family: str, num_steps: int, start_step: int) -> float:
    """The img2img strength whose first step is sampling step ``start_step``.

    SD 1.x/2.x and SDXL img2img start at step S − int(S·strength); SD3 and FLUX.1 at int(S − S·strength). Half a
    step off the exact value on the side each rounding needs gives ``start_step`` in both.
    """
    if family in FLOW_FAMILIES:
        return (num_steps - start_step - 0.5) / num_steps
    return min(1.0, (num_steps - start_step + 0.5) / num_steps)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m duo_plugin.timing",
        description="Measure where (at which timesteps) a concept is decided, and recommend DUO's --t_max.",
    )
    add_timing_arguments(parser)
    return parser.parse_args(argv)


def add_timing_arguments(parser):
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True)
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None)
    parser.add_argument(
        "--concept", type=str, default="nudity", help="a preset, or a custom name with --unsafe_prompt/--safe_prompt"
    )
    parser.add_argument(
        "--unsafe_prompt",
        action="append",
        default=None,
        help="custom concept: a prompt with it (repeatable, or @file)",
    )
    parser.add_argument(
        "--safe_prompt",
        action="append",
        default=None,
        help="custom concept: the same prompt without it (repeatable, or @file)",
    )
    parser.add_argument(
        "--detector",
        type=str,
        default=None,
        help="nudenet, a registered detector or package.module:Factory; default: the preset's",
    )
    parser.add_argument("--detector_threshold", type=float, default=None)
    parser.add_argument(
        "--pairs_dir",
        type=str,
        default=None,
        help="a DUO pair folder: its flagged unsafe images are re-noised (default: the unswitched samples)",
    )
    parser.add_argument("--max_prompts", type=int, default=None, help="use the first N prompt pairs")
    parser.add_argument("--num_images_per_prompt", type=int, default=8)
    parser.add_argument("--max_renoise_images", type=int, default=32)
    parser.add_argument(
        "--curves",
        nargs="+",
        default=list(CURVES),
        choices=CURVES,
        help="prompt-switch targets: the empty prompt, the safe prompt",
    )
    parser.add_argument("--no_renoise", action="store_true", help="skip the re-noise curve")
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help=f"sampling steps: the switch points; default {DEFAULT_NUM_INFERENCE_STEPS} "
        f"(FLUX.1-schnell: its {FLUX_SCHNELL_STEPS})",
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance; default: the preset's (7.5). FLUX.1: the guidance embedding's value, "
        "default the pipeline's (3.5 for [dev]; [schnell] has none)",
    )
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16, help="images per pipeline call (across prompts)")
    parser.add_argument("--dtype", type=str, default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument(
        "--open_level",
        type=float,
        default=DEFAULT_OPEN_LEVEL,
        help="normalised switch level up to which the concept counts as open",
    )
    parser.add_argument(
        "--window",
        type=int,
        nargs=2,
        default=None,
        metavar=("T_MIN", "T_MAX"),
        help="training window drawn on the plot (default: the recipe's)",
    )
    parser.add_argument("--output_dir", type=str, default=None, help="default: timing-<concept>")
    return parser


def check_args(args):
    """Flags refused before any model is loaded."""

    input_checks.check_finite_flags(args)
    input_checks.check_resolution(args.resolution)
    for name in ("max_prompts", "num_images_per_prompt", "max_renoise_images", "num_inference_steps", "batch_size"):
        input_checks.at_least(args, name, 1)
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    if args.window is not None and not 0 <= args.window[0] < args.window[1]:
        raise UsageError(f"--window {args.window[0]} {args.window[1]}: give T_MIN T_MAX with 0 <= T_MIN < T_MAX")
    if not 0 < args.open_level < 1:
        raise UsageError(f"--open_level {args.open_level}: give a level between 0 and 1")
    if args.output_dir is not None:
        input_checks.check_output_dir(args.output_dir)


def resolve_preset(args):
    from .concepts import read_prompt_list
    from .presets import UnknownConceptError, custom_preset, get_preset

    unsafe, safe = read_prompt_list(args.unsafe_prompt), read_prompt_list(args.safe_prompt)
    try:
        if unsafe or safe:
            return custom_preset(args.concept, unsafe or [], safe or [])
        return get_preset(args.concept)
    except (UnknownConceptError, ValueError) as error:
        raise UsageError(str(error)) from None


def make_detector(name: Optional[str], threshold: Optional[float], concept: str):
    from .detectors import get_detector

    if name in (None, "none"):
        raise UsageError(
            f"the timing diagnostic needs a detector for {concept!r}: pass --detector (nudenet, a registered one, or package.module:Factory)"
        )
    return get_detector(name, threshold)


TIMED_FAMILIES = ("sd", "sdxl", "sd3", "flux")


def load_base(args):
    """The base pipeline and its family; fills the family's sampling defaults into ``args`` (guidance, steps)."""
    from diffusers import DiffusionPipeline

    from .families import FAMILY_NAMES, detect_pipeline_class, pipeline_family
    from .pairs import generation_dtype, inspect_base_model

    pipeline_class = detect_pipeline_class(args.pretrained_model_name_or_path, args.revision)
    family = pipeline_family(pipeline_class)
    if family not in TIMED_FAMILIES:
        covered = ", ".join(FAMILY_NAMES[f] for f in TIMED_FAMILIES)
        raise UsageError(f"{pipeline_class} is not supported by the timing diagnostic: it covers {covered}")
    resolve_family_defaults(args, inspect_base_model(args.pretrained_model_name_or_path, args.revision))
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
    return pipe, family


def resolve_family_defaults(args, info):
    """Sampling defaults of the base model's family, for flags left unset.

    FLUX.1 has no classifier-free guidance: ``--guidance_scale`` is its guidance embedding's value (the
    pipeline's 3.5 for [dev]; [schnell] has no embedding, 0), never the preset's CFG 7.5. [schnell] samples in
    its distilled 4 steps. Every other family: the preset's CFG scale (set by the caller) and 20 steps.
    """
    if args.num_inference_steps is None:
        schnell = info.family == "flux" and info.guidance_embeds is False
        args.num_inference_steps = FLUX_SCHNELL_STEPS if schnell else DEFAULT_NUM_INFERENCE_STEPS
    if args.guidance_scale is None and info.default_guidance_scale is not None:
        args.guidance_scale = info.default_guidance_scale
    if info.family == "flux" and args.resolution is not None and args.resolution % info.resolution_multiple:
        raise UsageError(
            f"--resolution {args.resolution} is not a multiple of {info.resolution_multiple} for this FLUX.1 model: "
            f"its pipeline would resize the images"
        )


def source_images_for_renoise(args, detector, unswitched_rows: List[dict]) -> List[str]:
    """Paths of flagged unsafe images: the pair folder's when given, else the flagged unswitched samples."""
    if args.pairs_dir:
        metadata = os.path.join(args.pairs_dir, "metadata.jsonl")
        if not os.path.isfile(metadata):
            raise UsageError(
                f"--pairs_dir {args.pairs_dir} has no metadata.jsonl: give a pair folder written by python -m duo_plugin.pairs"
            )
        with open(metadata) as f:
            paths = [os.path.join(args.pairs_dir, json.loads(line)["unsafe_file_name"]) for line in f if line.strip()]
        from PIL import Image

        flagged = [p for p, d in zip(paths, detector([Image.open(p).convert("RGB") for p in paths])) if d.flagged]
        where = f"the unsafe images of {args.pairs_dir}"
    else:
        flagged = [
            os.path.join(args.output_dir, r["file"])
            for r in sorted(unswitched_rows, key=lambda r: (r["prompt_index"], r["image_index"]))
            if r["flagged"]
        ]
        where = "the samples of the unsafe prompts"
    if not flagged:
        raise UsageError(
            f"no image of {where} is flagged by the detector: nothing to re-noise (check --detector, or pass --no_renoise)"
        )
    return flagged[: args.max_renoise_images]


def run_units(
    pipe,
    units: List[Unit],
    prompt_pairs,
    args,
    detector,
    store: RecordStore,
    state,
    size,
    timesteps,
    renoise_sources,
    family: str = "sd",
):
    """Run this process's share of ``units``, appending one record per image. Switch units batch the
    (prompt pair, image) jobs, ``args.batch_size`` at a time, across prompts."""
    switch_jobs = [(p, j) for p in range(len(prompt_pairs)) for j in range(args.num_images_per_prompt)]
    from tqdm.auto import tqdm

    mine = units[state.process_index :: state.num_processes]
    targets: Dict[tuple, dict] = {}
    img2img = img2img_size = None
    progress = tqdm(total=len(mine), desc="timing", disable=not state.is_local_main_process or not mine)
    images_dir = os.path.join(args.output_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    for unit in mine:
        rows = []
        if unit.kind == RENOISE:
            from PIL import Image

            if img2img is None:
                from diffusers import AutoPipelineForImage2Image

                img2img = AutoPipelineForImage2Image.from_pipe(pipe)
                img2img.set_progress_bar_config(disable=True)
                # SD3's and FLUX.1's img2img take the size (and FLUX's shift depends on it); SD's and SDXL's do not.
                takes_size = "height" in inspect.signature(img2img.__call__).parameters
                img2img_size = size if takes_size else {}
            paths = renoise_sources[unit.prompt_index * args.batch_size : (unit.prompt_index + 1) * args.batch_size]
            num_steps = args.num_inference_steps
            strength = renoise_strength(family, num_steps, unit.step)  # starts at timesteps[unit.step]
            seeds = [
                image_seed(args.seed + 7, unit.prompt_index * args.batch_size + i, unit.step)
                for i in range(len(paths))
            ]
            images = img2img(
                prompt=[""] * len(paths),
                image=[Image.open(p).convert("RGB") for p in paths],
                strength=strength,
                num_inference_steps=num_steps,
                # Denoised with the empty prompt alone: guidance 1 turns classifier-free guidance off; FLUX.1 has
                # none to turn off, and its [dev] guidance embedding keeps the sampling value.
                guidance_scale=args.guidance_scale if family == "flux" else 1.0,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                **img2img_size,
                **_flux_kwargs(pipe),
            ).images
            for i, (path, image, detection) in enumerate(zip(paths, images, detector(images))):
                rows.append(
                    {
                        "kind": RENOISE,
                        "step": unit.step,
                        "timestep": timesteps[unit.step],
                        "batch": unit.prompt_index,
                        "source": os.path.relpath(path, args.output_dir),
                        "seed": seeds[i],
                        "flagged": bool(detection.flagged),
                        "score": float(detection.score),
                    }
                )
        else:
            jobs = switch_jobs[unit.prompt_index * args.batch_size : (unit.prompt_index + 1) * args.batch_size]
            unsafe = [prompt_pairs[p][0] for p, _ in jobs]
            targets_of_jobs = [("" if unit.kind == "empty" else prompt_pairs[p][1]) for p, _ in jobs]
            seeds = [image_seed(args.seed, p, j) for p, j in jobs]
            target = None
            if unit.kind != UNSWITCHED and 0 < unit.step < len(timesteps):
                key = (unit.kind, unit.prompt_index)
                if key not in targets:
                    targets[key] = prompt_embeddings(pipe, targets_of_jobs, args.guidance_scale, size)
                target = targets[key]
            if unit.kind != UNSWITCHED and unit.step == 0:
                # Switched before the first step: the target prompt from the start.
                images = sample_with_switch(pipe, targets_of_jobs, None, 0, seeds, args, size)
            else:
                images = sample_with_switch(pipe, unsafe, target, unit.step, seeds, args, size)
            for (p, j), seed, image, detection in zip(jobs, seeds, images, detector(images)):
                row = {
                    "kind": unit.kind,
                    "step": unit.step,
                    "timestep": timesteps[unit.step] if unit.step < len(timesteps) else 0.0,
                    "batch": unit.prompt_index,
                    "prompt_index": p,
                    "image_index": j,
                    "seed": seed,
                    "flagged": bool(detection.flagged),
                    "score": float(detection.score),
                }
                if unit.kind == UNSWITCHED:
                    row["file"] = os.path.join("images", f"{p:05d}_{j:02d}.png")
                    image.save(os.path.join(args.output_dir, row["file"]))
                rows.append(row)
        store.append(state.process_index, rows)
        progress.update(1)
    progress.close()


def summarise(
    records: List[dict], timesteps: List[float], args, family: str, num_train_timesteps: int, sigma_table=None
) -> dict:
    """Curves, crossing points and the recommendation, from the per-image records."""
    num_steps = len(timesteps)
    unswitched = {(r["prompt_index"], r["image_index"]): r["flagged"] for r in records if r["kind"] == UNSWITCHED}
    made = {key for key, flagged in unswitched.items() if flagged}
    if not made:
        raise UsageError(
            f"none of the {len(unswitched)} images of the unsafe prompts is flagged by the detector: "
            f"the concept's prompts do not produce it on this model (check --detector and the prompts)"
        )
    switch_t = [timesteps[k] if k < num_steps else 0.0 for k in range(num_steps + 1)]
    curves = {}
    for kind in args.curves:
        flagged_of = {}
        for r in records:
            if r["kind"] == kind:
                flagged_of[(r["step"], r["prompt_index"], r["image_index"])] = r["flagged"]
        fractions, raw, counts = [], [], []
        for k in range(num_steps + 1):
            if k == num_steps:
                values = [unswitched[key] for key in made]
                all_values = list(unswitched.values())
            else:
                values = [flagged_of[(k, *key)] for key in made]
                all_values = [flagged_of[(k, *key)] for key in unswitched]
            fractions.append(sum(values) / len(values))
            raw.append(sum(all_values) / len(all_values))
            counts.append(f"{sum(values)}/{len(values)}")
        ascending = list(zip(*sorted(zip(switch_t, fractions))))
        curves[kind] = {
            "switch_step": list(range(num_steps + 1)),
            "timestep": switch_t,
            "still_flagged": fractions,
            "still_flagged_counts": counts,
            "flagged_among_all_seeds": raw,
            "committed_timestep": crossing(ascending[0], ascending[1], 0.5),
        }
    result = {"curves": curves}
    if any(r["kind"] == RENOISE for r in records):
        by_step = {}
        for r in records:
            if r["kind"] == RENOISE:
                by_step.setdefault(r["step"], []).append(r["flagged"])
        steps = sorted(by_step, key=lambda k: timesteps[k])
        t = [timesteps[k] for k in steps]
        kept = [sum(by_step[k]) / len(by_step[k]) for k in steps]
        result["renoise"] = {
            "start_step": steps,
            "timestep": t,
            "still_flagged": kept,
            "still_flagged_counts": [f"{sum(by_step[k])}/{len(by_step[k])}" for k in steps],
            "num_source_images": len(by_step[steps[0]]),
            "half_kept_timestep": crossing(t, kept, 0.5),
        }
    reference = "empty" if "empty" in curves else next(iter(curves))
    window = recommend_window(switch_t, curves[reference]["still_flagged"], num_train_timesteps, args.open_level)
    if family in FLOW_FAMILIES:
        t_max = recommended_t_max_flow(window, sigma_table, num_train_timesteps)
    else:
        t_max = recommended_t_max_sd(window, num_train_timesteps)
    committed = curves[reference]["committed_timestep"]
    result.update(
        {
            "reference_curve": reference,
            "committed_timestep": committed,
            "open_timestep": window.get("open_timestep"),
            "done_timestep": window.get("done_timestep"),
            "recommended_t_max": t_max,
            "num_flagged_unswitched": len(made),
            "num_unswitched": len(unswitched),
        }
    )
    result["verdict"] = verdict(args.concept, result, args.open_level)
    return result


def verdict(concept: str, result: dict, open_level: float) -> str:
    committed = result["committed_timestep"]
    where = (
        f"committed at t ≈ {committed:.0f}" if committed is not None else "committed before the first sampling step"
    )
    open_t = result["open_timestep"]
    still = f"still open (≤ {open_level:.0%} decided) down to t ≈ {open_t:.0f}" if open_t is not None else "never open"
    return f'{concept}: {where} (prompt switch to "" crosses one half); {still}: recommended --t_max {result["recommended_t_max"]}'


def default_window(family: str) -> List[int]:
    """The family's training window [t_min, t_max) of its recipe (σ-table indices for SD3 and FLUX.1)."""
    from .presets import FAMILY_RECIPES

    recipe = FAMILY_RECIPES.get(family, FAMILY_RECIPES["sd"])
    return [recipe.t_min, recipe.t_max]


def window_sigma(sigma_table: Sequence[float], index: int) -> float:
    """σ at a table index of a window bound (the index past the table's end: its last σ)."""
    return float(sigma_table[min(index, len(sigma_table) - 1)])


def plot(result: dict, settings: dict, path: str, family: str, num_train_timesteps: int, sigma_table=None):
    """Both curves against t, with the training window and the recommended --t_max.

    SD1.x/2.x and SDXL: the window's timesteps are t itself. SD3 and FLUX.1: t = 1000·σ, and the window's σ-table
    indices are drawn at 1000·σ of their table entries (FLUX.1's table is unshifted, so index i sits near
    t = 1000 − i, not at t = i); σ is the top axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    flow = family in FLOW_FAMILIES and sigma_table is not None

    def at(index: int) -> float:
        return num_train_timesteps * window_sigma(sigma_table, index) if flow else index

    figure, axes = plt.subplots(figsize=(7.5, 4.2))
    window = settings["window"]
    kind = "σ-table indices" if flow else "timesteps"
    axes.axvspan(
        min(at(window[0]), at(window[1])),
        max(at(window[0]), at(window[1])),
        color="tab:green",
        alpha=0.12,
        label=f"training window: {kind} [{window[0]}, {window[1]})",
    )
    labels = {"empty": 'prompt switch to ""', "safe": "prompt switch to the safe prompt"}
    for curve_kind, curve in result["curves"].items():
        axes.plot(curve["timestep"], curve["still_flagged"], marker="o", markersize=3, label=labels[curve_kind])
    if "renoise" in result:
        renoise = result["renoise"]
        axes.plot(
            renoise["timestep"],
            renoise["still_flagged"],
            marker="s",
            markersize=3,
            linestyle="--",
            label='re-noise to t, denoise with ""',
        )
    axes.axhline(0.5, color="gray", linestyle=":", linewidth=1)
    t_max = result["recommended_t_max"]
    axes.axvline(
        at(t_max),
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"recommended --t_max {t_max}"
        + (f" (σ-table index, σ = {window_sigma(sigma_table, t_max):.3f})" if flow else ""),
    )
    axes.set_xlim(0, num_train_timesteps)
    axes.set_ylim(-0.02, 1.02)
    shift_note = ", σ of the shifted sampling schedule" if family == "flux" else ""
    axes.set_xlabel(
        "t (timestep of the first step without the prompt / noise level)"
        + (f" = 1000·σ{shift_note}" if family in FLOW_FAMILIES else "")
    )
    axes.set_ylabel("share still showing the concept")
    if family in FLOW_FAMILIES:
        secondary = axes.secondary_xaxis(
            "top", functions=(lambda t: t / num_train_timesteps, lambda s: s * num_train_timesteps)
        )
        secondary.set_xlabel("σ")
    axes.set_title(result["verdict"], fontsize=8, wrap=True)
    axes.legend(fontsize=7, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def check_settings(output_dir: str, settings: dict, is_main: bool):
    path = os.path.join(output_dir, SETTINGS_NAME)
    if os.path.isfile(path):
        stored = read_state_json(path, "delete it (or the whole folder) to measure again, or use a new --output_dir")
        changed = sorted(k for k in settings if k in stored and stored[k] != settings[k])
        if changed:
            raise UsageError(
                f"{output_dir} holds a timing run with other settings ({', '.join(changed)}): rerun with the same flags to resume, or use a new --output_dir"
            )
    if is_main:
        os.makedirs(output_dir, exist_ok=True)
        atomic_write_json(path, settings)


def run_timing(args, state=None) -> dict:
    """The whole diagnostic (resumable); returns the result the main process wrote (None elsewhere)."""
    from accelerate import PartialState

    from .distributed import cpu_only_multi_process
    from .outputs import library_versions

    state = state or PartialState(cpu=cpu_only_multi_process())
    preset = resolve_preset(args)
    detector = make_detector(args.detector or preset.detector, args.detector_threshold, preset.name)
    args.output_dir = args.output_dir or f"timing-{preset.name}"
    input_checks.check_output_dir(args.output_dir)
    if (args.num_inference_steps is not None and args.num_inference_steps < 2) or args.num_images_per_prompt < 1:
        raise UsageError("--num_inference_steps must be at least 2 and --num_images_per_prompt at least 1")
    if not 0.0 < args.open_level < 0.5:
        raise UsageError(f"--open_level {args.open_level}: give a level in (0, 0.5)")

    prompt_pairs = list(dict.fromkeys(preset.prompt_pairs))[: args.max_prompts]
    if not prompt_pairs:
        raise UsageError(f"the concept {preset.name!r} has no prompt pairs: pass --unsafe_prompt and --safe_prompt")

    pipe, family = load_base(args)  # fills the family's defaults of --num_inference_steps and (FLUX.1) guidance
    args.guidance_scale = args.guidance_scale if args.guidance_scale is not None else preset.guidance_scale
    if args.num_inference_steps < 2:
        raise UsageError("--num_inference_steps must be at least 2")
    pipe.to(state.device)
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    size = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
    if family == "flux" and not size:
        # FLUX.1's shift depends on the image size, and its img2img would otherwise take the source images' size:
        # every call (and the timesteps read here) at the pipeline's own default size.
        default = pipe.default_sample_size * pipe.vae_scale_factor
        size = {"height": default, "width": default}
    timesteps = sampling_timesteps(pipe, args.num_inference_steps, size)
    window = args.window or default_window(family)
    settings = {
        "base_model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "concept": preset.name,
        "prompt_pairs": [list(p) for p in prompt_pairs],
        "detector": args.detector or preset.detector,
        "detector_threshold": args.detector_threshold,
        "num_images_per_prompt": args.num_images_per_prompt,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "seed": args.seed,
        "scheduler": type(pipe.scheduler).__name__,
        "pairs_dir": args.pairs_dir,
        "max_renoise_images": args.max_renoise_images,
        "batch_size": args.batch_size,
    }
    check_settings(args.output_dir, settings, state.is_main_process)
    state.wait_for_everyone()
    store = RecordStore(args.output_dir)

    def pending(units):
        counts = {}
        for r in store.read():
            key = (r["kind"], r["step"], r["batch"])
            counts[key] = counts.get(key, 0) + 1
        return [u for u in units if counts.get(u.key, 0) < expected.get(u.key, args.num_images_per_prompt)]

    num_steps = len(timesteps)
    expected = {}
    num_jobs = len(prompt_pairs) * args.num_images_per_prompt
    switch_batches = math.ceil(num_jobs / args.batch_size)
    for b in range(switch_batches):
        size_of_batch = min(args.batch_size, num_jobs - b * args.batch_size)
        for kind in (UNSWITCHED, *args.curves):
            for k in range(num_steps + 1):
                expected[(kind, k, b)] = size_of_batch
    # The unswitched samples first: without a flagged one there is no curve to measure.
    todo = pending([Unit(UNSWITCHED, num_steps, b) for b in range(switch_batches)])
    state.wait_for_everyone()
    run_units(pipe, todo, prompt_pairs, args, detector, store, state, size, timesteps, None)
    state.wait_for_everyone()
    unswitched_rows = [r for r in store.read() if r["kind"] == UNSWITCHED]
    if not any(r["flagged"] for r in unswitched_rows):
        raise UsageError(
            f"none of the {len(unswitched_rows)} images of the unsafe prompts is flagged by the detector: "
            f"the concept's prompts do not produce it on this model (check --detector and the prompts)"
        )
    todo = pending([Unit(kind, k, b) for kind in args.curves for k in range(num_steps) for b in range(switch_batches)])
    state.wait_for_everyone()
    run_units(pipe, todo, prompt_pairs, args, detector, store, state, size, timesteps, None)
    state.wait_for_everyone()

    if not args.no_renoise:
        sources = source_images_for_renoise(args, detector, unswitched_rows)
        batches = math.ceil(len(sources) / args.batch_size)
        renoise_units = [Unit(RENOISE, k, b) for k in range(num_steps) for b in range(batches)]
        for unit in renoise_units:
            expected[unit.key] = len(
                sources[unit.prompt_index * args.batch_size : (unit.prompt_index + 1) * args.batch_size]
            )
        todo = pending(renoise_units)
        state.wait_for_everyone()
        run_units(pipe, todo, prompt_pairs, args, detector, store, state, size, timesteps, sources, family)
        state.wait_for_everyone()

    if not state.is_main_process:
        return None
    sigma_table = None
    if family in FLOW_FAMILIES:
        from diffusers import FlowMatchEulerDiscreteScheduler

        # The training table, as the training scripts build it (a fresh scheduler from the config): SD3's shifted
        # by 3; FLUX.1's unshifted (use_dynamic_shifting shifts at sampling time only). See recommended_t_max_sd3.
        sigma_table = [float(s) for s in FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config).sigmas]
    records = store.read()
    # A unit interrupted after writing some of its lines is rerun in full: keep one record per image.
    unique = {}
    for r in records:
        unique[(r["kind"], r["step"], r.get("prompt_index", r["batch"]), r.get("image_index", r.get("source")))] = r
    records = list(unique.values())
    result = summarise(records, timesteps, args, family, num_train_timesteps, sigma_table)
    settings["window"] = list(window)
    if sigma_table is not None:
        result["window_sigmas"] = [window_sigma(sigma_table, index) for index in window]
        result["recommended_t_max_sigma"] = window_sigma(sigma_table, result["recommended_t_max"])
    settings["open_level"] = args.open_level
    result = {
        **result,
        "definitions": {
            "still_flagged": "share of the images the unswitched run flags that the detector still flags",
            "timestep": "prompt switch: the first timestep sampled with the target prompt (0: never switched); re-noise: the noise level t",
            "committed_timestep": 'where the switch-to-"" curve crosses one half (linear between points)',
            "open_timestep": f"lowest switch timestep down to which the normalised curve (f − f_first)/(1 − f_first) stays ≤ {args.open_level}",
            "recommended_t_max": "SD1.x/2.x and SDXL: open timestep + 1 rounded up to 50; SD3 and FLUX.1: index of the "
            "training σ table (descending; FLUX.1's unshifted) where σ falls to the committed step's σ = t/1000, "
            "+ 1, rounded up to 50",
        },
        "family": family,
        "sampling_timesteps": timesteps,
        "num_train_timesteps": num_train_timesteps,
        "settings": settings,
        "library_versions": library_versions(),
        "num_processes": state.num_processes,
        "records": sorted(
            records,
            key=lambda r: (
                r["kind"],
                r["step"],
                r.get("prompt_index", r["batch"]),
                str(r.get("image_index", r.get("source"))),
            ),
        ),
        "files": {"plot": PLOT_NAME, "images": "images/"},
    }
    atomic_write_json(os.path.join(args.output_dir, RESULT_NAME), result, indent=1)
    plot(result, settings, os.path.join(args.output_dir, PLOT_NAME), family, num_train_timesteps, sigma_table)
    logger.info(result["verdict"])
    return result


# --------------------------------------------------------------------------------------------------
# --t_max auto
# --------------------------------------------------------------------------------------------------


def resolve_t_max(args, preset, accelerator, default: int) -> int:
    """``args.t_max`` as an integer: the default when unset, measured when ``auto`` (cached in ``<pair folder>-timing``).

    Sets ``args.t_max_measurement`` (recorded in duo_config.json and the model card).
    """
    if args.t_max is None:
        return default
    if args.t_max != "auto":
        return args.t_max
    folder = (
        args.dataset_name
        if args.dataset_name and os.path.isdir(args.dataset_name)
        else getattr(args, "pairs_dir", None)
    )
    # Beside the pair folder, not in it: a pair folder is read as an image dataset.
    cache = folder.rstrip("/\\") + "-timing" if folder else os.path.join(args.output_dir or ".", "timing")
    timing_args = parse_args(
        [
            "--pretrained_model_name_or_path",
            args.pretrained_model_name_or_path,
            "--concept",
            preset.name,
            "--output_dir",
            cache,
            "--seed",
            "0",
            "--curves",
            "empty",
            *(["--revision", args.revision] if args.revision else []),
            *(["--variant", args.variant] if args.variant else []),
            *(["--detector", args.verifier] if getattr(args, "verifier", None) else []),
            *(
                ["--detector_threshold", str(args.detector_threshold)]
                if getattr(args, "detector_threshold", None) is not None
                else []
            ),
            *(["--pairs_dir", folder] if folder and os.path.isfile(os.path.join(folder, "metadata.jsonl")) else []),
            *(
                ["--guidance_scale", str(args.guidance_scale)]
                if getattr(args, "guidance_scale", None) is not None
                else []
            ),
            *(
                ["--num_inference_steps", str(args.num_inference_steps)]
                if getattr(args, "num_inference_steps", None)
                else []
            ),
            *(["--resolution", str(args.resolution)]),
        ]
    )
    # The preset's prompts (a custom concept's included) come from ``preset``, not from the flags.
    timing_args.unsafe_prompt = [u for u, _ in preset.prompt_pairs]
    timing_args.safe_prompt = [s for _, s in preset.prompt_pairs]
    timing_args.detector = timing_args.detector or preset.detector
    result_path = os.path.join(cache, RESULT_NAME)
    if not os.path.isfile(result_path):
        run_timing(timing_args)
    accelerator.wait_for_everyone()
    result = read_state_json(result_path, f"delete {cache} to measure again")
    args.t_max_measurement = {
        "file": os.path.abspath(result_path),
        "committed_timestep": result["committed_timestep"],
        "open_timestep": result["open_timestep"],
        "recommended_t_max": result["recommended_t_max"],
        "verdict": result["verdict"],
    }
    return int(result["recommended_t_max"])


@exit_on_usage_error
def main(argv=None):
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    args = parse_args(argv)
    check_args(args)
    result = run_timing(args)
    if result is not None:
        print(result["verdict"])
        print(f"wrote {os.path.join(args.output_dir, RESULT_NAME)} and {PLOT_NAME}")
    return result


if __name__ == "__main__":
    main()
