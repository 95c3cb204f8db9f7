"""benchmarks/benchmark_step.py: the CPU benchmark and the GPU suite's dry run write the report they promise.

Speed is not asserted here (that is what the benchmark reports); the tests check that both recipes do
the work they are defined by (calls per step, identical denoiser FLOPs), that the report has its
fields, and the small pure functions behind the ratios and the targets.
"""

import importlib.util
import json
import os
import sys

import pytest
import torch
from conftest import REPO_ROOT, run_process


SCRIPT = os.path.join(REPO_ROOT, "benchmarks", "benchmark_step.py")


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_benchmark(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return run_process([sys.executable, SCRIPT, *args], env=env)


def rows_by(report, **match):
    return [r for r in report["results"] if all(r.get(k) == v for k, v in match.items())]


# --------------------------------------------------------------------------------------------------
# End to end
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cpu_report(tmp_path_factory):
    """One CPU benchmark run as a user runs it, with 1 warm-up and 2 timed steps."""
    output = tmp_path_factory.mktemp("bench") / "cpu.json"
    result = run_benchmark(
        "--warmup_steps",
        "1",
        "--measure_steps",
        "2",
        "--repeats",
        "1",
        "--generation_pairs",
        "2",
        "--generation_steps",
        "2",
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ours / official" in result.stdout and "targets" in result.stdout
    return json.loads(output.read_text())


@pytest.mark.slow
def test_cpu_report_fields(cpu_report):
    assert cpu_report["suite"] == "cpu"
    assert cpu_report["gpu_measured"] is False
    assert any("GPU numbers have not been measured" in note for note in cpu_report["notes"])
    for key in ("cpu", "logical_cpus", "platform", "device"):
        assert key in cpu_report["machine"]
    assert cpu_report["machine"]["device"] == "cpu"
    assert cpu_report["versions"]["torch"] == torch.__version__
    assert cpu_report["settings"]["measure_steps"] == 2
    for row in cpu_report["results"]:
        assert len(row["step_times_s"]) == 2
        assert row["interleaved_with"] == ["official" if row["recipe"] == "ours" else "ours"]
        assert row["median_step_s"] > 0 and row["peak_memory_bytes"] > 0
        assert row["step_flops"] >= row["denoiser_flops"] > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "model, encoders",
    [("tiny-sd", ["text_encoder"]), ("tiny-sd3", ["text_encoder", "text_encoder_2", "text_encoder_3"])],
)
def test_calls_per_step(cpu_report, model, encoders):
    """Ours calls no VAE and no text encoder after warm-up; the official step calls each once; both run
    the adapted and the reference model once over the concatenated batch."""
    (ours,) = rows_by(cpu_report, model=model, recipe="ours")
    (official,) = rows_by(cpu_report, model=model, recipe="official")
    assert ours["calls_per_step"] == {
        "vae_encode": 0,
        "vae_decode": 0,
        **dict.fromkeys(encoders, 0),
        "denoiser_adapted": 1,
        "denoiser_reference": 1,
    }
    assert official["calls_per_step"] == {
        "vae_encode": 1,
        "vae_decode": 0,
        **dict.fromkeys(encoders, 1),
        "denoiser_adapted": 1,
        "denoiser_reference": 1,
    }
    # The same denoiser work in both recipes; the official step adds the encoders' FLOPs.
    assert ours["denoiser_flops"] == official["denoiser_flops"]
    assert official["step_flops"] > ours["step_flops"]
    assert official["resident_parameter_bytes"] > ours["resident_parameter_bytes"]
    assert {"VAE encode", "text encode"} <= set(official["phase_s_per_step"])


@pytest.mark.slow
def test_cpu_comparisons_and_targets(cpu_report):
    comparisons = {c["model"]: c for c in cpu_report["comparisons"]}
    assert set(comparisons) == {"tiny-sd", "tiny-sd3"}
    for c in comparisons.values():
        assert c["step_time_ratio"] == pytest.approx(c["ours_step_s"] / c["official_step_s"])
        assert c["peak_memory_ratio"] > 0 and 0 < c["best_ratio_from_caching"] < 1
    targets = {t["target"]: t for t in cpu_report["targets"]}
    assert targets["ours: zero VAE and text-encoder calls per step after warm-up"]["met"] is True
    memory_targets = [t for t in cpu_report["targets"] if "peak accelerator memory" in t["target"]]
    assert len(memory_targets) == 2 and all(t["met"] is None for t in memory_targets)
    (generation,) = cpu_report["pair_generation"]
    assert generation["pairs"] == 2
    assert generation["batched_images_per_s"] > 0 and generation["one_at_a_time_images_per_s"] > 0


@pytest.mark.slow
def test_gpu_suite_dry_run_on_cpu(tmp_path):
    """The GPU suite's cases (each memory option on and off, two resolutions) run on tiny models."""
    output = tmp_path / "gpu-tiny.json"
    result = run_benchmark(
        "--suite",
        "gpu",
        "--tiny",
        "--device",
        "cpu",
        "--models",
        "tiny-sd",
        "--warmup_steps",
        "0",
        "--measure_steps",
        "1",
        "--skip_generation",
        "--output",
        str(output),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(output.read_text())
    assert report["suite"] == "gpu-tiny" and report["gpu_measured"] is False
    on = "gc,adam8bit,sdpa" if importlib.util.find_spec("bitsandbytes") else "gc,adamw,sdpa"
    options = {(r["recipe"], r["resolution"], r["options"]) for r in report["results"]}
    assert ("ours", 32, on) in options and ("official", 32, on) in options
    assert ("ours", 32, "no-gc,adamw,sdpa") in options and ("official", 32, "no-gc,adamw,sdpa") in options
    assert ("ours", 32, on.replace("gc,", "no-gc,", 1)) in options  # gradient checkpointing off alone
    assert ("ours", 32, on + ",encoders-resident") in options
    assert ("ours", 64, on) in options and ("official", 64, on) in options
    assert all(r["memory_options_on"] == (r["recipe"] == "ours" and r["options"] == on) for r in report["results"])
    (freed,) = rows_by(report, recipe="ours", resolution=32, options=on)
    (resident,) = rows_by(report, recipe="ours", resolution=32, options=on + ",encoders-resident")
    assert resident["resident_parameter_bytes"] > freed["resident_parameter_bytes"]
    assert resident["calls_per_step"]["vae_encode"] == 0 and resident["calls_per_step"]["text_encoder"] == 0
    assert len(report["comparisons"]) == 3


def test_refusals(bench, capsys):
    def refusal(*argv):
        with pytest.raises(SystemExit) as exit_info:
            bench.main(list(argv))
        assert exit_info.value.code == 2
        return capsys.readouterr().err

    assert "--measure_steps must be at least 1" in refusal("--measure_steps", "0")
    assert "--tiny only applies to --suite gpu" in refusal("--tiny")
    if not torch.cuda.is_available():
        assert "no CUDA device" in refusal("--suite", "gpu")


# --------------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------------


def test_full_size_models_match_the_published_sizes(bench):
    """The stored configs build SD1.4 and SD3-medium with their published parameter counts (on the meta
    device: nothing is allocated)."""

    def count(module):
        return sum(p.numel() for p in module.parameters())

    sd14 = bench.full_size_bundle("sd14", torch.device("meta"), torch.float16)
    assert count(sd14.denoiser) == 859_520_964
    assert count(sd14.text_encoders["text_encoder"]) == 123_060_480
    assert sd14.vae.config.scaling_factor == 0.18215 and sd14.native_resolution == 512
    sd3 = bench.full_size_bundle("sd3-medium", torch.device("meta"), torch.bfloat16)
    assert count(sd3.denoiser) == 2_028_328_000
    assert count(sd3.text_encoders["text_encoder_3"]) == 4_762_310_656
    assert count(sd3.text_encoders["text_encoder_2"]) == 694_659_840
    assert sd3.vae.config.shift_factor == 0.0609 and sd3.noise_scheduler.config.shift == 3.0
    assert (
        next(sd3.denoiser.parameters()).dtype == torch.bfloat16 and next(sd3.vae.parameters()).dtype == torch.float32
    )


def test_full_size_step_flops_add_up(bench):
    """The FLOP suite's bookkeeping, on SD1.4 at 64 px (meta device: seconds, no memory)."""
    row = bench.full_size_step_flops("sd14", 64)
    assert row["denoiser_forward_flops"] > 0 and row["denoiser_backward_flops"] > 0 and row["vae_encode_flops"] > 0
    assert row["ours_step_flops"] == 2 * row["denoiser_forward_flops"] + row["denoiser_backward_flops"]
    assert (
        row["official_step_flops"]
        == row["ours_step_flops"] + row["vae_encode_flops"] + row["text_encode_flops"]["text_encoder"]
    )
    assert row["flop_ratio"] == pytest.approx(row["ours_step_flops"] / row["official_step_flops"])
    assert row["flop_ratio"] < row["flop_ratio_with_gradient_checkpointing"] < 1
    assert row["ours_resident_parameter_bytes"] == 859_520_964 * 2  # bf16 UNet
    assert row["official_resident_parameter_bytes"] > row["ours_resident_parameter_bytes"]


def test_call_counter_tells_adapted_from_reference(bench):
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from duo_plugin import lora

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        block_out_channels=(16,),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=8,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(block_out_channels=(8,), norm_num_groups=4, latent_channels=4)
    lora.add_duo_adapter(unet, 2, 2, lora.lora_target_modules(unet, "attn"))
    text_encoder = torch.nn.Linear(2, 2)
    counter = bench.CallCounter(vae, {"text_encoder": text_encoder}, unet)
    inputs = (torch.randn(1, 4, 8, 8), torch.tensor([1]), torch.randn(1, 3, 8))
    with torch.no_grad():
        unet(*inputs)
        with lora.adapters_disabled(unet):
            unet(*inputs)
            unet(*inputs)
        vae.encode(torch.randn(1, 3, 8, 8))
    assert counter.per_step(1) == {
        "vae_encode": 1,
        "vae_decode": 0,
        "text_encoder": 0,
        "denoiser_adapted": 1,
        "denoiser_reference": 2,
    }
    counter.reset()
    assert counter.per_step(1)["denoiser_reference"] == 0
    counter.remove()
    unet(*inputs)
    assert counter.per_step(1)["denoiser_adapted"] == 0


def test_merge_repeats_pools_step_times(bench):
    rows = [
        {
            "step_times_s": [3.0, 1.0],
            "peak_memory_bytes": 10,
            "phase_s_per_step": {"a": 1.0},
            "calls_per_step": {"x": 1},
        },
        {
            "step_times_s": [2.0, 5.0],
            "peak_memory_bytes": 30,
            "phase_s_per_step": {"a": 3.0},
            "calls_per_step": {"x": 1},
        },
    ]
    merged = bench.merge_repeats(rows)
    assert merged["step_times_s"] == [3.0, 1.0, 2.0, 5.0]
    assert merged["median_step_s"] == 2.5 and merged["min_step_s"] == 1.0
    assert merged["peak_memory_bytes"] == 30 and merged["phase_s_per_step"] == {"a": 2.0} and merged["repeats"] == 2


def test_encoding_share(bench):
    official = {
        "phase_s_per_step": {"VAE encode": 0.2, "text encode": 0.1, "host-to-device copy": 0.1, "backward": 0.6}
    }
    assert bench.encoding_share(official) == pytest.approx(0.4)
    assert bench.encoding_share({"phase_s_per_step": {}}) is None


def test_evaluate_targets(bench):
    def row(model, resolution, recipe, peak, vae=0, options="gc,adam8bit,sdpa", on=True):
        return {
            "model": model,
            "resolution": resolution,
            "recipe": recipe,
            "options": options,
            "memory_options_on": on,
            "peak_memory_bytes": peak,
            "calls_per_step": {"vae_encode": vae, "text_encoder": 0, "denoiser_adapted": 1, "denoiser_reference": 1},
        }

    results = [row("sd14", 512, "ours", 5.5e9), row("sd3-medium", 1024, "ours", 17e9, vae=1)]
    comparisons = [
        {"model": "sd14", "resolution": 512, "options": "gc,adam8bit,sdpa", "step_time_ratio": 0.55},
        {"model": "sd3-medium", "resolution": 1024, "options": "gc,adam8bit,sdpa", "step_time_ratio": 0.8},
    ]
    targets = bench.evaluate_targets(results, comparisons, memory_targets_apply=True)
    verdicts = [(t["target"].split(" ")[0], t["met"]) for t in targets]
    assert verdicts == [
        ("ours", True),
        ("ours", False),
        ("ours:", False),
        ("sd14@512", True),
        ("sd3-medium@1024", False),
    ]
    assert targets[-1]["measured"] == pytest.approx(17.0)
    # Tiny models never decide the memory targets.
    assert all(t["met"] is None for t in bench.evaluate_targets(results, comparisons, memory_targets_apply=False)[-2:])


def test_peak_bf16_flops(bench):
    assert bench.peak_bf16_flops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4e12)
    assert bench.peak_bf16_flops("NVIDIA H100 PCIe") == pytest.approx(756.5e12)
    assert bench.peak_bf16_flops("NVIDIA H200") == pytest.approx(989.4e12)
    assert bench.peak_bf16_flops("Some Other Card") is None


def test_memory_meter_sees_an_allocation(bench):
    meter = bench.MemoryMeter(torch.device("cpu"))
    meter.reset()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    reading = meter.read()
    del block
    if meter.rss_reset:
        assert reading["peak_over_start_bytes"] >= 60 * 2**20
    assert reading["peak_memory_bytes"] >= 64 * 2**20
