"""A quantized base for the large families (``--quantize_base nf4|int8``), through diffusers' bitsandbytes config.

Only the frozen base is quantized: the denoiser as it loads, and T5 where the family has one. The LoRA weights stay
in fp32 (the run's mixed precision computes in bf16/fp16), and the reference pass, which is the same network with
the adapter switched off, runs on the very same quantized base, so the preference compares like with like. The
adapter is trained against the quantized base; it loads on the full-precision base as any LoRA does, and
``duo_config.json`` and the model card say which base it was trained against.
"""

from typing import Optional

import torch

from ..errors import UsageError


QUANTIZATION_MODES = ("none", "nf4", "int8")


def add_quantization_argument(parser):
    parser.add_argument(
        "--quantize_base",
        type=str,
        default="none",
        choices=list(QUANTIZATION_MODES),
        help="load the frozen denoiser (and T5) quantized by bitsandbytes: nf4 (4-bit NormalFloat, as diffusers' FLUX "
        "QLoRA recipe) or int8; the LoRA stays full precision. Needs a CUDA GPU",
    )


def denoiser_quantization_config(mode: str, compute_dtype: torch.dtype):
    """diffusers' ``BitsAndBytesConfig`` for the denoiser, or None for ``none``."""
    if mode == "none":
        return None
    from diffusers import BitsAndBytesConfig

    if mode == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype)
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UsageError(f"--quantize_base {mode}: choose one of {', '.join(QUANTIZATION_MODES)}")


def denoiser_load_kwargs(mode: str, compute_dtype: torch.dtype, device) -> dict:
    """``from_pretrained`` arguments loading the denoiser quantized onto this process's device (each process of a
    multi-GPU run quantizes onto its own card), or none for ``none``."""
    config = denoiser_quantization_config(mode, compute_dtype)
    if config is None:
        return {}
    return {"quantization_config": config, "device_map": {"": str(device)}}


def text_quantization_config(mode: str, compute_dtype: torch.dtype, components):
    """diffusers' ``PipelineQuantizationConfig`` quantizing ``components`` (e.g. T5) of a text pipeline, or None."""
    if mode == "none" or not components:
        return None
    from diffusers import PipelineQuantizationConfig

    if mode == "nf4":
        backend, kwargs = (
            "bitsandbytes_4bit",
            {
                "load_in_4bit": True,
                "bnb_4bit_quant_type": "nf4",
                "bnb_4bit_compute_dtype": compute_dtype,
            },
        )
    else:
        backend, kwargs = "bitsandbytes_8bit", {"load_in_8bit": True}
    return PipelineQuantizationConfig(
        quant_backend=backend, quant_kwargs=kwargs, components_to_quantize=list(components)
    )


def to_device(module, device, dtype=None):
    """``module.to(device[, dtype])``, except for a bitsandbytes-quantized module, which bitsandbytes placed on the GPU
    as it loaded and which may not be moved or cast."""
    if getattr(module, "is_quantized", False) or getattr(module, "is_loaded_in_4bit", False):
        return module
    return module.to(device, **({} if dtype is None else {"dtype": dtype}))


def load_quantized(load, mode: str):
    """``load()`` with one line instead of diffusers' error when bitsandbytes cannot quantize here."""
    try:
        return load()
    except RuntimeError as error:
        if mode != "none" and "GPU" in str(error):
            raise UsageError(
                f"--quantize_base {mode} needs a CUDA GPU: bitsandbytes quantizes the weights as they load; "
                f"leave --quantize_base out on this machine"
            ) from None
        raise


def quantization_record(mode: str) -> Optional[dict]:
    """What ``duo_config.json`` records: the adapter was trained against this base."""
    if mode == "none":
        return None
    return {
        "method": "bitsandbytes",
        "mode": mode,
        "quantized": "the frozen denoiser (and T5 where loaded); the LoRA weights trained in full precision",
        "note": "the adapter was trained against the quantized base; it loads on the full-precision base as any LoRA",
    }
