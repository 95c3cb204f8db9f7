"""What an estimate takes (a run's memory-relevant flags), what it gives (peaks, and what sharding would divide),
and the card a peak needs."""

from dataclasses import dataclass
from typing import Dict, Optional


GiB = 2**30
GB = 1e9
CARD_SIZES_GB = (8, 12, 16, 24, 40, 48, 80)  # common cards; their memory is in GiB (a "24 GB" card has 24 GiB)
FRAGMENTATION_MARGIN = 0.10
CUDA_CONTEXT_BYTES = int(0.75 * GiB)  # CUDA context, cuBLAS/cuDNN workspaces: outside max_memory_allocated
PAIR_GENERATION_BATCH = 4  # duo_plugin.pairs DEFAULT_BATCH_SIZE
EVALUATION_BATCH = 8  # duo_plugin.evaluate --batch_size default


@dataclass(frozen=True)
class TrainingMemorySettings:
    """The flags of a training run that decide its memory."""

    resolution: int
    train_batch_size: int = 1
    mixed_precision: str = "bf16"  # no / fp16 / bf16
    rank: int = 32
    lora_target: Optional[str] = None  # default: self_attn (SD1/2), attn (SD3)
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    encoders_resident: bool = False  # ours: keep the VAE and text encoders on the GPU
    recipe: str = "ours"  # or "official" (re-created: encoders resident, called every step)
    max_sequence_length: int = 256
    num_validation_images: int = 2
    validation: bool = True
    quantize_base: str = "none"  # none / nf4 / int8: the frozen denoiser (and T5) as bitsandbytes loads them
    num_processes: int = 1  # GPUs of the run; the estimate is per GPU
    sharding: str = "none"  # with several processes: none (DDP), fsdp, zero2 (DeepSpeed ZeRO-2)


@dataclass(frozen=True)
class ShardingLayout:
    """What multi-GPU sharding divides: the trained denoiser's resident bytes, split as FSDP wraps it (one unit per
    transformer block, UNet down/up block and mid block; the rest, embeddings and output layers, in the root unit),
    and the LoRA parameters and their optimizer state. Bytes as the allocator rounds each tensor."""

    denoiser_frozen_bytes: int  # the frozen (possibly quantized) weights and buffers
    root_frozen_bytes: int  # of which outside every unit
    largest_unit_frozen_bytes: int  # the largest unit (by frozen + LoRA bytes): its frozen bytes
    largest_unit_lora_bytes: int  # ... and its LoRA parameters
    lora_bytes: int
    optimizer_bytes: int
    num_units: int = 0


@dataclass
class MemoryEstimate:
    peak_bytes: int
    breakdown: Dict[str, int]  # bytes per category at the peak
    phase: str  # what peaks: "training step", "validation", "generation", ...
    seconds: float = 0.0
    layout: Optional[ShardingLayout] = None  # training phases: what sharding would divide (shard_estimate)
    num_processes: int = 1  # > 1: the peak of one GPU of a run over this many
    sharding: str = "none"

    def smallest_card_gb(self) -> Optional[int]:
        return smallest_card(self.peak_bytes)


def card_requirement_bytes(peak_bytes: int) -> int:
    """The card memory a peak of ``max_memory_allocated`` needs: fragmentation and the CUDA context on top."""
    return int(peak_bytes * (1 + FRAGMENTATION_MARGIN)) + CUDA_CONTEXT_BYTES


def smallest_card(peak_bytes: int) -> Optional[int]:
    need = card_requirement_bytes(peak_bytes)
    return next((size for size in CARD_SIZES_GB if size * GiB >= need), None)
