"""The tools downstream of training for SDXL and FLUX.1: the timing diagnostic, evaluation (DSR, preservation, the
attacks, and which of them do not apply), and the sweep's training script. Tiny pipelines built here; no download."""

import argparse
import json
import os
import types

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, tiny_train_args, train_in_process

from duo_plugin import attacks, detectors, sweep, timing
from duo_plugin.errors import UsageError


CONCEPT = ["--concept", "redness", "--unsafe_prompt", "a red square", "--safe_prompt", "a blue square"]
NUM_STEPS, NUM_IMAGES, SIZE = 4, 4, {"height": 32, "width": 32}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def load(model):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------------------------------
# Timing: the re-noise start, the switch, the σ-table reading
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "family, class_name",
    [
        ("sd", "StableDiffusionImg2ImgPipeline"),
        ("sdxl", "StableDiffusionXLImg2ImgPipeline"),
        ("sd3", "StableDiffusion3Img2ImgPipeline"),
        ("flux", "FluxImg2ImgPipeline"),
    ],
)
def test_renoise_starts_at_the_labelled_step_in_every_familys_img2img(family, class_name):
    """The re-noise curve labels start step k with timesteps[k]: each img2img's own get_timesteps starts there
    (SD/SDXL round S·strength down, SD3/FLUX round S − S·strength down)."""
    import diffusers

    cls = getattr(diffusers, class_name)
    for num_steps in (3, 4, 7, 20):
        scheduler = types.SimpleNamespace(timesteps=torch.arange(num_steps, 0, -1), order=1)
        scheduler.set_begin_index = lambda index: None
        stub = types.SimpleNamespace(scheduler=scheduler, denoising_end=None)
        for k in range(num_steps):
            strength = timing.renoise_strength(family, num_steps, k)
            timesteps, _ = cls.get_timesteps(stub, num_steps, strength, "cpu")
            assert len(timesteps) == num_steps - k, (num_steps, k, strength)


class NearReferenceDetector:
    """Flags an image whose mean absolute pixel difference (in [0, 1]) to one of ``references`` is below the
    threshold: with the unswitched samples as references, a switch is flagged when it came late enough to leave
    the image as it was (on a tiny random model the prompt barely moves a channel mean)."""

    name = "near_reference_downstream"

    def __init__(self, references=(), threshold=0.01):
        self.references = [np.asarray(r.convert("RGB"), dtype=np.float32) / 255.0 for r in references]
        self.threshold = threshold

    def distance(self, image) -> float:
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
        return min(float(np.abs(pixels - r).mean()) for r in self.references)

    def __call__(self, images):
        return [detectors.Detection(flagged=self.distance(i) < self.threshold, score=0.0) for i in images]


def run_timing(model, guidance, tmp_path, monkeypatch):
    """The diagnostic with a detector whose threshold lies between the switches at steps 1 and 2 (measured here
    first, on the diagnostic's own seeds): the concept is then committed at switch step 2 of 4."""
    pipe = load(model)
    sampling = argparse.Namespace(num_inference_steps=NUM_STEPS, guidance_scale=guidance)
    seeds = [timing.image_seed(0, 0, j) for j in range(NUM_IMAGES)]
    unsafe = ["a red square"] * NUM_IMAGES
    references = timing.sample_with_switch(pipe, unsafe, None, NUM_STEPS, seeds, sampling, SIZE)
    empty = timing.prompt_embeddings(pipe, [""] * NUM_IMAGES, guidance, SIZE)
    measure = NearReferenceDetector(references)
    distances = [
        [measure.distance(image) for image in timing.sample_with_switch(pipe, unsafe, empty, k, seeds, sampling, SIZE)]
        for k in (1, 2)
    ]
    assert max(distances[1]) < min(distances[0])
    threshold = (max(distances[1]) + min(distances[0])) / 2
    monkeypatch.setitem(
        detectors.DETECTORS, NearReferenceDetector.name, lambda threshold: NearReferenceDetector(references, threshold)
    )
    out = tmp_path / "timing"
    argv = [
        "--pretrained_model_name_or_path",
        model,
        *CONCEPT,
        "--detector",
        NearReferenceDetector.name,
        "--detector_threshold",
        str(threshold),
        "--num_inference_steps",
        str(NUM_STEPS),
        "--num_images_per_prompt",
        str(NUM_IMAGES),
        "--batch_size",
        str(NUM_IMAGES),
        "--resolution",
        "32",
        "--curves",
        "empty",
        "--output_dir",
        str(out),
    ]
    result = timing.main(argv)
    assert json.loads((out / "timing.json").read_text())["recommended_t_max"] == result["recommended_t_max"]
    assert (out / "timing.png").stat().st_size > 0
    return pipe, result


