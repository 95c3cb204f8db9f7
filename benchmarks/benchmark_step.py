#!/usr/bin/env python
"""DUO's training step against a re-creation of the official recipe's step: time, memory, calls, FLOP/s.

Both steps run in one process on the same models, pairs and seeds, one pair per step:

* **ours**: the step of ``train_duo.py`` / ``train_duo_sd3.py``: ``make_duo_batch`` and ``duo_forward``
  of ``duo_plugin.families.sd`` / ``duo_plugin.families.sd3``, followed by the scripts' backward, gradient clipping and
  optimizer step. The pair latents are the VAE posteriors cached once by ``duo_plugin.data.encode_pairs``
  and the empty prompt is encoded once; the VAE and the text encoders then leave the accelerator.
* **official**: written by us from the description of the official implementation. Every step
  VAE-encodes both images of each pair (sampling the latent), encodes the (empty) prompt with the text
  encoder(s), draws one timestep per image (not shared by the two images of a pair), then runs the
  adapted model and the reference model (the same network with its adapter disabled) over
  [unsafe; safe; noise] with the same loss. The VAE and every text encoder (all three for SD3) stay on
  the accelerator. Image decoding and augmentation are *not* timed for it (a data loader's workers
  would hide them), which favours the official step.

Run it:

    python benchmarks/benchmark_step.py                                   # CPU, tiny models, about a minute
    python benchmarks/benchmark_step.py --suite flops                     # full-size FLOPs per step (meta device)
    python benchmarks/benchmark_step.py --suite gpu                       # full-size SD1.4 / SD3-medium, random weights
    python benchmarks/benchmark_step.py --suite gpu --tiny --device cpu   # the GPU suite's cases, on tiny models

The result is printed as tables, and written as JSON with ``--output`` (the committed ones are
``benchmarks/results/<suite>-<date>.json``). See benchmarks/README.md.
"""

import argparse
import datetime
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Tuple


BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
CONFIG_DIR = BENCHMARKS_DIR / "configs"
for path in (REPO_ROOT, BENCHMARKS_DIR):  # duo_plugin, and the bench_* modules when imported by path
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402

# full_size_step_flops, CallCounter and MemoryMeter are reached through this script by the tests.
from bench_flops import full_size_step_flops, print_flops_report, run_flops_suite  # noqa: E402, F401
from bench_measure import (  # noqa: E402, F401
    CallCounter,
    MemoryMeter,
    encoding_share,
    evaluate_targets,
    git_commit,
    installed_version,
    library_versions,
    machine_description,
    merge_repeats,
    options_label,
    peak_bf16_flops,
    ratio,
)
from bench_models import default_other_resolution, full_size_bundle, synthetic_pairs, tiny_bundle  # noqa: E402
from bench_report import print_report  # noqa: E402
from bench_steps import DUOStepBench, MemoryOptions, default_hyperparameters, pair_generation_throughput  # noqa: E402

from duo_plugin.errors import UsageError, exit_on_usage_error  # noqa: E402
from duo_plugin.precision import torch_dtype  # noqa: E402


# --------------------------------------------------------------------------------------------------
# Suites
# --------------------------------------------------------------------------------------------------


@dataclass
class Case:
    recipes: Tuple[str, ...]  # ("ours",), ("official",), or both, interleaved step by step
    options: MemoryOptions
    resolution: int
    memory_options_on: bool = False
    note: str = ""


def gpu_cases(native: int, other: int, can_8bit: bool, can_xformers: bool) -> List[Case]:
    """The recipes with every memory option on and off, one option at a time from "all on" at the
    native resolution, and ours vs official (all on) at the other resolution."""
    all_on = MemoryOptions(gradient_checkpointing=True, use_8bit_adam=can_8bit)
    all_off = MemoryOptions()
    cases = [
        Case(("ours",), all_on, native, memory_options_on=True, note="all memory options on"),
        Case(("official",), all_on, native, note="same options; VAE and text encoders resident and called every step"),
        Case(("ours",), all_off, native, note="all memory options off (caching is part of ours)"),
        Case(("official",), all_off, native, note="all memory options off"),
        Case(("ours",), replace(all_on, gradient_checkpointing=False), native, note="gradient checkpointing off"),
        Case(
            ("ours",),
            replace(all_on, free_text_encoders=False),
            native,
            note="VAE and text encoders kept on the accelerator",
        ),
    ]
    if can_8bit:
        cases.append(Case(("ours",), replace(all_on, use_8bit_adam=False), native, note="8-bit Adam off"))
    if can_xformers:
        cases.append(
            Case(
                ("ours",),
                replace(all_on, attention="xformers"),
                native,
                memory_options_on=True,
                note="xformers attention",
            )
        )
    cases += [
        Case(("ours",), all_on, other, memory_options_on=True, note="all memory options on"),
        Case(("official",), all_on, other, note="same options"),
    ]
    return cases


