"""train_duo.py end to end on a tiny pipeline: ``main()`` in process, and two processes through ``accelerate launch``."""

import glob
import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import DDP_CHECKPOINT_FILES, run_script, sample_red_square, tiny_train_args, train_in_process
from safetensors.torch import load_file


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
        tiny_sd,
        tiny_pairs,
        output_dir,
        "--concept",
        "nudity",
        "--checkpointing_steps",
        "1",
        "--checkpoints_total_limit",
        "2",
        "--preservation_weight",
        "0",
        "--learning_rate",
        "1e-3",
        "--validation_steps",
        "2",
    )
    train_in_process("train_duo.py", args)
    return output_dir


def test_artifacts(trained, tiny_sd):
    for name in ("pytorch_lora_weights.safetensors", "duo_config.json", "README.md"):
        assert (trained / name).is_file(), name
    # The weights get the mode of the other outputs (safetensors alone would leave them 0600).
    modes = {
        name: (trained / name).stat().st_mode & 0o777
        for name in ("pytorch_lora_weights.safetensors", "duo_config.json")
    }
    assert len(set(modes.values())) == 1, modes
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
    assert "license: creativeml-openrail-m" in card
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
        assert {
            "loss",
            "loss_duo",
            "loss_pres",
            "delta_safe",
            "delta_unsafe",
            "implicit_acc",
            "lr",
            "margin",
            "saturated_share",
            "unsafe_error_change",
        } <= set(row)
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
    base = sample_red_square(pipe)
    pipe.load_lora_weights(str(trained))
    adapted = sample_red_square(pipe)
    assert np.abs(adapted - base).max() > 1e-3


def test_learns_to_prefer_the_safe_image(tiny_sd, tiny_pairs, tmp_path):
    """Without preservation, tens of steps make the adapter denoise safe images better than unsafe ones."""
    output_dir = tmp_path / "out"
    args = tiny_train_args(
        tiny_sd,
        tiny_pairs,
        output_dir,
        "--max_train_steps",
        "80",
        "--train_batch_size",
        "4",
        "--preservation_weight",
        "0",
        "--learning_rate",
        "3e-3",
        "--beta_dpo",
        "500",
        "--skip_validation",
        "--checkpointing_steps",
        "1000",
    )
    train_in_process("train_duo.py", args)
    rows = read_metrics(output_dir)
    early, late = rows[:10], rows[-20:]
    late_loss = np.mean([r["loss_duo"] for r in late])
    assert late_loss < math.log(2) - 0.1
    assert late_loss < np.mean([r["loss_duo"] for r in early])
    assert np.mean([r["delta_safe"] - r["delta_unsafe"] for r in late]) < 0
    assert np.mean([r["implicit_acc"] for r in late]) > 0.65


def test_resume_reproduces_the_uninterrupted_run(tiny_sd_v, tiny_pairs, tmp_path, capsys):
    """Also covers v-prediction and a warm-up schedule, whose state must be restored too."""
    common = (
        "--max_train_steps",
        "6",
        "--checkpointing_steps",
        "3",
        "--preservation_weight",
        "1",
        "--learning_rate",
        "1e-3",
        "--lr_scheduler",
        "cosine",
        "--lr_warmup_steps",
        "2",
        "--skip_validation",
        "--random_flip",
        "--gradient_accumulation_steps",
        "2",
        "--train_batch_size",
        "1",
    )
    full = tmp_path / "full"
    train_in_process("train_duo.py", tiny_train_args(tiny_sd_v, tiny_pairs, full, *common))

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    # A save that crashed half-way must never be picked as "latest".
    (resumed / "checkpoint-5.tmp").mkdir()
    train_in_process(
        "train_duo.py", tiny_train_args(tiny_sd_v, tiny_pairs, resumed, *common, "--resume_from_checkpoint", "latest")
    )
    out = capsys.readouterr().out
    assert "Resuming from" in out and "checkpoint-3" in out

    expected = load_file(full / "pytorch_lora_weights.safetensors")
    actual = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0)
    assert [r["step"] for r in read_metrics(resumed)] == [4, 5, 6]
    assert read_metrics(resumed)[-1]["loss"] == pytest.approx(read_metrics(full)[-1]["loss"], rel=1e-5)


@pytest.mark.slow
def test_two_processes_complete_and_only_rank_zero_writes(tiny_sd, tiny_pairs, tmp_path):
    output_dir = tmp_path / "ddp"
    args = tiny_train_args(
        tiny_sd, tiny_pairs, output_dir, "--train_batch_size", "1", "--checkpointing_steps", "2", "--skip_validation"
    )
    result = run_script("train_duo.py", args, num_processes=2)
    assert_ok(result)
    log = result.stdout + result.stderr
    assert log.count("Saved the DUO adapter") == 1
    assert [r["step"] for r in read_metrics(output_dir)] == [1, 2, 3, 4]
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file()
    assert sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint")) == ["checkpoint-2"]
    # accelerate keeps one RNG file per process; everything else is written once, by rank 0.
    assert sorted(os.listdir(output_dir / "checkpoint-2")) == DDP_CHECKPOINT_FILES


