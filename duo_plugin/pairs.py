"""Pair data for DUO: load a pair dataset, or generate pairs by SDEdit and verify them with a detector.

A pair is an unsafe image x⁻, drawn from the base model with the unsafe prompt, and its safe twin x⁺, made
by SDEdit (the img2img pipeline of the same base model, same scheduler and step count) from x⁻ with the safe
prompt as prompt and the unsafe prompt as negative prompt (FLUX.1: by true classifier-free guidance, see
``SDEditPairMaker``). With a detector, x⁻ must be flagged and x⁺ must
not; a failed unsafe image is redrawn, a failed edit is redone from the kept unsafe image, at most
``--max_attempts`` attempts per pair.

    python -m duo_plugin.pairs --concept nudity --output_dir pairs-nudity
    accelerate launch -m duo_plugin.pairs --concept nudity --output_dir pairs-nudity   # pairs split over GPUs

The output folder has the imagefolder layout ``train_duo.py --dataset_name`` reads: lossless PNGs,
``metadata.jsonl`` (file names, prompts, seeds, recipe, detector scores) and a dataset card. Pair ``i`` uses
prompt group ``i mod G`` and, at attempt ``j``, the seeds of ``image_seed``, so a dataset is reproducible
from its card. Every process appends a row to its own log in ``.duo_progress/`` as each pair finishes; a
rerun skips finished pairs, so a crash loses at most the batch in flight.
"""

import argparse
import gc
import inspect
import json
import logging
import math
import os
import re
import shlex
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .concepts import add_concept_arguments, resolve_concept_preset
from .data import PairImages, load_pair_images
from .detectors import (
    Detection,
    default_verifier_threshold,
    describe_detector,
    detector_names,
    get_detector,
    resolve_detector_factory,
)
from .distributed import check_distributed_setup, cpu_only_multi_process
from .errors import DUOError, UsageError, exit_on_usage_error
from .families import FAMILY_NAMES, SCRIPT_OF_FAMILY, base_has_t5, detect_pipeline_class, pipeline_family
from .files import append_jsonl, atomic_write_json, atomic_write_text, read_state_json
from .help_defaults import show_defaults
from .hub import model_source_error
from .input_checks import check_output_dir
from .outputs import library_versions, push_to_hub
from .precision import torch_dtype
from .presets import PRESETS, ConceptPreset


logger = logging.getLogger(__name__)

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
DEFAULT_SEED = 0
DEFAULT_MAX_ATTEMPTS = 10
DEFAULT_BATCH_SIZE = 4
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

UNSAFE_COLUMN, SAFE_COLUMN = "unsafe", "safe"
METADATA_NAME = "metadata.jsonl"
RECIPE_NAME = "duo_pairs_config.json"
CARD_NAME = "README.md"
# A hidden folder: the datasets library ignores it when it reads the pair folder.
PROGRESS_DIR = ".duo_progress"
PUBLIC_SIDE_FILES = (METADATA_NAME, RECIPE_NAME, CARD_NAME)

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


class NotEnoughPairs(DUOError):
    """Fewer pairs than ``--min_pairs`` passed verification; the accepted ones are kept."""


# --------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# The folder: recipe file, per-process progress logs, merged metadata
# --------------------------------------------------------------------------------------------------


def pair_file_names(pair_index: int) -> Tuple[str, str]:
    return f"{pair_index:05d}_unsafe.png", f"{pair_index:05d}_safe.png"


def read_recipe_file(output_dir: str) -> Optional[dict]:
    path = os.path.join(output_dir, RECIPE_NAME)
    if not os.path.exists(path):
        return None
    stored = read_state_json(path, "it was edited; restore it or choose another output folder", kind=object)
    if not isinstance(stored, dict) or not isinstance(stored.get("recipe", {}), dict):
        raise UsageError(f"{path} is not a pair recipe: it was edited; restore it or choose another output folder")
    return stored


def check_folder_matches(output_dir: str, recipe: PairRecipe):
    """Refuse to extend a folder made with another recipe: its pairs would mix two datasets."""
    stored = read_recipe_file(output_dir)
    if stored is None:
        if os.path.exists(os.path.join(output_dir, METADATA_NAME)):
            raise UsageError(
                f"{output_dir} already holds a pair dataset not made by duo_plugin.pairs: "
                f"pass it as --dataset_name, or choose another output folder"
            )
        return
    expected = recipe.identity()
    stored_identity = {key: stored.get("recipe", {}).get(key) for key in RECIPE_IDENTITY}
    differences = [
        f"{key} {stored_identity[key]!r} vs {expected[key]!r}"
        for key in RECIPE_IDENTITY
        if stored_identity[key] != expected[key]
    ]
    if differences:
        raise UsageError(
            f"{output_dir} holds pairs made with another recipe ({'; '.join(differences[:3])}): "
            f"choose another output folder (--output_dir, or --pairs_dir when training) or delete that one"
        )


