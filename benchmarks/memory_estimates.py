#!/usr/bin/env python
"""Estimated peak GPU memory of every benchmark recipe (duo_plugin.memory: fake tensors, no GPU, no weights).

    python benchmarks/memory_estimates.py                       # writes results/memory-estimates-<date>.json, prints the table
    python benchmarks/memory_estimates.py --compare results/gpu-<date>.json   # estimate beside measured max_memory_allocated

The cases: SD1.4 at 512 and 768 px, SD2.1 at 768 (v-prediction), SD3-medium and SD3.5-medium at 512 and
1024 px; ours and the re-created official step (benchmark_step.py) with every memory option on and off, and
ours with one option changed at a time. One pair per step, bf16, LoRA rank 32.
"""

import argparse
import datetime
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path


BENCHMARKS_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCHMARKS_DIR.parent))

from duo_plugin import memory  # noqa: E402


MODELS = [
    ("sd14", 512),
    ("sd3-medium", 1024),
    ("sd21", 768),
    ("sd35-medium", 1024),
    ("sd14", 768),
    ("sd3-medium", 512),
    ("sd35-medium", 512),
]
TARGETS_GB = {("sd14", 512): 6.0, ("sd3-medium", 1024): 16.0}  # decimal GB, as benchmark_step.py


def cases(can_8bit: bool = True):
    all_on = memory.TrainingMemorySettings(
        resolution=0, gradient_checkpointing=True, use_8bit_adam=can_8bit, validation=False
    )
    all_off = replace(all_on, gradient_checkpointing=False, use_8bit_adam=False)
    return [
        ("ours", "all memory options on", all_on),
        ("official", "all memory options on", replace(all_on, recipe="official")),
        ("ours", "all memory options off", all_off),
        ("official", "all memory options off", replace(all_off, recipe="official")),
        ("ours", "gradient checkpointing off", replace(all_on, gradient_checkpointing=False)),
        ("ours", "8-bit Adam off", replace(all_on, use_8bit_adam=False)),
        ("ours", "VAE and text encoders kept on the accelerator", replace(all_on, encoders_resident=True)),
    ]


def estimate_all(on_row=lambda rows: None):
    rows = []
    for name, resolution in MODELS:
        configs = memory.load_base_model_configs(str(BENCHMARKS_DIR / "configs" / name))
        for recipe, note, settings in cases():
            settings = replace(settings, resolution=resolution)
            step = memory.estimate_training(configs, settings)["training step"]
            row = {
                "model": name,
                "resolution": resolution,
                "recipe": recipe,
                "note": note,
                "settings": asdict(settings),
                "estimated_peak_bytes": step.peak_bytes,
                "breakdown_bytes": step.breakdown,
                "smallest_card_gb": step.smallest_card_gb(),
                "seconds": step.seconds,
            }
            rows.append(row)
            on_row(rows)
            print(
                f"{name:12s} {resolution:5d} {recipe:9s} {note:48s} {step.peak_bytes / 1e9:6.2f} GB  card {row['smallest_card_gb']}",
                flush=True,
            )
        # The run's other peaks: in-training validation (ours, all on), pair generation, evaluation.
        on = replace(cases()[0][2], resolution=resolution, validation=True)
        validation = memory.estimate_training(configs, on)["validation"]
        generation = memory.estimate_inference(configs, resolution, memory.PAIR_GENERATION_BATCH, "fp16", encode=True)
        evaluation = memory.estimate_inference(configs, resolution, memory.EVALUATION_BATCH, "fp16", encode=False)
        for phase, estimate in (
            ("validation during training", validation),
            ("pair generation", generation),
            ("evaluation", evaluation),
        ):
            rows.append(
                {
                    "model": name,
                    "resolution": resolution,
                    "recipe": phase,
                    "note": "",
                    "estimated_peak_bytes": estimate.peak_bytes,
                    "breakdown_bytes": estimate.breakdown,
                    "smallest_card_gb": estimate.smallest_card_gb(),
                }
            )
            on_row(rows)
            print(f"{name:12s} {resolution:5d} {phase:58s} {estimate.peak_bytes / 1e9:6.2f} GB", flush=True)
    return rows


def targets(rows):
    out = []
    for (name, resolution), limit in TARGETS_GB.items():
        row = next(
            r
            for r in rows
            if r["model"] == name
            and r["resolution"] == resolution
            and r["recipe"] == "ours"
            and r["note"] == "all memory options on"
        )
        validation = next(
            r
            for r in rows
            if r["model"] == name and r["resolution"] == resolution and r["recipe"] == "validation during training"
        )
        out.append(
            {
                "target": f"{name}@{resolution} < {limit:g} GB peak, memory options on",
                "status": "estimated",
                "estimated_step_peak_gb": row["estimated_peak_bytes"] / 1e9,
                "estimated_validation_peak_gb": validation["estimated_peak_bytes"] / 1e9,
                "met": max(row["estimated_peak_bytes"], validation["estimated_peak_bytes"]) / 1e9 < limit,
            }
        )
    return out


