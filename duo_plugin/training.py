"""Machinery shared by train_duo.py and train_duo_sd3.py: flags, refusals, checkpoints, outputs.

The scripts keep the model-family specific parts (loading, the forward pass, validation); everything
that is the same for a UNet and an SD3 transformer lives here once.
"""

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import re
import shutil
from typing import Dict, List, Optional, Sequence

import torch

from .errors import TrainingHalted, UsageError
from .presets import (
    PRESETS,
    ConceptPreset,
    custom_preset,
    get_preset,
    learning_rate_for_beta,
    preservation_weight_for_beta,
    with_overrides,
    UnknownConceptError,
)

logger = logging.getLogger(__name__)

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DUO_CONFIG_NAME = "duo_config.json"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MODEL_CARD_TAGS = ["diffusers", "lora", "duo", "concept-erasure", "text-to-image"]


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------


def add_training_arguments(parser: argparse.ArgumentParser, default_model: str, default_resolution: int):
    """The flags both scripts share, named as in diffusers' DreamBooth-LoRA and Diffusion-DPO examples."""
    from .timing import t_max_value  # here, not at the top: ``python -m duo_plugin.timing`` imports this module
    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=default_model)
    model.add_argument("--revision", type=str, default=None)
    model.add_argument("--variant", type=str, default=None, help="e.g. fp16 weights of the base model")
    model.add_argument("--cache_dir", type=str, default=None)

    duo = parser.add_argument_group("DUO")
    duo.add_argument("--concept", type=str, default="nudity", help=f"a preset ({', '.join(PRESETS)}) or a custom name with --unsafe_prompt")
    duo.add_argument("--unsafe_prompt", action="append", default=None, help="custom concept: a prompt showing it (repeatable, or @file)")
    duo.add_argument("--safe_prompt", action="append", default=None, help="custom concept: its safe counterpart (repeatable, or @file)")
    duo.add_argument("--beta_dpo", type=float, default=None, help="DPO β; preset default (500 nudity, 1000 violence)")
    duo.add_argument("--preservation_weight", type=float, default=None, help="λ of the output-preservation term; default 1e6·β/100")
    duo.add_argument("--t_min", type=int, default=None, help="lowest training timestep index")
    duo.add_argument("--t_max", type=t_max_value, default=None, help="timestep indices are drawn from [t_min, t_max); auto: measured first by python -m duo_plugin.timing")
    duo.add_argument("--lora_target", type=str, default=None, choices=["self_attn", "attn"], help="which attention layers get LoRA")
    duo.add_argument("--condition_on_prompts", action="store_true", help="condition on the pair's unsafe prompt instead of the empty prompt")

    data = parser.add_argument_group("pair data")
    data.add_argument("--dataset_name", type=str, default=None, help="Hub dataset id or local pair folder; without it pairs are generated")
    data.add_argument("--dataset_revision", type=str, default=None)
    data.add_argument("--pairs_dir", type=str, default=None, help="where generated pairs are cached (default: ~/.cache/duo/pairs/<model>/<concept>)")
    data.add_argument("--unsafe_image_column", type=str, default="unsafe")
    data.add_argument("--safe_image_column", type=str, default="safe")
    data.add_argument("--num_pairs", type=int, default=None, help="use at most this many pairs (preset default when generating)")
    data.add_argument("--resolution", type=int, default=default_resolution)
    data.add_argument("--center_crop", action="store_true")
    data.add_argument("--random_flip", action="store_true")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default=None, help="default: duo-<concept>")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--train_batch_size", type=int, default=1, help="pairs per device per micro-step")
    train.add_argument("--gradient_accumulation_steps", type=int, default=4, help="default 4: an effective batch of 4 pairs on one GPU, as the official 1 pair x 4 GPUs")
    train.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps; preset default")
    train.add_argument("--learning_rate", type=float, default=None, help="default scales with β (official recipe)")
    train.add_argument("--lr_scheduler", type=str, default="constant")
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=1e-2)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--rank", type=int, default=32, help="LoRA rank")
    train.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha; default equals the rank")
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--use_8bit_adam", action="store_true")
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    train.add_argument("--allow_tf32", action="store_true")

    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500)
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None)
    ckpt.add_argument("--resume_from_checkpoint", type=str, default=None, help='a checkpoint path or "latest"')

    val = parser.add_argument_group("validation and logging")
    val.add_argument("--validation_prompts", type=str, nargs="+", default=None, help="preset default: unsafe, synonym, unrelated")
    val.add_argument("--validation_steps", type=int, default=None, help="validate every N steps (default: only at the end)")
    val.add_argument("--num_validation_images", type=int, default=2)
    val.add_argument("--num_validation_inference_steps", type=int, default=30)
    val.add_argument("--skip_validation", action="store_true", help="no sample images (and none in the model card)")
    val.add_argument("--report_to", type=str, default="tensorboard")
    val.add_argument("--logging_dir", type=str, default="logs")

    hub = parser.add_argument_group("Hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", type=str, default=None)
    hub.add_argument("--hub_token", type=str, default=None)
    hub.add_argument("--hub_private", action="store_true")
    return parser


