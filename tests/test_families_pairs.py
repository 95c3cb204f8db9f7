"""Pair generation (python -m duo_plugin.pairs) for SDXL and FLUX.1 base models, on tiny pipelines built here."""

import functools
import json
import os

import numpy as np
import pytest
from PIL import Image

from duo_plugin import pairs


NUDITY_PAIRS = [
    ("a naked white woman, realistic photo", "a dressed white woman, realistic photo"),
    ("a naked black woman, realistic photo", "a dressed black woman, realistic photo"),
]


def pair_args(model, output_dir, *extra):
    """Two unverified nudity pairs, 3 steps (the edit runs 2 at strength 0.75), batches of 2."""
    return [
        "--pretrained_model_name_or_path",
        str(model),
        "--output_dir",
        str(output_dir),
        "--concept",
        "nudity",
        "--verifier",
        "none",
        "--num_pairs",
        "2",
        "--num_inference_steps",
        "3",
        "--batch_size",
        "2",
        *extra,
    ]


def read_rows(folder):
    with open(os.path.join(folder, pairs.METADATA_NAME)) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_recipe(folder):
    with open(os.path.join(folder, pairs.RECIPE_NAME)) as f:
        return json.load(f)["recipe"]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def check_pair_images(folder, rows, size):
    """Every pair's two images exist, have the recipe's size, and differ; returns them."""
    images = []
    for row in rows:
        unsafe, safe = pixels(folder / row["unsafe_file_name"]), pixels(folder / row["safe_file_name"])
        assert unsafe.shape == safe.shape == (size, size, 3)
        assert not np.array_equal(unsafe, safe)
        images.append((unsafe, safe))
    return images


