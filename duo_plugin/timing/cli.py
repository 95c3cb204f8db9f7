"""python -m duo_plugin.timing: the flags, the checks made before any model is loaded, and the verdict printed."""

import argparse
import logging
import os

from .. import input_checks
from ..errors import UsageError, exit_on_usage_error
from ..settings import Settings
from .analysis import DEFAULT_OPEN_LEVEL
from .diagnostic import output_dir_of, run_timing
from .inputs import DEFAULT_NUM_INFERENCE_STEPS, FLUX_SCHNELL_STEPS
from .records import CURVES, PLOT_NAME, RESULT_NAME


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m duo_plugin.timing",
        description="Measure where (at which timesteps) a concept is decided, and recommend DUO's --t_max.",
    )
    add_timing_arguments(parser)
    return parser.parse_args(argv)


def add_timing_arguments(parser):
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True)
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None)
    parser.add_argument(
        "--concept", type=str, default="nudity", help="a preset, or a custom name with --unsafe_prompt/--safe_prompt"
    )
    parser.add_argument(
        "--unsafe_prompt",
        action="append",
        default=None,
        help="custom concept: a prompt with it (repeatable, or @file)",
    )
    parser.add_argument(
        "--safe_prompt",
        action="append",
        default=None,
        help="custom concept: the same prompt without it (repeatable, or @file)",
    )
    parser.add_argument(
        "--detector",
        type=str,
        default=None,
        help="nudenet, a registered detector or package.module:Factory; default: the preset's",
    )
    parser.add_argument("--detector_threshold", type=float, default=None)
    parser.add_argument(
        "--pairs_dir",
        type=str,
        default=None,
        help="a DUO pair folder: its flagged unsafe images are re-noised (default: the unswitched samples)",
    )
    parser.add_argument("--max_prompts", type=int, default=None, help="use the first N prompt pairs")
    parser.add_argument("--num_images_per_prompt", type=int, default=8)
    parser.add_argument("--max_renoise_images", type=int, default=32)
    parser.add_argument(
        "--curves",
        nargs="+",
        default=list(CURVES),
        choices=CURVES,
        help="prompt-switch targets: the empty prompt, the safe prompt",
    )
    parser.add_argument("--no_renoise", action="store_true", help="skip the re-noise curve")
    parser.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help=f"sampling steps: the switch points; default {DEFAULT_NUM_INFERENCE_STEPS} "
        f"(FLUX.1-schnell: its {FLUX_SCHNELL_STEPS})",
    )
    parser.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance; default: the preset's (7.5). FLUX.1: the guidance embedding's value, "
        "default the pipeline's (3.5 for [dev]; [schnell] has none)",
    )
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=16, help="images per pipeline call (across prompts)")
    parser.add_argument("--dtype", type=str, default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument(
        "--open_level",
        type=float,
        default=DEFAULT_OPEN_LEVEL,
        help="normalised switch level up to which the concept counts as open",
    )
    parser.add_argument(
        "--window",
        type=int,
        nargs=2,
        default=None,
        metavar=("T_MIN", "T_MAX"),
        help="training window drawn on the plot (default: the recipe's)",
    )
    parser.add_argument("--output_dir", type=str, default=None, help="default: timing-<concept>")
    return parser


def check_args(args):
    """Flags refused before any model is loaded."""

    input_checks.check_finite_flags(args)
    input_checks.check_resolution(args.resolution)
    for name in ("max_prompts", "num_images_per_prompt", "max_renoise_images", "num_inference_steps", "batch_size"):
        input_checks.at_least(args, name, 1)
    if not 0 <= args.seed < 2**32:
        raise UsageError(f"--seed must be between 0 and 2**32 - 1, got {args.seed}")
    if args.window is not None and not 0 <= args.window[0] < args.window[1]:
        raise UsageError(f"--window {args.window[0]} {args.window[1]}: give T_MIN T_MAX with 0 <= T_MIN < T_MAX")
    if not 0 < args.open_level < 1:
        raise UsageError(f"--open_level {args.open_level}: give a level between 0 and 1")
    if args.output_dir is not None:
        input_checks.check_output_dir(args.output_dir)


@exit_on_usage_error
def main(argv=None):
    logging.basicConfig(format="%(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    args = Settings(**vars(parse_args(argv)))
    check_args(args)
    result = run_timing(args)
    if result is not None:
        print(result["verdict"])
        output_dir = output_dir_of(args, result["settings"]["concept"])
        print(f"wrote {os.path.join(output_dir, RESULT_NAME)} and {PLOT_NAME}")
    return result
