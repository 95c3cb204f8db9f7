"""duo_plugin.timing: where a concept is decided, and --t_max auto."""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_train_args, train_in_process

from duo_plugin import timing
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