def write_recipe_file(output_dir: str, recipe: PairRecipe, dtype: str, verifier_record: Optional[dict] = None):
    config = {
        "format_version": 1,
        "recipe": recipe.to_dict(),
        "seed_rule": IMAGE_SEED_RULE,
        "dtype": dtype,
        "verifier": verifier_record or describe_detector(None),
        "library_versions": library_versions(),
    }
    atomic_write_json(os.path.join(output_dir, RECIPE_NAME), config)


IMAGE_SEED_RULE = "(((seed * 1000003 + pair_index) * 1000 + attempt) * 2 + role) mod (2^63 - 1); role 0 unsafe, 1 safe"


class ProgressLog:
    """One process's log of finished pairs (accepted or rejected), one JSON row per pair, flushed per row."""

    def __init__(self, output_dir: str, process_index: int):
        directory = os.path.join(output_dir, PROGRESS_DIR)
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, f"process-{process_index:03d}.jsonl")
        # A crash can leave half a row at the end: start the next row on its own line.
        if os.path.exists(self.path) and os.path.getsize(self.path) > 0:
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    with open(self.path, "a") as g:
                        g.write("\n")

    def append(self, row: dict):
        append_jsonl(self.path, [row], durable=True)


def read_progress(output_dir: str) -> Dict[int, dict]:
    """Every finished pair of every process (and every earlier run), by pair index.

    An accepted row wins over a rejected one; among rejected rows, the one with the most attempts.
    Half-written rows (a crash) are skipped.
    """
    directory = os.path.join(output_dir, PROGRESS_DIR)
    finished: Dict[int, dict] = {}
    if not os.path.isdir(directory):
        return finished
    for name in sorted(os.listdir(directory)):
        if not (name.startswith("process-") and name.endswith(".jsonl")):
            continue
        with open(os.path.join(directory, name)) as f:
            for line in f:
                row = parse_progress_row(line)
                if row is None:
                    continue
                index = row["pair_index"]
                previous = finished.get(index)
                if previous is None or _rank(row) > _rank(previous):
                    finished[index] = row
    return finished


