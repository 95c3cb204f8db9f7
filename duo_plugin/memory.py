"""Will it fit? The peak GPU memory of a DUO recipe, computed without a GPU and without weights.

    python -m duo_plugin.memory --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --resolution 512 --mixed_precision bf16 --gradient_checkpointing --use_8bit_adam

Only the base model's config files are read (a Hub id or a folder). Every model is built from its config
inside ``torch._subclasses.fake_tensor.FakeTensorMode``: parameters and activations are fake tensors that
carry shape, dtype and storage size but no data, so a full training step of SD3-medium at 1024 px runs in
seconds on a laptop CPU. A ``TorchDispatchMode`` (``AllocationTracker`` below) sees every tensor the step
creates, as PyTorch's own ``torch.distributed._tools.mem_tracker.MemTracker`` does, and keeps the live
bytes and their peak, split into weights / LoRA + optimizer state / activations / gradients /
temporaries. We use our own tracker rather than ``MemTracker`` for the estimate because ``MemTracker``
re-scans every module's statistics on every operator (seconds become minutes on a 1000-module UNet) and
has no category for LoRA parameters; ``MemTracker`` on *real* tensors is the independent measurement the
tests compare the estimate with (``measure_training_step``).

What the estimate models, and why (the GPU step of ``train_duo.py`` / ``train_duo_sd3.py`` /
``train_duo_flux.py``; families: SD1/2 and SDXL UNets, SD3 and FLUX.1 transformers):

* **Resident weights.** The frozen denoiser in the mixed-precision dtype (fp32 without mixed precision),
  buffers included and cast as ``from_pretrained(dtype=...)`` casts them (SD3.5's 384² positional embedding
  is a 0.45 GB bf16 buffer). Ours frees the encoders after
  caching: SD1/2 moves the VAE and text encoder to the CPU; SDXL, SD3 and FLUX delete the text encoders
  after encoding every prompt once and keep their VAE (fp32 while caching: SD3's latents are sensitive,
  SDXL's VAE overflows in fp16) on the CPU. ``encoders_resident`` keeps them on the GPU (the benchmark's
  "kept" case). The re-created official step (``benchmarks/benchmark_step.py``) keeps the VAE and every
  text encoder on the GPU and calls them every step: both pair images VAE-encoded (SDXL's, SD3's and
  FLUX's VAE in fp32), the empty prompt encoded by CLIP (SDXL: CLIP-L and CLIP-G; SD3: CLIP-L, CLIP-G and
  T5-XXL at ``max_sequence_length`` tokens; FLUX: CLIP-L and T5-XXL).
* **LoRA and optimizer state.** LoRA parameters are fp32 (``cast_lora_params_to_fp32``), built by the
  same ``lora.add_duo_adapter`` on the same target modules. AdamW keeps two fp32 moments per LoRA
  weight; its step runs ``foreach`` (PyTorch's default on CUDA), whose intermediate lists are counted as
  temporaries. bitsandbytes' ``AdamW8bit`` cannot run on fake tensors; its state is accounted
  analytically: tensors of at least 4096 elements keep two uint8 moments plus one fp32 absmax per
  256-element block for each moment, smaller ones two fp32 moments (bitsandbytes' ``min_8bit_size``); its
  fused kernel updates in place, so its step adds no temporaries.
* **The batch.** One micro-step is the concatenated batch [x⁻_t; x⁺_t; x_T] of 3·B samples
  (B = ``--train_batch_size`` pairs) at resolution/8 (SD3, FLUX: 16 latent channels; FLUX packs 2×2
  patches into tokens, [3·B, (H/2)(W/2), 64] at H = resolution/8, and the loss unpacks them), its
  conditioning (77 CLIP tokens; SDXL: + the pooled CLIP-G projection and 6 time ids; SD3: 77 +
  ``max_sequence_length`` tokens; FLUX: ``max_sequence_length`` T5 tokens, 512 by default as train_duo_flux.py's, the pooled CLIP-L
  vector, text and image position ids and, for [dev], the fp32 guidance vector) and the fp32 targets of the
  2·B pair images.
* **Activations.** The reference forward runs under ``no_grad`` with the adapter disabled: its
  activations are freed as it goes and only its (3·B) prediction stays. The adapted forward keeps what
  autograd saves for the backward; with ``--gradient_checkpointing`` diffusers' non-reentrant checkpoint
  keeps only block inputs and recomputes each block inside the backward (counted there). Mixed precision
  is ``accelerator.autocast()`` on CUDA; CUDA's autocast cannot run on a CPU (the CPU autocast keeps
  group/layer norms in bf16, CUDA runs them in fp32), so ``CudaAutocast`` re-creates CUDA's policy as a
  ``TorchFunctionMode``: matmuls, linears, convolutions and attention in the half dtype; norms, softmax,
  losses, exp/log/pow and reductions in fp32 — the casts then create (and autograd saves) the same
  copies as on the GPU. The adapted model's output is converted to fp32 (accelerate's
  ``convert_outputs_to_fp32``); the reference prediction stays in the half dtype (it comes from the
  unwrapped model).
* **Attention.** On a GPU, PyTorch's SDPA picks flash attention (fp16/bf16) or memory-efficient attention
  (fp32): both save the output and the per-row log-sum-exp, never the L×L matrix. On fake CPU tensors SDPA
  dispatches to the CPU flash kernel, which saves the same tensors, so the accounting matches; the CUDA
  kernels' internal backward workspace (FA2's fp32 dq accumulator, B·H·L·D·4 bytes for one attention
  at a time) is not seen at the dispatcher and is not counted (≤ 2 % at SD1.4@512). xformers behaves like
  memory-efficient attention and is estimated as SDPA.
* **Gradients.** fp32 gradients of the LoRA parameters only (the base is frozen); the activation
  gradients of the backward are temporaries. Under fp16 the loss is scaled and the gradients unscaled in
  place (no extra copies).
* **The CUDA allocator.** Every allocation is rounded up to a multiple of 512 bytes, as the caching
  allocator rounds its blocks; the estimate is therefore what ``torch.cuda.max_memory_allocated`` reports.
  Not modelled: blocks the allocator leaves unsplit (at most 1 MB each), the reserved-but-free memory of
  fragmentation (``max_memory_reserved`` − allocated), the CUDA context and the cuBLAS/cuDNN workspaces.
  The card check adds these as a margin: a recipe fits a card when peak × 1.10 + 0.75 GiB ≤ the card's
  memory.
* **The run's peak.** Training peaks at the maximum of the step and of the in-training validation (the
  VAE, and for SD1/2 the text encoder, come back to the GPU beside the LoRA and its optimizer state;
  2 images with classifier-free guidance, FLUX without; ``--skip_validation`` drops it). Pair generation
  (``python -m duo_plugin.pairs``: the whole text-to-image and img2img pipelines resident in fp16, 4 pairs
  per call, CFG) and evaluation (``python -m duo_plugin.evaluate``: 8 images per call, CFG; the detectors
  are not included) are estimated the same way, under ``no_grad``, as the maximum over their phases
  (text encoders, one denoiser call, VAE encode/decode). FLUX.1's pipelines use no CFG (dev's guidance is
  distilled into its guidance embedding) and T5 at 512 tokens (SD3's: 256). SDXL's pipelines upcast an
  fp16 VAE whose config says ``force_upcast`` (SDXL-base's) to fp32 for the decode and img2img's encode;
  an fp16-safe VAE (``--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix``) stays in fp16.

* **A quantized base** (``--quantize_base nf4|int8``, duo_plugin/families/quantization.py). bitsandbytes cannot run on
  fake tensors, so ``QuantizedLinear`` stands in for its ``Linear4bit`` / ``Linear8bitLt``: it holds exactly
  bitsandbytes' tensors (nf4: the 4-bit codes two per byte, one fp32 absmax per 64 weights — no double
  quantization, the scripts' config —, the 16-value code book: 0.5625 bytes per weight; int8: one byte per
  weight and an fp32 scale per row) and makes the allocations of bitsandbytes 0.50's forward and backward, traced
  like every other operator: nf4 dequantizes one layer's weight into the compute dtype for each forward and
  backward call (a temporary), keeps no activation, and returns the input's dtype (fp32 after a norm, where a
  plain linear layer under autocast returns bf16: FLUX's residual stream becomes fp32, its checkpointed block
  inputs double); int8 quantizes the input through an fp16 copy, multiplies into int32, dequantizes to fp16,
  dequantizes the weight for the backward, and keeps each input for the backward as an autograd-context
  attribute that gradient checkpointing cannot drop (bitsandbytes issue #2034 describes the mechanism): under
  checkpointing int8 keeps every linear layer's input. Every ``nn.Linear`` is quantized (diffusers' and
  transformers' ``replace_with_bnb_linear``), except the class's ``_keep_in_fp32_modules`` (T5's ``wo``);
  convolutions, norms and embeddings keep the load dtype: the mixed-precision dtype for SD3 and FLUX, fp16 for
  train_duo.py's UNet (it passes no dtype; diffusers' quantizer then loads fp16). T5 (SD3's text_encoder_3,
  FLUX's text_encoder_2) is quantized the same way; CLIP is not. The LoRA and its optimizer are unchanged
  (fp32). A quantized denoiser is on the GPU before the prompts are encoded, so the run has one more phase,
  "prompt encoding" (the quantized denoiser, CLIP and the quantized T5 encoding 8 prompts at a time). The
  weights equal, to the byte, those of the same tiny models loaded by diffusers'/transformers' bitsandbytes
  quantizers on a CPU (tests/test_memory.py); the allocations are read from bitsandbytes' code, not measured on
  a GPU. Pair generation and evaluation stay full precision.
* **Several GPUs** (``--num_processes N --sharding none|fsdp|zero2``; at start-up ``WORLD_SIZE`` and accelerate
  launch's ``ACCELERATE_USE_FSDP`` / ``ACCELERATE_USE_DEEPSPEED`` + ``ACCELERATE_DEEPSPEED_ZERO_STAGE``): one GPU's
  peak, computed from the one-GPU trace (``shard_estimate``): every GPU runs its own batch (activations and
  temporaries unchanged); FSDP divides the denoiser's frozen weights, the LoRA, its gradients and optimizer
  state by N but keeps whole the root unit (embeddings and output layers, gathered from forward to backward)
  and the largest unit being computed (a transformer block; a UNet down/up/mid block); ZeRO-2 divides the
  optimizer state and gradients; DDP divides nothing and adds its gradient buckets (a copy of the LoRA
  gradients). The prompt encoding of a quantized run is not divided (each process loads the quantized denoiser
  whole). Not counted: FSDP's backward prefetch (one more unit), a loader that puts the whole full-precision
  denoiser on every GPU before accelerate shards it, communication buffers.

``estimate_training_step`` and friends return a ``MemoryEstimate``; ``check_training_memory(args, family)``
is what the training scripts call at start-up.
"""

