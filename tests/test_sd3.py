"""train_duo_sd3.py and the flow-matching DUO objective, on a tiny SD3 pipeline built in the test."""

import argparse
import gc
import json
import math
import os
import shutil
import weakref

import numpy as np
import pytest
import torch
from conftest import DDP_CHECKPOINT_FILES, run_script, tiny_train_args, train_in_process
from safetensors.torch import load_file

from duo_plugin import arguments, data, lora, objective
from duo_plugin.families import sd3


# The tiny T5 tokenizer and CLIP encoders know 16 positions.
SD3_FLAGS = ("--max_sequence_length", "16")


def sd3_train_args(model, pairs, output_dir, *extra):
    return tiny_train_args(model, pairs, output_dir, *SD3_FLAGS, *extra)


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_ok(result):
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def train_duo_sd3():
    import train_duo_sd3

    return train_duo_sd3


@pytest.fixture(scope="module")
def tiny_sd3_without_t5(tmp_path_factory):
    from duo_plugin.testing import make_tiny_sd3_pipeline

    return make_tiny_sd3_pipeline(str(tmp_path_factory.mktemp("tiny_sd3_no_t5")), with_t5=False)


def flow_args(**overrides):
    """The flow-matching settings make_duo_batch reads, as the script's defaults."""
    values = {
        "t_min": 1,
        "t_max": 750,
        "weighting_scheme": "none",
        "logit_mean": 0.0,
        "logit_std": 1.0,
        "mode_scale": 1.29,
        "precondition_outputs": 1,
    }
    values.update(overrides)
    return argparse.Namespace(**values)


def latent_cache(num_pairs=3, channels=16, size=4, identical=False, seed=0):
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(num_pairs, 1, 2, channels, size, size, generator=generator)
    if identical:
        mean[:, :, 1] = mean[:, :, 0]
    return data.CachedPairLatents(mean=mean, std=torch.zeros_like(mean), scaling_factor=1.0)


def empty_condition(seq_len=4, dim=32, pooled_dim=32):
    generator = torch.Generator().manual_seed(1)
    return torch.randn(1, seq_len, dim, generator=generator), torch.randn(1, pooled_dim, generator=generator)


# --------------------------------------------------------------------------------------------------
# The flow-matching objective against closed forms
# --------------------------------------------------------------------------------------------------


def test_flow_matching_path_and_targets():
    latents, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sigmas = torch.tensor([0.0, 0.25, 1.0])
    noisy = objective.flow_matching_noisy(latents, noise, sigmas)
    assert torch.equal(noisy[0], latents[0])
    torch.testing.assert_close(noisy[1], 0.75 * latents[1] + 0.25 * noise[1])
    assert torch.equal(noisy[2], noise[2])
    assert torch.equal(objective.flow_matching_target(latents, noise, precondition_outputs=False), noise - latents)
    assert objective.flow_matching_target(latents, noise, precondition_outputs=True) is latents


def test_preconditioned_error_is_sigma_squared_velocity_error():
    latents, noise, velocity_prediction = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    sigmas = torch.tensor([0.1, 0.5, 0.9])
    noisy = objective.flow_matching_noisy(latents, noise, sigmas)
    # The exact velocity maps back to the clean latent.
    torch.testing.assert_close(objective.precondition_flow_matching_output(noise - latents, noisy, sigmas), latents)
    preconditioned = objective.precondition_flow_matching_output(velocity_prediction, noisy, sigmas)
    torch.testing.assert_close(
        objective.per_sample_error(preconditioned, objective.flow_matching_target(latents, noise, True)),
        sigmas**2
        * objective.per_sample_error(velocity_prediction, objective.flow_matching_target(latents, noise, False)),
    )


def test_loss_weighting_schemes():
    sigmas = torch.tensor([0.2, 0.5, 1.0])
    torch.testing.assert_close(objective.flow_matching_loss_weighting("sigma_sqrt", sigmas), sigmas**-2)
    torch.testing.assert_close(
        objective.flow_matching_loss_weighting("cosmap", sigmas), 2 / (math.pi * (1 - 2 * sigmas + 2 * sigmas**2))
    )
    for scheme in ("none", "logit_normal", "mode"):
        assert torch.equal(objective.flow_matching_loss_weighting(scheme, sigmas), torch.ones(3))