def read_prompt_list(values: Optional[List[str]]) -> Optional[List[str]]:
    """Expand ``@file`` entries (one prompt a line) of a repeatable prompt flag."""
    if not values:
        return values
    prompts = []
    for value in values:
        if value.startswith("@"):
            path = value[1:]
            if not os.path.isfile(path):
                raise UsageError(f"prompt file {path} does not exist")
            with open(path) as f:
                prompts += [line.strip() for line in f if line.strip()]
        else:
            prompts.append(value)
    return prompts


def check_environment_args(args, accelerator_device_type: Optional[str] = None):
    """Refusals that need nothing loaded: fail in a second, not after the models are on the GPU."""
    if args.resolution % 8 != 0:
        raise UsageError(f"--resolution {args.resolution} is not a multiple of 8: the VAE downsamples by 8; use e.g. {args.resolution // 8 * 8 or 8}")
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise UsageError("--report_to wandb with --hub_token would expose the token in the run's config: log in with `hf auth login` instead")
    if args.use_8bit_adam and importlib.util.find_spec("bitsandbytes") is None:
        raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    if args.enable_xformers_memory_efficient_attention and importlib.util.find_spec("xformers") is None:
        raise UsageError("--enable_xformers_memory_efficient_attention needs xformers: pip install xformers (PyTorch SDPA is used without it)")
    mixed_precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    device_type = accelerator_device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if mixed_precision == "fp16" and device_type == "cpu":
        raise UsageError("fp16 mixed precision needs a GPU: use --mixed_precision bf16 or no on CPU")
    if args.t_min is not None and isinstance(args.t_max, int) and not args.t_min < args.t_max:
        raise UsageError(f"--t_min {args.t_min} must be below --t_max {args.t_max}")
    if args.train_batch_size < 1 or args.gradient_accumulation_steps < 1:
        raise UsageError("--train_batch_size and --gradient_accumulation_steps must be at least 1")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        raise UsageError("--checkpoints_total_limit must be at least 1")
    if args.report_to not in ("tensorboard", "wandb", "comet_ml", "all", "none") :
        raise UsageError(f"--report_to {args.report_to}: choose tensorboard, wandb, comet_ml, all or none")
    if args.report_to in ("tensorboard", "all") and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("--report_to tensorboard needs tensorboard: pip install tensorboard, or pass --report_to none")


def cpu_only_multi_process() -> bool:
    """True when a multi-process launch found no accelerator.

    accelerate sets up MULTI_CPU only when asked to use the CPU; without that, each of N processes would
    train alone and all of them would write the outputs. Scripts pass this as ``Accelerator(cpu=...)``.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return launched and not (hasattr(torch, "accelerator") and torch.accelerator.is_available())


def check_distributed_setup(accelerator):
    """Refuse N independent single-process runs pretending to be one distributed run."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise UsageError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes}: "
            f"check `accelerate config` (use --cpu for CPU-only multi-process runs)"
        )


