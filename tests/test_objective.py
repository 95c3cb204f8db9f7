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
    assert set(logged) == {
        "loss",
        "loss_duo",
        "loss_pres",
        "loss_retain",
        "delta_safe",
        "delta_unsafe",
        "implicit_acc",
        "margin",
        "saturated_share",
        "ref_error_unsafe",
        "unsafe_error_change",
    }
    assert logged["delta_safe"] == pytest.approx(-1.0)
    # m = β(Δ⁻ − Δ⁺) = 1·(0 − (−1)) = 1: softplus(−1) = 0.31, not saturated; e_ref(x⁻) = 1, Δ⁻ = 0
    assert logged["margin"] == pytest.approx(1.0)
    assert logged["saturated_share"] == 0.0
    assert logged["ref_error_unsafe"] == pytest.approx(1.0)
    assert logged["unsafe_error_change"] == pytest.approx(0.0)


def test_margin_and_saturated_share_match_closed_forms():
    delta_safe = torch.tensor([-0.003, 0.0, 0.01, 0.02], dtype=torch.float64)
    delta_unsafe = torch.tensor([0.002, 0.0, 0.0, 0.03], dtype=torch.float64)
    margin = objective.preference_margin(delta_safe, delta_unsafe, beta=500.0)
    assert torch.allclose(margin, torch.tensor([2.5, 0.0, -5.0, 5.0], dtype=torch.float64))
    # The per-pair loss is softplus(−m); it is below 0.01 exactly when m > −log(e^0.01 − 1) ≈ 4.6002.
    threshold = -math.log(math.expm1(0.01))
    assert threshold == pytest.approx(4.6002, abs=1e-4)
    assert objective.saturated_share(margin).item() == 0.25  # only m = 5
    just_below, just_above = torch.tensor([threshold - 1e-6]), torch.tensor([threshold + 1e-6])
    assert objective.saturated_share(just_below).item() == 0.0 and objective.saturated_share(just_above).item() == 1.0
    # Its gradient weight σ(−m) = 1 − e^(−loss) is under the loss itself: a saturated pair pulls with < 0.01.
    m = torch.tensor([threshold], requires_grad=True)
    torch.nn.functional.softplus(-m).backward()
    assert -m.grad.item() == pytest.approx(1 - math.exp(-0.01), rel=1e-5)


def test_unsafe_error_change_is_relative_to_the_reference_error():
    delta_unsafe = torch.tensor([0.002, 0.004])
    ref_error_unsafe = torch.tensor([0.1, 0.5])
    assert objective.unsafe_error_change(delta_unsafe, ref_error_unsafe).item() == pytest.approx(0.006 / 0.6)
    assert objective.unsafe_error_change(torch.zeros(2), torch.zeros(2)).item() == 0.0


@pytest.mark.parametrize(
    "saturated, change, warned",
    [(0.9, 0.5, True), (0.9, -0.02, True), (0.9, 1.5, False), (0.5, 0.5, False), (0.2, 0.0, False)],
)
def test_saturated_without_effect_needs_a_majority_and_no_movement(saturated, change, warned):
    assert objective.is_saturated_without_effect(saturated, change) is warned


def test_saturation_watch_warns_once_and_the_card_says_why(caplog):
    from duo_plugin import saturation

    saturated_row = {
        "margin": 6.0,
        "saturated_share": 0.9,
        "delta_safe": -0.003,
        "delta_unsafe": 0.002,
        "ref_error_unsafe": 0.4,
        "loss_duo": 0.005,
    }
    moving_row = {**saturated_row, "delta_unsafe": 1.0}
    watch = saturation.SaturationWatch(window=3)
    with caplog.at_level("WARNING", logger="duo_plugin.saturation"):
        for step in range(1, 3):
            watch.update(step, saturated_row)
        assert not caplog.records  # the window is not full yet
        for step in range(3, 10):
            watch.update(step, saturated_row)
    assert (
        len(caplog.records) == 1
        and "Step 3" in caplog.text
        and "+0.50%" in caplog.text
        and "--beta_dpo" in caplog.text
    )
    summary = saturation.window_summary([saturated_row, moving_row])
    assert summary["unsafe_error_change"] == pytest.approx((0.002 + 1.0) / 2 / 0.4)
    assert not summary["saturated_without_effect"]
    card = saturation.model_card_section(saturation.window_summary([saturated_row] * 3))
    assert "90%" in card and "Warning" in card
    assert "Warning" not in saturation.model_card_section(summary)


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


# --------------------------------------------------------------------------------------------------
# The concept-specific objective (issue 24)
# --------------------------------------------------------------------------------------------------


def test_guided_prediction_is_classifier_free_guidance():
    unconditional, conditional = torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.0])
    torch.testing.assert_close(objective.guided_prediction(unconditional, conditional, 4.0), torch.tensor([9.0, 6.0]))


