"""duo_plugin.timing: where a concept is decided, and --t_max auto."""

import argparse
import functools
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_train_args, train_in_process

from duo_plugin import detectors, timing
from duo_plugin.testing import MeanChannelDetector


DETECTOR = "duo_plugin.testing:MeanChannelDetector"
CONCEPT = ["--concept", "redness", "--unsafe_prompt", "a red square", "--safe_prompt", "a blue square"]


# --- The math -------------------------------------------------------------------------------------


def test_crossing_interpolates_between_the_points_around_one_half():
    assert timing.crossing([0, 100, 200, 300], [1.0, 0.8, 0.4, 0.2]) == pytest.approx(175.0)
    assert timing.crossing([0, 100, 200], [1.0, 0.9, 0.6]) is None  # committed before the first measured point
    assert timing.crossing([0, 100], [0.3, 0.1]) == 0.0


def test_window_of_a_concept_decided_midway():
    switch_t = [900, 700, 500, 300, 100, 0]  # k = 0 … S; k = S is "never switched"
    fractions = [0.2, 0.2, 0.25, 0.6, 1.0, 1.0]
    window = timing.recommend_window(switch_t, fractions, 1000, open_level=0.1)
    assert window["levels"] == pytest.approx([0.0, 0.0, 0.0625, 0.5, 1.0, 1.0])
    assert (window["open_timestep"], window["done_timestep"]) == (500, 100)
    assert timing.recommended_t_max_sd(window, 1000) == 550  # 501 rounded up to 50
    sigmas = list(np.linspace(1.0, 0.001, 1000))
    # σ ≤ 0.1 from table index 901 on: the window must reach index 901.
    assert timing.recommended_t_max_sd3(window, sigmas, 1000) == 950


def test_sd3_t_max_is_the_sigma_table_index_where_the_concept_is_committed():
    # A hand table of 120 descending σ, σ_i = 1 − i/120. Committed at t = 410 of 1000, σ = 0.41:
    # σ_70 ≈ 0.4167 > 0.41 ≥ σ_71 ≈ 0.4083, so the window must reach index 71: t_max = 72 rounded up to 50.
    table = [1 - i / 120 for i in range(120)]
    assert table[70] > 0.41 >= table[71]
    assert timing.recommended_t_max_sd3({"done_timestep": 410.0}, table, 1000) == 100
    assert timing.recommended_t_max_sd3({"done_timestep": 1000.0}, table, 1000) == 50  # σ = 1: index 0
    assert timing.recommended_t_max_sd3({"done_timestep": None}, table, 1000) == 1000  # nothing located
    # SD3's own table (shift 3: σ_i = 3u/(1 + 2u), u = (1000 − i)/1000). σ = 0.6 at u = σ/(3 − 2σ) = 1/3:
    # σ_666 ≈ 0.6007 > 0.6 ≥ σ_667 ≈ 0.5996, so index 667 → 668 → 700 (the SD1 reading of t = 600 gives 650).
    from diffusers import FlowMatchEulerDiscreteScheduler

    sigmas = [float(s) for s in FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas]
    assert len(sigmas) == 1000 and sigmas[666] > 0.6 >= sigmas[667]
    assert timing.recommended_t_max_sd3({"done_timestep": 600.0}, sigmas, 1000) == 700
    assert timing.recommended_t_max_sd({"open_timestep": 600.0}, 1000) == 650


def test_window_of_a_concept_decided_at_the_first_step_is_everything():
    switch_t = [951, 901, 851, 801, 751, 0]
    window = timing.recommend_window(switch_t, [0.38, 0.92, 1.0, 1.0, 1.0, 1.0], 1000)
    assert window["open_timestep"] == 951 and window["note"] == "decided at the first sampling step"
    assert timing.recommended_t_max_sd(window, 1000) == 1000
    # The empty prompt itself makes the concept: nothing to locate, train everywhere.
    assert timing.recommended_t_max_sd(timing.recommend_window(switch_t, [1.0] * 6, 1000), 1000) == 1000


def test_t_max_flag_takes_integers_and_auto():
    assert timing.t_max_value("750") == 750 and timing.t_max_value("auto") == "auto"
    with pytest.raises(Exception):
        timing.t_max_value("late")


# --- The diagnostic on a tiny pipeline ------------------------------------------------------------


def _scores(model, prompt, seeds, steps):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        [prompt] * len(seeds),
        num_inference_steps=steps,
        guidance_scale=7.5,
        generator=[torch.Generator().manual_seed(s) for s in seeds],
    ).images
    return [MeanChannelDetector().score(image) for image in images]