def refuse(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        pairs.main(argv)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    return errors[0]


@pytest.fixture
def spy_calls(monkeypatch):
    """Record the keyword arguments of every call of the given pipeline classes (signatures kept, so the
    generator's checks of what the installed pipelines take still see the real parameters)."""
    calls = []

    def spy(*classes):
        for cls in classes:
            real = cls.__call__

            @functools.wraps(real)
            def recorded(self, *args, _real=real, _name=cls.__name__, **kwargs):
                calls.append((_name, kwargs))
                return _real(self, *args, **kwargs)

            monkeypatch.setattr(cls, "__call__", recorded)
        return calls

    return spy


def test_base_model_info_of_sdxl_and_flux(tiny_sdxl, tiny_flux, tmp_path):
    sdxl = pairs.inspect_base_model(tiny_sdxl)
    assert (sdxl.pipeline_class, sdxl.family) == ("StableDiffusionXLPipeline", "sdxl")
    # UNet sample size 16 x vae scale 2; SDXL's own size check is a multiple of 8; its default 50 steps.
    assert (sdxl.default_resolution, sdxl.resolution_multiple, sdxl.default_num_inference_steps) == (32, 8, 50)
    assert (sdxl.default_guidance_scale, sdxl.default_true_cfg_scale) == (None, None)  # the preset's CFG scale

    flux = pairs.inspect_base_model(tiny_flux)
    assert (flux.pipeline_class, flux.family) == ("FluxPipeline", "flux")
    # No sample size in a FLUX transformer config: the pipeline's 128 latents x vae scale 2; 2x2 packing: 2 x 2.
    assert (flux.default_resolution, flux.resolution_multiple, flux.default_num_inference_steps) == (256, 4, 28)
    assert (flux.default_guidance_scale, flux.default_true_cfg_scale, flux.guidance_embeds) == (3.5, 4.0, True)

    from duo_plugin.testing import make_tiny_flux_pipeline

    schnell = pairs.inspect_base_model(make_tiny_flux_pipeline(str(tmp_path / "schnell"), guidance_embeds=False))
    assert (schnell.default_guidance_scale, schnell.guidance_embeds, schnell.default_num_inference_steps) == (
        0.0,
        False,
        4,
    )


def test_sdxl_pairs(tiny_sdxl, tmp_path, spy_calls):
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    calls = spy_calls(StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline)
    folder = tmp_path / "pairs"
    report = pairs.main(pair_args(tiny_sdxl, folder))  # no --resolution: the model's own, 32
    assert (report.accepted, report.planned) == (2, 2)
    rows = read_rows(folder)
    assert [(row["unsafe_prompt"], row["safe_prompt"]) for row in rows] == NUDITY_PAIRS
    assert [(row["strength"], row["guidance_scale"], row["num_inference_steps"]) for row in rows] == [
        (0.75, 7.5, 3)
    ] * 2
    assert all("true_cfg_scale" not in row for row in rows)
    check_pair_images(folder, rows, 32)
    recipe = read_recipe(folder)
    assert (recipe["family"], recipe["resolution"], recipe["guidance_scale"], recipe["true_cfg_scale"]) == (
        "sdxl",
        32,
        7.5,
        None,
    )
    # SDXL edits as SD does: classifier-free guidance with the unsafe prompt as negative prompt.
    assert [name for name, _ in calls] == ["StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"]
    edit = calls[1][1]
    assert edit["negative_prompt"] == [unsafe for unsafe, _ in NUDITY_PAIRS]
    assert edit["prompt"] == [safe for _, safe in NUDITY_PAIRS]
    assert (edit["guidance_scale"], edit["strength"]) == (7.5, 0.75) and "true_cfg_scale" not in edit
    card = (folder / "README.md").read_text()
    assert f"accelerate launch train_duo.py --concept nudity --pretrained_model_name_or_path {tiny_sdxl}" in card
    assert "train_duo_sd3.py" not in card and "train_duo_flux.py" not in card
    assert "| guidance scale | 7.5 |" in card and "true CFG" not in card


def test_flux_pairs_edit_with_true_cfg_against_the_unsafe_prompt(tiny_flux, tmp_path, spy_calls):
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    calls = spy_calls(FluxPipeline, FluxImg2ImgPipeline)
    folder = tmp_path / "pairs"
    report = pairs.main(pair_args(tiny_flux, folder, "--resolution", "32"))
    assert (report.accepted, report.planned) == (2, 2)
    rows = read_rows(folder)
    assert [(row["unsafe_prompt"], row["safe_prompt"]) for row in rows] == NUDITY_PAIRS
    # FLUX.1's own guidance (embedding 3.5, true CFG 4.0 for the edit), not the preset's CFG 7.5; recorded per row.
    assert [(row["guidance_scale"], row["true_cfg_scale"], row["strength"]) for row in rows] == [(3.5, 4.0, 0.75)] * 2
    images = check_pair_images(folder, rows, 32)
    recipe = read_recipe(folder)
    assert (recipe["family"], recipe["resolution"], recipe["guidance_scale"], recipe["true_cfg_scale"]) == (
        "flux",
        32,
        3.5,
        4.0,
    )
    assert [name for name, _ in calls] == ["FluxPipeline", "FluxImg2ImgPipeline"]
    draw, edit = calls[0][1], calls[1][1]
    # The unsafe image as FLUX.1-dev is used: guidance embedding only, no negative prompt.
    assert draw["guidance_scale"] == 3.5 and "negative_prompt" not in draw and "true_cfg_scale" not in draw
    assert (draw["height"], draw["width"]) == (32, 32)
    # The safe twin: true CFG with the unsafe prompt as negative prompt, which FLUX drops at true_cfg_scale <= 1.
    assert edit["negative_prompt"] == [unsafe for unsafe, _ in NUDITY_PAIRS]
    assert edit["prompt"] == [safe for _, safe in NUDITY_PAIRS]
    assert (edit["true_cfg_scale"], edit["guidance_scale"], edit["height"], edit["width"]) == (4.0, 3.5, 32, 32)
    card = (folder / "README.md").read_text()
    assert f"accelerate launch train_duo_flux.py --concept nudity --pretrained_model_name_or_path {tiny_flux}" in card
    assert "| true CFG scale of the edit | 4.0 (the unsafe prompt as negative prompt) |" in card
    assert "--guidance_scale 3.5" in card and "--true_cfg_scale 4.0" in card  # the reproduce command

    # The edit's true CFG scale changes only the safe twins: the unsafe images are drawn without it.
    other = tmp_path / "other"
    pairs.main(pair_args(tiny_flux, other, "--resolution", "32", "--true_cfg_scale", "2"))
    assert read_recipe(other)["true_cfg_scale"] == 2.0
    for (unsafe, safe), (other_unsafe, other_safe) in zip(images, check_pair_images(other, read_rows(other), 32)):
        assert np.array_equal(unsafe, other_unsafe)
        assert not np.array_equal(safe, other_safe)


def test_family_guidance_flags_are_refused_where_they_do_nothing(tiny_sdxl, tiny_flux, tmp_path, capsys):
    from duo_plugin.testing import make_tiny_flux_pipeline

    out = tmp_path / "o"
    line = refuse(pair_args(tiny_sdxl, out, "--true_cfg_scale", "2"), capsys)
    assert "--true_cfg_scale is for FLUX.1 base models only" in line and "Stable Diffusion XL" in line
    line = refuse(pair_args(tiny_flux, out, "--resolution", "32", "--true_cfg_scale", "1"), capsys)
    assert "--true_cfg_scale 1.0 must be a finite number above 1" in line
    assert "not a multiple of 4" in refuse(pair_args(tiny_flux, out, "--resolution", "30"), capsys)
    schnell = make_tiny_flux_pipeline(str(tmp_path / "schnell"), guidance_embeds=False)
    line = refuse(pair_args(schnell, out, "--resolution", "32", "--guidance_scale", "3.5"), capsys)
    assert "no guidance embedding" in line
    assert not out.exists()  # refused before anything was written