def resolve_concept(args, architecture: str, base_learning_rate: float) -> ConceptPreset:
    """Fill every preset-dependent flag the user left unset; returns the preset used."""
    args.unsafe_prompt = read_prompt_list(args.unsafe_prompt)
    args.safe_prompt = read_prompt_list(args.safe_prompt)
    try:
        if args.unsafe_prompt or args.safe_prompt:
            preset = custom_preset(
                args.concept if args.concept not in PRESETS else f"custom-{args.concept}",
                args.unsafe_prompt or [],
                args.safe_prompt or [],
            )
        else:
            preset = get_preset(args.concept)
    except (UnknownConceptError, ValueError) as error:
        raise UsageError(str(error)) from None
    if args.unsafe_prompt and args.concept in PRESETS:
        args.concept = preset.name
    args.beta_dpo = args.beta_dpo if args.beta_dpo is not None else preset.beta_dpo
    if args.beta_dpo <= 0:
        raise UsageError(f"--beta_dpo must be positive, got {args.beta_dpo}")
    if args.learning_rate is None:
        args.learning_rate = learning_rate_for_beta(args.beta_dpo, base_learning_rate)
    if args.preservation_weight is None:
        args.preservation_weight = preservation_weight_for_beta(args.beta_dpo)
    if args.max_train_steps is None:
        args.max_train_steps = preset.max_train_steps
    if args.validation_prompts is None:
        args.validation_prompts = list(preset.validation_prompts)
    if args.lora_alpha is None:
        args.lora_alpha = args.rank
    if args.output_dir is None:
        args.output_dir = f"duo-{args.concept}"
    return with_overrides(preset, beta_dpo=args.beta_dpo)


def detect_pipeline_class(pretrained_model_name_or_path: str, revision: Optional[str], cache_dir: Optional[str] = None) -> str:
    """The ``_class_name`` of a diffusers pipeline, read from its model_index.json only."""
    from diffusers import DiffusionPipeline

    try:
        config = DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir)
    except Exception as error:
        raise UsageError(
            f"cannot read the pipeline config of --pretrained_model_name_or_path {pretrained_model_name_or_path!r} "
            f"({type(error).__name__}): give a diffusers pipeline folder or a Hub id that is cached or reachable"
        ) from None
    return config["_class_name"]


def base_has_t5(pretrained_model_name_or_path: str, revision: Optional[str] = None, cache_dir: Optional[str] = None) -> bool:
    """False for a T5-less SD3 base, saved with ``text_encoder_3: [null, null]`` in model_index.json."""
    from diffusers import DiffusionPipeline

    config = DiffusionPipeline.load_config(pretrained_model_name_or_path, revision=revision, cache_dir=cache_dir)
    return (config.get("text_encoder_3") or [None])[0] is not None


def dtype_kwargs(dtype) -> dict:
    """``from_pretrained``'s dtype argument: diffusers 0.42 renamed ``torch_dtype`` to ``dtype``."""
    import diffusers
    from packaging import version

    name = "dtype" if version.parse(diffusers.__version__) >= version.parse("0.42.0") else "torch_dtype"
    return {name: dtype}


def require_family(pipeline_class: str, expected: str, script: str):
    """Refuse a base model of the wrong family, pointing at the script that handles it."""
    family = pipeline_family(pipeline_class)
    if family == expected:
        return
    if family == "sd3":
        raise UsageError(f"{pipeline_class} is a Stable Diffusion 3 model: use train_duo_sd3.py")
    if family == "sd":
        raise UsageError(f"{pipeline_class} is a Stable Diffusion 1.x/2.x model: use train_duo.py")
    if family == "sdxl":
        raise UsageError(f"{pipeline_class} (SDXL) is not supported yet: DUO here covers SD 1.x/2.x (train_duo.py) and SD3 (train_duo_sd3.py)")
    raise UsageError(f"{pipeline_class} is not supported: DUO here covers SD 1.x/2.x (train_duo.py) and SD3 (train_duo_sd3.py)")


def pipeline_family(pipeline_class: str) -> str:
    if pipeline_class.startswith("StableDiffusion3"):
        return "sd3"
    if pipeline_class.startswith("StableDiffusionXL"):
        return "sdxl"
    if pipeline_class in ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"):
        return "sd"
    return "other"


