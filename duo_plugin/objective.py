"""The DUO objective: a Diffusion-DPO preference loss plus output preservation.

Every training step of both training scripts runs the adapted model and the reference model (the same
network with the LoRA adapter disabled) over one concatenated batch ``[x⁻_t; x⁺_t; x_T]`` of ``3·B``
samples, where the first ``B`` are the noised unsafe latents, the next ``B`` their safe twins (noised
with the *same* noise and timestep) and the last ``B`` pure noise for the preservation term.

The functions here are pure tensor math so that they can be checked against closed forms:

* ``per_sample_error``: e(x) = mean over all non-batch dims of (target − prediction)².
* ``preference_loss``: L_DUO = −log σ(−β (Δ⁺ − Δ⁻)) with Δ = e_θ − e_ref, averaged over pairs.
* ``preservation_loss``: L_pres = mean (prediction_θ − prediction_ref)² on pure noise.
* ``duo_losses``: splits the concatenated batch and combines the above into L = L_DUO + λ·L_pres.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F


@dataclass
class DUOLosses:
    """Everything one step logs. ``loss`` carries the graph; the rest are detached statistics."""

    loss: torch.Tensor
    preference_loss: torch.Tensor
    preservation_loss: torch.Tensor
    delta_safe: torch.Tensor
    delta_unsafe: torch.Tensor
    implicit_accuracy: torch.Tensor

    def to_log(self) -> dict:
        return {
            "loss": self.loss.detach().item(),
            "loss_duo": self.preference_loss.detach().item(),
            "loss_pres": self.preservation_loss.detach().item(),
            "delta_safe": self.delta_safe.mean().item(),
            "delta_unsafe": self.delta_unsafe.mean().item(),
            "implicit_acc": self.implicit_accuracy.item(),
        }


def _at_least_fp32(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor, weighting: Optional[torch.Tensor] = None):
    """Mean squared error per sample, in fp32 (fp16 squares of large errors overflow).

    ``weighting`` (broadcastable to the prediction, e.g. SD3's per-sample loss weight) multiplies the
    squared error before the mean.
    """
    squared = (_at_least_fp32(prediction) - _at_least_fp32(target)) ** 2
    if weighting is not None:
        squared = _at_least_fp32(weighting) * squared
    return squared.reshape(squared.shape[0], -1).mean(dim=1)


def preference_loss(
    model_error_unsafe: torch.Tensor,
    model_error_safe: torch.Tensor,
    ref_error_unsafe: torch.Tensor,
    ref_error_safe: torch.Tensor,
    beta: float,
):
    """Diffusion-DPO loss preferring the safe image of each pair.

    Δ⁺ = e_θ(x⁺) − e_ref(x⁺) and Δ⁻ = e_θ(x⁻) − e_ref(x⁻). The loss −log σ(−β(Δ⁺ − Δ⁻)) falls when the
    adapted model denoises the safe image better than the reference does (Δ⁺ < 0) and the unsafe one
    worse (Δ⁻ > 0). Returns ``(loss, delta_safe, delta_unsafe)``; the deltas are per pair.
    """
    delta_safe = model_error_safe - ref_error_safe
    delta_unsafe = model_error_unsafe - ref_error_unsafe
    loss = -F.logsigmoid(-beta * (delta_safe - delta_unsafe)).mean()
    return loss, delta_safe, delta_unsafe


def preservation_loss(model_prediction: torch.Tensor, ref_prediction: torch.Tensor) -> torch.Tensor:
    """Output preservation: keep the adapted prediction on pure noise equal to the base model's."""
    return ((_at_least_fp32(model_prediction) - _at_least_fp32(ref_prediction)) ** 2).mean()


def duo_losses(
    model_prediction: torch.Tensor,
    ref_prediction: torch.Tensor,
    target: torch.Tensor,
    beta: float,
    preservation_weight: float,
    weighting: Optional[torch.Tensor] = None,
) -> DUOLosses:
    """The full DUO objective over the concatenated batch ``[x⁻_t; x⁺_t; x_T]``.

    ``model_prediction`` and ``ref_prediction`` have 3·B samples; ``target`` (and ``weighting``, if
    given) cover the first 2·B (the pair images) — the preservation branch compares the two models
    with each other, not with a target.
    """
    num_pairs = model_prediction.shape[0] // 3
    if model_prediction.shape[0] != 3 * num_pairs or target.shape[0] != 2 * num_pairs:
        raise ValueError(
            f"expected predictions for [unsafe; safe; noise] (3·B samples) and targets for 2·B, got "
            f"{model_prediction.shape[0]} and {target.shape[0]}"
        )
    pair_weighting = weighting[: 2 * num_pairs] if weighting is not None else None
    model_error = per_sample_error(model_prediction[: 2 * num_pairs], target, pair_weighting)
    ref_error = per_sample_error(ref_prediction[: 2 * num_pairs], target, pair_weighting)
    loss_duo, delta_safe, delta_unsafe = preference_loss(
        model_error[:num_pairs], model_error[num_pairs:], ref_error[:num_pairs], ref_error[num_pairs:], beta
    )
    loss_pres = preservation_loss(model_prediction[2 * num_pairs :], ref_prediction[2 * num_pairs :])
    return DUOLosses(
        loss=loss_duo + preservation_weight * loss_pres,
        preference_loss=loss_duo.detach(),
        preservation_loss=loss_pres.detach(),
        delta_safe=delta_safe.detach(),
        delta_unsafe=delta_unsafe.detach(),
        implicit_accuracy=(delta_safe < delta_unsafe).float().mean().detach(),
    )


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor):
    """What a DDPM-family model is trained to predict, per the scheduler's ``prediction_type``."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}: DUO supports 'epsilon' and 'v_prediction'")


def sample_pair_timesteps(num_pairs: int, t_min: int, t_max: int, generator: torch.Generator, device=None):
    """One timestep per pair, uniform in [t_min, t_max); both images of a pair share it."""
    return torch.randint(t_min, t_max, (num_pairs,), generator=generator, device=generator.device).to(device)


# --------------------------------------------------------------------------------------------------
# Flow matching (Stable Diffusion 3)
#
# SD3 is trained on the straight path x_σ = (1 − σ)·x + σ·ε from data (σ = 0) to pure noise (σ = 1) and
# predicts the velocity ε − x. The DUO objective is unchanged; only the noising, the target and the
# timestep table differ. ``FlowMatchEulerDiscreteScheduler`` keeps its training table in *descending*
# order: index 0 is σ = 1 (timestep ``num_train_timesteps``), the last index the least noise. The
# ``--t_min/--t_max`` range of the official SD3 recipe indexes this table.
# --------------------------------------------------------------------------------------------------

FLOW_MATCHING_WEIGHTING_SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape one value per sample, (N,), to broadcast against a batch shaped like ``like``."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


def flow_matching_noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """x_σ = (1 − σ)·x + σ·ε, with one σ per sample. At σ = 1 this is the noise itself."""
    sigmas = _per_sample(sigmas, latents).to(latents.dtype)
    return (1.0 - sigmas) * latents + sigmas * noise


def flow_matching_target(latents: torch.Tensor, noise: torch.Tensor, precondition_outputs: bool) -> torch.Tensor:
    """What the (preconditioned) prediction is compared with: the velocity ε − x, or x itself.

    With preconditioning (EDM §5, diffusers' SD3 LoRA default and the official DUO SD3 run) the model
    output v̂ is turned into a clean-latent estimate x̂ = x_σ − σ·v̂ (``precondition_flow_matching_output``),
    so the squared error is σ²·‖(ε − x) − v̂‖²: the velocity error weighted by σ².
    """
    return latents if precondition_outputs else noise - latents


def precondition_flow_matching_output(
    model_output: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor
) -> torch.Tensor:
    """x̂ = x_σ − σ·v̂: the clean latent a velocity prediction implies."""
    return model_output * (-_per_sample(sigmas, model_output).to(model_output.dtype)) + noisy


def sample_flow_matching_indices(
    num_pairs: int,
    t_min: int,
    t_max: int,
    generator: torch.Generator,
    weighting_scheme: str = "none",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
) -> torch.Tensor:
    """One index per pair into the scheduler's (descending) sigma table, in [t_min, t_max).

    Uniform over the range, as the official SD3 recipe draws it, unless ``weighting_scheme`` is a
    sampling density (``logit_normal``, ``mode``): then u ∈ (0, 1) is drawn from diffusers'
    ``compute_density_for_timestep_sampling`` and mapped linearly onto the range,
    index = t_min + ⌊u·(t_max − t_min)⌋. With t_min = 0 and t_max = num_train_timesteps this is exactly
    diffusers' SD3 LoRA sampling. ``sigma_sqrt`` and ``cosmap`` sample uniformly and weight the loss.
    """
    if weighting_scheme not in FLOW_MATCHING_WEIGHTING_SCHEMES:
        raise ValueError(
            f"unknown weighting scheme {weighting_scheme!r}: choose one of {', '.join(FLOW_MATCHING_WEIGHTING_SCHEMES)}"
        )
    if weighting_scheme in ("logit_normal", "mode"):
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            weighting_scheme,
            num_pairs,
            logit_mean=logit_mean,
            logit_std=logit_std,
            mode_scale=mode_scale,
            generator=generator,
        )
        span = t_max - t_min
        return t_min + (u * span).long().clamp(0, span - 1)
    return sample_pair_timesteps(num_pairs, t_min, t_max, generator)


def flow_matching_sigmas_and_timesteps(scheduler, indices: torch.Tensor):
    """σ and the model's timestep (σ·num_train_timesteps, shifted as the scheduler shifts) for table indices.

    Reads the table a freshly built ``FlowMatchEulerDiscreteScheduler`` holds; do not pass one that
    ``set_timesteps`` has changed (a pipeline's), build a copy with ``from_config``.
    """
    if len(scheduler.sigmas) != scheduler.config.num_train_timesteps:
        raise ValueError(
            "the scheduler's table was changed by set_timesteps: use a fresh FlowMatchEulerDiscreteScheduler"
        )
    return scheduler.sigmas[indices].float(), scheduler.timesteps[indices].float()


def pure_noise_sigma_and_timestep(scheduler):
    """(σ, timestep) of the first sampling step, where the input is pure noise: σ = 1, t = num_train_timesteps.

    The output-preservation branch feeds pure noise, so it must be told σ = 1. (The official SD3 code
    reads the last entry of the descending table here, t ≈ 1 — the *final*, almost noise-free step —
    while feeding pure noise: an input the model never sees at that timestep.)
    """
    sigmas, timesteps = flow_matching_sigmas_and_timesteps(scheduler, torch.tensor([0]))
    if abs(sigmas.item() - 1.0) > 1e-6:
        raise ValueError(
            f"the scheduler's largest sigma is {sigmas.item()}, not 1: DUO needs a table that reaches pure noise"
        )
    return sigmas[0], timesteps[0]


def flow_matching_loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight of the scheme (diffusers' ``compute_loss_weighting_for_sd3``): σ⁻² for
    ``sigma_sqrt``, 2 / (π(1 − 2σ + 2σ²)) for ``cosmap``, 1 otherwise."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme, sigmas.float())
