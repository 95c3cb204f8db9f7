"""One DUO micro-step, the same for every model family.

batch → the denoiser over [x⁻_t; x⁺_t; x_T (; retain)] without the adapter (the reference) and with it → loss →
backward → clip → optimizer. A family supplies only a ``FamilyStep``: how to draw its noisy batch and how to run its
denoiser on it (``duo_plugin.families.sd`` for SD 1.x/2.x and SDXL, ``duo_plugin.families.sd3``, ``duo_plugin.families.flux``). Every training
script, the benchmarks and the official-equivalence test call ``duo_micro_step``, so a change to the step is a change
to all of them.
"""

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from . import objective
from .errors import TrainingHalted
from .lora import adapters_disabled


@dataclass(frozen=True)
class FamilyStep:
    """What a family contributes to the step.

    ``make_batch(pair_indices, generator)`` draws the batch (every random draw from ``generator``, so resuming is
    exact); ``predict(model, batch, device, dtype)`` returns the denoiser's output in the space of ``batch.target``.
    """

    make_batch: Callable
    predict: Callable


@dataclass(frozen=True)
class StepSettings:
    """The objective's and the optimizer's numbers for one run; fixed once the flags are resolved."""

    beta_dpo: float
    preservation_weight: float
    weight_dtype: torch.dtype = torch.float32
    max_grad_norm: float = 1.0
    variant: objective.VariantSettings = field(default_factory=objective.VariantSettings)


@dataclass
class Optimization:
    """What a micro-step updates: the prepared denoiser with its LoRA parameters, optimizer and LR schedule."""

    accelerator: object
    denoiser: torch.nn.Module
    optimizer: object
    lr_scheduler: object
    lora_params: list


@dataclass
class MicroStepResult:
    batch: object
    losses: objective.DUOLosses
    grad_norm: Optional[torch.Tensor]  # the pre-clip norm, on the micro-step that synchronises gradients


def check_finite(accelerator, loss: torch.Tensor, step: int, last_checkpoint: Optional[str]):
    """Stop on a NaN/inf loss on any process, before it reaches the weights."""
    bad = torch.tensor([0.0 if torch.isfinite(loss.detach()).all() else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    if bad.item() > 0:
        kept = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint was saved yet"
        raise TrainingHalted(
            f"loss became non-finite at step {step}; {kept}. Lower --learning_rate, --beta_dpo or --preservation_weight (λ) "
            f"(or use bf16 instead of fp16) and resume with --resume_from_checkpoint latest"
        )


def duo_losses(accelerator, denoiser, predict: Callable, batch, settings: StepSettings) -> objective.DUOLosses:
    """The reference forward (adapter off, unwrapped model, no grad), the adapted forward, and the DUO losses."""
    model = accelerator.unwrap_model(denoiser)
    device = accelerator.device
    with torch.no_grad(), accelerator.autocast(), adapters_disabled(model):
        ref_prediction = predict(model, batch, device, settings.weight_dtype)
    with accelerator.autocast():
        model_prediction = predict(denoiser, batch, device, settings.weight_dtype)
    weighting = getattr(batch, "weighting", None)
    return objective.concept_losses(
        model_prediction,
        ref_prediction,
        batch.target.to(device),
        batch.layout,
        settings.beta_dpo,
        settings.preservation_weight,
        weighting=weighting.to(device) if weighting is not None else None,
        **settings.variant.loss_kwargs(),
    )


def duo_micro_step(
    optimization: Optimization,
    family_step: FamilyStep,
    settings: StepSettings,
    pair_indices: torch.Tensor,
    generator: torch.Generator,
    global_step: int,
    last_checkpoint: Optional[str] = None,
) -> MicroStepResult:
    """One micro-step of gradient accumulation; the optimizer steps when accelerate synchronises gradients.

    ``global_step`` and ``last_checkpoint`` only name the step and the checkpoint to resume from when the loss is
    not finite."""
    accelerator, denoiser = optimization.accelerator, optimization.denoiser
    with accelerator.accumulate(denoiser):
        batch = family_step.make_batch(pair_indices, generator)
        losses = duo_losses(accelerator, denoiser, family_step.predict, batch, settings)
        check_finite(accelerator, losses.loss, global_step, last_checkpoint)
        accelerator.backward(losses.loss)
        grad_norm = None
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(optimization.lora_params, settings.max_grad_norm)
        optimization.optimizer.step()
        optimization.lr_scheduler.step()
        optimization.optimizer.zero_grad(set_to_none=True)
    return MicroStepResult(batch, losses, grad_norm)
