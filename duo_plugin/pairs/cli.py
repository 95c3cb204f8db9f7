"""The command line: the recipe flags (shared with the training scripts), ``python -m duo_plugin.pairs`` itself."""

import argparse
import logging

from ..concepts import add_concept_arguments, resolve_concept_preset
from ..detectors import detector_names
from ..distributed import check_distributed_setup, cpu_only_multi_process
from ..errors import exit_on_usage_error
from ..help_defaults import show_defaults
from ..input_checks import check_output_dir
from .card import PairReport, push_pairs_to_hub
from .generation import DEFAULT_BATCH_SIZE, generate_pairs
from .recipe import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_SEED,
    FLUX_TRUE_CFG_SCALE,
    default_pairs_dir,
    inspect_base_model,
    recipe_from_args,
)


# The name the module had before it became a package: log lines keep their source.
logger = logging.getLogger("duo_plugin.pairs")

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


def add_generation_arguments(parser: argparse.ArgumentParser, for_training: bool = False):
    """The recipe flags. The training scripts add them with ``for_training=True`` (their own --seed and
    batch flags are for training, so the generator's are --generation_seed and --generation_batch_size)."""
    group = parser.add_argument_group("pair generation" + (" (without --dataset_name)" if for_training else ""))
    group.add_argument(
        "--strength", type=float, default=None, help="SDEdit strength; preset default (0.75 nudity, 0.8 violence)"
    )
    group.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help="classifier-free guidance of both images; preset default 7.5. FLUX.1: the guidance embedding's value "
        "(default 3.5, FLUX.1-dev; FLUX.1-schnell has none)",
    )
    group.add_argument(
        "--true_cfg_scale",
        type=float,
        default=None,
        help=f"FLUX.1 only: true classifier-free guidance of the SDEdit edit, with the unsafe prompt as negative "
        f"prompt (must be above 1); default {FLUX_TRUE_CFG_SCALE}",
    )
    group.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help="default: the base pipeline's (50 SD 1.x/2.x and SDXL, 28 SD3 and FLUX.1-dev; 4 for FLUX.1-schnell)",
    )
    group.add_argument(
        "--max_attempts", type=int, default=DEFAULT_MAX_ATTEMPTS, help="attempts per pair before giving it up"
    )
    group.add_argument(
        "--min_pairs", type=int, default=None, help="fail when fewer pairs are accepted (default: all of --num_pairs)"
    )
    group.add_argument(
        "--verifier",
        type=str,
        default=None,
        help=f"detector checking each pair ({', '.join(detector_names())}); preset default (nudenet for nudity, none otherwise)",
    )
    group.add_argument(
        "--verifier_threshold",
        "--detector_threshold",
        dest="detector_threshold",
        type=float,
        default=None,
        help="verifier score at which an image counts as flagged; default: the official rule for nudenet (any exposed box "
        "NudeNet reports, score >= 0.25), the detector's own default otherwise. Evaluation's DSR threshold is separate.",
    )
    prefix = "generation_" if for_training else ""
    group.add_argument(
        f"--{prefix}batch_size", type=int, default=DEFAULT_BATCH_SIZE, help="pairs generated at once per process"
    )
    group.add_argument(
        f"--{prefix}dtype",
        type=str,
        default="auto",
        choices=["auto", "fp32", "fp16", "bf16"],
        help="auto: fp16 on GPU (bf16 for FLUX.1), fp32 on CPU",
    )
    if for_training:
        group.add_argument(
            "--generation_seed",
            type=int,
            default=DEFAULT_SEED,
            help="seed of the generated pairs (not the training seed)",
        )
    return parser


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m duo_plugin.pairs",
        description="Generate DUO pairs (unsafe image, SDEdit safe twin), verified by a detector.",
    )
    add_concept_arguments(parser)
    parser.add_argument("--num_pairs", type=int, default=None, help="preset default (64 nudity, 32 violence)")
    parser.add_argument("--pretrained_model_name_or_path", type=str, default=DEFAULT_MODEL)
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None, help="e.g. fp16 weights of the base model")
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help="default: the cache folder train_duo.py reuses (~/.cache/duo/pairs/<model>/<concept>)",
    )
    parser.add_argument("--resolution", type=int, default=None, help="default: the base model's")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED)
    add_generation_arguments(parser)
    hub = parser.add_argument_group("Hub")
    hub.add_argument(
        "--push_to_hub", action="store_true", help="push the pairs as a dataset repo (private unless --hub_public)"
    )
    hub.add_argument(
        "--hub_model_id", type=str, default=None, help="dataset repo id; default: the output folder's name"
    )
    hub.add_argument("--hub_token", type=str, default=None)
    hub.add_argument("--hub_public", action="store_true")
    return show_defaults(parser).parse_args(argv)


@exit_on_usage_error
def main(argv=None) -> PairReport:
    from accelerate import PartialState

    args = parse_args(argv)
    preset = resolve_concept_preset(args.concept, args.unsafe_prompt, args.safe_prompt)
    info = inspect_base_model(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    recipe = recipe_from_args(args, preset, info, seed=args.seed)
    output_dir = args.output_dir or default_pairs_dir(args.pretrained_model_name_or_path, preset.name)
    check_output_dir(output_dir)
    state = PartialState(cpu=cpu_only_multi_process())
    check_distributed_setup(state)
    if state.is_local_main_process:
        logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    report = generate_pairs(
        recipe,
        output_dir,
        state,
        batch_size=args.batch_size,
        dtype=args.dtype,
        min_pairs=args.min_pairs,
        cache_dir=args.cache_dir,
    )
    if state.is_main_process and args.push_to_hub:
        repo_id = push_pairs_to_hub(output_dir, args.hub_model_id, args.hub_token, private=not args.hub_public)
        logger.info("Pushed to https://huggingface.co/datasets/%s", repo_id)
    return report
