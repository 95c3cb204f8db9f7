"""The DUO objective against its closed forms."""

import math

import pytest
import torch

from duo_plugin import objective


def _errors(model_unsafe, model_safe, ref_unsafe, ref_safe):
    return [torch.tensor(v, dtype=torch.float64) for v in (model_unsafe, model_safe, ref_unsafe, ref_safe)]


def test_per_sample_error_is_mean_over_non_batch_dims():
    prediction = torch.zeros(2, 3, 4, 4)
    target = torch.stack([torch.ones(3, 4, 4), 2 * torch.ones(3, 4, 4)])
    assert torch.equal(objective.per_sample_error(prediction, target), torch.tensor([1.0, 4.0]))
    weighting = torch.tensor([2.0, 0.5]).view(2, 1, 1, 1)
    assert torch.equal(objective.per_sample_error(prediction, target, weighting), torch.tensor([2.0, 2.0]))


def test_preference_loss_matches_closed_form():
    beta = 3.0
    model_unsafe, model_safe, ref_unsafe, ref_safe = _errors([0.5, 0.2], [0.1, 0.4], [0.3, 0.3], [0.2, 0.1])
    loss, delta_safe, delta_unsafe = objective.preference_loss(model_unsafe, model_safe, ref_unsafe, ref_safe, beta)
    assert torch.allclose(delta_safe, torch.tensor([-0.1, 0.3], dtype=torch.float64))
    assert torch.allclose(delta_unsafe, torch.tensor([0.2, -0.1], dtype=torch.float64))
    # −log σ(−β(Δ⁺ − Δ⁻)) = log(1 + exp(β(Δ⁺ − Δ⁻)))
    expected = sum(math.log1p(math.exp(beta * (s - u))) for s, u in ((-0.1, 0.2), (0.3, -0.1))) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-12)


def test_lower_safe_error_gives_lower_loss():
    base = _errors([0.3], [0.3], [0.3], [0.3])
    better_safe = _errors([0.3], [0.2], [0.3], [0.3])
    worse_unsafe = _errors([0.4], [0.3], [0.3], [0.3])
    loss_base = objective.preference_loss(*base, beta=10.0)[0]
    assert loss_base.item() == pytest.approx(math.log(2))
    assert objective.preference_loss(*better_safe, beta=10.0)[0] < loss_base
    assert objective.preference_loss(*worse_unsafe, beta=10.0)[0] < loss_base


def test_identical_pair_gives_ln2_and_zero_gradient():
    torch.manual_seed(0)
    # float64: the two images' gradients cancel exactly in theory; fp32 summation order leaves ~β·1e-9.
    network = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8)).double()
    reference = torch.nn.Linear(8, 8).double()
    image = torch.randn(2, 8, dtype=torch.float64)
    noise_input = torch.randn(2, 8, dtype=torch.float64)
    batch = torch.cat([image, image, noise_input])  # unsafe == safe
    target = torch.randn(2, 8, dtype=torch.float64).repeat(2, 1)  # the same target for both images of the pair
    with torch.no_grad():
        ref_prediction = reference(batch)
    losses = objective.duo_losses(network(batch), ref_prediction, target, beta=500.0, preservation_weight=0.0)
    assert losses.preference_loss.item() == pytest.approx(math.log(2), abs=1e-12)
    losses.loss.backward()
    for parameter in network.parameters():
        assert torch.allclose(parameter.grad, torch.zeros_like(parameter.grad), atol=1e-10)


def test_duo_losses_splits_the_concatenated_batch():
    num_pairs = 2
    model_prediction = torch.zeros(3 * num_pairs, 1, 2, 2)
    ref_prediction = torch.zeros_like(model_prediction)
    model_prediction[num_pairs : 2 * num_pairs] = 1.0  # the safe images: model error 0 against a target of 1
    ref_prediction[2 * num_pairs :] = 0.5  # the pure-noise branch
    target = torch.ones(2 * num_pairs, 1, 2, 2)
    losses = objective.duo_losses(model_prediction, ref_prediction, target, beta=1.0, preservation_weight=4.0)
    # Δ⁺ = 0 − 1 = −1, Δ⁻ = 1 − 1 = 0 → L_DUO = log(1 + e^(−1)); L_pres = 0.25
    assert losses.preference_loss.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-6)
    assert losses.preservation_loss.item() == pytest.approx(0.25)
    assert losses.loss.item() == pytest.approx(math.log1p(math.exp(-1.0)) + 1.0, rel=1e-6)
    assert losses.implicit_accuracy.item() == 1.0
    logged = losses.to_log()
    assert set(logged) == {"loss", "loss_duo", "loss_pres", "delta_safe", "delta_unsafe", "implicit_acc"}
    assert logged["delta_safe"] == pytest.approx(-1.0)


def test_duo_losses_rejects_a_batch_that_is_not_three_parts():
    with pytest.raises(ValueError, match="3·B"):
        objective.duo_losses(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(2, 2), 1.0, 1.0)


def test_v_prediction_target_is_velocity():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(prediction_type="v_prediction")
    latents, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    timesteps = torch.tensor([0, 400, 999])
    alpha_bar = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    expected = alpha_bar.sqrt() * noise - (1 - alpha_bar).sqrt() * latents
    assert torch.allclose(objective.diffusion_target(scheduler, latents, noise, timesteps), expected, atol=1e-6)
    epsilon_scheduler = DDPMScheduler(prediction_type="epsilon")
    assert objective.diffusion_target(epsilon_scheduler, latents, noise, timesteps) is noise
    with pytest.raises(ValueError, match="sample"):
        objective.diffusion_target(DDPMScheduler(prediction_type="sample"), latents, noise, timesteps)


def test_pair_timesteps_are_uniform_in_range():
    generator = torch.Generator().manual_seed(0)
    timesteps = objective.sample_pair_timesteps(5000, 10, 20, generator)
    assert timesteps.min().item() == 10 and timesteps.max().item() == 19
    assert len(timesteps.unique()) == 10


def test_preservation_is_zero_with_adapter_off_and_positive_with_it_on(tiny_sd):
    """The reference is the same network with the adapter switched off: L_pres vanishes then."""
    from diffusers import UNet2DConditionModel

    from duo_plugin import lora

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    lora.add_duo_adapter(unet, rank=4, alpha=4, target_modules=lora.lora_target_modules(unet, "self_attn"))
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5)
    sample = torch.randn(2, 4, 16, 16)
    timesteps = torch.full((2,), 999)
    condition = torch.randn(2, 16, unet.config.cross_attention_dim)
    with torch.no_grad(), lora.adapters_disabled(unet):
        ref_prediction = unet(sample, timesteps, condition).sample
        off_prediction = unet(sample, timesteps, condition).sample
    on_prediction = unet(sample, timesteps, condition).sample
    assert objective.preservation_loss(off_prediction, ref_prediction).item() == 0.0
    assert objective.preservation_loss(on_prediction, ref_prediction).item() > 0.0
    # Switching the adapter back on restores its trainability.
    assert all(p.requires_grad for n, p in unet.named_parameters() if "lora_" in n)
