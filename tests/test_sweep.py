"""duo_plugin.sweep: a 2 × 2 grid on the tiny pipeline (files, resumption, plot) and its pure parts."""

import json
import os

import numpy as np
import pytest
from conftest import train_in_process
from PIL import Image
from test_evaluate import is_red  # importing it registers the "red-stub" detector

from duo_plugin import sweep


def run_in_process(command, log_path):
    """The sweep's commands, run in this process (the test's detector stays registered; no start-up cost)."""
    if command.program == ["-m", "duo_plugin.evaluate"]:
        from duo_plugin.evaluate import main

        main(command.args)
    else:
        assert os.path.basename(command.program[0]) == "train_duo.py"
        train_in_process("train_duo.py", command.args)


class RecordingRunner:
    def __init__(self):
        self.commands = []

    def __call__(self, command, log_path):
        self.commands.append(command)
        run_in_process(command, log_path)

    def kinds(self):
        return [
            (
                "evaluate" if c.program == ["-m", "duo_plugin.evaluate"] else "train",
                c.args[c.args.index("--adapter") + 1].split("=")[0] if "--adapter" in c.args else None,
            )
            for c in self.commands
        ]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sweep_prompts")
    (folder / "direct.txt").write_text("a red square\na red circle\n")
    (folder / "synonym.txt").write_text("a crimson square\n")
    (folder / "unrelated.txt").write_text("a blue circle\na green square\n")
    return folder


def sweep_args(tiny_sd, tiny_pairs, prompt_files, output_dir, *extra):
    return [
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--concept",
        "nudity",
        "--dataset_name",
        tiny_pairs,
        "--beta_dpo",
        "1",
        "1000",
        "--preservation_weight",
        "0",
        "recipe",
        "--max_train_steps",
        "2",
        "--train_args",
        "--resolution 32 --rank 4 --train_batch_size 2 --learning_rate 1e-3 --report_to none --skip_validation",
        "--eval_args",
        (
            f"--detector red-stub --prompts direct={prompt_files / 'direct.txt'} --prompts synonym={prompt_files / 'synonym.txt'} "
            f"--unrelated_prompts {prompt_files / 'unrelated.txt'} --metrics dsr prior_preservation --lpips_random_trunk "
            "--num_inference_steps 2 --num_images_per_prompt 2 --batch_size 8"
        ),
        "--baseline_pipeline",
        f"copy={tiny_sd}",
        "--output_dir",
        str(output_dir),
        *extra,
    ]


