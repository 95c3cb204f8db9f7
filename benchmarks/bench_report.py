"""Printing a benchmark report."""

import sys
from pathlib import Path
from typing import List, Optional


BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
CONFIG_DIR = BENCHMARKS_DIR / "configs"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def format_bytes(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def format_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(headers: List[str], rows: List[List[str]]):
    widths = (
        [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)]
        if rows
        else [len(h) for h in headers]
    )

    def line(cells):
        return "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))

    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))


def print_report(report: dict):
    print(
        f"\nDUO step benchmark: suite {report['suite']}, {report['date']}, {report['machine'].get('gpu') or report['machine']['cpu']}"
    )
    rows = []
    for r in report["results"]:
        if "error" in r:
            rows.append([r["model"], r["resolution"], r["recipe"], r["options"], r["error"], "", "", ""])
            continue
        calls = r["calls_per_step"]
        encoders = "/".join(f"{calls[k]:g}" for k in calls if k.startswith("text_encoder"))
        rows.append(
            [
                r["model"],
                r["resolution"],
                r["recipe"],
                r["options"],
                f"{r['median_step_s'] * 1e3:.1f}",
                format_bytes(r["peak_memory_bytes"]),
                f"{calls['vae_encode']:g} / {encoders} / {calls['denoiser_adapted']:g} / {calls['denoiser_reference']:g}",
                "-" if r["share_of_bf16_peak"] is None else f"{100 * r['share_of_bf16_peak']:.1f}%",
            ]
        )
    print_table(
        [
            "model",
            "px",
            "recipe",
            "options",
            "step ms",
            "peak memory",
            "calls/step VAE / TEs / adapted / ref",
            "bf16 peak",
        ],
        rows,
    )
    if report["comparisons"]:
        print("\nours / official (same models, data, seeds and options)")
        print_table(
            [
                "model",
                "px",
                "options",
                "ours ms",
                "official ms",
                "time ratio",
                "(of fastest steps)",
                "caching bound",
                "memory ratio",
                "resident params ratio",
            ],
            [
                [
                    c["model"],
                    c["resolution"],
                    c["options"],
                    f"{c['ours_step_s'] * 1e3:.1f}",
                    f"{c['official_step_s'] * 1e3:.1f}",
                    format_ratio(c["step_time_ratio"]),
                    format_ratio(c["min_step_time_ratio"]),
                    format_ratio(c["best_ratio_from_caching"]),
                    format_ratio(c["peak_memory_ratio"]),
                    format_ratio(c["resident_parameter_ratio"]),
                ]
                for c in report["comparisons"]
            ],
        )
    if report["pair_generation"]:
        print("\npair generation (images/s, unsafe + safe)")
        print_table(
            ["model", "px", "pairs", "steps", "batched", "one at a time", "speed-up"],
            [
                [
                    g["model"],
                    g["resolution"],
                    g["pairs"],
                    g["num_inference_steps"],
                    f"{g['batched_images_per_s']:.2f}",
                    f"{g['one_at_a_time_images_per_s']:.2f}",
                    f"{g['batched_speedup']:.2f}x",
                ]
                for g in report["pair_generation"]
            ],
        )
    print("\ntargets")
    for t in report["targets"]:
        verdict = {True: "met", False: "MISSED", None: "not measured"}[t["met"]]
        measured = t["measured"] if not isinstance(t["measured"], float) else f"{t['measured']:.3f}"
        shown = "" if isinstance(measured, dict) or measured is None else f" (measured {measured})"
        print(f"  [{verdict}] {t['target']}{' — ' + t['case'] if t.get('case') else ''}{shown}")
    for note in report["notes"]:
        print(f"note: {note}")


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------