def cpu_cases(resolution: int) -> List[Case]:
    return [Case(("ours", "official"), MemoryOptions(), resolution, note="recipes interleaved step by step")]


def compare(results: List[dict]) -> List[dict]:
    """ours / official for each (model, resolution, options) measured with both recipes."""
    index = {(r["model"], r["resolution"], r["options"], r["recipe"]): r for r in results if "median_step_s" in r}
    comparisons = []
    for (model, resolution, options, recipe), ours in index.items():
        official = index.get((model, resolution, options, "official"))
        if recipe != "ours" or official is None:
            continue
        comparisons.append(
            {
                "model": model,
                "resolution": resolution,
                "options": options,
                "ours_step_s": ours["median_step_s"],
                "official_step_s": official["median_step_s"],
                "step_time_ratio": ratio(ours["median_step_s"], official["median_step_s"]),
                # Noise on a shared machine only adds time: the fastest steps are the least disturbed.
                "min_step_time_ratio": ratio(ours.get("min_step_s"), official.get("min_step_s")),
                "ours_peak_memory_bytes": ours["peak_memory_bytes"],
                "official_peak_memory_bytes": official["peak_memory_bytes"],
                "peak_memory_ratio": ratio(ours["peak_memory_bytes"], official["peak_memory_bytes"]),
                "memory_kind": ours["memory_kind"],
                "resident_parameter_ratio": ratio(
                    ours["resident_parameter_bytes"], official["resident_parameter_bytes"]
                ),
                "official_encoding_share": encoding_share(official),
                "best_ratio_from_caching": None if encoding_share(official) is None else 1 - encoding_share(official),
            }
        )
    return comparisons


