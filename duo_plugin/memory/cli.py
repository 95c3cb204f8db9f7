"""python -m duo_plugin.memory: the estimates of a command line's run, as a table (and ``--json``)."""

import argparse
from dataclasses import asdict, replace

from ..errors import UsageError, exit_on_usage_error
from ..files import atomic_write_json
from ..settings import Settings, with_values
from .configs import TRAINING_SCRIPT, load_base_model_configs, vae_scale_factor
from .estimator import estimate_inference, estimate_training
from .recipes import (
    CUDA_CONTEXT_BYTES,
    EVALUATION_BATCH,
    FRAGMENTATION_MARGIN,
    PAIR_GENERATION_BATCH,
    GiB,
    MemoryEstimate,
)
from .sharding import SHARDING_MODES, sharding_name
from .startup_check import default_max_sequence_length, settings_from_args


def _format_row(label: str, estimate: MemoryEstimate) -> str:
    card = estimate.smallest_card_gb()
    parts = ", ".join(
        f"{name.replace('_', ' ')} {value / GiB:.2f}" for name, value in estimate.breakdown.items() if value
    )
    return f"{label:48s} {estimate.peak_bytes / GiB:7.2f} GiB   {(str(card) + ' GB') if card else '> 80 GB':>8s}   ({parts})"


def parse_args(argv=None):
    from .. import arguments

    parser = argparse.ArgumentParser(
        prog="python -m duo_plugin.memory",
        description="Estimated peak GPU memory of a DUO run (training step, validation, pair generation, evaluation) "
        "from the base model's config files only: no GPU, no weights. Takes the training scripts' flags.",
    )
    arguments.add_training_arguments(parser, default_model="CompVis/stable-diffusion-v1-4", default_resolution=None)
    parser.add_argument(
        "--max_sequence_length",
        type=int,
        default=None,
        help="SD3/FLUX: T5 tokens of the training prompts (the scripts' flag; default 256 for SD3, an upper bound of "
        "train_duo_sd3.py's 77; 512 for FLUX, train_duo_flux.py's default)",
    )
    parser.add_argument(
        "--num_processes",
        type=int,
        default=1,
        help="GPUs of the run (accelerate launch --num_processes): the training rows are then one GPU's peak",
    )
    parser.add_argument(
        "--sharding",
        default="none",
        choices=list(SHARDING_MODES),
        help="with several processes: none (DDP, every GPU holds everything), fsdp (weights, LoRA, gradients and "
        "optimizer state sharded; one block gathered at a time), zero2 (DeepSpeed ZeRO-2: optimizer state and "
        "gradients sharded)",
    )
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="a separate VAE (folder, config file or Hub id), e.g. the fp16-safe madebyollin/sdxl-vae-fp16-fix: "
        "SDXL's pipelines then keep it in fp16 instead of upcasting it to fp32",
    )
    parser.add_argument(
        "--generation_batch_size",
        type=int,
        default=PAIR_GENERATION_BATCH,
        help="pairs generated at once (python -m duo_plugin.pairs --batch_size)",
    )
    parser.add_argument(
        "--evaluation_batch_size",
        type=int,
        default=EVALUATION_BATCH,
        help="images per pipeline call (python -m duo_plugin.evaluate --batch_size)",
    )
    parser.add_argument("--json", default=None, help="also write the estimates to this JSON file")
    return parser.parse_args(argv)


def check_args(args):
    """The flags an estimate reads, refused before any config is read (as the training scripts refuse them)."""
    from .. import input_checks

    input_checks.check_finite_flags(args)
    input_checks.check_resolution(args.resolution)
    for name in (
        "train_batch_size",
        "gradient_accumulation_steps",
        "rank",
        "generation_batch_size",
        "evaluation_batch_size",
        "max_sequence_length",
        "num_processes",
    ):
        input_checks.at_least(args, name, 1)
    if args.json:
        input_checks.check_output_file(args.json, "--json")


