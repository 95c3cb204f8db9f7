"""Measure how well the toy world's model follows its prompts, and write the numbers next to the model.

Every sample is read by the world's fixed pixel rules (``toy_world.py``): its colour (the world
colour nearest to the mean of its coloured pixels), its shape (the best-overlapping template over the
shape's bounding box), whether it shows red and whether it shows spots (the two detectors). Groups:

- direct prompts, "a red square": does the asked colour and shape appear? (and spots, not asked for?)
- synonym prompts, "a crimson square": the same, reached through a synonym;
- colourless prompts, "a square": the shape asked for, and how often each colour comes out;
- the empty prompt: how often each colour comes out;
- mark prompts, "a red square with spots" and "a dotted red square": do the spots appear?
- plain prompts, "a plain red square": are the spots absent?

    python examples/toy_world/measure_prompt_following.py --model examples/toy_world/model

writes ``<model>/prompt_following.json`` (summary, settings and one record per sample, with its seed,
so any sample can be regenerated) and ``<model>/prompt_following.png`` (a grid: each direct prompt, then each prompt naming the spots).
"""

import argparse
import json
import os
import sys
from collections import Counter
from typing import Dict, List

import numpy as np
import torch
from tqdm.auto import tqdm


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import toy_world  # noqa: E402  (this folder, first on sys.path when the script runs)

from duo_plugin.errors import UsageError, exit_on_usage_error  # noqa: E402


RESULT_NAME = "prompt_following.json"
GRID_NAME = "prompt_following.png"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=str, default="examples/toy_world/model")
    parser.add_argument("--output", type=str, default=None, help=f"default: <model>/{RESULT_NAME}")
    parser.add_argument("--samples_per_direct_prompt", type=int, default=20, help="3 shapes: 60 samples per colour")
    parser.add_argument(
        "--samples_per_synonym_prompt", type=int, default=10, help="2 synonyms × 3 shapes: 60 per colour"
    )
    parser.add_argument("--samples_per_colourless_prompt", type=int, default=50)
    parser.add_argument("--samples_unconditional", type=int, default=60)
    parser.add_argument(
        "--samples_per_mark_prompt", type=int, default=10, help='"a red square with spots": 30 per colour'
    )
    parser.add_argument(
        "--samples_per_mark_synonym_prompt", type=int, default=5, help='"a dotted red square": 30 per colour'
    )
    parser.add_argument("--samples_per_plain_prompt", type=int, default=10, help='"a plain red square": 30 per colour')
    parser.add_argument("--num_inference_steps", type=int, default=20)
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--seed", type=int, default=0, help="sample i of every prompt uses seed + i")
    parser.add_argument("--batch_size", type=int, default=60)
    parser.add_argument("--num_threads", type=int, default=2)
    return parser.parse_args(argv)


ASKED_KINDS = ("direct", "synonym", "mark_named", "mark_synonym", "plain")


def prompt_suite(
    direct: int,
    synonym: int,
    colourless: int,
    unconditional: int,
    mark: int = 0,
    mark_synonym: int = 0,
    plain: int = 0,
) -> List[Dict]:
    """(kind, prompt, asked colour, asked shape, asked mark, number of samples) for each prompt measured.

    The asked mark is True (spots named), False ("plain") or None (not said).
    """
    suite = []
    for colour in toy_world.COLOURS:
        for shape in toy_world.SHAPES:
            entry = {"colour": colour, "shape": shape}
            suite.append(dict(kind="direct", prompt=toy_world.caption(shape, colour), mark=None, n=direct, **entry))
            for word in toy_world.SYNONYMS[colour]:
                suite.append(
                    dict(kind="synonym", prompt=toy_world.caption(shape, word), mark=None, n=synonym, **entry)
                )
            suite.append(
                dict(
                    kind="mark_named",
                    prompt=toy_world.caption(shape, colour, toy_world.MARK),
                    mark=True,
                    n=mark,
                    **entry,
                )
            )
            for word in toy_world.MARK_WORDS[1:]:
                suite.append(
                    dict(
                        kind="mark_synonym",
                        prompt=toy_world.caption(shape, colour, word),
                        mark=True,
                        n=mark_synonym,
                        **entry,
                    )
                )
            suite.append(
                dict(
                    kind="plain",
                    prompt=toy_world.caption(shape, colour, toy_world.PLAIN_WORD),
                    mark=False,
                    n=plain,
                    **entry,
                )
            )
    for shape in toy_world.SHAPES:
        suite.append(
            {
                "kind": "colourless",
                "prompt": toy_world.caption(shape, None),
                "colour": None,
                "shape": shape,
                "mark": None,
                "n": colourless,
            }
        )
    suite.append(
        {"kind": "unconditional", "prompt": "", "colour": None, "shape": None, "mark": None, "n": unconditional}
    )
    return [entry for entry in suite if entry["n"] > 0]


def load_pipeline(model: str):
    from diffusers import StableDiffusionPipeline

    if not os.path.isfile(os.path.join(model, "model_index.json")):
        raise UsageError(
            f"no pipeline at {model}: train one with examples/toy_world/train_tiny_model.py --output_dir {model}"
        )
    pipeline = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@torch.no_grad()