# --------------------------------------------------------------------------------------------------
# The adapter
# --------------------------------------------------------------------------------------------------


def lora_target_modules(model: torch.nn.Module, lora_target: str) -> List[str]:
    """Full module names of the attention projections that get LoRA.

    ``self_attn``: the UNet's self-attention (attn1) only, the official DUO choice; ``attn``: every
    attention projection (SD3's joint attention has no separate self-attention).
    """
    projections = ("to_q", "to_k", "to_v", "to_out.0")
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if not any(name.endswith("." + p) for p in projections):
            continue
        if lora_target == "self_attn" and ".attn1." not in name:
            continue
        names.append(name)
    if not names:
        raise UsageError(f"--lora_target {lora_target} matches no layer of this model: use --lora_target attn")
    return names


def target_module_patterns(target_modules: List[str]) -> List[str]:
    """The distinct layer kinds adapted, e.g. ``attn1.to_q``, for the config and the model card."""
    return sorted({re.sub(r"^.*?\b(attn\d*\.)", r"\1", name) for name in target_modules})


def prepare_denoiser_for_training(args, model) -> List[str]:
    """Memory options, then the DUO LoRA adapter with fp32 parameters; returns the adapted module names."""
    if args.enable_xformers_memory_efficient_attention:
        model.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    target_modules = lora_target_modules(model, args.lora_target)
    add_duo_adapter(model, args.rank, args.lora_alpha, target_modules)
    cast_lora_params_to_fp32(model)
    return target_modules


def add_duo_adapter(model, rank: int, alpha: int, target_modules: List[str]):
    from peft import LoraConfig

    model.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=target_modules)
    )


@contextlib.contextmanager
def adapters_disabled(model):
    """The reference model: the same network with its LoRA adapter switched off.

    Pass the *unwrapped* model: under DDP the reference forward must not go through the wrapper.
    peft turns requires_grad off while disabled; enable_adapters turns it back on.
    """
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()


def lora_state_dict(model) -> Dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' LoRA format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def load_lora_state_dict(model, lora_dir: str, prefix: str):
    """Restore adapter weights saved by ``save_lora_weights`` into a model that has the adapter."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    state = load_file(os.path.join(lora_dir, LORA_WEIGHT_NAME))
    state = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    state = convert_unet_state_dict_to_peft(state)
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"checkpoint adapter has keys this model lacks: {unexpected[:3]}")


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str) -> List[str]:
    """Complete checkpoints, oldest first. A save in progress (``*.tmp``) is never listed."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def checkpoint_step(path: str) -> int:
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if not match:
        raise UsageError(f"--resume_from_checkpoint {path}: not a checkpoint-<step> folder")
    return int(match.group(1))


def resolve_resume_path(resume_from_checkpoint: Optional[str], output_dir: str) -> Optional[str]:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting a new run", output_dir)
            return None
        return checkpoints[-1]
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path):
        raise UsageError(f"--resume_from_checkpoint {resume_from_checkpoint} does not exist: give a checkpoint folder or 'latest'")
    checkpoint_step(path)
    return path


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: Optional[int]) -> str:
    """Save accelerate state atomically (into ``*.tmp``, then rename), then drop the oldest beyond the limit.

    A crash during the save leaves only a ``.tmp`` folder, which ``latest`` ignores; older checkpoints are
    removed only after the new one is complete.
    """
    final = os.path.join(output_dir, f"checkpoint-{step}")
    staging = final + ".tmp"
    if accelerator.is_main_process and os.path.exists(staging):
        shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    accelerator.save_state(staging)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(staging, final)
        if total_limit is not None:
            for stale in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(stale)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def register_adapter_state_hooks(accelerator, model, save_lora_weights, lora_prefix: str):
    """Make ``save_state``/``load_state`` store only the adapter, not the frozen base weights.

    ``save_lora_weights(output_dir, state_dict)`` is the family's pipeline saver.
    """

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            save_lora_weights(output_dir, lora_state_dict(accelerator.unwrap_model(model)))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        while models:
            models.pop()
        load_lora_state_dict(accelerator.unwrap_model(model), input_dir, lora_prefix)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def cast_lora_params_to_fp32(model):
    """LoRA parameters train in fp32 even when the frozen base runs in fp16/bf16."""
    for param in model.parameters():
        if param.requires_grad:
            param.data = param.data.float()


