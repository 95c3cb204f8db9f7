"""Measuring a step: pure helpers (medians, ratios, targets), memory meters, phase timers, call counters, the machine."""

import contextlib
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional


BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
CONFIG_DIR = BENCHMARKS_DIR / "configs"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402


GB = 1e9  # the targets are in decimal gigabytes, the stricter reading of "GB"

# Dense bf16 tensor-core peaks from the vendors' data sheets, matched against torch.cuda.get_device_name.
BF16_PEAK_FLOPS = {
    "H200": 989.4e12,
    "H100 PCIe": 756.5e12,
    "H100": 989.4e12,  # SXM (HBM3)
    "A100": 312e12,
    "L40S": 362.05e12,
    "L4": 121e12,
}

TARGET_STEP_RATIO = 0.6
TARGET_MEMORY_GB = {("sd14", 512): 6.0, ("sd3-medium", 1024): 16.0}


# --------------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------------


def median(values: List[float]) -> Optional[float]:
    return statistics.median(values) if values else None


def ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or not denominator:
        return None
    return numerator / denominator


def peak_bf16_flops(device_name: str) -> Optional[float]:
    """The card's dense bf16 peak, from the longest name in BF16_PEAK_FLOPS found in ``device_name``."""
    matches = [name for name in BF16_PEAK_FLOPS if name in device_name]
    return BF16_PEAK_FLOPS[max(matches, key=len)] if matches else None


def options_label(options) -> str:
    """A short label of a ``bench_steps.MemoryOptions``."""
    parts = [
        "gc" if options.gradient_checkpointing else "no-gc",
        "adam8bit" if options.use_8bit_adam else "adamw",
        options.attention,
    ]
    if not options.free_text_encoders:
        parts.append("encoders-resident")
    return ",".join(parts)


def merge_repeats(rows: List[dict]) -> dict:
    """One row from the repeats of a case: step times pooled (median over all), the highest peak memory,
    phase times and calls averaged."""
    merged = dict(max(rows, key=lambda row: row["peak_memory_bytes"]))
    merged["step_times_s"] = [t for row in rows for t in row["step_times_s"]]
    merged["median_step_s"] = median(merged["step_times_s"])
    merged["min_step_s"] = min(merged["step_times_s"])
    for key in ("phase_s_per_step", "calls_per_step"):
        names = rows[0][key].keys()
        merged[key] = {name: sum(row[key][name] for row in rows) / len(rows) for name in names}
    merged["repeats"] = len(rows)
    return merged


ENCODING_PHASES = ("host-to-device copy", "VAE encode", "text encode")


def encoding_share(official_row: dict) -> Optional[float]:
    """The part of the official step spent on what ours caches (pixels in, VAE and text encoders).
    1 − share is the best ours/official ratio that caching alone can reach."""
    phases = official_row.get("phase_s_per_step") or {}
    total = sum(phases.values())
    if not total:
        return None
    return sum(phases.get(name, 0.0) for name in ENCODING_PHASES) / total


def evaluate_targets(results: List[dict], comparisons: List[dict], memory_targets_apply: bool) -> List[dict]:
    """Which of the issue's targets the measured rows meet; ``met`` is None where nothing measures it. The
    memory targets apply only to full-size models measured on a GPU (``memory_targets_apply``)."""
    targets = []
    for comparison in comparisons:
        value = comparison["step_time_ratio"]
        targets.append(
            {
                "target": f"ours <= {TARGET_STEP_RATIO} x official step time",
                "case": f"{comparison['model']}@{comparison['resolution']} [{comparison['options']}]",
                "measured": value,
                "met": None if value is None else value <= TARGET_STEP_RATIO,
            }
        )
    ours = [row for row in results if row["recipe"] == "ours" and "calls_per_step" in row]
    if ours:
        encoder_calls = {
            f"{row['model']}@{row['resolution']} [{row['options']}]": {
                name: count for name, count in row["calls_per_step"].items() if not name.startswith("denoiser")
            }
            for row in ours
        }
        targets.append(
            {
                "target": "ours: zero VAE and text-encoder calls per step after warm-up",
                "case": "every ours row",
                "measured": encoder_calls,
                "met": all(count == 0 for calls in encoder_calls.values() for count in calls.values()),
            }
        )
    for (model, resolution), limit in TARGET_MEMORY_GB.items():
        rows = [
            row
            for row in ours
            if row["model"] == model
            and row["resolution"] == resolution
            and row.get("memory_options_on")
            and row.get("peak_memory_bytes")
        ]
        name = f"{model}@{resolution} peak accelerator memory < {limit:g} GB with the memory options on"
        if not memory_targets_apply or not rows:
            targets.append(
                {"target": name, "case": None, "measured": None, "met": None, "note": "not measured in this run"}
            )
            continue
        best = min(rows, key=lambda row: row["peak_memory_bytes"])
        peak = best["peak_memory_bytes"] / GB
        targets.append({"target": name, "case": best["options"], "measured": peak, "met": peak < limit})
    return targets


