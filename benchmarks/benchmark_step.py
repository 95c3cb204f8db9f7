#!/usr/bin/env python
"""DUO's training step against a re-creation of the official recipe's step: time, memory, calls, FLOP/s.

Both steps run in one process on the same models, pairs and seeds, one pair per step:

* **ours**: the step of ``train_duo.py`` / ``train_duo_sd3.py``: ``make_duo_batch`` and ``duo_forward``
  of ``duo_plugin.sd`` / ``duo_plugin.sd3``, followed by the scripts' backward, gradient clipping and
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

The result is printed as tables and written as JSON (``--output``; by default
``benchmarks/results/<suite>-<date>.json``). See benchmarks/README.md.
"""

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional, Tuple

BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
CONFIG_DIR = BENCHMARKS_DIR / "configs"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from duo_plugin import data, lora, objective, sd, sd3, training  # noqa: E402
from duo_plugin.errors import UsageError, exit_on_usage_error  # noqa: E402
from duo_plugin.precision import torch_dtype  # noqa: E402
from duo_plugin.presets import FAMILY_RECIPES, get_preset, learning_rate_for_beta, preservation_weight_for_beta  # noqa: E402

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


def options_label(options: "MemoryOptions") -> str:
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
            row for row in ours
            if row["model"] == model and row["resolution"] == resolution and row.get("memory_options_on") and row.get("peak_memory_bytes")
        ]
        name = f"{model}@{resolution} peak accelerator memory < {limit:g} GB with the memory options on"
        if not memory_targets_apply or not rows:
            targets.append({"target": name, "case": None, "measured": None, "met": None, "note": "not measured in this run"})
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
            "memory_kind": "peak RSS of the steps (VmHWM after reset)" if self.rss_reset else "peak RSS of the process",
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
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------------------------
# Models: tiny pipelines (as the tests build them) or full size from the published configs
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelBundle:
    """Everything a DUO step touches, for one base model."""

    name: str  # "tiny-sd", "tiny-sd3", "sd14", "sd3-medium"
    family: str  # "sd" or "sd3"
    denoiser: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: Dict[str, torch.nn.Module]
    tokenizers: Dict[str, object]
    noise_scheduler: object
    native_resolution: int
    full_size: bool
    pipeline_scheduler: object = None  # the scheduler the pipeline samples with (pair generation)


