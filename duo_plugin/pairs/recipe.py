"""The recipe of a pair dataset: what decides its images, read from a base model's configs and the flags, checked
before any work; the seed of every image."""

import inspect
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Optional, Tuple

from ..detectors import default_verifier_threshold, get_detector, resolve_detector_factory
from ..errors import UsageError
from ..families import FAMILY_NAMES, detect_pipeline_class, pipeline_family
from ..hub import model_source_error
from ..presets import ConceptPreset


DEFAULT_SEED = 0
DEFAULT_MAX_ATTEMPTS = 10
# Seeds stay distinct per (pair, attempt) only below this many attempts; see image_seed.
MAX_ATTEMPTS_LIMIT = 1000
# FLUX.1 (see SDEditPairMaker): --guidance_scale is the value fed to FLUX.1-dev's guidance embedding (its
# pipeline's default, 3.5, unless given), not a CFG scale: the preset's 7.5 is an SD CFG value and would
# over-saturate FLUX.1-dev. The safe twin's push away from the unsafe prompt is true CFG at this scale: clearly
# above 1 (at 1 or below the pipeline drops the negative prompt) and moderate, as true CFG on top of the distilled
# guidance over-saturates quickly. FLUX.1-schnell (no guidance embedding) is timestep-distilled for 4 steps.
FLUX_TRUE_CFG_SCALE = 4.0
FLUX_SCHNELL_STEPS = 4
# FluxPipeline's default_sample_size (its transformer config has no sample_size): 128 latents, 1024 px for FLUX.1.
FLUX_DEFAULT_SAMPLE_SIZE = 128
FAMILIES_WITH_PAIRS = ("sd", "sdxl", "sd3", "flux")

# The recipe fields that decide the images: a folder made with other values is never extended.
RECIPE_IDENTITY = (
    "base_model",
    "revision",
    "family",
    "prompt_pairs",
    "strength",
    "guidance_scale",
    "num_inference_steps",
    "resolution",
    "seed",
    "verifier",
    "detector_threshold",
    "true_cfg_scale",
)


@dataclass(frozen=True)
class PairRecipe:
    """Everything that decides a generated pair dataset, written next to it as ``duo_pairs_config.json``."""

    concept: str
    base_model: str
    revision: Optional[str]
    family: str  # "sd" (Stable Diffusion 1.x/2.x), "sdxl", "sd3" or "flux" (FLUX.1)
    prompt_pairs: Tuple[Tuple[str, str], ...]
    num_pairs: int
    strength: float
    guidance_scale: float
    num_inference_steps: int
    resolution: int
    seed: int
    verifier: Optional[str]  # None: pairs are not verified
    detector_threshold: Optional[float]  # the verifier's threshold; None: the detector's own default
    max_attempts: int
    variant: Optional[str] = None
    # FLUX.1 only: the true CFG scale of the SDEdit edit (unsafe prompt as negative prompt); None for the other
    # families, whose guidance_scale is classifier-free guidance with the negative prompt already.
    true_cfg_scale: Optional[float] = None

    def prompts_of(self, pair_index: int) -> Tuple[str, str]:
        """(unsafe prompt, safe prompt) of a pair: the groups take turns, so any prefix stays balanced."""
        return self.prompt_pairs[pair_index % len(self.prompt_pairs)]

    def to_dict(self) -> dict:
        values = asdict(self)
        values["prompt_pairs"] = [list(pair) for pair in self.prompt_pairs]
        return values

    def identity(self) -> dict:
        values = self.to_dict()
        return {key: values[key] for key in RECIPE_IDENTITY}


def image_seed(seed: int, pair_index: int, attempt: int, role: int) -> int:
    """The generator seed of one image: ``role`` 0 is the unsafe image, 1 its SDEdit twin.

    Pure in its arguments (and distinct for ``attempt < MAX_ATTEMPTS_LIMIT``), so any pair can be
    regenerated from the seeds in its metadata row, whatever the batch or process that made it.
    """
    return (((seed * 1_000_003 + pair_index) * MAX_ATTEMPTS_LIMIT + attempt) * 2 + role) % (2**63 - 1)