def test_sigma_table_lookup_follows_the_shifted_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    indices = torch.tensor([0, 1, 749, 999])
    sigmas, timesteps = objective.flow_matching_sigmas_and_timesteps(scheduler, indices)
    unshifted = (1000 - indices).float() / 1000  # the table descends from σ = 1
    torch.testing.assert_close(sigmas, 3 * unshifted / (1 + 2 * unshifted))
    torch.testing.assert_close(timesteps, sigmas * 1000)
    sigma, timestep = objective.pure_noise_sigma_and_timestep(scheduler)
    assert sigma.item() == 1.0 and timestep.item() == 1000.0
    scheduler.set_timesteps(4)  # a pipeline's scheduler: its table no longer is the training table
    with pytest.raises(ValueError, match="fresh"):
        objective.flow_matching_sigmas_and_timesteps(scheduler, indices)


def test_index_sampling_uniform_and_by_density():
    from diffusers.training_utils import compute_density_for_timestep_sampling

    indices = objective.sample_flow_matching_indices(20000, 1, 750, torch.Generator().manual_seed(0))
    assert indices.min().item() == 1 and indices.max().item() == 749 and len(indices.unique()) == 749
    for scheme in ("logit_normal", "mode"):
        # Over the whole table the density sampling is exactly diffusers' SD3 LoRA sampling ...
        ours = objective.sample_flow_matching_indices(5000, 0, 1000, torch.Generator().manual_seed(1), scheme)
        u = compute_density_for_timestep_sampling(
            scheme, 5000, 0.0, 1.0, 1.29, generator=torch.Generator().manual_seed(1)
        )
        assert torch.equal(ours, (u * 1000).long())
        # ... and a t range compresses it into the range.
        ranged = objective.sample_flow_matching_indices(5000, 100, 200, torch.Generator().manual_seed(1), scheme)
        assert ranged.min().item() >= 100 and ranged.max().item() < 200
    logit_normal = objective.sample_flow_matching_indices(
        20000, 0, 1000, torch.Generator().manual_seed(2), "logit_normal"
    )
    assert abs(logit_normal.float().median().item() - 500) < 15  # the logit-normal density peaks mid-table
    with pytest.raises(ValueError, match="weighting scheme"):
        objective.sample_flow_matching_indices(2, 0, 10, torch.Generator(), "uniform")


# --------------------------------------------------------------------------------------------------
# The batch: shared noise and σ per pair, pure noise at σ = 1 for preservation
# --------------------------------------------------------------------------------------------------