def tiny_bundle(family: str, workdir: str) -> ModelBundle:
    """A tiny pipeline from duo_plugin.testing, saved and loaded back as the training scripts load it."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline, StableDiffusionPipeline

    from duo_plugin.testing import make_tiny_sd3_pipeline, make_tiny_sd_pipeline

    path = os.path.join(workdir, f"tiny-{family}")
    if family == "sd":
        pipeline = StableDiffusionPipeline.from_pretrained(make_tiny_sd_pipeline(path))
        return ModelBundle(
            name="tiny-sd", family="sd", denoiser=pipeline.unet, vae=pipeline.vae,
            text_encoders={"text_encoder": pipeline.text_encoder}, tokenizers={"tokenizer": pipeline.tokenizer},
            noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
            native_resolution=32, full_size=False, pipeline_scheduler=pipeline.scheduler,
        )
    pipeline = StableDiffusion3Pipeline.from_pretrained(make_tiny_sd3_pipeline(path))
    return ModelBundle(
        name="tiny-sd3", family="sd3", denoiser=pipeline.transformer, vae=pipeline.vae,
        text_encoders={name: getattr(pipeline, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")},
        tokenizers={name: getattr(pipeline, name) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")},
        noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config),
        native_resolution=32, full_size=False, pipeline_scheduler=pipeline.scheduler,
    )


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def read_config(family_dir: str, name: str) -> dict:
    with open(CONFIG_DIR / family_dir / f"{name}.json") as f:
        return json.load(f)


def full_size_bundle(name: str, device: torch.device, weight_dtype: torch.dtype) -> ModelBundle:
    """SD1.4 or SD3-medium from the published configs in benchmarks/configs, with random weights,
    built directly on ``device`` (speed and memory do not depend on weight values).

    Tokenizers cannot be downloaded: the tiny tokenizers stand in, padded to the real lengths (77 CLIP
    tokens; 256 T5 tokens), which is all the encoders see of an empty prompt's shape.
    """
    from diffusers import (
        AutoencoderKL,
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        PNDMScheduler,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    from duo_plugin.testing import tiny_clip_tokenizer, tiny_t5_tokenizer

    def build(factory, dtype):
        with torch.device(device), default_dtype(dtype):
            module = factory()
        return module.eval().requires_grad_(False)  # as from_pretrained returns them

    if name == "sd14":
        config_dir = "sd14"
        return ModelBundle(
            name=name, family="sd",
            denoiser=build(lambda: UNet2DConditionModel.from_config(read_config(config_dir, "unet")), weight_dtype),
            vae=build(lambda: AutoencoderKL.from_config(read_config(config_dir, "vae")), weight_dtype),
            text_encoders={
                "text_encoder": build(lambda: CLIPTextModel(CLIPTextConfig.from_dict(read_config(config_dir, "text_encoder"))), weight_dtype)
            },
            tokenizers={"tokenizer": tiny_clip_tokenizer(model_max_length=77)},
            noise_scheduler=DDPMScheduler.from_config(read_config(config_dir, "scheduler")),
            pipeline_scheduler=PNDMScheduler.from_config(read_config(config_dir, "scheduler")),
            native_resolution=512, full_size=True,
        )
    if name == "sd3-medium":
        config_dir = "sd3-medium"
        clip = lambda config_name: lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(read_config(config_dir, config_name)))  # noqa: E731
        return ModelBundle(
            name=name, family="sd3",
            denoiser=build(lambda: SD3Transformer2DModel.from_config(read_config(config_dir, "transformer")), weight_dtype),
            # train_duo_sd3.py keeps the SD3 VAE in fp32.
            vae=build(lambda: AutoencoderKL.from_config(read_config(config_dir, "vae")), torch.float32),
            text_encoders={
                "text_encoder": build(clip("text_encoder"), weight_dtype),
                "text_encoder_2": build(clip("text_encoder_2"), weight_dtype),
                "text_encoder_3": build(lambda: T5EncoderModel(T5Config.from_dict(read_config(config_dir, "text_encoder_3"))), weight_dtype),
            },
            tokenizers={
                "tokenizer": tiny_clip_tokenizer(model_max_length=77),
                "tokenizer_2": tiny_clip_tokenizer(model_max_length=77),
                "tokenizer_3": tiny_t5_tokenizer(model_max_length=256),
            },
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(read_config(config_dir, "scheduler")),
            pipeline_scheduler=FlowMatchEulerDiscreteScheduler.from_config(read_config(config_dir, "scheduler")),
            native_resolution=1024, full_size=True,
        )
    raise UsageError(f"unknown model {name!r}: choose sd14 or sd3-medium")


def default_other_resolution(bundle: ModelBundle) -> int:
    """The second resolution of the GPU suite: 1024 px for SD1.4, 512 px for SD3-medium, 2x for tiny models."""
    if bundle.full_size:
        return 1024 if bundle.native_resolution == 512 else 512
    return 2 * bundle.native_resolution


def synthetic_pairs(num_pairs: int, resolution: int, seed: int, workdir: str) -> data.PairImages:
    """Pairs in the layout train_duo.py reads (duo_plugin.testing's red/blue squares), decoded with PIL."""
    from PIL import Image

    from duo_plugin.testing import make_tiny_pair_folder

    folder = make_tiny_pair_folder(os.path.join(workdir, f"pairs-{resolution}"), num_pairs=num_pairs, resolution=resolution, seed=seed)
    with open(os.path.join(folder, "metadata.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]

    def load(name):
        return Image.open(os.path.join(folder, name)).convert("RGB")

    return data.PairImages(
        unsafe=[load(row["unsafe_file_name"]) for row in rows],
        safe=[load(row["safe_file_name"]) for row in rows],
        unsafe_prompts=[row["unsafe_prompt"] for row in rows],
        safe_prompts=[row["safe_prompt"] for row in rows],
    )


# --------------------------------------------------------------------------------------------------
# The two recipes' steps on one bundle
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryOptions:
    gradient_checkpointing: bool = False
    use_8bit_adam: bool = False
    attention: str = "sdpa"  # or "xformers"
    # ours only: the VAE and text encoders leave the accelerator after caching (train_duo.py moves
    # them to the CPU, train_duo_sd3.py deletes the text encoders). The official recipe keeps them.
    free_text_encoders: bool = True


@dataclass
class Hyperparameters:
    rank: int
    lora_alpha: int
    beta_dpo: float
    preservation_weight: float
    learning_rate: float
    t_min: int
    t_max: int
    seed: int = 42
    pairs_per_step: int = 1
    max_grad_norm: float = 1.0
    max_sequence_length: int = 256  # SD3's T5 tokens, train_duo_sd3.py's default


def default_hyperparameters(family: str, full_size: bool) -> Hyperparameters:
    """The nudity preset's β, λ and learning rate; rank 32 on full-size models, 4 on tiny ones (whose
    attention is 16-32 wide) as in the tests."""
    preset = get_preset("nudity")
    rank = 32 if full_size else 4
    recipe = FAMILY_RECIPES[family]
    return Hyperparameters(
        rank=rank, lora_alpha=rank, beta_dpo=preset.beta_dpo, preservation_weight=preservation_weight_for_beta(preset.beta_dpo),
        learning_rate=learning_rate_for_beta(preset.beta_dpo, recipe.base_learning_rate), t_min=recipe.t_min, t_max=recipe.t_max,
    )


class DUOStepBench:
    """One bundle with its DUO adapter, ready to run either recipe's optimizer step."""

    def __init__(self, bundle: ModelBundle, accelerator, weight_dtype: torch.dtype, hyper: Hyperparameters):
        self.bundle = bundle
        self.accelerator = accelerator
        self.device = accelerator.device
        self.weight_dtype = weight_dtype
        self.hyper = hyper
        # The step pieces train_duo.py (duo_plugin.sd) and train_duo_sd3.py (duo_plugin.sd3) run.
        self.script = sd if bundle.family == "sd" else sd3

        model = bundle.denoiser
        model.requires_grad_(False)
        self.sdpa_processors = dict(model.attn_processors)
        target_modules = lora.lora_target_modules(model, FAMILY_RECIPES[bundle.family].lora_target)
        lora.add_duo_adapter(model, hyper.rank, hyper.lora_alpha, target_modules)
        lora.cast_lora_params_to_fp32(model)
        self.model = model
        self.lora_params = [p for p in model.parameters() if p.requires_grad]
        self.initial_lora = [p.detach().clone() for p in self.lora_params]
        self.denoiser = accelerator.prepare_model(model)
        self.counter = CallCounter(bundle.vae, bundle.text_encoders, model)
        self.text_pipeline = self._sd3_text_pipeline() if bundle.family == "sd3" else None
        self.flow_args = SimpleNamespace(
            t_min=hyper.t_min, t_max=hyper.t_max, weighting_scheme="none", logit_mean=0.0, logit_std=1.0,
            mode_scale=1.29, precondition_outputs=1,
        )
        self.place_encoders(on_device=True)
        with torch.no_grad():
            self.empty_condition = self.encode_empty_prompts(1)
        self.empty_condition = tuple(t.float().cpu() for t in self.empty_condition)
        self.resolution = None

    # -- set-up shared by the recipes ---------------------------------------------------------------

    def _sd3_text_pipeline(self):
        """SD3's prompt encoding (CLIP-L, CLIP-G, T5; hidden states joined as the pipeline joins them)."""
        from diffusers import StableDiffusion3Pipeline

        bundle = self.bundle
        return StableDiffusion3Pipeline(
            transformer=self.model, scheduler=bundle.noise_scheduler, vae=bundle.vae,
            **bundle.text_encoders, **bundle.tokenizers,
        )

    def encode_empty_prompts(self, count: int):
        """The empty prompt's condition for ``count`` pairs: (embeddings,) for SD1, (embeddings, pooled) for SD3."""
        prompts = [""] * count
        if self.bundle.family == "sd":
            tokenizer, text_encoder = self.bundle.tokenizers["tokenizer"], self.bundle.text_encoders["text_encoder"]
            return (self.script.encode_prompts(tokenizer, text_encoder, prompts, self.device),)
        embeds, _, pooled, _ = self.text_pipeline.encode_prompt(
            prompts, None, None, device=self.device, do_classifier_free_guidance=False,
            max_sequence_length=self.hyper.max_sequence_length,
        )
        return embeds, pooled

    def place_encoders(self, on_device: bool):
        target = self.device if on_device else torch.device("cpu")
        for module in (self.bundle.vae, *self.bundle.text_encoders.values()):
            module.to(target)
        if not on_device and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def vae_dtype(self):
        return self.weight_dtype if self.bundle.family == "sd" else torch.float32

    def load_pairs(self, pairs: data.PairImages, resolution: int):
        """Ours: cache the pair latents once. Official: pixel tensors ready on the host, as a data
        loader would hand them over (both flips, so that the per-step flip is an index)."""
        self.pairs = pairs
        self.resolution = resolution
        self.place_encoders(on_device=True)
        self.latents_cache = data.encode_pairs(
            self.bundle.vae, pairs, resolution, center_crop=False, random_flip=True, seed=self.hyper.seed,
            device=self.device, dtype=self.vae_dtype(), progress=False,
        )
        generator = torch.Generator().manual_seed(self.hyper.seed)
        pixels = torch.stack(
            [torch.stack(data.joint_transform(u, s, resolution, False, generator)) for u, s in zip(pairs.unsafe, pairs.safe)]
        )  # (N, 2, 3, H, W): unsafe, safe
        self.pixels = torch.stack([pixels, pixels.flip(-1)], dim=1)  # (N, flips, 2, 3, H, W)
        if self.device.type == "cuda":
            self.pixels = self.pixels.pin_memory()

    def step_draws(self, step: int):
        generator = data.step_generator(self.hyper.seed, step, 0, 0)
        pair_indices = data.pair_indices_for_step(
            len(self.pairs), step, 0, 1, self.hyper.pairs_per_step, 0, 1, self.hyper.seed
        )
        return generator, pair_indices

    def reset_adapter(self):
        with torch.no_grad():
            for param, initial in zip(self.lora_params, self.initial_lora):
                param.copy_(initial)
                param.grad = None

    def make_optimizer(self, use_8bit_adam: bool):
        args = SimpleNamespace(
            use_8bit_adam=use_8bit_adam, learning_rate=self.hyper.learning_rate,
            adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=1e-2, adam_epsilon=1e-8,
        )
        return self.accelerator.prepare_optimizer(training.make_optimizer(args, self.lora_params))

    def apply_options(self, options: MemoryOptions):
        if options.gradient_checkpointing:
            self.model.enable_gradient_checkpointing()
        else:
            self.model.disable_gradient_checkpointing()
        if options.attention == "xformers":
            self.model.enable_xformers_memory_efficient_attention()
        else:
            self.model.set_attn_processor(dict(self.sdpa_processors))

    # -- the steps ------------------------------------------------------------------------------------

    def duo_forward(self, batch):
        hyper = self.hyper
        if self.bundle.family == "sd":
            return self.script.duo_forward(self.accelerator, self.denoiser, batch, hyper.beta_dpo, hyper.preservation_weight, self.weight_dtype)
        return self.script.duo_forward(
            self.accelerator, self.denoiser, batch, hyper.beta_dpo, hyper.preservation_weight, self.weight_dtype,
            self.flow_args.precondition_outputs,
        )

    def update(self, batch, optimizer, timer: PhaseTimer) -> dict:
        """What both training loops do with a batch: DUO loss, backward, clip, optimizer step, log."""
        with timer("forward (reference + adapted)"):
            losses = self.duo_forward(batch)
        with timer("backward"):
            self.accelerator.backward(losses.loss)
        with timer("optimizer"):
            if self.accelerator.sync_gradients:
                self.accelerator.clip_grad_norm_(self.lora_params, self.hyper.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        with timer("logging"):
            return losses.to_log()

    def ours_step(self, step: int, optimizer, timer: PhaseTimer) -> dict:
        with timer("batch from caches"):
            generator, pair_indices = self.step_draws(step)
            if self.bundle.family == "sd":
                batch = self.script.make_duo_batch(
                    self.latents_cache, pair_indices, generator, self.bundle.noise_scheduler,
                    self.hyper.t_min, self.hyper.t_max, self.empty_condition[0],
                )
            else:
                batch = self.script.make_duo_batch(
                    self.latents_cache, pair_indices, generator, self.bundle.noise_scheduler, self.flow_args, self.empty_condition
                )
        return self.update(batch, optimizer, timer)

    def official_step(self, step: int, optimizer, timer: PhaseTimer) -> dict:
        num_pairs = self.hyper.pairs_per_step
        generator, pair_indices = self.step_draws(step)
        with timer("host-to-device copy"):
            flips = torch.randint(0, 2, (num_pairs,), generator=generator)
            pixels = self.pixels[pair_indices, flips]  # (B, 2, 3, H, W)
            pixels = torch.cat([pixels[:, 0], pixels[:, 1]]).to(self.device, self.vae_dtype(), non_blocking=True)
        with timer("VAE encode"), torch.no_grad():
            latents = self.bundle.vae.encode(pixels).latent_dist.sample(generator)
            shift = getattr(self.bundle.vae.config, "shift_factor", None) or 0.0
            latents = ((latents - shift) * self.bundle.vae.config.scaling_factor).float()
        with timer("text encode"), torch.no_grad():
            condition = self.encode_empty_prompts(num_pairs)
        with timer("noising"):
            batch = self.official_batch(latents, condition, generator)
        return self.update(batch, optimizer, timer)

    def official_batch(self, latents, condition, generator):
        """[x⁻_t; x⁺_t; x_T] with one noise and one timestep per *image* (the official draw)."""
        num_pairs = self.hyper.pairs_per_step
        device = self.device
        noise = torch.randn(latents.shape, generator=generator).to(device)
        pure_noise = torch.randn((num_pairs, *latents.shape[1:]), generator=generator).to(device)
        if self.bundle.family == "sd":
            scheduler = self.bundle.noise_scheduler
            timesteps = objective.sample_pair_timesteps(2 * num_pairs, self.hyper.t_min, self.hyper.t_max, generator).to(device)
            last_timestep = scheduler.config.num_train_timesteps - 1
            (embeddings,) = condition
            return self.script.DUOBatch(
                model_input=torch.cat([scheduler.add_noise(latents, noise, timesteps), pure_noise]),
                timesteps=torch.cat([timesteps, torch.full((num_pairs,), last_timestep, device=device)]),
                condition=embeddings.repeat(3, 1, 1),
                target=objective.diffusion_target(scheduler, latents, noise, timesteps),
            )
        scheduler = self.bundle.noise_scheduler
        indices = objective.sample_flow_matching_indices(2 * num_pairs, self.hyper.t_min, self.hyper.t_max, generator)
        pair_sigmas, pair_timesteps = objective.flow_matching_sigmas_and_timesteps(scheduler, indices)
        noise_sigma, noise_timestep = objective.pure_noise_sigma_and_timestep(scheduler)
        sigmas = torch.cat([pair_sigmas, noise_sigma.expand(num_pairs)]).to(device)
        clean = torch.cat([latents, torch.zeros_like(pure_noise)])
        all_noise = torch.cat([noise, pure_noise])
        embeddings, pooled = condition
        return self.script.DUOBatch(
            model_input=objective.flow_matching_noisy(clean, all_noise, sigmas),
            sigmas=sigmas,
            timesteps=torch.cat([pair_timesteps, noise_timestep.expand(num_pairs)]).to(device),
            prompt_embeds=embeddings.repeat(3, 1, 1),
            pooled_prompt_embeds=pooled.repeat(3, 1),
            target=objective.flow_matching_target(latents, noise, bool(self.flow_args.precondition_outputs)),
            weighting=torch.ones(2 * num_pairs, 1, 1, 1, device=device),
        )

    # -- measuring ------------------------------------------------------------------------------------

    def resident_parameter_bytes(self, encoders_on_device: bool) -> int:
        """Parameter bytes the recipe keeps on the accelerator (the denoiser and adapter; plus the VAE
        and text encoders where they stay)."""
        modules = [self.model] + ([self.bundle.vae, *self.bundle.text_encoders.values()] if encoders_on_device else [])
        return sum(p.numel() * p.element_size() for module in modules for p in module.parameters())

    def count_flops(self, step_fn: Callable, step: int, optimizer) -> dict:
        """FLOPs of one step (gradient checkpointing off, so recomputation is not counted)."""
        from torch.utils.flop_counter import FlopCounterMode

        checkpointing = self.model.is_gradient_checkpointing
        self.model.disable_gradient_checkpointing()
        try:
            with FlopCounterMode(display=False) as counter:
                step_fn(step, optimizer, PhaseTimer(self.device, enabled=False))
        finally:
            if checkpointing:
                self.model.enable_gradient_checkpointing()
        per_module = counter.get_flop_counts()
        denoiser_flops = sum(per_module.get(type(self.model).__name__, {}).values())
        return {"step_flops": counter.get_total_flops(), "denoiser_flops": denoiser_flops}

    def run(self, recipes: Tuple[str, ...], options: MemoryOptions, warmup_steps: int, measure_steps: int, flops_cache: dict) -> List[dict]:
        """Time the steps of ``recipes`` ("ours", "official"); one row each.

        Several recipes alternate step by step, each on the same draws (step index), sharing the adapter
        and the optimizer: the work of a step does not depend on the weights' values, and a busy spell
        of a shared CPU then slows both alike. Their encoders stay where the official recipe keeps
        them, so on a GPU, where placement decides memory, each recipe runs alone.
        """
        encoders_on_device = "official" in recipes or not options.free_text_encoders
        self.reset_adapter()
        self.apply_options(options)
        self.place_encoders(on_device=encoders_on_device)
        optimizer = self.make_optimizer(options.use_8bit_adam)
        step_fns = {recipe: self.ours_step if recipe == "ours" else self.official_step for recipe in recipes}
        memory = MemoryMeter(self.device)
        try:
            for step in range(warmup_steps):
                for recipe in recipes:
                    step_fns[recipe](step, optimizer, PhaseTimer(self.device, enabled=False))
            gc.collect()
            timers = {recipe: PhaseTimer(self.device) for recipe in recipes}
            times = {recipe: [] for recipe in recipes}
            calls = {recipe: defaultdict(float) for recipe in recipes}
            peaks: Dict[str, dict] = {}
            logs = {}
            for step in range(warmup_steps, warmup_steps + measure_steps):
                order = recipes if step % 2 == 0 else tuple(reversed(recipes))
                for recipe in order:
                    self.counter.reset()
                    memory.reset()
                    synchronize(self.device)
                    start = time.perf_counter()
                    logs[recipe] = step_fns[recipe](step, optimizer, timers[recipe])
                    synchronize(self.device)
                    times[recipe].append(time.perf_counter() - start)
                    for name, count in self.counter.per_step(measure_steps).items():
                        calls[recipe][name] += count
                    reading = memory.read()
                    if recipe not in peaks or reading["peak_memory_bytes"] > peaks[recipe]["peak_memory_bytes"]:
                        peaks[recipe] = reading
            rows = []
            for recipe in recipes:
                row = {
                    "median_step_s": median(times[recipe]),
                    "step_times_s": times[recipe],
                    **peaks[recipe],
                    "calls_per_step": dict(calls[recipe]),
                    "phase_s_per_step": {name: total / measure_steps for name, total in timers[recipe].totals.items()},
                    "last_loss": logs[recipe]["loss"],
                    "interleaved_with": [other for other in recipes if other != recipe],
                    "resident_parameter_bytes": self.resident_parameter_bytes(recipe == "official" or not options.free_text_encoders),
                }
                key = (self.bundle.name, self.resolution, recipe)
                if key not in flops_cache:
                    flops_cache[key] = self.count_flops(step_fns[recipe], warmup_steps + measure_steps, optimizer)
                row.update(flops_cache[key])
                rows.append(row)
            return rows
        finally:
            optimizer.zero_grad(set_to_none=True)
            optimizer.optimizer.state.clear()
            # The accelerator unscales fp16 gradients for every optimizer it prepared: forget this one, or the
            # next case's gradients (the same LoRA parameters) would be unscaled twice.
            if optimizer in self.accelerator._optimizers:
                self.accelerator._optimizers.remove(optimizer)
            del optimizer
            gc.collect()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def close(self):
        self.counter.remove()


# --------------------------------------------------------------------------------------------------
# Pair generation throughput
# --------------------------------------------------------------------------------------------------


def pair_generation_throughput(bundle: ModelBundle, device, weight_dtype, num_pairs: int, resolution: int, num_inference_steps: int) -> dict:
    """Pair generation as ``python -m duo_plugin.pairs`` makes pairs (``SDEditPairMaker``: the unsafe image by
    text-to-image, its safe twin by img2img with the safe prompt and the unsafe prompt as negative prompt),
    all pairs in one batch vs one pair at a time. Images/s counts both images of a pair; no detector runs."""
    from diffusers import StableDiffusionPipeline

    from duo_plugin import pairs as pair_generation

    info = pair_generation.BaseModelInfo(
        pipeline_class="StableDiffusionPipeline", family="sd", default_resolution=resolution,
        resolution_multiple=8, default_num_inference_steps=num_inference_steps,
    )
    recipe = pair_generation.make_recipe(get_preset("nudity"), bundle.name, info, num_pairs=num_pairs, verifier="none", max_attempts=1)
    text_to_image = StableDiffusionPipeline(
        vae=bundle.vae, text_encoder=bundle.text_encoders["text_encoder"], tokenizer=bundle.tokenizers["tokenizer"],
        unet=bundle.denoiser, scheduler=bundle.pipeline_scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    text_to_image.set_progress_bar_config(disable=True)
    maker = pair_generation.SDEditPairMaker(text_to_image, recipe)
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)

    def make(indices):
        unsafe_prompts = [recipe.prompts_of(i)[0] for i in indices]
        safe_prompts = [recipe.prompts_of(i)[1] for i in indices]
        with autocast:
            unsafe = maker.unsafe_images(unsafe_prompts, [pair_generation.image_seed(recipe.seed, i, 0, 0) for i in indices])
            maker.safe_twins(unsafe, safe_prompts, unsafe_prompts, [pair_generation.image_seed(recipe.seed, i, 0, 1) for i in indices])
        synchronize(device)

    make([0])  # warm-up
    start = time.perf_counter()
    make(list(range(num_pairs)))
    batched = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(num_pairs):
        make([i])
    one_at_a_time = time.perf_counter() - start
    return {
        "model": bundle.name,
        "resolution": resolution,
        "pairs": num_pairs,
        "num_inference_steps": num_inference_steps,
        "sdedit_strength": recipe.strength,
        "guidance_scale": recipe.guidance_scale,
        "scheduler": type(bundle.pipeline_scheduler).__name__,
        "source": "duo_plugin.pairs.SDEditPairMaker (what python -m duo_plugin.pairs runs), no detector",
        "batched_images_per_s": 2 * num_pairs / batched,
        "one_at_a_time_images_per_s": 2 * num_pairs / one_at_a_time,
        "batched_speedup": one_at_a_time / batched,
    }


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
        Case(("ours",), replace(all_on, free_text_encoders=False), native, note="VAE and text encoders kept on the accelerator"),
    ]
    if can_8bit:
        cases.append(Case(("ours",), replace(all_on, use_8bit_adam=False), native, note="8-bit Adam off"))
    if can_xformers:
        cases.append(Case(("ours",), replace(all_on, attention="xformers"), native, memory_options_on=True, note="xformers attention"))
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
                "resident_parameter_ratio": ratio(ours["resident_parameter_bytes"], official["resident_parameter_bytes"]),
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
    peak_flops = args.peak_tflops * 1e12 if args.peak_tflops else (
        peak_bf16_flops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
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
            generation.append(pair_generation_throughput(bundle, device, weight_dtype, args.generation_pairs, native, args.generation_steps))
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
                        "model": bundle.name, "family": family, "resolution": case.resolution, "recipe": recipe,
                        "options": label, "memory_options_on": case.memory_options_on and recipe == "ours", "note": case.note,
                        "mixed_precision": mixed_precision, "pairs_per_step": bench.hyper.pairs_per_step,
                    }
                    for recipe in case.recipes
                }
                keys = {recipe: (case.resolution, recipe, label) for recipe in case.recipes}
                if any(key in measured and "error" in measured[key][1][0] for key in keys.values()):
                    continue
                elapsed = time.perf_counter() - suite_start
                if args.time_budget_s and elapsed > args.time_budget_s:
                    skipped += [{**bases[r], "skipped": f"time budget of {args.time_budget_s:g} s spent"} for r, k in keys.items() if k not in measured]
                    continue
                if case.resolution not in pairs_by_resolution:
                    pairs_by_resolution[case.resolution] = synthetic_pairs(args.num_pairs, case.resolution, bench.hyper.seed, workdir)
                if bench.resolution != case.resolution:
                    bench.load_pairs(pairs_by_resolution[case.resolution], case.resolution)
                print(f"   [{repeat + 1}/{repeats}] {'+'.join(case.recipes):13s} {case.resolution:5d}px [{label}] ...", end=" ", flush=True)
                try:
                    rows = bench.run(case.recipes, case.options, warmup_steps, measure_steps, flops_cache)
                except torch.cuda.OutOfMemoryError as error:
                    print("out of memory", flush=True)
                    rows = [{"error": f"out of memory: {str(error).splitlines()[0]}"}] * len(case.recipes)
                    gc.collect()
                    torch.cuda.empty_cache()
                else:
                    print(", ".join(f"{r['median_step_s'] * 1e3:.1f} ms, peak {r['peak_memory_bytes'] / 2**20:.0f} MiB" for r in rows), flush=True)
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


def count_flops(fn: Callable) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def full_size_step_flops(name: str, resolution: int, weight_dtype: torch.dtype = torch.bfloat16, max_sequence_length: int = 256) -> dict:
    """FLOPs of one DUO step (one pair) of a full-size model, counted on the meta device: shapes only, no
    memory and no arithmetic, so it runs on any machine.

    Both recipes run the denoiser's reference forward, adapted forward and backward over the 3-sample batch
    [x⁻; x⁺; x_T]; the backward computes input gradients only (the base weights are frozen; the LoRA
    adapter's own FLOPs, well under 1 %, are left out). The official step adds the VAE encoding of both
    images and the text encoders on the empty prompt. Gradient checkpointing adds one more forward.
    """
    meta = torch.device("meta")
    bundle = full_size_bundle(name, meta, weight_dtype)
    vae_scale = 2 ** (len(bundle.vae.config.block_out_channels) - 1)
    latent_size = resolution // vae_scale
    latents = torch.randn(3, bundle.vae.config.latent_channels, latent_size, latent_size, device=meta, dtype=weight_dtype, requires_grad=True)
    timesteps = torch.ones(3, device=meta)
    if bundle.family == "sd":
        condition = torch.randn(3, 77, bundle.denoiser.config.cross_attention_dim, device=meta, dtype=weight_dtype)
        denoise = lambda: bundle.denoiser(latents, timesteps, condition).sample  # noqa: E731
        clip_ids = torch.zeros(1, 77, dtype=torch.long, device=meta)
        encoders = {"text_encoder": lambda: bundle.text_encoders["text_encoder"](clip_ids)}
    else:
        config = bundle.denoiser.config
        condition = torch.randn(3, 77 + max_sequence_length, config.joint_attention_dim, device=meta, dtype=weight_dtype)
        pooled = torch.randn(3, config.pooled_projection_dim, device=meta, dtype=weight_dtype)
        denoise = lambda: bundle.denoiser(  # noqa: E731
            hidden_states=latents, timestep=timesteps, encoder_hidden_states=condition, pooled_projections=pooled
        ).sample
        clip_ids = torch.zeros(1, 77, dtype=torch.long, device=meta)
        t5_ids = torch.zeros(1, max_sequence_length, dtype=torch.long, device=meta)
        encoders = {
            "text_encoder": lambda: bundle.text_encoders["text_encoder"](clip_ids, output_hidden_states=True),
            "text_encoder_2": lambda: bundle.text_encoders["text_encoder_2"](clip_ids, output_hidden_states=True),
            "text_encoder_3": lambda: bundle.text_encoders["text_encoder_3"](t5_ids),
        }
    pixels = torch.randn(2, 3, resolution, resolution, device=meta, dtype=next(bundle.vae.parameters()).dtype)

    with torch.no_grad():
        forward = count_flops(denoise)
        vae_encode = count_flops(lambda: bundle.vae.encode(pixels))
        text_encode = {encoder: count_flops(call) for encoder, call in encoders.items()}
    forward_backward = count_flops(lambda: denoise().float().pow(2).mean().backward())
    ours = forward + forward_backward
    official = ours + vae_encode + sum(text_encode.values())
    parameter_bytes = lambda module: sum(p.numel() * p.element_size() for p in module.parameters())  # noqa: E731
    encoder_bytes = parameter_bytes(bundle.vae) + sum(parameter_bytes(m) for m in bundle.text_encoders.values())
    return {
        "model": name,
        "resolution": resolution,
        "denoiser_forward_flops": forward,
        "denoiser_backward_flops": forward_backward - forward,
        "vae_encode_flops": vae_encode,
        "text_encode_flops": text_encode,
        "ours_step_flops": ours,
        "official_step_flops": official,
        "flop_ratio": ours / official,
        "flop_ratio_with_gradient_checkpointing": (ours + forward) / (official + forward),
        # Weights each recipe keeps on the accelerator while training (the LoRA adapter and its optimizer
        # state, tens of MB, and the activations come on top).
        "ours_resident_parameter_bytes": parameter_bytes(bundle.denoiser),
        "official_resident_parameter_bytes": parameter_bytes(bundle.denoiser) + encoder_bytes,
        "weight_dtype": str(weight_dtype).replace("torch.", ""),
    }


def run_flops_suite(args) -> dict:
    rows = []
    for name in args.models:
        native = 512 if name == "sd14" else 1024
        for resolution in args.resolutions or (native, 1024 if native == 512 else 512):
            print(f"   counting {name} at {resolution} px ...", end=" ", flush=True)
            rows.append(full_size_step_flops(name, resolution))
            print(f"ours/official FLOPs {rows[-1]['flop_ratio']:.3f}", flush=True)
    note = (
        "FLOPs counted with torch.utils.flop_counter on the meta device; no step ran. If time followed FLOPs, "
        "flop_ratio would be the best ours/official step-time ratio that caching the VAE and text encoders can reach."
    )
    return {"flops": rows, "notes": [note]}


def print_flops_report(report: dict):
    print(f"\nDUO step FLOPs at full size (meta device, one pair per step), {report['date']}")
    print_table(
        ["model", "px", "denoiser fwd TFLOP", "bwd", "VAE encode", "text encoders", "ours step", "official step", "ours/official",
         "with GC", "weights on GPU: ours", "official"],
        [
            [r["model"], r["resolution"], f"{r['denoiser_forward_flops'] / 1e12:.2f}", f"{r['denoiser_backward_flops'] / 1e12:.2f}",
             f"{r['vae_encode_flops'] / 1e12:.2f}", f"{sum(r['text_encode_flops'].values()) / 1e12:.3f}",
             f"{r['ours_step_flops'] / 1e12:.2f}", f"{r['official_step_flops'] / 1e12:.2f}",
             f"{r['flop_ratio']:.3f}", f"{r['flop_ratio_with_gradient_checkpointing']:.3f}",
             f"{r['ours_resident_parameter_bytes'] / GB:.2f} GB", f"{r['official_resident_parameter_bytes'] / GB:.2f} GB"]
            for r in report["flops"]
        ],
    )
    for note in report["notes"]:
        print(f"note: {note}")


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def format_bytes(value: Optional[float]) -> str:
    return "-" if value is None else f"{value / 2**20:,.0f} MiB"


def format_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}"


def print_table(headers: List[str], rows: List[List[str]]):
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(headers)] if rows else [len(h) for h in headers]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print(line(headers))
    print(line(["-" * w for w in widths]))
    for row in rows:
        print(line(row))


