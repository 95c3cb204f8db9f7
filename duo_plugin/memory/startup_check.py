"""The training scripts' start-up checks: a full-size base refused without a GPU before any download
(``check_cpu_run``), and the run's estimated peak against the GPU's free memory (``check_training_memory``). Both read
the training command line; ``settings_from_args`` turns it (and the launcher's environment) into the estimate's
``TrainingMemorySettings``, for ``python -m duo_plugin.memory`` too."""

import argparse
import os
import sys
from dataclasses import replace
from typing import List, Optional

import torch

from ..errors import UsageError
from .configs import DEFAULT_LORA_TARGET, SD3_TRAINING_T5_TOKENS, BaseModelConfigs, load_base_model_configs
from .estimator import estimate_training
from .recipes import (
    CUDA_CONTEXT_BYTES,
    FRAGMENTATION_MARGIN,
    GiB,
    MemoryEstimate,
    TrainingMemorySettings,
    card_requirement_bytes,
)
from .sharding import sharding_name


def add_memory_check_arguments(parser: argparse.ArgumentParser):
    parser.add_argument(
        "--skip_memory_check",
        action="store_true",
        help="do not estimate the run's peak GPU memory at start-up (duo_plugin.memory) against the GPU's free memory",
    )
    parser.add_argument(
        "--allow_cpu",
        action="store_true",
        help="train a full-size base model without a CUDA GPU (days, not hours); without it such a run is refused "
        "before any download",
    )


# A base whose denoiser weights are this large is a real model, not a test or toy pipeline.
FULL_SIZE_DENOISER_BYTES = 200 * 2**20


def check_cpu_run(args):
    """Without CUDA, refuse a full-size base (a Hub id, or a local folder whose denoiser weighs over 200 MiB) before
    anything is downloaded, unless ``--allow_cpu``: the run would fetch gigabytes and then train for days."""
    if torch.cuda.is_available() or getattr(args, "allow_cpu", False):
        return
    path = args.pretrained_model_name_or_path
    if not os.path.isdir(path) and (os.path.isabs(path) or path.startswith(".") or path.count("/") != 1):
        return  # not a folder and not a Hub id: loading the model refuses it with its own line
    folder = (
        path
        if os.path.isdir(path)
        else cached_snapshot(path, getattr(args, "revision", None), getattr(args, "cache_dir", None))
    )
    if folder is not None:
        weights = [
            os.path.join(root, name)
            for sub in ("unet", "transformer")
            for root, _, names in os.walk(os.path.join(folder, sub))
            for name in names
            if name.endswith((".safetensors", ".bin"))
        ]
        # A cached snapshot's files are links to the cache's blobs: getsize follows them.
        if sum(os.path.getsize(w) for w in weights) < FULL_SIZE_DENOISER_BYTES:
            return
    raise UsageError(
        f"no CUDA GPU: training {path} on a CPU would take days{'' if folder else ' (after a download of several GB)'}; "
        f"try the CPU toy demo (python -m duo_plugin.quickstart), run on a GPU machine, or pass --allow_cpu if you mean it"
    )


def cached_snapshot(repo_id: str, revision: Optional[str], cache_dir: Optional[str]) -> Optional[str]:
    """The folder of a Hub model already in the local cache (nothing is downloaded), or None."""
    from huggingface_hub import try_to_load_from_cache

    try:
        index = try_to_load_from_cache(repo_id, "model_index.json", cache_dir=cache_dir, revision=revision)
    except Exception:  # noqa: BLE001 - not a valid repo id: not cached
        return None
    return os.path.dirname(index) if isinstance(index, str) else None


def settings_from_args(args, family: str, **overrides) -> TrainingMemorySettings:
    """The memory-relevant flags of a training command line (train_duo.py / train_duo_sd3.py / train_duo_flux.py)."""
    mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    settings = TrainingMemorySettings(
        resolution=args.resolution,
        train_batch_size=args.train_batch_size,
        mixed_precision=mixed_precision,
        rank=args.rank,
        lora_target=args.lora_target or DEFAULT_LORA_TARGET[family],
        gradient_checkpointing=args.gradient_checkpointing,
        use_8bit_adam=args.use_8bit_adam,
        max_sequence_length=getattr(args, "max_sequence_length", None) or default_max_sequence_length(family),
        num_validation_images=args.num_validation_images,
        validation=not args.skip_validation,
        quantize_base=getattr(args, "quantize_base", None) or "none",
        num_processes=process_count(args),
        sharding=sharding_of(args),
    )
    return replace(settings, **overrides)


def default_max_sequence_length(family: str) -> int:
    """T5 tokens of the training prompts when the command line gives none: train_duo_flux.py's default for FLUX
    (``duo_plugin.families.flux.DEFAULT_MAX_SEQUENCE_LENGTH``, 512); for SD3 the pipeline's 256, an upper bound of
    train_duo_sd3.py's 77."""
    if family == "flux":
        from ..families.flux import DEFAULT_MAX_SEQUENCE_LENGTH

        return DEFAULT_MAX_SEQUENCE_LENGTH
    return SD3_TRAINING_T5_TOKENS