IMAGE_SEED_RULE = "(((seed * 1000003 + pair_index) * 1000 + attempt) * 2 + role) mod (2^63 - 1); role 0 unsafe, 1 safe"


@dataclass
class BaseModelInfo:
    """What the generator needs to know about a base model, read from its config files only."""

    pipeline_class: str
    family: str
    default_resolution: int
    resolution_multiple: int
    default_num_inference_steps: int
    # None: the preset's classifier-free guidance scale; FLUX.1: its guidance embedding's value (0 without one).
    default_guidance_scale: Optional[float] = None
    # FLUX.1 only: the true CFG scale of the safe twin's edit.
    default_true_cfg_scale: Optional[float] = None
    # FLUX.1 only: whether the transformer has a guidance embedding (FLUX.1-dev) or not (FLUX.1-schnell).
    guidance_embeds: Optional[bool] = None


def text2img_class(family: str):
    """The text-to-image pipeline class of a family (its img2img twin comes from AutoPipelineForImage2Image)."""
    import diffusers

    names = {
        "sd": "StableDiffusionPipeline",
        "sdxl": "StableDiffusionXLPipeline",
        "sd3": "StableDiffusion3Pipeline",
        "flux": "FluxPipeline",
    }
    if family not in names:
        raise UsageError(f"no pair generation for model family {family!r}: it covers {', '.join(names)}")
    return getattr(diffusers, names[family])


