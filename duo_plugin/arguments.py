"""The flags both training scripts share (named as diffusers' DreamBooth-LoRA and Diffusion-DPO examples
name them), the refusals that need nothing loaded, and the defaults a concept preset fills in."""

import argparse
import math
import os
from typing import Optional, Tuple

import torch
from diffusers.utils import is_bitsandbytes_available, is_tensorboard_available, is_xformers_available

from . import objective
from .concepts import add_concept_arguments, resolve_concept_preset
from .errors import UsageError
from .families.quantization import add_quantization_argument
from .presets import (
    DEFAULT_GRADIENT_ACCUMULATION_STEPS,
    DEFAULT_LORA_RANK,
    DEFAULT_NUM_RETAIN_IMAGES,
    FAMILY_RECIPES,
    ConceptPreset,
    learning_rate_for_beta,
    preservation_weight_for_beta,
    with_overrides,
)
from .settings import Settings, with_values


# --objective: named settings; each flag the user gives still wins. ``paper`` takes β and λ from the concept
# preset (the official recipe); ``concept`` is the variant measured on the toy world (docs/objectives.md):
# the preference under the empty prompt, the unsafe prompt and the guided prediction, held by a retain set
# instead of the pure-noise term (whose λ 5e6 holds a model still, issue 14).
OBJECTIVES = {
    "paper": {"preference_conditions": ["empty"], "retain_weight": 0.0},
    "concept": {
        "preference_conditions": ["empty", "prompt", "guided"],
        "retain_weight": 20.0,
        "beta_dpo": 100.0,
        "preservation_weight": 0.0,
    },
}


def t_max_value(value: str):
    """``--t_max``: an integer timestep, or ``auto`` (measured by ``duo_plugin.timing`` before training)."""
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: give an integer timestep or auto") from None


