"""Will it fit? The peak GPU memory of a DUO recipe, computed without a GPU and without weights.

    python -m duo_plugin.memory --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --resolution 512 --mixed_precision bf16 --gradient_checkpointing --use_8bit_adam

* ``estimator.py``: the estimate (what it models, and why): a training run's phases and the inference pipelines traced
  on fake tensors (``estimate_training``, ``estimate_inference``), and the same step measured on real CPU tensors
  (``measure_training_step``);
* ``configs.py``: the base model's config files, the only thing an estimate reads;
* ``accounting.py``: the dispatch mode that counts every storage (``AllocationTracker``) and CUDA's autocast re-created
  on the CPU;
* ``recipes.py``: a run's memory-relevant flags (``TrainingMemorySettings``), the results (``MemoryEstimate``) and the
  card a peak needs;
* ``models.py``: the models built from their configs, the DUO adapter and its optimizer state;
* ``steps.py``: the GPU work traced: the training step, the validation, a sampling call;
* ``quantized.py``: ``--quantize_base``, bitsandbytes' quantized linear layers re-created for fake tensors;
* ``sharding.py``: several GPUs, what FSDP / ZeRO-2 / DDP divide (``shard_estimate``);
* ``startup_check.py``: what the training scripts call at start-up (``check_cpu_run``, ``check_training_memory``);
* ``cli.py``: ``python -m duo_plugin.memory``, the table.
"""

# Callers change a TrainingMemorySettings or BaseModelConfigs through memory.replace.
from dataclasses import replace

from .accounting import ALLOCATOR_ROUNDING, CATEGORIES, HALF_DTYPES, AllocationTracker, CudaAutocast
from .cli import check_args, main, parse_args
from .configs import BaseModelConfigs, load_base_model_configs, vae_scale_factor
from .estimator import estimate_inference, estimate_training, measure_training_step
from .models import (
    add_adapter,
    build_denoiser,
    build_text_encoders,
    build_vae,
    eight_bit_adam_state,
    eight_bit_adam_state_bytes,
    to_fake,
)
from .quantized import (
    QuantizedLinear,
    build_quantized_denoiser,
    quantize_linears,
    quantize_text_encoders,
    quantized_weight_bytes,
    quantized_weight_tensors,
)
from .recipes import (
    CARD_SIZES_GB,
    CUDA_CONTEXT_BYTES,
    EVALUATION_BATCH,
    FRAGMENTATION_MARGIN,
    GB,
    PAIR_GENERATION_BATCH,
    GiB,
    MemoryEstimate,
    ShardingLayout,
    TrainingMemorySettings,
    card_requirement_bytes,
    smallest_card,
)
from .sharding import SHARDING_MODES, shard_estimate, sharding_layout
from .startup_check import (
    FULL_SIZE_DENOISER_BYTES,
    add_memory_check_arguments,
    cached_snapshot,
    check_cpu_run,
    check_training_memory,
    default_max_sequence_length,
    flags_that_fit,
    process_count,
    settings_from_args,
    sharding_of,
)
from .steps import run_training_step, run_validation, vae_needs_upcast
