"""The run around the loop both training scripts show: accelerator, optimizer, the finite-loss guard."""

import logging
import os
from typing import List, Optional

import torch

from .arguments import check_environment_args
from .distributed import check_distributed_setup, cpu_only_multi_process
from .errors import TrainingHalted
from .precision import torch_dtype


def setup_logging(accelerator):
    import datasets
    import diffusers
    import transformers

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", datefmt="%m/%d/%Y %H:%M:%S", level=logging.INFO
    )
    if accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_warning()
        transformers.utils.logging.set_verbosity_warning()
        diffusers.utils.logging.set_verbosity_warning()
    else:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
        diffusers.utils.logging.set_verbosity_error()


def create_accelerator(args):
    """The Accelerator of a DUO run, after the checks that need to know the device and the process count."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed

    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        cpu=cpu_only_multi_process(),
    )
    check_distributed_setup(accelerator)
    check_environment_args(args, accelerator.device.type)
    setup_logging(accelerator)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
    return accelerator


def weight_dtype_for(accelerator) -> torch.dtype:
    """The dtype of the frozen weights: the mixed-precision dtype; the LoRA weights stay fp32."""
    return torch_dtype(accelerator.mixed_precision)


def make_optimizer(args, params):
    if args.use_8bit_adam:
        import bitsandbytes as bnb

        optimizer_class = bnb.optim.AdamW8bit
    else:
        optimizer_class = torch.optim.AdamW
    return optimizer_class(
        params,
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
    )


def check_finite(accelerator, loss: torch.Tensor, step: int, last_checkpoint: Optional[str]):
    """Stop on a NaN/inf loss on any process, before it reaches the weights."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        raise TrainingHalted(
            f"loss became non-finite at step {step}; {kept}. Lower --learning_rate or --beta_dpo "
            f"(or use bf16 instead of fp16) and resume with --resume_from_checkpoint latest"
        )


def tracker_config(args) -> dict:
    """The run's flags as tracker hyper-parameters: lists and None become strings, which every tracker accepts."""
    return {
        key: (str(value) if isinstance(value, (list, tuple)) or value is None else value)
        for key, value in vars(args).items()
    }


def average_logs(micro_step_logs: List[dict]) -> dict:
    """One optimizer step's values: the mean over its micro-steps."""
    return {key: sum(row[key] for row in micro_step_logs) / len(micro_step_logs) for key in micro_step_logs[0]}