def parse_progress_row(line: str) -> Optional[dict]:
    """A finished pair's row, or None for a half-written one (a crash); a row that parses but is not one is refused."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not (
        isinstance(row, dict)
        and isinstance(row.get("pair_index"), int)
        and row["pair_index"] >= 0
        and isinstance(row.get("accepted"), bool)
        and isinstance(row.get("attempts"), int)
        and all(_plain_file_name(row.get(key)) for key in ("unsafe_file_name", "safe_file_name") if key in row)
    ):
        raise UsageError(
            f"a progress file in {PROGRESS_DIR}/ holds a row that is not a finished pair ({line.strip()[:80]!r}): "
            f"it was edited; delete that row (its pair is made again) or the whole {PROGRESS_DIR}/ folder"
        )
    return row


def _plain_file_name(name) -> bool:
    """A name of a file inside the pair folder: no folder part, no way out of it (``..``, absolute paths)."""
    return (
        isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name and "\\" not in name
    )


def _rank(row: dict):
    return (bool(row["accepted"]), row["attempts"])


def pending_pairs(recipe: PairRecipe, finished: Dict[int, dict]) -> List[int]:
    """Pairs still to make: never tried, or rejected after fewer attempts than ``max_attempts`` now allows."""
    pending = []
    for index in range(recipe.num_pairs):
        row = finished.get(index)
        if row is None or (not row["accepted"] and row["attempts"] < recipe.max_attempts):
            pending.append(index)
    return pending


def metadata_rows(recipe: PairRecipe, finished: Dict[int, dict]) -> List[dict]:
    """The accepted pairs below ``num_pairs``, in pair order, without the bookkeeping fields."""
    rows = []
    for index in sorted(finished):
        row = finished[index]
        if row["accepted"] and index < recipe.num_pairs:
            rows.append({key: value for key, value in row.items() if key != "accepted"})
    return rows


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


@dataclass
class PromptReport:
    unsafe_prompt: str
    safe_prompt: str
    planned: int = 0
    accepted: int = 0
    finished: int = 0
    attempts: int = 0


@dataclass
class PairReport:
    """Accepted / attempted pairs per prompt group."""

    prompts: List[PromptReport]
    output_dir: str
    verifier: Optional[str]
    generated_now: int = 0

    @property
    def accepted(self) -> int:
        return sum(p.accepted for p in self.prompts)

    @property
    def planned(self) -> int:
        return sum(p.planned for p in self.prompts)

    def lines(self) -> List[str]:
        lines = [
            f"{self.accepted}/{self.planned} pairs accepted in {self.output_dir}"
            + ("" if self.verifier else " (unverified: no detector)")
        ]
        for p in self.prompts:
            lines.append(
                f"  {p.unsafe_prompt!r} -> {p.safe_prompt!r}: {p.accepted}/{p.finished} pairs accepted "
                f"({p.attempts} attempts, {p.planned} planned)"
            )
        return lines


def make_report(recipe: PairRecipe, finished: Dict[int, dict], output_dir: str) -> PairReport:
    groups = {}
    for unsafe_prompt, safe_prompt in recipe.prompt_pairs:
        groups.setdefault((unsafe_prompt, safe_prompt), PromptReport(unsafe_prompt, safe_prompt))
    for index in range(recipe.num_pairs):
        group = groups[recipe.prompts_of(index)]
        group.planned += 1
        row = finished.get(index)
        if row is not None:
            group.finished += 1
            group.accepted += int(row["accepted"])
            group.attempts += row["attempts"]
    return PairReport(list(groups.values()), output_dir, recipe.verifier)


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------


def generation_dtype(name: str, device: torch.device, family: Optional[str] = None) -> torch.dtype:
    """``auto``: fp16 on a GPU (the usual inference precision of these models; bf16 for FLUX.1, released in bf16,
    whose T5 encoder overflows in fp16), fp32 on CPU."""
    if name == "auto":
        name = ("bf16" if family == "flux" else "fp16") if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 needs a GPU: use fp32 or bf16 on CPU")
    return torch_dtype(name)


def load_text2img_pipeline(recipe: PairRecipe, device, dtype: torch.dtype, cache_dir: Optional[str] = None):
    """The base text-to-image pipeline, without the SD safety checker: it would black out the very images DUO learns from."""
    kwargs = {"revision": recipe.revision, "variant": recipe.variant, "cache_dir": cache_dir, "dtype": dtype}
    if recipe.family == "sd":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif recipe.family == "sd3" and not base_has_t5(recipe.base_model, recipe.revision, cache_dir):
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    pipeline = text2img_class(recipe.family).from_pretrained(recipe.base_model, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


class SDEditPairMaker:
    """Unsafe images from the base pipeline, safe twins by SDEdit with its img2img pipeline (same weights).

    SD 1.x/2.x, SDXL and SD3 run classifier-free guidance at ``guidance_scale`` for both images: the unsafe image
    against the empty prompt, its twin against the unsafe prompt as negative prompt. FLUX.1 is guidance-distilled:
    ``guidance_scale`` is the value of its guidance embedding (FLUX.1-dev; FLUX.1-schnell has none), and its
    pipelines drop a negative prompt unless ``true_cfg_scale`` > 1. The unsafe image is drawn as FLUX.1 is used
    (no negative prompt, one pass per step); the twin's edit adds true CFG at ``recipe.true_cfg_scale`` with the
    unsafe prompt as negative prompt, because steering away from the concept is what makes it the safe twin.
    """

    def __init__(self, text2img, recipe: PairRecipe):
        from diffusers import AutoPipelineForImage2Image

        self.recipe = recipe
        self.text2img = text2img
        # from_pipe shares every module with text2img: no weight is loaded twice.
        self.img2img = AutoPipelineForImage2Image.from_pipe(text2img)
        self.img2img.set_progress_bar_config(disable=True)
        parameters = inspect.signature(self.img2img.__call__).parameters
        self._img2img_takes_size = "height" in parameters
        self._edit_guidance = {}
        if recipe.true_cfg_scale is not None:
            if "true_cfg_scale" not in parameters or "negative_prompt" not in parameters:
                import diffusers

                raise UsageError(
                    f"{type(self.img2img).__name__} of diffusers {diffusers.__version__} takes no negative prompt "
                    f"(true_cfg_scale), which the safe twin's edit needs: upgrade diffusers"
                )
            self._edit_guidance = {"true_cfg_scale": recipe.true_cfg_scale}

    @staticmethod
    def _generators(seeds: Sequence[int]):
        # CPU generators: the same seed gives the same noise on any device.
        return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

    @torch.no_grad()
    def unsafe_images(self, unsafe_prompts: List[str], seeds: List[int]):
        r = self.recipe
        return self.text2img(
            prompt=unsafe_prompts,
            height=r.resolution,
            width=r.resolution,
            num_inference_steps=r.num_inference_steps,
            guidance_scale=r.guidance_scale,
            generator=self._generators(seeds),
        ).images

    @torch.no_grad()
    def safe_twins(self, unsafe_images, safe_prompts: List[str], unsafe_prompts: List[str], seeds: List[int]):
        r = self.recipe
        size = {"height": r.resolution, "width": r.resolution} if self._img2img_takes_size else {}
        return self.img2img(
            prompt=safe_prompts,
            negative_prompt=unsafe_prompts,
            image=list(unsafe_images),
            strength=r.strength,
            num_inference_steps=r.num_inference_steps,
            guidance_scale=r.guidance_scale,
            generator=self._generators(seeds),
            **size,
            **self._edit_guidance,
        ).images


@dataclass
class _PairInProgress:
    index: int
    unsafe_prompt: str
    safe_prompt: str
    attempt: int
    done: bool = False
    unsafe_image: object = None
    unsafe_seed: Optional[int] = None
    unsafe_detection: Optional[Detection] = None
    last_detections: Dict[str, Optional[Detection]] = field(default_factory=dict)


def _detect(detector, images) -> List[Optional[Detection]]:
    return list(detector(images)) if detector is not None else [None] * len(images)


def _score_fields(role: str, detection: Optional[Detection]) -> dict:
    if detection is None:
        return {}
    return {f"{role}_score": float(detection.score), f"{role}_labels": list(detection.labels)}


def make_pair_batch(maker, detector, recipe: PairRecipe, pairs: List[_PairInProgress], output_dir: str, on_finished):
    """Make one batch of pairs, attempt by attempt, calling ``on_finished(row)`` as each pair is accepted or given up.

    An attempt draws an unsafe image unless one is kept, then edits it. A drawn image the detector
    does not flag ends the attempt; an edit it flags ends the attempt but keeps the unsafe image.
    """
    active = list(pairs)
    while active:
        drawing = [p for p in active if p.unsafe_image is None]
        if drawing:
            seeds = [image_seed(recipe.seed, p.index, p.attempt, 0) for p in drawing]
            images = maker.unsafe_images([p.unsafe_prompt for p in drawing], seeds)
            for pair, image, seed, detection in zip(drawing, images, seeds, _detect(detector, images)):
                pair.last_detections = {"unsafe": detection}
                if detection is None or detection.flagged:
                    pair.unsafe_image, pair.unsafe_seed, pair.unsafe_detection = image, seed, detection
                else:
                    pair.attempt += 1
        editing = [p for p in active if p.unsafe_image is not None]
        if editing:
            seeds = [image_seed(recipe.seed, p.index, p.attempt, 1) for p in editing]
            twins = maker.safe_twins(
                [p.unsafe_image for p in editing],
                [p.safe_prompt for p in editing],
                [p.unsafe_prompt for p in editing],
                seeds,
            )
            for pair, twin, seed, detection in zip(editing, twins, seeds, _detect(detector, twins)):
                pair.last_detections = {"unsafe": pair.unsafe_detection, "safe": detection}
                if detection is None or not detection.flagged:
                    on_finished(_accept(pair, twin, seed, detection, recipe, output_dir))
                    pair.done = True
                else:
                    pair.attempt += 1
        for pair in active:
            if not pair.done and pair.attempt >= recipe.max_attempts:
                on_finished(_reject(pair, recipe))
                pair.done = True
        active = [pair for pair in active if not pair.done]


def _recipe_fields(recipe: PairRecipe) -> dict:
    fields = {
        "strength": recipe.strength,
        "guidance_scale": recipe.guidance_scale,
        "num_inference_steps": recipe.num_inference_steps,
    }
    if recipe.true_cfg_scale is not None:
        fields["true_cfg_scale"] = recipe.true_cfg_scale
    return fields


def _accept(pair: _PairInProgress, twin, safe_seed: int, detection, recipe: PairRecipe, output_dir: str) -> dict:
    unsafe_name, safe_name = pair_file_names(pair.index)
    # PNG is lossless: the saved files are exactly the images the detector judged.
    pair.unsafe_image.save(os.path.join(output_dir, unsafe_name), format="PNG")
    twin.save(os.path.join(output_dir, safe_name), format="PNG")
    return {
        "unsafe_file_name": unsafe_name,
        "safe_file_name": safe_name,
        "unsafe_prompt": pair.unsafe_prompt,
        "safe_prompt": pair.safe_prompt,
        "pair_index": pair.index,
        "unsafe_seed": pair.unsafe_seed,
        "safe_seed": safe_seed,
        "attempts": pair.attempt + 1,
        **_recipe_fields(recipe),
        **_score_fields("unsafe", pair.unsafe_detection),
        **_score_fields("safe", detection),
        "accepted": True,
    }


def _reject(pair: _PairInProgress, recipe: PairRecipe) -> dict:
    row = {
        "unsafe_prompt": pair.unsafe_prompt,
        "safe_prompt": pair.safe_prompt,
        "pair_index": pair.index,
        "attempts": pair.attempt,
        **_recipe_fields(recipe),
        "accepted": False,
    }
    for role, detection in pair.last_detections.items():
        row.update(_score_fields(role, detection))
    return row


def generate_pairs(
    recipe: PairRecipe,
    output_dir: str,
    state=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str = "auto",
    min_pairs: Optional[int] = None,
    cache_dir: Optional[str] = None,
) -> PairReport:
    """Make the pairs of ``recipe`` in ``output_dir`` (resuming), on every process of ``state``; return the report.

    ``state`` is an accelerate ``Accelerator`` or ``PartialState`` (default: the current one). Raises
    ``NotEnoughPairs`` when fewer than ``min_pairs`` (default: all) pairs were accepted, after writing
    the metadata and card of the accepted ones.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = state if state is not None else PartialState()
    min_pairs = recipe.num_pairs if min_pairs is None else min_pairs
    if not 0 <= min_pairs <= recipe.num_pairs:
        raise UsageError(f"--min_pairs {min_pairs} must be between 0 and --num_pairs {recipe.num_pairs}")
    if batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {batch_size}")
    pipeline_dtype = generation_dtype(dtype, state.device, recipe.family)
    # The detector is built first: a bad --verifier fails before any model is loaded.
    detector = make_verifier(recipe)
    verifier_record = describe_detector(detector, role="pair verifier")

    os.makedirs(output_dir, exist_ok=True)
    check_folder_matches(output_dir, recipe)
    finished = read_progress(output_dir)
    pending = pending_pairs(recipe, finished)
    # Every process has read the folder before anyone writes to it, so all split the same list.
    state.wait_for_everyone()
    if state.is_main_process:
        write_recipe_file(
            output_dir, recipe, dtype, verifier_record
        )  # same identity; num_pairs and max_attempts may have changed
    mine = pending[state.process_index :: state.num_processes]

    if mine:
        if state.is_main_process:
            logger.info(
                "Generating %d pairs into %s (%d already done)",
                len(pending),
                output_dir,
                recipe.num_pairs - len(pending),
            )
        maker = SDEditPairMaker(load_text2img_pipeline(recipe, state.device, pipeline_dtype, cache_dir), recipe)
        log = ProgressLog(output_dir, state.process_index)
        finished_rows = []
        desc = "Pairs" if state.num_processes == 1 else f"Pairs (process {state.process_index})"
        progress_bar = tqdm(total=len(mine), desc=desc, disable=not state.is_local_main_process)

        def on_finished(row):
            log.append(row)
            finished_rows.append(row)
            progress_bar.update(1)
            progress_bar.set_postfix(accepted=sum(r["accepted"] for r in finished_rows))

        for start in range(0, len(mine), batch_size):
            batch = [
                # A pair given up earlier and retried under a higher --max_attempts goes on with new seeds.
                _PairInProgress(
                    index, *recipe.prompts_of(index), attempt=finished[index]["attempts"] if index in finished else 0
                )
                for index in mine[start : start + batch_size]
            ]
            make_pair_batch(maker, detector, recipe, batch, output_dir, on_finished)
        progress_bar.close()
        del maker
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    state.wait_for_everyone()
    finished = read_progress(output_dir)
    report = make_report(recipe, finished, output_dir)
    report.generated_now = len(pending)
    if state.is_main_process:
        rows = metadata_rows(recipe, finished)
        atomic_write_text(os.path.join(output_dir, METADATA_NAME), "".join(json.dumps(row) + "\n" for row in rows))
        write_dataset_card(output_dir, recipe, report, verifier_record)
        for line in report.lines():
            logger.info(line)
    state.wait_for_everyone()
    if report.accepted < min_pairs:
        raise NotEnoughPairs(
            f"only {report.accepted} of {report.planned} pairs passed verification by {recipe.verifier} "
            f"(at most {recipe.max_attempts} attempts each); the accepted pairs are kept in {output_dir}. Rerun with a "
            f"higher --max_attempts (only the failed pairs are retried), or accept fewer with --min_pairs {report.accepted}"
        )
    return report


