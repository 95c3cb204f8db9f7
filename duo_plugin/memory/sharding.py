"""What multi-GPU sharding divides, and one GPU's peak of a sharded run.

Several GPUs (``--num_processes N --sharding none|fsdp|zero2``; at start-up ``WORLD_SIZE`` and accelerate
launch's ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` + ``ACCELERATE_DEEPSPEED_ZERO_STAGE``): one GPU's
peak, computed from the one-GPU trace (``shard_estimate``): every GPU runs its own batch (activations and
temporaries unchanged); FSDP divides the denoiser's frozen weights, the LoRA, its gradients and optimizer
state by N but keeps whole the root unit (embeddings and output layers, gathered from forward to backward)
and the largest unit being computed (a transformer block; a UNet down/up/mid block); ZeRO-2 divides the
optimizer state and gradients; DDP divides nothing and adds its gradient buckets (a copy of the LoRA
gradients). The prompt encoding of a quantized run is not divided (each process loads the quantized denoiser
whole). Not counted: FSDP's backward prefetch (one more unit), a loader that puts the whole full-precision
denoiser on every GPU before accelerate shards it, communication buffers.
"""

import math
from dataclasses import replace
from typing import List

import torch

from ..errors import UsageError
from .accounting import ALLOCATOR_ROUNDING
from .models import BuiltModels
from .recipes import MemoryEstimate, ShardingLayout


# The modules FSDP wraps one by one (accelerate's transformer-based auto-wrap of the blocks); the rest is the root.
FSDP_UNITS = {
    "sd": ("down_blocks", "up_blocks", "mid_block"),
    "sdxl": ("down_blocks", "up_blocks", "mid_block"),
    "sd3": ("transformer_blocks",),
    "flux": ("transformer_blocks", "single_transformer_blocks"),
}
SHARDING_MODES = ("none", "fsdp", "zero2")


def _fsdp_units(denoiser: torch.nn.Module, family: str) -> List[torch.nn.Module]:
    units = []
    for name in FSDP_UNITS[family]:
        module = getattr(denoiser, name, None)
        if isinstance(module, torch.nn.ModuleList):
            units.extend(module)
        elif module is not None:
            units.append(module)
    return units


def sharding_layout(models: BuiltModels, family: str, rounding: int = ALLOCATOR_ROUNDING) -> ShardingLayout:
    """The resident bytes multi-GPU sharding divides, from the built models (``ShardingLayout``)."""
    lora = {id(p) for p in models.lora_params}

    def size(tensor):
        return math.ceil(tensor.numel() * tensor.element_size() / rounding) * rounding

    def split(module):
        tensors = list(module.parameters()) + list(module.buffers())
        frozen = sum(size(t) for t in tensors if id(t) not in lora)
        return frozen, sum(size(t) for t in tensors if id(t) in lora)

    frozen, lora_bytes = split(models.denoiser)
    units = [split(unit) for unit in _fsdp_units(models.denoiser, family)]
    largest = max(units, key=sum, default=(0, 0))
    return ShardingLayout(
        denoiser_frozen_bytes=frozen,
        root_frozen_bytes=frozen - sum(unit[0] for unit in units),
        largest_unit_frozen_bytes=largest[0],
        largest_unit_lora_bytes=largest[1],
        lora_bytes=lora_bytes,
        optimizer_bytes=sum(size(t) for t in models.optimizer.state) if models.optimizer is not None else 0,
        num_units=len(units),
    )


def shard_estimate(estimate: MemoryEstimate, num_processes: int, sharding: str = "none") -> MemoryEstimate:
    """One GPU's peak of a training phase run on ``num_processes`` GPUs, from the one-GPU estimate and its layout:

    * ``fsdp`` (full sharding): the denoiser's frozen weights, the LoRA parameters, their gradients and optimizer
      state divided by N, plus what is whole on every GPU: the root unit (embeddings, output layers: FSDP's root
      keeps its parameters gathered from the forward to the backward) and the largest unit gathered for its forward
      or backward (its frozen weights and LoRA parameters). FSDP's backward prefetch, which gathers the next unit
      while the current one computes, would add one more unit (not counted).
    * ``zero2`` (DeepSpeed ZeRO-2): optimizer state and gradients divided by N; weights and LoRA whole.
    * ``none`` (DDP): nothing divided; DDP's gradient buckets add one more fp32 copy of the LoRA gradients.

    Activations and temporaries are each GPU's own batch: unchanged. The VAE and the text encoders (resident for
    the validation or the official step) are not sharded."""
    if num_processes <= 1 or estimate.layout is None:
        return estimate
    if sharding not in SHARDING_MODES:
        raise UsageError(f"sharding {sharding!r}: one of {', '.join(SHARDING_MODES)}")
    n, layout = num_processes, estimate.layout
    breakdown = dict(estimate.breakdown)
    if sharding == "fsdp":
        sharded_frozen = layout.denoiser_frozen_bytes - layout.root_frozen_bytes
        breakdown["weights"] += (
            math.ceil(sharded_frozen / n)
            + layout.root_frozen_bytes
            + layout.largest_unit_frozen_bytes
            - layout.denoiser_frozen_bytes
        )
        trained = layout.lora_bytes + layout.optimizer_bytes
        breakdown["lora_and_optimizer"] += math.ceil(trained / n) + layout.largest_unit_lora_bytes - trained
        breakdown["gradients"] = math.ceil(breakdown["gradients"] / n)
    elif sharding == "zero2":
        breakdown["lora_and_optimizer"] += math.ceil(layout.optimizer_bytes / n) - layout.optimizer_bytes
        breakdown["gradients"] = math.ceil(breakdown["gradients"] / n)
    else:
        breakdown["gradients"] += layout.lora_bytes
    return replace(
        estimate,
        peak_bytes=sum(breakdown.values()),
        breakdown=breakdown,
        num_processes=n,
        sharding=sharding,
    )


def sharding_name(sharding: str) -> str:
    return {"none": "DDP", "fsdp": "FSDP", "zero2": "DeepSpeed ZeRO-2"}.get(sharding, sharding)