def compare(path):
    """Estimate beside measured max_memory_allocated for every row of a GPU suite JSON."""
    with open(path) as f:
        report = json.load(f)
    print(f"\nestimated (duo_plugin.memory) vs measured max_memory_allocated, {path}")
    for row in report.get("results", []):
        if "peak_memory_bytes" not in row or row.get("model") not in {m for m, _ in MODELS}:
            continue
        options = row[
            "options"
        ]  # benchmark_step.options_label: "gc|no-gc,adam8bit|adamw,sdpa|xformers[,encoders-resident]"
        parts = options.split(",")
        settings = memory.TrainingMemorySettings(
            resolution=row["resolution"],
            mixed_precision=row.get("mixed_precision", "bf16"),
            recipe=row["recipe"],
            train_batch_size=row.get("pairs_per_step", 1),
            gradient_checkpointing="gc" in parts,
            use_8bit_adam="adam8bit" in parts,
            encoders_resident="encoders-resident" in parts,
            validation=False,
        )
        configs = memory.load_base_model_configs(str(BENCHMARKS_DIR / "configs" / row["model"]))
        estimate = memory.estimate_training(configs, settings)["training step"].peak_bytes
        measured = row["peak_memory_bytes"]
        print(
            f"{row['model']:12s} {row['resolution']:5d} {row['recipe']:9s} {options:40s} estimated {estimate / 2**20:9,.0f} MiB  "
            f"measured {measured / 2**20:9,.0f} MiB  error {100 * (estimate / measured - 1):+6.1f} %",
            flush=True,
        )


def markdown(path):
    """The README tables from a memory-estimates JSON."""
    with open(path) as f:
        rows = json.load(f)["results"]
    gb = lambda value: f"{value / 1e9:.2f}"  # noqa: E731
    card = lambda value: f"{memory.smallest_card(value)} GB" if memory.smallest_card(value) else "> 80 GB"  # noqa: E731
    names = ["sd14", "sd21", "sd3-medium", "sd35-medium"]
    order = sorted(MODELS, key=lambda mr: (names.index(mr[0]), mr[1]))
    print(
        "| model | px | ours, all on | official, all on | ours, all off | official, all off | ours, no grad. checkpointing | ours, no 8-bit Adam | ours, encoders kept |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, resolution in order:
        cells = {}
        for r in rows:
            if r["model"] == name and r["resolution"] == resolution:
                cells[(r["recipe"], r["note"])] = r["estimated_peak_bytes"]
        keys = [
            ("ours", "all memory options on"),
            ("official", "all memory options on"),
            ("ours", "all memory options off"),
            ("official", "all memory options off"),
            ("ours", "gradient checkpointing off"),
            ("ours", "8-bit Adam off"),
            ("ours", "VAE and text encoders kept on the accelerator"),
        ]
        if keys[0] not in cells:
            continue
        print(f"| {name} | {resolution} | " + " | ".join(gb(cells[k]) if k in cells else "-" for k in keys) + " |")
    print()
    print(
        "| model | px | training step (all on) | + validation | run peak | smallest card | --skip_validation: card | pair generation | card | evaluation | card |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, resolution in order:

        def get(recipe, note="", name=name, resolution=resolution):
            matches = (
                r
                for r in rows
                if (r["model"], r["resolution"], r["recipe"], r["note"]) == (name, resolution, recipe, note)
            )
            return next((r["estimated_peak_bytes"] for r in matches), None)

        step, validation = get("ours", "all memory options on"), get("validation during training")
        generation, evaluation = get("pair generation"), get("evaluation")
        if None in (step, validation, generation, evaluation):
            continue
        run = max(step, validation)
        print(
            f"| {name} | {resolution} | {gb(step)} | {gb(validation)} | {gb(run)} | {card(run)} | {card(step)} | {gb(generation)} | {card(generation)} | {gb(evaluation)} | {card(evaluation)} |"
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--compare",
        default=None,
        help="a GPU suite JSON (benchmark_step.py --suite gpu): print estimates beside its measurements",
    )
    parser.add_argument("--output", default=None)
    parser.add_argument("--markdown", default=None, help="print the README tables of a memory-estimates JSON")
    args = parser.parse_args(argv)
    if args.markdown:
        return markdown(args.markdown)
    if args.compare:
        return compare(args.compare)
    now = datetime.datetime.now(datetime.timezone.utc)
    output = args.output or str(BENCHMARKS_DIR / "results" / f"memory-estimates-{now.strftime('%Y-%m-%d')}.json")

    def write_partial(rows):
        with open(output, "w") as f:
            json.dump({"status": "estimated", "partial": True, "results": rows}, f, indent=2)

    rows = estimate_all(write_partial)
    report = {
        "benchmark": "estimated peak GPU memory (duo_plugin.memory, fake tensors; not measured on a GPU)",
        "date": now.strftime("%Y-%m-%d"),
        "status": "estimated",
        "card_rule": {
            "fragmentation_margin": memory.FRAGMENTATION_MARGIN,
            "cuda_context_bytes": memory.CUDA_CONTEXT_BYTES,
            "card_sizes_gib": list(memory.CARD_SIZES_GB),
        },
        "settings": {
            "mixed_precision": "bf16",
            "pairs_per_step": 1,
            "rank": 32,
            "pair_generation_batch": memory.PAIR_GENERATION_BATCH,
            "evaluation_batch": memory.EVALUATION_BATCH,
            "inference_dtype": "fp16",
        },
        "results": rows,
        "targets": targets(rows),
    }
    with open(output, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    for t in report["targets"]:
        print(
            f"[{'met' if t['met'] else 'MISSED'} (estimated)] {t['target']}: step {t['estimated_step_peak_gb']:.2f} GB, validation {t['estimated_validation_peak_gb']:.2f} GB"
        )
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
