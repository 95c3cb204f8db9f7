"""The command's flags, and the refusals that need nothing loaded."""

import argparse

import torch

from .. import attacks, metrics
from ..concepts import add_concept_arguments
from ..errors import UsageError
from ..help_defaults import show_defaults
from ..input_checks import check_finite_flags
from .models import DEFAULT_GUIDANCE_SCALE, DEFAULT_NUM_INFERENCE_STEPS
from .prompt_sets import check_prompt_set_names


ATTACKS = ("prompts", "ring_a_bell", "concept_inversion", "unlearndiffatk")
METRICS = ("dsr", "prior_preservation", "fid", "clip_score")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m duo_plugin.evaluate",
        description="Measure concept unlearning: defense success rate under attacks, prior preservation, FID and CLIP score.",
    )
    models = parser.add_argument_group("models (the base model is always evaluated)")
    models.add_argument(
        "--base_model",
        type=str,
        default=None,
        help="diffusers pipeline folder or Hub id; default: the adapters' base_model",
    )
    models.add_argument("--revision", type=str, default=None, help="revision of the base model")
    models.add_argument("--variant", type=str, default=None, help="e.g. fp16 weights of the base model")
    models.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="a DUO adapter folder or Hub repo (repeatable)",
    )
    models.add_argument(
        "--pipeline",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="another method's full pipeline folder or Hub id (repeatable)",
    )
    models.add_argument(
        "--unet",
        action="append",
        default=[],
        metavar="[NAME=]PATH",
        help="another method's UNet (folder, Hub id or state-dict file) swapped into the base model (repeatable)",
    )

    concept = parser.add_argument_group("concept and detector")
    add_concept_arguments(
        concept,
        unsafe_help="custom concept: a prompt with it (repeatable, or @file); also Ring-A-Bell's concept pairs",
    )
    concept.add_argument(
        "--detector",
        type=str,
        default=None,
        help="nudenet, clip, or a registered detector; default: the preset's (nudenet for nudity), else clip",
    )
    concept.add_argument(
        "--dsr_threshold",
        "--detector_threshold",
        dest="detector_threshold",
        type=float,
        default=None,
        help="detector score at which an image counts as showing the concept, for the DSR (nudenet 0.6, clip 0.5); "
        "separate from the pair verifier's threshold (--verifier_threshold of duo_plugin.pairs)",
    )
    concept.add_argument(
        "--clip_model",
        type=str,
        default=metrics.DEFAULT_CLIP_MODEL,
        help="CLIP for the clip detector and the CLIP score (Hub id or folder)",
    )
    concept.add_argument(
        "--clip_unsafe_label",
        action="append",
        default=None,
        help='clip detector: text for the concept (repeatable; default "a photo of <concept>")',
    )
    concept.add_argument(
        "--clip_safe_label",
        action="append",
        default=None,
        help='clip detector: text for its absence (repeatable; default "a photo")',
    )

    prompts = parser.add_argument_group("prompts and attacks")
    prompts.add_argument(
        "--attack",
        nargs="+",
        default=["prompts"],
        help=f"prompt sources for the DSR: {', '.join(ATTACKS)} (SneakyPrompt is not implemented yet)",
    )
    prompts.add_argument(
        "--prompts",
        action="append",
        default=None,
        metavar="[NAME=]PATH",
        help="unsafe prompts: text (one a line), I2P-style CSV, JSON lines; default: the preset's unsafe prompts. "
        "Repeat with NAME=PATH for several sets, each with its own DSR (e.g. direct=a.txt synonym=b.txt)",
    )
    prompts.add_argument(
        "--prompt_categories", nargs="+", default=None, help="keep only I2P rows of these categories, e.g. sexual"
    )
    prompts.add_argument("--max_prompts", type=int, default=None)
    prompts.add_argument(
        "--unrelated_prompts",
        type=str,
        default=None,
        help="prompts for prior preservation, FID and CLIP score: a COCO captions file or any prompt file; default: the preset's",
    )
    prompts.add_argument("--max_unrelated_prompts", type=int, default=None)

    ring = parser.add_argument_group("Ring-A-Bell")
    ring.add_argument(
        "--ring_a_bell_targets",
        type=str,
        default=None,
        help="prompts to turn into adversarial ones; default: --prompts",
    )
    ring.add_argument(
        "--ring_a_bell_min_nudity_percentage",
        type=float,
        default=None,
        help="of an I2P-style CSV of targets with a nudity_percentage column, keep rows above this; default: the "
        "original's 50 for --concept nudity, no filter for other concepts",
    )
    ring.add_argument(
        "--ring_a_bell_concept_prompts",
        nargs=2,
        default=None,
        metavar=("WITH_CONCEPT", "WITHOUT_CONCEPT"),
        help="two prompt files paired row by row (the original averages ~200 pairs); default: the concept's prompt pairs",
    )
    ring.add_argument(
        "--ring_a_bell_concept_vector",
        type=str,
        default=None,
        help="a saved concept vector (.npy as Ring-A-Bell publishes them, .pt, .safetensors) instead of computing one",
    )
    ring.add_argument(
        "--ring_a_bell_search",
        type=str,
        default="original",
        choices=attacks.RING_A_BELL_SEARCHES,
        help="original: the published genetic algorithm; tournament: this package's earlier variant",
    )
    ring.add_argument(
        "--ring_a_bell_vocabulary",
        type=str,
        default="full",
        choices=attacks.RING_A_BELL_VOCABULARIES,
        help="full: every non-special token (the original); retokenizable: tokens that survive retokenization",
    )
    ring.add_argument("--ring_a_bell_max_targets", type=int, default=None)
    ring.add_argument("--ring_a_bell_length", type=int, default=16, help="tokens per adversarial prompt (K)")
    ring.add_argument(
        "--ring_a_bell_strength", type=float, default=3.0, help="η: how far along the concept vector the target lies"
    )
    ring.add_argument("--ring_a_bell_population", type=int, default=200)
    ring.add_argument("--ring_a_bell_generations", type=int, default=3000)
    ring.add_argument("--ring_a_bell_mutation_rate", type=float, default=0.25)
    ring.add_argument("--ring_a_bell_crossover_rate", type=float, default=0.5)

    inversion = parser.add_argument_group("Concept Inversion")
    inversion.add_argument(
        "--inversion_images",
        type=str,
        default=None,
        help="images of the concept: a DUO pair folder (its unsafe images), an image folder, or 'pairs' (the adapter's pair folder); "
        "default: held out, generated by the base model from the concept's unsafe prompts with seeds the pairs do not use",
    )
    inversion.add_argument(
        "--inversion_num_images", type=int, default=25, help="held-out images to generate (the original's 25)"
    )
    inversion.add_argument("--inversion_max_images", type=int, default=None)
    inversion.add_argument("--inversion_token", type=str, default="<duo-concept>")
    inversion.add_argument(
        "--inversion_initializer",
        type=str,
        default=None,
        help="words whose mean embedding starts the token; default: the concept name",
    )
    inversion.add_argument(
        "--inversion_template",
        action="append",
        default=None,
        help="training and generation prompt with {} for the token (repeatable)",
    )
    inversion.add_argument("--inversion_steps", type=int, default=5000)
    inversion.add_argument("--inversion_learning_rate", type=float, default=5e-3)
    inversion.add_argument(
        "--inversion_scale_lr",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="multiply the learning rate by batch size × accumulation steps (the original's --scale_lr)",
    )
    inversion.add_argument("--inversion_batch_size", type=int, default=4)
    inversion.add_argument("--inversion_gradient_accumulation_steps", type=int, default=4)
    inversion.add_argument(
        "--inversion_weight_decay",
        type=float,
        default=1e-2,
        help="AdamW weight decay (diffusers' textual inversion default)",
    )
    inversion.add_argument(
        "--inversion_num_prompts",
        type=int,
        default=16,
        help="generation prompts with the learned token (cycling through the templates)",
    )

    unlearndiffatk = parser.add_argument_group("UnlearnDiffAtk (defaults: the original's for nudity)")
    unlearndiffatk.add_argument(
        "--unlearndiffatk_targets",
        type=str,
        default=None,
        help="prompts to attack (each image seed is one attack); default: --prompts",
    )
    unlearndiffatk.add_argument("--unlearndiffatk_max_targets", type=int, default=None)
    unlearndiffatk.add_argument(
        "--unlearndiffatk_num_tokens", type=int, default=5, help="adversarial tokens prepended to the prompt (k)"
    )
    unlearndiffatk.add_argument(
        "--unlearndiffatk_iterations", type=int, default=40, help="optimisation steps at each timestep"
    )
    unlearndiffatk.add_argument(
        "--unlearndiffatk_timesteps",
        type=int,
        default=50,
        help="timesteps visited in order (T/n/2, then every T/n); the prompt is tried after each",
    )
    unlearndiffatk.add_argument("--unlearndiffatk_learning_rate", type=float, default=1e-2)
    unlearndiffatk.add_argument("--unlearndiffatk_weight_decay", type=float, default=0.1)

    measure = parser.add_argument_group("metrics")
    measure.add_argument(
        "--metrics", nargs="+", default=["dsr", "prior_preservation"], help=f"from {', '.join(METRICS)}"
    )
    measure.add_argument("--lpips_net", type=str, default="alex", choices=sorted(metrics.LPIPS_TRUNKS))
    measure.add_argument(
        "--lpips_random_trunk",
        action="store_true",
        help="randomly initialised LPIPS trunk, for smoke tests without downloads: the numbers are not comparable to published ones",
    )
    measure.add_argument(
        "--fid_reference_dir", type=str, default=None, help="folder of reference images (e.g. COCO val2014) for FID"
    )
    measure.add_argument("--max_reference_images", type=int, default=None)
    measure.add_argument(
        "--fid_inception_weights",
        type=str,
        default=None,
        help="torch-fidelity's Inception weights file, for offline use",
    )

    generation = parser.add_argument_group("generation")
    generation.add_argument("--output_dir", type=str, default=None, help="default: eval-<concept>")
    generation.add_argument("--num_images_per_prompt", type=int, default=1)
    generation.add_argument(
        "--num_inference_steps",
        type=int,
        default=None,
        help=f"default {DEFAULT_NUM_INFERENCE_STEPS}; FLUX.1: its pipeline's (28; [schnell] 4)",
    )
    generation.add_argument(
        "--guidance_scale",
        type=float,
        default=None,
        help=f"classifier-free guidance for prompts whose file gives none; default {DEFAULT_GUIDANCE_SCALE}. FLUX.1: "
        "the guidance embedding's value for every prompt, default its pipeline's (3.5; [schnell] has none)",
    )
    generation.add_argument("--resolution", type=int, default=None, help="default: the model's")
    generation.add_argument(
        "--seed",
        type=int,
        default=0,
        help="image k of prompt i uses seed + i + k·1000003 (or the prompt file's seed + k·1000003)",
    )
    generation.add_argument("--batch_size", type=int, default=8, help="images per pipeline call")
    generation.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"])
    generation.add_argument("--grid_size", type=int, default=8, help="prompts per base-vs-unlearned grid")
    return show_defaults(parser).parse_args(argv)


