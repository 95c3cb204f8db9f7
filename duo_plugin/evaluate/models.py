"""The evaluated models: the flags that name them, loading each one, and the base model's family with the
generation defaults it brings."""

import logging
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch

from .. import attacks
from ..errors import UsageError
from ..hub import model_source_error
from ..input_checks import read_tensor_file
from ..pipeline import fetch_adapter, load_adapters
from ..settings import Settings, with_values


logger = logging.getLogger("duo_plugin.evaluate")


BASE = "base"
DEFAULT_NUM_INFERENCE_STEPS = 50
DEFAULT_GUIDANCE_SCALE = 7.5


@dataclass
class ModelSpec:
    name: str
    kind: str  # base | adapter | pipeline | unet
    source: str
    duo_config: Optional[dict] = None

    def describe(self) -> dict:
        return {"kind": self.kind, "source": self.source}


NAME_PATTERN = re.compile(r"^[A-Za-z0-9][\w.-]*$")


def split_named_value(value: str):
    """``NAME=PATH`` → (NAME, PATH); ``PATH`` (also one that exists and holds "=") → (None, PATH)."""
    if "=" in value and not os.path.exists(value):
        name, path = value.split("=", 1)
        return name, path
    return None, value


def parse_model_flag(value: str, kind: str) -> ModelSpec:
    """``NAME=PATH`` or ``PATH`` (named after the folder)."""
    name, source = split_named_value(value)
    if name is not None and not NAME_PATTERN.match(name):
        raise UsageError(f"--{kind} {value}: a model name has letters, digits, '.', '_' or '-' only")
    if not source:
        raise UsageError(f"--{kind} {value}: no path")
    if name is None:
        name = re.sub(r"[^\w.-]", "_", os.path.basename(os.path.normpath(source)))
    return ModelSpec(name=name, kind=kind, source=source)


def resolve_models(args) -> List[ModelSpec]:
    """Base first, then every evaluated model; refuses duplicate names and an unknown base. Without
    ``--base_model``, the base is the adapters' common base model: the base spec's ``source`` is the base model
    the run uses (``args`` is only read)."""
    specs = [parse_model_flag(v, "adapter") for v in args.adapter]
    specs += [parse_model_flag(v, "pipeline") for v in args.pipeline]
    specs += [parse_model_flag(v, "unet") for v in args.unet]
    for spec in specs:
        if spec.kind == "adapter":
            spec.duo_config = fetch_adapter(spec.source).config
    base_models = {s.duo_config.get("base_model") for s in specs if s.kind == "adapter"} - {None}
    base_model = args.base_model
    if base_model is None:
        if len(base_models) > 1:
            raise UsageError(
                f"the adapters have different base models ({', '.join(sorted(base_models))}): pass --base_model"
            )
        if not base_models:
            raise UsageError("no base model: pass --base_model (a diffusers pipeline folder or Hub id)")
        base_model = base_models.pop()
    else:
        for spec in specs:
            if spec.kind == "adapter" and spec.duo_config.get("base_model") not in (None, args.base_model):
                logger.warning(
                    "adapter %s was trained on %s; evaluating it on --base_model %s",
                    spec.name,
                    spec.duo_config["base_model"],
                    args.base_model,
                )
    all_specs = [ModelSpec(BASE, "base", base_model)] + specs
    names = [s.name for s in all_specs]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(
            f"model name(s) {', '.join(duplicates)} used twice ('base' is the base model): name them with NAME=PATH"
        )
    return all_specs


def load_pipeline(source: str, dtype, revision=None, variant=None):
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(source, revision=revision)
    except Exception as error:  # noqa: BLE001 - one line naming the cause and the fix
        raise model_source_error(error, source, revision, "the pipeline") from error
    # The evaluation measures the model, not a safety checker that blacks images out.
    extra = {"safety_checker": None, "requires_safety_checker": False} if "safety_checker" in config else {}
    if dtype != torch.float32:
        extra["dtype"] = dtype
    try:
        return DiffusionPipeline.from_pretrained(source, revision=revision, variant=variant, **extra)
    except (OSError, ValueError) as error:
        raise UsageError(
            f"cannot load the pipeline {source!r} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
        ) from error


def attach_adapter(pipe, spec: ModelSpec):
    """The DUO adapter on the base pipeline, checked against the base's architecture first."""
    load_adapters(pipe, {re.sub(r"\W", "_", spec.name): spec.source})