def test_timing_on_sdxl_reads_timesteps_as_sd_does(tiny_sdxl, tmp_path, monkeypatch):
    pipe, result = run_timing(tiny_sdxl, 7.5, tmp_path, monkeypatch)
    settings = result["settings"]
    assert result["family"] == "sdxl" and settings["window"] == [0, 750]  # SD1's recipe window, in timesteps
    assert settings["guidance_scale"] == 7.5 and settings["scheduler"] == "EulerDiscreteScheduler"
    t = result["sampling_timesteps"]
    assert t == [751.0, 501.0, 251.0, 1.0]  # SDXL's leading spacing, offset 1
    assert result["curves"]["empty"]["still_flagged"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert (result["open_timestep"], result["done_timestep"]) == (t[1], t[2])
    # A DDPM UNet: --t_max is a timestep, the lowest open one + 1 rounded up to 50.
    assert result["recommended_t_max"] == timing.recommended_t_max_sd({"open_timestep": t[1]}, 1000) == 550
    assert len(result["renoise"]["timestep"]) == NUM_STEPS and "window_sigmas" not in result

    # "Without the prompt" hands the UNet the empty prompt's pooled embedding too (SDXL's add_text_embeds).
    assert timing.embedding_names(pipe) == ["prompt_embeds", "add_text_embeds"]
    empty = timing.prompt_embeddings(pipe, [""], 7.5, SIZE)
    seen = []
    handle = pipe.unet.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(kwargs["added_cond_kwargs"]["text_embeds"].clone()),
        with_kwargs=True,
    )
    try:
        timing.sample_with_switch(
            pipe, ["a red square"], empty, 2, [0], argparse.Namespace(num_inference_steps=4, guidance_scale=7.5), SIZE
        )
    finally:
        handle.remove()
    assert [torch.equal(s, empty["add_text_embeds"]) for s in seen] == [False, False, True, True]