def add_training_arguments(parser: argparse.ArgumentParser, default_model: str, default_resolution: int):
    """The flags both scripts share, named as in diffusers' DreamBooth-LoRA and Diffusion-DPO examples."""

    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=default_model)
    model.add_argument("--revision", type=str, default=None)
    model.add_argument("--variant", type=str, default=None, help="e.g. fp16 weights of the base model")
    model.add_argument("--cache_dir", type=str, default=None)

    duo = parser.add_argument_group("DUO")
    add_concept_arguments(duo)
    duo.add_argument("--beta_dpo", type=float, default=None, help="DPO β; preset default (500 nudity, 1000 violence)")
    duo.add_argument(
        "--preservation_weight", type=float, default=None, help="λ of the output-preservation term; default 1e6·β/100"
    )
    duo.add_argument("--t_min", type=int, default=None, help="lowest training timestep index")
    duo.add_argument(
        "--t_max",
        type=t_max_value,
        default=None,
        help="timestep indices are drawn from [t_min, t_max); auto: measured first by python -m duo_plugin.timing",
    )
    duo.add_argument(
        "--lora_layers",
        "--lora_target",
        dest="lora_target",
        type=str,
        default=None,
        choices=["self_attn", "attn"],
        help="which attention layers get LoRA: self_attn (the UNet's attn1, SD1 default) or attn (every attention projection)",
    )
    duo.add_argument(
        "--condition_on_prompts",
        action="store_true",
        help="condition on the pair's unsafe prompt instead of the empty prompt (= --preference_conditions prompt)",
    )

    variant = parser.add_argument_group(
        "concept-specific objective (issue 24; defaults: the paper's objective)",
        "L = mean over the preference conditions of L_DUO + λ·L_pres + λ_r·L_retain. "
        "--objective concept sets the toy world's measured variant: --preference_conditions empty prompt guided "
        "--retain_weight 20 --beta_dpo 100 --preservation_weight 0 (docs/objectives.md).",
    )
    variant.add_argument(
        "--objective",
        type=str,
        default="paper",
        choices=list(OBJECTIVES),
        help="paper: the empty-prompt preference and pure-noise preservation; concept: the preference under the "
        "empty prompt, the unsafe prompt and the guided prediction, held by a retain set (each flag below still wins)",
    )
    variant.add_argument(
        "--preference_conditions",
        type=str,
        nargs="+",
        default=None,
        choices=list(objective.PREFERENCE_CONDITIONS),
        help="conditions the preference is computed under, averaged: empty (the paper), prompt (the pair's unsafe "
        "prompt), guided (ε_u + w(ε_c − ε_u) with w the pair recipe's --guidance_scale)",
    )
    variant.add_argument(
        "--retain_weight",
        type=float,
        default=None,
        help="λ_r of the retain term on base-model images of unrelated prompts (0: off; concept default 20)",
    )
    variant.add_argument(
        "--retain_prompts",
        type=str,
        default=None,
        help="text file of unrelated prompts, one a line, for the retain set (default: the preset's everyday captions)",
    )
    variant.add_argument(
        "--num_retain_images", type=int, default=DEFAULT_NUM_RETAIN_IMAGES, help="images in the retain set"
    )
    variant.add_argument(
        "--retain_dir", type=str, default=None, help="where the retain set is cached (default: <pairs folder>-retain)"
    )
    variant.add_argument(
        "--retain_conditions",
        type=str,
        nargs="+",
        default=list(objective.RETAIN_CONDITIONS),
        choices=list(objective.RETAIN_CONDITIONS),
        help="conditions the retain term holds the prediction under: the empty prompt and the image's own prompt",
    )

    data = parser.add_argument_group("pair data")
    data.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="Hub dataset id or local pair folder; without it pairs are generated",
    )
    data.add_argument("--dataset_revision", type=str, default=None)
    data.add_argument(
        "--pairs_dir",
        type=str,
        default=None,
        help="where generated pairs are cached (default: ~/.cache/duo/pairs/<model>/<concept>)",
    )
    data.add_argument("--unsafe_image_column", type=str, default="unsafe")
    data.add_argument("--safe_image_column", type=str, default="safe")
    data.add_argument(
        "--num_pairs", type=int, default=None, help="use at most this many pairs (preset default when generating)"
    )
    data.add_argument(
        "--resolution",
        type=int,
        default=default_resolution,
        help=None if default_resolution else "default: the family's (512 for SD 1.x/2.x, 1024 for SDXL)",
    )
    data.add_argument("--center_crop", action="store_true")
    data.add_argument("--random_flip", action="store_true")

    train = parser.add_argument_group("training")
    train.add_argument("--output_dir", type=str, default=None, help="default: duo-<concept>")
    train.add_argument("--seed", type=int, default=42)
    train.add_argument("--train_batch_size", type=int, default=1, help="pairs per device per micro-step")
    train.add_argument(
        "--gradient_accumulation_steps",
        type=int,
        default=DEFAULT_GRADIENT_ACCUMULATION_STEPS,
        help="default 4: an effective batch of 4 pairs on one GPU, as the official 1 pair x 4 GPUs",
    )
    train.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps; preset default")
    train.add_argument("--learning_rate", type=float, default=None, help="default scales with β (official recipe)")
    train.add_argument("--lr_scheduler", type=str, default="constant")
    train.add_argument("--lr_num_cycles", type=int, default=1, help="hard restarts of cosine_with_restarts")
    train.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial scheduler")
    train.add_argument("--lr_warmup_steps", type=int, default=0)
    train.add_argument("--adam_beta1", type=float, default=0.9)
    train.add_argument("--adam_beta2", type=float, default=0.999)
    train.add_argument("--adam_weight_decay", type=float, default=1e-2)
    train.add_argument("--adam_epsilon", type=float, default=1e-8)
    train.add_argument("--max_grad_norm", type=float, default=1.0)
    train.add_argument("--rank", type=int, default=DEFAULT_LORA_RANK, help="LoRA rank")
    train.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha; default equals the rank")
    train.add_argument("--gradient_checkpointing", action="store_true")
    train.add_argument("--use_8bit_adam", action="store_true")
    add_quantization_argument(train)
    train.add_argument("--enable_xformers_memory_efficient_attention", action="store_true")
    train.add_argument("--mixed_precision", type=str, default=None, choices=["no", "fp16", "bf16"])
    train.add_argument("--allow_tf32", action="store_true")

    ckpt = parser.add_argument_group("checkpoints")
    ckpt.add_argument("--checkpointing_steps", type=int, default=500)
    ckpt.add_argument("--checkpoints_total_limit", type=int, default=None)
    ckpt.add_argument("--resume_from_checkpoint", type=str, default=None, help='a checkpoint path or "latest"')

    val = parser.add_argument_group("validation and logging")
    val.add_argument(
        "--validation_prompt",
        "--validation_prompts",
        dest="validation_prompts",
        type=str,
        nargs="+",
        default=None,
        help="preset default: unsafe, synonym, unrelated",
    )
    val.add_argument(
        "--validation_steps", type=int, default=None, help="validate every N steps (default: only at the end)"
    )
    val.add_argument("--num_validation_images", type=int, default=2)
    val.add_argument("--num_validation_inference_steps", type=int, default=30)
    val.add_argument("--skip_validation", action="store_true", help="no sample images (and none in the model card)")
    val.add_argument("--report_to", type=str, default="tensorboard")
    val.add_argument(
        "--tracker_name",
        type=str,
        default=None,
        help="the trackers' project name (default: duo; duo-sdxl, duo-sd3, duo-flux for those families)",
    )
    val.add_argument("--logging_dir", type=str, default="logs")

    hub = parser.add_argument_group("Hub")
    hub.add_argument("--push_to_hub", action="store_true")
    hub.add_argument("--hub_model_id", type=str, default=None)
    hub.add_argument("--hub_token", type=str, default=None)
    hub.add_argument("--hub_private", action="store_true")
    return parser


