"""The DUO LoRA adapter: which layers get it, adding it, switching it off for the reference model, its weights."""

import contextlib
import re
from typing import Dict, List

import torch

from .errors import UsageError


LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


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
        raise UsageError(f"--lora_target {lora_target} matches no layer of this model: use --lora_layers attn")
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


def cast_lora_params_to_fp32(model):
    """LoRA parameters train in fp32 even when the frozen base runs in fp16/bf16."""
    from diffusers.training_utils import cast_training_params

    cast_training_params(model, dtype=torch.float32)


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
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft.utils import set_peft_model_state_dict

    # The family's own LoRA reader: the same key handling as ``load_lora_weights``. With the metadata asked
    # for, both families return a tuple whose first item is the state dict.
    pipeline_class = StableDiffusion3Pipeline if prefix == "transformer" else StableDiffusionPipeline
    state = pipeline_class.lora_state_dict(lora_dir, weight_name=LORA_WEIGHT_NAME, return_lora_metadata=True)[0]
    state = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    state = convert_unet_state_dict_to_peft(state)
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise UsageError(
            f"checkpoint {lora_dir} has adapter weights this model lacks ({unexpected[0]}, ...): resume with the --lora_target it was trained with"
        )