def inspect_base_model(
    pretrained_model_name_or_path: str,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
    pipeline_class: Optional[str] = None,
) -> BaseModelInfo:
    """Family, default resolution, step count and guidance of a base model, without loading any weight."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    pipeline_class = pipeline_class or detect_pipeline_class(pretrained_model_name_or_path, revision, cache_dir)
    family = pipeline_family(pipeline_class)
    if family not in FAMILIES_WITH_PAIRS:
        covered = ", ".join(FAMILY_NAMES[f] for f in FAMILIES_WITH_PAIRS)
        raise UsageError(
            f"{pipeline_class} is not supported for pair generation: use a base model of {covered}, "
            f"or give pairs made elsewhere with --dataset_name"
        )
    denoiser_class, subfolder = {
        "sd": (UNet2DConditionModel, "unet"),
        "sdxl": (UNet2DConditionModel, "unet"),
        "sd3": (SD3Transformer2DModel, "transformer"),
        "flux": (FluxTransformer2DModel, "transformer"),
    }[family]
    kwargs = {"revision": revision, "cache_dir": cache_dir}
    try:
        denoiser = denoiser_class.load_config(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        vae = AutoencoderKL.load_config(pretrained_model_name_or_path, subfolder="vae", **kwargs)
    except Exception as error:  # noqa: BLE001 - one line naming the cause and the fix
        raise model_source_error(
            error, pretrained_model_name_or_path, revision, "base model", needs=f"{subfolder}/vae config"
        ) from error
    vae_scale_factor = 2 ** (len(vae["block_out_channels"]) - 1)
    call = inspect.signature(text2img_class(family).__call__)
    steps = int(call.parameters["num_inference_steps"].default)
    guidance = {}
    if family == "flux":
        # The pipeline packs 2x2 latent patches into tokens: it resizes any size not a multiple of twice the vae
        # scale (16 for FLUX.1), so the images would not have the recipe's size.
        multiple = 2 * vae_scale_factor
        sample_size = denoiser.get("sample_size") or FLUX_DEFAULT_SAMPLE_SIZE
        has_guidance = bool(denoiser.get("guidance_embeds", False))
        guidance = {
            "default_guidance_scale": float(call.parameters["guidance_scale"].default) if has_guidance else 0.0,
            "default_true_cfg_scale": FLUX_TRUE_CFG_SCALE,
            "guidance_embeds": has_guidance,
        }
        steps = steps if has_guidance else FLUX_SCHNELL_STEPS
    else:
        # The pipelines' own size checks: a multiple of 8 for SD 1.x/2.x and SDXL, of vae scale x patch size for SD3.
        multiple = math.lcm(8, vae_scale_factor * denoiser.get("patch_size", 1)) if family == "sd3" else 8
        sample_size = denoiser["sample_size"]
    return BaseModelInfo(
        pipeline_class=pipeline_class,
        family=family,
        default_resolution=int(sample_size) * vae_scale_factor,
        resolution_multiple=multiple,
        default_num_inference_steps=steps,
        **guidance,
    )


def make_recipe(
    preset: ConceptPreset,
    base_model: str,
    info: BaseModelInfo,
    revision: Optional[str] = None,
    variant: Optional[str] = None,
    num_pairs: Optional[int] = None,
    strength: Optional[float] = None,
    guidance_scale: Optional[float] = None,
    num_inference_steps: Optional[int] = None,
    resolution: Optional[int] = None,
    seed: Optional[int] = None,
    verifier: Optional[str] = None,
    detector_threshold: Optional[float] = None,
    max_attempts: Optional[int] = None,
    true_cfg_scale: Optional[float] = None,
) -> PairRecipe:
    """The recipe: the preset's values (for the model's family) unless overridden, checked before any work.

    Without a threshold the verifier applies the official rule where one exists (NudeNet: any exposed
    box it reports), else the detector's own default. FLUX.1's guidance defaults are its own (see
    ``FLUX_TRUE_CFG_SCALE``), not the preset's classifier-free guidance scale.
    """
    if guidance_scale is None:
        guidance_scale = preset.guidance_scale if info.default_guidance_scale is None else info.default_guidance_scale
    if true_cfg_scale is None:
        true_cfg_scale = info.default_true_cfg_scale
    verifier_name = None if (verifier or preset.detector) in (None, "none") else (verifier or preset.detector)
    recipe = PairRecipe(
        concept=preset.name,
        base_model=base_model,
        revision=revision,
        family=info.family,
        prompt_pairs=tuple(tuple(pair) for pair in preset.pairs_for(info.family)),
        num_pairs=preset.num_pairs if num_pairs is None else num_pairs,
        strength=preset.sdedit_strength if strength is None else strength,
        guidance_scale=guidance_scale,
        num_inference_steps=info.default_num_inference_steps if num_inference_steps is None else num_inference_steps,
        resolution=info.default_resolution if resolution is None else resolution,
        seed=DEFAULT_SEED if seed is None else seed,
        verifier=verifier_name,
        detector_threshold=default_verifier_threshold(verifier_name)
        if detector_threshold is None
        else detector_threshold,
        max_attempts=DEFAULT_MAX_ATTEMPTS if max_attempts is None else max_attempts,
        variant=variant,
        true_cfg_scale=true_cfg_scale,
    )
    check_recipe(recipe, info)
    return recipe


def make_verifier(recipe: PairRecipe):
    """The recipe's verifier, or None. A detector that needs labels (clip) gets the recipe's prompts: the unsafe
    prompts describe the concept, the safe prompts its absence."""
    if not recipe.verifier:
        return None
    unsafe_prompts = list(dict.fromkeys(unsafe for unsafe, _ in recipe.prompt_pairs))
    safe_prompts = list(dict.fromkeys(safe for _, safe in recipe.prompt_pairs))
    return get_detector(
        recipe.verifier, recipe.detector_threshold, unsafe_labels=unsafe_prompts, safe_labels=safe_prompts
    )


def recipe_from_args(args, preset: ConceptPreset, info: BaseModelInfo, seed: int) -> PairRecipe:
    """The recipe from the flags of ``add_generation_arguments`` (the generator's or a training script's);
    ``seed`` is the generation seed (``--seed`` of the generator, ``--generation_seed`` of a training script)."""
    return make_recipe(
        preset,
        args.pretrained_model_name_or_path,
        info,
        revision=args.revision,
        variant=args.variant,
        num_pairs=args.num_pairs,
        strength=args.strength,
        guidance_scale=args.guidance_scale,
        num_inference_steps=args.num_inference_steps,
        resolution=args.resolution,
        seed=seed,
        verifier=args.verifier,
        detector_threshold=args.detector_threshold,
        max_attempts=args.max_attempts,
        true_cfg_scale=args.true_cfg_scale,
    )


def check_recipe(recipe: PairRecipe, info: BaseModelInfo):
    if recipe.num_pairs < 1:
        raise UsageError(f"--num_pairs must be at least 1, got {recipe.num_pairs}")
    if not math.isfinite(recipe.guidance_scale) or recipe.guidance_scale < 0:
        raise UsageError(
            f"--guidance_scale {recipe.guidance_scale} must be a finite number of at least 0 (7.5 is the usual value)"
        )
    if recipe.family == "flux" and info.guidance_embeds is False and recipe.guidance_scale != 0:
        raise UsageError(
            f"--guidance_scale {recipe.guidance_scale}: this FLUX.1 model has no guidance embedding (as FLUX.1-schnell), "
            f"so its pipeline ignores the value; leave it out (the safe twin's guidance is --true_cfg_scale)"
        )
    if recipe.true_cfg_scale is not None:
        if recipe.family != "flux":
            raise UsageError(
                f"--true_cfg_scale is for FLUX.1 base models only: a {FAMILY_NAMES.get(recipe.family, recipe.family)} "
                f"model edits with classifier-free guidance (--guidance_scale) and the unsafe prompt as negative prompt"
            )
        if not math.isfinite(recipe.true_cfg_scale) or recipe.true_cfg_scale <= 1:
            raise UsageError(
                f"--true_cfg_scale {recipe.true_cfg_scale} must be a finite number above 1: at 1 or below the FLUX "
                f"pipeline drops the negative prompt, the unsafe prompt the safe twin is steered away from "
                f"({FLUX_TRUE_CFG_SCALE} is the default)"
            )
    if not 0.0 < recipe.strength <= 1.0:
        raise UsageError(
            f"--strength {recipe.strength} is outside (0, 1]: SDEdit re-noises this fraction of the steps (0.75 nudity, 0.8 violence)"
        )
    if recipe.num_inference_steps < 1 or int(recipe.num_inference_steps * recipe.strength) < 1:
        raise UsageError(
            f"--num_inference_steps {recipe.num_inference_steps} with --strength {recipe.strength} leaves no SDEdit step: "
            f"raise one of them"
        )
    if not 1 <= recipe.max_attempts < MAX_ATTEMPTS_LIMIT:
        raise UsageError(f"--max_attempts must be between 1 and {MAX_ATTEMPTS_LIMIT - 1}, got {recipe.max_attempts}")
    if recipe.resolution < info.resolution_multiple or recipe.resolution % info.resolution_multiple:
        nearest = max(
            info.resolution_multiple, recipe.resolution // info.resolution_multiple * info.resolution_multiple
        )
        raise UsageError(
            f"--resolution {recipe.resolution} is not a multiple of {info.resolution_multiple} for this model: use e.g. {nearest}"
        )
    if recipe.detector_threshold is not None and not 0.0 < recipe.detector_threshold <= 1.0:
        raise UsageError(f"--verifier_threshold {recipe.detector_threshold} is outside (0, 1]")
    if recipe.seed < 0:
        raise UsageError(f"--seed must be non-negative, got {recipe.seed}")
    if recipe.verifier not in (None, "none"):
        try:
            resolve_detector_factory(recipe.verifier)
        except UsageError as error:
            raise UsageError(f"--verifier: {error}") from None


def default_pairs_dir(pretrained_model_name_or_path: str, concept: str) -> str:
    """``~/.cache/duo/pairs/<model>/<concept>`` (``$XDG_CACHE_HOME`` is honoured)."""
    cache_home = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    model = pretrained_model_name_or_path
    if os.path.isdir(model):
        model = os.path.abspath(model)
    return os.path.join(cache_home, "duo", "pairs", _sanitise(model), _sanitise(concept))


def _sanitise(name: str) -> str:
    # Hub ids become "owner--name", as in the Hugging Face cache; local paths keep their parts.
    return (
        re.sub(r"[^A-Za-z0-9._-]+", "-", name.strip("/\\").replace("/", "--").replace("\\", "--")).strip("-")
        or "model"
    )
