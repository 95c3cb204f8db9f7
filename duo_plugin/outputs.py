"""What a run leaves behind: metrics, validation grids, ``duo_config.json``, the model card, the Hub upload."""

import json
import logging
import os
import shutil
import tempfile
from typing import Callable, Dict, List, Optional, Sequence

from . import official_flags, run_guard
from .errors import NetworkError, storage_error, storage_reason
from .families.quantization import quantization_record
from .files import append_jsonl, atomic_write_json, atomic_write_text
from .lora import LORA_WEIGHT_NAME, adapters_disabled, target_module_patterns
from .saturation import model_card_section, summary_from_metrics


logger = logging.getLogger(__name__)

DUO_CONFIG_NAME = "duo_config.json"
MODEL_CARD_TAGS = ["diffusers", "lora", "duo", "concept-erasure", "text-to-image"]


class MetricsLog:
    """Per-step metrics as JSON lines in the output folder (the trackers get the same values)."""

    def __init__(self, path: str, enabled: bool, append: bool):
        self.path = path
        self.enabled = enabled
        if enabled:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            if not append and os.path.exists(path):
                os.remove(path)

    def write(self, step: int, values: dict):
        if self.enabled:
            append_jsonl(self.path, [{"step": step, **values}])

    def truncate_after(self, step: int):
        """On resume, forget the rows the resumed run will write again."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(rows)


def image_grid(rows: list):
    """Paste rows of images of one size into one image; shorter rows end in white cells."""
    from diffusers.utils import make_image_grid
    from PIL import Image

    cols = max(len(row) for row in rows)
    blank = Image.new("RGB", rows[0][0].size, "white")
    cells = [image for row in rows for image in list(row) + [blank] * (cols - len(row))]
    return make_image_grid(cells, rows=len(rows), cols=cols)


def log_images_to_trackers(accelerator, tag: str, grid, step: int):
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(grid)}, step=step)


def validation_grid(args, accelerator, model, generate, step, save: bool = True):
    """Base vs unlearned on the validation prompts, same seeds; saved and sent to the trackers (``save``: the
    main process; the others only take part in a sharded model's forwards).

    The live model is used as it is (never cast): the adapter is switched off for the base images.
    ``generate(prompt, seeds) -> images`` hides the family's pipeline.
    """
    if save:
        logger.info("Running validation at step %d", step)
    seeds = [args.seed + i for i in range(args.num_validation_images)]
    rows = []
    for prompt in args.validation_prompts:
        with adapters_disabled(model):
            base = generate(prompt, seeds)
        rows.append(base + generate(prompt, seeds))
    if not save:
        return
    grid = image_grid(rows)
    os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
    grid.save(os.path.join(args.output_dir, "validation", f"step-{step:06d}.png"))
    log_images_to_trackers(accelerator, "validation (left: base, right: unlearned)", grid, step)


def save_model_card_samples(args, preset, generate, save: bool = True):
    """Samples for the public model card: unrelated prompts only, and nothing a detector flags (``save``: as in
    ``validation_grid``)."""
    from .detectors import get_detector

    seeds = [args.seed + i for i in range(args.num_validation_images)]
    if not save:
        for prompt in preset.unrelated_prompts:
            generate(prompt, seeds)
        return []
    detector = get_detector(preset.detector) if preset.detector else None
    samples = []
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    for p, prompt in enumerate(preset.unrelated_prompts):
        images = generate(prompt, seeds)
        verdicts = detector(images) if detector else [None] * len(images)
        for i, (image, verdict) in enumerate(zip(images, verdicts)):
            if verdict is not None and verdict.flagged:
                continue
            name = f"samples/sample_{p}_{i}.png"
            image.save(os.path.join(args.output_dir, name))
            samples.append((name, prompt))
    return samples


def library_versions() -> Dict[str, str]:
    import importlib.metadata as metadata

    versions = {}
    for package in ("torch", "diffusers", "transformers", "accelerate", "peft", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def save_adapter(output_dir: str, save: Callable[[str], None], last_checkpoint: Optional[str] = None):
    """Write the trained adapter with ``save(folder)`` into a staged folder, sync it, then rename its files into
    ``output_dir``. On a full or read-only disk nothing half-written stays, and the adapter, which exists only in
    memory, is written to the system's temporary folder instead when that has room; the error line says where."""
    staging = os.path.join(output_dir, ".adapter.tmp")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        os.makedirs(staging)
        save(staging)
        for name in sorted(os.listdir(staging)):
            with open(os.path.join(staging, name), "rb") as f:
                os.fsync(f.fileno())
        for name in sorted(os.listdir(staging)):
            os.replace(os.path.join(staging, name), os.path.join(output_dir, name))
        os.rmdir(staging)
    except Exception as error:
        shutil.rmtree(staging, ignore_errors=True)
        if storage_reason(error) is None:
            raise
        rescue = tempfile.mkdtemp(prefix="duo-adapter-")
        try:
            save(rescue)
            kept = f"the adapter was saved to {rescue} instead: move its files into {output_dir}"
        except Exception:
            shutil.rmtree(rescue, ignore_errors=True)
            kept = (
                f"the adapter could not be kept; the last checkpoint is {last_checkpoint}"
                if last_checkpoint
                else "the adapter could not be kept and no checkpoint holds it"
            )
        raise storage_error(error, "the adapter", output_dir, kept) from None


def write_duo_config(
    output_dir: str, args, architecture: dict, target_modules: List[str], extra: Optional[dict] = None
) -> dict:
    """``duo_config.json``: what ``duo_plugin`` needs to rebuild the unlearned model, and the recipe."""
    config = {
        "format_version": 1,
        "base_model": args.pretrained_model_name_or_path,
        "base_model_revision": args.revision,
        "variant": args.variant,
        "architecture": architecture,
        "concept": args.concept,
        "weight_name": LORA_WEIGHT_NAME,
        "beta_dpo": args.beta_dpo,
        "preservation_weight": args.preservation_weight,
        "learning_rate": args.learning_rate,
        "max_train_steps": args.max_train_steps,
        "train_batch_size": args.train_batch_size,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "rank": args.rank,
        "lora_alpha": args.lora_alpha,
        "lora_target": args.lora_target,
        "target_modules": target_module_patterns(target_modules),
        "t_min": args.t_min,
        "t_max": args.t_max,
        "t_max_measurement": getattr(args, "t_max_measurement", None),
        "condition_on_prompts": args.condition_on_prompts,
        "objective": args.objective,
        "preference_conditions": list(args.preference_conditions),
        "retain_weight": args.retain_weight,
        "retain": getattr(args, "retain_record", None),
        "quantized_base": quantization_record(getattr(args, "quantize_base", "none")),
        "resolution": args.resolution,
        "seed": args.seed,
        "dataset": args.dataset_name,
        "pairs_dir": getattr(args, "pairs_dir", None),
        "library_versions": library_versions(),
    }
    config.update(official_flags.training_record(args))
    config.update(extra or {})
    atomic_write_json(os.path.join(output_dir, DUO_CONFIG_NAME), config)
    return config


# The licence of each family's reference weights, as diffusers' DreamBooth-LoRA scripts declare it. SD3's and
# FLUX.1-dev's are not SPDX licences: the card says "other" and links the base model's licence file.
FAMILY_LICENCES = {"sd": "creativeml-openrail-m", "sdxl": "openrail++", "sd3": "other", "flux": "other"}
# The dtype a card's loading example uses: FLUX.1's T5 overflows in fp16, so its pipelines run in bf16.
FAMILY_CARD_DTYPES = {"flux": "bfloat16"}


def regulariser_sentence(config: dict) -> str:
    """What holds unrelated outputs in this run: the card names only the terms that were on."""
    terms = []
    if config.get("preservation_weight"):
        terms.append("output-preservation regulariser on pure noise")
    if config.get("retain_weight"):
        terms.append("retain term on base-model images of unrelated prompts")
    return " and ".join(terms) if terms else "no regulariser: λ = 0, so unrelated outputs may drift"


def objective_row(config: dict) -> str:
    conditions = ", ".join(config.get("preference_conditions") or ["empty"])
    row = f"{config.get('objective', 'paper')}: preference under {conditions}"
    retain = config.get("retain")
    if config.get("retain_weight") and retain:
        row += f"; retain λ_r {config['retain_weight']:g} on {retain['num_images']} images under {', '.join(retain['conditions'])}"
    return row


def base_model_licence(base_model: str, family: str) -> tuple:
    """``(licence id, sentence for the card)``: the base's own card licence when it is a local folder with one,
    else the family's (SD3: ``other``, with a link to the base's licence file)."""
    card_path = os.path.join(base_model, "README.md")
    if os.path.isfile(card_path):
        from huggingface_hub import ModelCard

        licence = ModelCard.load(card_path).data.license
        if licence:
            return licence, f"The base model's licence applies: `{licence}` (see its model card)."
    licence = FAMILY_LICENCES.get(family, "other")
    if licence == "other":
        link = base_model if os.path.isdir(base_model) else f"https://huggingface.co/{base_model}/blob/main/LICENSE.md"
        return licence, f"The base model's licence applies: see [its licence]({link})."
    return licence, f"The base model's licence applies: `{licence}`."


def quantized_base_row(config: dict) -> str:
    quantized = config.get("quantized_base")
    if not quantized:
        return "full precision"
    return f"quantized to {quantized['mode']} by bitsandbytes: the adapter was trained against the quantized base"


def timing_note(config: dict) -> str:
    """The measurement behind ``--t_max auto``, for the model card."""
    measured = config.get("t_max_measurement")
    return f" (t_max measured by duo_plugin.timing: {measured['verdict']})" if measured else ""


def write_model_card(
    output_dir: str,
    config: dict,
    pipeline_class: str,
    sample_images: List[tuple],
    repo_id: Optional[str] = None,
    saturation: Optional[dict] = None,
):
    """A model card with the recipe, how to load it, and samples from unrelated prompts only.

    ``sample_images`` is a list of (file name relative to output_dir, prompt); callers pass only
    images of unrelated prompts that no detector flagged.
    """
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH
    from huggingface_hub import ModelCard, ModelCardData

    name = repo_id or os.path.basename(os.path.abspath(output_dir))
    licence, licence_note = base_model_licence(config["base_model"], config["architecture"]["family"])
    widget = [{"text": prompt, "output": {"url": path}} for path, prompt in sample_images]
    gallery = "\n".join(f"![{prompt}]({path})" for path, prompt in sample_images)
    card_dtype = FAMILY_CARD_DTYPES.get(config["architecture"]["family"], "float16")
    description = f"""
# DUO unlearning: {config["concept"]} removed from {config["base_model"]}

A LoRA adapter trained with **Direct Unlearning Optimization** (DUO, Park et al., NeurIPS 2024) to remove the
concept **{config["concept"]}** from `{config["base_model"]}`, whatever the prompt, while keeping unrelated
outputs as they were ({regulariser_sentence(config)}).

## How to use

```python
import torch
from duo_plugin import DUOPipeline

pipe = DUOPipeline.from_pretrained("{name}", dtype=torch.{card_dtype}).to("cuda")
image = pipe("a photo of a lighthouse").images[0]
```

or with stock diffusers:

```python
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{config["base_model"]}", dtype=torch.{card_dtype}).to("cuda")
pipe.load_lora_weights("{name}", weight_name="{LORA_WEIGHT_NAME}")
```

## Training recipe

| setting | value |
|---|---|
| β (beta_dpo) | {config["beta_dpo"]} |
| preservation weight λ | {config["preservation_weight"]} |
| objective | {objective_row(config)} |
| learning rate | {config["learning_rate"]} |
| steps | {config["max_train_steps"]} |
| effective batch (pairs) | {config["train_batch_size"] * config["gradient_accumulation_steps"]} × processes |
| LoRA rank / alpha | {config["rank"]} / {config["lora_alpha"]} |
| LoRA target | {config["lora_target"]} |
| timesteps | [{config["t_min"]}, {config["t_max"]}){timing_note(config)} |
| base during training | {quantized_base_row(config)} |
| seed | {config["seed"]} |
| pair data | {config["dataset"] or "generated by duo_plugin.pairs"} |

The full configuration is in `{DUO_CONFIG_NAME}`.

## Saturation of the preference loss

{model_card_section(saturation)}

## Samples (unrelated prompts only)

{gallery or "No samples were generated."}

## Licence

{licence_note}

## Limitations

Unlearning lowers, but does not rule out, the chance of generating the concept. Evaluate the adapter on your own
prompts (`python -m duo_plugin.evaluate`) before relying on it.
"""
    # Always a fresh card from diffusers' training template: never fetch (and reuse) a card from the Hub.
    card = ModelCard.from_template(
        card_data=ModelCardData(
            license=licence,
            library_name="diffusers",
            base_model=config["base_model"],
            tags=MODEL_CARD_TAGS + [f"duo-{config['concept']}"],
            inference=True,
            widget=widget or None,
        ),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=description,
    )
    atomic_write_text(os.path.join(output_dir, "README.md"), str(card))


FINAL_ARTIFACT_PATTERNS = [LORA_WEIGHT_NAME, DUO_CONFIG_NAME, "README.md", "samples/*.png", "validation/*.png"]


def push_to_hub(
    output_dir: str,
    repo_id: Optional[str],
    token: Optional[str],
    private: bool,
    allow_patterns: Sequence[str] = tuple(FINAL_ARTIFACT_PATTERNS),
    repo_type: str = "model",
    commit_message: str = "DUO unlearning adapter",
) -> str:
    """Upload only ``allow_patterns`` of ``output_dir`` (never checkpoints). On failure everything stays local."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = repo_id or os.path.basename(os.path.abspath(output_dir))
    try:
        repo_id = create_repo(repo_id, repo_type=repo_type, exist_ok=True, token=token, private=private).repo_id
        upload_folder(
            repo_id=repo_id,
            repo_type=repo_type,
            folder_path=output_dir,
            allow_patterns=list(allow_patterns),
            commit_message=commit_message,
            token=token,
        )
    except Exception as error:
        retry = f"hf upload {'--repo-type dataset ' if repo_type == 'dataset' else ''}{repo_id} {output_dir} ."
        if repo_type == "model":
            retry += f" --include {' '.join(repr(p) for p in allow_patterns)}"
        raise NetworkError(
            f"push to the Hub failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            f"everything is kept in {output_dir}. Retry with: {retry}"
        ) from error
    return repo_id


def make_readable_like_other_outputs(path: str):
    """safetensors writes through a private temporary file (mode 0600): give the file the mode the
    process's umask gives every other output (0644 under the usual umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    if os.path.isfile(path):
        os.chmod(path, 0o666 & ~umask)


def finish_run(args, config: dict, pipeline_class: str, samples: List[tuple]):
    """Model card and optional Hub push, on the main process, after the adapter and config are written."""
    make_readable_like_other_outputs(os.path.join(args.output_dir, LORA_WEIGHT_NAME))
    training_end = summary_from_metrics(os.path.join(args.output_dir, args.logging_dir, "metrics.jsonl"))
    write_model_card(args.output_dir, config, pipeline_class, samples, args.hub_model_id, training_end)
    logger.info("Saved the DUO adapter to %s", args.output_dir)
    run_guard.release_output_lock(os.path.join(args.output_dir, run_guard.LOCK_NAME))
    if args.push_to_hub:
        repo_id = push_to_hub(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private)
        logger.info("Pushed to https://huggingface.co/%s", repo_id)
