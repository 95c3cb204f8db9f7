"""Precision names as the flags spell them (``--mixed_precision``, ``--dtype``) and the torch dtypes they mean."""

from typing import Optional

import torch


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def torch_dtype(name: Optional[str]) -> torch.dtype:
    """``fp16``/``bf16``/``fp32``; ``no`` or None (no mixed precision) is fp32."""
    return torch.float32 if name in (None, "no") else DTYPES[name]