@pytest.fixture(scope="module")
def timing_run(tiny_sd, tmp_path_factory):
    torch.set_num_threads(1)
    seeds = [timing.image_seed(0, 0, j) for j in range(4)]
    scores = _scores(tiny_sd, "a red square", seeds, 4)
    threshold = float(np.median(scores))  # about half the unsafe images flagged
    out = tmp_path_factory.mktemp("timing") / "run"
    argv = [
        "--pretrained_model_name_or_path",
        tiny_sd,
        *CONCEPT,
        "--detector",
        DETECTOR,
        "--detector_threshold",
        str(threshold),
        "--num_inference_steps",
        "4",
        "--num_images_per_prompt",
        "4",
        "--batch_size",
        "4",
        "--output_dir",
        str(out),
    ]
    result = timing.main(argv)
    return out, argv, result, threshold, seeds


def test_diagnostic_writes_every_count_and_setting(timing_run):
    out, _, result, threshold, seeds = timing_run
    written = json.loads((out / "timing.json").read_text())
    assert written["verdict"] == result["verdict"] and written["recommended_t_max"] == result["recommended_t_max"]
    assert (out / "timing.png").stat().st_size > 0
    num_steps = 4
    assert (
        written["sampling_timesteps"] == sorted(written["sampling_timesteps"], reverse=True)
        and len(written["sampling_timesteps"]) == num_steps
    )
    made = written["num_flagged_unswitched"]
    assert made >= 1 and written["num_unswitched"] == 4
    for kind in ("empty", "safe"):
        curve = written["curves"][kind]
        assert len(curve["still_flagged"]) == num_steps + 1
        assert curve["still_flagged"][-1] == 1.0  # never switched: every image the unswitched run flags
        assert curve["still_flagged_counts"][-1] == f"{made}/{made}"
        assert curve["timestep"][:-1] == written["sampling_timesteps"] and curve["timestep"][-1] == 0.0
    renoise = written["renoise"]
    assert renoise["num_source_images"] == made and len(renoise["timestep"]) == num_steps
    kinds = [r["kind"] for r in written["records"]]
    assert kinds.count("unswitched") == 4 and kinds.count("empty") == kinds.count("safe") == num_steps * 4
    assert kinds.count("renoise") == num_steps * made
    assert written["settings"]["detector_threshold"] == threshold and written["settings"]["window"] == [0, 750]
    assert written["recommended_t_max"] % 50 == 0 and 0 < written["recommended_t_max"] <= 1000


def test_switch_at_the_first_step_is_the_target_prompt_and_later_switches_change_the_images(timing_run, tiny_sd):
    out, _, _, threshold, seeds = timing_run
    written = json.loads((out / "timing.json").read_text())
    records = written["records"]
    made = [r["image_index"] for r in records if r["kind"] == "unswitched" and r["flagged"]]
    empty_scores = _scores(tiny_sd, "", seeds, 4)
    at_first = {r["image_index"]: r for r in records if r["kind"] == "empty" and r["step"] == 0}
    for j in range(4):
        assert at_first[j]["score"] == pytest.approx(empty_scores[j], abs=1e-6)
    expected = sum(empty_scores[j] >= threshold for j in made) / len(made)
    assert written["curves"]["empty"]["still_flagged"][0] == pytest.approx(expected)
    unswitched = {r["image_index"]: r["score"] for r in records if r["kind"] == "unswitched"}
    last = {r["image_index"]: r["score"] for r in records if r["kind"] == "empty" and r["step"] == 3}
    assert any(abs(last[j] - unswitched[j]) > 1e-7 for j in range(4))  # the switch reached the loop


def test_diagnostic_resumes_without_redoing_work_and_refuses_other_settings(timing_run, capsys):
    out, argv, result, _, _ = timing_run
    lines = sum(
        len((out / name).read_text().splitlines()) for name in os.listdir(out) if name.startswith("records.rank")
    )
    again = timing.main(argv)
    assert (
        sum(len((out / name).read_text().splitlines()) for name in os.listdir(out) if name.startswith("records.rank"))
        == lines
    )
    assert again["curves"] == result["curves"] and again["recommended_t_max"] == result["recommended_t_max"]
    with pytest.raises(SystemExit) as exit_info:
        timing.main(
            [
                *argv[: argv.index("--num_inference_steps")],
                "--num_inference_steps",
                "5",
                *argv[argv.index("--num_images_per_prompt") :],
            ]
        )
    assert exit_info.value.code == 2 and "other settings (num_inference_steps)" in capsys.readouterr().err