import argparse
import contextlib
import json
import math
import os
import sys
import time
import weakref
from dataclasses import asdict, dataclass, field, replace
from typing import Callable, Dict, List, Optional

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .errors import UsageError, exit_on_usage_error
from .files import atomic_write_json


GiB = 2**30
GB = 1e9
ALLOCATOR_ROUNDING = 512  # bytes: the CUDA caching allocator's block granularity
CARD_SIZES_GB = (8, 12, 16, 24, 40, 48, 80)  # common cards; their memory is in GiB (a "24 GB" card has 24 GiB)
FRAGMENTATION_MARGIN = 0.10
CUDA_CONTEXT_BYTES = int(0.75 * GiB)  # CUDA context, cuBLAS/cuDNN workspaces: outside max_memory_allocated
CATEGORIES = ("weights", "lora_and_optimizer", "activations", "gradients", "temporaries")
EIGHT_BIT_BLOCK = 256
EIGHT_BIT_MIN_SIZE = 4096
PAIR_GENERATION_BATCH = 4  # duo_plugin.pairs DEFAULT_BATCH_SIZE
EVALUATION_BATCH = 8  # duo_plugin.evaluate --batch_size default
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


# --------------------------------------------------------------------------------------------------
# Configs: only the config files of a base model
# --------------------------------------------------------------------------------------------------


# What each family's training script adapts by default (--lora_target): the UNet's self-attention, or every
# attention projection of the transformer (SD3's joint attention, FLUX's double and single blocks).
DEFAULT_LORA_TARGET = {"sd": "self_attn", "sdxl": "self_attn", "sd3": "attn", "flux": "attn"}
TRAINING_SCRIPT = {
    "sd": "train_duo.py",
    "sdxl": "train_duo.py",
    "sd3": "train_duo_sd3.py",
    "flux": "train_duo_flux.py",
}
# T5 tokens of the inference pipelines' prompts (their max_sequence_length defaults).
INFERENCE_T5_TOKENS = {"sd3": 256, "flux": 512}
# T5 tokens of the training prompts when --max_sequence_length is not given: FLUX follows train_duo_flux.py's default
# (duo_plugin.families.flux.DEFAULT_MAX_SEQUENCE_LENGTH, 512, FluxPipeline's sampling length); SD3's estimate keeps the SD3
# pipeline's 256, an upper bound of train_duo_sd3.py's 77.
SD3_TRAINING_T5_TOKENS = 256
# The text encoders each family's pipeline has, in model_index.json's names.
TEXT_ENCODER_NAMES = {
    "sd": ("text_encoder",),
    "sdxl": ("text_encoder", "text_encoder_2"),
    "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
    "flux": ("text_encoder", "text_encoder_2"),
}
SDXL_TIME_IDS = 6  # original size, crop top-left, target size


@dataclass
class BaseModelConfigs:
    """The configs a DUO run builds its models from; ``family`` is "sd" (SD1/2 UNet), "sdxl" (SDXL UNet),
    "sd3" (MMDiT) or "flux" (FLUX.1 transformer)."""

    family: str
    denoiser: dict
    vae: dict
    text_encoders: Dict[str, dict]  # name -> transformers config dict (with "architectures")
    scheduler: dict = field(default_factory=dict)
    source: str = ""