def check_environment_args(args, accelerator_device_type: Optional[str] = None):
    """Refusals that need nothing loaded: fail in a second, not after the models are on the GPU."""
    if args.resolution is not None and args.resolution % 8 != 0:
        raise UsageError(
            f"--resolution {args.resolution} is not a multiple of 8: the VAE downsamples by 8; use e.g. {args.resolution // 8 * 8 or 8}"
        )
    if args.report_to in ("wandb", "all") and args.hub_token is not None:
        raise UsageError(
            "--report_to wandb with --hub_token would expose the token in the run's config: log in with `hf auth login` instead"
        )
    if args.quantize_base != "none" and not is_bitsandbytes_available():
        raise UsageError(f"--quantize_base {args.quantize_base} needs bitsandbytes: pip install bitsandbytes")
    if args.use_8bit_adam and not is_bitsandbytes_available():
        raise UsageError("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes")
    if args.enable_xformers_memory_efficient_attention and not is_xformers_available():
        raise UsageError(
            "--enable_xformers_memory_efficient_attention needs xformers: pip install xformers (PyTorch SDPA is used without it)"
        )
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
    if args.report_to not in ("tensorboard", "wandb", "comet_ml", "all", "none"):
        raise UsageError(f"--report_to {args.report_to}: choose tensorboard, wandb, comet_ml, all or none")
    if args.report_to in ("tensorboard", "all") and not is_tensorboard_available():
        raise UsageError(
            "--report_to tensorboard needs tensorboard: pip install tensorboard, or pass --report_to none"
        )


def resolve_training_args(args, family: str) -> Tuple[Settings, ConceptPreset]:
    """The run's settings: every flag the user left unset filled from the concept's preset, the named objective and
    the family's recipe. ``args`` is left as parsed. Returns ``(settings, preset)`` (the preset with the β in use)."""
    recipe = FAMILY_RECIPES[family]
    preset = resolve_concept_preset(args.concept, args.unsafe_prompt, args.safe_prompt)
    named = OBJECTIVES[args.objective]
    beta_dpo = args.beta_dpo if args.beta_dpo is not None else named.get("beta_dpo", preset.beta_dpo)
    if beta_dpo <= 0:
        raise UsageError(f"--beta_dpo must be positive, got {beta_dpo}")

    def unless_given(name, value):
        given = getattr(args, name)
        return value if given is None else given

    return with_values(
        args,
        **{
            "concept": preset.name,
            "beta_dpo": beta_dpo,
            "learning_rate": unless_given(
                "learning_rate", learning_rate_for_beta(beta_dpo, recipe.base_learning_rate)
            ),
            "preservation_weight": unless_given(
                "preservation_weight", named.get("preservation_weight", preservation_weight_for_beta(beta_dpo))
            ),
            # Whether λ was chosen (by the user, or by the named objective) before any family derives its own.
            "preservation_weight_given": preservation_weight_given(args),
            "max_train_steps": unless_given("max_train_steps", preset.max_train_steps),
            "validation_prompts": unless_given("validation_prompts", list(preset.validation_prompts)),
            "lora_alpha": unless_given("lora_alpha", args.rank),
            "lora_target": args.lora_target or recipe.lora_target,
            "tracker_name": args.tracker_name or ("duo" if family == "sd" else f"duo-{family}"),
            "t_min": unless_given("t_min", recipe.t_min),
            "t_max": unless_given("t_max", recipe.t_max),
            "resolution": unless_given("resolution", recipe.default_resolution),
            "output_dir": unless_given("output_dir", f"duo-{preset.name}"),
            **resolved_objective_args(args),
        },
    ), with_overrides(preset, beta_dpo=beta_dpo)