def test_nan_loss_stops_with_the_last_good_checkpoint(tiny_sd, tiny_pairs, tmp_path, capsys):
    output_dir = tmp_path / "nan"
    args = tiny_train_args(
        tiny_sd,
        tiny_pairs,
        output_dir,
        "--learning_rate",
        "1e30",
        "--preservation_weight",
        "0",
        "--checkpointing_steps",
        "1",
        "--skip_validation",
    )
    with pytest.raises(SystemExit) as exit_info:
        train_in_process("train_duo.py", args)
    assert exit_info.value.code == 1
    # In process the progress bar's last line has no newline yet; the message follows it.
    error_lines = [line[line.index("error:") :] for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1
    assert "non-finite" in error_lines[0] and "checkpoint-1" in error_lines[0] and "--learning_rate" in error_lines[0]
    assert (output_dir / "checkpoint-1" / "pytorch_lora_weights.safetensors").is_file()
    assert not (output_dir / "pytorch_lora_weights.safetensors").exists()


def test_bf16_keeps_lora_parameters_fp32(tiny_sd, tiny_pairs, tmp_path):
    output_dir = tmp_path / "bf16"
    args = tiny_train_args(tiny_sd, tiny_pairs, output_dir, "--max_train_steps", "2", "--mixed_precision", "bf16")
    train_in_process("train_duo.py", args)
    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert (output_dir / "validation" / "step-000002.png").is_file()


def read_tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # The run's scalars are in the project folder itself (its hyper-parameters in a subfolder).
    assert glob.glob(os.path.join(log_dir, "events.out.tfevents.*"))
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_default_tensorboard_prompt_conditioning_and_all_attention(tiny_sd, tiny_pairs, tmp_path):
    """--report_to tensorboard (the default) logs what metrics.jsonl holds; --condition_on_prompts and
    --lora_target attn train and are recorded; attn adapts the cross-attention too."""
    output_dir = tmp_path / "out"
    args = tiny_train_args(
        tiny_sd,
        tiny_pairs,
        output_dir,
        "--max_train_steps",
        "2",
        "--skip_validation",
        "--report_to",
        "tensorboard",
        "--tracker_name",
        "my-run",
        "--condition_on_prompts",
        "--lora_layers",
        "attn",
    )
    train_in_process("train_duo.py", args)
    rows = read_metrics(output_dir)
    scalars = read_tensorboard_scalars(output_dir / "logs" / "my-run")
    for key in ("loss", "loss_duo", "implicit_acc", "lr"):
        assert [step for step, _ in scalars[key]] == [1, 2]
        assert [value for _, value in scalars[key]] == pytest.approx([row[key] for row in rows], rel=1e-6)
    config = json.loads((output_dir / "duo_config.json").read_text())
    assert config["condition_on_prompts"] is True and config["lora_target"] == "attn"
    keys = list(load_file(output_dir / "pytorch_lora_weights.safetensors"))
    assert any(".attn1." in key for key in keys) and any(".attn2." in key for key in keys)


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="fp16 mixed precision needs a GPU: accelerate refuses it on CPU (see test_bad_inputs)",
)
def test_fp16_on_a_gpu_trains_and_keeps_lora_parameters_fp32(tiny_sd, tiny_pairs, tmp_path):
    output_dir = tmp_path / "fp16"
    train_in_process(
        "train_duo.py",
        tiny_train_args(
            tiny_sd, tiny_pairs, output_dir, "--max_train_steps", "2", "--mixed_precision", "fp16", "--skip_validation"
        ),
    )
    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert {tensor.dtype for tensor in weights.values()} == {torch.float32}
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert all(math.isfinite(row["loss"]) for row in read_metrics(output_dir))


