"""The run's models built from their configs (on the meta device, then fake tensors; or real CPU tensors), the DUO
adapter as the training scripts add it, and the optimizer state it trains with."""

import contextlib
import math
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch

from .configs import DEFAULT_LORA_TARGET, BaseModelConfigs, text_encoder_class
from .recipes import TrainingMemorySettings


EIGHT_BIT_BLOCK = 256
EIGHT_BIT_MIN_SIZE = 4096


@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def silence_library_logs():
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    transformers_logging.set_verbosity_error()


def build_denoiser(configs: BaseModelConfigs, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

    model_class = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}.get(
        configs.family, UNet2DConditionModel
    )
    with _default_dtype(dtype):
        model = model_class.from_config(configs.denoiser)
    # from_pretrained(dtype=...) casts floating buffers too (SD3's positional embedding is built in fp32).
    return model.to(dtype).eval().requires_grad_(False)


def build_vae(configs: BaseModelConfigs, dtype: torch.dtype):
    from diffusers import AutoencoderKL

    with _default_dtype(dtype):
        return AutoencoderKL.from_config(configs.vae).to(dtype).eval().requires_grad_(False)


def build_text_encoders(configs: BaseModelConfigs, dtype: torch.dtype) -> Dict[str, torch.nn.Module]:
    encoders = {}
    for name, config in configs.text_encoders.items():
        model_class, config_class = text_encoder_class(config)
        with _default_dtype(dtype):
            encoders[name] = model_class(config_class.from_dict(config)).to(dtype).eval().requires_grad_(False)
    return encoders


def add_adapter(denoiser, settings: TrainingMemorySettings, family: str) -> List[torch.nn.Parameter]:
    """The DUO adapter exactly as the training scripts add it (same targets, fp32 LoRA weights)."""
    from .. import lora

    lora_target = settings.lora_target or DEFAULT_LORA_TARGET[family]
    lora.add_duo_adapter(denoiser, settings.rank, settings.rank, lora.lora_target_modules(denoiser, lora_target))
    lora.cast_lora_params_to_fp32(denoiser)
    return [p for p in denoiser.parameters() if p.requires_grad]


def eight_bit_adam_state(params: List[torch.Tensor]) -> List[torch.Tensor]:
    """Tensors of the size bitsandbytes' AdamW8bit keeps per parameter (blockwise 8-bit moments)."""
    state = []
    for p in params:
        n = p.numel()
        if n >= EIGHT_BIT_MIN_SIZE:
            blocks = math.ceil(n / EIGHT_BIT_BLOCK)
            state += [
                torch.empty(n, dtype=torch.uint8),
                torch.empty(n, dtype=torch.uint8),
                torch.empty(blocks, dtype=torch.float32),
                torch.empty(blocks, dtype=torch.float32),
            ]
        else:
            state += [torch.empty(n, dtype=torch.float32), torch.empty(n, dtype=torch.float32)]
    return state


def eight_bit_adam_state_bytes(numels: List[int]) -> int:
    """Closed form of ``eight_bit_adam_state`` (unrounded)."""
    return sum(2 * n + 2 * 4 * math.ceil(n / EIGHT_BIT_BLOCK) if n >= EIGHT_BIT_MIN_SIZE else 8 * n for n in numels)


class LoraOptimizer:
    """AdamW (torch, foreach, states initialised as after the first step) or 8-bit AdamW's state with an
    in-place update (bitsandbytes' fused kernel allocates nothing per step)."""

    def __init__(self, params, use_8bit_adam: bool):
        self.params = params
        self.use_8bit_adam = use_8bit_adam
        if use_8bit_adam:
            self.state = eight_bit_adam_state(params)
            self.optimizer = None
        else:
            self.optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, foreach=True)
            for p in params:
                self.optimizer.state[p] = {
                    "step": torch.tensor(1.0),
                    "exp_avg": torch.zeros_like(p),
                    "exp_avg_sq": torch.zeros_like(p),
                }
            self.state = [t for s in self.optimizer.state.values() for t in (s["exp_avg"], s["exp_avg_sq"])]

    def step(self):
        if self.optimizer is not None:
            self.optimizer.step()
        else:
            with torch.no_grad():
                for p in self.params:
                    p.add_(p.grad, alpha=-1e-4)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


@dataclass
class BuiltModels:
    family: str
    denoiser: torch.nn.Module
    vae: Optional[torch.nn.Module]
    text_encoders: Dict[str, torch.nn.Module]
    lora_params: List[torch.nn.Parameter]
    optimizer: LoraOptimizer
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype


def to_fake(module: torch.nn.Module, fake_mode, device: str = "cpu"):
    """Replace a meta-device module's parameters and buffers by fake tensors on ``device``, in place
    (``module.to`` cannot: it swaps tensors, which fake tensors refuse)."""
    converter = fake_mode.fake_tensor_converter
    target = torch.device(device)
    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is not None:
                fake = converter.from_meta_and_device(fake_mode, param.data, target)
                submodule._parameters[name] = torch.nn.Parameter(fake, requires_grad=param.requires_grad)
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None:
                submodule._buffers[name] = converter.from_meta_and_device(fake_mode, buffer, target)
    return module


def new_fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)