def test_preservation_branch_is_pure_noise_at_sigma_one(train_duo_sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    num_pairs = 3
    cache = latent_cache(num_pairs)
    batch = sd3.make_duo_batch(
        cache, torch.arange(num_pairs), torch.Generator().manual_seed(0), scheduler, flow_args(), empty_condition()
    )
    assert batch.model_input.shape[0] == 3 * num_pairs and batch.target.shape[0] == 2 * num_pairs
    # Preservation: σ = 1 and the timestep of the first sampling step (1000), not the last one (≈ 3).
    assert torch.equal(batch.sigmas[2 * num_pairs :], torch.ones(num_pairs))
    assert torch.equal(batch.timesteps[2 * num_pairs :], torch.full((num_pairs,), 1000.0))
    assert batch.timesteps[2 * num_pairs :].ne(scheduler.timesteps[-1]).all()
    # Both images of a pair share σ and ε; σ lies in the table's index range [1, 750).
    unsafe_sigmas, safe_sigmas = batch.sigmas[:num_pairs], batch.sigmas[num_pairs : 2 * num_pairs]
    assert torch.equal(unsafe_sigmas, safe_sigmas)
    assert (unsafe_sigmas <= scheduler.sigmas[1]).all() and (unsafe_sigmas > scheduler.sigmas[750]).all()
    torch.testing.assert_close(batch.timesteps[: 2 * num_pairs], batch.sigmas[: 2 * num_pairs] * 1000)
    unsafe, safe = cache.mean[:, 0, 0], cache.mean[:, 0, 1]
    sigma = unsafe_sigmas.view(-1, 1, 1, 1)
    unsafe_noise = (batch.model_input[:num_pairs] - (1 - sigma) * unsafe) / sigma
    safe_noise = (batch.model_input[num_pairs : 2 * num_pairs] - (1 - sigma) * safe) / sigma
    torch.testing.assert_close(unsafe_noise, safe_noise)
    # The preservation input does not depend on the images at all.
    other = sd3.make_duo_batch(
        latent_cache(num_pairs, seed=5),
        torch.arange(num_pairs),
        torch.Generator().manual_seed(0),
        scheduler,
        flow_args(),
        empty_condition(),
    )
    assert torch.equal(other.model_input[2 * num_pairs :], batch.model_input[2 * num_pairs :])
    # Preconditioned target: the clean latents; else the velocity ε − x.
    torch.testing.assert_close(batch.target, torch.cat([unsafe, safe]))
    velocity = sd3.make_duo_batch(
        cache,
        torch.arange(num_pairs),
        torch.Generator().manual_seed(0),
        scheduler,
        flow_args(precondition_outputs=0),
        empty_condition(),
    )
    torch.testing.assert_close(
        velocity.target, torch.cat([unsafe_noise, safe_noise]) - torch.cat([unsafe, safe]), atol=1e-5, rtol=0
    )
    # Every branch is conditioned on the empty prompt ...
    assert torch.equal(batch.prompt_embeds, empty_condition()[0].expand(3 * num_pairs, -1, -1))
    assert torch.equal(batch.pooled_prompt_embeds, empty_condition()[1].expand(3 * num_pairs, -1))
    assert torch.equal(batch.weighting, torch.ones(2 * num_pairs, 1, 1, 1))
    # ... or, with --condition_on_prompts, both images of a pair on its prompt and preservation on the empty one.
    pair_condition = (torch.randn(num_pairs, 4, 32), torch.randn(num_pairs, 32))
    conditioned = sd3.make_duo_batch(
        cache,
        torch.arange(num_pairs),
        torch.Generator().manual_seed(0),
        scheduler,
        flow_args(),
        empty_condition(),
        pair_condition,
    )
    assert torch.equal(conditioned.prompt_embeds[:num_pairs], pair_condition[0])
    assert torch.equal(conditioned.prompt_embeds[num_pairs : 2 * num_pairs], pair_condition[0])
    assert torch.equal(conditioned.pooled_prompt_embeds[2 * num_pairs :], empty_condition()[1].expand(num_pairs, -1))
    assert torch.equal(conditioned.model_input, batch.model_input)


def test_identical_pair_gives_ln2_and_zero_gradient_through_sd3(train_duo_sd3, tiny_sd3):
    """The real SD3 path (batch, reference/adapted forwards, preconditioning, σ⁻² weighting) in float64."""
    from accelerate import Accelerator
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3, subfolder="transformer").double()
    transformer.requires_grad_(False)
    lora.add_duo_adapter(transformer, rank=4, alpha=4, target_modules=lora.lora_target_modules(transformer, "attn"))
    with torch.no_grad():
        for name, parameter in transformer.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.3)  # an adapter that changes the output, so Δ ≠ 0 per image
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3, subfolder="scheduler")
    prompt_embeds = torch.randn(1, 8, transformer.config.joint_attention_dim, dtype=torch.float64)
    pooled = torch.randn(1, transformer.config.pooled_projection_dim, dtype=torch.float64)
    batch = sd3.make_duo_batch(
        latent_cache(2, size=8, identical=True),
        torch.arange(2),
        torch.Generator().manual_seed(0),
        scheduler,
        flow_args(weighting_scheme="sigma_sqrt"),
        (prompt_embeds, pooled),
    )
    batch.model_input, batch.target = batch.model_input.double(), batch.target.double()
    losses = sd3.duo_forward(
        Accelerator(cpu=True), transformer, batch, 500.0, 0.0, torch.float64, precondition_outputs=1
    )
    assert losses.delta_safe.abs().min() > 1e-6  # the adapter does matter ...
    assert losses.preference_loss.item() == pytest.approx(math.log(2), abs=1e-12)  # ... but not between twins
    losses.loss.backward()
    gradients = [p.grad for n, p in transformer.named_parameters() if "lora_" in n]
    assert gradients and all(torch.allclose(g, torch.zeros_like(g), atol=1e-10) for g in gradients)