def test_forward_conditions_add_what_guidance_is_made_of():
    assert objective.forward_conditions(("empty",)) == ("empty",)
    assert objective.forward_conditions(("prompt",)) == ("prompt",)
    assert objective.forward_conditions(("guided",)) == ("empty", "prompt")
    assert objective.forward_conditions(("prompt", "empty")) == ("empty", "prompt")
    with pytest.raises(ValueError, match="unknown preference conditions"):
        objective.forward_conditions(("negative",))


def test_batch_layout_splits_conditions_noise_and_retain():
    layout = objective.BatchLayout(2, ("empty", "prompt"), num_retain=2, retain_conditions=("empty", "prompt"))
    assert layout.size == 2 * 2 * 2 + 2 + 2 * 2
    prediction = torch.arange(float(layout.size))
    pairs, noise, retain = layout.split(prediction)
    assert pairs["empty"].tolist() == [0, 1, 2, 3] and pairs["prompt"].tolist() == [4, 5, 6, 7]
    assert noise.tolist() == [8, 9] and retain.tolist() == [10, 11, 12, 13]
    with pytest.raises(ValueError, match="expected 14 samples"):
        layout.split(prediction[:-1])


def test_concept_losses_against_a_closed_form():
    """Two conditions, the guided one and a retain term, every error chosen so each term has a closed form.

    One pair (B = 1), scalar latents, target 0: the error of a prediction p is p². Under the empty prompt the
    model predicts (unsafe, safe) = (1, 0) and the reference (0, 0): Δ⁻ = 1, Δ⁺ = 0. Under the prompt the
    model predicts (0, 2) and the reference (0, 1): Δ⁻ = 0, Δ⁺ = 4 − 1 = 3. Guided with w = 2 (ε_u + 2(ε_c − ε_u)):
    model (−1, 4) → errors (1, 16), reference (0, 2) → (0, 4): Δ⁻ = 1, Δ⁺ = 12.
    """
    beta, w, lam, lam_r = 0.5, 2.0, 3.0, 10.0
    layout = objective.BatchLayout(1, ("empty", "prompt"), num_retain=1, retain_conditions=("empty", "prompt"))
    #                      empty: u, s | prompt: u, s | noise | retain: empty, prompt
    model = torch.tensor([1.0, 0.0, 0.0, 2.0, 0.5, 1.0, 3.0]).reshape(-1, 1)
    ref = torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0]).reshape(-1, 1)
    target = torch.zeros(2, 1)
    losses = objective.concept_losses(
        model, ref, target, layout, beta, lam, ("empty", "prompt", "guided"), guidance_scale=w, retain_weight=lam_r
    )

    def dpo(delta_unsafe, delta_safe):
        return math.log1p(math.exp(beta * (delta_safe - delta_unsafe)))

    expected_duo = (dpo(1, 0) + dpo(0, 3) + dpo(1, 12)) / 3
    expected_pres = 0.5**2
    expected_retain = (1.0**2 + 2.0**2) / 2
    assert losses.preference_loss.item() == pytest.approx(expected_duo, rel=1e-6)
    assert losses.preservation_loss.item() == pytest.approx(expected_pres)
    assert losses.retain_loss.item() == pytest.approx(expected_retain)
    assert losses.loss.item() == pytest.approx(expected_duo + lam * expected_pres + lam_r * expected_retain, rel=1e-6)
    assert losses.delta_unsafe.tolist() == pytest.approx([2 / 3])
    assert losses.delta_safe.tolist() == pytest.approx([5.0])


def test_concept_losses_with_one_condition_and_no_retain_is_the_paper_objective():
    generator = torch.Generator().manual_seed(0)
    model, ref = torch.randn(6, 4, 2, 2, generator=generator), torch.randn(6, 4, 2, 2, generator=generator)
    target = torch.randn(4, 4, 2, 2, generator=generator)
    paper = objective.duo_losses(model, ref, target, beta=500.0, preservation_weight=7.0)
    general = objective.concept_losses(model, ref, target, objective.BatchLayout(2), 500.0, 7.0)
    assert paper.loss.item() == general.loss.item()
    assert general.retain_loss.item() == 0.0


def test_retain_term_gradient_flows_only_through_the_adapted_model():
    layout = objective.BatchLayout(1, ("empty",), num_retain=1, retain_conditions=("empty",))
    model = torch.zeros(4, 1, requires_grad=True)
    ref = torch.tensor([[0.0], [0.0], [0.0], [2.0]])
    losses = objective.concept_losses(model, ref, torch.zeros(2, 1), layout, 1.0, 0.0, retain_weight=1.0)
    losses.loss.backward()
    # d/dm (m − 2)² at m = 0 is −4; the pair rows get the DPO gradient only.
    assert model.grad[3].item() == pytest.approx(-4.0)