def swap_denoiser(pipe, source: str, dtype):
    """Replace the base pipeline's UNet (or transformer) by another method's fine-tuned one."""
    name = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    current = getattr(pipe, name)
    if os.path.isfile(source):
        state_dict = read_tensor_file(source, f"--{name}")
        if not isinstance(state_dict, dict):
            raise UsageError(f"--{name} {source} holds a single tensor: give the {name}'s state dict")
        state_dict = state_dict.get("state_dict", state_dict)
        try:
            current.load_state_dict(state_dict, strict=True)
        except RuntimeError as error:
            raise UsageError(
                f"--unet {source} does not fit the base model's {name} ({str(error).splitlines()[0]}): give a state dict of the same architecture"
            ) from error
        return
    if os.path.isdir(source):
        subfolders = [name] if os.path.isdir(os.path.join(source, name)) else [None]
    else:
        subfolders = [None, name]  # a Hub repo of the model itself, or of a whole pipeline
    kwargs = {} if dtype == torch.float32 else {"dtype": dtype}
    for subfolder in subfolders:
        try:
            replacement = type(current).from_pretrained(source, subfolder=subfolder, **kwargs)
            break
        except (OSError, ValueError) as error:
            failure = error
    else:
        raise UsageError(
            f"cannot load --unet {source!r} ({type(failure).__name__}): give a {type(current).__name__} folder, Hub id or state-dict file"
        ) from failure
    pipe.register_modules(**{name: replacement})


def load_model(spec: ModelSpec, args, dtype, device):
    if spec.kind == "pipeline":
        pipe = load_pipeline(spec.source, dtype)
    else:
        pipe = load_pipeline(args.base_model, dtype, args.revision, args.variant)
        if spec.kind == "adapter":
            attach_adapter(pipe, spec)
        elif spec.kind == "unet":
            swap_denoiser(pipe, spec.source, dtype)
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def resolve_family(args) -> Settings:
    """``args`` with the base model's family (read from its model_index.json) as ``family`` and the family's
    generation defaults filled into the flags left unset: FLUX.1 is sampled as it is used (see the package
    docstring), every other family with classifier-free guidance 7.5 over 50 steps. ``args`` is only read."""
    from ..families import detect_pipeline_class, pipeline_family

    try:
        family = pipeline_family(detect_pipeline_class(args.base_model, args.revision))
    except UsageError:
        family = "other"  # not a diffusers pipeline folder: loading it says what is wrong
    steps, guidance = DEFAULT_NUM_INFERENCE_STEPS, DEFAULT_GUIDANCE_SCALE
    if family == "flux":
        from ..pairs import inspect_base_model

        info = inspect_base_model(args.base_model, args.revision)
        steps, guidance = info.default_num_inference_steps, info.default_guidance_scale
        if args.resolution is not None and args.resolution % info.resolution_multiple:
            raise UsageError(
                f"--resolution {args.resolution} is not a multiple of {info.resolution_multiple} for this FLUX.1 "
                f"model: its pipeline would resize the images"
            )
    return with_values(
        args,
        family=family,
        num_inference_steps=steps if args.num_inference_steps is None else args.num_inference_steps,
        guidance_scale=guidance if args.guidance_scale is None else args.guidance_scale,
    )


def skip_inapplicable_attacks(args, family: str) -> Tuple[Settings, Dict[str, str]]:
    """``(settings, skipped)``: ``args`` with the attacks that do not apply to the base model's family dropped
    from ``attack``, and {attack: the one-line reason} for the report. Refuses a run left without any attack.
    ``args`` is only read."""
    from ..families import FAMILY_NAMES

    skipped = {}
    for attack in args.attack:
        reason = attacks.not_applicable_reason(attack, family)
        if reason is not None:
            skipped[attack] = reason
            logger.warning("--attack %s is skipped for this %s model: %s", attack, FAMILY_NAMES[family], reason)
    if skipped and len(skipped) == len(args.attack):
        first = next(iter(skipped))
        raise UsageError(
            f"--attack {' '.join(args.attack)}: none applies to a {FAMILY_NAMES[family]} model ({first}: "
            f"{skipped[first]}); add --attack prompts"
        )
    return with_values(args, attack=[attack for attack in args.attack if attack not in skipped]), skipped
