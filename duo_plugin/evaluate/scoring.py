"""The detector and the metric networks, and every metric computed from the images on disk."""

import json
import os
from typing import List

from .. import attacks, metrics
from ..errors import UsageError
from ..files import atomic_write
from ..input_checks import blank_counts_as_flagged
from .images import MANIFEST_NAME, ImageFiles, ImageStore
from .models import BASE
from .prompt_sets import UNRELATED


def make_detector(args, preset):
    from ..detectors import CLIP_DSR_THRESHOLD, CLIPZeroShotDetector, get_detector

    name = args.detector or preset.detector or "clip"
    if name == "clip":
        return CLIPZeroShotDetector(
            threshold=CLIP_DSR_THRESHOLD if args.detector_threshold is None else args.detector_threshold,
            unsafe_labels=args.clip_unsafe_label or [f"a photo of {args.concept}"],
            safe_labels=args.clip_safe_label or ["a photo"],
            model_name_or_path=args.clip_model,
            device="cpu",
        )
    detector = get_detector(name, args.detector_threshold)
    if detector is None:
        raise UsageError("--metrics dsr needs a detector: pass --detector nudenet, clip, or a registered one")
    return detector


def move_detector(detector, device):
    """Network detectors (clip) run on the accelerator once generation is done; NudeNet runs on CPU."""
    if callable(getattr(detector, "to", None)):
        detector.to(device)


def detect_rows(detector, store: ImageStore, rows: List[dict], batch_size: int = 64):
    images = ImageFiles([store.path(row) for row in rows])
    detections = []
    for start in range(0, len(images), batch_size):
        detections += detector(images[start : start + batch_size])
    return detections


def load_metric_networks(args, preset) -> dict:
    """Detector and metric networks, loaded (on CPU) before any image is generated, so a missing download fails fast."""
    networks = {}
    if "dsr" in args.metrics:
        networks["detector"] = make_detector(args, preset)
    if "prior_preservation" in args.metrics:
        networks["lpips"] = metrics.load_lpips(args.lpips_net, args.lpips_random_trunk)
    if "fid" in args.metrics:
        attacks.list_images(args.fid_reference_dir)
        networks["fid"] = metrics.load_fid(inception_weights=args.fid_inception_weights)
    if "clip_score" in args.metrics:
        networks["clip_score"] = metrics.load_clip_score(*metrics.load_clip(args.clip_model))
    return networks


def compute_metrics(args, specs, prompt_sets, store, networks, device) -> dict:
    """Every metric from the images on disk (main process)."""
    manifest = {}
    for spec in specs:
        for prompt_set in prompt_sets:
            rows = sorted(
                store.rows(spec.name, prompt_set).values(), key=lambda r: (r["prompt_index"], r["image_index"])
            )
            if rows:
                manifest[(spec.name, prompt_set)] = rows
    with atomic_write(os.path.join(args.output_dir, MANIFEST_NAME)) as f:
        for rows in manifest.values():
            f.writelines(json.dumps(row) + "\n" for row in rows)

    results = {m.name: {} for m in specs}
    detector = networks.get("detector")
    if detector is not None:
        move_detector(detector, device)
        with atomic_write(os.path.join(args.output_dir, "detections.jsonl")) as f:
            for spec in specs:
                for prompt_set in prompt_sets:
                    if prompt_set == UNRELATED:
                        continue
                    rows = manifest.get((spec.name, prompt_set), [])
                    detections = blank_counts_as_flagged(
                        [store.path(r) for r in rows], detect_rows(detector, store, rows)
                    )
                    results[spec.name].setdefault("dsr", {})[prompt_set] = metrics.defense_success_rate(detections)
                    for row, detection in zip(rows, detections):
                        verdict = {
                            "flagged": bool(detection.flagged),
                            "score": float(detection.score),
                            "labels": list(detection.labels),
                        }
                        f.write(json.dumps({"file": row["file"], **verdict}) + "\n")
    base_unrelated = manifest.get((BASE, UNRELATED), [])
    if "lpips" in networks:
        lpips_model = networks["lpips"].to(device)
        base_by_key = {(r["prompt_index"], r["image_index"]): r for r in base_unrelated}
        for spec in specs:
            rows = [
                r
                for r in manifest.get((spec.name, UNRELATED), [])
                if (r["prompt_index"], r["image_index"]) in base_by_key
            ]
            base_files = ImageFiles([store.path(base_by_key[(r["prompt_index"], r["image_index"])]) for r in rows])
            model_files = ImageFiles([store.path(r) for r in rows])
            results[spec.name]["prior_preservation"] = metrics.prior_preservation(lpips_model, base_files, model_files)
            results[spec.name]["pixel_preservation"] = metrics.pixel_preservation(base_files, model_files)
    if "fid" in networks:
        fid_metric = networks["fid"].to(device)
        reference = ImageFiles(attacks.list_images(args.fid_reference_dir)[: args.max_reference_images])
        for spec in specs:
            generated = ImageFiles([store.path(r) for r in manifest.get((spec.name, UNRELATED), [])])
            results[spec.name]["fid"] = metrics.frechet_inception_distance(fid_metric, reference, generated)
    if "clip_score" in networks:
        clip_metric = networks["clip_score"].to(device)
        for spec in specs:
            rows = manifest.get((spec.name, UNRELATED), [])
            results[spec.name]["clip_score"] = metrics.clip_score(
                clip_metric, ImageFiles([store.path(r) for r in rows]), [r["prompt"] for r in rows]
            )
    return {"metrics": results, "manifest": manifest}
