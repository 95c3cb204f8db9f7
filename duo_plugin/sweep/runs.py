"""The sweep itself: train and evaluate every run not done yet, then the base model and the baselines."""

import glob
import os
import shlex
import time
from typing import Callable, Dict, List, Optional

from .. import saturation
from ..errors import UsageError
from ..resumable import ResumableFolder
from .commands import Command, concept_flags, evaluation_command, run_in_subprocess, training_command
from .curve import PRESERVATION_AXES, SATURATION_KEYS, write_curve
from .folder import BASELINES_NAME, EVAL_DIR, RUN_RESULT_NAME, SWEEP_SETTINGS_NAME, read_json, write_json
from .grid import make_grid


def check_sweep_settings(args):
    """Refuse to mix runs made with other flags into one folder; a grid may grow between reruns."""
    settings = {
        "pretrained_model_name_or_path": args.pretrained_model_name_or_path,
        "concept_flags": concept_flags(args),
        "dataset_name": args.dataset_name,
        "training_script": os.path.basename(args.training_script),
        "train_args": shlex.split(args.train_args),
        "eval_args": shlex.split(args.eval_args),
        "train_num_processes": args.train_num_processes,
    }
    folder = ResumableFolder(
        args.output_dir,
        SWEEP_SETTINGS_NAME,
        contents="a sweep",
        resume_hint="rerun with the same flags (only the grid and the baselines may change), or use a new --output_dir",
        # The sweep's settings are its flags: the refusal names them ("made with other train_args").
        refusal="{folder} holds {contents} made with other {changes}: {hint}",
    )
    folder.check_settings(settings)


def evaluation_record(results: dict, name: str) -> dict:
    """What the curve needs of one model from ``results.json``: DSR per set, preservation measures."""
    values = results["metrics"][name]
    record = {"dsr": {s: d["dsr"] for s, d in values.get("dsr", {}).items()}}
    record["dsr_counts"] = {s: [d["num_safe"], d["num_images"]] for s, d in values.get("dsr", {}).items()}
    for axis in PRESERVATION_AXES:
        if axis in values:
            record[axis] = values[axis][axis]
    return record


def training_end(run_dir: str) -> Optional[dict]:
    """The saturation over the last logged steps of a run, from its ``logs/metrics.jsonl``."""
    summary = saturation.summary_from_metrics(os.path.join(run_dir, "logs", "metrics.jsonl"))
    if summary is None:
        return None
    return {key: summary[key] for key in (*SATURATION_KEYS, "saturated_without_effect", "num_steps", "last_step")}


def adapter_is_complete(run_dir: str) -> bool:
    return all(
        os.path.isfile(os.path.join(run_dir, name)) for name in ("pytorch_lora_weights.safetensors", "duo_config.json")
    )


def format_record(record: dict, axis: str) -> str:
    parts = [f"DSR {s} {v:.2f}" for s, v in record["dsr"].items()]
    if axis in record:
        parts.append(f"{axis.replace('_', ' ')} {record[axis]:.3f}")
    return ", ".join(parts)


def run_sweep(args, runner: Callable[[Command, str], None] = run_in_subprocess) -> dict:
    """Train and evaluate every missing run, then the baselines; returns the curve."""
    check_sweep_settings(args)
    results_path = os.path.join(args.output_dir, EVAL_DIR, "results.json")
    if args.report_only:
        records = {}
        for path in sorted(glob.glob(os.path.join(args.output_dir, "runs", "*", RUN_RESULT_NAME))):
            record = read_json(path)
            records.setdefault(record["setting"], []).append(record)
        if not records:
            raise UsageError(f"--report_only: no evaluated run in {args.output_dir}/runs yet")
        return write_curve(args, records, evaluate_baselines(args, runner, results_path))
    runs = make_grid(args)
    logs = os.path.join(args.output_dir, "logs")
    os.makedirs(logs, exist_ok=True)
    os.makedirs(os.path.join(args.output_dir, EVAL_DIR), exist_ok=True)
    print(
        f"Sweep of {len(runs)} runs ({len({r.setting for r in runs})} settings × {len(set(args.train_seeds))} seeds) in {args.output_dir}",
        flush=True,
    )
    for index, run in enumerate(runs, start=1):
        prefix = f"[{index}/{len(runs)}] {run.name}"
        run_dir = os.path.join(args.output_dir, "runs", run.name)
        record_path = os.path.join(run_dir, RUN_RESULT_NAME)
        if os.path.isfile(record_path):
            print(
                f"{prefix}: done already ({format_record(read_json(record_path), args.preservation_axis)})", flush=True
            )
            continue
        if adapter_is_complete(run_dir):
            print(f"{prefix}: trained already", flush=True)
        else:
            started = time.time()
            print(f"{prefix}: training (log: {os.path.join(logs, run.name + '.train.log')})", flush=True)
            runner(training_command(args, run, run_dir), os.path.join(logs, run.name + ".train.log"))
            print(f"{prefix}: trained in {time.time() - started:.0f} s", flush=True)
        started = time.time()
        runner(
            evaluation_command(args, ["--adapter", f"{run.name}={run_dir}"]),
            os.path.join(logs, run.name + ".eval.log"),
        )
        results = read_json(results_path)
        record = {
            "run": run.name,
            "setting": run.setting.name,
            **run.setting.describe(),
            "seed": run.seed,
            "adapter": run_dir,
            **evaluation_record(results, run.name),
            "base": evaluation_record(results, "base"),
            "training_end": training_end(run_dir),
        }
        write_json(record_path, record)
        print(
            f"{prefix}: evaluated in {time.time() - started:.0f} s: {format_record(record, args.preservation_axis)}",
            flush=True,
        )

    records = {}
    for run in runs:
        records.setdefault(run.setting.name, []).append(
            read_json(os.path.join(args.output_dir, "runs", run.name, RUN_RESULT_NAME))
        )
    return write_curve(args, records, evaluate_baselines(args, runner, results_path))


def baseline_flags(args) -> List[str]:
    flags = []
    for flag, kind in (
        ("baseline_unet", "--unet"),
        ("baseline_pipeline", "--pipeline"),
        ("baseline_adapter", "--adapter"),
    ):
        for value in getattr(args, flag):
            flags += [kind, value]
    return flags


def evaluate_baselines(args, runner, results_path: str) -> Dict[str, dict]:
    """The base model (always) and the baselines, in one evaluation; skipped when the same ones are recorded."""
    flags = baseline_flags(args)
    path = os.path.join(args.output_dir, BASELINES_NAME)
    if os.path.isfile(path):
        stored = read_json(path)
        if stored.get("flags") == flags:
            return stored["models"]
    print(f"Evaluating the base model{' and the baselines' if flags else ''}", flush=True)
    runner(evaluation_command(args, flags), os.path.join(args.output_dir, "logs", "baselines.eval.log"))
    results = read_json(results_path)
    models = {name: evaluation_record(results, name) for name in results["metrics"]}
    write_json(path, {"flags": flags, "models": models})
    for name, record in models.items():
        print(f"  {name}: {format_record(record, args.preservation_axis)}", flush=True)
    return models
