"""The DUO objective: a Diffusion-DPO preference loss plus output preservation.

Every training step of both training scripts runs the adapted model and the reference model (the same
network with the LoRA adapter disabled) over one concatenated batch ``[x⁻_t; x⁺_t; x_T]`` of ``3·B``
samples, where the first ``B`` are the noised unsafe latents, the next ``B`` their safe twins (noised
with the *same* noise and, unless ``--pair_timesteps independent``, the same timestep) and the last ``B``
pure noise for the preservation term.

The functions here are pure tensor math so that they can be checked against closed forms:

* ``per_sample_error``: e(x) = mean over all non-batch dims of (target − prediction)².
* ``preference_loss``: L_DUO = −log σ(−β (Δ⁺ − Δ⁻)) with Δ = e_θ − e_ref, averaged over pairs.
* ``preservation_loss``: L_pres = mean (prediction_θ − prediction_ref)² on pure noise.
* ``duo_losses``: splits the concatenated batch and combines the above into L = L_DUO + λ·L_pres.
* ``concept_losses``: the same with the concept-specific variant's pieces (issue 24): the preference under
  several conditions at once (the empty prompt, the pair's unsafe prompt, and the guided prediction
  ε_u + w(ε_c − ε_u) the sampler follows), averaged, plus a retain term λ_r·mean (ε_θ − ε_ref)² on base-model
  images of unrelated prompts: L = mean_c L_DUO(c) + λ·L_pres + λ_r·L_retain. ``duo_losses`` is its
  one-condition, no-retain case.
* ``preference_margin``, ``saturated_share``, ``unsafe_error_change``, ``is_saturated_without_effect``:
  whether the preference loss has saturated (its gradient gone) before the unsafe images changed.
"""

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

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
    margin: torch.Tensor
    ref_error_unsafe: torch.Tensor
    retain_loss: torch.Tensor = field(default_factory=lambda: torch.zeros(()))

    def to_log(self) -> dict:
        return {
            "loss": self.loss.detach().item(),
            "loss_duo": self.preference_loss.detach().item(),
            "loss_pres": self.preservation_loss.detach().item(),
            "loss_retain": self.retain_loss.detach().item(),
            "delta_safe": self.delta_safe.mean().item(),
            "delta_unsafe": self.delta_unsafe.mean().item(),
            "implicit_acc": self.implicit_accuracy.item(),
            "margin": self.margin.mean().item(),
            "saturated_share": saturated_share(self.margin).item(),
            "ref_error_unsafe": self.ref_error_unsafe.mean().item(),
            "unsafe_error_change": unsafe_error_change(self.delta_unsafe, self.ref_error_unsafe).item(),
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


PREFERENCE_CONDITIONS = ("empty", "prompt", "guided")
RETAIN_CONDITIONS = ("empty", "prompt")


def guided_prediction(unconditional: torch.Tensor, conditional: torch.Tensor, guidance_scale: float) -> torch.Tensor:
    """ε_u + w·(ε_c − ε_u): the classifier-free-guided prediction the sampler follows."""
    return unconditional + guidance_scale * (conditional - unconditional)


def forward_conditions(preference_conditions) -> Tuple[str, ...]:
    """The conditions the pair images are run under: ``guided`` is made of the ``empty`` and ``prompt`` predictions."""
    unknown = [c for c in preference_conditions if c not in PREFERENCE_CONDITIONS]
    if unknown or not preference_conditions:
        raise ValueError(
            f"unknown preference conditions {unknown or '(none)'}: choose from {', '.join(PREFERENCE_CONDITIONS)}"
        )
    needed = set(preference_conditions)
    if "guided" in needed:
        needed |= {"empty", "prompt"}
    return tuple(c for c in ("empty", "prompt") if c in needed)


@dataclass(frozen=True)
class BatchLayout:
    """Where each part sits in the concatenated batch: the 2·B pair images ``[x⁻_t; x⁺_t]`` once per pair
    condition, then B pure-noise samples, then R retain images once per retain condition."""

    num_pairs: int
    pair_conditions: Tuple[str, ...] = ("empty",)
    num_retain: int = 0
    retain_conditions: Tuple[str, ...] = ()

    @property
    def size(self) -> int:
        return (
            2 * self.num_pairs * len(self.pair_conditions)
            + self.num_pairs
            + self.num_retain * len(self.retain_conditions)
        )

    def split(self, prediction: torch.Tensor):
        """(pair predictions by condition, pure-noise predictions, retain predictions) of one concatenated batch."""
        if prediction.shape[0] != self.size:
            raise ValueError(f"expected {self.size} samples for {self}, got {prediction.shape[0]}")
        pair_size = 2 * self.num_pairs
        pairs = {
            condition: prediction[i * pair_size : (i + 1) * pair_size]
            for i, condition in enumerate(self.pair_conditions)
        }
        start = pair_size * len(self.pair_conditions)
        noise = prediction[start : start + self.num_pairs]
        return pairs, noise, prediction[start + self.num_pairs :]


@dataclass(frozen=True)
class VariantSettings:
    """The concept-specific objective's settings (issue 24); the defaults are the paper's objective."""

    preference_conditions: Tuple[str, ...] = ("empty",)
    guidance_scale: float = 1.0
    retain_weight: float = 0.0
    retain_conditions: Tuple[str, ...] = ()

    @property
    def pair_conditions(self) -> Tuple[str, ...]:
        return forward_conditions(self.preference_conditions)

    @property
    def uses_retain(self) -> bool:
        return self.retain_weight > 0 and bool(self.retain_conditions)

    def loss_kwargs(self) -> dict:
        return {
            "preference_conditions": self.preference_conditions,
            "guidance_scale": self.guidance_scale,
            "retain_weight": self.retain_weight,
        }


def preference_prediction(pairs: Dict[str, torch.Tensor], condition: str, guidance_scale: float) -> torch.Tensor:
    if condition == "guided":
        return guided_prediction(pairs["empty"], pairs["prompt"], guidance_scale)
    return pairs[condition]


def concept_losses(
    model_prediction: torch.Tensor,
    ref_prediction: torch.Tensor,
    target: torch.Tensor,
    layout: BatchLayout,
    beta: float,
    preservation_weight: float,
    preference_conditions: Tuple[str, ...] = ("empty",),
    guidance_scale: float = 1.0,
    retain_weight: float = 0.0,
    weighting: Optional[torch.Tensor] = None,
) -> DUOLosses:
    """L = mean over ``preference_conditions`` of L_DUO(c) + λ·L_pres + λ_r·L_retain over a batch laid out as ``layout``.

    ``target`` (and ``weighting``, if given) cover the 2·B pair images; they are the same under every
    condition. The retain term compares the two models with each other on the retain images, like the
    preservation term on pure noise. The logged Δ's, margin and accuracy are the means over the conditions.
    """
    num_pairs = layout.num_pairs
    if target.shape[0] != 2 * num_pairs:
        raise ValueError(f"expected targets for the 2·B = {2 * num_pairs} pair images, got {target.shape[0]}")
    model_pairs, model_noise, model_retain = layout.split(model_prediction)
    ref_pairs, ref_noise, ref_retain = layout.split(ref_prediction)
    pair_weighting = weighting[: 2 * num_pairs] if weighting is not None else None
    losses, deltas_safe, deltas_unsafe, ref_errors_unsafe = [], [], [], []
    for condition in preference_conditions:
        model_error = per_sample_error(
            preference_prediction(model_pairs, condition, guidance_scale), target, pair_weighting
        )
        ref_error = per_sample_error(
            preference_prediction(ref_pairs, condition, guidance_scale), target, pair_weighting
        )
        loss, delta_safe, delta_unsafe = preference_loss(
            model_error[:num_pairs], model_error[num_pairs:], ref_error[:num_pairs], ref_error[num_pairs:], beta
        )
        losses.append(loss)
        deltas_safe.append(delta_safe)
        deltas_unsafe.append(delta_unsafe)
        ref_errors_unsafe.append(ref_error[:num_pairs])
    loss_duo = torch.stack(losses).mean()
    delta_safe = torch.stack(deltas_safe).mean(0)
    delta_unsafe = torch.stack(deltas_unsafe).mean(0)
    loss_pres = preservation_loss(model_noise, ref_noise)
    loss_retain = (
        preservation_loss(model_retain, ref_retain)
        if model_retain.shape[0]
        else torch.zeros((), device=loss_pres.device)
    )
    loss = loss_duo + preservation_weight * loss_pres
    if retain_weight:
        loss = loss + retain_weight * loss_retain
    return DUOLosses(
        loss=loss,
        preference_loss=loss_duo.detach(),
        preservation_loss=loss_pres.detach(),
        delta_safe=delta_safe.detach(),
        delta_unsafe=delta_unsafe.detach(),
        implicit_accuracy=(delta_safe < delta_unsafe).float().mean().detach(),
        margin=preference_margin(delta_safe, delta_unsafe, beta).detach(),
        ref_error_unsafe=torch.stack(ref_errors_unsafe).mean(0).detach(),
        retain_loss=loss_retain.detach(),
    )


def duo_losses(
    model_prediction: torch.Tensor,
    ref_prediction: torch.Tensor,
    target: torch.Tensor,
    beta: float,
    preservation_weight: float,
    weighting: Optional[torch.Tensor] = None,
) -> DUOLosses:
    """The paper's DUO objective over the concatenated batch ``[x⁻_t; x⁺_t; x_T]``.

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
    return concept_losses(
        model_prediction,
        ref_prediction,
        target,
        BatchLayout(num_pairs),
        beta,
        preservation_weight,
        weighting=weighting,
    )


# --------------------------------------------------------------------------------------------------
# Saturation: the preference loss can reach ~0 while the model has barely changed
#
# Per pair the loss is ℓ = softplus(−m) with the margin m = β·(Δ⁻ − Δ⁺), and its gradient is
# ∂ℓ/∂θ = −σ(−m)·β·∂(Δ⁻ − Δ⁺)/∂θ with σ(−m) = 1 − e^(−ℓ) ≤ ℓ. Once ℓ < 0.01 (m > 4.6) a pair pulls with
# under 1/50 of the weight it had at m = 0: it has stopped teaching. A large β reaches that margin
# with tiny Δ's, i.e. with denoising errors, and hence samples, that have hardly moved.
# --------------------------------------------------------------------------------------------------

SATURATED_LOSS = 0.01
# The warning: most pairs saturated while the unsafe images' denoising error has grown by less than the
# reference model's own error on them (a relative change under 100%). Why that scale: when the adapter
# changes the prediction by δ, independently of the reference's residual r = target − ε_ref,
# E[Δ⁻] = ‖δ‖², so Δ⁻ / e_ref(x⁻) = (‖δ‖ / ‖r‖)²; both scale the clean-image estimate x̂₀ by the same
# factor √(1 − ᾱ)/√ᾱ, so under 100% means the adapter moves its estimate of the unsafe image by less than
# the base model's own estimation error at that step, a change the sampler's later steps can undo. A
# first guess of 1% (a tenth of that error) was refuted by the toy sweep (docs/choosing-beta.md), and the
# 3-seed curve shows no threshold separates the runs that removed the concept from those that kept it
# (removed at +146%, kept at +264%): the warning states the saturation, the samples give the verdict.
SATURATED_MAJORITY = 0.5
MIN_UNSAFE_ERROR_CHANGE = 1.0


def preference_margin(delta_safe: torch.Tensor, delta_unsafe: torch.Tensor, beta: float) -> torch.Tensor:
    """m = β·(Δ⁻ − Δ⁺) per pair: the preference loss is softplus(−m)."""
    return beta * (delta_unsafe - delta_safe)


def saturated_share(margin: torch.Tensor, loss_threshold: float = SATURATED_LOSS) -> torch.Tensor:
    """Share of pairs whose preference loss softplus(−m) is below ``loss_threshold`` (gradient weight σ(−m) < it)."""
    return (F.softplus(-margin) < loss_threshold).float().mean()


def unsafe_error_change(delta_unsafe: torch.Tensor, ref_error_unsafe: torch.Tensor) -> torch.Tensor:
    """Σ Δ⁻ / Σ e_ref(x⁻): how much worse the adapted model denoises the unsafe images, relative to the reference."""
    return delta_unsafe.sum() / ref_error_unsafe.sum().clamp_min(torch.finfo(ref_error_unsafe.dtype).tiny)


def is_saturated_without_effect(
    saturated: float,
    error_change: float,
    majority: float = SATURATED_MAJORITY,
    min_error_change: float = MIN_UNSAFE_ERROR_CHANGE,
) -> bool:
    """True when more than ``majority`` of the pairs have saturated while the unsafe images' denoising
    error has grown by less than ``min_error_change`` (relative): training has stopped before removing anything."""
    return saturated > majority and error_change < min_error_change


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


PAIR_TIMESTEP_MODES = ("shared", "independent")


def pair_image_timesteps(draw, num_pairs: int, pair_timesteps: str = "shared") -> torch.Tensor:
    """Timesteps (or sigma-table indices) of the 2·B pair images ``[unsafe; safe]``.

    ``draw(n)`` returns n draws. ``shared``: one draw per pair, used by both of its images (Diffusion-DPO's
    form: the two errors are compared at the same noise level, so their difference has lower variance).
    ``independent``: one draw per image, as the official DUO code draws them.
    """
    if pair_timesteps == "shared":
        drawn = draw(num_pairs)
        return torch.cat([drawn, drawn])
    if pair_timesteps == "independent":
        return draw(2 * num_pairs)
    raise ValueError(f"unknown pair_timesteps {pair_timesteps!r}: choose one of {', '.join(PAIR_TIMESTEP_MODES)}")


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
    reads the last entry of the descending table here, σ ≈ 0.003, t ≈ 3 — the *final*, almost noise-free step —
    while feeding pure noise: an input the model never sees at that timestep.)
    """
    sigmas, timesteps = flow_matching_sigmas_and_timesteps(scheduler, torch.tensor([0]))
    if abs(sigmas.item() - 1.0) > 1e-6:
        raise ValueError(
            f"the scheduler's largest sigma is {sigmas.item()}, not 1: DUO needs a table that reaches pure noise"
        )
    return sigmas[0], timesteps[0]


def official_preservation_sigma_and_timestep(scheduler):
    """(σ, timestep) where the official SD3 code evaluates output preservation: the last entry of the
    descending table (σ ≈ 0.003, t ≈ 3 for SD3's shift of 3), the final sampling step, with a pure-noise input."""
    last = torch.tensor([scheduler.config.num_train_timesteps - 1])
    sigmas, timesteps = flow_matching_sigmas_and_timesteps(scheduler, last)
    return sigmas[0], timesteps[0]


SD3_PRESERVATION_PLACEMENTS = ("sigma_one", "official")


def preservation_sigma_and_timestep(scheduler, placement: str = "sigma_one"):
    """(σ, timestep) told to the model for the pure-noise preservation input: ``sigma_one`` (σ = 1, where
    pure noise belongs) or ``official`` (the table's last entry, as the official SD3 code)."""
    if placement == "sigma_one":
        return pure_noise_sigma_and_timestep(scheduler)
    if placement == "official":
        return official_preservation_sigma_and_timestep(scheduler)
    raise ValueError(
        f"unknown preservation placement {placement!r}: choose one of {', '.join(SD3_PRESERVATION_PLACEMENTS)}"
    )


def flow_matching_loss_weighting(weighting_scheme: str, sigmas: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weight of the scheme (diffusers' ``compute_loss_weighting_for_sd3``): σ⁻² for
    ``sigma_sqrt``, 2 / (π(1 − 2σ + 2σ²)) for ``cosmap``, 1 otherwise."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    return compute_loss_weighting_for_sd3(weighting_scheme, sigmas.float())
