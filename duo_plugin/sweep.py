"""The paper's main figure for your model: defense success rate against prior preservation over β and λ.

Trains one adapter per setting of a grid (β × λ, optionally × t_max × steps × training seeds) with the
training script, evaluates each with ``duo_plugin.evaluate`` in one shared evaluation folder (so every
model is measured with the same seeds against the same base images, made once), and writes:

* ``curve.json``: per setting the DSR of every prompt set and attack, the preservation measures and
  the training-end saturation, as mean ± spread over training seeds; the base model and the baselines;
  which settings lie on the Pareto front of each prompt set;
* ``curve.png``: one panel per prompt set or attack, DSR against the chosen preservation measure, one
  point per setting, baselines on the same axes, the front marked.

    python -m duo_plugin.sweep --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 --concept nudity \\
        --beta_dpo 100 250 500 1000 --preservation_weight 0 recipe \\
        --train_args "--mixed_precision fp16" \\
        --eval_args "--prompts i2p=i2p.csv --prompt_categories sexual --unrelated_prompts coco.txt" \\
        --baseline_unet esd=esd-nudity-unet.safetensors --eval_num_processes 4 --output_dir sweep-nudity

Resumable: a rerun skips every evaluated setting, trains only adapters that are missing (resuming a
killed run from its latest checkpoint) and evaluates only images that are missing.
"""

import argparse
import glob
import itertools
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