def run_suite(args, device: torch.device, workdir: str) -> dict:
    from accelerate import Accelerator

    mixed_precision = args.mixed_precision or ("bf16" if device.type == "cuda" else "no")
    weight_dtype = torch_dtype(mixed_precision)
    accelerator = Accelerator(mixed_precision=mixed_precision, cpu=device.type == "cpu")
    full_size = args.suite == "gpu" and not args.tiny
    can_8bit = installed_version("bitsandbytes") is not None
    can_xformers = device.type == "cuda" and installed_version("xformers") is not None
    peak_flops = (
        args.peak_tflops * 1e12
        if args.peak_tflops
        else (peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None)
    )
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else 2
    measure_steps = args.measure_steps if args.measure_steps is not None else (8 if args.suite == "gpu" else 10)
    repeats = args.repeats if args.repeats is not None else (1 if args.suite == "gpu" else 6)

    suite_start = time.perf_counter()
    results, skipped, generation = [], [], []
    notes = []
    for model_name in args.models:
        family = "sd" if model_name in ("sd14", "tiny-sd") else "sd3"
        print(f"\n== {model_name}: building ({'full size, random weights' if full_size else 'tiny'}) ==", flush=True)
        build_start = time.perf_counter()
        bundle = full_size_bundle(model_name, device, weight_dtype) if full_size else tiny_bundle(family, workdir)
        for module in (bundle.denoiser, bundle.vae, *bundle.text_encoders.values()):
            module.to(device)
        print(f"   built in {time.perf_counter() - build_start:.1f} s", flush=True)
        native, other = args.resolutions or (bundle.native_resolution, default_other_resolution(bundle))
        if family == "sd" and not args.skip_generation:
            # Before the adapter is added: pairs come from the base model.
            print(f"   pair generation at {native} px ...", end=" ", flush=True)
            generation.append(
                pair_generation_throughput(
                    bundle, device, weight_dtype, args.generation_pairs, native, args.generation_steps
                )
            )
            print(f"{generation[-1]['batched_images_per_s']:.2f} images/s batched", flush=True)
        bench = DUOStepBench(bundle, accelerator, weight_dtype, default_hyperparameters(family, full_size))

        if args.suite == "gpu":
            cases = gpu_cases(native, other, can_8bit, can_xformers)
        else:
            cases = cpu_cases(native)
        flops_cache = {}
        pairs_by_resolution = {}
        measured: Dict[tuple, tuple] = {}
        # Repeats interleave the cases, so that a slow spell of a shared machine hits every case alike.
        for repeat in range(repeats):
            for case in cases:
                label = options_label(case.options)
                bases = {
                    recipe: {
                        "model": bundle.name,
                        "family": family,
                        "resolution": case.resolution,
                        "recipe": recipe,
                        "options": label,
                        "memory_options_on": case.memory_options_on and recipe == "ours",
                        "note": case.note,
                        "mixed_precision": mixed_precision,
                        "pairs_per_step": bench.hyper.pairs_per_step,
                    }
                    for recipe in case.recipes
                }
                keys = {recipe: (case.resolution, recipe, label) for recipe in case.recipes}
                if any(key in measured and "error" in measured[key][1][0] for key in keys.values()):
                    continue
                elapsed = time.perf_counter() - suite_start
                if args.time_budget_s and elapsed > args.time_budget_s:
                    skipped += [
                        {**bases[r], "skipped": f"time budget of {args.time_budget_s:g} s spent"}
                        for r, k in keys.items()
                        if k not in measured
                    ]
                    continue
                if case.resolution not in pairs_by_resolution:
                    pairs_by_resolution[case.resolution] = synthetic_pairs(
                        args.num_pairs, case.resolution, bench.hyper.seed, workdir
                    )
                if bench.resolution != case.resolution:
                    bench.load_pairs(pairs_by_resolution[case.resolution], case.resolution)
                print(
                    f"   [{repeat + 1}/{repeats}] {'+'.join(case.recipes):13s} {case.resolution:5d}px [{label}] ...",
                    end=" ",
                    flush=True,
                )
                try:
                    rows = bench.run(case.recipes, case.options, warmup_steps, measure_steps, flops_cache)
                except torch.cuda.OutOfMemoryError as error:
                    print("out of memory", flush=True)
                    rows = [{"error": f"out of memory: {str(error).splitlines()[0]}"}] * len(case.recipes)
                    gc.collect()
                    torch.cuda.empty_cache()
                else:
                    print(
                        ", ".join(
                            f"{r['median_step_s'] * 1e3:.1f} ms, peak {r['peak_memory_bytes'] / 2**20:.0f} MiB"
                            for r in rows
                        ),
                        flush=True,
                    )
                for recipe, row in zip(case.recipes, rows):
                    measured.setdefault(keys[recipe], (bases[recipe], []))[1].append(row)
        for base, rows in measured.values():
            if "error" in rows[0]:
                results.append({**base, **rows[0]})
                continue
            row = {**base, **merge_repeats(rows)}
            row["achieved_flops_per_s"] = row["step_flops"] / row["median_step_s"]
            row["share_of_bf16_peak"] = ratio(row["achieved_flops_per_s"], peak_flops)
            row["denoiser_share_of_bf16_peak"] = ratio(row["denoiser_flops"] / row["median_step_s"], peak_flops)
            results.append(row)
        bench.close()
        del bench, bundle
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    comparisons = compare(results)
    return {
        "results": results,
        "skipped": skipped,
        "comparisons": comparisons,
        "targets": evaluate_targets(results, comparisons, memory_targets_apply=full_size and device.type == "cuda"),
        "pair_generation": generation,
        "settings": {
            "mixed_precision": mixed_precision,
            "warmup_steps": warmup_steps,
            "measure_steps": measure_steps,
            "repeats": repeats,
            "num_pairs": args.num_pairs,
            "pairs_per_step": 1,
            "full_size_models": full_size,
            "peak_bf16_flops": peak_flops,
            "bitsandbytes_available": can_8bit,
            "xformers_available": can_xformers,
            "suite_seconds": time.perf_counter() - suite_start,
        },
        "notes": notes,
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--suite",
        choices=["cpu", "gpu", "flops"],
        default="cpu",
        help="cpu: tiny models, ours vs official; gpu: full-size models, every memory option; "
        "flops: FLOPs per step of the full-size models, counted on the meta device (any machine)",
    )
    parser.add_argument("--device", default=None, help="default: cpu for --suite cpu, cuda for --suite gpu")
    parser.add_argument(
        "--tiny", action="store_true", help="--suite gpu with tiny models (a dry run of the GPU cases, e.g. on CPU)"
    )
    parser.add_argument(
        "--models", nargs="+", default=None, help="default: sd14 sd3-medium (gpu) / tiny-sd tiny-sd3 (cpu)"
    )
    parser.add_argument(
        "--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: bf16 on a GPU, no on a CPU"
    )
    parser.add_argument("--warmup_steps", type=int, default=None, help="steps before timing (default 2)")
    parser.add_argument(
        "--measure_steps",
        type=int,
        default=None,
        help="timed steps per case; the median is reported (default 10 cpu, 8 gpu)",
    )
    parser.add_argument(
        "--resolutions",
        type=int,
        nargs=2,
        default=None,
        metavar=("NATIVE", "OTHER"),
        help="override the resolutions (default: 512 1024 for sd14, 1024 512 for sd3-medium, 32 64 for tiny models)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="runs of every case, interleaved; step times are pooled (default 6 cpu, 1 gpu)",
    )
    parser.add_argument("--num_pairs", type=int, default=4, help="pairs in the synthetic pair set")
    parser.add_argument("--generation_pairs", type=int, default=4, help="pairs generated in the throughput test")
    parser.add_argument(
        "--generation_steps", type=int, default=10, help="denoising steps per image in the throughput test"
    )
    parser.add_argument("--skip_generation", action="store_true", help="do not measure pair generation")
    parser.add_argument(
        "--time_budget_s",
        type=float,
        default=None,
        help="skip the cases left once this many seconds have passed (default 420 for gpu)",
    )
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="the card's dense bf16 peak in TFLOP/s, if its name is not in the table",
    )
    parser.add_argument(
        "--num_threads",
        type=int,
        default=None,
        help="torch CPU threads (default 1 on a CPU device, torch's choice otherwise)",
    )
    parser.add_argument(
        "--output",
        default=None,
        help="also write the report as JSON here (e.g. benchmarks/results/<suite>-<date>.json)",
    )
    args = parser.parse_args(argv)

    if args.warmup_steps is not None and args.warmup_steps < 0:
        raise UsageError("--warmup_steps must be 0 or more")
    if args.measure_steps is not None and args.measure_steps < 1:
        raise UsageError("--measure_steps must be at least 1 (the median of the timed steps is reported)")
    if args.repeats is not None and args.repeats < 1:
        raise UsageError("--repeats must be at least 1")
    if args.num_pairs < 1 or args.generation_pairs < 1 or args.generation_steps < 1:
        raise UsageError("--num_pairs, --generation_pairs and --generation_steps must be at least 1")
    if args.resolutions and any(r < 8 or r % 8 for r in args.resolutions):
        raise UsageError("--resolutions must be multiples of 8 (the VAE downsamples by 8)")
    if args.tiny and args.suite != "gpu":
        raise UsageError("--tiny only applies to --suite gpu (the cpu suite always uses tiny models)")
    args.device = args.device or ("cuda" if args.suite == "gpu" else "cpu")
    if args.suite == "flops" and args.device != "cpu":
        raise UsageError("--suite flops counts on the meta device and takes no --device")
    full_size = args.suite == "flops" or (args.suite == "gpu" and not args.tiny)
    if args.models is None:
        args.models = ["sd14", "sd3-medium"] if full_size else ["tiny-sd", "tiny-sd3"]
    known = {"sd14", "sd3-medium"} if full_size else {"tiny-sd", "tiny-sd3"}
    unknown = [m for m in args.models if m not in known]
    if unknown:
        raise UsageError(f"--models {' '.join(unknown)}: choose from {', '.join(sorted(known))}")
    if args.suite == "gpu" and args.time_budget_s is None and full_size:
        args.time_budget_s = 420.0
    return args


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            "--device cuda but no CUDA device is visible: run on a GPU machine, or add --tiny --device cpu for a dry run"
        )
    if args.num_threads or device.type == "cpu":
        # One thread by default on a CPU: tiny models' operations are too small to split, and OpenMP
        # threads competing with other processes for a few cores make step times jump 30-fold.
        torch.set_num_threads(args.num_threads or 1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()

    now = datetime.datetime.now(datetime.timezone.utc)
    if args.suite == "flops":
        suite = run_flops_suite(args)
    else:
        with tempfile.TemporaryDirectory(prefix="duo-benchmark-") as workdir:
            suite = run_suite(args, device, workdir)
    measured_on_gpu = device.type == "cuda"
    report = {
        "benchmark": "DUO training step: ours (train_duo*.py) vs a re-creation of the official recipe",
        "suite": args.suite + ("-tiny" if args.tiny else ""),
        "date": now.strftime("%Y-%m-%d"),
        "timestamp_utc": now.isoformat(timespec="seconds"),
        "command": " ".join(
            [os.path.relpath(sys.argv[0], REPO_ROOT) if sys.argv and sys.argv[0] else "benchmark_step.py"]
            + (argv if argv is not None else sys.argv[1:])
        ),
        "git_commit": git_commit(),
        "machine": machine_description(device),
        "versions": library_versions(),
        "gpu_measured": measured_on_gpu,
        **suite,
    }
    if not measured_on_gpu and args.suite != "flops":
        report["notes"].append(
            "GPU numbers have not been measured in this run: it ran on a CPU"
            + (" with tiny models" if args.tiny or args.suite == "cpu" else "")
            + ". Full-size numbers come from `python benchmarks/benchmark_step.py --suite gpu` on a GPU."
        )
    (print_flops_report if args.suite == "flops" else print_report)(report)
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2, default=str)
            f.write("\n")
        print(f"\nwrote {args.output}")
    else:
        # Nothing is written into the clone unasked; the committed results were kept this way.
        print(f"\nnot saved: pass --output benchmarks/results/{report['suite']}-{report['date']}.json to keep it")
    return report


if __name__ == "__main__":
    main()