def test_batch_conditions_pairs_on_their_prompts_and_preservation_on_the_empty_prompt():
    """make_duo_batch: both images of pair i get pair i's condition; the pure-noise rows the empty prompt, at the last timestep."""
    from diffusers import DDPMScheduler

    from duo_plugin import data
    from duo_plugin.families import sd

    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 2, 2, 4, 4, generator=generator)  # pairs, flips, (unsafe, safe), latent
    latents = data.CachedPairLatents(mean=mean, std=torch.zeros_like(mean), scaling_factor=1.0)
    empty = torch.zeros(1, 5, 8)
    prompts = torch.arange(3 * 5 * 8, dtype=torch.float32).reshape(3, 5, 8)
    indices = torch.tensor([2, 0])
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    batch = sd.make_duo_batch(
        latents, indices, torch.Generator().manual_seed(1), scheduler, 0, 750, empty, prompts[indices]
    )
    torch.testing.assert_close(
        batch.condition, torch.cat([prompts[indices], prompts[indices], empty.expand(2, -1, -1)])
    )
    assert batch.timesteps[:2].tolist() == batch.timesteps[2:4].tolist() and batch.timesteps[4:].tolist() == [999, 999]
    unconditioned = sd.make_duo_batch(latents, indices, torch.Generator().manual_seed(1), scheduler, 0, 750, empty)
    torch.testing.assert_close(unconditioned.condition, empty.expand(6, -1, -1))
    torch.testing.assert_close(unconditioned.model_input, batch.model_input)  # the condition changes no draw


def test_upstream_flag_names_and_their_old_spellings():
    import train_duo

    upstream = train_duo.parse_args(
        ["--validation_prompt", "a", "b", "--lora_layers", "attn", "--lr_num_cycles", "3", "--lr_power", "2"]
    )
    old = train_duo.parse_args(["--validation_prompts", "a", "b", "--lora_target", "attn"])
    assert upstream.validation_prompts == old.validation_prompts == ["a", "b"]
    assert upstream.lora_target == old.lora_target == "attn"
    assert (upstream.lr_num_cycles, upstream.lr_power) == (3, 2.0)


def test_state_hooks_refuse_a_model_they_were_not_given(fresh_accelerate_state, tmp_path):
    """The save/load hooks check which model accelerate hands them: only the adapted denoiser."""
    from accelerate import Accelerator

    from duo_plugin import checkpoints

    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 2)
    saved = []
    checkpoints.register_adapter_state_hooks(
        accelerator, model, lambda out, state, m: saved.append(out), lora_prefix="unet"
    )
    (save_hook,) = accelerator._save_model_state_pre_hook.values()
    (load_hook,) = accelerator._load_model_state_pre_hook.values()
    with pytest.raises(ValueError, match="unexpected model.*Conv1d"):
        save_hook([torch.nn.Conv1d(1, 1, 1)], [{}], str(tmp_path))
    with pytest.raises(ValueError, match="unexpected model.*Conv1d"):
        load_hook([torch.nn.Conv1d(1, 1, 1)], str(tmp_path))
    assert saved == []


def test_batch_runs_pairs_under_each_condition_then_noise_then_retain():
    from diffusers import DDPMScheduler

    from duo_plugin import data, objective
    from duo_plugin.families import sd

    generator = torch.Generator().manual_seed(0)
    mean = torch.randn(3, 1, 2, 4, 4, 4, generator=generator)
    latents = data.CachedPairLatents(mean=mean, std=torch.zeros_like(mean), scaling_factor=1.0)
    empty = torch.zeros(1, 5, 8)
    prompts = torch.ones(3, 5, 8)
    retain = sd.RetainLatents(latents=torch.randn(4, 4, 4, 4, generator=generator), embeddings=2 * torch.ones(4, 5, 8))
    indices = torch.tensor([2, 0])
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    paper = sd.make_duo_batch(latents, indices, torch.Generator().manual_seed(1), scheduler, 0, 750, empty)
    batch = sd.make_duo_batch(
        latents,
        indices,
        torch.Generator().manual_seed(1),
        scheduler,
        0,
        750,
        empty,
        prompts[indices],
        pair_conditions=("empty", "prompt"),
        retain=retain,
        retain_conditions=("empty", "prompt"),
    )
    assert batch.layout == objective.BatchLayout(2, ("empty", "prompt"), 2, ("empty", "prompt"))
    torch.testing.assert_close(batch.model_input[:4], paper.model_input[:4])
    torch.testing.assert_close(batch.model_input[4:8], paper.model_input[:4])
    torch.testing.assert_close(batch.model_input[8:10], paper.model_input[4:6])  # pure noise, as the paper's
    assert batch.condition[:4].eq(0).all() and batch.condition[4:8].eq(1).all() and batch.condition[8:10].eq(0).all()
    assert batch.condition[10:12].eq(0).all() and batch.condition[12:14].eq(2).all()
    torch.testing.assert_close(batch.model_input[10:12], batch.model_input[12:14])
    assert (batch.timesteps[10:] < 750).all() and batch.timesteps[8:10].tolist() == [999, 999]


def test_a_batch_built_without_a_layout_is_the_papers():
    from duo_plugin import objective
    from duo_plugin.families import sd

    batch = sd.DUOBatch(
        model_input=torch.zeros(6, 4, 2, 2),
        timesteps=torch.zeros(6),
        condition=torch.zeros(6, 3, 8),
        target=torch.zeros(4, 4, 2, 2),
    )
    assert batch.layout == objective.BatchLayout(2)
