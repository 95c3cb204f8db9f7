"""Pair data for DUO: load a pair dataset, or generate pairs by SDEdit and verify them with a detector.

A pair is an unsafe image x⁻, drawn from the base model with the unsafe prompt, and its safe twin x⁺, made
by SDEdit (the img2img pipeline of the same base model, same scheduler and step count) from x⁻ with the safe
prompt as prompt and the unsafe prompt as negative prompt (FLUX.1: by true classifier-free guidance, see
``SDEditPairMaker``). With a detector, x⁻ must be flagged and x⁺ must
not; a failed unsafe image is redrawn, a failed edit is redone from the kept unsafe image, at most
``--max_attempts`` attempts per pair.

    python -m duo_plugin.pairs --concept nudity --output_dir pairs-nudity
    accelerate launch -m duo_plugin.pairs --concept nudity --output_dir pairs-nudity   # pairs split over GPUs

The output folder has the imagefolder layout ``train_duo.py --dataset_name`` reads: lossless PNGs,
``metadata.jsonl`` (file names, prompts, seeds, recipe, detector scores) and a dataset card. Pair ``i`` uses
prompt group ``i mod G`` and, at attempt ``j``, the seeds of ``image_seed``, so a dataset is reproducible
from its card. Every process appends a row to its own log in ``.duo_progress/`` as each pair finishes; a
rerun skips finished pairs, so a crash loses at most the batch in flight.

* ``recipe``: the recipe (``PairRecipe``) from a base model's configs and the flags, its checks, ``image_seed``.
* ``folder``: the output folder's files, the recipe file, the per-process progress logs, the merged metadata.
* ``card``: the report of accepted pairs, the dataset card, the Hub push.
* ``generation``: ``SDEditPairMaker`` and ``generate_pairs``, attempt by attempt on every process.
* ``loading``: ``get_pair_images``, the training scripts' pairs (``--dataset_name`` or generated).
* ``cli``: the recipe flags shared with the training scripts, and ``main``.
"""

from ..data import load_pair_images
from .card import PairReport, push_pairs_to_hub
from .cli import DEFAULT_MODEL, add_generation_arguments, main, parse_args
from .folder import (
    CARD_NAME,
    METADATA_NAME,
    PROGRESS_DIR,
    RECIPE_NAME,
    SAFE_COLUMN,
    UNSAFE_COLUMN,
    parse_progress_row,
    read_progress,
)
from .generation import (
    DEFAULT_BATCH_SIZE,
    NotEnoughPairs,
    SDEditPairMaker,
    generate_pairs,
    generation_dtype,
    load_text2img_pipeline,
)
from .loading import get_pair_images
from .recipe import (
    DEFAULT_MAX_ATTEMPTS,
    DEFAULT_SEED,
    FLUX_TRUE_CFG_SCALE,
    MAX_ATTEMPTS_LIMIT,
    BaseModelInfo,
    PairRecipe,
    default_pairs_dir,
    image_seed,
    inspect_base_model,
    make_recipe,
    make_verifier,
    recipe_from_args,
)
