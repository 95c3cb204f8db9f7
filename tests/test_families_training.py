"""SDXL (train_duo.py) and FLUX.1 (train_duo_flux.py) end to end on tiny pipelines, and the one micro-step every
family's script runs."""

import json
import math
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_train_args, train_in_process
from safetensors.torch import load_file

from duo_plugin import step, training
from duo_plugin.families import flux, sd


SCRIPTS = {"sdxl": "train_duo.py", "flux": "train_duo_flux.py", "sd": "train_duo.py", "sd3": "train_duo_sd3.py"}
# The tiny T5 tokenizers hold 16 tokens.
FAMILY_FLAGS = {"flux": ("--max_sequence_length", "16"), "sd3": ("--max_sequence_length", "16")}


@pytest.fixture(scope="module")
def tiny_flux_schnell(tmp_path_factory):
    from duo_plugin.testing import make_tiny_flux_pipeline

    return make_tiny_flux_pipeline(str(tmp_path_factory.mktemp("tiny_flux_schnell")), guidance_embeds=False)


@pytest.fixture
def model_of(request):
    return lambda family: request.getfixturevalue({"sd": "tiny_sd"}.get(family, f"tiny_{family}"))


def family_args(family, model, pairs, output_dir, *extra):
    return tiny_train_args(model, pairs, output_dir, *FAMILY_FLAGS.get(family, ()), *extra)


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def read_config(output_dir):
    with open(os.path.join(output_dir, "duo_config.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_every_script_runs_its_micro_steps_through_the_shared_step(
    family, model_of, tiny_pairs, tmp_path, monkeypatch
):
    """4 optimizer steps of 2 accumulated micro-steps: 8 calls of duo_plugin.step.duo_micro_step, 4 optimizer updates."""
    calls = []

    def counting(*call_args, **kwargs):
        result = step.duo_micro_step(*call_args, **kwargs)
        calls.append(result.grad_norm is not None)
        return result

    monkeypatch.setattr(training, "duo_micro_step", counting)
    output_dir = tmp_path / "out"
    train_in_process(
        SCRIPTS[family],
        family_args(
            family, model_of(family), tiny_pairs, output_dir, "--gradient_accumulation_steps", "2", "--skip_validation"
        ),
    )
    assert len(calls) == 8 and sum(calls) == 4
    assert read_config(output_dir)["architecture"]["family"] == family


@pytest.fixture(scope="module")
def trained_sdxl(tiny_sdxl, tiny_pairs, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("sdxl") / "out"
    train_in_process("train_duo.py", tiny_train_args(tiny_sdxl, tiny_pairs, output_dir, "--validation_steps", "2"))
    return output_dir


@pytest.fixture(scope="module")
def trained_flux(tiny_flux, tiny_pairs, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("flux") / "out"
    train_in_process("train_duo_flux.py", family_args("flux", tiny_flux, tiny_pairs, output_dir))
    return output_dir


def test_sdxl_recipe_and_adapter(trained_sdxl):
    """SDXL takes SD1's window, LoRA placement and λ scaling, a third of its rate, and its own family record."""
    config = read_config(trained_sdxl)
    assert config["architecture"]["family"] == "sdxl"
    assert config["architecture"]["addition_embed_type"] == "text_time"
    assert config["learning_rate"] == pytest.approx(1e-4 * 100 / 500)
    assert config["preservation_weight"] == pytest.approx(5e6)
    assert (config["t_min"], config["t_max"]) == (0, 750)
    keys = load_file(trained_sdxl / "pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("unet.") and ".attn1." in k for k in keys)
    assert os.path.isfile(trained_sdxl / "validation" / "step-000002.png")
    assert "StableDiffusionXLPipeline.from_pretrained" in (trained_sdxl / "README.md").read_text()


def test_flux_recipe_and_adapter(trained_flux):
    """FLUX takes SD3's recipe: λ at σ = 1 with the official SD3 strength (44.8 at β = 500), guidance 3.5 recorded."""
    config = read_config(trained_flux)
    assert config["architecture"]["family"] == "flux"
    assert config["architecture"]["guidance_embeds"] is True
    assert config["training_guidance_scale"] == 3.5
    assert config["preservation_sigma"] == 1.0
    assert config["preservation_weight"] == pytest.approx(5e6 * (3 * 0.001 / (1 + 2 * 0.001)) ** 2, rel=1e-4)
    assert config["preservation_effective_weight"] == pytest.approx(config["official_preservation_effective_weight"])
    assert config["learning_rate"] == pytest.approx(3e-5 * 100 / 500)
    keys = load_file(trained_flux / "pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert {k.split(".lora")[0].rsplit(".", 1)[-1] for k in keys} <= {"to_q", "to_k", "to_v", "0"}


def test_flux_schnell_trains_without_a_guidance_embedding(tiny_flux_schnell, tiny_pairs, tmp_path):
    train_in_process(
        "train_duo_flux.py", family_args("flux", tiny_flux_schnell, tiny_pairs, tmp_path / "out", "--skip_validation")
    )
    config = read_config(tmp_path / "out")
    assert config["architecture"]["guidance_embeds"] is False and config["training_guidance_scale"] is None


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_learns_to_prefer_the_safe_image(family, model_of, tiny_pairs, tmp_path):
    """Without preservation, tens of steps make the adapter denoise safe images better than unsafe ones."""
    output_dir = tmp_path / "out"
    train_in_process(
        SCRIPTS[family],
        family_args(
            family,
            model_of(family),
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
        ),
    )
    rows = read_metrics(output_dir)
    early, late = rows[:10], rows[-10:]
    late_loss = np.mean([r["loss_duo"] for r in late])
    assert late_loss < math.log(2) - 0.1 and late_loss < np.mean([r["loss_duo"] for r in early])
    # The unsafe images' denoising error rises relative to the safe ones'.
    assert np.mean([r["delta_safe"] - r["delta_unsafe"] for r in late]) < 0
    assert np.mean([r["implicit_acc"] for r in late]) > 0.65


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_resume_reproduces_the_uninterrupted_run(family, model_of, tiny_pairs, tmp_path, capsys):
    common = (
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
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
        "--condition_on_prompts",
    )
    model = model_of(family)
    full = tmp_path / "full"
    train_in_process(SCRIPTS[family], family_args(family, model, tiny_pairs, full, *common))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-2", resumed / "checkpoint-2")
    train_in_process(
        SCRIPTS[family], family_args(family, model, tiny_pairs, resumed, *common, "--resume_from_checkpoint", "latest")
    )
    assert "Resuming from" in capsys.readouterr().out
    expected = load_file(full / "pytorch_lora_weights.safetensors")
    actual = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0)
    assert [r["step"] for r in read_metrics(resumed)] == [3, 4]


def test_sdxl_batch_carries_pooled_embeddings_and_size_conditioning():
    """Every row gets its pooled embedding; the preservation rows get the empty prompt's; time ids are the square
    training image's (original size, crop (0, 0), target size)."""
    generator = torch.Generator().manual_seed(0)
    cache = sd_latent_cache()
    empty = (torch.zeros(1, 5, 8), torch.zeros(1, 6))
    prompt = (torch.ones(2, 5, 8), 3 * torch.ones(2, 6))
    scheduler = ddpm_scheduler()
    batch = sd.make_duo_batch(
        cache, torch.tensor([0, 1]), generator, scheduler, 0, 750, empty, prompt, time_ids=sd.add_time_ids(64)
    )
    assert batch.pooled.shape == (6, 6)
    assert torch.equal(batch.pooled[:4], 3 * torch.ones(4, 6)) and torch.equal(batch.pooled[4:], torch.zeros(2, 6))
    assert batch.time_ids.tolist() == [64, 64, 0, 0, 64, 64]
    # The SD 1.x/2.x batch is unchanged by the option: same draws, no pooled rows.
    plain = sd.make_duo_batch(
        cache, torch.tensor([0, 1]), torch.Generator().manual_seed(0), scheduler, 0, 750, empty[0], prompt[0]
    )
    assert plain.pooled is None and torch.equal(plain.model_input, batch.model_input)
    assert torch.equal(plain.condition, batch.condition)


def test_sdxl_empty_prompt_is_the_pipelines_unconditional_branch(tiny_sdxl, tmp_path):
    """With force_zeros_for_empty_prompt (SDXL base's setting), the empty prompt is the zero embedding that
    classifier-free guidance subtracts at sampling; another prompt is encoded as the pipeline encodes it."""
    from argparse import Namespace

    from diffusers import StableDiffusionXLPipeline

    args = Namespace(pretrained_model_name_or_path=tiny_sdxl, revision=None, cache_dir=None, variant=None)
    embeddings = sd.encode_prompts_once(args, "sdxl", ["", "a red square"], "cpu", torch.float32)
    empty_embeds, empty_pooled = embeddings([""])
    assert not empty_embeds.any() and not empty_pooled.any()
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    expected, _, expected_pooled, _ = pipe.encode_prompt(
        "a red square", device="cpu", do_classifier_free_guidance=False
    )
    embeds, pooled = embeddings(["a red square"])
    torch.testing.assert_close(embeds, expected)
    torch.testing.assert_close(pooled, expected_pooled)


def test_flux_packing_round_trips_and_predict_is_the_pipelines_call(tiny_flux):
    """pack/unpack are inverse; predict's velocity equals the transformer called as FluxPipeline calls it."""
    from diffusers import FluxPipeline, FluxTransformer2DModel

    latents = torch.randn(3, 16, 8, 6)
    assert flux.pack(latents).shape == (3, 12, 64)
    torch.testing.assert_close(flux.unpack(flux.pack(latents), 8, 6), latents, rtol=0, atol=0)

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux, subfolder="transformer")
    batch = type(
        "Batch",
        (),
        {
            "model_input": latents,
            "timesteps": torch.tensor([1000.0, 500.0, 250.0]),
            "prompt_embeds": torch.randn(3, 4, 32),
            "pooled_prompt_embeds": torch.randn(3, 16),
            "sigmas": torch.tensor([1.0, 0.5, 0.25]),
        },
    )()
    velocity = flux.predict(transformer, batch, "cpu", torch.float32, precondition_outputs=False, guidance_scale=3.5)
    packed = FluxPipeline._pack_latents(latents, 3, 16, 8, 6)
    expected = transformer(
        hidden_states=packed,
        timestep=batch.timesteps / 1000,
        guidance=torch.full((3,), 3.5),
        pooled_projections=batch.pooled_prompt_embeds,
        encoder_hidden_states=batch.prompt_embeds,
        txt_ids=torch.zeros(4, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(3, 4, 3, "cpu", torch.float32),
        return_dict=False,
    )[0]
    torch.testing.assert_close(velocity, FluxPipeline._unpack_latents(expected, 16, 12, 2))
    preconditioned = flux.predict(transformer, batch, "cpu", torch.float32, guidance_scale=3.5)
    torch.testing.assert_close(preconditioned, latents - batch.sigmas[:, None, None, None] * velocity)


@pytest.mark.parametrize(
    "script, model_fixture, expected",
    [
        ("train_duo.py", "tiny_flux", "train_duo_flux.py"),
        ("train_duo_flux.py", "tiny_sdxl", "train_duo.py"),
        ("train_duo_sd3.py", "tiny_flux", "train_duo_flux.py"),
        ("train_duo_flux.py", "tiny_sd", "train_duo.py"),
    ],
)
def test_a_model_of_another_family_is_refused_naming_its_script(
    script, model_fixture, expected, request, tiny_pairs, tmp_path, capsys
):
    model = request.getfixturevalue(model_fixture)
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(script, tiny_train_args(model, tiny_pairs, tmp_path / "out"))
    assert exit_info.value.code != 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert expected in line and "use" in line
    assert not (tmp_path / "out").exists()


def test_flux_resolution_must_be_a_multiple_of_16(tiny_flux, tiny_pairs, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train_in_process(
            "train_duo_flux.py", family_args("flux", tiny_flux, tiny_pairs, tmp_path / "o", "--resolution", "40")
        )
    assert "multiple of 16" in capsys.readouterr().err


def sd_latent_cache(num_pairs=2, channels=4, size=4):
    from duo_plugin.data import CachedPairLatents

    generator = torch.Generator().manual_seed(1)
    mean = torch.randn(num_pairs, 1, 2, channels, size, size, generator=generator)
    return CachedPairLatents(mean=mean, std=torch.zeros_like(mean), scaling_factor=1.0)


def ddpm_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000)


def test_flux_card_loads_in_bf16(trained_flux):
    card = (trained_flux / "README.md").read_text()
    assert "FluxPipeline.from_pretrained" in card and "torch.bfloat16" in card and "torch.float16" not in card


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3", "flux"])
def test_validation_pipelines_sample_the_trained_denoiser_without_text_encoders(family, model_of):
    """Each family's pipeline, built around the run's own denoiser and VAE, with a sampling scheduler of its own
    and no text encoder, tokenizer or safety checker (prompts come as embeddings)."""
    import diffusers

    from duo_plugin.families import sd3

    model = model_of(family)
    denoiser_name = "unet" if family in ("sd", "sdxl") else "transformer"
    pipe = diffusers.DiffusionPipeline.from_pretrained(model)
    make = {
        "sd": lambda s: sd.validation_pipeline("sd", s),
        "sdxl": lambda s: sd.validation_pipeline("sdxl", s),
        "sd3": sd3.validation_pipeline,
        "flux": flux.validation_pipeline,
    }[family](pipe.scheduler)
    denoiser = getattr(pipe, denoiser_name)
    validation = make(denoiser, pipe.vae)
    assert type(validation) is type(pipe)
    assert getattr(validation, denoiser_name) is denoiser and validation.vae is pipe.vae
    assert validation.scheduler is not pipe.scheduler
    encoders = [name for name in validation.components if name.startswith(("text_encoder", "tokenizer"))]
    assert encoders and all(getattr(validation, name) is None for name in encoders)
    if family == "sd":
        assert validation.safety_checker is None and validation.config.requires_safety_checker is False
