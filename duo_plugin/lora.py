"""The DUO LoRA adapter: which layers get it, adding it, switching it off for the reference model, its weights."""

import contextlib
import re
from typing import Callable, Dict, List, Optional

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


def require_joint_attention_target(lora_target: str, family_name: str):
    """SD3 and FLUX: joint attention has no separate self-attention, so only ``attn`` places the adapter."""
    if lora_target != "attn":
        raise UsageError(
            f"--lora_layers {lora_target}: {family_name}'s joint attention has no separate self-attention; use "
            f"--lora_layers attn (to_q, to_k, to_v, to_out.0 of every transformer block)"
        )


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

    Pass the *unwrapped* model: under DDP the reference forward must not go through the wrapper (under FSDP2 the
    unwrapped model is the sharded one: every process runs this forward, each all-gathering what it lacks).
    peft turns requires_grad off while disabled; enable_adapters turns it back on.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.disable_adapters()
    try:
        yield model
    finally:
        model.enable_adapters()
        # Under FSDP2 peft switches the parameters registered at the time: the shards going in, the all-gathered
        # copies coming out when the forward kept them. The shards the optimizer updates must train again.
        for param in trainable:
            if not param.requires_grad:
                param.requires_grad_(True)


def lora_state_dict(model) -> Dict[str, torch.Tensor]:
    """The adapter's weights in diffusers' LoRA format."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))


def lora_parameters(model) -> Dict[str, torch.nn.Parameter]:
    """The adapter's parameters as registered on ``model`` now (under FSDP2 this process's shards, DTensors), under
    the names ``get_peft_model_state_dict`` gives them: the same selection, in the same order on every process."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=dict(model.named_parameters()))


def _is_dtensor(tensor) -> bool:
    if not torch.distributed.is_available():
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(tensor, DTensor)


def lora_is_sharded(model) -> bool:
    """True when the adapter's weights are split across processes (FSDP2 shards them as DTensors)."""
    return any(_is_dtensor(param) for param in lora_parameters(model).values())


def gather_lora_state_dict(model, whole_tensor: Optional[Callable] = None) -> Dict[str, torch.Tensor]:
    """The whole adapter in diffusers' LoRA format, on CPU, on every process that calls it.

    Sharded (FSDP2), each process holds a slice of every LoRA weight: they are all-gathered one weight after the
    other, in the same order everywhere, so EVERY process must call this, not only the one that writes. Only the
    adapter is gathered, never the frozen base weights (``get_model_state_dict(full_state_dict=True)`` would gather
    the whole model onto one process). Unsharded, it is ``lora_state_dict`` and nothing is exchanged.
    ``whole_tensor(param)`` replaces the gathering: DeepSpeed ZeRO-2 passes its reader of the fp32 master weights.
    """
    from diffusers.utils import convert_state_dict_to_diffusers

    parameters = lora_parameters(model)
    if whole_tensor is None:
        if not any(_is_dtensor(param) for param in parameters.values()):
            return lora_state_dict(model)
        whole_tensor = _full_tensor
    gathered = {}
    with torch.no_grad():
        for key, param in parameters.items():
            gathered[key] = whole_tensor(param).detach().to("cpu", copy=True)
    return convert_state_dict_to_diffusers(gathered)


def _full_tensor(param):
    return param.full_tensor() if _is_dtensor(param) else param


def _read_lora_file(lora_dir: str, prefix: str) -> Dict[str, torch.Tensor]:
    """The adapter file of ``lora_dir`` under peft's names (without the adapter name), ``prefix``'s keys only."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    # The family's own LoRA reader: the same key handling as ``load_lora_weights``. With the metadata asked
    # for, both families return a tuple whose first item is the state dict.
    pipeline_class = StableDiffusion3Pipeline if prefix == "transformer" else StableDiffusionPipeline
    state = pipeline_class.lora_state_dict(lora_dir, weight_name=LORA_WEIGHT_NAME, return_lora_metadata=True)[0]
    state = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
    return convert_unet_state_dict_to_peft(state)


def _unexpected_keys_error(lora_dir: str, key: str) -> UsageError:
    return UsageError(
        f"checkpoint {lora_dir} has adapter weights this model lacks ({key}, ...): resume with the --lora_target it was trained with"
    )


def load_lora_state_dict(model, lora_dir: str, prefix: str) -> Dict[str, torch.Tensor]:
    """Restore adapter weights saved by ``save_lora_weights`` into a model that has the adapter; returns them as
    read (peft's names, the file's dtype).

    Sharded (FSDP2), every process reads the whole file and keeps its own slice of each weight: nothing is
    exchanged, and every process ends with the adapter that was saved, not only the first."""
    from peft.utils import set_peft_model_state_dict

    state = _read_lora_file(lora_dir, prefix)
    if lora_is_sharded(model):
        set_sharded_lora_state(model, state, lora_dir)
        return state
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise _unexpected_keys_error(lora_dir, unexpected[0])
    return state


def set_sharded_lora_state(model, state: Dict[str, torch.Tensor], source: str):
    """Copy whole adapter weights (peft's names, as ``_read_lora_file`` returns them) into a sharded model: each
    process cuts its own slice (``distribute_tensor`` with no source rank sends nothing)."""
    from torch.distributed.tensor import distribute_tensor

    parameters = lora_parameters(model)
    unexpected = [key for key in state if key not in parameters]
    if unexpected:
        raise _unexpected_keys_error(source, unexpected[0])
    with torch.no_grad():
        for key, value in state.items():
            param = parameters[key]
            if tuple(value.shape) != tuple(param.shape):
                raise UsageError(
                    f"checkpoint {source} has {key} of shape {tuple(value.shape)}, the model {tuple(param.shape)}: "
                    f"resume with the --rank it was trained with"
                )
            value = value.to(device=param.device, dtype=param.dtype)
            if _is_dtensor(param):
                value = distribute_tensor(value, param.device_mesh, param.placements, src_data_rank=None)
            param.copy_(value)


def save_denoiser_lora(pipeline_class, prefix: str, output_dir: str, state_dict, denoiser=None):
    """The adapter in diffusers' LoRA format, written by ``pipeline_class.save_lora_weights`` (``prefix``: ``unet`` or
    ``transformer``), with peft's adapter config as metadata so stock loaders rebuild the same LoRA."""
    metadata = denoiser.peft_config["default"].to_dict() if denoiser is not None else None
    pipeline_class.save_lora_weights(
        output_dir,
        weight_name=LORA_WEIGHT_NAME,
        **{f"{prefix}_lora_layers": state_dict, f"{prefix}_lora_adapter_metadata": metadata},
    )