# --------------------------------------------------------------------------------------------------
# Machine, memory and time
# --------------------------------------------------------------------------------------------------


def read_proc_status(key: str) -> Optional[int]:
    """A ``VmXXX`` line of /proc/self/status in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"^{key}:\s+(\d+) kB", f.read(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) * 1024 if match else None


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process's RSS (Linux ≥ 4.0), so that each recipe's
    peak is its own. Returns False where that is not possible (the peak is then the process's)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryMeter:
    """Peak memory over a stretch of steps: allocated CUDA memory on a GPU, resident set size on a CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.rss_reset = False
        self.rss_before = None

    def reset(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.rss_reset = reset_peak_rss()
            self.rss_before = read_proc_status("VmRSS")

    def read(self) -> dict:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return {
                "memory_kind": "torch.cuda.max_memory_allocated",
                "peak_memory_bytes": torch.cuda.max_memory_allocated(self.device),
                "peak_reserved_bytes": torch.cuda.max_memory_reserved(self.device),
            }
        peak = read_proc_status("VmHWM")
        if peak is None:  # not Linux: ru_maxrss is the whole process's peak (kB on Linux, bytes on macOS)
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
        return {
            "memory_kind": "peak RSS of the steps (VmHWM after reset)"
            if self.rss_reset
            else "peak RSS of the process",
            "peak_memory_bytes": peak,
            "rss_before_steps_bytes": self.rss_before,
            "peak_over_start_bytes": None if self.rss_before is None else peak - self.rss_before,
        }


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Wall time per named phase of a step, the device synchronised at each boundary."""

    def __init__(self, device: torch.device, enabled: bool = True):
        self.device = device
        self.enabled = enabled
        self.totals: Dict[str, float] = defaultdict(float)

    @contextlib.contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        synchronize(self.device)
        start = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            self.totals[name] += time.perf_counter() - start


class CallCounter:
    """Forward calls of the VAE, each text encoder and the denoiser, the denoiser split by whether its
    LoRA adapter was enabled (adapted model) or disabled (reference model) at the call."""

    def __init__(self, vae, text_encoders: Dict[str, torch.nn.Module], denoiser: torch.nn.Module):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.counts: Dict[str, int] = defaultdict(int)
        self.handles = []
        lora_layers = [m for m in denoiser.modules() if isinstance(m, BaseTunerLayer)]
        if not lora_layers:
            raise ValueError("the denoiser has no LoRA layer: add the DUO adapter before counting calls")
        probe = lora_layers[0]

        def count(name):
            def hook(module, args):
                self.counts[name] += 1

            return hook

        def count_denoiser(module, args):
            self.counts["denoiser_reference" if probe.disable_adapters else "denoiser_adapted"] += 1

        # vae.encode/decode are not forward(): count the encoder and decoder they call.
        self.handles.append(vae.encoder.register_forward_pre_hook(count("vae_encode")))
        self.handles.append(vae.decoder.register_forward_pre_hook(count("vae_decode")))
        for name, encoder in text_encoders.items():
            self.handles.append(encoder.register_forward_pre_hook(count(name)))
        self.handles.append(denoiser.register_forward_pre_hook(count_denoiser))
        self.names = ["vae_encode", "vae_decode", *text_encoders, "denoiser_adapted", "denoiser_reference"]

    def reset(self):
        self.counts.clear()

    def per_step(self, steps: int) -> Dict[str, float]:
        return {name: self.counts.get(name, 0) / steps for name in self.names}

    def remove(self):
        for handle in self.handles:
            handle.remove()


def machine_description(device: torch.device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"^model name\s*:\s*(.+)$", f.read(), re.MULTILINE)
        cpu = names[0].strip() if names else cpu
    except OSError:
        pass
    total_memory = None
    try:
        total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    description = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_bytes": total_memory,
        "device": str(device),
    }
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        description.update(
            gpu=torch.cuda.get_device_name(device),
            gpu_memory_bytes=properties.total_memory,
            gpu_multiprocessors=properties.multi_processor_count,
            cuda=torch.version.cuda,
        )
    return description


def library_versions() -> dict:
    import accelerate
    import diffusers
    import peft
    import transformers

    versions = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "accelerate": accelerate.__version__,
    }
    for optional in ("bitsandbytes", "xformers"):
        versions[optional] = installed_version(optional)
    return versions


def installed_version(package: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return None


def git_commit() -> Optional[str]:
    try:
        return (
            subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        return None