from . import saturation
from .errors import UsageError, exit_on_usage_error
from .files import atomic_write_json, read_state_json
from .input_checks import check_output_dir
from .presets import preservation_weight_for_beta


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CURVE_NAME = "curve.json"
PLOT_NAME = "curve.png"
SWEEP_SETTINGS_NAME = "sweep_settings.json"
RUN_RESULT_NAME = "evaluation.json"
BASELINES_NAME = "baselines.json"
EVAL_DIR = "eval"
PRESERVATION_AXES = {
    "prior_preservation": "prior preservation (1 − LPIPS)",
    "pixel_preservation": "pixel preservation (1 − mean |Δ pixel|)",
}
SETTING_KEYS = (
    "beta_dpo",
    "preservation_weight",
    "preservation_weight_spec",
    "t_max",
    "max_train_steps",
    "objective",
    "retain_weight",
)
SATURATION_KEYS = ("margin", "saturated_share", "unsafe_error_change", "delta_safe", "delta_unsafe")
# The training script of each family (families.SCRIPT_OF_FAMILY), as the messages name them.
TRAINING_SCRIPTS_TEXT = (
    "train_duo.py (Stable Diffusion 1.x/2.x and XL), train_duo_sd3.py (SD3) or train_duo_flux.py (FLUX.1)"
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m duo_plugin.sweep",
        description="Train DUO adapters over a grid of β and λ, evaluate each, and plot DSR against prior preservation.",
    )
    model = parser.add_argument_group("model and concept (passed to training and evaluation)")
    model.add_argument("--pretrained_model_name_or_path", type=str, required=True)
    model.add_argument("--concept", type=str, required=True)
    model.add_argument("--unsafe_prompt", action="append", default=None, help="custom concept (repeatable, or @file)")
    model.add_argument("--safe_prompt", action="append", default=None, help="custom concept (repeatable, or @file)")
    model.add_argument(
        "--dataset_name",
        type=str,
        default=None,
        help="pair data for every training run (default: the training script's)",
    )

    grid = parser.add_argument_group("grid (every combination is one setting)")
    grid.add_argument(
        "--beta_dpo", type=float, nargs="+", default=None, help="β values (required unless --report_only)"
    )
    grid.add_argument(
        "--preservation_weight",
        type=str,
        nargs="+",
        default=["recipe"],
        help="λ values: numbers, 'recipe' (1e6·β/100) or 'recipe*F' (F times the recipe's); default: the recipe's",
    )
    grid.add_argument("--t_max", type=int, nargs="+", default=None, help="default: the training script's")
    grid.add_argument(
        "--objective",
        type=str,
        nargs="+",
        default=None,
        choices=["paper", "concept"],
        help="training objectives (train_duo.py --objective); default: the training script's (paper)",
    )
    grid.add_argument(
        "--retain_weight",
        type=float,
        nargs="+",
        default=None,
        help="λ_r of the concept objective's retain term; default: the objective's",
    )
    grid.add_argument("--max_train_steps", type=int, nargs="+", default=None, help="default: the training script's")
    grid.add_argument(
        "--train_seeds",
        type=int,
        nargs="+",
        default=[42],
        help="training seeds per setting; several give mean ± spread",
    )

    runs = parser.add_argument_group("running")
    runs.add_argument("--output_dir", type=str, required=True)
    runs.add_argument(
        "--training_script",
        type=str,
        default=None,
        help=f"{TRAINING_SCRIPTS_TEXT}; default: the base model's family's (train_duo.py when its "
        "model_index.json cannot be read)",
    )
    runs.add_argument(
        "--train_args",
        type=str,
        default="",
        help='extra training flags as one string, e.g. "--learning_rate 1e-3 --mixed_precision fp16"',
    )
    runs.add_argument(
        "--eval_args",
        type=str,
        default="",
        help="extra duo_plugin.evaluate flags as one string (prompt sets, attacks, metrics, seeds)",
    )
    runs.add_argument(
        "--train_num_processes",
        type=int,
        default=1,
        help="processes (GPUs) per training run; note that pairs per step scale with it",
    )
    runs.add_argument(
        "--eval_num_processes", type=int, default=1, help="processes (GPUs) the evaluation splits its prompts across"
    )

    baselines = parser.add_argument_group("baselines, evaluated once on the same axes")
    baselines.add_argument(
        "--baseline_unet", action="append", default=[], metavar="NAME=PATH", help="another method's UNet (e.g. ESD-x)"
    )
    baselines.add_argument(
        "--baseline_pipeline", action="append", default=[], metavar="NAME=PATH", help="another method's full pipeline"
    )
    baselines.add_argument(
        "--baseline_adapter", action="append", default=[], metavar="NAME=PATH", help="a DUO adapter trained elsewhere"
    )

    report = parser.add_argument_group("report")
    report.add_argument(
        "--preservation_axis", type=str, default="prior_preservation", choices=sorted(PRESERVATION_AXES)
    )
    report.add_argument(
        "--report_only",
        action="store_true",
        help="train nothing: write the curve from every run of --output_dir evaluated so far (e.g. grids of different shapes, or while a sweep runs)",
    )
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args):
    if args.beta_dpo is None and not args.report_only:
        raise UsageError(
            "--beta_dpo: give the β values of the grid (or --report_only to plot the runs already evaluated)"
        )
    for name in ("train_num_processes", "eval_num_processes"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    for beta in args.beta_dpo or []:
        if not beta > 0:
            raise UsageError(f"--beta_dpo {beta:g}: β must be positive")
    for value in args.preservation_weight:
        preservation_weight_value(value, 1.0)
    for weight in args.retain_weight or []:
        if not (weight >= 0 and math.isfinite(weight)):
            raise UsageError(f"--retain_weight {weight:g}: give a number ≥ 0")
    for value in args.t_max or []:
        if not 0 < value <= 1000:
            raise UsageError(f"--t_max {value}: give timesteps between 1 and 1000")
    for value in args.max_train_steps or []:
        if value < 1:
            raise UsageError(f"--max_train_steps {value}: give at least 1")
    for seed in args.train_seeds:
        if not 0 <= seed < 2**32:
            raise UsageError(f"--train_seeds {seed}: give seeds between 0 and 2**32 - 1")
    check_output_dir(args.output_dir)
    resolve_training_script(args)
    for flag in ("baseline_unet", "baseline_pipeline", "baseline_adapter"):
        for value in getattr(args, flag):
            name, _, path = value.partition("=")
            if not path or not re.match(r"^[A-Za-z0-9][\w.-]*$", name):
                raise UsageError(f"--{flag} {value}: give NAME=PATH, the name of letters, digits, '.', '_' or '-'")
    for value in (args.train_args, args.eval_args):
        try:
            shlex.split(value)
        except ValueError as error:
            raise UsageError(f"cannot split {value!r} into flags ({error}): check its quotes") from None
    owned = {
        "--output_dir",
        "--beta_dpo",
        "--preservation_weight",
        "--seed",
        "--t_max",
        "--max_train_steps",
        "--objective",
        "--retain_weight",
        "--pretrained_model_name_or_path",
    }
    for flag in shlex.split(args.train_args):
        if flag.split("=")[0] in owned:
            raise UsageError(
                f"--train_args sets {flag.split('=')[0]}, which the sweep sets per run: give it as a sweep flag instead"
            )
    for flag in shlex.split(args.eval_args):
        if flag.split("=")[0] in {"--output_dir", "--adapter", "--base_model"}:
            raise UsageError(
                f"--eval_args sets {flag.split('=')[0]}, which the sweep sets: leave it out (baselines: --baseline_unet/--baseline_pipeline)"
            )


# --------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------


def base_model_family(args) -> Optional[str]:
    """The base model's family from its model_index.json, or None when that cannot be read here (a Hub id offline:
    the training script then says what is wrong)."""
    from .families import detect_pipeline_class, pipeline_family

    try:
        return pipeline_family(detect_pipeline_class(args.pretrained_model_name_or_path, None))
    except Exception:  # noqa: BLE001 - any failure to read the config leaves the choice to the user
        return None


def resolve_training_script(args):
    """``--training_script``: the base model's family's DUO script unless given; a DUO script of another family
    is refused, naming the right one (any other script is taken as given)."""
    from .families import FAMILY_NAMES, SCRIPT_OF_FAMILY

    family = base_model_family(args)
    if args.training_script is None:
        args.training_script = os.path.join(REPO_ROOT, SCRIPT_OF_FAMILY.get(family, "train_duo.py"))
    if not os.path.isfile(args.training_script):
        raise UsageError(f"--training_script {args.training_script} does not exist: give {TRAINING_SCRIPTS_TEXT}")
    name = os.path.basename(args.training_script)
    expected = SCRIPT_OF_FAMILY.get(family)
    if expected is not None and name in SCRIPT_OF_FAMILY.values() and name != expected:
        raise UsageError(
            f"--training_script {name} does not train {args.pretrained_model_name_or_path}, a {FAMILY_NAMES[family]} "
            f"model: give {expected} ({TRAINING_SCRIPTS_TEXT})"
        )


def preservation_weight_value(value: str, beta: float) -> float:
    """λ from a number, 'recipe' (1e6·β/100) or 'recipe*F'."""
    match = re.fullmatch(r"recipe(?:\*([0-9.eE+-]+))?", value.strip())
    try:
        if match:
            return preservation_weight_for_beta(beta) * (float(match.group(1)) if match.group(1) else 1.0)
        weight = float(value)
    except ValueError:
        weight = -1.0
    if not weight >= 0 or math.isinf(weight):
        raise UsageError(f"--preservation_weight {value}: give a number ≥ 0, 'recipe' or 'recipe*F'")
    return weight


def short_number(value: float) -> str:
    """A number as a name part: 500 → 500, 5e6 → 5e6, 0.5 → 0.5."""
    text = f"{value:g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")
    return text


