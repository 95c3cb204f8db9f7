"""The report: ``results.json`` with the detector and seed records, base-vs-unlearned grids and the
DSR-vs-prior-preservation plot."""

import logging
import os
from typing import Dict, List

from ..files import atomic_write_json
from .images import MANIFEST_NAME, ImageStore
from .models import BASE


logger = logging.getLogger("duo_plugin.evaluate")

RESULTS_NAME = "results.json"
PLOT_NAME = "dsr_vs_prior_preservation.png"
LPIPS_TRUNK_NAMES = {"random": "randomly initialised AlexNet", "imagenet": "ImageNet AlexNet"}
IMAGE_SEED_RULE = (
    "image k of prompt i: (prompt seed, else seed + i) + k * 1000003, mod 2^63 - 1; every model uses the same seeds"
)


def detector_settings(args, detector) -> dict:
    """The DSR detector: name, package and version, labels, threshold and rule (``describe_detector``)."""
    from ..detectors import describe_detector

    if detector is None:
        return {}
    settings = describe_detector(detector, role="defense success rate")
    if getattr(detector, "name", None) is None:
        settings["name"] = args.detector
    if settings["name"] == "clip":
        settings.update(model=args.clip_model, unsafe_labels=detector.unsafe_labels, safe_labels=detector.safe_labels)
    return settings


def seeds_record(args) -> dict:
    """Where every seed of the evaluation comes from; each image's own seed is in the manifest."""
    return {
        "seed": args.seed,
        "image_seed_rule": IMAGE_SEED_RULE,
        "per_image": MANIFEST_NAME,
        "ring_a_bell": "seed + target index",
        "concept_inversion": "seed",
    }


def summarize(values: dict) -> str:
    """One log line per model."""
    parts = [f"DSR[{a}]={d['dsr']:.3f} ({d['num_safe']}/{d['num_images']})" for a, d in values.get("dsr", {}).items()]
    for metric, key, label, digits in (
        ("prior_preservation", "prior_preservation", "PP", 4),
        ("fid", "fid", "FID", 2),
        ("clip_score", "clip_score", "CLIP", 2),
    ):
        if metric in values:
            parts.append(f"{label}={values[metric][key]:.{digits}f}")
    return ", ".join(parts)


def save_grids(store: ImageStore, manifest: Dict[tuple, List[dict]], models: List[str], grid_size: int) -> List[str]:
    """Top row: base; bottom row: the unlearned model; same prompts and seeds, one labelled column per prompt."""
    from PIL import Image

    from ..figures import column_label, save_labelled_grid

    saved = []
    for model in models:
        if model == BASE:
            continue
        for (row_model, prompt_set), rows in manifest.items():
            if row_model != model:
                continue
            base_rows = {(r["prompt_index"], r["image_index"]): r for r in manifest.get((BASE, prompt_set), [])}
            pairs = [
                (base_rows[(r["prompt_index"], 0)], r)
                for r in rows
                if r["image_index"] == 0 and (r["prompt_index"], 0) in base_rows
            ]
            if not pairs:
                continue
            pairs = pairs[:grid_size]
            base_images = [Image.open(store.path(b)).convert("RGB") for b, _ in pairs]
            model_images = [Image.open(store.path(m)).convert("RGB").resize(base_images[0].size) for _, m in pairs]
            relative = os.path.join("grids", model, f"{prompt_set}.png")
            os.makedirs(os.path.dirname(os.path.join(store.output_dir, relative)), exist_ok=True)
            save_labelled_grid(
                os.path.join(store.output_dir, relative),
                [[im.resize(base_images[0].size) for im in base_images], model_images],
                row_labels=[BASE, model],
                column_labels=[column_label(m["prompt"], m["seed"]) for _, m in pairs],
                title=f"prompt set {prompt_set!r}: {BASE} (top) and {model} (bottom), same prompt and seed in each column",
            )
            saved.append(relative)
    return saved


def plot_dsr_vs_prior_preservation(results: dict, path: str) -> bool:
    """The paper's trade-off plot: defense success rate (y) against prior preservation (x)."""
    from ..figures import pyplot, tradeoff_figure

    points = []
    for model, values in results["metrics"].items():
        preservation = values.get("prior_preservation", {}).get("prior_preservation")
        if preservation is None:
            continue
        for attack, dsr in values.get("dsr", {}).items():
            points.append((model, attack, preservation, dsr["dsr"]))
    if not points:
        return False
    trunk = results["settings"].get("lpips_trunk")
    figure, *_ = tradeoff_figure(
        points,
        f"{results['settings']['concept']}: defense success rate vs prior preservation",
        f"prior preservation (1 − LPIPS{', ' + LPIPS_TRUNK_NAMES.get(trunk, str(trunk)) + ' trunk' if trunk else ''})",
    )
    figure.savefig(path)
    pyplot().close(figure)
    return True


def save_report(results: dict, store: ImageStore, manifest: Dict[tuple, List[dict]], models: List[str], args):
    """The grids and the plot, named in ``results``, then ``results.json`` itself."""
    results["files"]["grids"] = save_grids(store, manifest, models, args.grid_size)
    plot_path = os.path.join(args.output_dir, PLOT_NAME)
    results["files"]["plot"] = PLOT_NAME if plot_dsr_vs_prior_preservation(results, plot_path) else None
    atomic_write_json(os.path.join(args.output_dir, RESULTS_NAME), results)
    for model, values in results["metrics"].items():
        logger.info("%s: %s", model, summarize(values))
    logger.info("Report written to %s", os.path.join(args.output_dir, RESULTS_NAME))