def generate(pipeline, prompt: str, seeds: List[int], num_inference_steps: int, guidance_scale: float) -> np.ndarray:
    """Images (N, H, W, 3) in [0, 1]; image i starts from the noise of ``seeds[i]`` whatever the batch."""
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    return pipeline(
        [prompt] * len(seeds),
        num_inference_steps=num_inference_steps,
        guidance_scale=guidance_scale,
        generator=generators,
        output_type="np",
    ).images


def _rate(values) -> float:
    values = list(values)
    return float(np.mean(values)) if values else float("nan")


def summarise(records: List[Dict]) -> Dict:
    """Accuracies per prompt kind, per asked colour and per asked shape; colour distributions where none is asked;
    the spots rate of every kind (and, where a mark is asked for or refused, how often the answer is right)."""
    summary = {}
    for kind in ASKED_KINDS:
        rows = [r for r in records if r["kind"] == kind]
        if not rows:
            continue
        summary[kind] = {
            "colour_accuracy": _rate(r["colour"] == r["asked_colour"] for r in rows),
            "shape_accuracy": _rate(r["shape"] == r["asked_shape"] for r in rows),
            "both_accuracy": _rate(r["colour"] == r["asked_colour"] and r["shape"] == r["asked_shape"] for r in rows),
            "colour_accuracy_by_colour": {
                c: _rate(r["colour"] == c for r in rows if r["asked_colour"] == c) for c in toy_world.COLOURS
            },
            "shape_accuracy_by_shape": {
                s: _rate(r["shape"] == s for r in rows if r["asked_shape"] == s) for s in toy_world.SHAPES
            },
            "red_rate_by_colour": {
                c: _rate(r["red"] for r in rows if r["asked_colour"] == c) for c in toy_world.COLOURS
            },
            "spots_rate": _rate(r[toy_world.MARK] for r in rows),
            "num_samples": len(rows),
        }
        if rows[0].get("asked_mark") is not None:
            summary[kind]["mark_accuracy"] = _rate(r[toy_world.MARK] == r["asked_mark"] for r in rows)
    for kind in ("colourless", "unconditional"):
        rows = [r for r in records if r["kind"] == kind]
        if not rows:
            continue
        counts = Counter(str(r["colour"]) for r in rows)
        summary[kind] = {
            "colour_distribution": {c: counts.get(c, 0) / len(rows) for c in [*toy_world.COLOURS, "None"]},
            "red_rate": _rate(r["red"] for r in rows),
            "spots_rate": _rate(r[toy_world.MARK] for r in rows),
            "num_samples": len(rows),
        }
        if kind == "colourless":
            summary[kind]["shape_accuracy"] = _rate(r["shape"] == r["asked_shape"] for r in rows)
    return summary


def save_grid(path: str, images_by_prompt: Dict[str, np.ndarray], per_row: int = 8):
    from PIL import Image

    # Prompts may have different sample counts (a run with few samples): every row shows the same number.
    per_row = min(per_row, *(len(images) for images in images_by_prompt.values()))
    rows = [np.concatenate(list(images[:per_row]), axis=1) for images in images_by_prompt.values()]
    grid = np.concatenate(rows, axis=0)
    Image.fromarray((grid * 255).round().astype("uint8")).save(path)


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    pipeline = load_pipeline(args.model)
    suite = prompt_suite(
        args.samples_per_direct_prompt,
        args.samples_per_synonym_prompt,
        args.samples_per_colourless_prompt,
        args.samples_unconditional,
        args.samples_per_mark_prompt,
        args.samples_per_mark_synonym_prompt,
        args.samples_per_plain_prompt,
    )
    records, direct_images = [], {}
    for entry in tqdm(suite, desc="prompts"):
        seeds = [args.seed + i for i in range(entry["n"])]
        images = np.concatenate(
            [
                generate(
                    pipeline,
                    entry["prompt"],
                    seeds[i : i + args.batch_size],
                    args.num_inference_steps,
                    args.guidance_scale,
                )
                for i in range(0, len(seeds), args.batch_size)
            ]
        )
        for seed, reading in zip(seeds, toy_world.read_images(list(images))):
            records.append(
                dict(
                    kind=entry["kind"],
                    prompt=entry["prompt"],
                    seed=seed,
                    asked_colour=entry["colour"],
                    asked_shape=entry["shape"],
                    asked_mark=entry["mark"],
                    **reading,
                )
            )
        if entry["kind"] in ("direct", "mark_named"):
            direct_images[entry["prompt"]] = images
    result = {
        "model": args.model,
        "settings": {
            "scheduler": type(pipeline.scheduler).__name__,
            "num_inference_steps": args.num_inference_steps,
            "guidance_scale": args.guidance_scale,
            "seed": args.seed,
            "seeds": "sample i of every prompt uses seed + i",
            "batch_size": args.batch_size,
            "torch": torch.__version__,
        },
        "summary": summarise(records),
        "samples": records,
    }
    output = args.output or os.path.join(args.model, RESULT_NAME)
    with open(output, "w") as f:
        json.dump(result, f, indent=1)
    save_grid(os.path.join(os.path.dirname(output), GRID_NAME), direct_images)
    print(json.dumps(result["summary"], indent=1))
    print(f"wrote {output}")
    return result


if __name__ == "__main__":
    main()