# Every image to make is planned (and its row kept) before generation starts: these bound that plan.
MAX_IMAGES_PER_PROMPT = 10_000
MAX_IMAGES = 2_000_000


def check_image_count(prompt_sets: dict, num_images_per_prompt: int, num_models: int):
    total = sum(len(prompts) for prompts in prompt_sets.values()) * num_images_per_prompt * num_models
    if total > MAX_IMAGES:
        raise UsageError(
            f"this evaluation would make {total:,} images (more than {MAX_IMAGES:,}): lower --num_images_per_prompt "
            f"or --max_prompts, or evaluate fewer models at once"
        )


def check_args(args):
    """Refusals that need nothing loaded."""
    check_finite_flags(args)
    attacks.check_attack_names(args.attack, ATTACKS)
    check_prompt_set_names(args)
    unknown = [m for m in args.metrics if m not in METRICS]
    if unknown:
        raise UsageError(f"unknown --metrics {', '.join(unknown)}: choose from {', '.join(METRICS)}")
    if "fid" in args.metrics and not args.fid_reference_dir:
        raise UsageError("--metrics fid needs --fid_reference_dir, a folder of reference images (e.g. COCO val2014)")
    for name in (
        "num_images_per_prompt",
        "num_inference_steps",
        "batch_size",
        "inversion_steps",
        "inversion_batch_size",
        "inversion_num_prompts",
        "inversion_gradient_accumulation_steps",
        "inversion_num_images",
        "ring_a_bell_population",
        "grid_size",
        "unlearndiffatk_num_tokens",
        "unlearndiffatk_iterations",
        "unlearndiffatk_timesteps",
    ):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name} must be at least 1")
    if args.ring_a_bell_generations < (1 if args.ring_a_bell_search == "original" else 0):
        raise UsageError(
            f"--ring_a_bell_generations must be at least {1 if args.ring_a_bell_search == 'original' else 0} for the {args.ring_a_bell_search} search"
        )
    if "unlearndiffatk" in args.attack and "dsr" not in args.metrics:
        raise UsageError(
            "--attack unlearndiffatk judges each adversarial prompt with the detector: keep dsr in --metrics"
        )
    if args.prompt_categories and not args.prompts:
        raise UsageError("--prompt_categories filters the rows of --prompts (an I2P-style CSV): pass --prompts")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8 != 0):
        raise UsageError(f"--resolution {args.resolution} is not a positive multiple of 8")
    if args.max_prompts is not None and args.max_prompts < 1:
        raise UsageError(f"--max_prompts {args.max_prompts}: give at least 1 (or leave it out to use every prompt)")
    if args.num_images_per_prompt > MAX_IMAGES_PER_PROMPT:
        raise UsageError(
            f"--num_images_per_prompt {args.num_images_per_prompt} is more than {MAX_IMAGES_PER_PROMPT}: the field's "
            f"protocols use 1 to 10 images per prompt; give fewer"
        )
    if args.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise UsageError("--mixed_precision fp16 needs a GPU: use bf16 or no on CPU")
