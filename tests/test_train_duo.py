"""train_duo.py end to end, as a user runs it: `accelerate launch train_duo.py ...` on a tiny pipeline."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import run_script, tiny_train_args

pytestmark = pytest.mark.slow


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_ok(result):
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def trained(tiny_sd, tiny_pairs, tmp_path_factory):
    """One full run: LoRA on self-attention, checkpoints every step with a limit of 2, validation on."""
    output_dir = tmp_path_factory.mktemp("trained") / "out"
    args = tiny_train_args(
        tiny_sd, tiny_pairs, output_dir,
        "--concept", "nudity",
        "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2",
        "--preservation_weight", "0",
        "--learning_rate", "1e-3",
        "--validation_steps", "2",
    )
    result = run_script("train_duo.py", args)
    assert_ok(result)
    return output_dir


def test_artifacts(trained, tiny_sd):
    for name in ("pytorch_lora_weights.safetensors", "duo_config.json", "README.md"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "duo_config.json").read_text())
    assert config["base_model"] == tiny_sd
    assert config["concept"] == "nudity"
    assert config["architecture"]["family"] == "sd"
    assert config["architecture"]["pipeline_class"] == "StableDiffusionPipeline"
    assert config["beta_dpo"] == 500.0 and config["preservation_weight"] == 0.0
    assert config["lora_target"] == "self_attn" and config["rank"] == 4
    assert config["t_min"] == 0 and config["t_max"] == 750 and config["seed"] == 42
    assert "torch" in config["library_versions"]
    card = (trained / "README.md").read_text()
    for tag in ("diffusers", "lora", "duo", "concept-erasure", "text-to-image"):
        assert f"- {tag}" in card
    assert f"base_model: {tiny_sd}" in card
    assert "load_lora_weights" in card
    # The card shows only images of unrelated prompts.
    assert "lighthouse" in card and "naked" not in card.split("## Samples")[1]
    assert sorted(os.listdir(trained / "validation")) == ["step-000002.png", "step-000004.png"]
    # The card reports how far the preference loss had saturated, from the logged steps.
    assert "## Saturation of the preference loss" in card and "Mean over the last 4 steps: margin" in card


def test_logs_every_step(trained):
    rows = read_metrics(trained)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert {"loss", "loss_duo", "loss_pres", "delta_safe", "delta_unsafe", "implicit_acc", "lr", "margin", "saturated_share", "unsafe_error_change"} <= set(row)
        assert row["lr"] == pytest.approx(1e-3)
    # The adapter starts as the identity (LoRA B = 0): the first step's preference loss is exactly ln 2.
    assert rows[0]["loss_duo"] == pytest.approx(math.log(2), abs=1e-6)
    assert rows[0]["margin"] == pytest.approx(0.0, abs=1e-6) and rows[0]["saturated_share"] == 0.0


def test_only_self_attention_is_adapted(trained):
    keys = list(load_file(trained / "pytorch_lora_weights.safetensors"))
    assert keys and all(key.startswith("unet.") for key in keys)
    assert all(".attn1." in key for key in keys)
    assert {key.split(".attn1.")[1].rsplit(".lora", 1)[0] for key in keys} == {"to_q", "to_k", "to_v", "to_out.0"}


def test_rotation_keeps_newest_checkpoints(trained):
    names = sorted(name for name in os.listdir(trained) if name.startswith("checkpoint"))
    assert names == ["checkpoint-2", "checkpoint-3"]
    assert (trained / "checkpoint-3" / "pytorch_lora_weights.safetensors").is_file()
    assert not any(name.endswith(".bin") and "model" in name for name in os.listdir(trained / "checkpoint-3"))


def test_stock_diffusers_loads_the_adapter_and_outputs_change(trained, tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)

    def sample():
        return pipe("a red square", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images

    base = sample()
    pipe.load_lora_weights(str(trained))
    adapted = sample()
    assert np.abs(adapted - base).max() > 1e-3


def test_learns_to_prefer_the_safe_image(tiny_sd, tiny_pairs, tmp_path):
    """Without preservation, tens of steps make the adapter denoise safe images better than unsafe ones."""
    output_dir = tmp_path / "out"
    args = tiny_train_args(
        tiny_sd, tiny_pairs, output_dir,
        "--max_train_steps", "80", "--train_batch_size", "4", "--preservation_weight", "0",
        "--learning_rate", "3e-3", "--beta_dpo", "500", "--skip_validation", "--checkpointing_steps", "1000",
    )
    assert_ok(run_script("train_duo.py", args))
    rows = read_metrics(output_dir)
    early, late = rows[:10], rows[-20:]
    late_loss = np.mean([r["loss_duo"] for r in late])
    assert late_loss < math.log(2) - 0.1
    assert late_loss < np.mean([r["loss_duo"] for r in early])
    assert np.mean([r["delta_safe"] - r["delta_unsafe"] for r in late]) < 0
    assert np.mean([r["implicit_acc"] for r in late]) > 0.65


def test_resume_reproduces_the_uninterrupted_run(tiny_sd_v, tiny_pairs, tmp_path):
    """Also covers v-prediction and a warm-up schedule, whose state must be restored too."""
    common = (
        "--max_train_steps", "6", "--checkpointing_steps", "3", "--preservation_weight", "1",
        "--learning_rate", "1e-3", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
        "--skip_validation", "--random_flip", "--gradient_accumulation_steps", "2", "--train_batch_size", "1",
    )
    full = tmp_path / "full"
    assert_ok(run_script("train_duo.py", tiny_train_args(tiny_sd_v, tiny_pairs, full, *common)))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    # A save that crashed half-way must never be picked as "latest".
    (resumed / "checkpoint-5.tmp").mkdir()
    result = run_script("train_duo.py", tiny_train_args(tiny_sd_v, tiny_pairs, resumed, *common, "--resume_from_checkpoint", "latest"))
    assert_ok(result)
    assert "Resuming from" in result.stdout + result.stderr and "checkpoint-3" in result.stdout + result.stderr

    expected = load_file(full / "pytorch_lora_weights.safetensors")
    actual = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0)
    assert [r["step"] for r in read_metrics(resumed)] == [4, 5, 6]
    assert read_metrics(resumed)[-1]["loss"] == pytest.approx(read_metrics(full)[-1]["loss"], rel=1e-5)


def test_two_processes_complete_and_only_rank_zero_writes(tiny_sd, tiny_pairs, tmp_path):
    output_dir = tmp_path / "ddp"
    args = tiny_train_args(tiny_sd, tiny_pairs, output_dir, "--train_batch_size", "1", "--checkpointing_steps", "2", "--skip_validation")
    result = run_script("train_duo.py", args, num_processes=2)
    assert_ok(result)
    log = result.stdout + result.stderr
    assert log.count("Saved the DUO adapter") == 1
    assert [r["step"] for r in read_metrics(output_dir)] == [1, 2, 3, 4]
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint")) == ["checkpoint-2"]
    # accelerate keeps one RNG file per process; everything else is written once, by rank 0.
    assert sorted(os.listdir(output_dir / "checkpoint-2")) == [
        "optimizer.bin", "pytorch_lora_weights.safetensors", "random_states_0.pkl", "random_states_1.pkl", "scheduler.bin",
    ]


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_sd, tiny_pairs, tmp_path):
    output_dir = tmp_path / "nan"
    args = tiny_train_args(
        tiny_sd, tiny_pairs, output_dir, "--learning_rate", "1e30", "--preservation_weight", "0",
        "--checkpointing_steps", "1", "--skip_validation",
    )
    result = run_script("train_duo.py", args, accelerate=False)
    assert result.returncode == 1
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1
    assert "non-finite" in error_lines[0] and "checkpoint-1" in error_lines[0] and "--learning_rate" in error_lines[0]
    assert (output_dir / "checkpoint-1" / "pytorch_lora_weights.safetensors").is_file()
    assert not (output_dir / "pytorch_lora_weights.safetensors").exists()


def test_bf16_keeps_lora_parameters_fp32(tiny_sd, tiny_pairs, tmp_path):
    output_dir = tmp_path / "bf16"
    args = tiny_train_args(tiny_sd, tiny_pairs, output_dir, "--max_train_steps", "2", "--mixed_precision", "bf16")
    assert_ok(run_script("train_duo.py", args, accelerate=False))
    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert (output_dir / "validation" / "step-000002.png").is_file()
