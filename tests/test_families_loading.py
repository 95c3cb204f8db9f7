"""Loading SDXL and FLUX.1 adapters: every route docs/loading.md documents gives stock diffusers' images, and the
architecture check refuses another family's adapter or a mismatched base with one line.

One adapter per family is trained here (train_duo.py on the tiny SDXL, train_duo_flux.py on the tiny FLUX.1) with
a high learning rate and no preservation, so that it visibly changes the images.
"""

import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import tiny_train_args, train_in_process
from test_pipeline import add_to_hub_cache, offline_cache

from duo_plugin import (
    DUOFluxPipeline,
    DUOPipeline,
    DUOStableDiffusion3Pipeline,
    DUOStableDiffusionPipeline,
    DUOStableDiffusionXLPipeline,
    active_concepts,
    load_adapters,
)
from duo_plugin.errors import UsageError
from duo_plugin.families import FAMILY_NAMES, SCRIPT_OF_FAMILY
from duo_plugin.lora import LORA_WEIGHT_NAME
from duo_plugin.outputs import DUO_CONFIG_NAME


PROMPT = "a photo of a naked woman"
FAMILIES = ("sdxl", "flux")
PIPELINE_CLASS = {"sdxl": "StableDiffusionXLPipeline", "flux": "FluxPipeline"}
DUO_CLASS = {"sdxl": DUOStableDiffusionXLPipeline, "flux": DUOFluxPipeline}
DENOISER = {"sdxl": "unet", "flux": "transformer"}
# FLUX's T5 reads 512 tokens unless told: the adapter was trained with 16, and 16 is faster.
CALL_KWARGS = {"sdxl": {"guidance_scale": 5.0}, "flux": {"guidance_scale": 3.5, "max_sequence_length": 16}}
TRAIN_EXTRA = {"sdxl": ("train_duo.py",), "flux": ("train_duo_flux.py", "--max_sequence_length", "16")}


def stock_class(family):
    import diffusers

    return getattr(diffusers, PIPELINE_CLASS[family])


def generate(pipe, family, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        PROMPT,
        num_inference_steps=2,
        height=32,
        width=32,
        generator=generator,
        output_type="np",
        **CALL_KWARGS[family],
    ).images


