"""Refusing a multi-process launch that accelerate would silently run as N independent single runs."""

import os

import torch

from .errors import UsageError


def cpu_only_multi_process() -> bool:
    """True when a multi-process launch found no accelerator.

    accelerate sets up MULTI_CPU only when asked to use the CPU; without that, each of N processes would
    train alone and all of them would write the outputs. Scripts pass this as ``Accelerator(cpu=...)``.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    return launched and not (hasattr(torch, "accelerator") and torch.accelerator.is_available())


def check_distributed_setup(accelerator):
    """Refuse N independent single-process runs pretending to be one distributed run."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise UsageError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes}: "
            f"check `accelerate config` (use --cpu for CPU-only multi-process runs)"
        )