def make_optimizer(args, params):
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def check_finite(accelerator, loss: torch.Tensor, step: int, last_checkpoint: Optional[str]):
    """Stop on a NaN/inf loss on any process, before it reaches the weights."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        raise TrainingHalted(
            f"loss became non-finite at step {step}; {kept}. Lower --learning_rate or --beta_dpo "
            f"(or use bf16 instead of fp16) and resume with --resume_from_checkpoint latest"
        )


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
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **values}) + "\n")

    def truncate_after(self, step: int):
        """On resume, forget the rows the resumed run will write again."""
        if not (self.enabled and os.path.exists(self.path)):
            return
        with open(self.path) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
        with open(self.path, "w") as f:
            f.writelines(rows)


# --------------------------------------------------------------------------------------------------
# Outputs: config, model card, Hub
# --------------------------------------------------------------------------------------------------


def library_versions() -> Dict[str, str]:
    import importlib.metadata as metadata

    versions = {}
    for package in ("torch", "diffusers", "transformers", "accelerate", "peft", "datasets"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return versions


def write_duo_config(output_dir: str, args, architecture: dict, target_modules: List[str], extra: Optional[dict] = None) -> dict:
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
        "resolution": args.resolution,
        "seed": args.seed,
        "dataset": args.dataset_name,
        "pairs_dir": getattr(args, "pairs_dir", None),
        "library_versions": library_versions(),
    }
    config.update(extra or {})
    with open(os.path.join(output_dir, DUO_CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    return config


def timing_note(config: dict) -> str:
    """The measurement behind ``--t_max auto``, for the model card."""
    measured = config.get("t_max_measurement")
    return f" (t_max measured by duo_plugin.timing: {measured['verdict']})" if measured else ""


def write_model_card(output_dir: str, config: dict, pipeline_class: str, sample_images: List[tuple], repo_id: Optional[str] = None):
    """A model card with the recipe, how to load it, and samples from unrelated prompts only.

    ``sample_images`` is a list of (file name relative to output_dir, prompt); callers pass only
    images of unrelated prompts that no detector flagged.
    """
    from diffusers.utils.hub_utils import MODEL_CARD_TEMPLATE_PATH
    from huggingface_hub import ModelCard, ModelCardData

    name = repo_id or os.path.basename(os.path.abspath(output_dir))
    widget = [{"text": prompt, "output": {"url": path}} for path, prompt in sample_images]
    gallery = "\n".join(f"![{prompt}]({path})" for path, prompt in sample_images)
    description = f"""
# DUO unlearning: {config['concept']} removed from {config['base_model']}

A LoRA adapter trained with **Direct Unlearning Optimization** (DUO, Park et al., NeurIPS 2024) to remove the
concept **{config['concept']}** from `{config['base_model']}`, whatever the prompt, while keeping unrelated
outputs as they were (output-preservation regulariser).

## How to use

```python
import torch
from duo_plugin import DUOPipeline

pipe = DUOPipeline.from_pretrained("{name}", torch_dtype=torch.float16).to("cuda")
image = pipe("a photo of a lighthouse").images[0]
```

or with stock diffusers:

```python
from diffusers import {pipeline_class}

pipe = {pipeline_class}.from_pretrained("{config['base_model']}", torch_dtype=torch.float16).to("cuda")
pipe.load_lora_weights("{name}", weight_name="{LORA_WEIGHT_NAME}")
```

## Training recipe

