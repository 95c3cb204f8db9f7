"""Accounting: a dispatch mode that sees every storage, and CUDA's autocast re-created on the CPU."""

import contextlib
import math
import weakref
from typing import List

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


ALLOCATOR_ROUNDING = 512  # bytes: the CUDA caching allocator's block granularity
CATEGORIES = ("weights", "lora_and_optimizer", "activations", "gradients", "temporaries")
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


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
def booked_as_temporaries():
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


def mixed_precision_autocast(mixed_precision: str):
    return CudaAutocast(HALF_DTYPES[mixed_precision]) if mixed_precision in HALF_DTYPES else contextlib.nullcontext()