def _read_config(path: str, subfolder: str, filename: str, revision=None, cache_dir=None) -> Optional[dict]:
    """``<path>/<subfolder>/<filename>`` of a pipeline folder, ``<path>/<subfolder>.json`` of a flat config
    folder (benchmarks/configs), or the file from the Hub (config files only; never weights)."""
    if os.path.isdir(path):
        for candidate in (os.path.join(path, subfolder, filename), os.path.join(path, f"{subfolder}.json")):
            if os.path.isfile(candidate):
                with open(candidate) as f:
                    return json.load(f)
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        local = hf_hub_download(path, filename, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    except EntryNotFoundError:
        return None
    except Exception as error:
        raise UsageError(
            f"cannot read {subfolder}/{filename} of {path!r} ({type(error).__name__}): give a diffusers pipeline folder, "
            f"a folder of config files, or a Hub id that is cached or reachable"
        ) from None
    with open(local) as f:
        return json.load(f)


def denoiser_family(config: dict, is_transformer: bool) -> str:
    """ "flux" (FluxTransformer2DModel) or "sd3" for a transformer config; "sdxl" (a UNet conditioned on pooled text
    embeddings and time ids, ``addition_embed_type: text_time``) or "sd" for a UNet config."""
    if is_transformer:
        flux = config.get("_class_name", "").startswith("Flux") or "num_single_layers" in config
        return "flux" if flux else "sd3"
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"


def _read_vae_config(vae_path: str, revision=None, cache_dir=None) -> Optional[dict]:
    """A separate VAE's config (e.g. madebyollin/sdxl-vae-fp16-fix): a folder or Hub id with config.json, or the
    config file itself."""
    if os.path.isfile(vae_path):
        with open(vae_path) as f:
            return json.load(f)
    if os.path.isdir(vae_path):
        return _read_config(vae_path, "", "config.json") or _read_config(vae_path, "vae", "config.json")
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(vae_path, "config.json", revision=revision, cache_dir=cache_dir)
    except Exception as error:
        raise UsageError(
            f"cannot read config.json of the VAE {vae_path!r} ({type(error).__name__}): give a folder, a config file, "
            f"or a Hub id that is cached or reachable"
        ) from None
    with open(local) as f:
        return json.load(f)


def load_base_model_configs(
    path: str, revision: Optional[str] = None, cache_dir: Optional[str] = None, vae_path: Optional[str] = None
) -> BaseModelConfigs:
    """The base model's configs; ``vae_path`` replaces its VAE's (a separate, e.g. fp16-safe, VAE)."""
    read = lambda sub, name="config.json": _read_config(path, sub, name, revision, cache_dir)  # noqa: E731
    transformer = read("transformer")
    unet = None if transformer is not None else read("unet")
    if transformer is None and unet is None:
        raise UsageError(
            f"{path!r} has neither a unet nor a transformer config: give a Stable Diffusion 1.x/2.x, SDXL, SD3 or "
            f"FLUX.1 base"
        )
    family = denoiser_family(transformer or unet, is_transformer=transformer is not None)
    vae = read("vae") if vae_path is None else _read_vae_config(vae_path, revision, cache_dir)
    if vae is None:
        raise UsageError(f"{path!r} has no vae config")
    names = TEXT_ENCODER_NAMES[family]
    model_index = read(".", "model_index.json") if not os.path.isdir(path) else None
    text_encoders = {}
    for name in names:
        if model_index is not None and (model_index.get(name) or [None])[0] is None:
            continue  # e.g. a T5-less SD3 base
        config = read(name)
        if config is not None:
            text_encoders[name] = config
    scheduler = read("scheduler", "scheduler_config.json") or {}
    return BaseModelConfigs(family, transformer or unet, vae, text_encoders, scheduler, source=path)


def _text_encoder_class(config: dict):
    import transformers

    architecture = (config.get("architectures") or ["CLIPTextModel"])[0]
    if config.get("model_type") == "t5" or architecture.startswith("T5"):
        return transformers.T5EncoderModel, transformers.T5Config
    model_class = getattr(transformers, architecture, transformers.CLIPTextModel)
    return model_class, transformers.CLIPTextConfig


def vae_scale_factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)


# --------------------------------------------------------------------------------------------------
# Accounting: a dispatch mode that sees every storage, and CUDA's autocast re-created on the CPU
# --------------------------------------------------------------------------------------------------


class AllocationTracker(TorchDispatchMode):
    """Live bytes of every tensor storage created inside it (plus those registered), and their peak.

    A storage counts from the operator that creates it until its last reference dies (a weakref
    callback), each rounded up to ``rounding`` bytes. New storages go to ``self.category``.
    """

    def __init__(self, rounding: int = ALLOCATOR_ROUNDING):
        super().__init__()
        from torch.utils.weak import WeakIdKeyDictionary

        self.rounding = rounding
        self.category = "activations"
        self.live = WeakIdKeyDictionary()  # storage -> [bytes, category, weakref]
        self.current = dict.fromkeys(CATEGORIES, 0)
        self.peak = 0
        self.peak_breakdown = dict(self.current)

    def _bytes(self, storage) -> int:
        size = storage.nbytes()
        return math.ceil(size / self.rounding) * self.rounding if size else 0

    def register(self, tensor: torch.Tensor, category: str, move: bool = True):
        """Count ``tensor``'s storage under ``category`` (with ``move``, moving it there if already counted:
        a gradient; operators' outputs that are views of a weight stay weights)."""
        from torch.distributed._tools.common_utils import get_untyped_storages

        for storage in get_untyped_storages(tensor):
            entry = self.live.get(storage)
            if entry is not None:
                if move and entry[1] != category:
                    self.current[entry[1]] -= entry[0]
                    self.current[category] += entry[0]
                    entry[1] = category
                continue
            size = self._bytes(storage)
            entry = [size, category, None]
            entry[2] = weakref.ref(storage, lambda _, entry=entry: self._free(entry))
            self.live[storage] = entry
            self.current[category] += size
        self._update_peak()

    def _free(self, entry):
        self.current[entry[1]] -= entry[0]

    def _update_peak(self):
        total = sum(self.current.values())
        if total > self.peak:
            self.peak = total
            self.peak_breakdown = dict(self.current)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in tree_flatten(out)[0]:
            if isinstance(leaf, torch.Tensor):
                self.register(leaf, self.category, move=False)
        return out

    def reset_peak(self):
        self.peak = sum(self.current.values())
        self.peak_breakdown = dict(self.current)

    def __enter__(self):
        _ACTIVE_TRACKERS.append(self)
        return super().__enter__()

    def __exit__(self, *exc_info):
        _ACTIVE_TRACKERS.remove(self)
        return super().__exit__(*exc_info)


_ACTIVE_TRACKERS: List[AllocationTracker] = []


@contextlib.contextmanager
def _booked_as_temporaries():
    """Allocations inside count as temporaries (a quantized layer's dequantized weight, whichever phase runs it)."""
    tracker = _ACTIVE_TRACKERS[-1] if _ACTIVE_TRACKERS else None
    if tracker is None:
        yield
        return
    previous, tracker.category = tracker.category, "temporaries"
    try:
        yield
    finally:
        tracker.category = previous


# CUDA autocast's op lists (torch/csrc/autograd autocast_mode.cpp, "CUDA Ops that can autocast to ...").
_LOWER_PRECISION_FUNCTIONS = {
    "linear",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "matmul",
    "mm",
    "bmm",
    "baddbmm",
    "addmm",
    "addbmm",
    "einsum",
    "scaled_dot_product_attention",
    "prelu",
    "__matmul__",
}
_FP32_FUNCTIONS = {
    "group_norm",
    "layer_norm",
    "softmax",
    "log_softmax",
    "exp",
    "log",
    "pow",
    "rsqrt",
    "mse_loss",
    "l1_loss",
    "cumsum",
    "prod",
    "norm",
    "softplus",
    "logsumexp",
    "erfinv",
    "acos",
    "asin",
    "cosh",
    "sinh",
    "tan",
    "expm1",
    "log1p",
    "log2",
    "log10",
    "reciprocal",
    "cosine_similarity",
    "nll_loss",
    "cross_entropy",
    "kl_div",
    "rms_norm",
}


