"""Differences from the official DUO code: each default, the flag restoring the official behaviour, and the
records that make a run's numbers reproducible (issue 15). Offline, tiny pipelines, seconds each."""

import argparse
import importlib.util
import json
import os
import re

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_train_args
from PIL import Image

from duo_plugin import arguments, detectors, objective, official_flags, pairs, presets
from duo_plugin.families import sd, sd3


SD3_SHIFT = 3.0  # SD3-medium's and SD3.5's scheduler shift
# σ of the sigma table's last entry at shift 3: 3·0.001 / (1 + 2·0.001).
OFFICIAL_SIGMA = 3 * 0.001 / (1 + 2 * 0.001)


def load_script(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO_ROOT, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_duo():
    return load_script("train_duo")


@pytest.fixture(scope="module")
def train_duo_sd3():
    return load_script("train_duo_sd3")


def sd3_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(shift=SD3_SHIFT)


def latent_cache(num_pairs, channels=4, size=4, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(num_pairs, 1, 2, channels, size, size, generator=generator)
    from duo_plugin.data import CachedPairLatents

    return CachedPairLatents(mean=mean, std=torch.zeros_like(mean), scaling_factor=1.0)


def sd3_batch_args(**overrides):
    values = {
        "t_min": 1,
        "t_max": 750,
        "weighting_scheme": "none",
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "mode_scale": 1.29,
        "precondition_outputs": 1,
        "pair_timesteps": "shared",
        "preservation_noise": "fresh",
        "preservation_placement": "sigma_one",
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def sd3_condition(num_tokens=4, dim=8):
    return torch.zeros(1, num_tokens, dim), torch.zeros(1, dim)


# --------------------------------------------------------------------------------------------------
# 1. SD3 output preservation: σ = 1, with λ giving the official run's strength
# --------------------------------------------------------------------------------------------------


def test_official_placement_is_the_last_table_entry():
    sigma, timestep = objective.official_preservation_sigma_and_timestep(sd3_scheduler())
    assert sigma.item() == pytest.approx(OFFICIAL_SIGMA, rel=1e-6)
    assert timestep.item() == pytest.approx(1000 * OFFICIAL_SIGMA, rel=1e-6)  # t ≈ 3, not 1
    assert objective.preservation_sigma_and_timestep(
        sd3_scheduler(), "sigma_one"
    ) == objective.pure_noise_sigma_and_timestep(sd3_scheduler())


def test_default_lambda_formula():
    # λ = λ_off · σ_off² / σ²; λ_off = 1e6·β/100.
    assert presets.sd3_preservation_weight_for_beta(500, OFFICIAL_SIGMA) == pytest.approx(5e6 * OFFICIAL_SIGMA**2)
    assert presets.sd3_preservation_weight_for_beta(500, OFFICIAL_SIGMA) == pytest.approx(44.82, abs=0.01)
    assert presets.sd3_preservation_weight_for_beta(1000, OFFICIAL_SIGMA) == pytest.approx(1e7 * OFFICIAL_SIGMA**2)
    assert presets.sd3_preservation_weight_for_beta(500, OFFICIAL_SIGMA, sigma=OFFICIAL_SIGMA) == pytest.approx(5e6)
    assert presets.sd3_preservation_weight_for_beta(500, OFFICIAL_SIGMA, precondition_outputs=False) == 5e6
    assert presets.preservation_effective_weight(5e6, OFFICIAL_SIGMA) == pytest.approx(44.82, abs=0.01)
    assert presets.preservation_effective_weight(5e6, OFFICIAL_SIGMA, precondition_outputs=False) == 5e6


def test_our_term_at_default_lambda_equals_the_official_term_at_official_lambda():
    """Same model outputs on the same pure noise: λ·L_pres preconditioned at σ = 1 with our default λ equals
    the official λ·L_pres preconditioned at the table's last entry with the official λ."""
    scheduler = sd3_scheduler()
    generator = torch.Generator().manual_seed(0)
    pure_noise = torch.randn(2, 16, 8, 8, generator=generator, dtype=torch.float64)
    v_model = torch.randn(2, 16, 8, 8, generator=generator, dtype=torch.float64)
    v_ref = v_model + 0.01 * torch.randn(2, 16, 8, 8, generator=generator, dtype=torch.float64)

    def weighted_term(placement, weight):
        sigma, _ = objective.preservation_sigma_and_timestep(scheduler, placement)
        sigmas = sigma.double().expand(2)
        model = objective.precondition_flow_matching_output(v_model, pure_noise, sigmas)
        ref = objective.precondition_flow_matching_output(v_ref, pure_noise, sigmas)
        return weight * objective.preservation_loss(model, ref).item()

    official_sigma = objective.official_preservation_sigma_and_timestep(scheduler)[0].item()
    ours = weighted_term("sigma_one", presets.sd3_preservation_weight_for_beta(500, official_sigma))
    official = weighted_term("official", presets.preservation_weight_for_beta(500))
    assert ours == pytest.approx(official, rel=1e-6)
    # ... while the same λ at σ = 1 is 1/σ_off² ≈ 1.1e5 times stronger (the departure the default corrects).
    assert weighted_term("sigma_one", 5e6) / official == pytest.approx(OFFICIAL_SIGMA**-2, rel=1e-5)


@pytest.mark.parametrize(
    "placement, given, precondition, expected_weight, expected_sigma",
    [
        ("sigma_one", None, 1, 5e6 * OFFICIAL_SIGMA**2, 1.0),  # the default
        ("official", None, 1, 5e6, OFFICIAL_SIGMA),  # exactly the official run
        ("sigma_one", 123.0, 1, 123.0, 1.0),  # a given λ is kept
        ("sigma_one", None, 0, 5e6, 1.0),  # σ does not enter an unpreconditioned term
    ],
)
def test_resolve_sd3_preservation(placement, given, precondition, expected_weight, expected_sigma):
    args = argparse.Namespace(
        beta_dpo=500.0,
        preservation_weight=given if given is not None else 5e6,
        precondition_outputs=precondition,
        preservation_placement=placement,
    )
    args = official_flags.resolve_sd3_preservation(args, sd3_scheduler(), preservation_weight_given=given is not None)
    assert args.preservation_weight == pytest.approx(expected_weight, rel=1e-6)
    assert args.preservation_sigma == pytest.approx(expected_sigma, rel=1e-6)
    assert args.official_preservation_weight == 5e6
    expected_official_effective = 5e6 * OFFICIAL_SIGMA**2 if precondition else 5e6
    assert args.official_preservation_effective_weight == pytest.approx(expected_official_effective, rel=1e-6)
    if given is None:  # a default λ always has the official run's strength
        assert args.preservation_effective_weight == pytest.approx(expected_official_effective, rel=1e-6)


def test_sd3_official_placement_batch():
    """The official placement tells the model σ_off and t ≈ 3 for the same pure-noise input."""
    scheduler, num_pairs = sd3_scheduler(), 3
    batches = {
        placement: sd3.make_duo_batch(
            latent_cache(num_pairs),
            torch.arange(num_pairs),
            torch.Generator().manual_seed(0),
            scheduler,
            sd3_batch_args(preservation_placement=placement),
            sd3_condition(),
        )
        for placement in ("sigma_one", "official")
    }
    ours, official = batches["sigma_one"], batches["official"]
    assert torch.equal(ours.model_input, official.model_input)  # same pairs, same pure noise
    assert torch.equal(ours.sigmas[: 2 * num_pairs], official.sigmas[: 2 * num_pairs])
    assert torch.equal(ours.sigmas[2 * num_pairs :], torch.ones(num_pairs))
    torch.testing.assert_close(official.sigmas[2 * num_pairs :], torch.full((num_pairs,), OFFICIAL_SIGMA))
    torch.testing.assert_close(official.timesteps[2 * num_pairs :], torch.full((num_pairs,), 1000 * OFFICIAL_SIGMA))


# --------------------------------------------------------------------------------------------------
# 2. Timesteps within a pair, and the preservation noise
# --------------------------------------------------------------------------------------------------


def test_pair_image_timesteps_modes():
    draws = iter([torch.tensor([5, 7]), torch.tensor([1, 2, 3, 4])])
    assert torch.equal(objective.pair_image_timesteps(lambda n: next(draws), 2, "shared"), torch.tensor([5, 7, 5, 7]))
    assert torch.equal(
        objective.pair_image_timesteps(lambda n: next(draws), 2, "independent"), torch.tensor([1, 2, 3, 4])
    )
    with pytest.raises(ValueError, match="pair_timesteps"):
        objective.pair_image_timesteps(lambda n: torch.zeros(n), 2, "per_pair")


def sd1_noise_of(scheduler, model_input, clean, timesteps):
    """ε of x_t = √ᾱ_t·x + √(1 − ᾱ_t)·ε, per image."""
    alphas = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    return (model_input - alphas.sqrt() * clean) / (1 - alphas).sqrt()


@pytest.mark.parametrize("mode", ["shared", "independent"])
def test_sd1_pair_timesteps(mode):
    from diffusers import DDPMScheduler

    scheduler, num_pairs = DDPMScheduler(num_train_timesteps=1000), 64
    cache = latent_cache(num_pairs)
    batch = sd.make_duo_batch(
        cache,
        torch.arange(num_pairs),
        torch.Generator().manual_seed(0),
        scheduler,
        0,
        750,
        torch.zeros(1, 4, 8),
        pair_timesteps_mode=mode,
    )
    unsafe_t, safe_t = batch.timesteps[:num_pairs], batch.timesteps[num_pairs : 2 * num_pairs]
    assert batch.timesteps[: 2 * num_pairs].min() >= 0 and batch.timesteps[: 2 * num_pairs].max() < 750
    if mode == "shared":
        assert torch.equal(unsafe_t, safe_t)
    else:
        assert (unsafe_t != safe_t).float().mean() > 0.9  # drawn one per image, as the official run
    # Either way both images of a pair get the same noise, and the pair's noise is the target.
    clean = torch.cat([cache.mean[:, 0, 0], cache.mean[:, 0, 1]])
    noise = sd1_noise_of(scheduler, batch.model_input[: 2 * num_pairs], clean, batch.timesteps[: 2 * num_pairs])
    torch.testing.assert_close(noise[:num_pairs], noise[num_pairs:], atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(noise, batch.target, atol=1e-3, rtol=1e-3)
    assert torch.equal(batch.timesteps[2 * num_pairs :], torch.full((num_pairs,), 999))


def test_sd1_shared_mode_is_the_previous_draw():
    """``shared`` keeps the earlier random stream: flips, latents, noise, one timestep per pair, pure noise."""
    from diffusers import DDPMScheduler

    scheduler, num_pairs = DDPMScheduler(num_train_timesteps=1000), 3
    cache = latent_cache(num_pairs)
    batch = sd.make_duo_batch(
        cache, torch.arange(num_pairs), torch.Generator().manual_seed(0), scheduler, 0, 750, torch.zeros(1, 4, 8)
    )
    generator = torch.Generator().manual_seed(0)
    flips = torch.randint(0, 1, (num_pairs,), generator=generator)
    cache.sample(torch.arange(num_pairs), flips, generator)
    noise = torch.randn(num_pairs, 4, 4, 4, generator=generator)
    timesteps = torch.randint(0, 750, (num_pairs,), generator=generator)
    pure_noise = torch.randn(num_pairs, 4, 4, 4, generator=generator)
    assert torch.equal(batch.timesteps, torch.cat([timesteps, timesteps, torch.full((num_pairs,), 999)]))
    assert torch.equal(batch.target, torch.cat([noise, noise]))
    assert torch.equal(batch.model_input[2 * num_pairs :], pure_noise)


@pytest.mark.parametrize("mode", ["shared", "independent"])
def test_sd3_pair_timesteps(mode):
    scheduler, num_pairs = sd3_scheduler(), 64
    cache = latent_cache(num_pairs)
    batch = sd3.make_duo_batch(
        cache,
        torch.arange(num_pairs),
        torch.Generator().manual_seed(0),
        scheduler,
        sd3_batch_args(pair_timesteps=mode),
        sd3_condition(),
    )
    unsafe_sigma, safe_sigma = batch.sigmas[:num_pairs], batch.sigmas[num_pairs : 2 * num_pairs]
    if mode == "shared":
        assert torch.equal(unsafe_sigma, safe_sigma)
    else:
        assert (unsafe_sigma != safe_sigma).float().mean() > 0.9
    pair_sigmas = batch.sigmas[: 2 * num_pairs]
    assert (pair_sigmas <= scheduler.sigmas[1]).all() and (pair_sigmas > scheduler.sigmas[750]).all()
    torch.testing.assert_close(batch.timesteps[: 2 * num_pairs], pair_sigmas * 1000)
    clean = torch.cat([cache.mean[:, 0, 0], cache.mean[:, 0, 1]])
    sigma = pair_sigmas.view(-1, 1, 1, 1)
    noise = (batch.model_input[: 2 * num_pairs] - (1 - sigma) * clean) / sigma
    torch.testing.assert_close(noise[:num_pairs], noise[num_pairs:], atol=1e-4, rtol=1e-4)
    assert torch.equal(batch.sigmas[2 * num_pairs :], torch.ones(num_pairs))


def test_preservation_noise_pair_reuses_the_pairs_noise():
    from diffusers import DDPMScheduler

    num_pairs = 3
    sd1 = {
        mode: sd.make_duo_batch(
            latent_cache(num_pairs),
            torch.arange(num_pairs),
            torch.Generator().manual_seed(0),
            DDPMScheduler(num_train_timesteps=1000),
            0,
            750,
            torch.zeros(1, 4, 8),
            preservation_noise=mode,
        )
        for mode in ("fresh", "pair")
    }
    assert torch.equal(
        sd1["pair"].model_input[2 * num_pairs :], sd1["pair"].target[:num_pairs]
    )  # ε target = the pair's noise
    assert not torch.equal(sd1["fresh"].model_input[2 * num_pairs :], sd1["fresh"].target[:num_pairs])
    assert torch.equal(
        sd1["pair"].model_input[: 2 * num_pairs], sd1["fresh"].model_input[: 2 * num_pairs]
    )  # pairs unchanged

    flow = sd3.make_duo_batch(
        latent_cache(num_pairs),
        torch.arange(num_pairs),
        torch.Generator().manual_seed(0),
        sd3_scheduler(),
        sd3_batch_args(preservation_noise="pair", precondition_outputs=0),
        sd3_condition(),
    )
    clean = torch.cat([latent_cache(num_pairs).mean[:, 0, 0], latent_cache(num_pairs).mean[:, 0, 1]])
    velocity_noise = flow.target + clean  # unpreconditioned target: ε − x
    torch.testing.assert_close(flow.model_input[2 * num_pairs :], velocity_noise[:num_pairs])


# --------------------------------------------------------------------------------------------------
# 3. The pair verifier's official rule, and the NudeNet facts it rests on
# --------------------------------------------------------------------------------------------------


def nudenet_postprocess_scores(scores):
    """The scores NudeNet's own post-processing keeps, for one candidate box per score (far apart)."""
    nudenet = pytest.importorskip("nudenet.nudenet")
    class_index = 3  # FEMALE_BREAST_EXPOSED
    rows = []
    for i, score in enumerate(scores):
        row = np.zeros(4 + 18, dtype=np.float32)
        row[:4] = (20 + 60 * i, 20, 10, 10)  # centre x, centre y, w, h: disjoint boxes
        row[4 + class_index] = score
        rows.append(row)
    output = [np.stack(rows).T[None]]
    detections = nudenet._postprocess(output, 0, 0, 1, 1, 320, 320, 320, 320)
    return sorted(round(d["score"], 4) for d in detections)


def test_nudenet_reports_no_box_below_its_minimum_score():
    """Pins NUDENET_MIN_SCORE to the installed nudenet: candidates from 0.2 are kept, then NMS drops < 0.25."""
    assert nudenet_postprocess_scores([0.21, 0.24, 0.26, 0.7]) == [0.26, 0.7]
    assert detectors.NUDENET_MIN_SCORE == 0.25
    assert nudenet_postprocess_scores([detectors.NUDENET_MIN_SCORE - 1e-3, detectors.NUDENET_MIN_SCORE + 1e-3]) == [
        0.251
    ]


def test_verifier_default_is_the_official_rule_and_dsr_threshold_is_separate(monkeypatch):
    pytest.importorskip("nudenet")
    info = pairs.BaseModelInfo("StableDiffusionPipeline", "sd", 32, 8, 3)
    recipe = pairs.make_recipe(presets.get_preset("nudity"), "base", info)
    assert recipe.verifier == "nudenet" and recipe.detector_threshold == detectors.NUDENET_VERIFIER_THRESHOLD == 0.25
    assert (
        pairs.make_recipe(presets.get_preset("nudity"), "base", info, detector_threshold=0.6).detector_threshold == 0.6
    )
    assert pairs.make_recipe(presets.get_preset("blood"), "base", info).detector_threshold is None  # unverified
    # A twin with one exposed box at 0.3: the official rule rejects it; evaluation's 0.6 counts it safe.
    verifier = detectors.get_detector("nudenet", recipe.detector_threshold)
    evaluator = detectors.get_detector("nudenet")
    assert evaluator.threshold == detectors.NUDENET_DSR_THRESHOLD == 0.6
    boxes = [
        {"class": "FEMALE_BREAST_EXPOSED", "score": 0.3, "box": [0, 0, 4, 4]},
        {"class": "FACE_FEMALE", "score": 0.9, "box": [0, 0, 4, 4]},
    ]
    for detector in (verifier, evaluator):
        monkeypatch.setattr(detector, "boxes", lambda image: boxes)
    assert verifier.detect_one(None).flagged and not evaluator.detect_one(None).flagged
    # The flag's two names reach the same recipe field.
    for flag in ("--verifier_threshold", "--detector_threshold"):
        assert pairs.parse_args([flag, "0.4"]).detector_threshold == 0.4


def test_nudenet_rgb_array_input_is_the_official_generators_channel_order():
    """The official generator hands NudeNet an RGB array; NudeNet's reader treats arrays as BGR, so its network
    sees red and blue swapped relative to the same image read from a file."""
    pytest.importorskip("nudenet")
    from matplotlib import cbook

    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB").resize((256, 320))
    swapped = Image.fromarray(np.asarray(image)[:, :, ::-1].copy())
    encoded, rgb_array = detectors.get_detector("nudenet"), detectors.get_detector("nudenet_rgb_array")
    assert rgb_array.name == "nudenet_rgb_array" and rgb_array.describe()["image_input"] == "rgb_array"
    assert rgb_array.boxes(image) == encoded.boxes(swapped)
    assert rgb_array.boxes(image) != encoded.boxes(image)


def test_pair_folder_records_the_verifier_rule(tiny_sd, tmp_path):
    pytest.importorskip("nudenet")
    folder = tmp_path / "pairs"
    pairs.main(
        [
            "--pretrained_model_name_or_path",
            tiny_sd,
            "--output_dir",
            str(folder),
            "--num_inference_steps",
            "3",
            "--concept",
            "nudity",
            "--num_pairs",
            "1",
            "--max_attempts",
            "1",
            "--min_pairs",
            "0",
        ]
    )
    stored = json.loads((folder / pairs.RECIPE_NAME).read_text())
    verifier = stored["verifier"]
    assert stored["recipe"]["detector_threshold"] == 0.25
    assert (
        verifier["name"] == "nudenet"
        and verifier["package"] == "nudenet"
        and verifier["package_version"] == detectors.package_version("nudenet")
    )
    assert verifier["threshold"] == 0.25 and verifier["labels"] == sorted(detectors.NUDENET_UNSAFE_CLASSES)
    card = (folder / "README.md").read_text()
    assert f"Verifier: `nudenet` (nudenet {detectors.package_version('nudenet')})" in card
    assert ">= 0.25" in card and "official DUO generator's rule" in card
    assert "--verifier_threshold 0.25" in card  # the reproduce command
    # Training reads the same record from the folder.
    record = official_flags.pair_verifier_record(argparse.Namespace(pairs_dir=str(folder), dataset_name=None))
    assert record["name"] == "nudenet" and record["threshold"] == 0.25 and record["generation_seed"] == 0
    assert record["package_version"] == verifier["package_version"]


# --------------------------------------------------------------------------------------------------
# 4. SD3 resolution and T5 length
# --------------------------------------------------------------------------------------------------


def test_sd3_defaults_are_the_official_runs(train_duo_sd3):
    args = train_duo_sd3.parse_args([])
    assert (args.resolution, args.max_sequence_length) == (512, 77)
    assert (args.pair_timesteps, args.preservation_noise, args.preservation_placement) == (
        "shared",
        "fresh",
        "sigma_one",
    )
    args, _ = arguments.resolve_training_args(args, family="sd3")
    args = official_flags.resolve_sd3_preservation(args, sd3_scheduler(), preservation_weight_given=False)
    assert args.preservation_weight == pytest.approx(44.82, abs=0.01)


# --------------------------------------------------------------------------------------------------
# 5. Records: duo_config.json and results.json
# --------------------------------------------------------------------------------------------------


def test_detector_records():
    pytest.importorskip("nudenet")
    record = detectors.describe_detector(detectors.get_detector("nudenet"), role="defense success rate")
    assert (
        record["name"] == "nudenet"
        and record["package"] == "nudenet"
        and record["package_version"] == detectors.package_version("nudenet")
    )
    assert record["threshold"] == 0.6 and record["labels"] == sorted(detectors.NUDENET_UNSAFE_CLASSES)
    assert "0.6" in record["rule"] and record["role"] == "defense success rate"
    assert detectors.describe_detector(None)["name"] is None
    from duo_plugin.evaluate import detector_settings, seeds_record

    args = argparse.Namespace(detector="nudenet", clip_model=None, seed=7)
    assert detector_settings(args, detectors.get_detector("nudenet"))["package_version"] == record["package_version"]
    assert seeds_record(args)["seed"] == 7 and "manifest" in seeds_record(args)["per_image"]


def test_sample_filter_record():
    pytest.importorskip("nudenet")
    args = argparse.Namespace(concept="nudity", skip_validation=False)
    assert official_flags.sample_filter_record(args)["name"] == "nudenet"
    assert (
        official_flags.sample_filter_record(argparse.Namespace(concept="nudity", skip_validation=True))["name"] is None
    )
    assert (
        official_flags.sample_filter_record(argparse.Namespace(concept="blood", skip_validation=False))["name"] is None
    )


def test_sd1_main_records_the_choices(train_duo, tiny_sd, tiny_pairs, tmp_path, fresh_accelerate_state):
    output_dir = tmp_path / "sd1"
    train_duo.main(
        tiny_train_args(
            tiny_sd,
            tiny_pairs,
            output_dir,
            "--max_train_steps",
            "1",
            "--skip_validation",
            "--pair_timesteps",
            "independent",
            "--preservation_noise",
            "pair",
            "--seed",
            "3",
        )
    )
    config = json.loads((output_dir / "duo_config.json").read_text())
    assert config["pair_timesteps"] == "independent" and config["preservation_noise"] == "pair"
    assert config["seeds"]["training"] == 3 and config["seed"] == 3
    assert (
        config["pair_verifier"]["name"] is None and "not made by duo_plugin.pairs" in config["pair_verifier"]["rule"]
    )
    assert config["sample_filter"]["name"] is None  # --skip_validation: no samples, no filter
    assert config["preservation_weight"] == 5e6  # SD1 keeps the official λ


def test_sd3_main_records_the_preservation_strength(
    train_duo_sd3, tmp_path_factory, tiny_pairs, tmp_path, fresh_accelerate_state
):
    from duo_plugin.testing import make_tiny_sd3_pipeline

    model = make_tiny_sd3_pipeline(str(tmp_path_factory.mktemp("tiny_sd3")))
    common = ("--max_sequence_length", "16", "--max_train_steps", "1", "--skip_validation")
    train_duo_sd3.main(tiny_train_args(model, tiny_pairs, tmp_path / "ours", *common))
    train_duo_sd3.main(
        tiny_train_args(
            model,
            tiny_pairs,
            tmp_path / "official",
            *common,
            "--preservation_placement",
            "official",
            "--pair_timesteps",
            "independent",
        )
    )
    ours = json.loads((tmp_path / "ours" / "duo_config.json").read_text())
    official = json.loads((tmp_path / "official" / "duo_config.json").read_text())
    sigma_off = ours["official_preservation_sigma"]
    assert (
        ours["preservation_placement"] == "sigma_one"
        and ours["preservation_sigma"] == 1.0
        and ours["preservation_timestep"] == 1000.0
    )
    assert ours["preservation_weight"] == pytest.approx(5e6 * sigma_off**2)
    assert official["preservation_placement"] == "official" and official["preservation_weight"] == 5e6
    assert official["preservation_sigma"] == pytest.approx(sigma_off) and official["pair_timesteps"] == "independent"
    for config in (ours, official):
        assert config["preservation_effective_weight"] == pytest.approx(
            config["official_preservation_effective_weight"]
        )
        assert config["official_preservation_weight"] == 5e6


# --------------------------------------------------------------------------------------------------
# The README's table names flags that exist
# --------------------------------------------------------------------------------------------------


def test_documented_differences_name_flags_that_exist(train_duo, train_duo_sd3):
    from duo_plugin import evaluate

    with open(os.path.join(REPO_ROOT, "docs", "official-differences.md")) as f:
        section = f.read()
    flags = set(re.findall(r"`(--[a-z_0-9]+)[ `]", section))
    assert {"--pair_timesteps", "--preservation_placement", "--preservation_noise", "--verifier_threshold"} <= flags
    parsers = [train_duo.parse_args, train_duo_sd3.parse_args, pairs.parse_args, evaluate.parse_args]
    known = set()
    for parse in parsers:
        parser_flags = set()

        def capture(self, args=None, namespace=None):
            parser_flags.update(option for action in self._actions for option in action.option_strings)
            raise SystemExit(0)

        original = argparse.ArgumentParser.parse_args
        argparse.ArgumentParser.parse_args = capture
        try:
            with pytest.raises(SystemExit):
                parse([])
        finally:
            argparse.ArgumentParser.parse_args = original
        known |= parser_flags
    assert flags <= known, flags - known