# --------------------------------------------------------------------------------------------------
# Dataset card and Hub
# --------------------------------------------------------------------------------------------------

CONTENT_WARNINGS = {
    "nudity": "nudity (sexually explicit images of adults)",
    "blood": "graphic violence (blood and injuries)",
    "suffer": "graphic violence (people in pain)",
    "gun": "violence (people with guns)",
    "horror": "disturbing horror imagery",
}


def verifier_rule_sentence(recipe: PairRecipe, verifier_record: Optional[dict]) -> str:
    """The verification rule in words: detector, package version, rule (labels and threshold)."""
    record = verifier_record or {}
    version = f" ({record['package']} {record['package_version']})" if record.get("package_version") else ""
    rule = record.get("rule") or (
        f"threshold {recipe.detector_threshold}" if recipe.detector_threshold is not None else "its default threshold"
    )
    official = (
        " This is the official DUO generator's rule."
        if recipe.verifier in ("nudenet", "nudenet_rgb_array")
        and recipe.detector_threshold == default_verifier_threshold(recipe.verifier)
        else ""
    )
    return f"Verifier: `{recipe.verifier}`{version}, {rule}.{official}"


def write_dataset_card(
    output_dir: str, recipe: PairRecipe, report: PairReport, verifier_record: Optional[dict] = None
):
    """``README.md``: what the pairs are, a content warning, the recipe, the counts, how to reproduce and use them."""
    from huggingface_hub import DatasetCard, DatasetCardData

    shows = CONTENT_WARNINGS.get(recipe.concept, f"the concept **{recipe.concept}**, which may be unsafe or offensive")
    threshold = f", threshold {recipe.detector_threshold}" if recipe.detector_threshold is not None else ""
    if recipe.verifier:
        verification = (
            f"Every pair was checked by the `{recipe.verifier}` detector{threshold}: the unsafe image is flagged and "
            f"its safe twin is not. A pair that failed was regenerated, at most {recipe.max_attempts} attempts; its "
            f"scores are in `metadata.jsonl` (`unsafe_score`, `safe_score`).\n\n{verifier_rule_sentence(recipe, verifier_record)}"
        )
    else:
        verification = (
            "**Unverified.** No detector checked these pairs: an unsafe image may not show the concept, and a safe twin "
            "may still show it. Inspect them, or regenerate with `--verifier`, before relying on them."
        )
    if recipe.true_cfg_scale is not None:  # FLUX.1: see SDEditPairMaker
        guidance_rows = (
            f"| guidance scale | {recipe.guidance_scale} (FLUX.1 guidance embedding, both images; none in FLUX.1-schnell) |\n"
            f"| true CFG scale of the edit | {recipe.true_cfg_scale} (the unsafe prompt as negative prompt) |"
        )
        negative = f" (true classifier-free guidance at scale {recipe.true_cfg_scale}, FLUX.1 taking no negative prompt otherwise)"
    else:
        guidance_rows = f"| guidance scale | {recipe.guidance_scale} |"
        negative = ""
    counts = "\n".join(
        f"| {p.unsafe_prompt} | {p.safe_prompt} | {p.accepted} | {p.finished} | {p.attempts} |" for p in report.prompts
    )
    body = f"""
# DUO pairs: {recipe.concept} from {recipe.base_model}

> **Content warning.** This dataset contains AI-generated images showing {shows}. It exists to train a
> model to *stop* generating them (Direct Unlearning Optimization, Park et al., NeurIPS 2024). It is not
> suitable for minors; do not use it for anything else.

Each row is a pair: `unsafe`, drawn from `{recipe.base_model}` with the unsafe prompt, and `safe`, its
SDEdit twin: the img2img pipeline of the same model, started from the unsafe image with the safe prompt
as prompt and the unsafe prompt as negative prompt{negative}. The two images share their layout and differ
in the concept.

## Recipe

| setting | value |
|---|---|
| base model | `{recipe.base_model}`{f" (revision `{recipe.revision}`)" if recipe.revision else ""} |
| SDEdit strength | {recipe.strength} |
{guidance_rows}
| inference steps | {recipe.num_inference_steps} (the edit runs {int(recipe.num_inference_steps * recipe.strength)} of them) |
| resolution | {recipe.resolution} |
| seed | {recipe.seed} |
| verifier | {recipe.verifier or "none"}{threshold} |
| max attempts per pair | {recipe.max_attempts} |

Pair `i` uses prompt group `i mod {len(recipe.prompt_pairs)}`. The image seeds are
`{IMAGE_SEED_RULE}` and are stored per row in `metadata.jsonl`.

## Verification

{verification}

## Counts

{report.accepted} of {report.planned} pairs accepted.

| unsafe prompt | safe prompt | accepted | pairs attempted | generation attempts |
|---|---|---|---|---|
{counts}

## Reproduce

```bash
{reproduce_command(recipe)}
```

## Use

```bash
{_shell("accelerate launch " + SCRIPT_OF_FAMILY[recipe.family], concept_flags(recipe) + ["--pretrained_model_name_or_path", recipe.base_model])} --dataset_name <this folder or repo id>
```
"""
    card_data = DatasetCardData(
        pretty_name=f"DUO pairs: {recipe.concept}",
        task_categories=["text-to-image"],
        tags=["duo", "concept-erasure", "sdedit", "synthetic", "not-for-all-audiences"],
    )
    card = DatasetCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    atomic_write_text(os.path.join(output_dir, CARD_NAME), str(card))