class CudaAutocast(TorchFunctionMode):
    """CUDA's ``torch.autocast`` policy re-created on any device, at the Python function level (above
    autograd, where the real autocast casts, so autograd saves the same casted copies)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _LOWER_PRECISION_FUNCTIONS:
            args, kwargs = _cast_floating(args, self.dtype), _cast_floating(kwargs, self.dtype)
        elif name in _FP32_FUNCTIONS:
            args, kwargs = _cast_floating(args, torch.float32), _cast_floating(kwargs, torch.float32)
        return func(*args, **kwargs)


def _cast_floating(tree, dtype):
    if isinstance(tree, torch.Tensor):
        return tree.to(dtype) if tree.is_floating_point() and tree.dtype != dtype else tree
    if isinstance(tree, (list, tuple)):
        return type(tree)(_cast_floating(x, dtype) for x in tree)
    if isinstance(tree, dict):
        return {k: _cast_floating(v, dtype) for k, v in tree.items()}
    return tree


def _autocast(mixed_precision: str):
    return CudaAutocast(HALF_DTYPES[mixed_precision]) if mixed_precision in HALF_DTYPES else contextlib.nullcontext()


# --------------------------------------------------------------------------------------------------
# Recipes and results
# --------------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------------
# Building the models (fake or real tensors) and running the steps
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _default_dtype(dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _quiet():
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
        model_class, config_class = _text_encoder_class(config)
        with _default_dtype(dtype):
            encoders[name] = model_class(config_class.from_dict(config)).to(dtype).eval().requires_grad_(False)
    return encoders


def add_adapter(denoiser, settings: TrainingMemorySettings, family: str) -> List[torch.nn.Parameter]:
    """The DUO adapter exactly as the training scripts add it (same targets, fp32 LoRA weights)."""
    from . import lora

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


# --------------------------------------------------------------------------------------------------
# --quantize_base: bitsandbytes' quantized linear layers, re-created for fake tensors
# --------------------------------------------------------------------------------------------------

NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default: one fp32 absmax per 64 weights (no double quantization)
NF4_CODE_VALUES = 16  # the NF4 code book each quantized weight's QuantState holds (16 fp32 values)
PROMPT_ENCODING_BATCH = 8  # duo_plugin.families.prompts.encode_once: distinct prompts encoded at a time


def quantized_weight_tensors(out_features: int, in_features: int, mode: str, device=None) -> Dict[str, torch.Tensor]:
    """The tensors bitsandbytes keeps for one quantized ``nn.Linear`` weight (the bias stays as it was):

    * nf4 (``Linear4bit``, ``Params4bit``): the 4-bit codes packed two per byte, shape ((n + 1) // 2, 1) uint8; one
      fp32 absmax per 64-weight block; the 16-value NF4 code book — 0.5625 bytes per weight.
    * int8 (``Linear8bitLt``, ``Int8Params``): the int8 weight (out, in) and one fp32 scale per output row (SCB).
    """
    n = out_features * in_features
    if mode == "nf4":
        return {
            "weight": torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device),
            "absmax": torch.empty(math.ceil(n / NF4_BLOCKSIZE), dtype=torch.float32, device=device),
            "code": torch.empty(NF4_CODE_VALUES, dtype=torch.float32, device=device),
        }
    if mode == "int8":
        return {
            "weight": torch.empty(out_features, in_features, dtype=torch.int8, device=device),
            "SCB": torch.empty(out_features, dtype=torch.float32, device=device),
        }
    raise ValueError(f"quantization mode {mode!r}: one of nf4, int8")


def quantized_weight_bytes(out_features: int, in_features: int, mode: str, rounding: int = 1) -> int:
    """Closed form of ``quantized_weight_tensors``: nf4 ⌈n/2⌉ + 4·⌈n/64⌉ + 64 bytes, int8 n + 4·out (each tensor
    rounded up to ``rounding``, as the allocator does)."""
    tensors = quantized_weight_tensors(out_features, in_features, mode, device="meta")
    return sum(math.ceil(t.numel() * t.element_size() / rounding) * rounding for t in tensors.values())


class _NF4MatMul(torch.autograd.Function):
    """The memory of bitsandbytes' ``MatMul4Bit``: the forward dequantizes the weight into the compute dtype and
    multiplies (its ``gemm_4bit`` does so on a GPU above 1536 rows, where a training batch is; its fused kernel for
    fewer rows skips the copy: the estimate always counts it), keeps no activation for the backward (the weight is
    frozen), and the backward dequantizes the weight again for the input's gradient."""

    @staticmethod
    def forward(ctx, x, packed, bias, weight_shape):
        ctx.weight_shape = weight_shape
        with _booked_as_temporaries():
            weight = torch.empty(weight_shape, dtype=x.dtype, device=x.device)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        with _booked_as_temporaries():
            weight = torch.empty(ctx.weight_shape, dtype=grad_output.dtype, device=grad_output.device)
        return torch.matmul(grad_output, weight), None, None, None


class _Int8MatMul(torch.autograd.Function):
    """The memory of bitsandbytes' ``MatMul8bitLt`` on CUDA (LLM.int8, threshold 6.0, outlier columns assumed absent:
    they depend on the data): the input cast to fp16 (and its |A| ≥ 6 mask) for its row-wise int8 quantization, the
    int32 product, its fp16 dequantization and the cast to the input's dtype. When the input needs a gradient it is
    kept for the backward as an attribute of the autograd context (``ctx.tensors``), which gradient checkpointing's
    saved-tensor hooks do not see: a checkpointed block's int8 layers keep their inputs. The backward dequantizes the
    int8 weight into the input's dtype for the input's gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, out_features):
        shape = x.shape
        a = x.reshape(-1, shape[-1])
        rows, cols = a.shape
        with _booked_as_temporaries():
            a16 = a.to(torch.float16)
            magnitude = torch.empty(rows, cols, dtype=torch.float16, device=x.device)
            outliers = torch.empty(rows, cols, dtype=torch.bool, device=x.device)
            del magnitude, outliers
            quantized = torch.empty(rows, cols, dtype=torch.int8, device=x.device)
            row_stats = torch.empty(rows, dtype=torch.float32, device=x.device)
            del a16
            accumulator = torch.empty(rows, out_features, dtype=torch.int32, device=x.device)
            half = torch.empty(rows, out_features, dtype=torch.float16, device=x.device)
        output = half if x.dtype == torch.float16 else half.to(x.dtype)
        del half, accumulator, quantized, row_stats
        ctx.weight_shape = (out_features, cols)
        ctx.grad_shape = shape
        ctx.dtype_a = a.dtype
        ctx.tensors = (None, torch.empty(0, dtype=a.dtype, device=x.device), a) if ctx.needs_input_grad[0] else None
        return output.reshape(*shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_output):
        grad_output = grad_output.reshape(-1, grad_output.shape[-1]).contiguous()
        with _booked_as_temporaries():
            weight = torch.empty(ctx.weight_shape, dtype=ctx.dtype_a, device=grad_output.device)
        grad_a = torch.matmul(grad_output.to(ctx.dtype_a), weight).view(ctx.grad_shape)
        ctx.tensors = None
        return grad_a, None, None, None


class QuantizedLinear(torch.nn.Linear):
    """A stand-in for bitsandbytes' ``Linear4bit`` (nf4) or ``Linear8bitLt`` (int8) that runs on any device, fake
    tensors included: bitsandbytes' storage (``quantized_weight_tensors``) and the allocations of its forward and
    backward (``_NF4MatMul``, ``_Int8MatMul``), not its arithmetic. ``Linear4bit`` casts the input to its compute
    dtype and its output back to the input's dtype; ``Linear8bitLt`` computes from an fp16 copy and returns the
    input's dtype."""

    def __init__(self, linear: torch.nn.Linear, mode: str, compute_dtype: torch.dtype):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.mode, self.compute_dtype = mode, compute_dtype
        tensors = quantized_weight_tensors(self.out_features, self.in_features, mode, linear.weight.device)
        self.weight = torch.nn.Parameter(tensors.pop("weight"), requires_grad=False)
        for name, tensor in tensors.items():
            self.register_buffer(name, tensor)
        self.register_parameter("bias", linear.bias)

    def forward(self, x):
        if self.mode == "nf4":
            input_dtype = x.dtype
            x = x.to(self.compute_dtype)
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            shape = (self.out_features, self.in_features)
            return _NF4MatMul.apply(x, self.weight, bias, shape).to(input_dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _Int8MatMul.apply(x, self.weight, bias, self.out_features)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, mode={self.mode}"


def _name_matches(name: str, keys) -> bool:
    parts = name.split(".")
    return any(key == name or key in parts or name.startswith(key + ".") or f".{key}." in f".{name}." for key in keys)


def quantize_linears(model: torch.nn.Module, mode: str, compute_dtype: torch.dtype, keep=()) -> List[str]:
    """Replace every ``nn.Linear`` of ``model`` (except those named in ``keep``) by a ``QuantizedLinear``, in place,
    as diffusers' and transformers' bitsandbytes quantizers replace them (``replace_with_bnb_linear``: linear layers
    only; convolutions, norms and embeddings keep the load dtype). Returns the replaced names."""
    names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and not isinstance(module, QuantizedLinear)
        if not _name_matches(name, keep)
    ]
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, QuantizedLinear(getattr(parent, child), mode, compute_dtype))
    return names