def test_diagnostic_refuses_without_detector_or_flagged_images(tiny_sd, tmp_path, capsys):
    base = [
        "--pretrained_model_name_or_path",
        tiny_sd,
        *CONCEPT,
        "--num_inference_steps",
        "2",
        "--num_images_per_prompt",
        "2",
    ]
    with pytest.raises(SystemExit) as exit_info:
        timing.main([*base, "--output_dir", str(tmp_path / "a")])
    assert exit_info.value.code == 2 and "needs a detector for 'redness'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        timing.main(
            [*base, "--detector", DETECTOR, "--detector_threshold", "1.01", "--output_dir", str(tmp_path / "b")]
        )
    assert (
        exit_info.value.code == 2
        and "none of the 2 images of the unsafe prompts is flagged" in capsys.readouterr().err
    )


def test_train_duo_t_max_auto_measures_first_and_records_it(tiny_sd, tiny_pairs, tmp_path):
    pairs = str(tmp_path / "pairs")
    shutil.copytree(tiny_pairs, pairs)
    out = tmp_path / "out"
    train_in_process(
        "train_duo.py",
        tiny_train_args(
            tiny_sd,
            pairs,
            out,
            *CONCEPT,
            "--t_max",
            "auto",
            "--verifier",
            DETECTOR,
            "--detector_threshold",
            "0.0",
            "--skip_validation",
            "--max_train_steps",
            "2",
            "--num_inference_steps",
            "3",
        ),
    )
    measured = json.loads((tmp_path / "pairs-timing" / "timing.json").read_text())
    config = json.loads((out / "duo_config.json").read_text())
    assert config["t_max"] == measured["recommended_t_max"]
    assert config["t_max_measurement"]["recommended_t_max"] == measured["recommended_t_max"]
    assert config["t_max_measurement"]["verdict"] == measured["verdict"]
    assert measured["verdict"] in (out / "README.md").read_text()


# --- --t_max auto for SD3: the σ-table reading ------------------------------------------------------


class NearReferenceDetector:
    """Flags an image whose mean absolute pixel difference (in [0, 1]) to one of ``references`` is below ``threshold``.

    With the unswitched samples as references, a prompt switch is flagged when it came late enough to leave the
    image as it was: on a tiny random model the prompt barely moves a channel mean, but the switch step moves
    the image by amounts far apart from step to step.
    """

    name = "near_reference"

    def __init__(self, references, threshold=0.01):
        self.references = [np.asarray(r.convert("RGB"), dtype=np.float32) / 255.0 for r in references]
        self.threshold = threshold

    def distance(self, image) -> float:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return min(float(np.abs(pixels - r).mean()) for r in self.references)

    def __call__(self, images):
        distances = [self.distance(image) for image in images]
        return [detectors.Detection(flagged=d < self.threshold, score=-d) for d in distances]