| setting | value |
|---|---|
| β (beta_dpo) | {config['beta_dpo']} |
| preservation weight λ | {config['preservation_weight']} |
| learning rate | {config['learning_rate']} |
| steps | {config['max_train_steps']} |
| effective batch (pairs) | {config['train_batch_size'] * config['gradient_accumulation_steps']} × processes |
| LoRA rank / alpha | {config['rank']} / {config['lora_alpha']} |
| LoRA target | {config['lora_target']} |
| timesteps | [{config['t_min']}, {config['t_max']}){timing_note(config)} |
| seed | {config['seed']} |
| pair data | {config['dataset'] or 'generated by duo_plugin.pairs'} |

The full configuration is in `{DUO_CONFIG_NAME}`.

## Samples (unrelated prompts only)

{gallery or 'No samples were generated.'}

## Limitations

Unlearning lowers, but does not rule out, the chance of generating the concept. Evaluate the adapter on your own
prompts (`python -m duo_plugin.evaluate`) before relying on it.
"""
    # Always a fresh card from diffusers' training template: never fetch (and reuse) a card from the Hub.
    card = ModelCard.from_template(
        card_data=ModelCardData(
            license="creativeml-openrail-m",
            library_name="diffusers",
            base_model=config["base_model"],
            tags=MODEL_CARD_TAGS + [f"duo-{config['concept']}"],
            inference=True,
            widget=widget or None,
        ),
        template_path=MODEL_CARD_TEMPLATE_PATH,
        model_description=description,
    )
    card.save(os.path.join(output_dir, "README.md"))


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
        raise UsageError(
            f"push to the Hub failed ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            f"everything is kept in {output_dir}. Retry with: {retry}"
        ) from None
    return repo_id


def image_grid(rows: list):
    """Paste a list of image rows into one image."""
    from PIL import Image

    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image, (c * width, r * height))
    return grid


def validation_grid(args, accelerator, model, generate, step):
    """Base vs unlearned on the validation prompts, same seeds; saved and sent to the trackers.

    The live model is used as it is (never cast): the adapter is switched off for the base images.
    ``generate(prompt, seeds) -> images`` hides the family's pipeline.
    """
    logger.info("Running validation at step %d", step)
    seeds = [args.seed + i for i in range(args.num_validation_images)]
    rows = []
    for prompt in args.validation_prompts:
        with adapters_disabled(model):
            base = generate(prompt, seeds)
        rows.append(base + generate(prompt, seeds))
    grid = image_grid(rows)
    os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
    grid.save(os.path.join(args.output_dir, "validation", f"step-{step:06d}.png"))
    log_images_to_trackers(accelerator, "validation (left: base, right: unlearned)", grid, step)


def save_model_card_samples(args, preset, generate):
    """Samples for the public model card: unrelated prompts only, and nothing a detector flags."""
    from .detectors import get_detector

    detector = get_detector(preset.detector) if preset.detector else None
    samples = []
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    seeds = [args.seed + i for i in range(args.num_validation_images)]
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


def log_images_to_trackers(accelerator, tag: str, grid, step: int):
    import numpy as np

    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images(tag, np.asarray(grid)[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({tag: wandb.Image(grid)}, step=step)


def setup_logging(accelerator):
    import datasets
    import diffusers
    import transformers

    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO)
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()




# --------------------------------------------------------------------------------------------------
# The run: accelerator, optimization, the step loop (the same for every model family)
# --------------------------------------------------------------------------------------------------


def create_accelerator(args):
    """The Accelerator of a DUO run, after the checks that need to know the device and the process count."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        cpu=cpu_only_multi_process(),
    )
    check_distributed_setup(accelerator)
    check_environment_args(args, accelerator.device.type)
    setup_logging(accelerator)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def weight_dtype_for(accelerator) -> torch.dtype:
    """The dtype of the frozen weights: the mixed-precision dtype; the LoRA weights stay fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def prepare_optimization(args, accelerator, model, save_lora_weights, lora_prefix: str):
    """Optimizer, LR schedule, ``accelerator.prepare``, adapter-only checkpoints, and resuming.

    ``save_lora_weights(output_dir, state_dict, model)`` is the family's LoRA saver. Returns
    ``(model, optimizer, lr_scheduler, lora_params, resume_path, first_step)``.
    """
    from diffusers.optimization import get_scheduler

    lora_params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(args, lora_params)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        # A prepared scheduler steps once per process per optimizer step.
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    register_adapter_state_hooks(accelerator, model, lambda out, state: save_lora_weights(out, state, unwrapped), lora_prefix)

    first_step = 0
    resume_path = resolve_resume_path(args.resume_from_checkpoint, args.output_dir)
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        accelerator.load_state(resume_path)
        first_step = checkpoint_step(resume_path)
    return model, optimizer, lr_scheduler, lora_params, resume_path, first_step


def train_duo_steps(
    args,
    accelerator,
    model,
    optimizer,
    lr_scheduler,
    lora_params,
    num_pairs: int,
    first_step: int,
    resume_path: Optional[str],
    compute_losses,
    validate,
    project_name: str,
):
    """The optimization loop shared by both scripts.

    ``compute_losses(pair_indices, generator)`` returns the step's ``DUOLosses`` (it builds the family's batch
    from the pairs and runs the reference and adapted forwards); ``validate(step)`` runs on the main process.
    Every random draw of a micro-step comes from ``data.step_generator``, so resuming is exact.
    """
    from tqdm.auto import tqdm

    from . import data

    if accelerator.is_main_process:
        tracker_config = {k: (str(v) if isinstance(v, (list, tuple)) or v is None else v) for k, v in vars(args).items()}
        accelerator.init_trackers(project_name, config=tracker_config)
    metrics = MetricsLog(
        os.path.join(args.output_dir, args.logging_dir, "metrics.jsonl"), accelerator.is_main_process, append=resume_path is not None
    )
    metrics.truncate_after(first_step)

    pairs_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    if accelerator.is_main_process:
        logger.info("***** Running DUO training *****")
        logger.info("  Concept = %s, pairs = %d, β = %g, λ = %g, lr = %g", args.concept, num_pairs, args.beta_dpo, args.preservation_weight, args.learning_rate)
        logger.info("  Pairs per optimizer step = %d, steps = %d (from %d)", pairs_per_step, args.max_train_steps, first_step)

    last_checkpoint = resume_path
    progress_bar = tqdm(range(args.max_train_steps), initial=first_step, desc="Steps", disable=not accelerator.is_local_main_process)
    for step in range(first_step, args.max_train_steps):
        step_logs = []
        for micro_step in range(args.gradient_accumulation_steps):
            generator = data.step_generator(args.seed, step, micro_step, accelerator.process_index)
            pair_indices = data.pair_indices_for_step(
                num_pairs, step, micro_step, args.gradient_accumulation_steps, args.train_batch_size,
                accelerator.process_index, accelerator.num_processes, args.seed,
            )
            with accelerator.accumulate(model):
                losses = compute_losses(pair_indices, generator)
                check_finite(accelerator, losses.loss, step + 1, last_checkpoint)
                accelerator.backward(losses.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_logs.append(losses.to_log())

        global_step = step + 1
        progress_bar.update(1)
        logs = {key: sum(row[key] for row in step_logs) / len(step_logs) for key in step_logs[0]}
        logs["lr"] = lr_scheduler.get_last_lr()[0]
        progress_bar.set_postfix(loss=f"{logs['loss']:.4g}", acc=f"{logs['implicit_acc']:.2f}")
        accelerator.log(logs, step=global_step)
        metrics.write(global_step, logs)

        if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
            last_checkpoint = save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
        if args.validation_steps and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
            if accelerator.is_main_process and not args.skip_validation:
                validate(global_step)
            accelerator.wait_for_everyone()
    progress_bar.close()
    accelerator.wait_for_everyone()


def finish_run(args, accelerator, config: dict, pipeline_class: str, samples: List[tuple]):
    """Model card and optional Hub push, on the main process, after the adapter and config are written."""
    write_model_card(args.output_dir, config, pipeline_class, samples, args.hub_model_id)
    logger.info("Saved the DUO adapter to %s", args.output_dir)
    if args.push_to_hub:
        repo_id = push_to_hub(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private)
        logger.info("Pushed to https://huggingface.co/%s", repo_id)