def _kept_modules(model: torch.nn.Module) -> List[str]:
    """The modules a bitsandbytes quantizer leaves unquantized: the class's ``_keep_in_fp32_modules`` (T5's ``wo``;
    none for the UNets, SD3 and FLUX transformers)."""
    return list(getattr(model, "_keep_in_fp32_modules", None) or [])


def build_quantized_denoiser(configs: BaseModelConfigs, weight_dtype: torch.dtype, mode: str):
    """The denoiser as ``from_pretrained(quantization_config=...)`` loads it for the training scripts: its linear
    layers quantized with the mixed-precision dtype as compute dtype, the rest in the dtype passed to
    ``from_pretrained`` — the mixed-precision dtype for SD3 and FLUX; ``train_duo.py`` passes none for its UNet,
    and diffusers' bitsandbytes quantizer then loads the rest in fp16 (kept in the estimate as fp32 without mixed
    precision)."""
    rest_dtype = torch.float16 if configs.family in ("sd", "sdxl") and weight_dtype != torch.float32 else weight_dtype
    denoiser = build_denoiser(configs, rest_dtype)
    quantize_linears(denoiser, mode, weight_dtype, keep=_kept_modules(denoiser))
    return denoiser


def quantize_text_encoders(configs: BaseModelConfigs, encoders: Dict[str, torch.nn.Module], mode: str, dtype):
    """T5 (SD3's text_encoder_3, FLUX's text_encoder_2) quantized as the scripts' ``PipelineQuantizationConfig``
    does; the CLIP encoders stay in ``dtype``."""
    if mode == "none":
        return encoders
    for name, encoder in encoders.items():
        if _is_t5(configs.text_encoders[name]):
            quantize_linears(encoder, mode, dtype, keep=_kept_modules(encoder))
    return encoders


def _disable_lora_input_cast(denoiser, mixed_precision: str):
    """peft's bitsandbytes LoRA layers cast the input to the LoRA's fp32 only outside autocast; under the run's
    mixed precision they leave it in the half dtype (the generic LoRA layer the stand-ins get would cast it)."""
    if mixed_precision not in HALF_DTYPES:
        return
    from peft.tuners.lora import LoraLayer

    for module in denoiser.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), QuantizedLinear):
            module.cast_input_dtype_enabled = False


class _Optimizer:
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
class _Models:
    family: str
    denoiser: torch.nn.Module
    vae: Optional[torch.nn.Module]
    text_encoders: Dict[str, torch.nn.Module]
    lora_params: List[torch.nn.Parameter]
    optimizer: _Optimizer
    weight_dtype: torch.dtype
    vae_dtype: torch.dtype


def _build_training_models(
    configs: BaseModelConfigs, settings: TrainingMemorySettings, need_encoders: bool, fake_mode=None
) -> _Models:
    """The run's models; with ``fake_mode``, built on the meta device and turned into fake CPU tensors."""
    weight_dtype = HALF_DTYPES.get(settings.mixed_precision, torch.float32)
    # train_duo_sd3.py keeps its VAE in fp32 (SD3's latents are sensitive); so do the SDXL (its VAE overflows in
    # fp16) and FLUX runs.
    vae_dtype = torch.float32 if configs.family in ("sdxl", "sd3", "flux") else weight_dtype
    quantize = settings.quantize_base
    with torch.device("meta") if fake_mode is not None else contextlib.nullcontext():
        if quantize == "none":
            denoiser = build_denoiser(configs, weight_dtype)
        else:
            denoiser = build_quantized_denoiser(configs, weight_dtype, quantize)
        if settings.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing(_checkpointing_under_autocast(settings.mixed_precision))
        add_adapter(denoiser, settings, configs.family)
        if quantize != "none":
            _disable_lora_input_cast(denoiser, settings.mixed_precision)
        vae = build_vae(configs, vae_dtype) if need_encoders else None
        text_encoders = build_text_encoders(configs, weight_dtype) if need_encoders else {}
        quantize_text_encoders(configs, text_encoders, quantize, weight_dtype)
    if fake_mode is not None:
        for module in (denoiser, vae, *text_encoders.values()):
            if module is not None:
                to_fake(module, fake_mode)
    lora_params = [p for p in denoiser.parameters() if p.requires_grad]
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        optimizer = _Optimizer(lora_params, settings.use_8bit_adam)
    return _Models(configs.family, denoiser, vae, text_encoders, lora_params, optimizer, weight_dtype, vae_dtype)


def _checkpointing_under_autocast(mixed_precision: str):
    """diffusers' checkpointing function (non-reentrant), its recomputation under ``CudaAutocast``: the real
    checkpoint restores the forward's autocast state for it, which a function mode does not get."""
    from torch.utils.checkpoint import checkpoint

    def gradient_checkpointing_func(module, *args):
        def run(*inputs):
            with _autocast(mixed_precision):
                return module(*inputs)

        return checkpoint(run, *args, use_reentrant=False)

    return gradient_checkpointing_func


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


def clip_length(configs: BaseModelConfigs) -> int:
    """CLIP tokens per prompt: 77 (the tokenizers pad to the position table; tiny test models have fewer)."""
    return min(77, configs.text_encoders.get("text_encoder", {}).get("max_position_embeddings", 77))


def _is_t5(config: dict) -> bool:
    return config.get("model_type") == "t5" or (config.get("architectures") or [""])[0].startswith("T5")


def _uses_cfg(family: str) -> bool:
    """FLUX.1's pipelines sample without classifier-free guidance (dev has the guidance distilled into its
    guidance embedding, schnell none): their batch is not doubled."""
    return family != "flux"


def _encode_prompt(configs: BaseModelConfigs, name: str, encoder, batch: int, t5_tokens: int):
    """One text encoder's call on ``batch`` prompts, as the family's pipeline calls it: CLIP at 77 tokens, T5 at
    ``t5_tokens``; SD3 and SDXL take CLIP's penultimate hidden states (all hidden states are returned), FLUX takes
    CLIP's pooled output and T5's last layer."""
    config = configs.text_encoders[name]
    clip_tokens = min(clip_length(configs), config.get("max_position_embeddings", 77))
    ids = torch.zeros(batch, t5_tokens if _is_t5(config) else clip_tokens, dtype=torch.long)
    return encoder(ids, output_hidden_states=configs.family in ("sd3", "sdxl"))


def _denoiser_config(configs: BaseModelConfigs, models=None) -> dict:
    """The denoiser's config with the class defaults filled in (the built model's), else the file's."""
    return dict(models.denoiser.config) if models is not None else configs.denoiser