# --------------------------------------------------------------------------------------------------
# End to end: main() in process (a subprocess adds only start-up); two processes through accelerate launch
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tiny_sd3, tiny_pairs, tmp_path_factory):
    """One full run: checkpoints every step with a limit of 2, validation every 2 steps."""
    output_dir = tmp_path_factory.mktemp("trained_sd3") / "out"
    args = sd3_train_args(
        tiny_sd3,
        tiny_pairs,
        output_dir,
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
    train_in_process("train_duo_sd3.py", args)
    return output_dir


def test_artifacts(trained, tiny_sd3):
    for name in ("pytorch_lora_weights.safetensors", "duo_config.json", "README.md"):
        assert (trained / name).is_file(), name
    config = json.loads((trained / "duo_config.json").read_text())
    assert config["base_model"] == tiny_sd3 and config["concept"] == "nudity"
    architecture = config["architecture"]
    assert architecture["family"] == "sd3" and architecture["pipeline_class"] == "StableDiffusion3Pipeline"
    assert architecture["denoiser"] == "transformer" and architecture["has_t5"] is True
    assert (
        architecture["joint_attention_dim"] == 32
        and architecture["num_layers"] == 2
        and architecture["in_channels"] == 16
    )
    assert config["beta_dpo"] == 500.0 and config["preservation_weight"] == 0.0 and config["learning_rate"] == 1e-3
    assert config["t_min"] == 1 and config["t_max"] == 750 and config["lora_target"] == "attn"
    assert (
        config["precondition_outputs"] is True
        and config["weighting_scheme"] == "none"
        and config["preservation_sigma"] == 1.0
    )
    card = (trained / "README.md").read_text()
    for tag in ("diffusers", "lora", "duo", "concept-erasure", "text-to-image"):
        assert f"- {tag}" in card
    assert "StableDiffusion3Pipeline" in card and "load_lora_weights" in card
    # SD3's licence is not creativeml-openrail-m: "other", with a pointer to the base's licence.
    assert "license: other" in card and "creativeml" not in card and f"[its licence]({tiny_sd3})" in card
    assert "lighthouse" in card and "naked" not in card.split("## Samples")[1]
    assert sorted(os.listdir(trained / "validation")) == ["step-000002.png", "step-000004.png"]
    # Rotation keeps the newest two; no checkpoint at the final step (the adapter itself is saved).
    assert sorted(n for n in os.listdir(trained) if n.startswith("checkpoint")) == ["checkpoint-2", "checkpoint-3"]


def test_logs_and_adapter_keys(trained):
    rows = read_metrics(trained)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[0]["loss_duo"] == pytest.approx(math.log(2), abs=1e-6)  # LoRA B = 0 at the start
    keys = list(load_file(trained / "pytorch_lora_weights.safetensors"))
    assert keys and all(key.startswith("transformer.transformer_blocks.") for key in keys)
    # All attention projections of every block, and nothing else (not the context projections).
    layers = {key.split(".attn.")[1].rsplit(".lora", 1)[0] for key in keys}
    assert layers == {"to_q", "to_k", "to_v", "to_out.0"}
    assert {key.split(".")[2] for key in keys} == {"0", "1"}


def test_stock_diffusers_loads_the_adapter_and_outputs_change(trained, tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3)

    def sample():
        return pipe(
            "a red square",
            num_inference_steps=3,
            height=32,
            width=32,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    base = sample()
    pipe.load_lora_weights(str(trained))
    assert np.abs(sample() - base).max() > 1e-3


def test_learns_to_prefer_the_safe_image(tiny_sd3, tiny_pairs, tmp_path):
    """Without preservation, tens of steps make the adapter denoise safe images better than unsafe ones."""
    output_dir = tmp_path / "out"
    args = sd3_train_args(
        tiny_sd3,
        tiny_pairs,
        output_dir,
        "--max_train_steps",
        "30",
        "--train_batch_size",
        "4",
        "--preservation_weight",
        "0",
        "--learning_rate",
        "3e-3",
        "--skip_validation",
        "--checkpointing_steps",
        "1000",
    )
    train_in_process("train_duo_sd3.py", args)
    rows = read_metrics(output_dir)
    early, late = rows[:10], rows[-10:]
    late_loss = np.mean([r["loss_duo"] for r in late])
    assert late_loss < math.log(2) - 0.3 and late_loss < np.mean([r["loss_duo"] for r in early])
    assert np.mean([r["delta_safe"] - r["delta_unsafe"] for r in late]) < 0
    assert np.mean([r["implicit_acc"] for r in late]) > 0.65


def test_resume_reproduces_the_uninterrupted_run(tiny_sd3, tiny_pairs, tmp_path, capsys):
    """Also covers density sampling, velocity targets, pair-prompt conditioning, accumulation and a warm-up schedule."""
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
        "--weighting_scheme",
        "logit_normal",
        "--precondition_outputs",
        "0",
        "--condition_on_prompts",
    )
    full = tmp_path / "full"
    train_in_process("train_duo_sd3.py", sd3_train_args(tiny_sd3, tiny_pairs, full, *common))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-3", resumed / "checkpoint-3")
    train_in_process(
        "train_duo_sd3.py",
        sd3_train_args(tiny_sd3, tiny_pairs, resumed, *common, "--resume_from_checkpoint", "latest"),
    )
    assert "Resuming from" in capsys.readouterr().out
    expected = load_file(full / "pytorch_lora_weights.safetensors")
    actual = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0)
    assert [r["step"] for r in read_metrics(resumed)] == [4, 5, 6]