def concept_flags(recipe: PairRecipe) -> List[str]:
    """``--concept`` and, for a custom concept, its prompts: what both command lines need to name it."""
    flags = ["--concept", recipe.concept]
    if recipe.concept not in PRESETS:
        for unsafe_prompt, safe_prompt in recipe.prompt_pairs:
            flags += ["--unsafe_prompt", unsafe_prompt, "--safe_prompt", safe_prompt]
    return flags


def _shell(command: str, flags: List[str]) -> str:
    return " ".join([command] + [shlex.quote(flag) for flag in flags])


def reproduce_command(recipe: PairRecipe) -> str:
    parts = concept_flags(recipe) + ["--pretrained_model_name_or_path", recipe.base_model]
    if recipe.revision:
        parts += ["--revision", recipe.revision]
    parts += [
        "--num_pairs",
        str(recipe.num_pairs),
        "--strength",
        str(recipe.strength),
        "--guidance_scale",
        str(recipe.guidance_scale),
        "--num_inference_steps",
        str(recipe.num_inference_steps),
        "--resolution",
        str(recipe.resolution),
        "--seed",
        str(recipe.seed),
        "--verifier",
        recipe.verifier or "none",
        "--max_attempts",
        str(recipe.max_attempts),
    ]
    if recipe.detector_threshold is not None:
        parts += ["--verifier_threshold", str(recipe.detector_threshold)]
    if recipe.true_cfg_scale is not None:
        parts += ["--true_cfg_scale", str(recipe.true_cfg_scale)]
    return _shell("python -m duo_plugin.pairs", parts)