@dataclass(frozen=True)
class Setting:
    """One point of the curve: everything but the training seed."""

    beta_dpo: float
    preservation_weight_spec: str
    preservation_weight: float
    t_max: Optional[int] = None
    max_train_steps: Optional[int] = None
    objective: Optional[str] = None
    retain_weight: Optional[float] = None

    @property
    def name(self) -> str:
        parts = [f"beta{short_number(self.beta_dpo)}", f"lambda{short_number(self.preservation_weight)}"]
        if self.t_max is not None:
            parts.append(f"tmax{self.t_max}")
        if self.max_train_steps is not None:
            parts.append(f"steps{self.max_train_steps}")
        if self.objective is not None:
            parts.append(self.objective)
        if self.retain_weight is not None:
            parts.append(f"retain{short_number(self.retain_weight)}")
        return "_".join(parts)

    def describe(self) -> dict:
        return {
            "beta_dpo": self.beta_dpo,
            "preservation_weight": self.preservation_weight,
            "preservation_weight_spec": self.preservation_weight_spec,
            "t_max": self.t_max,
            "max_train_steps": self.max_train_steps,
            "objective": self.objective,
            "retain_weight": self.retain_weight,
        }


@dataclass(frozen=True)
class Run:
    setting: Setting
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting.name}_seed{self.seed}"


