"""``python -m duo_plugin.sweep``: its flags, their checks, and ``main``."""

import argparse
import math
import re
import shlex
from typing import Callable

from ..errors import UsageError, exit_on_usage_error
from ..input_checks import check_output_dir
from ..settings import Settings
from .commands import TRAINING_SCRIPTS_TEXT, Command, resolve_training_script, run_in_subprocess
from .curve import PRESERVATION_AXES
from .grid import preservation_weight_value
from .runs import run_sweep


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
    return check_args(parser.parse_args(argv))


def check_args(args) -> Settings:
    """The flags refused before anything runs; returns them as ``Settings``, ``--training_script`` resolved
    (``args`` is only read)."""
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
    args = resolve_training_script(args)
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
    return args


@exit_on_usage_error
def main(argv=None, runner: Callable[[Command, str], None] = run_in_subprocess):
    args = parse_args(argv)  # a Settings: read-only from here on
    return run_sweep(args, runner)