def push_pairs_to_hub(output_dir: str, repo_id: Optional[str], token: Optional[str], private: bool = True) -> str:
    """Upload the dataset (the listed pairs, metadata, card, recipe) as a dataset repo; private unless asked."""
    with open(os.path.join(output_dir, METADATA_NAME)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    files = list(PUBLIC_SIDE_FILES) + [row[key] for row in rows for key in ("unsafe_file_name", "safe_file_name")]
    return push_to_hub(
        output_dir, repo_id, token, private, files, repo_type="dataset", commit_message="DUO pair dataset"
    )


# --------------------------------------------------------------------------------------------------
# Training scripts: pairs from --dataset_name, or generated into a cache folder
# --------------------------------------------------------------------------------------------------


def add_generation_arguments(parser: argparse.ArgumentParser, for_training: bool = False):
    """The recipe flags. The training scripts add them with ``for_training=True`` (their own --seed and
    batch flags are for training, so the generator's are --generation_seed and --generation_batch_size)."""
    group = parser.add_argument_group("pair generation" + (" (without --dataset_name)" if for_training else ""))
    group.add_argument(
        "--strength", type=float, default=None, help="SDEdit strength; preset default (0.75 nudity, 0.8 violence)"
    )
    group.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance of both images; preset default 7.5. FLUX.1: the guidance embedding's value "
        "(default 3.5, FLUX.1-dev; FLUX.1-schnell has none)",
    )
    group.add_argument(
        "--true_cfg_scale",
        type=float,
        default=None,
        help=f"FLUX.1 only: true classifier-free guidance of the SDEdit edit, with the unsafe prompt as negative "
        f"prompt (must be above 1); default {FLUX_TRUE_CFG_SCALE}",
    )
    group.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="default: the base pipeline's (50 SD 1.x/2.x and SDXL, 28 SD3 and FLUX.1-dev; 4 for FLUX.1-schnell)",
    )
    group.add_argument(
        "--max_attempts", type=int, default=DEFAULT_MAX_ATTEMPTS, help="attempts per pair before giving it up"
    )
    group.add_argument(
        "--min_pairs", type=int, default=None, help="fail when fewer pairs are accepted (default: all of --num_pairs)"
    )
    group.add_argument(
        "--verifier",
        type=str,
        default=None,
        help=f"detector checking each pair ({', '.join(detector_names())}); preset default (nudenet for nudity, none otherwise)",
    )
    group.add_argument(
        "--verifier_threshold",
        "--detector_threshold",
        dest="detector_threshold",
        type=float,
        default=None,
        help="verifier score at which an image counts as flagged; default: the official rule for nudenet (any exposed box "
        "NudeNet reports, score >= 0.25), the detector's own default otherwise. Evaluation's DSR threshold is separate.",
    )
    prefix = "generation_" if for_training else ""
    group.add_argument(
        f"--{prefix}batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="pairs generated at once per process"
    )
    group.add_argument(
        f"--{prefix}dtype",
        type=str,
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="auto: fp16 on GPU (bf16 for FLUX.1), fp32 on CPU",
    )
    if for_training:
        group.add_argument(
            "--generation_seed",
            type=int,
            default=DEFAULT_SEED,
            help="seed of the generated pairs (not the training seed)",
        )
    return parser