def make_grid(args) -> List[Run]:
    settings = []
    for beta in args.beta_dpo or []:
        for spec in args.preservation_weight:
            for t_max, steps, objective, retain_weight in itertools.product(
                args.t_max or [None],
                args.max_train_steps or [None],
                args.objective or [None],
                args.retain_weight or [None],
            ):
                settings.append(
                    Setting(beta, spec, preservation_weight_value(spec, beta), t_max, steps, objective, retain_weight)
                )
    unique = list(dict.fromkeys(settings))
    names = [s.name for s in unique]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(
            f"the grid names the setting {', '.join(repeated)} twice (e.g. λ 'recipe' equals a number given too): drop one"
        )
    return [Run(setting, seed) for setting in unique for seed in dict.fromkeys(args.train_seeds)]


# --------------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------------


@dataclass
class Command:
    """A product command line: the launcher, the program (a script path or ``-m module``) and its flags."""

    launcher: List[str]
    program: List[str]
    args: List[str]

    def argv(self) -> List[str]:
        return self.launcher + self.program + self.args


def accelerate_launcher(num_processes: int) -> List[str]:
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(num_processes),
    ]
    if num_processes > 1:
        launcher += ["--multi_gpu", "--main_process_port", "0"]
    return launcher


def concept_flags(args) -> List[str]:
    flags = ["--concept", args.concept]
    for prompt in args.unsafe_prompt or []:
        flags += ["--unsafe_prompt", prompt]
    for prompt in args.safe_prompt or []:
        flags += ["--safe_prompt", prompt]
    return flags


def training_command(args, run: Run, output_dir: str) -> Command:
    setting = run.setting
    flags = ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path, *concept_flags(args)]
    if args.dataset_name:
        flags += ["--dataset_name", args.dataset_name]
    flags += [
        "--output_dir",
        output_dir,
        "--beta_dpo",
        f"{setting.beta_dpo!r}",
        "--preservation_weight",
        f"{setting.preservation_weight!r}",
        "--seed",
        str(run.seed),
    ]
    if setting.t_max is not None:
        flags += ["--t_max", str(setting.t_max)]
    if setting.max_train_steps is not None:
        flags += ["--max_train_steps", str(setting.max_train_steps)]
    if setting.objective is not None:
        flags += ["--objective", setting.objective]
    if setting.retain_weight is not None:
        flags += ["--retain_weight", f"{setting.retain_weight!r}"]
    # A run killed mid-way continues from its latest checkpoint (a fresh start when it has none).
    flags += ["--resume_from_checkpoint", "latest", *shlex.split(args.train_args)]
    return Command(accelerate_launcher(args.train_num_processes), [args.training_script], flags)


def evaluation_command(args, models: Sequence[str]) -> Command:
    flags = ["--base_model", args.pretrained_model_name_or_path, *concept_flags(args), *models]
    flags += ["--output_dir", os.path.join(args.output_dir, EVAL_DIR), *shlex.split(args.eval_args)]
    launcher = accelerate_launcher(args.eval_num_processes) if args.eval_num_processes > 1 else [sys.executable]
    return Command(launcher, ["-m", "duo_plugin.evaluate"], flags)