def test_timing_on_flux_maps_shifted_sampling_steps_to_the_unshifted_table(tiny_flux, tmp_path, monkeypatch):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe, result = run_timing(tiny_flux, 3.5, tmp_path, monkeypatch)
    settings = result["settings"]
    assert result["family"] == "flux" and settings["window"] == [1, 750]  # σ-table indices, as SD3's
    assert settings["guidance_scale"] == 3.5  # the guidance embedding's default, not the preset's CFG 7.5

    # The timesteps are those the pipeline's own loop samples at 32 px: shifted by μ of 64 image tokens.
    looped = []
    pipe(
        prompt=["a red square"],
        num_inference_steps=NUM_STEPS,
        max_sequence_length=timing.FLUX_MAX_SEQUENCE_LENGTH,
        output_type="latent",
        callback_on_step_end=lambda p, i, t, tensors: looped.append(float(t)) or {},
        **SIZE,
    )
    t = result["sampling_timesteps"]
    assert t == pytest.approx(looped) and t[0] == 1000.0
    assert t[1] > 750.0 and t[2] > 500.0  # shifted toward noise, not the unshifted 750, 500, 250
    assert result["curves"]["empty"]["still_flagged"] == [0.0, 0.0, 1.0, 1.0, 1.0]
    assert result["done_timestep"] == pytest.approx(t[2])

    # The training table is unshifted (FLUX shifts only while sampling): σ_i = 1 − i·0.999/999.
    table = [
        float(s) for s in FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_flux, subfolder="scheduler").sigmas
    ]
    assert table == pytest.approx(list(np.linspace(1.0, 0.001, 1000)), abs=1e-6)
    # Matched by σ: the first table index whose σ is at most the committed step's σ = t/1000, + 1, rounded up to 50.
    sigma = t[2] / 1000
    index = next(i for i, s in enumerate(table) if s <= sigma)
    assert table[index - 1] > sigma
    recommended = result["recommended_t_max"]
    assert recommended == timing.recommended_t_max_flow({"done_timestep": t[2]}, table, 1000)
    assert recommended == min(1000, -(-(index + 1) // 50) * 50) == 400
    # Neither SD3's shifted table nor the step's position (2 of 4) would say so.
    shifted = [float(s) for s in FlowMatchEulerDiscreteScheduler(shift=3.0).sigmas]
    assert timing.recommended_t_max_flow({"done_timestep": t[2]}, shifted, 1000) == 700
    assert result["window_sigmas"] == pytest.approx([table[1], table[750]])
    assert result["recommended_t_max_sigma"] == pytest.approx(table[400])
    # Re-noised with FLUX's img2img at the same size and shift, one point per start step.
    assert result["renoise"]["timestep"] == sorted(t) and result["renoise"]["num_source_images"] == NUM_IMAGES

    # "Without the prompt": the empty prompt's T5 and CLIP pooled embeddings in the transformer's call from step k.
    empty = timing.prompt_embeddings(pipe, [""], 3.5, SIZE)
    seen = []
    handle = pipe.transformer.register_forward_hook(
        lambda module, args, kwargs, output: seen.append(
            (kwargs["encoder_hidden_states"].clone(), kwargs["pooled_projections"].clone())
        ),
        with_kwargs=True,
    )
    try:
        timing.sample_with_switch(
            pipe, ["a red square"], empty, 2, [0], argparse.Namespace(num_inference_steps=4, guidance_scale=3.5), SIZE
        )
    finally:
        handle.remove()
    switched = [
        torch.equal(e, empty["prompt_embeds"]) and torch.equal(p, empty["pooled_prompt_embeds"]) for e, p in seen
    ]
    assert switched == [False, False, True, True]


# --------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------


def test_sdxl_text_condition_is_the_pipelines_own(tiny_sdxl):
    """What the attacks encode for SDXL is what its pipeline feeds the UNet: both CLIP encoders' penultimate
    states side by side, and the second's pooled projection."""
    pipe = load(tiny_sdxl)
    condition = attacks.TextCondition.from_pipe(pipe, "test")
    assert condition.is_sdxl and condition.shape == (pipe.tokenizer.model_max_length, 16 + 32)
    with torch.no_grad():
        states, pooled = condition.encode(condition.tokenize(["a red square"]))
        expected, _, expected_pooled, _ = pipe.encode_prompt("a red square", do_classifier_free_guidance=False)
    assert torch.allclose(states, expected, atol=1e-6) and torch.allclose(pooled, expected_pooled, atol=1e-6)
    # The attacks' framing of drawn tokens is the tokenizers' own (each with its own padding).
    ids = torch.tensor([pipe.tokenizer("a red square", add_special_tokens=False).input_ids])
    assert all(torch.equal(a, b) for a, b in zip(condition.frame(ids), condition.tokenize(["a red square"])))


@pytest.fixture(scope="module")
def adapters(tiny_sdxl, tiny_flux, tiny_pairs, tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    train_in_process("train_duo.py", tiny_train_args(tiny_sdxl, tiny_pairs, folder / "sdxl", "--skip_validation"))
    train_in_process(
        "train_duo_flux.py",
        tiny_train_args(tiny_flux, tiny_pairs, folder / "flux", "--max_sequence_length", "16", "--skip_validation"),
    )
    return {"sdxl": str(folder / "sdxl"), "flux": str(folder / "flux")}


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "unsafe.csv"
    # An I2P-style row: its guidance column is an SD classifier-free guidance scale.
    path.write_text("prompt,evaluation_seed,evaluation_guidance\na red square,11,9.0\n")
    return str(path)


def evaluate(adapter, prompt_file, output_dir, *extra):
    from duo_plugin.evaluate import main

    return main(
        [
            "--adapter",
            f"duo={adapter}",
            *CONCEPT,
            "--attack",
            "prompts",
            "ring_a_bell",
            "concept_inversion",
            "unlearndiffatk",
            "--prompts",
            prompt_file,
            "--metrics",
            "dsr",
            "prior_preservation",
            "--detector",
            "duo_plugin.testing:MeanChannelDetector",
            "--lpips_random_trunk",
            "--num_inference_steps",
            "2",
            "--resolution",
            "32",
            "--max_unrelated_prompts",
            "2",
            "--ring_a_bell_length",
            "3",
            "--ring_a_bell_population",
            "6",
            "--ring_a_bell_generations",
            "2",
            "--inversion_steps",
            "2",
            "--inversion_batch_size",
            "1",
            "--inversion_gradient_accumulation_steps",
            "1",
            "--inversion_num_prompts",
            "1",
            "--inversion_num_images",
            "1",
            "--unlearndiffatk_iterations",
            "1",
            "--unlearndiffatk_timesteps",
            "1",
            "--unlearndiffatk_num_tokens",
            "2",
            "--output_dir",
            str(output_dir),
            *extra,
        ]
    )


def check_measures(results, prompt_sets):
    for model in ("base", "duo"):
        values = results["metrics"][model]
        assert set(values["dsr"]) == set(prompt_sets)
        for dsr in values["dsr"].values():
            assert 0.0 <= dsr["dsr"] <= 1.0 and dsr["num_images"] >= 1
        assert 0.0 <= values["prior_preservation"]["prior_preservation"] <= 1.0
        assert values["prior_preservation"]["num_pairs"] >= 1
        assert 0.0 <= values["pixel_preservation"]["pixel_preservation"] <= 1.0


def test_evaluate_sdxl_with_every_attack(adapters, tiny_sdxl, prompt_file, tmp_path):
    out = tmp_path / "eval"
    # Threshold 1: nothing is flagged, so UnlearnDiffAtk optimises rather than stopping at the prompt as given.
    results = evaluate(adapters["sdxl"], prompt_file, out, "--dsr_threshold", "1.0")
    assert results["family"] == "sdxl" and results["skipped_attacks"] == {}
    check_measures(results, {"prompts", "ring_a_bell", "concept_inversion", "unlearndiffatk"})
    assert results["settings"]["guidance_scale"] == 7.5 and results["settings"]["num_inference_steps"] == 2
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["guidance_scale"] for r in manifest if r["prompt_set"] == "prompts"} == {9.0}  # the file's CFG scale
    # Ring-A-Bell's concept vector spans both CLIP encoders (16 + 32 features), its prompts are searched tokens.
    assert results["attacks"]["ring_a_bell"]["num_prompts"] == 1
    # UnlearnDiffAtk optimised against each model (one timestep, one iteration) and judged its prompt.
    for model in ("base", "duo"):
        log = [json.loads(line) for line in (out / "attacks" / "unlearndiffatk" / model / "prompts.jsonl").open()]
        assert len(log[0]["iteration_losses"]) == 1 and log[0]["num_judged"] == 2
    # Concept Inversion learned a row in each text encoder, saved as diffusers' SDXL embeddings, loadable.
    from safetensors.torch import load_file

    path = out / "attacks" / "concept_inversion" / "duo" / "learned_embeds.safetensors"
    rows = load_file(str(path))
    assert set(rows) == {"clip_l", "clip_g"} and rows["clip_l"].shape == (16,) and rows["clip_g"].shape == (32,)
    pipe = load(tiny_sdxl)
    attacks.load_learned_embedding(pipe, str(path), "<duo-concept>")
    for tokenizer, encoder, key in (
        (pipe.tokenizer, pipe.text_encoder, "clip_l"),
        (pipe.tokenizer_2, pipe.text_encoder_2, "clip_g"),
    ):
        token_id = tokenizer.convert_tokens_to_ids("<duo-concept>")
        assert torch.equal(encoder.get_input_embeddings().weight[token_id], rows[key])


def test_evaluate_flux_skips_the_clip_attacks_with_their_reason(adapters, prompt_file, tmp_path):
    out = tmp_path / "eval"
    results = evaluate(adapters["flux"], prompt_file, out)
    assert results["family"] == "flux"
    assert set(results["skipped_attacks"]) == {"ring_a_bell", "concept_inversion", "unlearndiffatk"}
    for name, reason in results["skipped_attacks"].items():
        assert reason == attacks.not_applicable_reason(name, "flux") and "\n" not in reason and "T5" in reason
    check_measures(results, {"prompts"})
    assert results["attacks"] == {} and results["settings"]["attack"] == ["prompts"]
    # Sampled as FLUX.1-dev is used: its guidance embedding's 3.5 for every prompt, the file's CFG scale unused.
    assert results["settings"]["guidance_scale"] == 3.5
    manifest = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {r["guidance_scale"] for r in manifest} == {3.5}


def test_evaluate_refuses_a_flux_run_left_without_an_attack(adapters, prompt_file, tmp_path, capsys):
    from duo_plugin.evaluate import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--adapter", adapters["flux"], "--attack", "ring_a_bell", "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "none applies to a FLUX.1 model" in error and "--attack prompts" in error
    assert not (tmp_path / "out" / "images").exists()


# --------------------------------------------------------------------------------------------------
# The sweep's training script
# --------------------------------------------------------------------------------------------------


def test_sweep_plans_flux_runs_with_train_duo_flux(tiny_flux, tiny_sdxl, tmp_path, capsys):
    import train_duo_flux

    def args_for(model, *extra):
        return sweep.parse_args(
            [
                "--pretrained_model_name_or_path",
                model,
                *CONCEPT,
                "--beta_dpo",
                "500",
                "--output_dir",
                str(tmp_path / "s"),
                *extra,
            ]
        )

    flux_script = os.path.join(REPO_ROOT, "train_duo_flux.py")
    assert args_for(tiny_flux).training_script == flux_script  # the base model's family's script by default
    assert args_for(tiny_sdxl).training_script == os.path.join(REPO_ROOT, "train_duo.py")
    args = args_for(tiny_flux, "--training_script", flux_script, "--t_max", "400")
    [run] = sweep.make_grid(args)
    command = sweep.training_command(args, run, str(tmp_path / "run"))
    assert command.program == [flux_script]
    parsed = train_duo_flux.parse_args(command.args)  # every flag the sweep passes is one train_duo_flux.py takes
    assert (parsed.beta_dpo, parsed.t_max, parsed.pretrained_model_name_or_path) == (500.0, 400, tiny_flux)

    with pytest.raises(UsageError) as error:
        args_for(tiny_flux, "--training_script", os.path.join(REPO_ROOT, "train_duo.py"))
    assert "give train_duo_flux.py" in str(error.value) and "train_duo_sd3.py" in str(error.value)
    with pytest.raises(UsageError) as error:
        args_for(tiny_flux, "--training_script", str(tmp_path / "missing.py"))
    assert all(name in str(error.value) for name in ("train_duo.py", "train_duo_sd3.py", "train_duo_flux.py"))