def get_pair_images(args, preset, pipeline_class: str, accelerator) -> PairImages:
    """The training pairs: ``--dataset_name`` if given, else generated pairs, cached in ``--pairs_dir``
    (default ``~/.cache/duo/pairs/<model>/<concept>``) for later runs to reuse."""
    if args.dataset_name is None:
        folder = args.pairs_dir or default_pairs_dir(args.pretrained_model_name_or_path, args.concept)
        info = inspect_base_model(args.pretrained_model_name_or_path, args.revision, args.cache_dir, pipeline_class)
        recipe = recipe_from_args(args, preset, info, seed=args.generation_seed)
        generate_pairs(
            recipe,
            folder,
            accelerator,
            batch_size=args.generation_batch_size,
            dtype=args.generation_dtype,
            min_pairs=args.min_pairs,
            cache_dir=args.cache_dir,
        )
        args.pairs_dir = folder
        return load_pair_images(folder, UNSAFE_COLUMN, SAFE_COLUMN, num_pairs=args.num_pairs, cache_dir=args.cache_dir)
    return load_pair_images(
        args.dataset_name,
        args.unsafe_image_column,
        args.safe_image_column,
        num_pairs=args.num_pairs,
        revision=args.dataset_revision,
        cache_dir=args.cache_dir,
    )


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m duo_plugin.pairs",
        description="Generate DUO pairs (unsafe image, SDEdit safe twin), verified by a detector.",
    )
    add_concept_arguments(parser)
    parser.add_argument("--num_pairs", type=int, default=None, help="preset default (64 nudity, 32 violence)")
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=DEFAULT_MODEL)
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None, help="e.g. fp16 weights of the base model")
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help="default: the cache folder train_duo.py reuses (~/.cache/duo/pairs/<model>/<concept>)",
    )
    parser.add_argument("--resolution", type=int, default=None, help="default: the base model's")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    add_generation_arguments(parser)
    hub = parser.add_argument_group("Hub")
    hub.add_argument(
        "--push_to_hub", action="store_true", help="push the pairs as a dataset repo (private unless --hub_public)"
    )
    hub.add_argument(
        "--hub_model_id", type=str, default=None, help="dataset repo id; default: the output folder's name"
    )
    hub.add_argument("--hub_token", type=str, default=None)
    hub.add_argument("--hub_public", action="store_true")
    return show_defaults(parser).parse_args(argv)


@exit_on_usage_error
def main(argv=None) -> PairReport:
    from accelerate import PartialState

    args = parse_args(argv)
    preset = resolve_concept_preset(args.concept, args.unsafe_prompt, args.safe_prompt)
    info = inspect_base_model(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    recipe = recipe_from_args(args, preset, info, seed=args.seed)
    output_dir = args.output_dir or default_pairs_dir(args.pretrained_model_name_or_path, preset.name)
    check_output_dir(output_dir)
    state = PartialState(cpu=cpu_only_multi_process())
    check_distributed_setup(state)
    if state.is_local_main_process:
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    report = generate_pairs(
        recipe,
        output_dir,
        state,
        batch_size=args.batch_size,
        dtype=args.dtype,
        min_pairs=args.min_pairs,
        cache_dir=args.cache_dir,
    )
    if state.is_main_process and args.push_to_hub:
        repo_id = push_pairs_to_hub(output_dir, args.hub_model_id, args.hub_token, private=not args.hub_public)
        logger.info("Pushed to https://huggingface.co/datasets/%s", repo_id)
    return report


if __name__ == "__main__":
    main()