def test_t5_less_base_with_bf16_and_gradient_checkpointing(tiny_sd3_without_t5, tiny_pairs, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    output_dir = tmp_path / "no_t5"
    args = sd3_train_args(
        tiny_sd3_without_t5,
        tiny_pairs,
        output_dir,
        "--preservation_weight",
        "0",
        "--learning_rate",
        "1e-2",
        "--mixed_precision",
        "bf16",
        "--gradient_checkpointing",
    )
    train_in_process("train_duo_sd3.py", args)
    config = json.loads((output_dir / "duo_config.json").read_text())
    assert config["architecture"]["has_t5"] is False
    assert (output_dir / "validation" / "step-000004.png").is_file()
    # fp32 LoRA weights under bf16 training.
    assert all(t.dtype == torch.float32 for t in load_file(output_dir / "pytorch_lora_weights.safetensors").values())

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_without_t5, text_encoder_3=None, tokenizer_3=None)

    def sample():
        return pipe(
            "a red square",
            num_inference_steps=3,
            height=32,
            width=32,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    base = sample()
    pipe.load_lora_weights(str(output_dir))
    assert np.abs(sample() - base).max() > 1e-3


@pytest.mark.slow
def test_two_processes_complete_and_only_rank_zero_writes(tiny_sd3, tiny_pairs, tmp_path):
    output_dir = tmp_path / "ddp"
    args = sd3_train_args(
        tiny_sd3, tiny_pairs, output_dir, "--train_batch_size", "1", "--checkpointing_steps", "2", "--skip_validation"
    )
    result = run_script("train_duo_sd3.py", args, num_processes=2)
    assert_ok(result)
    assert (result.stdout + result.stderr).count("Saved the DUO adapter") == 1
    assert [r["step"] for r in read_metrics(output_dir)] == [1, 2, 3, 4]
    assert sorted(os.listdir(output_dir / "checkpoint-2")) == DDP_CHECKPOINT_FILES


# --------------------------------------------------------------------------------------------------
# In process: the text encoders run once, then are gone; refusals
# --------------------------------------------------------------------------------------------------


def test_text_encoders_run_once_and_are_freed_before_training(
    train_duo_sd3, tiny_sd3, tiny_pairs, tmp_path, monkeypatch, fresh_accelerate_state
):
    """Every text-encoder call happens before the first transformer call, by which time the encoders are
    garbage; validation (every step here) and the final samples reuse the embeddings."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    events, encoders = [], []
    alive_at_first_transformer_call = []

    def recording(cls, name):
        original = cls.forward

        def forward(self, *args, **kwargs):
            events.append(name)
            encoders.append(weakref.ref(self))
            return original(self, *args, **kwargs)

        monkeypatch.setattr(cls, "forward", forward)

    recording(CLIPTextModelWithProjection, "clip")
    recording(T5EncoderModel, "t5")
    original_transformer_forward = SD3Transformer2DModel.forward

    def transformer_forward(self, *args, **kwargs):
        if "transformer" not in events:
            gc.collect()
            alive_at_first_transformer_call.extend(ref for ref in encoders if ref() is not None)
        events.append("transformer")
        return original_transformer_forward(self, *args, **kwargs)

    monkeypatch.setattr(SD3Transformer2DModel, "forward", transformer_forward)
    argv = sd3_train_args(tiny_sd3, tiny_pairs, tmp_path / "out", "--max_train_steps", "2", "--validation_steps", "1")
    train_duo_sd3.main(argv)

    assert events.count("clip") == 2 and events.count("t5") == 1  # one batch of prompts, one call per encoder
    first_transformer_call = events.index("transformer")
    assert set(events[:first_transformer_call]) == {"clip", "t5"}
    assert set(events[first_transformer_call:]) == {"transformer"}
    assert not alive_at_first_transformer_call
    assert (tmp_path / "out" / "validation" / "step-000001.png").is_file()
    assert os.listdir(tmp_path / "out" / "samples")


def refuse(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    return errors[0]


def test_refusals(train_duo_sd3, tiny_sd, tiny_sd3, tiny_pairs, tmp_path, capsys, fresh_accelerate_state):
    line = refuse(train_duo_sd3.main, sd3_train_args(tiny_sd, tiny_pairs, tmp_path / "o"), capsys)
    assert "StableDiffusionPipeline" in line and "train_duo.py" in line
    line = refuse(
        train_duo_sd3.main, sd3_train_args(tiny_sd3, tiny_pairs, tmp_path / "o", "--lora_target", "self_attn"), capsys
    )
    assert "--lora_layers attn" in line
    line = refuse(train_duo_sd3.main, sd3_train_args(tiny_sd3, tiny_pairs, tmp_path / "o", "--t_max", "1001"), capsys)
    assert "t_max" in line and "1000" in line
    with pytest.raises(SystemExit):
        train_duo_sd3.parse_args(["--weighting_scheme", "uniform"])


def test_nan_loss_stops_with_the_last_good_checkpoint(
    train_duo_sd3, tiny_sd3, tiny_pairs, tmp_path, capsys, fresh_accelerate_state
):
    output_dir = tmp_path / "nan"
    argv = sd3_train_args(
        tiny_sd3,
        tiny_pairs,
        output_dir,
        "--learning_rate",
        "1e30",
        "--preservation_weight",
        "0",
        "--checkpointing_steps",
        "1",
        "--skip_validation",
        "--precondition_outputs",
        "0",
    )
    with pytest.raises(SystemExit) as exit_info:
        train_duo_sd3.main(argv)
    assert exit_info.value.code == 1
    # In process the progress bar's last line has no newline yet; the message follows it.
    errors = [line[line.index("error: ") :] for line in capsys.readouterr().err.splitlines() if "error: " in line]
    assert len(errors) == 1 and "non-finite" in errors[0] and "checkpoint-1" in errors[0]
    assert (output_dir / "checkpoint-1" / "pytorch_lora_weights.safetensors").is_file()
    assert not (output_dir / "pytorch_lora_weights.safetensors").exists()


def test_flow_matching_flags(train_duo_sd3):
    args = train_duo_sd3.parse_args([])
    # The official SD3 run's 512 px and 77 T5 tokens.
    assert (
        args.pretrained_model_name_or_path == "stabilityai/stable-diffusion-3-medium-diffusers"
        and args.resolution == 512
    )
    assert args.weighting_scheme == "none" and args.precondition_outputs == 1 and args.max_sequence_length == 77
    # diffusers' spelling (an int) and a bare switch both work.
    assert train_duo_sd3.parse_args(["--precondition_outputs", "0"]).precondition_outputs == 0
    assert train_duo_sd3.parse_args(["--precondition_outputs"]).precondition_outputs == 1


def test_official_sd3_defaults(train_duo_sd3):
    args = train_duo_sd3.parse_args(["--concept", "nudity"])
    args, _ = arguments.resolve_training_args(args, family="sd3")
    sd3.check_sd3_args(args)
    assert args.beta_dpo == 500 and args.learning_rate == pytest.approx(3e-5 * 100 / 500)
    # λ: the official run's effective strength at σ = 1, 5e6·σ_off² (tests/test_fidelity.py pins the relation).
    from diffusers import FlowMatchEulerDiscreteScheduler

    from duo_plugin import official_flags

    args = official_flags.resolve_sd3_preservation(
        args, FlowMatchEulerDiscreteScheduler(shift=3.0), preservation_weight_given=False
    )
    assert (
        args.preservation_weight == pytest.approx(5e6 * (3e-3 / 1.002) ** 2)
        and args.official_preservation_weight == 5e6
    )
    assert args.rank == 32 and args.lora_alpha == 32 and args.lora_target == "attn" and args.max_train_steps == 1000
    assert (args.t_min, args.t_max) == (1, 750)


def test_concept_objective_batch_layout_and_draws():
    """Pairs under the empty and the unsafe prompt, pure noise, retain images under both; the paper's draws
    come first and are unchanged by the option."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    num_pairs = 2
    cache = latent_cache(num_pairs)
    empty = empty_condition()
    generator = torch.Generator().manual_seed(2)
    prompts = (torch.randn(num_pairs, 4, 32, generator=generator), torch.randn(num_pairs, 32, generator=generator))
    retain = sd3.RetainLatents(
        latents=torch.randn(5, 16, 4, 4, generator=generator),
        condition=(torch.randn(5, 4, 32, generator=generator), torch.randn(5, 32, generator=generator)),
    )
    paper = sd3.make_duo_batch(
        cache, torch.arange(num_pairs), torch.Generator().manual_seed(0), scheduler, flow_args(), empty
    )
    batch = sd3.make_duo_batch(
        cache,
        torch.arange(num_pairs),
        torch.Generator().manual_seed(0),
        scheduler,
        flow_args(),
        empty,
        prompts,
        ("empty", "prompt"),
        retain,
        ("empty", "prompt"),
    )
    assert batch.layout == objective.BatchLayout(num_pairs, ("empty", "prompt"), num_pairs, ("empty", "prompt"))
    assert batch.model_input.shape[0] == batch.layout.size == 4 + 4 + 2 + 2 + 2
    pairs_empty, pairs_prompt = batch.model_input[:4], batch.model_input[4:8]
    torch.testing.assert_close(pairs_empty, paper.model_input[:4])
    torch.testing.assert_close(pairs_prompt, paper.model_input[:4])
    torch.testing.assert_close(batch.model_input[8:10], paper.model_input[4:6])
    torch.testing.assert_close(batch.prompt_embeds[4:6], prompts[0])
    torch.testing.assert_close(batch.prompt_embeds[8:10], empty[0].expand(2, -1, -1))
    # Retain rows: the same noisy images twice, first under "", then under their own prompts, at σ in the range.
    torch.testing.assert_close(batch.model_input[10:12], batch.model_input[12:14])
    torch.testing.assert_close(batch.prompt_embeds[10:12], empty[0].expand(2, -1, -1))
    own = [
        i
        for i in range(5)
        for j in range(2)
        if torch.equal(batch.pooled_prompt_embeds[12 + j], retain.condition[1][i])
    ]
    assert len(own) == 2
    assert (batch.sigmas[10:] < 1).all() and torch.equal(batch.sigmas[10:12], batch.sigmas[12:14])


def test_concept_objective_trains_on_sd3(tiny_sd3, tiny_pairs, tmp_path, train_duo_sd3):
    prompts = tmp_path / "retain.txt"
    prompts.write_text("a green circle\n")
    output_dir = tmp_path / "out"
    args = sd3_train_args(
        tiny_sd3,
        tiny_pairs,
        output_dir,
        "--objective",
        "concept",
        "--retain_prompts",
        str(prompts),
        "--num_retain_images",
        "2",
        "--retain_dir",
        str(tmp_path / "retain"),
        "--num_inference_steps",
        "2",
        "--skip_validation",
    )
    train_in_process("train_duo_sd3.py", args)
    config = json.loads((output_dir / "duo_config.json").read_text())
    assert config["preservation_weight"] == 0.0 and config["beta_dpo"] == 100.0
    assert config["preference_conditions"] == ["empty", "prompt", "guided"] and config["retain"]["num_images"] == 2
    assert read_metrics(output_dir)[-1]["loss_retain"] > 0