def print_report(report: dict):
    print(f"\nDUO step benchmark: suite {report['suite']}, {report['date']}, {report['machine'].get('gpu') or report['machine']['cpu']}")
    rows = []
    for r in report["results"]:
        if "error" in r:
            rows.append([r["model"], r["resolution"], r["recipe"], r["options"], r["error"], "", "", ""])
            continue
        calls = r["calls_per_step"]
        encoders = "/".join(f"{calls[k]:g}" for k in calls if k.startswith("text_encoder"))
        rows.append(
            [
                r["model"], r["resolution"], r["recipe"], r["options"],
                f"{r['median_step_s'] * 1e3:.1f}", format_bytes(r["peak_memory_bytes"]),
                f"{calls['vae_encode']:g} / {encoders} / {calls['denoiser_adapted']:g} / {calls['denoiser_reference']:g}",
                "-" if r["share_of_bf16_peak"] is None else f"{100 * r['share_of_bf16_peak']:.1f}%",
            ]
        )
    print_table(["model", "px", "recipe", "options", "step ms", "peak memory", "calls/step VAE / TEs / adapted / ref", "bf16 peak"], rows)
    if report["comparisons"]:
        print("\nours / official (same models, data, seeds and options)")
        print_table(
            ["model", "px", "options", "ours ms", "official ms", "time ratio", "(of fastest steps)", "caching bound", "memory ratio", "resident params ratio"],
            [
                [c["model"], c["resolution"], c["options"], f"{c['ours_step_s'] * 1e3:.1f}", f"{c['official_step_s'] * 1e3:.1f}",
                 format_ratio(c["step_time_ratio"]), format_ratio(c["min_step_time_ratio"]), format_ratio(c["best_ratio_from_caching"]),
                 format_ratio(c["peak_memory_ratio"]), format_ratio(c["resident_parameter_ratio"])]
                for c in report["comparisons"]
            ],
        )
    if report["pair_generation"]:
        print("\npair generation (images/s, unsafe + safe)")
        print_table(
            ["model", "px", "pairs", "steps", "batched", "one at a time", "speed-up"],
            [
                [g["model"], g["resolution"], g["pairs"], g["num_inference_steps"], f"{g['batched_images_per_s']:.2f}",
                 f"{g['one_at_a_time_images_per_s']:.2f}", f"{g['batched_speedup']:.2f}x"]
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--suite", choices=["cpu", "gpu", "flops"], default="cpu",
        help="cpu: tiny models, ours vs official; gpu: full-size models, every memory option; "
        "flops: FLOPs per step of the full-size models, counted on the meta device (any machine)",
    )
    parser.add_argument("--device", default=None, help="default: cpu for --suite cpu, cuda for --suite gpu")
    parser.add_argument("--tiny", action="store_true", help="--suite gpu with tiny models (a dry run of the GPU cases, e.g. on CPU)")
    parser.add_argument("--models", nargs="+", default=None, help="default: sd14 sd3-medium (gpu) / tiny-sd tiny-sd3 (cpu)")
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: bf16 on a GPU, no on a CPU")
    parser.add_argument("--warmup_steps", type=int, default=None, help="steps before timing (default 2)")
    parser.add_argument("--measure_steps", type=int, default=None, help="timed steps per case; the median is reported (default 10 cpu, 8 gpu)")
    parser.add_argument(
        "--resolutions", type=int, nargs=2, default=None, metavar=("NATIVE", "OTHER"),
        help="override the resolutions (default: 512 1024 for sd14, 1024 512 for sd3-medium, 32 64 for tiny models)",
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs of every case, interleaved; step times are pooled (default 6 cpu, 1 gpu)")
    parser.add_argument("--num_pairs", type=int, default=4, help="pairs in the synthetic pair set")
    parser.add_argument("--generation_pairs", type=int, default=4, help="pairs generated in the throughput test")
    parser.add_argument("--generation_steps", type=int, default=10, help="denoising steps per image in the throughput test")
    parser.add_argument("--skip_generation", action="store_true", help="do not measure pair generation")
    parser.add_argument("--time_budget_s", type=float, default=None, help="skip the cases left once this many seconds have passed (default 420 for gpu)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the card's dense bf16 peak in TFLOP/s, if its name is not in the table")
    parser.add_argument("--num_threads", type=int, default=None, help="torch CPU threads (default 1 on a CPU device, torch's choice otherwise)")
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/<suite>-<date>.json)")
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
        raise UsageError("--device cuda but no CUDA device is visible: run on a GPU machine, or add --tiny --device cpu for a dry run")
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
        "command": " ".join([os.path.relpath(sys.argv[0], REPO_ROOT) if sys.argv and sys.argv[0] else "benchmark_step.py"] + (argv if argv is not None else sys.argv[1:])),
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
    output = args.output or str(BENCHMARKS_DIR / "results" / f"{report['suite']}-{report['date']}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    with open(output, "w") as f:
        json.dump(report, f, indent=2, default=str)
        f.write("\n")
    (print_flops_report if args.suite == "flops" else print_report)(report)
    print(f"\nwrote {output}")
    return report


if __name__ == "__main__":
    main()