def run_in_subprocess(command: Command, log_path: str):
    """Run a command with its output in ``log_path``; on failure stop with the log's tail."""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "w") as log:
        log.write("+ " + shlex.join(command.argv()) + "\n")
        log.flush()
        result = subprocess.run(command.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    if result.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise UsageError(
            f"{shlex.join(command.program)} failed (exit {result.returncode}); its log {log_path} ends with:\n{tail}"
        )


# --------------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------------


def write_json(path: str, value):
    """Written aside and renamed, so a killed sweep never leaves half a file that a rerun would trust."""
    atomic_write_json(path, value, indent=1)


def read_json(path: str):
    return read_state_json(path, "delete it (the sweep redoes what it recorded) or choose a new --output_dir")


def check_sweep_settings(args):
    """Refuse to mix runs made with other flags into one folder; a grid may grow between reruns."""
    settings = {
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "concept_flags": concept_flags(args),
        "dataset_name": args.dataset_name,
        "training_script": os.path.basename(args.training_script),
        "train_args": shlex.split(args.train_args),
        "eval_args": shlex.split(args.eval_args),
        "train_num_processes": args.train_num_processes,
    }
    path = os.path.join(args.output_dir, SWEEP_SETTINGS_NAME)
    if os.path.isfile(path):
        stored = read_json(path)
        changed = [key for key in settings if stored.get(key) != settings[key]]
        if changed:
            raise UsageError(
                f"{args.output_dir} holds a sweep made with other {', '.join(changed)}: rerun with the same flags "
                f"(only the grid and the baselines may change), or use a new --output_dir"
            )
    os.makedirs(args.output_dir, exist_ok=True)
    write_json(path, settings)


def evaluation_record(results: dict, name: str) -> dict:
    """What the curve needs of one model from ``results.json``: DSR per set, preservation measures."""
    values = results["metrics"][name]
    record = {"dsr": {s: d["dsr"] for s, d in values.get("dsr", {}).items()}}
    record["dsr_counts"] = {s: [d["num_safe"], d["num_images"]] for s, d in values.get("dsr", {}).items()}
    for axis in PRESERVATION_AXES:
        if axis in values:
            record[axis] = values[axis][axis]
    return record


def training_end(run_dir: str) -> Optional[dict]:
    """The saturation over the last logged steps of a run, from its ``logs/metrics.jsonl``."""
    summary = saturation.summary_from_metrics(os.path.join(run_dir, "logs", "metrics.jsonl"))
    if summary is None:
        return None
    return {key: summary[key] for key in (*SATURATION_KEYS, "saturated_without_effect", "num_steps", "last_step")}


def adapter_is_complete(run_dir: str) -> bool:
    return all(
        os.path.isfile(os.path.join(run_dir, name)) for name in ("pytorch_lora_weights.safetensors", "duo_config.json")
    )


def format_record(record: dict, axis: str) -> str:
    parts = [f"DSR {s} {v:.2f}" for s, v in record["dsr"].items()]
    if axis in record:
        parts.append(f"{axis.replace('_', ' ')} {record[axis]:.3f}")
    return ", ".join(parts)


def run_sweep(args, runner: Callable[[Command, str], None] = run_in_subprocess) -> dict:
    """Train and evaluate every missing run, then the baselines; returns the curve."""
    check_sweep_settings(args)
    results_path = os.path.join(args.output_dir, EVAL_DIR, "results.json")
    if args.report_only:
        records = {}
        for path in sorted(glob.glob(os.path.join(args.output_dir, "runs", "*", RUN_RESULT_NAME))):
            record = read_json(path)
            records.setdefault(record["setting"], []).append(record)
        if not records:
            raise UsageError(f"--report_only: no evaluated run in {args.output_dir}/runs yet")
        return write_curve(args, records, evaluate_baselines(args, runner, results_path))
    runs = make_grid(args)
    logs = os.path.join(args.output_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    os.makedirs(os.path.join(args.output_dir, EVAL_DIR), exist_ok=True)
    print(
        f"Sweep of {len(runs)} runs ({len({r.setting for r in runs})} settings × {len(set(args.train_seeds))} seeds) in {args.output_dir}",
        flush=True,
    )
    for index, run in enumerate(runs, start=1):
        prefix = f"[{index}/{len(runs)}] {run.name}"
        run_dir = os.path.join(args.output_dir, "runs", run.name)
        record_path = os.path.join(run_dir, RUN_RESULT_NAME)
        if os.path.isfile(record_path):
            print(
                f"{prefix}: done already ({format_record(read_json(record_path), args.preservation_axis)})", flush=True
            )
            continue
        if adapter_is_complete(run_dir):
            print(f"{prefix}: trained already", flush=True)
        else:
            started = time.time()
            print(f"{prefix}: training (log: {os.path.join(logs, run.name + '.train.log')})", flush=True)
            runner(training_command(args, run, run_dir), os.path.join(logs, run.name + ".train.log"))
            print(f"{prefix}: trained in {time.time() - started:.0f} s", flush=True)
        started = time.time()
        runner(
            evaluation_command(args, ["--adapter", f"{run.name}={run_dir}"]),
            os.path.join(logs, run.name + ".eval.log"),
        )
        results = read_json(results_path)
        record = {
            "run": run.name,
            "setting": run.setting.name,
            **run.setting.describe(),
            "seed": run.seed,
            "adapter": run_dir,
            **evaluation_record(results, run.name),
            "base": evaluation_record(results, "base"),
            "training_end": training_end(run_dir),
        }
        write_json(record_path, record)
        print(
            f"{prefix}: evaluated in {time.time() - started:.0f} s: {format_record(record, args.preservation_axis)}",
            flush=True,
        )

    records = {}
    for run in runs:
        records.setdefault(run.setting.name, []).append(
            read_json(os.path.join(args.output_dir, "runs", run.name, RUN_RESULT_NAME))
        )
    return write_curve(args, records, evaluate_baselines(args, runner, results_path))


def write_curve(args, records: Dict[str, List[dict]], baselines: Dict[str, dict]) -> dict:
    curve = make_curve(args, records, baselines)
    write_json(os.path.join(args.output_dir, CURVE_NAME), curve)
    plot_curve(curve, os.path.join(args.output_dir, PLOT_NAME))
    print(
        f"Curve: {os.path.join(args.output_dir, CURVE_NAME)} and {os.path.join(args.output_dir, PLOT_NAME)}",
        flush=True,
    )
    for prompt_set, names in curve["pareto_front"].items():
        print(f"  Pareto front on {prompt_set}: {', '.join(names)}", flush=True)
    return curve


def baseline_flags(args) -> List[str]:
    flags = []
    for flag, kind in (
        ("baseline_unet", "--unet"),
        ("baseline_pipeline", "--pipeline"),
        ("baseline_adapter", "--adapter"),
    ):
        for value in getattr(args, flag):
            flags += [kind, value]
    return flags


def evaluate_baselines(args, runner, results_path: str) -> Dict[str, dict]:
    """The base model (always) and the baselines, in one evaluation; skipped when the same ones are recorded."""
    flags = baseline_flags(args)
    path = os.path.join(args.output_dir, BASELINES_NAME)
    if os.path.isfile(path):
        stored = read_json(path)
        if stored.get("flags") == flags:
            return stored["models"]
    print(f"Evaluating the base model{' and the baselines' if flags else ''}", flush=True)
    runner(evaluation_command(args, flags), os.path.join(args.output_dir, "logs", "baselines.eval.log"))
    results = read_json(results_path)
    models = {name: evaluation_record(results, name) for name in results["metrics"]}
    write_json(path, {"flags": flags, "models": models})
    for name, record in models.items():
        print(f"  {name}: {format_record(record, args.preservation_axis)}", flush=True)
    return models


# --------------------------------------------------------------------------------------------------
# The curve
# --------------------------------------------------------------------------------------------------


def spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and count."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def pareto_front(points: Sequence[tuple]) -> List[bool]:
    """For (x, y) points where more is better on both axes: True for each point no other point dominates
    (at least as good on both, better on one)."""
    on_front = []
    for i, (x, y) in enumerate(points):
        dominated = any((u >= x and v >= y) and (u > x or v > y) for j, (u, v) in enumerate(points) if j != i)
        on_front.append(not dominated)
    return on_front


def make_curve(args, records: Dict[str, List[dict]], baselines: Dict[str, dict]) -> dict:
    """One point per setting (its runs' records over training seeds), the base, the baselines and the fronts."""
    axis = args.preservation_axis
    points = []
    for name, rows in records.items():
        point = {
            "name": name,
            **{key: rows[0][key] for key in SETTING_KEYS},
            "seeds": [r["seed"] for r in rows],
            "runs": [r["run"] for r in rows],
        }
        point["dsr"] = {s: spread([r["dsr"][s] for r in rows]) for s in rows[0]["dsr"]}
        for measure in PRESERVATION_AXES:
            if all(measure in r for r in rows):
                point[measure] = spread([r[measure] for r in rows])
        ends = [r["training_end"] for r in rows if r.get("training_end")]
        point["training_end"] = {key: spread([e[key] for e in ends]) for key in SATURATION_KEYS} if ends else None
        if ends:
            point["training_end"]["saturated_without_effect"] = sum(bool(e["saturated_without_effect"]) for e in ends)
        points.append(point)
    prompt_sets = list(points[0]["dsr"]) if points else []
    if points and axis not in points[0]:
        raise UsageError(
            f"--preservation_axis {axis}: the evaluation measured none; add prior_preservation to the evaluation's --metrics"
        )
    fronts = {}
    for prompt_set in prompt_sets:
        flags = pareto_front([(p[axis]["mean"], p["dsr"][prompt_set]["mean"]) for p in points])
        for point, on in zip(points, flags):
            point.setdefault("on_front", {})[prompt_set] = on
        fronts[prompt_set] = [
            p["name"] for p, on in sorted(zip(points, flags), key=lambda pair: pair[0][axis]["mean"]) if on
        ]
    return {
        "what": "DSR against prior preservation per setting (mean ± std over training seeds)",
        "concept": args.concept,
        "base_model": args.pretrained_model_name_or_path,
        "preservation_axis": axis,
        "preservation_axis_label": PRESERVATION_AXES[axis],
        "prompt_sets": prompt_sets,
        "points": points,
        "base": baselines.get("base"),
        "baselines": {name: record for name, record in baselines.items() if name != "base"},
        "pareto_front": fronts,
        "evaluation": os.path.join(EVAL_DIR, "results.json"),
        "settings": dict(vars(args).items()),
    }


def plot_curve(curve: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    axis, points, prompt_sets = curve["preservation_axis"], curve["points"], curve["prompt_sets"]
    columns = min(3, max(1, len(prompt_sets)))
    rows = max(1, math.ceil(len(prompt_sets) / columns))
    figure, panels = plt.subplots(rows, columns, figsize=(4.6 * columns, 4.0 * rows), squeeze=False)
    betas = [p["beta_dpo"] for p in points] or [1.0]
    norm = LogNorm(vmin=min(betas), vmax=max(betas) if max(betas) > min(betas) else min(betas) * 10)
    cmap = plt.get_cmap("viridis")
    markers = "osD^vP*Xh"
    lambdas = list(dict.fromkeys(p["preservation_weight_spec"] for p in points))
    for index, prompt_set in enumerate(prompt_sets):
        ax = panels[index // columns][index % columns]
        for point in points:
            x, y = point[axis], point["dsr"][prompt_set]
            marker = markers[lambdas.index(point["preservation_weight_spec"]) % len(markers)]
            ax.errorbar(
                x["mean"],
                y["mean"],
                xerr=x["std"] or None,
                yerr=y["std"] or None,
                fmt=marker,
                color=cmap(norm(point["beta_dpo"])),
                markersize=7,
                markeredgecolor="red" if point["on_front"][prompt_set] else "none",
                markeredgewidth=1.5,
                elinewidth=0.8,
                capsize=2,
            )
            ax.annotate(
                f"{point['beta_dpo']:g}",
                (x["mean"], y["mean"]),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=6,
                color="dimgray",
            )
        front = sorted((p[axis]["mean"], p["dsr"][prompt_set]["mean"]) for p in points if p["on_front"][prompt_set])
        if front:
            ax.plot(*zip(*front), color="red", linewidth=1, linestyle="--", label="DUO Pareto front")
        for name, record in [("base", curve["base"]), *curve["baselines"].items()]:
            if record and axis in record and prompt_set in record["dsr"]:
                style = (
                    {"marker": "x", "color": "gray"}
                    if name == "base"
                    else {"marker": "*", "color": "black", "markersize": 11}
                )
                ax.plot(record[axis], record["dsr"][prompt_set], linestyle="none", **style)
                ax.annotate(
                    name,
                    (record[axis], record["dsr"][prompt_set]),
                    textcoords="offset points",
                    xytext=(5, -9),
                    fontsize=7,
                )
        ax.set_title(f"DSR: {prompt_set}", fontsize=10)
        ax.set_xlabel(curve["preservation_axis_label"], fontsize=8)
        ax.set_ylabel("defense success rate", fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    for index in range(len(prompt_sets), rows * columns):
        panels[index // columns][index % columns].axis("off")
    handles = [
        plt.Line2D([], [], marker=markers[i % len(markers)], color="gray", linestyle="none", label=f"λ = {spec}")
        for i, spec in enumerate(lambdas)
    ]
    handles += [plt.Line2D([], [], color="red", linestyle="--", label="DUO Pareto front (red edge: on it)")]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, bbox_to_anchor=(0.5, 0.0))
    figure.subplots_adjust(bottom=0.16, top=0.88, hspace=0.45, wspace=0.3, left=0.07, right=0.88)
    colourbar = figure.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=figure.add_axes([0.91, 0.2, 0.012, 0.65])
    )
    colourbar.set_label("β (beta_dpo)")
    figure.suptitle(
        f"DUO on {curve['concept']}: defense success rate against preservation, one point per setting", fontsize=11
    )
    figure.savefig(path, dpi=110)
    plt.close(figure)


@exit_on_usage_error
def main(argv=None, runner: Callable[[Command, str], None] = run_in_subprocess):
    args = parse_args(argv)
    return run_sweep(args, runner)


if __name__ == "__main__":
    main()
