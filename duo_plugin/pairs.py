"""Pair data for DUO: load a pair dataset, or generate pairs by SDEdit and verify them with a detector."""

from .data import PairImages, load_pair_images
from .errors import UsageError


def get_pair_images(args, preset, pipeline_class: str, accelerator) -> PairImages:
    """The training pairs: ``--dataset_name`` if given, else generated pairs (cached for later runs)."""
    if args.dataset_name is None:
        raise UsageError(
            f"no --dataset_name: generate pairs first with `python -m duo_plugin.pairs --concept {args.concept} "
            f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} --output_dir pairs-{args.concept}` "
            f"and pass --dataset_name pairs-{args.concept}"
        )
    return load_pair_images(
        args.dataset_name,
        args.unsafe_image_column,
        args.safe_image_column,
        num_pairs=args.num_pairs,
        revision=args.dataset_revision,
        cache_dir=args.cache_dir,
    )
