"""The retain set of the concept-specific objective: base-model images of prompts that do not name the concept.

The retain term holds the adapter's prediction on these images (noised at the training timesteps) to the
base model's, under the empty prompt and under their own prompt (``objective.concept_losses``). Without it the
empty-prompt preference removes a concept largely by a drift that moves every image (issue 24).

Made once by the base text-to-image pipeline with the pair recipe's sampler settings, each image checked
by the pair verifier (an image it flags shows the concept and is left out), and cached in a folder like the
pairs: one PNG per image, ``progress.jsonl`` (one durable row per finished image, so an interrupted run
resumes where it stopped) and ``duo_retain_config.json`` (what made it; another recipe is refused).
"""

import json
import os
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

import torch
from PIL import Image

from .errors import UsageError
from .files import append_jsonl, atomic_write_text
from .presets import DEFAULT_NUM_RETAIN_IMAGES


RETAIN_CONFIG = "duo_retain_config.json"
RETAIN_PROGRESS = "progress.jsonl"


@dataclass(frozen=True)
class RetainRecipe:
    """Everything that decides a retain set."""

    base_model: str
    revision: Optional[str]
    variant: Optional[str]
    family: str
    prompts: Tuple[str, ...]
    num_images: int
    resolution: int
    guidance_scale: float
    num_inference_steps: int
    seed: int
    verifier: Optional[str]
    detector_threshold: Optional[float]

    def prompt_of(self, index: int) -> str:
        """The prompts take turns, so any prefix of the set stays balanced."""
        return self.prompts[index % len(self.prompts)]


def retain_seed(seed: int, index: int) -> int:
    """The generator seed of retain image ``index``: pure in its arguments, apart from the pairs' seeds."""
    return (seed * 1_000_003 + 500_009 + index) % (2**63 - 1)


def retain_recipe_from_pairs(pair_recipe, prompts: List[str], num_images: int) -> RetainRecipe:
    """The retain recipe of a run: the pair recipe's base model, sampler and verifier, with the retain prompts."""
    prompts = tuple(p for p in (prompt.strip() for prompt in prompts) if p)
    if not prompts:
        raise UsageError("--retain_prompts lists no prompt: give a file with one unrelated prompt per line")
    if num_images < 1:
        raise UsageError(f"--num_retain_images {num_images}: give at least 1")
    return RetainRecipe(
        base_model=pair_recipe.base_model,
        revision=pair_recipe.revision,
        variant=pair_recipe.variant,
        family=pair_recipe.family,
        prompts=prompts,
        num_images=num_images,
        resolution=pair_recipe.resolution,
        guidance_scale=pair_recipe.guidance_scale,
        num_inference_steps=pair_recipe.num_inference_steps,
        seed=pair_recipe.seed,
        verifier=pair_recipe.verifier,
        detector_threshold=pair_recipe.detector_threshold,
    )


def default_retain_dir(pairs_dir: str) -> str:
    """Beside the pairs: ``<pairs_dir>-retain``."""
    return os.path.normpath(pairs_dir) + "-retain"


def image_name(index: int) -> str:
    return f"{index:05d}.png"


def _check_folder(folder: str, recipe: RetainRecipe):
    path = os.path.join(folder, RETAIN_CONFIG)
    if not os.path.exists(path):
        if os.path.isdir(folder) and os.listdir(folder):
            raise UsageError(
                f"{folder} is not empty and holds no {RETAIN_CONFIG}: give --retain_dir an empty or new folder"
            )
        return
    try:
        with open(path, encoding="utf-8") as f:
            stored = json.load(f)["recipe"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UsageError(f"{path} is not a retain recipe ({error}): delete {folder} to make the set again") from None
    expected = json.loads(json.dumps(asdict(recipe)))
    differences = [key for key in expected if key != "num_images" and stored.get(key) != expected[key]]
    if differences:
        raise UsageError(
            f"{folder} holds retain images made with another recipe ({', '.join(differences)} differ): "
            f"delete it or give another --retain_dir"
        )


def read_progress(folder: str) -> dict:
    """Finished images by index (kept or left out); a half-written last row (a crash) is skipped."""
    finished = {}
    path = os.path.join(folder, RETAIN_PROGRESS)
    if not os.path.exists(path):
        return finished
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("index"), int):
                finished[row["index"]] = row
    return finished