def resolved_objective_args(args) -> dict:
    """The concept-specific flags filled from ``--objective``; refuses combinations that cannot mean anything."""
    named = OBJECTIVES[args.objective]
    preference_conditions = args.preference_conditions
    if args.condition_on_prompts:
        if preference_conditions is not None:
            raise UsageError("--condition_on_prompts is --preference_conditions prompt: give one of the two")
        preference_conditions = ["prompt"]
    if preference_conditions is None:
        preference_conditions = list(named["preference_conditions"])
    retain_weight = named["retain_weight"] if args.retain_weight is None else args.retain_weight
    if not (retain_weight >= 0 and math.isfinite(retain_weight)):
        raise UsageError(f"--retain_weight {retain_weight}: give 0 (off) or a positive, finite weight")
    if args.num_retain_images < 1:
        raise UsageError(f"--num_retain_images {args.num_retain_images}: give at least 1")
    return {
        "preference_conditions": list(dict.fromkeys(preference_conditions)),
        "retain_weight": retain_weight,
        "retain_conditions": list(dict.fromkeys(args.retain_conditions)),
    }


def needs_unsafe_prompts(args) -> bool:
    """Whether the pair data must carry each pair's unsafe prompt."""
    return any(c in ("prompt", "guided") for c in args.preference_conditions)


def variant_settings(args, guidance_scale: float) -> objective.VariantSettings:
    """The objective's settings for the loss; ``guidance_scale`` is the pair recipe's (the sampler's) w."""
    return objective.VariantSettings(
        preference_conditions=tuple(args.preference_conditions),
        guidance_scale=guidance_scale,
        retain_weight=args.retain_weight,
        retain_conditions=tuple(args.retain_conditions) if args.retain_weight > 0 else (),
    )


def add_flow_matching_arguments(parser: argparse.ArgumentParser, default_max_sequence_length: int):
    """The flags of the flow-matching families (SD3, FLUX), as in diffusers' SD3 and FLUX LoRA scripts."""
    flow = parser.add_argument_group("flow matching (as in diffusers' SD3 and FLUX LoRA scripts)")
    flow.add_argument(
        "--weighting_scheme",
        type=str,
        default="none",
        choices=list(objective.FLOW_MATCHING_WEIGHTING_SCHEMES),
        help="none (official DUO): σ uniform over the t range, unit weights; logit_normal/mode: σ drawn from that density "
        "over the t range; sigma_sqrt/cosmap: uniform σ, weighted loss",
    )
    flow.add_argument("--logit_mean", type=float, default=0.0, help="mean of the logit_normal density")
    flow.add_argument("--logit_std", type=float, default=1.0, help="std of the logit_normal density")
    flow.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode density")
    flow.add_argument(
        "--precondition_outputs",
        type=int,
        nargs="?",
        const=1,
        default=1,
        choices=[0, 1],
        help="1 (default, as diffusers and the official run): compare x_σ − σ·v̂ with x; 0: compare v̂ with ε − x",
    )
    flow.add_argument(
        "--max_sequence_length",
        type=int,
        default=default_max_sequence_length,
        help=f"T5 tokens of the prompt embeddings (default {default_max_sequence_length}: SD3 77 as the official run, FLUX "
        "512 as its pipeline samples)",
    )
    return flow


def preservation_weight_given(args) -> bool:
    """Whether λ was chosen, by the user or by the named objective (the concept objective's 0), before the family's
    default is derived: the flow-matching families derive theirs from the scheduler (``fidelity``)."""
    return args.preservation_weight is not None or "preservation_weight" in OBJECTIVES[args.objective]