def resolve_family_defaults(args, configs) -> Settings:
    """``args`` with the base model's family's defaults filled into the flags left unset: ``--max_sequence_length``
    (SD3/FLUX) and ``--resolution`` (1024 for SD3/FLUX, else the denoiser's sample size × 8). ``args`` is only
    read."""
    family = configs.family
    max_sequence_length, resolution = args.max_sequence_length, args.resolution
    if max_sequence_length is None:
        max_sequence_length = default_max_sequence_length(family)
    if resolution is None:
        resolution = 1024 if family in ("sd3", "flux") else 8 * configs.denoiser.get("sample_size", 64)
    return with_values(args, max_sequence_length=max_sequence_length, resolution=resolution)


@exit_on_usage_error
def main(argv=None):
    args = Settings(**vars(parse_args(argv)))
    check_args(args)
    configs = load_base_model_configs(
        args.pretrained_model_name_or_path, args.revision, args.cache_dir, args.pretrained_vae_model_name_or_path
    )
    family = configs.family
    args = resolve_family_defaults(args, configs)
    if args.resolution % 8:
        raise UsageError(f"--resolution {args.resolution} is not a multiple of 8: the VAE downsamples by 8")
    patch = 2 * vae_scale_factor(configs.vae)
    if family == "flux" and args.resolution % patch:
        raise UsageError(
            f"--resolution {args.resolution} is not a multiple of {patch}: FLUX packs 2x2 patches of the VAE's latents"
        )
    settings = settings_from_args(args, family)
    all_on = replace(
        settings,
        gradient_checkpointing=True,
        use_8bit_adam=settings.sharding != "zero2",  # refused under ZeRO-2 (input_checks.check_zero2_optimizer)
        mixed_precision=settings.mixed_precision if settings.mixed_precision != "no" else "bf16",
    )
    print(
        f"{args.pretrained_model_name_or_path} ({TRAINING_SCRIPT[family]}), {args.resolution} px, "
        f"{settings.train_batch_size} pair(s) per micro-step, mixed precision {settings.mixed_precision}, LoRA rank {settings.rank}"
        + (f", base quantized to {settings.quantize_base}" if settings.quantize_base != "none" else "")
    )
    if settings.num_processes > 1:
        print(
            f"training rows: one GPU of {settings.num_processes} ({sharding_name(settings.sharding)}); "
            f"pair generation and evaluation: one GPU, full precision"
        )
    elif settings.quantize_base != "none":
        print("pair generation and evaluation: full precision (only training quantizes the base)")
    print(
        f"estimated peak GPU memory (max_memory_allocated; a card fits when peak x {1 + FRAGMENTATION_MARGIN:.2f} + "
        f"{CUDA_CONTEXT_BYTES / GiB:.2f} GiB <= its memory)\n"
    )
    rows = []
    for label, row_settings in (
        ("training step, your flags", settings),
        ("training step, official recipe, your flags", replace(settings, recipe="official", validation=False)),
        ("training step, every memory option on", replace(all_on, validation=False)),
    ):
        results = estimate_training(configs, row_settings)
        if label == "training step, your flags" and "prompt encoding" in results:
            rows.append(("prompt encoding at start-up, your flags", results["prompt encoding"]))
        rows.append((label, results["training step"]))
        if label.endswith("your flags") and "validation" in results:
            rows.append(("validation during training, your flags", results["validation"]))
    rows.append(
        (
            f"pair generation ({args.generation_batch_size} pairs per call, fp16)",
            estimate_inference(configs, args.resolution, args.generation_batch_size, "fp16", encode=True),
        )
    )
    rows.append(
        (
            f"evaluation ({args.evaluation_batch_size} images per call, fp16)",
            estimate_inference(configs, args.resolution, args.evaluation_batch_size, "fp16", encode=False),
        )
    )
    print(f"{'':48s} {'peak':>11s}   {'card':>8s}")
    for label, estimate in rows:
        print(_format_row(label, estimate))
    if args.json:
        atomic_write_json(
            args.json, {"settings": asdict(settings), "estimates": [{"case": label, **asdict(e)} for label, e in rows]}
        )
    return rows