def generate_retain_images(
    recipe: RetainRecipe, folder: str, accelerator, batch_size: int = 8, dtype: str = "auto", cache_dir=None
) -> List[dict]:
    """Make the images still missing (main process; the others wait), then return every kept image's row.

    Returns rows ``{"index", "file_name", "prompt", "seed"}`` in index order; an image the verifier flags
    is recorded as left out and not drawn again (its seed is the recipe's)."""
    from tqdm.auto import tqdm

    from .detectors import get_detector
    from .pairs import generation_dtype, load_text2img_pipeline

    if accelerator.is_main_process:
        _check_folder(folder, recipe)
        finished = read_progress(folder)
        pending = [i for i in range(recipe.num_images) if i not in finished]
        if pending:
            os.makedirs(folder, exist_ok=True)
            atomic_write_text(
                os.path.join(folder, RETAIN_CONFIG),
                json.dumps({"format_version": 1, "recipe": asdict(recipe)}, indent=2),
            )
            pipeline = load_text2img_pipeline(
                recipe, accelerator.device, generation_dtype(dtype, accelerator.device, recipe.family), cache_dir
            )
            detector = get_detector(recipe.verifier, recipe.detector_threshold)
            progress = tqdm(total=len(pending), desc="Retain images", disable=not accelerator.is_local_main_process)
            for start in range(0, len(pending), batch_size):
                indices = pending[start : start + batch_size]
                with torch.no_grad():
                    images = pipeline(
                        prompt=[recipe.prompt_of(i) for i in indices],
                        height=recipe.resolution,
                        width=recipe.resolution,
                        num_inference_steps=recipe.num_inference_steps,
                        guidance_scale=recipe.guidance_scale,
                        generator=[torch.Generator("cpu").manual_seed(retain_seed(recipe.seed, i)) for i in indices],
                    ).images
                flags = [d.flagged for d in detector(images)] if detector is not None else [False] * len(images)
                rows = []
                for index, image, flagged in zip(indices, images, flags):
                    row = {
                        "index": index,
                        "prompt": recipe.prompt_of(index),
                        "seed": retain_seed(recipe.seed, index),
                        "kept": not flagged,
                    }
                    if not flagged:
                        row["file_name"] = image_name(index)
                        image.save(os.path.join(folder, image_name(index)))
                    rows.append(row)
                append_jsonl(os.path.join(folder, RETAIN_PROGRESS), rows, durable=True)
                progress.update(len(indices))
            progress.close()
            del pipeline
    accelerator.wait_for_everyone()
    rows = [row for index, row in sorted(read_progress(folder).items()) if index < recipe.num_images and row["kept"]]
    if not rows:
        raise UsageError(
            f"the verifier flagged every retain image in {folder}: the retain prompts make the concept; "
            f"give --retain_prompts that do not"
        )
    return rows


def load_retain_images(folder: str, rows: List[dict]) -> List[Image.Image]:
    return [Image.open(os.path.join(folder, row["file_name"])).convert("RGB") for row in rows]


def read_retain_prompts(value: Optional[str], preset_prompts: Tuple[str, ...]) -> List[str]:
    """``--retain_prompts``: a text file (one prompt a line), or the preset's list without it."""
    if value is None:
        if not preset_prompts:
            raise UsageError(
                "--retain_weight needs unrelated prompts: give --retain_prompts FILE (one prompt a line); "
                "this concept has no default list"
            )
        return list(preset_prompts)
    path = value[1:] if value.startswith("@") else value
    if not os.path.isfile(path):
        raise UsageError(f"--retain_prompts {value}: no such file; give a text file with one prompt a line")
    with open(path, encoding="utf-8") as f:
        return [line.strip() for line in f if line.strip()]