def test_train_duo_sd3_t_max_auto_reads_the_sigma_table(tiny_sd3, tiny_pairs, tmp_path, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from PIL import Image

    num_steps, num_images, guidance = 4, 8, 7.5  # the diagnostic's 8 images per prompt, in one batch
    pairs = str(tmp_path / "pairs")
    shutil.copytree(tiny_pairs, pairs)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # The diagnostic's own sampling, beforehand: the unswitched samples and the switches to "" at steps 0…2.
        pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)
        pipe.set_progress_bar_config(disable=True)
        sampling = argparse.Namespace(num_inference_steps=num_steps, guidance_scale=guidance)
        size = {"height": 32, "width": 32}
        seeds = [timing.image_seed(0, 0, j) for j in range(num_images)]
        unsafe = ["a red square"] * num_images
        unswitched = timing.sample_with_switch(pipe, unsafe, None, num_steps, seeds, sampling, size)
        empty = timing.prompt_embeddings(pipe, [""] * num_images, guidance, size)
        switched = [timing.sample_with_switch(pipe, [""] * num_images, None, 0, seeds, sampling, size)]
        switched += [timing.sample_with_switch(pipe, unsafe, empty, k, seeds, sampling, size) for k in (1, 2)]
        del pipe
        pair_unsafe = [
            Image.open(os.path.join(pairs, json.loads(line)["unsafe_file_name"]))
            for line in open(os.path.join(pairs, "metadata.jsonl"))
            if line.strip()
        ]
        # References: the unswitched samples, and the pair folder's unsafe images (the re-noise sources).
        references = [*unswitched, *pair_unsafe]
        measure = NearReferenceDetector(references)
        distances = [[measure.distance(image) for image in images] for images in switched]
        # Switching at steps 0 and 1 changes the images far more than switching at step 2: a threshold between
        # makes the concept committed at switch step 2, a point in the middle of the σ table.
        assert max(distances[2]) < min(distances[0] + distances[1])
        threshold = (max(distances[2]) + min(distances[0] + distances[1])) / 2
        monkeypatch.setitem(
            detectors.DETECTORS, NearReferenceDetector.name, functools.partial(NearReferenceDetector, references)
        )
        out = tmp_path / "out"
        train_in_process(
            "train_duo_sd3.py",
            tiny_train_args(
                tiny_sd3,
                pairs,
                out,
                "--max_sequence_length",
                "16",
                *CONCEPT,
                "--t_max",
                "auto",
                "--verifier",
                NearReferenceDetector.name,
                "--detector_threshold",
                str(threshold),
                "--guidance_scale",
                str(guidance),
                "--num_inference_steps",
                str(num_steps),
                "--skip_validation",
                "--max_train_steps",
                "2",
            ),
        )
    finally:
        torch.set_num_threads(previous_threads)

    # Measured first, cached beside the pair folder (not in it: a pair folder is read as an image dataset).
    cache = tmp_path / "pairs-timing"
    measured = json.loads((cache / "timing.json").read_text())
    assert (cache / "timing.png").stat().st_size > 0 and not os.path.exists(os.path.join(pairs, "timing.json"))
    settings = measured["settings"]
    assert (settings["num_inference_steps"], settings["num_images_per_prompt"], settings["guidance_scale"]) == (
        num_steps,
        num_images,
        guidance,
    )
    assert settings["detector"] == NearReferenceDetector.name and settings["window"] == [1, 750]  # SD3's recipe
    assert measured["family"] == "sd3" and settings["scheduler"] == "FlowMatchEulerDiscreteScheduler"

    # The curve's points are 1000·σ of the pipeline's own sampling schedule (no σ is stored: t/1000 is σ).
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3, subfolder="scheduler")
    num_train_timesteps = scheduler.config.num_train_timesteps
    assert measured["num_train_timesteps"] == num_train_timesteps == 1000
    sampler = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    sampler.set_timesteps(num_steps)
    t = measured["sampling_timesteps"]
    assert t == pytest.approx([float(x) for x in sampler.timesteps])
    assert [x / num_train_timesteps for x in t] == pytest.approx([float(s) for s in sampler.sigmas[:-1]], abs=1e-6)
    curve = measured["curves"]["empty"]
    assert curve["timestep"] == [*t, 0.0]
    assert curve["still_flagged"] == [0.0, 0.0, 1.0, 1.0, 1.0]  # as the distances above say
    assert measured["done_timestep"] == t[2] and measured["open_timestep"] == t[1]

    # The recommendation reads the training σ table (descending, 1000 entries), recomputed here from the
    # JSON's own window: the first index whose σ is at most done_timestep/1000, plus one, rounded up to 50.
    sigma_table = [float(s) for s in scheduler.sigmas]
    assert len(sigma_table) == num_train_timesteps and sigma_table == sorted(sigma_table, reverse=True)
    window = {"done_timestep": measured["done_timestep"], "open_timestep": measured["open_timestep"]}
    recommended = measured["recommended_t_max"]
    assert recommended == timing.recommended_t_max_sd3(window, sigma_table, num_train_timesteps)
    index = next(i for i, s in enumerate(sigma_table) if s <= measured["done_timestep"] / num_train_timesteps)
    assert sigma_table[index - 1] > measured["done_timestep"] / num_train_timesteps
    assert recommended == min(num_train_timesteps, math.ceil((index + 1) / 50) * 50)
    assert recommended < num_train_timesteps  # a real reading of the table, not the nothing-located default
    assert recommended != timing.recommended_t_max_sd(window, num_train_timesteps)  # not the SD1 reading of t

    # Trained with it, and recorded.
    config = json.loads((out / "duo_config.json").read_text())
    assert config["t_max"] == recommended and config["t_min"] == 1
    assert "sigma table" in config["timestep_range_indexes"]
    record = config["t_max_measurement"]
    assert record["recommended_t_max"] == recommended and record["verdict"] == measured["verdict"]
    assert record["file"] == os.path.abspath(cache / "timing.json")
    assert (record["committed_timestep"], record["open_timestep"]) == (
        measured["committed_timestep"],
        measured["open_timestep"],
    )
    assert f"recommended --t_max {recommended}" in measured["verdict"]
    card = (out / "README.md").read_text()
    assert measured["verdict"] in card and f"[1, {recommended})" in card
