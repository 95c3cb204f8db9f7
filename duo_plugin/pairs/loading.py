"""The training scripts' pairs: a dataset from ``--dataset_name``, or pairs generated into a cache folder."""

from ..data import PairImages, load_pair_images
from .folder import SAFE_COLUMN, UNSAFE_COLUMN
from .generation import generate_pairs
from .recipe import default_pairs_dir, inspect_base_model, recipe_from_args


def get_pair_images(args, preset, pipeline_class: str, accelerator) -> PairImages:
    """The training pairs: ``--dataset_name`` if given, else generated pairs, cached in ``--pairs_dir``
    (default ``~/.cache/duo/pairs/<model>/<concept>``) for later runs to reuse, named by ``generated_folder``.
    ``args`` (read-only settings) is only read."""
    if args.dataset_name is None:
        folder = args.pairs_dir or default_pairs_dir(args.pretrained_model_name_or_path, args.concept)
        info = inspect_base_model(args.pretrained_model_name_or_path, args.revision, args.cache_dir, pipeline_class)
        recipe = recipe_from_args(args, preset, info, seed=args.generation_seed)
        generate_pairs(
            recipe,
            folder,
            accelerator,
            batch_size=args.generation_batch_size,
            dtype=args.generation_dtype,
            min_pairs=args.min_pairs,
            cache_dir=args.cache_dir,
        )
        images = load_pair_images(
            folder, UNSAFE_COLUMN, SAFE_COLUMN, num_pairs=args.num_pairs, cache_dir=args.cache_dir
        )
        images.generated_folder = folder
        return images
    return load_pair_images(
        args.dataset_name,
        args.unsafe_image_column,
        args.safe_image_column,
        num_pairs=args.num_pairs,
        revision=args.dataset_revision,
        cache_dir=args.cache_dir,
    )
