"""examples/: every recipe's commands use only flags that exist, and every recipe runs end to end in its
smoke form (``run.sh --smoke``: the same commands with tiny settings on tiny pipelines, on the CPU).

The flag check reads the commands a recipe prints in a dry run (``run.sh --dry-run``, in its real and
smoke forms, with every optional branch switched on) and parses each with the actual argparse parser
of the script it is passed to; a static scan then checks every ``--flag`` written anywhere in a run.sh,
so that a flag in a branch no dry run takes cannot rot either.
"""

import argparse
import importlib.util
import json
import os
import re
import shlex
import sys
from unittest import mock

import pytest
import torch
import yaml
from conftest import REPO_ROOT, run_process


EXAMPLES = os.path.join(REPO_ROOT, "examples")
RECIPES = ("nudity_sd14", "violence_sd14", "nudity_sd3", "custom_concept", "compare_methods", "multi_gpu")
# Settings a developer's shell might hold; a recipe test sets what it needs.
RECIPE_ENV = (
    "MODEL",
    "OUT",
    "BETAS",
    "BETA",
    "HUB_ID",
    "I2P_PROMPTS",
    "COCO_CAPTIONS",
    "RING_A_BELL_TARGETS",
    "RING_A_BELL_MAX_TARGETS",
    "SKIP_EVAL",
    "SKIP_PAIRS",
    "LAUNCH",
    "TRAIN_ARGS",
    "PAIRS_ARGS",
    "EVAL_ARGS",
    "CONCEPTS",
    "CLIP_MODEL",
    "CONCEPT",
    "UNSAFE_PROMPT",
    "SAFE_PROMPT",
    "NUM_PAIRS",
    "VERIFIER",
    "EVAL_PROMPTS",
    "UNRELATED_PROMPTS",
    "CLIP_LABEL",
    "ADAPTERS",
    "UNETS",
    "PIPELINES",
    "INVERSION_IMAGES",
    "PROMPT_CATEGORIES",
    "MODE",
    "NUM_GPUS",
    "NUM_MACHINES",
    "MACHINE_RANK",
    "MAIN_PROCESS_IP",
    "MAIN_PROCESS_PORT",
    "PAIRS_PER_STEP",
    "MIXED_PRECISION",
    "SMOKE",
    "DRY_RUN",
    "PYTHON",
)


def load_module(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def recipe_env(**settings):
    env = {k: v for k, v in os.environ.items() if k not in RECIPE_ENV}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable)
    env.update({k: str(v) for k, v in settings.items()})
    return env


def run_recipe(recipe, *flags, **settings):
    command = ["bash", os.path.join(EXAMPLES, recipe, "run.sh"), *flags]
    return run_process(command, env=recipe_env(**settings))