def configs_only_copy(source, destination, edit=None):
    """The pipeline folder's JSON files only (a refusal must come before any weight is read), ``edit``ed:
    {relative path: {key: value}}."""
    shutil.copytree(source, destination, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    for relative, changes in (edit or {}).items():
        path = os.path.join(destination, relative)
        with open(path) as f:
            config = json.load(f)
        config.update(changes)
        with open(path, "w") as f:
            json.dump(config, f)
    return str(destination)


@pytest.fixture(scope="module")
def trained(tiny_sdxl, tiny_flux, tiny_pairs, tmp_path_factory):
    """{family: (base folder, adapter folder)}, each adapter trained once for the module."""
    root = tmp_path_factory.mktemp("families_loading")
    bases = {"sdxl": tiny_sdxl, "flux": tiny_flux}
    result = {}
    for family in FAMILIES:
        script, *extra = TRAIN_EXTRA[family]
        output_dir = root / f"{family}_nudity"
        args = tiny_train_args(
            bases[family],
            tiny_pairs,
            output_dir,
            "--preservation_weight",
            "0",
            "--learning_rate",
            "1e-2",
            "--skip_validation",
            *extra,
        )
        train_in_process(script, args)
        result[family] = (bases[family], output_dir)
    return result


@pytest.fixture(scope="module")
def images(trained):
    """{family: {"base": ..., "stock": ...}}: the base alone, and stock diffusers' load_lora_weights(adapter_dir)."""
    result = {}
    for family, (base, adapter) in trained.items():
        pipe = stock_class(family).from_pretrained(base)
        base_image = generate(pipe, family)
        pipe.load_lora_weights(str(adapter))
        result[family] = {"base": base_image, "stock": generate(pipe, family)}
    return result


def test_the_adapters_record_their_family(trained):
    for family, (base, adapter) in trained.items():
        config = json.loads((adapter / DUO_CONFIG_NAME).read_text())
        architecture = config["architecture"]
        assert architecture["family"] == family and architecture["pipeline_class"] == PIPELINE_CLASS[family]
        assert architecture["denoiser"] == DENOISER[family] and config["base_model"] == base
        from safetensors import safe_open

        with safe_open(str(adapter / LORA_WEIGHT_NAME), "pt") as weights:
            assert {key.split(".")[0] for key in weights.keys()} == {DENOISER[family]}


@pytest.mark.parametrize("family", FAMILIES)
def test_every_route_equals_stock_load_lora_weights(family, trained, images):
    from diffusers import DiffusionPipeline

    base, adapter = trained[family]
    expected = images[family]["stock"]
    # The adapter changes the output: the comparisons below are not base against base.
    assert np.isfinite(expected).all()
    assert np.abs(expected - images[family]["base"]).max() > 1e-3

    # One call, the base read from duo_config.json.
    pipe = DUOPipeline.from_pretrained(str(adapter))
    assert type(pipe) is stock_class(family)
    assert active_concepts(pipe) == {"nudity": 1.0} and pipe.get_active_adapters() == ["nudity"]
    np.testing.assert_allclose(generate(pipe, family), expected, atol=1e-6)

    # diffusers' own entry, then the plugin.
    pipe = DiffusionPipeline.from_pretrained(base)
    assert type(pipe) is stock_class(family)
    assert load_adapters(pipe, str(adapter)) is pipe
    np.testing.assert_allclose(generate(pipe, family), expected, atol=1e-6)

    # Base first, through the family's class.
    pipe = DUO_CLASS[family].from_pretrained(base, duo_adapters=str(adapter))
    assert type(pipe) is stock_class(family)
    np.testing.assert_allclose(generate(pipe, family), expected, atol=1e-6)

    # Fused into the base weights: no LoRA layers left, the same images up to rounding.
    pipe = DUOPipeline.from_pretrained(str(adapter), fuse=True)
    assert pipe.get_list_adapters() == {} and active_concepts(pipe) == {"nudity": 1.0}
    np.testing.assert_allclose(generate(pipe, family), expected, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_loads_by_hub_repo_id_offline(family, trained, images, tmp_path):
    base, adapter = trained[family]
    cache = tmp_path / "hub"
    base_repo, adapter_repo = f"duo-test/tiny-{family}", f"duo-test/{family}-duo-nudity"
    base_commit = add_to_hub_cache(cache, base_repo, base)
    published = tmp_path / "published"
    shutil.copytree(adapter, published, ignore=shutil.ignore_patterns("logs"))
    config = json.loads((published / DUO_CONFIG_NAME).read_text())
    config.update(base_model=base_repo, base_model_revision=base_commit)
    (published / DUO_CONFIG_NAME).write_text(json.dumps(config))
    adapter_commit = add_to_hub_cache(cache, adapter_repo, published)
    with offline_cache(cache):
        pipe = DUOPipeline.from_pretrained(adapter_repo)
    assert type(pipe) is stock_class(family) and pipe.duo_concepts["nudity"].commit == adapter_commit
    np.testing.assert_allclose(generate(pipe, family), images[family]["stock"], atol=1e-6)


def refusal(call, *args, **kwargs) -> str:
    with pytest.raises(UsageError) as info:
        call(*args, **kwargs)
    message = str(info.value)
    assert "\n" not in message, message
    return message


def test_another_familys_adapter_is_refused_before_any_weight(trained, tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    (sdxl_base, sdxl_adapter), (flux_base, flux_adapter) = trained["sdxl"], trained["flux"]
    # Configs only: reading a weight would fail differently.
    flux_configs = configs_only_copy(flux_base, tmp_path / "flux_configs")
    sdxl_configs = configs_only_copy(sdxl_base, tmp_path / "sdxl_configs")
    sd_configs = configs_only_copy(tiny_sd, tmp_path / "sd_configs")
    for adapter, base, families in (
        (sdxl_adapter, flux_configs, "family sdxl vs flux"),
        (flux_adapter, sdxl_configs, "family flux vs sdxl"),
        (sdxl_adapter, sd_configs, "family sdxl vs sd"),
        (flux_adapter, sd_configs, "family flux vs sd"),
    ):
        message = refusal(DUOPipeline.from_pretrained, str(adapter), base_model=base)
        assert f"({families}; adapter vs base): load it onto its own base model" in message, message

    # Onto a pipeline already loaded: refused, and nothing is left on it.
    sd = StableDiffusionPipeline.from_pretrained(tiny_sd)
    for adapter, family in ((sdxl_adapter, "sdxl"), (flux_adapter, "flux")):
        assert f"family {family} vs sd" in refusal(load_adapters, sd, str(adapter))
    assert sd.get_list_adapters() == {}


def test_a_mismatched_base_of_the_same_family_is_refused(trained, tmp_path):
    (sdxl_base, sdxl_adapter), (flux_base, flux_adapter) = trained["sdxl"], trained["flux"]
    # An SDXL base with another micro-conditioning width (as the refiner's 2560 against the base's 2816).
    other_sdxl = configs_only_copy(
        sdxl_base, tmp_path / "sdxl_other", {"unet/config.json": {"projection_class_embeddings_input_dim": 96}}
    )
    message = refusal(DUOPipeline.from_pretrained, str(sdxl_adapter), base_model=other_sdxl)
    assert "projection_class_embeddings_input_dim 80 vs 96; adapter vs base" in message, message
    # A v-prediction SDXL scheduler.
    v_sdxl = configs_only_copy(
        sdxl_base, tmp_path / "sdxl_v", {"scheduler/scheduler_config.json": {"prediction_type": "v_prediction"}}
    )
    message = refusal(DUOPipeline.from_pretrained, str(sdxl_adapter), base_model=v_sdxl)
    assert "prediction_type epsilon vs v_prediction" in message, message
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_base)
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    assert "prediction_type epsilon vs v_prediction" in refusal(load_adapters, pipe, str(sdxl_adapter))
    assert pipe.get_list_adapters() == {}

    # A [dev] adapter on a [schnell]-like base (no guidance embedding), and a deeper FLUX transformer.
    schnell = configs_only_copy(
        flux_base, tmp_path / "schnell", {"transformer/config.json": {"guidance_embeds": False}}
    )
    message = refusal(DUOFluxPipeline.from_pretrained, schnell, duo_adapters=str(flux_adapter))
    assert "guidance_embeds True vs False; adapter vs base" in message, message
    deeper = configs_only_copy(flux_base, tmp_path / "deeper", {"transformer/config.json": {"num_single_layers": 3}})
    message = refusal(DUOPipeline.from_pretrained, str(flux_adapter), base_model=deeper)
    assert "num_single_layers 2 vs 3" in message, message


def test_family_classes_refuse_another_familys_base(trained):
    (sdxl_base, sdxl_adapter), (flux_base, flux_adapter) = trained["sdxl"], trained["flux"]
    message = refusal(DUOFluxPipeline.from_pretrained, sdxl_base, duo_adapters=str(sdxl_adapter))
    assert message.startswith("DUOFluxPipeline loads FLUX.1 bases, but ")
    assert "is a StableDiffusionXLPipeline: use DUOStableDiffusionXLPipeline.from_pretrained or DUOPipeline" in message
    message = refusal(DUOStableDiffusionXLPipeline.from_pretrained, flux_base, duo_adapters=str(flux_adapter))
    assert "DUOStableDiffusionXLPipeline loads Stable Diffusion XL bases" in message
    assert "use DUOFluxPipeline.from_pretrained or DUOPipeline.from_pretrained" in message
    for klass in (DUOStableDiffusionPipeline, DUOStableDiffusion3Pipeline):
        assert f"{klass.__name__} loads" in refusal(klass.from_pretrained, sdxl_base, duo_adapters=str(sdxl_adapter))


def test_messages_list_every_family_and_script(trained, tmp_path):
    _, adapter = trained["sdxl"]
    unknown = tmp_path / "unknown_family"
    shutil.copytree(adapter, unknown, ignore=shutil.ignore_patterns("logs"))
    config = json.loads((unknown / DUO_CONFIG_NAME).read_text())
    config["architecture"]["family"] = "kandinsky"
    (unknown / DUO_CONFIG_NAME).write_text(json.dumps(config))
    message = refusal(DUOPipeline.from_pretrained, str(unknown))
    assert "model family 'kandinsky'; duo_plugin loads sd, sdxl, sd3, flux adapters" in message, message
    for script in set(SCRIPT_OF_FAMILY.values()):
        assert script in message, (script, message)

    not_an_adapter = tmp_path / "plain"
    not_an_adapter.mkdir()
    message = refusal(DUOPipeline.from_pretrained, str(not_an_adapter))
    for script in set(SCRIPT_OF_FAMILY.values()):
        assert script in message, (script, message)

    other = configs_only_copy(
        trained["sdxl"][0], tmp_path / "other_base", {"model_index.json": {"_class_name": "KandinskyPipeline"}}
    )
    message = refusal(DUOPipeline.from_pretrained, str(adapter), base_model=other)
    assert "is a KandinskyPipeline; DUO adapters apply to " in message
    for name in FAMILY_NAMES.values():
        assert name in message, (name, message)