def sdxl_pooled_dim(unet_config: dict) -> int:
    """The pooled text embedding SDXL's UNet takes: its added-condition input less the time ids' embeddings
    (2816 − 6·256 = 1280, CLIP-G's projection)."""
    return (
        unet_config["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * unet_config["addition_time_embed_dim"]
    )


def _condition_shapes(configs: BaseModelConfigs, t5_tokens: int, batch: int, models=None):
    """(prompt embeddings shape, pooled shape or None) the denoiser is conditioned on. SD3 concatenates the CLIP
    and T5 tokens; FLUX's tokens are T5's alone (CLIP-L gives only the pooled vector)."""
    config = _denoiser_config(configs, models)
    if configs.family == "sd":
        return (batch, clip_length(configs), config["cross_attention_dim"]), None
    if configs.family == "sdxl":
        return (batch, clip_length(configs), config["cross_attention_dim"]), (batch, sdxl_pooled_dim(config))
    tokens = t5_tokens if configs.family == "flux" else clip_length(configs) + t5_tokens
    return (batch, tokens, config["joint_attention_dim"]), (batch, config["pooled_projection_dim"])


def _latent_shape(configs: BaseModelConfigs, resolution: int, batch: int):
    size = resolution // vae_scale_factor(configs.vae)
    channels = configs.vae.get("latent_channels", 4)
    return (batch, channels, size, size)


def _denoiser_input_shape(configs: BaseModelConfigs, resolution: int, batch: int):
    """The latents as the denoiser takes them: FLUX packs 2×2 patches into tokens, (B, (h/2)·(w/2), 4·C)."""
    batch, channels, size, _ = _latent_shape(configs, resolution, batch)
    if configs.family != "flux":
        return (batch, channels, size, size)
    return (batch, (size // 2) ** 2, 4 * channels)


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """``FluxPipeline._pack_latents``: (B, C, h, w) -> (B, (h/2)·(w/2), 4·C), a copy."""
    batch, channels, height, width = latents.shape
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch, (height // 2) * (width // 2), channels * 4)


def _unpack(latents: torch.Tensor, size: int) -> torch.Tensor:
    """``FluxPipeline._unpack_latents``: the inverse of ``_pack`` for a square latent of ``size``, a copy."""
    batch, _, packed_channels = latents.shape
    channels = packed_channels // 4
    latents = latents.view(batch, size // 2, size // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels, size, size)


FLUX_GUIDANCE_SCALE = 3.5  # FLUX.1-dev's guidance embedding input (diffusers' FLUX scripts' default)


def _extra_inputs(configs: BaseModelConfigs, models, resolution: int, batch: int, t5_tokens: int, dtype) -> dict:
    """The denoiser's inputs beyond latents, timesteps and prompt embeddings: SDXL's time ids (original size,
    crop, target size); FLUX's position ids of the image and text tokens and, for a guidance-distilled model
    ([dev]), the fp32 guidance vector."""
    if configs.family == "sdxl":
        return {"time_ids": torch.randn(batch, SDXL_TIME_IDS, dtype=dtype)}
    if configs.family != "flux":
        return {}
    size = resolution // vae_scale_factor(configs.vae)
    extra = {
        "img_ids": torch.zeros((size // 2) ** 2, 3, dtype=dtype),
        "txt_ids": torch.zeros(t5_tokens, 3, dtype=dtype),
    }
    if _denoiser_config(configs, models).get("guidance_embeds"):
        extra["guidance"] = torch.full((batch,), FLUX_GUIDANCE_SCALE)
    return extra


def _denoise(models: _Models, model_input, timesteps, condition, pooled, extra: Optional[dict] = None):
    extra = extra or {}
    if models.family == "sd":
        return models.denoiser(model_input, timesteps, condition).sample
    if models.family == "sdxl":
        added = {"text_embeds": pooled, "time_ids": extra["time_ids"]}
        return models.denoiser(model_input, timesteps, condition, added_cond_kwargs=added).sample
    return models.denoiser(
        hidden_states=model_input,
        timestep=timesteps,
        encoder_hidden_states=condition,
        pooled_projections=pooled,
        return_dict=False,
        **extra,
    )[0]


def _encode_prompts_every_step(
    configs: BaseModelConfigs, models: _Models, settings: TrainingMemorySettings, num_pairs: int
):
    """The official step's text encoding of the empty prompt (no grad)."""
    return [
        _encode_prompt(configs, name, encoder, num_pairs, settings.max_sequence_length)
        for name, encoder in models.text_encoders.items()
    ]


def run_training_step(
    configs: BaseModelConfigs, models: _Models, settings: TrainingMemorySettings, set_phase: Callable[[str], None]
):
    """One optimizer step of DUO (one micro-step), as the training scripts run it on the accelerator.

    ``set_phase`` is told "activations" before each forward and "temporaries" before the backward.
    """
    from . import lora, objective

    num_pairs = settings.train_batch_size
    weight_dtype = models.weight_dtype
    family = configs.family
    set_phase("activations")
    if settings.recipe == "official":
        with torch.no_grad():
            pixels = torch.randn(2 * num_pairs, 3, settings.resolution, settings.resolution, dtype=models.vae_dtype)
            latents = models.vae.encode(pixels).latent_dist.sample().float()
            del pixels
            encoded = _encode_prompts_every_step(configs, models, settings, num_pairs)
            del encoded
    else:
        latents = torch.randn(_latent_shape(configs, settings.resolution, 2 * num_pairs))
    # make_duo_batch: [x⁻_t; x⁺_t; x_T], the conditioning of 3·B samples, fp32 targets of the 2·B pair images.
    model_input = torch.cat([latents, torch.randn(_latent_shape(configs, settings.resolution, num_pairs))])
    if family == "flux":
        model_input = _pack(model_input)
    model_input = model_input.to(weight_dtype)
    target = torch.randn_like(latents)
    latent_size = latents.shape[-1]
    del latents
    timesteps = torch.ones(3 * num_pairs, dtype=torch.long if family in ("sd", "sdxl") else torch.float32)
    condition_shape, pooled_shape = _condition_shapes(configs, settings.max_sequence_length, 3 * num_pairs, models)
    condition = torch.randn(condition_shape, dtype=weight_dtype)
    pooled = torch.randn(pooled_shape, dtype=weight_dtype) if pooled_shape else None
    extra = _extra_inputs(
        configs, models, settings.resolution, 3 * num_pairs, settings.max_sequence_length, weight_dtype
    )

    autocast = _autocast(settings.mixed_precision)
    with torch.no_grad(), autocast, lora.adapters_disabled(models.denoiser):
        ref_prediction = _denoise(models, model_input, timesteps, condition, pooled, extra)
    set_phase("activations")  # the adapted forward: the same modules called a second time
    with autocast:
        model_prediction = _denoise(models, model_input, timesteps, condition, pooled, extra)
    model_prediction = model_prediction.float()  # accelerate's convert_outputs_to_fp32
    if family == "flux":  # the loss compares latents in the VAE's layout, as diffusers' FLUX scripts do
        ref_prediction = _unpack(ref_prediction, latent_size)
        model_prediction = _unpack(model_prediction, latent_size)
        model_input = _unpack(model_input, latent_size)
    if family in ("sd3", "flux"):
        sigmas = torch.rand(3 * num_pairs)
        ref_prediction = objective.precondition_flow_matching_output(
            ref_prediction.float(), model_input.float(), sigmas
        )
        model_prediction = objective.precondition_flow_matching_output(model_prediction, model_input.float(), sigmas)
    losses = objective.duo_losses(model_prediction, ref_prediction, target, 500.0, 1.0)
    loss = losses.loss * 2.0**16 if settings.mixed_precision == "fp16" else losses.loss  # GradScaler
    del model_prediction, ref_prediction, losses
    set_phase("temporaries")
    loss.backward()
    del loss
    torch.nn.utils.clip_grad_norm_(models.lora_params, 1.0, foreach=True)
    models.optimizer.step()
    models.optimizer.zero_grad()


def _validation_t5_tokens(configs: BaseModelConfigs, settings: TrainingMemorySettings) -> int:
    """T5 tokens of the validation prompts: FLUX's run encodes them once at its --max_sequence_length; SD3's
    estimate keeps the pipeline's 256 (an upper bound of its script's --max_sequence_length, 77 by default)."""
    return settings.max_sequence_length if configs.family == "flux" else INFERENCE_T5_TOKENS.get(configs.family, 0)


def run_validation(
    configs: BaseModelConfigs, models: _Models, settings: TrainingMemorySettings, set_phase: Callable[[str], None]
):
    """The in-training validation: VAE (and SD1/2's text encoder) back on the GPU, over
    ``num_validation_images`` (CFG doubles the denoiser's batch, except FLUX's), one denoiser call and the VAE
    decode, all without grad."""
    batch = settings.num_validation_images
    set_phase("temporaries")
    with torch.no_grad(), _autocast(settings.mixed_precision):
        if configs.family == "sd":
            models.text_encoders["text_encoder"](torch.zeros(2 * batch, clip_length(configs), dtype=torch.long))
        _run_denoiser_and_vae(
            configs,
            models,
            settings.resolution,
            batch,
            models.weight_dtype,
            encode=False,
            t5_tokens=_validation_t5_tokens(configs, settings),
        )


def _run_denoiser_and_vae(
    configs, models: _Models, resolution: int, batch: int, dtype, encode: bool, t5_tokens: int, before_vae=None
):
    """One sampling step of ``batch`` images (CFG doubles the denoiser's batch, except FLUX's), ``before_vae()``,
    then the VAE decode of ``batch`` latents (FLUX's unpacked first) and, with ``encode``, img2img's VAE encoding
    of ``batch`` images."""
    rows = 2 * batch if _uses_cfg(configs.family) else batch
    latents = torch.randn(_denoiser_input_shape(configs, resolution, rows), dtype=dtype)
    condition_shape, pooled_shape = _condition_shapes(configs, t5_tokens, rows, models)
    condition = torch.randn(condition_shape, dtype=dtype)
    pooled = torch.randn(pooled_shape, dtype=dtype) if pooled_shape else None
    extra = _extra_inputs(configs, models, resolution, rows, t5_tokens, dtype)
    prediction = _denoise(models, latents, torch.ones(rows), condition, pooled, extra)
    del prediction, condition, pooled, extra
    if before_vae is not None:
        before_vae()
    latents = latents[:batch]
    if configs.family == "flux":
        latents = _unpack(latents, resolution // vae_scale_factor(configs.vae))
    latents = latents.to(models.vae_dtype)
    models.vae.decode(latents).sample
    if encode:
        pixels = torch.randn(batch, 3, resolution, resolution, dtype=models.vae_dtype)
        models.vae.encode(pixels).latent_dist.sample()


def vae_needs_upcast(configs: BaseModelConfigs, dtype: torch.dtype) -> bool:
    """SDXL's pipelines run an fp16 VAE whose config says ``force_upcast`` (SDXL-base's does: it overflows in fp16)
    in fp32 for the decode and img2img's encode; an fp16-safe VAE (madebyollin/sdxl-vae-fp16-fix, ``force_upcast:
    false``) stays in fp16. SD3's and FLUX's pipelines never upcast."""
    return configs.family == "sdxl" and dtype == torch.float16 and configs.vae.get("force_upcast", True)


def _cast_module(module: torch.nn.Module, dtype: torch.dtype):
    """``module.to(dtype)`` for fake tensors (which refuse ``module.to``'s swap): new floating parameters and
    buffers in place; the old ones are freed with their last reference."""
    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is not None and param.is_floating_point():
                submodule._parameters[name] = torch.nn.Parameter(param.data.to(dtype), requires_grad=False)
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None and buffer.is_floating_point():
                submodule._buffers[name] = buffer.to(dtype)


def _register_resident(
    tracker: AllocationTracker, models: _Models, settings: TrainingMemorySettings, with_encoders: bool
):
    lora = {id(p) for p in models.lora_params}
    modules = [models.denoiser] + ([models.vae, *models.text_encoders.values()] if with_encoders else [])
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in lora:
                tracker.register(tensor, "weights")
    for tensor in models.lora_params + models.optimizer.state:
        tracker.register(tensor, "lora_and_optimizer")


def _fake_mode():
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


RUN_PHASES = ("prompt encoding", "training step", "validation")


def estimate_training(
    configs: BaseModelConfigs, settings: TrainingMemorySettings, fake: bool = True, rounding: int = ALLOCATOR_ROUNDING
) -> Dict[str, MemoryEstimate]:
    """Peaks of one training step, of the in-training validation (``settings.validation``) and, for a quantized
    base (``settings.quantize_base``), of the prompt encoding at start-up; the ``"run"`` entry is the largest. With
    ``settings.num_processes`` > 1 the step and the validation are one GPU's (``shard_estimate``). With
    ``fake=False`` the same accounting runs on real CPU tensors."""
    _quiet()
    start = time.perf_counter()
    official = settings.recipe == "official"
    with_encoders = official or settings.encoders_resident
    results = {}
    fake_mode = _fake_mode() if fake else None
    # A quantized denoiser is loaded onto the GPU (device_map) before the prompts are encoded; a full-precision one
    # waits on the CPU until the encoders are gone.
    encoding_phase = settings.quantize_base != "none" and not with_encoders
    need_encoders = with_encoders or settings.validation or encoding_phase
    models = _build_training_models(configs, settings, need_encoders, fake_mode)
    with fake_mode if fake else contextlib.nullcontext():
        if encoding_phase:
            results["prompt encoding"] = _estimate_prompt_encoding(configs, models, settings, rounding, start)
        if settings.validation and not with_encoders:
            # SDXL, SD3 and FLUX delete their text encoders after encoding the prompts once; SD1/2 keeps its
            # text encoder on the CPU and brings it back.
            models_for_validation = ["vae"] + (["text_encoder"] if configs.family == "sd" else [])
        else:
            models_for_validation = []
        tracker = AllocationTracker(rounding)
        _register_resident(tracker, models, settings, with_encoders)
        for param in models.lora_params:
            param.register_post_accumulate_grad_hook(lambda p: tracker.register(p.grad, "gradients"))

        def set_phase(name):
            tracker.category = name

        with tracker:
            run_training_step(configs, models, settings, set_phase)
        results["training step"] = MemoryEstimate(
            tracker.peak, dict(tracker.peak_breakdown), "training step", time.perf_counter() - start
        )
        if settings.validation:
            for name in models_for_validation:
                module = models.vae if name == "vae" else models.text_encoders[name]
                for tensor in list(module.parameters()) + list(module.buffers()):
                    tracker.register(tensor, "weights")
            tracker.reset_peak()
            with tracker:
                run_validation(configs, models, settings, set_phase)
            results["validation"] = MemoryEstimate(
                tracker.peak, dict(tracker.peak_breakdown), "validation", time.perf_counter() - start
            )
    layout = sharding_layout(models, configs.family, rounding)
    for phase in ("training step", "validation"):
        if phase in results:
            results[phase] = shard_estimate(
                replace(results[phase], layout=layout), settings.num_processes, settings.sharding
            )
    run = max((results[phase] for phase in RUN_PHASES if phase in results), key=lambda e: e.peak_bytes)
    results["run"] = replace(run, seconds=time.perf_counter() - start)
    return results


def _estimate_prompt_encoding(configs, models: _Models, settings: TrainingMemorySettings, rounding: int, start):
    """The start-up encoding of a quantized run: the quantized denoiser already on the GPU (no adapter yet), the text
    encoders (T5 quantized) encoding ``PROMPT_ENCODING_BATCH`` prompts at a time without grad. Not sharded: each
    process loads the quantized denoiser whole before accelerate prepares it."""
    tracker = AllocationTracker(rounding)
    lora = {id(p) for p in models.lora_params}
    for module in (models.denoiser, *models.text_encoders.values()):
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in lora:
                tracker.register(tensor, "weights")
    tracker.category = "activations"
    with tracker, torch.no_grad():
        for name, encoder in models.text_encoders.items():
            output = _encode_prompt(configs, name, encoder, PROMPT_ENCODING_BATCH, settings.max_sequence_length)
            del output
    return MemoryEstimate(tracker.peak, dict(tracker.peak_breakdown), "prompt encoding", time.perf_counter() - start)


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


def sharding_layout(models: _Models, family: str, rounding: int = ALLOCATOR_ROUNDING) -> ShardingLayout:
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


def estimate_inference(
    configs: BaseModelConfigs,
    resolution: int,
    batch_size: int,
    dtype: str = "fp16",
    encode: bool = True,
    rounding: int = ALLOCATOR_ROUNDING,
) -> MemoryEstimate:
    """Peak of generating ``batch_size`` images with CFG (FLUX: without), the whole pipeline resident in ``dtype``
    (pair generation: text-to-image, then img2img, which also VAE-encodes; evaluation: text-to-image). T5 encodes
    the pipeline's default ``max_sequence_length`` (SD3: 256, FLUX: 512); an SDXL VAE that needs it is upcast to
    fp32 for the decode and the encode, as the SDXL pipelines do (``vae_needs_upcast``)."""
    _quiet()
    start = time.perf_counter()
    weight_dtype = HALF_DTYPES.get(dtype, torch.float32)
    fake_mode = _fake_mode()
    with torch.device("meta"):
        modules = [
            build_denoiser(configs, weight_dtype),
            build_vae(configs, weight_dtype),
            build_text_encoders(configs, weight_dtype),
        ]
    for module in (modules[0], modules[1], *modules[2].values()):
        to_fake(module, fake_mode)
    models = _Models(configs.family, modules[0], modules[1], modules[2], [], None, weight_dtype, weight_dtype)
    with fake_mode:
        tracker = AllocationTracker(rounding)
        for module in (models.denoiser, models.vae, *models.text_encoders.values()):
            for tensor in list(module.parameters()) + list(module.buffers()):
                tracker.register(tensor, "weights")
        tracker.category = "activations"
        t5_tokens = INFERENCE_T5_TOKENS.get(configs.family, 0)
        prompts = 2 * batch_size if _uses_cfg(configs.family) else batch_size
        with tracker, torch.no_grad():
            for name, encoder in models.text_encoders.items():
                _encode_prompt(configs, name, encoder, prompts, t5_tokens)

            def upcast_vae():  # StableDiffusionXLPipeline.upcast_vae: the VAE's weights become fp32
                if vae_needs_upcast(configs, weight_dtype):
                    tracker.category = "weights"
                    _cast_module(models.vae, torch.float32)
                    models.vae_dtype = torch.float32
                    tracker.category = "activations"

            _run_denoiser_and_vae(
                configs, models, resolution, batch_size, weight_dtype, encode, t5_tokens, before_vae=upcast_vae
            )
    return MemoryEstimate(tracker.peak, dict(tracker.peak_breakdown), "generation", time.perf_counter() - start)


def _total_mem_tracker():
    from torch.distributed._tools.mem_tracker import MemTracker

    class TotalMemTracker(MemTracker):
        """MemTracker's tensor accounting without its per-module statistics, which support neither a
        module called twice in a step (reference and adapted forward) nor frozen parameters (it hooks
        every parameter's gradient). The totals and their peak come from its dispatch mode alone."""

        def _pre_fw_hook(self, module, inputs):
            pass

        def _post_fw_hook(self, module, inputs, outputs):
            pass

        def _pre_bw_hook(self, module, args):
            pass

        def _post_bw_hook(self, module, args):
            pass

    return TotalMemTracker()


def measure_training_step(configs: BaseModelConfigs, settings: TrainingMemorySettings) -> int:
    """The same step on real CPU tensors, measured by PyTorch's own ``MemTracker`` (the independent
    check of the estimate): its peak bytes, weights and optimizer state included."""
    _quiet()
    official = settings.recipe == "official"
    models = _build_training_models(configs, settings, need_encoders=official or settings.encoders_resident)
    tracker = _total_mem_tracker()
    resident = [models.denoiser] + (
        [models.vae, *models.text_encoders.values()] if official or settings.encoders_resident else []
    )
    tracker.track_external(*resident, *models.lora_params, *models.optimizer.state)
    with tracker:
        run_training_step(configs, models, settings, lambda name: None)
    return max(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())


# --------------------------------------------------------------------------------------------------
# For users: the training scripts' start-up check, and python -m duo_plugin.memory
# --------------------------------------------------------------------------------------------------


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
        from .families.flux import DEFAULT_MAX_SEQUENCE_LENGTH

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
        f", per GPU of {settings.num_processes} ({_sharding_name(settings.sharding)})"
        if settings.num_processes > 1
        else ""
    )
    raise UsageError(
        f"estimated peak GPU memory {estimate.peak_bytes / GiB:.1f} GiB ({estimate.phase}{per_process}; +{FRAGMENTATION_MARGIN:.0%} allocator margin) "
        f"exceeds the {free_bytes / GiB:.1f} GiB free on GPU {device}: {advice} (or --skip_memory_check to try anyway)"
    )


def _sharding_name(sharding: str) -> str:
    return {"none": "DDP", "fsdp": "FSDP", "zero2": "DeepSpeed ZeRO-2"}.get(sharding, sharding)


def _format_row(label: str, estimate: MemoryEstimate) -> str:
    card = estimate.smallest_card_gb()
    parts = ", ".join(
        f"{name.replace('_', ' ')} {value / GiB:.2f}" for name, value in estimate.breakdown.items() if value
    )
    return f"{label:48s} {estimate.peak_bytes / GiB:7.2f} GiB   {(str(card) + ' GB') if card else '> 80 GB':>8s}   ({parts})"


def parse_args(argv=None):
    from . import arguments

    parser = argparse.ArgumentParser(
        description="Estimated peak GPU memory of a DUO run (training step, validation, pair generation, evaluation) "
        "from the base model's config files only: no GPU, no weights. Takes the training scripts' flags."
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
    from . import input_checks

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


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    check_args(args)
    configs = load_base_model_configs(
        args.pretrained_model_name_or_path, args.revision, args.cache_dir, args.pretrained_vae_model_name_or_path
    )
    family = configs.family
    if args.max_sequence_length is None:
        args.max_sequence_length = default_max_sequence_length(family)
    if args.resolution is None:
        args.resolution = 1024 if family in ("sd3", "flux") else 8 * configs.denoiser.get("sample_size", 64)
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
        use_8bit_adam=True,
        mixed_precision=settings.mixed_precision if settings.mixed_precision != "no" else "bf16",
    )
    print(
        f"{args.pretrained_model_name_or_path} ({TRAINING_SCRIPT[family]}), {args.resolution} px, "
        f"{settings.train_batch_size} pair(s) per micro-step, mixed precision {settings.mixed_precision}, LoRA rank {settings.rank}"
        + (f", base quantized to {settings.quantize_base}" if settings.quantize_base != "none" else "")
    )
    if settings.num_processes > 1:
        print(
            f"training rows: one GPU of {settings.num_processes} ({_sharding_name(settings.sharding)}); "
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


if __name__ == "__main__":
    main()