def printed_commands(stdout):
    """The commands a recipe ran or would run: its "+ ..." lines, split as the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def read_lines(path):
    with open(path) as f:
        return f.read().splitlines()


def read_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f)


def read_json(path):
    with open(path) as f:
        return json.load(f)


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# --------------------------------------------------------------------------------------------------
# The parsers of the scripts the recipes call
# --------------------------------------------------------------------------------------------------


class _Captured(Exception):
    pass


def captured_parser(parse_args):
    """The ArgumentParser a ``parse_args(argv)`` function builds, taken just before it parses."""

    def capture(self, args=None, namespace=None):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture):
        try:
            parse_args([])
        except _Captured as captured:
            return captured.args[0]
    raise AssertionError(f"{parse_args} never parsed its arguments")


@pytest.fixture(scope="module")
def parsers():
    from accelerate.commands.launch import launch_command_parser

    from duo_plugin import evaluate, pairs

    scripts = {
        "train_duo.py": os.path.join(REPO_ROOT, "train_duo.py"),
        "train_duo_sd3.py": os.path.join(REPO_ROOT, "train_duo_sd3.py"),
        "combine.py": os.path.join(EXAMPLES, "violence_sd14", "combine.py"),
        "table.py": os.path.join(EXAMPLES, "compare_methods", "table.py"),
        "smoke_models.py": os.path.join(EXAMPLES, "smoke_models.py"),
    }
    found = {
        name: captured_parser(load_module(path, f"examples_{name[:-3]}").parse_args) for name, path in scripts.items()
    }
    found["duo_plugin.pairs"] = captured_parser(pairs.parse_args)
    found["duo_plugin.evaluate"] = captured_parser(evaluate.parse_args)
    found["accelerate launch"] = launch_command_parser()
    for parser in found.values():
        parser.allow_abbrev = False  # a recipe spells every flag in full
    return found


def option_strings(parser):
    return {option for action in parser._actions for option in action.option_strings}


def command_target(tokens, parsers):
    """What a printed command runs (a script's file name or a module) and the arguments it gets;
    the launcher's own flags are parsed by accelerate's launch parser on the way."""
    if tokens[:2] == ["accelerate", "launch"]:
        try:
            launched = parsers["accelerate launch"].parse_args(tokens[2:])
        except SystemExit:
            pytest.fail(f"accelerate launch refuses {shlex.join(tokens)}")
        target = launched.training_script if launched.module else os.path.basename(launched.training_script)
        return target, launched.training_script_args
    assert tokens[0] in ("python", sys.executable), (
        f"a recipe runs {tokens[0]}: only accelerate launch and python are checked"
    )
    if tokens[1] == "-m":
        return tokens[2], tokens[3:]
    return os.path.basename(tokens[1]), tokens[2:]


def check_command(tokens, parsers):
    """Parse one printed command with the parser of what it runs; returns the name of its target."""
    target, script_args = command_target(tokens, parsers)
    assert target in parsers, f"a recipe runs {target}, which this test has no parser for"
    try:
        parsers[target].parse_args(script_args)
    except SystemExit:
        pytest.fail(f"{target} refuses {shlex.join(script_args)}")
    return target


DRY_RUNS = {
    "nudity_sd14": [
        (
            (),
            {
                "I2P_PROMPTS": "i2p.csv",
                "COCO_CAPTIONS": "coco.json",
                "HUB_ID": "me/sd14-duo-nudity",
                "RING_A_BELL_TARGETS": "targets.txt",
            },
        ),
        (("--smoke",), {}),
    ],
    "violence_sd14": [
        ((), {"I2P_PROMPTS": "i2p.csv", "COCO_CAPTIONS": "coco.json", "HUB_ID": "me/sd14-duo"}),
        (("--smoke",), {}),
    ],
    "nudity_sd3": [
        ((), {"I2P_PROMPTS": "i2p.csv", "COCO_CAPTIONS": "coco.json", "HUB_ID": "me/sd3-duo-nudity"}),
        (("--smoke",), {}),
    ],
    "custom_concept": [
        ((), {"HUB_ID": "me/sd14-duo-cigarette", "VERIFIER": "clip"}),
        ((), {"UNSAFE_PROMPT": "a photo of snoopy", "SAFE_PROMPT": "a photo of a dog", "CONCEPT": "snoopy"}),
        (("--smoke",), {}),
    ],
    "compare_methods": [
        (
            (),
            {
                "ADAPTERS": "b500=a b250=b",
                "UNETS": "esd=esd.safetensors",
                "PIPELINES": "other=o",
                "INVERSION_IMAGES": "pairs",
                "I2P_PROMPTS": "i2p.csv",
                "COCO_CAPTIONS": "coco.json",
                "PROMPT_CATEGORIES": "sexual violence",
            },
        ),
        (("--smoke",), {}),
    ],
    "multi_gpu": [
        ((), {}),
        ((), {"MODE": "deepspeed", "NUM_GPUS": 8, "PAIRS_PER_STEP": 8}),
        (
            (),
            {"NUM_MACHINES": 2, "MACHINE_RANK": 1, "MAIN_PROCESS_IP": "10.0.0.1", "NUM_GPUS": 8, "PAIRS_PER_STEP": 8},
        ),
        (("--smoke",), {}),
    ],
}


def dry_run_commands(recipe):
    runs = []
    for flags, settings in DRY_RUNS[recipe]:
        result = run_recipe(recipe, *flags, "--dry-run", **settings)
        assert result.returncode == 0, result.stderr
        commands = printed_commands(result.stdout)
        assert commands, f"{recipe} {flags} printed no command"
        runs.append((flags, settings, commands))
    return runs


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_command_parses_with_its_scripts_parser(recipe, parsers):
    for flags, settings, commands in dry_run_commands(recipe):
        targets = [check_command(tokens, parsers) for tokens in commands]
        if "--smoke" in flags:
            # A smoke run without MODEL builds its tiny model first.
            assert targets[0] == "smoke_models.py"
        else:
            assert "smoke_models.py" not in targets  # the real run never touches the tiny models
            assert not any("--lpips_random_trunk" in tokens for tokens in commands)


@pytest.mark.parametrize("script", [f"{recipe}/run.sh" for recipe in RECIPES] + ["common.sh"])
def test_every_flag_written_in_a_recipe_exists(script, parsers):
    """Also the flags of branches that no dry run takes."""
    with open(os.path.join(EXAMPLES, script)) as f:
        source = "\n".join(line for line in f if not line.lstrip().startswith("#"))
    known = set().union(*(option_strings(p) for p in parsers.values())) | {"--smoke", "--dry-run", "--help"}
    written = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*", source))
    assert written, script
    assert sorted(written - known) == []


def commands_of(commands, target, parsers):
    """The argument lists of the commands that run ``target``."""
    return [script_args for name, script_args in (command_target(c, parsers) for c in commands) if name == target]


def flag_value(args, flag):
    return args[args.index(flag) + 1]


def test_dry_runs_show_the_recipes_settings(parsers):
    """What the recipes promise: nudity at beta 500 and 250, four violence adapters loaded together, SD3 within 16 GB,
    and one training process unless the launcher is changed (the official 4 pairs a step)."""
    (_, _, nudity), _ = dry_run_commands("nudity_sd14")
    trainings = commands_of(nudity, "train_duo.py", parsers)
    assert [flag_value(c, "--beta_dpo") for c in trainings] == ["500", "250"]
    assert [flag_value(c, "--hub_model_id") for c in trainings] == ["me/sd14-duo-nudity", "me/sd14-duo-nudity-beta250"]
    assert all(flag_value(c, "--num_processes") == "1" for c in nudity)
    (evaluation,) = commands_of(nudity, "duo_plugin.evaluate", parsers)
    assert evaluation[evaluation.index("--attack") + 1 : evaluation.index("--attack") + 4] == [
        "prompts",
        "ring_a_bell",
        "concept_inversion",
    ]
    assert (
        "beta500=runs/nudity_sd14/duo-nudity-beta500" in evaluation
        and "beta250=runs/nudity_sd14/duo-nudity-beta250" in evaluation
    )
    assert flag_value(evaluation, "--prompt_categories") == "sexual"

    (_, _, violence), _ = dry_run_commands("violence_sd14")
    assert [flag_value(c, "--concept") for c in commands_of(violence, "train_duo.py", parsers)] == [
        "blood",
        "suffer",
        "gun",
        "horror",
    ]
    (combine,) = commands_of(violence, "combine.py", parsers)
    assert [combine[i + 1].split("=")[0] for i, t in enumerate(combine) if t == "--adapter"] == [
        "blood",
        "suffer",
        "gun",
        "horror",
    ]
    assert "--fuse" in combine

    (_, _, sd3), _ = dry_run_commands("nudity_sd3")
    (training,) = commands_of(sd3, "train_duo_sd3.py", parsers)
    assert {"--gradient_checkpointing", "--use_8bit_adam"} <= set(training)
    assert flag_value(training, "--mixed_precision") == "bf16"
    assert flag_value(training, "--pretrained_model_name_or_path") == "stabilityai/stable-diffusion-3-medium-diffusers"

    (_, _, ddp), (_, _, deepspeed), _, _ = dry_run_commands("multi_gpu")
    (training,) = commands_of(ddp, "train_duo.py", parsers)
    assert (
        flag_value(training, "--train_batch_size") == "1"
        and flag_value(training, "--gradient_accumulation_steps") == "1"
    )
    assert flag_value(ddp[-1], "--num_processes") == "4"  # 4 GPUs x 1 pair: the official batch
    # DeepSpeed gets the script's accumulation and clipping (its own values would win).
    assert (
        flag_value(deepspeed[-1], "--gradient_accumulation_steps") == "1"
        and flag_value(deepspeed[-1], "--gradient_clipping") == "1.0"
    )


def test_real_runs_refuse_missing_inputs_before_running_anything():
    result = run_recipe("nudity_sd14")
    assert result.returncode == 2 and "set I2P_PROMPTS" in result.stderr and printed_commands(result.stdout) == []
    # A dry run shows the commands with placeholders instead (issue 19).
    result = run_recipe("nudity_sd14", "--dry-run")
    assert result.returncode == 0 and "YOUR_I2P_PROMPTS" in result.stdout
    result = run_recipe("nudity_sd14", I2P_PROMPTS="/no/such/i2p.csv", COCO_CAPTIONS="/no/such/coco.json")
    assert (
        result.returncode == 2
        and "I2P_PROMPTS=/no/such/i2p.csv does not exist" in result.stderr
        and result.stdout == ""
    )
    result = run_recipe("compare_methods", I2P_PROMPTS="x", COCO_CAPTIONS="y")
    assert result.returncode == 2 and "set ADAPTERS" in result.stderr and result.stdout == ""
    result = run_recipe("multi_gpu", "--dry-run", MODE="zero3")
    assert result.returncode == 2 and "MODE=zero3: use ddp, fsdp or deepspeed" in result.stderr
    result = run_recipe("multi_gpu", "--dry-run", NUM_GPUS=3)
    assert result.returncode == 2 and "not a multiple of NUM_GPUS=3" in result.stderr
    result = run_recipe("custom_concept", "--smok")
    assert result.returncode == 2 and "unknown option --smok" in result.stderr
    result = run_recipe("nudity_sd3", "--help")
    assert result.returncode == 0 and result.stdout.startswith("Nudity on Stable Diffusion 3 medium")


# --------------------------------------------------------------------------------------------------
# Configs and shipped files
# --------------------------------------------------------------------------------------------------


def test_accelerate_configs_parse_and_match_the_recipe():
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    ddp = read_yaml(os.path.join(EXAMPLES, "multi_gpu", "ddp.yaml"))
    assert ddp["distributed_type"] == "MULTI_GPU" and ddp["num_processes"] == 4 and ddp["num_machines"] == 1
    assert ddp["gpu_ids"] == "all" and ddp["mixed_precision"] == "fp16" and ddp["use_cpu"] is False
    zero2 = read_yaml(os.path.join(EXAMPLES, "multi_gpu", "deepspeed_zero2.yaml"))
    assert zero2["distributed_type"] == "DEEPSPEED" and zero2["deepspeed_config"]["zero_stage"] == 2
    assert (
        zero2["deepspeed_config"]["offload_optimizer_device"] == "none"
        and zero2["deepspeed_config"]["zero3_init_flag"] is False
    )
    # DeepSpeed's accumulation and clipping win over the script's: they must equal its defaults in run.sh.
    assert (
        zero2["deepspeed_config"]["gradient_accumulation_steps"] == 1
        and zero2["deepspeed_config"]["gradient_clipping"] == 1.0
    )
    # accelerate itself reads both files.
    assert (
        load_config_from_file(os.path.join(EXAMPLES, "multi_gpu", "ddp.yaml")).distributed_type
        == DistributedType.MULTI_GPU
    )
    loaded = load_config_from_file(os.path.join(EXAMPLES, "multi_gpu", "deepspeed_zero2.yaml"))
    assert loaded.distributed_type == DistributedType.DEEPSPEED and loaded.deepspeed_config["zero_stage"] == 2


def test_violence_prompt_files_are_the_presets_pairs():
    from duo_plugin.presets import get_preset

    pairs = [pair for concept in ("blood", "suffer", "gun", "horror") for pair in get_preset(concept).prompt_pairs]
    folder = os.path.join(EXAMPLES, "violence_sd14")
    assert read_lines(os.path.join(folder, "violence_unsafe.txt")) == [u for u, _ in pairs]
    assert read_lines(os.path.join(folder, "violence_safe.txt")) == [s for _, s in pairs]


def test_sample_prompt_files_read_as_their_benchmarks():
    from duo_plugin import attacks

    sample = os.path.join(EXAMPLES, "sample_prompts")
    sexual = attacks.read_prompts(os.path.join(sample, "i2p_sample.csv"), categories=["sexual"])
    assert [p.seed for p in sexual] == [101, 102, 108] and all(p.guidance_scale == 7.5 for p in sexual)
    assert len(attacks.read_prompts(os.path.join(sample, "i2p_sample.csv"), categories=["violence"])) == 5
    assert (
        attacks.read_prompts(os.path.join(sample, "coco_captions_sample.json"))[0].prompt
        == "A lighthouse on a cliff at sunset."
    )
    custom = os.path.join(EXAMPLES, "custom_concept")
    assert len(read_lines(os.path.join(custom, "unsafe.txt"))) == len(read_lines(os.path.join(custom, "safe.txt")))


def test_table_is_the_reports_numbers(tmp_path):
    table = load_module(os.path.join(EXAMPLES, "compare_methods", "table.py"), "examples_table")
    results = {
        "settings": {"concept": "nudity"},
        "models": {"base": {"kind": "base"}, "duo": {"kind": "adapter"}, "esd": {"kind": "unet"}},
        "metrics": {
            "base": {
                "dsr": {"prompts": {"dsr": 0.25, "num_safe": 1, "num_images": 4}},
                "prior_preservation": {"prior_preservation": 1.0},
            },
            "duo": {
                "dsr": {
                    "prompts": {"dsr": 1.0, "num_safe": 4, "num_images": 4},
                    "ring_a_bell": {"dsr": 0.5, "num_safe": 1, "num_images": 2},
                },
                "prior_preservation": {"prior_preservation": 0.81234},
            },
            "esd": {
                "dsr": {"prompts": {"dsr": 0.75, "num_safe": 3, "num_images": 4}},
                "prior_preservation": {"prior_preservation": 0.7},
            },
        },
    }
    assert table.paper_table(results).splitlines() == [
        "| model | kind | DSR prompts | DSR ring_a_bell | prior preservation |",
        "|---|---|---|---|---|",
        "| base | base | 0.250 (1/4) |  | 1.0000 |",
        "| duo | adapter | 1.000 (4/4) | 0.500 (1/2) | 0.8123 |",
        "| esd | unet | 0.750 (3/4) |  | 0.7000 |",
    ]
    # The leaderboard's shape: ASR under UnlearnDiffAtk in %, FID, CLIP score; what was not measured says how.
    assert table.leaderboard_table(results).splitlines()[:5] == [
        "| model | kind | ASR UnlearnDiffAtk % ↓ | FID ↓ | CLIP score ↑ |",
        "|---|---|---|---|---|",
        "| base | base |  |  |  |",
        "| duo | adapter |  |  |  |",
        "| esd | unet |  |  |  |",
    ]
    assert "run with `--attack unlearndiffatk`" in table.leaderboard_table(results)
    results["attacks"] = {
        "unlearndiffatk": {
            m: {"asr": a, "num_broken": b, "num_prompts": 8}
            for m, a, b in (("base", 1.0, 8), ("duo", 0.125, 1), ("esd", 0.75, 6))
        }
    }
    results["metrics"]["duo"].update(fid={"fid": 19.314}, clip_score={"clip_score": 30.5})
    assert table.leaderboard_table(results).splitlines()[2:5] == [
        "| base | base | 100.0 (8/8) |  |  |",
        "| duo | adapter | 12.5 (1/8) | 19.31 | 30.50 |",
        "| esd | unet | 75.0 (6/8) |  |  |",
    ]
    assert "run with `--attack unlearndiffatk`" not in table.leaderboard_table(results)
    assert table.results_table(results).index("Leaderboard shape") < table.results_table(results).index("Paper shape")
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    table.main([str(path)])
    assert (tmp_path / "results.md").read_text().endswith(table.results_table(results))
    with pytest.raises(SystemExit) as exit_info:
        table.main([str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2


def test_combine_refuses_bad_flags_before_loading(capsys):
    combine = load_module(os.path.join(EXAMPLES, "violence_sd14", "combine.py"), "examples_combine")
    for argv, message in [
        (
            ["--adapter", "blood=x", "--output_dir", "o", "--save_unet", "u"],
            "--save_unet saves the merged UNet: add --fuse",
        ),
        (["--adapter", "bloodx", "--output_dir", "o"], "--adapter bloodx: write CONCEPT=VALUE"),
        (
            ["--adapter", "blood=x", "--weight", "gun=0.5", "--output_dir", "o"],
            "--weight names gun, which no --adapter names",
        ),
        (["--adapter", "blood=x", "--weight", "blood=lots", "--output_dir", "o"], "'lots' is not a number"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            combine.main(argv)
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# Smoke runs: every recipe end to end on tiny pipelines
# --------------------------------------------------------------------------------------------------


def check_smoke(result):
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-6000:]}"
    return printed_commands(result.stdout)


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from duo_plugin.testing import make_tiny_clip

    return make_tiny_clip(str(tmp_path_factory.mktemp("tiny_clip")))


@pytest.fixture(scope="module")
def nudity_smoke(tiny_sd, tmp_path_factory):
    """The nudity recipe through accelerate launch (one CPU process), as a user would run it."""
    out = tmp_path_factory.mktemp("nudity_sd14") / "run"
    result = run_recipe("nudity_sd14", "--smoke", MODEL=tiny_sd, OUT=out)
    return out, check_smoke(result)


@pytest.mark.slow
def test_nudity_sd14_smoke(nudity_smoke, tiny_sd):
    out, commands = nudity_smoke
    assert [c[0] for c in commands] == ["accelerate"] * 4  # pairs, beta 500, beta 250, evaluation
    assert len(read_jsonl(out / "pairs" / "metadata.jsonl")) == 2
    for beta in (500, 250):
        config = read_json(out / f"duo-nudity-beta{beta}" / "duo_config.json")
        assert config["beta_dpo"] == beta and config["concept"] == "nudity" and config["base_model"] == tiny_sd
        # The official recipe's scaling: lr = 3e-4 * 100 / beta, lambda = 1e6 * beta / 100.
        assert config["learning_rate"] == pytest.approx(3e-4 * 100 / beta) and config[
            "preservation_weight"
        ] == pytest.approx(1e6 * beta / 100)
        assert (out / f"duo-nudity-beta{beta}" / "pytorch_lora_weights.safetensors").is_file()
    results = read_json(out / "eval" / "results.json")
    assert list(results["models"]) == ["base", "beta500", "beta250"]
    assert results["detector"]["name"] == "nudenet"
    assert results["prompt_sets"]["prompts"]["num_prompts"] == 3  # the sample file's "sexual" rows
    for model in results["models"]:
        assert set(results["metrics"][model]["dsr"]) == {"prompts", "ring_a_bell", "concept_inversion"}
        assert 0.0 <= results["metrics"][model]["prior_preservation"]["prior_preservation"] <= 1.0
    assert results["metrics"]["base"]["prior_preservation"]["prior_preservation"] == 1.0  # the base against itself
    assert (out / "eval" / "dsr_vs_prior_preservation.png").is_file()


@pytest.mark.slow
def test_violence_sd14_smoke(tiny_sd, tiny_clip, tmp_path):
    from diffusers import UNet2DConditionModel

    out = tmp_path / "run"
    # Two of the four sub-concepts (CONCEPTS, the recipe's own setting): the same commands, half of CI's minutes.
    commands = check_smoke(
        run_recipe(
            "violence_sd14",
            "--smoke",
            MODEL=tiny_sd,
            CLIP_MODEL=tiny_clip,
            OUT=out,
            LAUNCH="python",
            CONCEPTS="blood gun",
        )
    )
    assert len(commands) == 4  # two adapters in turn, combine, evaluation
    for concept in ("blood", "gun"):
        assert read_json(out / f"duo-{concept}" / "duo_config.json")["concept"] == concept
        assert len(read_jsonl(out / f"pairs-{concept}" / "metadata.jsonl")) == 2
    combined = read_json(out / "combined" / "active_concepts.json")
    assert combined["active_concepts"] == {"blood": 1.0, "gun": 1.0} and combined["fused"] is True
    assert len(read_jsonl(out / "combined" / "samples.jsonl")) == 2
    # The merged UNet is the base UNet plus the adapters: it differs exactly on the self-attention
    # projections the adapters were trained on, and nowhere else.
    base = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").state_dict()
    merged = UNet2DConditionModel.from_pretrained(str(out / "combined" / "unet")).state_dict()
    assert set(base) == set(merged)
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    targets = {name for name in base if re.search(r"\.attn1\.(to_q|to_k|to_v|to_out\.0)\.weight$", name)}
    assert targets and changed == targets
    results = read_json(out / "eval" / "results.json")
    assert results["models"]["violence"] == {"kind": "unet", "source": str(out / "combined" / "unet")}
    assert results["detector"]["name"] == "clip" and len(results["detector"]["unsafe_labels"]) == 4
    assert results["prompt_sets"]["prompts"]["num_prompts"] == 2 and set(results["metrics"]["violence"]["dsr"]) == {
        "prompts",
        "ring_a_bell",
    }


@pytest.mark.slow
def test_nudity_sd3_smoke(tiny_sd3, tmp_path):
    out = tmp_path / "run"
    commands = check_smoke(run_recipe("nudity_sd3", "--smoke", MODEL=tiny_sd3, OUT=out, LAUNCH="python"))
    training = next(c for c in commands if c[1].endswith("train_duo_sd3.py"))
    assert {"--gradient_checkpointing", "--use_8bit_adam"} <= set(
        training
    )  # the 16 GB settings, also in the smoke run
    config = read_json(out / "duo-sd3-nudity-beta500" / "duo_config.json")
    assert config["architecture"]["family"] == "sd3" and config["dataset"] == str(out / "pairs")
    results = read_json(out / "eval" / "results.json")
    assert list(results["models"]) == ["base", "duo"]
    assert set(results["metrics"]["duo"]["dsr"]) == {"prompts", "ring_a_bell"}


@pytest.mark.slow
def test_custom_concept_smoke(tiny_sd, tiny_clip, tmp_path):
    out = tmp_path / "run"
    check_smoke(run_recipe("custom_concept", "--smoke", MODEL=tiny_sd, CLIP_MODEL=tiny_clip, OUT=out, LAUNCH="python"))
    config = read_json(out / "duo-cigarette" / "duo_config.json")
    assert config["concept"] == "cigarette" and config["pairs_dir"] == str(out / "pairs")
    unsafe = read_lines(os.path.join(EXAMPLES, "custom_concept", "unsafe.txt"))
    safe = read_lines(os.path.join(EXAMPLES, "custom_concept", "safe.txt"))
    rows = read_jsonl(out / "pairs" / "metadata.jsonl")
    assert [(r["unsafe_prompt"], r["safe_prompt"]) for r in rows] == list(zip(unsafe, safe))[: len(rows)] and len(
        rows
    ) == 2
    results = read_json(out / "eval" / "results.json")
    assert list(results["models"]) == ["base", "cigarette"]
    assert results["detector"]["unsafe_labels"] == ["a cigarette"]
    assert set(results["metrics"]["cigarette"]["dsr"]) == {"prompts", "ring_a_bell", "concept_inversion"}
    assert results["prompt_sets"]["prompts"]["source"].endswith("eval_prompts.txt")


@pytest.mark.slow
def test_compare_methods_smoke(nudity_smoke, tiny_sd, tmp_path):
    smoke_models = load_module(os.path.join(EXAMPLES, "smoke_models.py"), "examples_smoke_models")
    nudity_out, _ = nudity_smoke
    other = smoke_models.make_other_unet(tiny_sd, str(tmp_path / "esd-unet.safetensors"), perturbation=0.1)
    out = tmp_path / "run"
    adapters = f"duo-b500={nudity_out / 'duo-nudity-beta500'} duo-b250={nudity_out / 'duo-nudity-beta250'}"
    check_smoke(
        run_recipe(
            "compare_methods",
            "--smoke",
            MODEL=tiny_sd,
            OUT=out,
            LAUNCH="python",
            ADAPTERS=adapters,
            UNETS=f"esd={other}",
            INVERSION_IMAGES=nudity_out / "pairs",
        )
    )
    results = read_json(out / "eval" / "results.json")
    assert {m: v["kind"] for m, v in results["models"].items()} == {
        "base": "base",
        "duo-b500": "adapter",
        "duo-b250": "adapter",
        "esd": "unet",
    }
    for values in results["metrics"].values():
        assert set(values["dsr"]) == {"prompts", "ring_a_bell", "concept_inversion", "unlearndiffatk"}
    assert set(results["attacks"]["unlearndiffatk"]) == {"base", "duo-b500", "duo-b250", "esd"}
    # The stand-in's cross-attention noise shows in its images; the base against itself is identical.
    assert results["metrics"]["esd"]["prior_preservation"]["prior_preservation"] < 1.0
    assert results["metrics"]["base"]["prior_preservation"]["prior_preservation"] == 1.0
    paper = (out / "eval" / "results.md").read_text().split("## Paper shape")[1]
    rows = [line for line in paper.splitlines() if line.startswith("| ")][1:]
    assert [row.split(" | ")[0].lstrip("| ") for row in rows] == ["base", "duo-b500", "duo-b250", "esd"]
    preservation = results["metrics"]["esd"]["prior_preservation"]["prior_preservation"]
    assert f"| {preservation:.4f} |" in rows[-1]
    assert (out / "eval" / "dsr_vs_prior_preservation.png").is_file()


@pytest.mark.slow
def test_multi_gpu_smoke_runs_two_processes(tiny_sd, tmp_path):
    """ddp.yaml with two CPU processes: each makes its share of the pairs, and a step takes one pair from each."""
    out = tmp_path / "run"
    commands = check_smoke(run_recipe("multi_gpu", "--smoke", MODEL=tiny_sd, OUT=out))
    assert all(
        c[:4] == ["accelerate", "launch", "--config_file", os.path.join(EXAMPLES, "multi_gpu", "ddp.yaml")]
        for c in commands
    )
    progress = sorted(os.listdir(out / "pairs" / ".duo_progress"))
    assert progress == ["process-000.jsonl", "process-001.jsonl"]
    assert len(read_jsonl(out / "pairs" / "metadata.jsonl")) == 2
    config = read_json(out / "duo-nudity" / "duo_config.json")
    assert config["train_batch_size"] == 1 and config["gradient_accumulation_steps"] == 1
    assert [row["step"] for row in read_jsonl(out / "duo-nudity" / "logs" / "metrics.jsonl")] == [1, 2]