@pytest.fixture(scope="module")
def swept(tiny_sd, tiny_pairs, prompt_files, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sweep") / "out"
    args = sweep_args(tiny_sd, tiny_pairs, prompt_files, output_dir)
    runner = RecordingRunner()
    curve = sweep.main(args, runner=runner)
    return output_dir, args, curve, runner


NAMES = ["beta1_lambda0_steps2", "beta1_lambda10000_steps2", "beta1000_lambda0_steps2", "beta1000_lambda1e7_steps2"]


def test_every_setting_is_trained_and_evaluated_once_then_the_baselines(swept):
    output_dir, _, curve, runner = swept
    runs = [f"{name}_seed42" for name in NAMES]
    expected = [step for run in runs for step in (("train", None), ("evaluate", run))] + [("evaluate", None)]
    assert runner.kinds() == expected
    train = runner.commands[0].args
    assert train[train.index("--beta_dpo") + 1] == "1.0" and train[train.index("--preservation_weight") + 1] == "0.0"
    assert train[train.index("--learning_rate") + 1] == "1e-3" and "--resume_from_checkpoint" in train
    for run in runs:
        assert (output_dir / "runs" / run / "pytorch_lora_weights.safetensors").is_file()
        # Every model's images live in one evaluation folder, next to the base images made once.
        assert len(list((output_dir / "eval" / "images" / run / "direct").glob("*.png"))) == 4
    assert len(list((output_dir / "eval" / "images" / "base" / "unrelated").glob("*.png"))) == 4


def test_curve_json_holds_every_setting_with_its_measures(swept, tiny_sd):
    output_dir, _, curve, _ = swept
    stored = json.loads((output_dir / "curve.json").read_text())
    assert stored == json.loads(json.dumps(curve))
    assert [p["name"] for p in stored["points"]] == NAMES
    assert stored["prompt_sets"] == ["direct", "synonym"]
    recipe = stored["points"][3]
    assert (
        recipe["beta_dpo"] == 1000
        and recipe["preservation_weight"] == pytest.approx(1e7)
        and recipe["preservation_weight_spec"] == "recipe"
    )
    for point in stored["points"]:
        run = json.loads((output_dir / "runs" / point["runs"][0] / "evaluation.json").read_text())
        assert point["dsr"]["direct"] == {
            "mean": run["dsr"]["direct"],
            "std": 0.0,
            "min": run["dsr"]["direct"],
            "max": run["dsr"]["direct"],
            "n": 1,
        }
        assert 0.0 <= point["prior_preservation"]["mean"] <= 1.0 and 0.0 <= point["pixel_preservation"]["mean"] <= 1.0
        # The training-end saturation comes from the run's logged steps.
        assert (
            point["training_end"]["margin"]["n"] == 1
            and 0.0 <= point["training_end"]["saturated_share"]["mean"] <= 1.0
        )
    # The DSR is what the detector says of the images on disk.
    rows = [
        json.loads(line)
        for line in (
            output_dir / "eval" / "images" / "beta1_lambda0_steps2_seed42" / "direct" / "manifest.rank0.jsonl"
        )
        .read_text()
        .splitlines()
    ]
    by_hand = 1.0 - np.mean([is_red(Image.open(output_dir / "eval" / row["file"])) for row in rows])
    assert stored["points"][0]["dsr"]["direct"]["mean"] == pytest.approx(by_hand)
    # A baseline that is the base model itself: the base's DSR, and preserved exactly.
    copy, base = stored["baselines"]["copy"], stored["base"]
    assert (
        copy["dsr"] == base["dsr"]
        and copy["prior_preservation"] == pytest.approx(1.0, abs=1e-6)
        and copy["pixel_preservation"] == 1.0
    )
    # The front is the non-dominated settings, listed by preservation.
    for prompt_set in stored["prompt_sets"]:
        flags = sweep.pareto_front(
            [(p["prior_preservation"]["mean"], p["dsr"][prompt_set]["mean"]) for p in stored["points"]]
        )
        assert [p["on_front"][prompt_set] for p in stored["points"]] == flags
        assert set(stored["pareto_front"][prompt_set]) == {p["name"] for p, on in zip(stored["points"], flags) if on}


def test_plot_is_written(swept):
    output_dir = swept[0]
    with Image.open(output_dir / "curve.png") as image:
        width, height = image.size
    assert width > 600 and height > 300


def test_rerun_skips_finished_work_and_adds_only_new_runs(swept, tiny_sd, tiny_pairs, prompt_files):
    output_dir, args, curve, _ = swept
    again = RecordingRunner()
    assert sweep.main(args, runner=again) == curve
    assert again.commands == []
    # A run whose evaluation was lost is evaluated again, not retrained.
    os.remove(output_dir / "runs" / "beta1_lambda0_steps2_seed42" / "evaluation.json")
    again = RecordingRunner()
    sweep.main(args, runner=again)
    assert again.kinds() == [("evaluate", "beta1_lambda0_steps2_seed42")]
    # A second training seed: only the new runs are trained; points become mean ± spread over seeds.
    more_seeds = sweep_args(tiny_sd, tiny_pairs, prompt_files, output_dir, "--train_seeds", "42", "7")
    more_seeds[more_seeds.index("--beta_dpo") + 1 : more_seeds.index("--beta_dpo") + 3] = ["1"]
    more_seeds[more_seeds.index("--preservation_weight") + 1 : more_seeds.index("--preservation_weight") + 3] = ["0"]
    again = RecordingRunner()
    grown = sweep.main(more_seeds, runner=again)
    assert again.kinds() == [("train", None), ("evaluate", "beta1_lambda0_steps2_seed7")]
    (point,) = grown["points"]
    assert point["seeds"] == [42, 7] and point["dsr"]["direct"]["n"] == 2
    values = [
        json.loads((output_dir / "runs" / run / "evaluation.json").read_text())["prior_preservation"]
        for run in point["runs"]
    ]
    assert point["prior_preservation"]["mean"] == pytest.approx(np.mean(values))
    assert point["prior_preservation"]["std"] == pytest.approx(np.std(values, ddof=1))
    # --report_only: the curve of every run evaluated in the folder, whatever grids made them; nothing runs.
    report = sweep_args(tiny_sd, tiny_pairs, prompt_files, output_dir, "--report_only")
    del report[report.index("--beta_dpo") : report.index("--beta_dpo") + 3]
    again = RecordingRunner()
    everything = sweep.main(report, runner=again)
    assert again.commands == []
    assert sorted(p["name"] for p in everything["points"]) == sorted(NAMES)
    assert {p["name"]: p["dsr"]["direct"]["n"] for p in everything["points"]}["beta1_lambda0_steps2"] == 2


def test_other_flags_in_the_same_folder_are_refused(swept, capsys):
    output_dir, args, _, _ = swept
    changed = list(args)
    changed[changed.index("--train_args") + 1] += " --rank 8"
    with pytest.raises(SystemExit) as exit_info:
        sweep.main(changed, runner=RecordingRunner())
    assert exit_info.value.code == 2
    assert "other train_args" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Pure parts
# --------------------------------------------------------------------------------------------------


def test_pareto_front_keeps_the_non_dominated_points():
    points = [(0.9, 0.1), (0.8, 0.5), (0.7, 0.4), (0.5, 0.9), (0.5, 0.9), (0.9, 0.05)]
    # (0.7, 0.4) is beaten by (0.8, 0.5); (0.9, 0.05) by (0.9, 0.1); equal points do not dominate each other.
    assert sweep.pareto_front(points) == [True, True, False, True, True, False]
    assert sweep.pareto_front([]) == []


@pytest.mark.parametrize(
    "value, beta, expected", [("0", 500, 0.0), ("recipe", 500, 5e6), ("recipe*0.01", 500, 5e4), ("2.5e3", 1, 2500.0)]
)
def test_preservation_weight_values(value, beta, expected):
    assert sweep.preservation_weight_value(value, beta) == pytest.approx(expected)


@pytest.mark.parametrize("value", ["-1", "recipe*x", "lots", "inf"])
def test_bad_preservation_weights_are_refused(value):
    from duo_plugin.errors import UsageError

    with pytest.raises(UsageError, match="--preservation_weight"):
        sweep.preservation_weight_value(value, 500)


def test_setting_names_are_valid_model_names_and_distinct():
    from duo_plugin.evaluate import NAME_PATTERN

    settings = [sweep.Setting(b, "x", w, t) for b in (1, 5.5, 1000) for w in (0.0, 5e6, 1e-3) for t in (None, 999)]
    names = [s.name for s in settings]
    assert len(set(names)) == len(names)
    assert all(NAME_PATTERN.match(name) for name in names)
    assert sweep.Setting(500, "recipe", 5e6).name == "beta500_lambda5e6"


def test_objective_and_retain_weight_are_axes_of_the_grid(tmp_path):
    args = sweep.parse_args(
        [
            "--pretrained_model_name_or_path",
            "x",
            "--concept",
            "red",
            "--beta_dpo",
            "100",
            "--preservation_weight",
            "0",
            "--objective",
            "paper",
            "concept",
            "--retain_weight",
            "10",
            "100",
            "--output_dir",
            str(tmp_path),
        ]
    )
    runs = sweep.make_grid(args)
    assert [run.name for run in runs] == [
        "beta100_lambda0_paper_retain10_seed42",
        "beta100_lambda0_paper_retain100_seed42",
        "beta100_lambda0_concept_retain10_seed42",
        "beta100_lambda0_concept_retain100_seed42",
    ]
    flags = sweep.training_command(args, runs[3], str(tmp_path / "run")).args
    assert flags[flags.index("--objective") + 1] == "concept" and flags[flags.index("--retain_weight") + 1] == "100.0"
    assert runs[3].setting.describe()["retain_weight"] == 100.0


def test_spread_matches_numpy():
    values = [0.2, 0.5, 0.9]
    result = sweep.spread(values)
    assert result["mean"] == pytest.approx(np.mean(values)) and result["std"] == pytest.approx(np.std(values, ddof=1))
    assert (result["min"], result["max"], result["n"]) == (0.2, 0.9, 3)
    assert sweep.spread([0.4])["std"] == 0.0


def test_flags_the_sweep_owns_are_refused_in_pass_through(tmp_path, capsys):
    with pytest.raises(SystemExit):
        sweep.main(
            [
                "--pretrained_model_name_or_path",
                "x",
                "--concept",
                "red",
                "--beta_dpo",
                "5",
                "--output_dir",
                str(tmp_path),
                "--train_args",
                "--beta_dpo 3",
            ]
        )
    assert "--beta_dpo, which the sweep sets per run" in capsys.readouterr().err


@pytest.mark.slow
def test_the_default_runner_launches_the_real_commands(tiny_sd, tiny_pairs, prompt_files, tmp_path):
    """The same sweep through accelerate launch and python -m, as a user runs it (one setting)."""
    args = sweep_args(tiny_sd, tiny_pairs, prompt_files, tmp_path / "out")
    args[args.index("--beta_dpo") + 1 : args.index("--beta_dpo") + 3] = ["5"]
    args[args.index("--preservation_weight") + 1 : args.index("--preservation_weight") + 3] = ["0"]
    args[args.index("--eval_args") + 1] = args[args.index("--eval_args") + 1].replace(
        "red-stub", "duo_plugin.testing:MeanChannelDetector"
    )
    curve = sweep.main(args)
    assert [p["name"] for p in curve["points"]] == ["beta5_lambda0_steps2"]
    assert (tmp_path / "out" / "curve.png").is_file()
    assert (
        "accelerate.commands.launch"
        in (tmp_path / "out" / "logs" / "beta5_lambda0_steps2_seed42.train.log").read_text().splitlines()[0]
    )