def process_count(args) -> int:
    """The run's processes (GPUs): ``args.num_processes`` (the estimate's flag), else what the launcher exported to
    each process before any Accelerator exists (``WORLD_SIZE``: accelerate launch, torchrun)."""
    given = getattr(args, "num_processes", None)
    if given:
        return int(given)
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def sharding_of(args) -> str:
    """How the run shards across its processes: ``args.sharding`` (the estimate's flag) or ``args.distributed_type``
    if a script has one, else accelerate launch's environment (``ACCELERATE_USE_FSDP``; ``ACCELERATE_USE_DEEPSPEED``
    with ``ACCELERATE_DEEPSPEED_ZERO_STAGE``: 2 is ZeRO-2, 3 is estimated as FSDP, lower as unsharded); "none"
    (DDP) otherwise."""
    given = getattr(args, "sharding", None)
    if given:
        return given
    distributed_type = str(getattr(args, "distributed_type", "") or "").upper().rsplit(".", 1)[-1]
    if distributed_type == "FSDP" or os.environ.get("ACCELERATE_USE_FSDP", "").lower() in ("true", "1"):
        return "fsdp"
    if distributed_type == "DEEPSPEED" or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("true", "1"):
        stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
        return {"2": "zero2", "3": "fsdp"}.get(stage.strip(), "none")
    return "none"


def _bitsandbytes_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


# The flags that lower a run's memory, as (flag text, settings change), tried from the smallest change.
_MEMORY_FLAGS = (
    ("--gradient_checkpointing", lambda s: s.gradient_checkpointing, {"gradient_checkpointing": True}),
    ("--use_8bit_adam", lambda s: s.use_8bit_adam, {"use_8bit_adam": True}),
    ("--mixed_precision bf16", lambda s: s.mixed_precision != "no", {"mixed_precision": "bf16"}),
    ("--skip_validation", lambda s: not s.validation, {"validation": False}),
    # last: the adapter is then trained against the quantized base
    (
        "--quantize_base nf4",
        lambda s: s.quantize_base != "none" or not _bitsandbytes_available(),
        {"quantize_base": "nf4"},
    ),
)


def flags_that_fit(
    configs: BaseModelConfigs, settings: TrainingMemorySettings, available_bytes: int
) -> Optional[List[str]]:
    """The fewest memory flags (in ``_MEMORY_FLAGS`` order) whose run fits ``available_bytes``; None if none do."""
    import itertools

    untried = [(flag, change) for flag, is_set, change in _MEMORY_FLAGS if not is_set(settings)]
    for count in range(1, len(untried) + 1):
        for combination in itertools.combinations(untried, count):
            changed = settings
            for _, change in combination:
                changed = replace(changed, **change)
            if (
                card_requirement_bytes(estimate_training(configs, changed)["run"].peak_bytes) - CUDA_CONTEXT_BYTES
                <= available_bytes
            ):
                return [flag for flag, _ in combination]
    return None


def check_training_memory(args, family: str) -> Optional[MemoryEstimate]:
    """Stop before any weight is downloaded when the run's estimated peak exceeds the GPU's free memory.

    Called by the training scripts at start-up; does nothing without CUDA or with ``--skip_memory_check``.
    Reads only the base model's config files. The estimate follows ``--quantize_base`` and is one GPU's: the
    process count and sharding come from the launch's environment (``process_count``, ``sharding_of``). An estimate that fails (an unusual config) is reported and
    skipped: the check must never stop a run it cannot judge.
    """
    if getattr(args, "skip_memory_check", False) or not torch.cuda.is_available():
        return None
    device = int(os.environ.get("LOCAL_RANK", "0"))
    free_bytes, total_bytes = torch.cuda.mem_get_info(device)
    try:
        configs = load_base_model_configs(
            args.pretrained_model_name_or_path,
            args.revision,
            args.cache_dir,
            vae_path=getattr(args, "pretrained_vae_model_name_or_path", None),
        )
        settings = settings_from_args(args, family)
        estimate = estimate_training(configs, settings)["run"]
    except UsageError:
        raise
    except Exception as error:  # the check is advice; training decides
        print(
            f"memory check skipped: the estimate failed ({type(error).__name__}: {error}); pass --skip_memory_check to silence this",
            file=sys.stderr,
        )
        return None
    needed = int(estimate.peak_bytes * (1 + FRAGMENTATION_MARGIN))
    if needed <= free_bytes:
        return estimate
    fix = flags_that_fit(configs, settings, free_bytes)
    advice = f"add {' '.join(fix)}" if fix else "lower --resolution or --train_batch_size, or use a larger GPU"
    per_process = (
        f", per GPU of {settings.num_processes} ({sharding_name(settings.sharding)})"
        if settings.num_processes > 1
        else ""
    )
    raise UsageError(
        f"estimated peak GPU memory {estimate.peak_bytes / GiB:.1f} GiB ({estimate.phase}{per_process}; +{FRAGMENTATION_MARGIN:.0%} allocator margin) "
        f"exceeds the {free_bytes / GiB:.1f} GiB free on GPU {device}: {advice} (or --skip_memory_check to try anyway)"
    )
