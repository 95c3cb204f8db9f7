"""--quantize_base: bitsandbytes' quantized linear layers, re-created for fake tensors.

A quantized base (``--quantize_base nf4|int8``, duo_plugin/families/quantization.py): bitsandbytes cannot run on
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
"""

import math
from typing import Dict, List

import torch

from .accounting import HALF_DTYPES, booked_as_temporaries
from .configs import BaseModelConfigs, is_t5
from .models import build_denoiser


NF4_BLOCKSIZE = 64  # bitsandbytes' Params4bit default: one fp32 absmax per 64 weights (no double quantization)
NF4_CODE_VALUES = 16  # the NF4 code book each quantized weight's QuantState holds (16 fp32 values)


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
        with booked_as_temporaries():
            weight = torch.empty(weight_shape, dtype=x.dtype, device=x.device)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        with booked_as_temporaries():
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
        with booked_as_temporaries():
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
        with booked_as_temporaries():
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
        if is_t5(configs.text_encoders[name]):
            quantize_linears(encoder, mode, dtype, keep=_kept_modules(encoder))
    return encoders


def disable_lora_input_cast(denoiser, mixed_precision: str):
    """peft's bitsandbytes LoRA layers cast the input to the LoRA's fp32 only outside autocast; under the run's
    mixed precision they leave it in the half dtype (the generic LoRA layer the stand-ins get would cast it)."""
    if mixed_precision not in HALF_DTYPES:
        return
    from peft.tuners.lora import LoraLayer

    for module in denoiser.modules():
        if isinstance(module, LoraLayer) and isinstance(module.get_base_layer(), QuantizedLinear):
            module.cast_input_dtype_enabled = False