def get_retain_set(
    args, preset, pipeline_class: str, accelerator, conditions=()
) -> Tuple[List[Image.Image], List[str], dict]:
    """The run's retain images, their prompts and the record for ``duo_config.json``, generated into
    ``--retain_dir`` when missing (default: beside the pair folder, or beside the generated pairs' cache)."""
    from .pairs import default_pairs_dir, inspect_base_model, recipe_from_args

    info = inspect_base_model(args.pretrained_model_name_or_path, args.revision, args.cache_dir, pipeline_class)
    pair_recipe = recipe_from_args(args, preset, info, seed=args.generation_seed)
    recipe = retain_recipe_from_pairs(
        pair_recipe, read_retain_prompts(args.retain_prompts, preset.retain_prompts), args.num_retain_images
    )
    if args.retain_dir is not None:
        folder = args.retain_dir
    elif args.dataset_name is not None and os.path.isdir(args.dataset_name):
        folder = default_retain_dir(args.dataset_name)
    else:
        pairs_dir = args.pairs_dir or default_pairs_dir(args.pretrained_model_name_or_path, args.concept)
        folder = default_retain_dir(pairs_dir)
    rows = generate_retain_images(
        recipe,
        folder,
        accelerator,
        batch_size=args.generation_batch_size,
        dtype=args.generation_dtype,
        cache_dir=args.cache_dir,
    )
    record = {
        "dir": folder,
        "num_images": len(rows),
        "num_left_out": recipe.num_images - len(rows),
        "prompts": list(recipe.prompts),
        "conditions": list(conditions),
        "seed": recipe.seed,
    }
    return load_retain_images(folder, rows), [row["prompt"] for row in rows], record


@torch.no_grad()
def encode_retain_latents(vae, images: List[Image.Image], resolution: int, device, dtype) -> torch.Tensor:
    """Scaled clean latents of the retain images (posterior mean, center crop), on the CPU."""
    from .data import PairImages, encode_pairs

    cache = encode_pairs(
        vae,
        PairImages(images, images, None, None),
        resolution,
        True,
        False,
        0,
        device=device,
        dtype=dtype,
        progress=False,
    )
    return (cache.mean[:, 0, 0] - cache.shift_factor) * cache.scaling_factor


# --------------------------------------------------------------------------------------------------
# Command line: python -m duo_plugin.retain (the training scripts make the set themselves when it is missing)
# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    import argparse

    from .concepts import add_concept_arguments
    from .help_defaults import show_defaults
    from .pairs import DEFAULT_SEED, add_generation_arguments

    parser = argparse.ArgumentParser(
        prog="python -m duo_plugin.retain",
        description="Make the retain set of the concept objective (train_duo.py --objective concept): base-model "
        "images of unrelated prompts, checked by the pair verifier. Give the same generation flags as the training.",
    )
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True)
    parser.add_argument("--revision", type=str, default=None)
    parser.add_argument("--variant", type=str, default=None)
    parser.add_argument("--cache_dir", type=str, default=None)
    add_concept_arguments(parser)
    parser.add_argument("--retain_prompts", type=str, default=None, help="one prompt a line; default: the preset's")
    parser.add_argument("--num_retain_images", type=int, default=DEFAULT_NUM_RETAIN_IMAGES)
    parser.add_argument("--output_dir", type=str, required=True, help="the retain folder (train_duo.py --retain_dir)")
    parser.add_argument("--resolution", type=int, default=None, help="default: the base model's")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="the generation seed (--generation_seed)")
    add_generation_arguments(parser)
    parser.set_defaults(num_pairs=None)  # the pair recipe's only other field, unused here
    return show_defaults(parser).parse_args(argv)


def main(argv=None) -> List[dict]:
    from accelerate import PartialState

    from .concepts import resolve_concept_preset
    from .distributed import cpu_only_multi_process
    from .errors import exit_on_usage_error
    from .pairs import inspect_base_model, recipe_from_args

    @exit_on_usage_error
    def run():
        args = parse_args(argv)
        preset = resolve_concept_preset(args.concept, args.unsafe_prompt, args.safe_prompt)
        info = inspect_base_model(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
        pair_recipe = recipe_from_args(args, preset, info, seed=args.seed)
        recipe = retain_recipe_from_pairs(
            pair_recipe, read_retain_prompts(args.retain_prompts, preset.retain_prompts), args.num_retain_images
        )
        state = PartialState(cpu=cpu_only_multi_process())
        rows = generate_retain_images(recipe, args.output_dir, state, args.batch_size, args.dtype, args.cache_dir)
        if state.is_main_process:
            print(
                f"{len(rows)} retain images in {args.output_dir} ({recipe.num_images - len(rows)} left out by the verifier)"
            )
        return rows

    return run()


if __name__ == "__main__":
    main()
