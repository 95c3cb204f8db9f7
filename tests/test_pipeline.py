"""duo_plugin.pipeline: unlearned models from the Hub in one call, offline, and safely.

A temporary Hugging Face cache in the Hub's own layout holds a tiny base pipeline and adapters trained
here by train_duo.py against that base's repo id; everything is then loaded by repo id with the Hub
offline, and compared with stock diffusers (load_lora_weights + set_adapters) on the same base.
"""

import contextlib
import hashlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import run_process, tiny_train_args, train_in_process

from duo_plugin.errors import UsageError
from duo_plugin.lora import LORA_WEIGHT_NAME
from duo_plugin.outputs import DUO_CONFIG_NAME
from duo_plugin.pipeline import (
    DUOPipeline,
    DUOStableDiffusion3Pipeline,
    DUOStableDiffusionPipeline,
    active_concepts,
    load_adapters,
)


BASE = "duo-test/tiny-sd"
NUDITY = "duo-test/sd-duo-nudity"
BLOOD = "duo-test/sd-duo-blood"
PROMPT = "a photo of a naked woman"
ADAPTER_FILES = (LORA_WEIGHT_NAME, DUO_CONFIG_NAME, "README.md")
# transformers' AutoTokenizer (in the training scripts) looks for a model config next to the tokenizer;
# SD repos have none, which the cache of an online run records.
SD_ABSENT = ("tokenizer/config.json",)
SD3_ABSENT = ("tokenizer/config.json", "tokenizer_2/config.json", "tokenizer_3/config.json")


def add_to_hub_cache(cache_dir, repo_id, folder, commit=None, ref="main", only=None, absent=()):
    """Store ``folder`` as one commit of ``repo_id`` in the Hub cache layout that hf_hub_download reads.

    ``models--owner--name/blobs/<hash>`` holds the contents, ``snapshots/<commit>/<path>`` links to them,
    and ``refs/<ref>`` names the commit. ``only`` keeps the files whose name ends with one of its entries.
    ``absent`` lists paths to record in ``.no_exist/<commit>/``, as an online lookup of a file the repo
    lacks does: offline, such a lookup then finds "no such file" instead of "not cached".
    """
    storage = os.path.join(cache_dir, "models--" + repo_id.replace("/", "--"))
    files = []
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            if only is None or name.endswith(tuple(only)):
                files.append((os.path.relpath(path, folder), path))
    if commit is None:
        listing = hashlib.sha1(repo_id.encode())
        for relative, path in files:
            listing.update(relative.encode())
            with open(path, "rb") as f:
                listing.update(f.read())
        commit = listing.hexdigest()
    os.makedirs(os.path.join(storage, "blobs"), exist_ok=True)
    for relative, path in files:
        with open(path, "rb") as f:
            blob = os.path.join(storage, "blobs", hashlib.sha256(f.read()).hexdigest())
        if not os.path.exists(blob):
            shutil.copyfile(path, blob)
        link = os.path.join(storage, "snapshots", commit, relative)
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    for relative in absent:
        marker = os.path.join(storage, ".no_exist", commit, relative)
        os.makedirs(os.path.dirname(marker), exist_ok=True)
        open(marker, "w").close()
    os.makedirs(os.path.join(storage, "refs"), exist_ok=True)
    with open(os.path.join(storage, "refs", ref), "w") as f:
        f.write(commit)
    return commit


@contextlib.contextmanager
def offline_cache(cache):
    """The default Hub cache is ``cache`` and the Hub is unreachable (HF_HUB_OFFLINE=1).

    huggingface_hub reads both variables when imported, so its constants are set too.
    """
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("HF_HUB_CACHE", str(cache))
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        yield


def train_adapter(cache, base_repo, pairs, output_dir, script="train_duo.py", *extra):
    """The script's main() in process, loading the base by repo id from the offline cache."""
    args = tiny_train_args(
        base_repo,
        pairs,
        output_dir,
        "--preservation_weight",
        "0",
        "--learning_rate",
        "1e-2",
        "--skip_validation",
        *extra,
    )
    with offline_cache(cache):
        train_in_process(script, args)
    return output_dir


@pytest.fixture(scope="module")
def hub(tiny_pairs, tmp_path_factory):
    """A Hub cache with the tiny base, two adapters trained on it by repo id, and the repos the refusals need."""
    from duo_plugin.testing import make_tiny_sd_pipeline

    root = tmp_path_factory.mktemp("pipeline")
    cache = root / "hub"
    base_dir = make_tiny_sd_pipeline(str(root / "base"))
    add_to_hub_cache(cache, BASE, base_dir, absent=SD_ABSENT)
    nudity = train_adapter(
        cache, BASE, tiny_pairs, root / "nudity", "train_duo.py", "--concept", "nudity", "--seed", "1"
    )
    blood = train_adapter(cache, BASE, tiny_pairs, root / "blood", "train_duo.py", "--concept", "blood", "--seed", "2")
    commits = {
        NUDITY: add_to_hub_cache(cache, NUDITY, nudity, only=ADAPTER_FILES),
        BLOOD: add_to_hub_cache(cache, BLOOD, blood, only=ADAPTER_FILES),
    }

    # A repo with two commits: the older holds the nudity adapter, main the blood one.
    commits["old"] = add_to_hub_cache(cache, "duo-test/sd-duo-history", nudity, commit="a" * 40, only=ADAPTER_FILES)
    add_to_hub_cache(cache, "duo-test/sd-duo-history", blood, commit="b" * 40, only=ADAPTER_FILES)

    # The same adapter offering pickle weights only.
    pickle_only = root / "pickle_only"
    pickle_only.mkdir()
    shutil.copy(nudity / DUO_CONFIG_NAME, pickle_only)
    from safetensors.torch import load_file

    torch.save(load_file(nudity / LORA_WEIGHT_NAME), pickle_only / "pytorch_lora_weights.bin")
    add_to_hub_cache(cache, "duo-test/pickle-only", pickle_only)

    # Bases of another architecture, configs only: a refusal must come before any weight is needed.
    wide_dir = make_tiny_sd_pipeline(str(root / "wide"), cross_attention_dim=48)
    add_to_hub_cache(cache, "duo-test/tiny-sd-wide", wide_dir, only=(".json",))
    return {
        "cache": cache,
        "root": root,
        "base_dir": base_dir,
        "wide_dir": wide_dir,
        "nudity": nudity,
        "blood": blood,
        "commits": commits,
    }


@pytest.fixture(scope="module", autouse=True)
def offline_hub_cache(hub):
    """The default cache is the test's, and the Hub is unreachable."""
    with offline_cache(hub["cache"]):
        yield


def generate(pipe, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=generator, output_type="np").images


def stock_pipeline(adapters=None, weights=None, base=BASE):
    """What a diffusers user writes by hand: the base, load_lora_weights per adapter, set_adapters."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(base)
    for name, repo in (adapters or {}).items():
        pipe.load_lora_weights(repo, weight_name=LORA_WEIGHT_NAME, adapter_name=name)
    if adapters:
        pipe.set_adapters(list(adapters), weights)
    return pipe


@pytest.fixture(scope="module")
def images(hub, offline_hub_cache):
    """Reference images from stock diffusers."""
    return {
        "base": generate(stock_pipeline()),
        "nudity": generate(stock_pipeline({"nudity": NUDITY}, [1.0])),
        "blood": generate(stock_pipeline({"blood": BLOOD}, [1.0])),
        "both": generate(stock_pipeline({"nudity": NUDITY, "blood": BLOOD}, [0.7, 0.4])),
    }


def test_cache_is_the_hub_layout_and_configs_name_the_repo(hub):
    storage = hub["cache"] / "models--duo-test--sd-duo-nudity"
    commit = (storage / "refs" / "main").read_text()
    assert commit == hub["commits"][NUDITY]
    weights = storage / "snapshots" / commit / LORA_WEIGHT_NAME
    assert weights.is_symlink() and weights.resolve().parent == (storage / "blobs").resolve()
    # Trained against the cached repo id, so the adapter's config points at the Hub base.
    config = json.loads((storage / "snapshots" / commit / DUO_CONFIG_NAME).read_text())
    assert config["base_model"] == BASE and config["concept"] == "nudity"
    assert config["architecture"]["cross_attention_dim"] == 32


def test_loads_by_repo_id_offline_like_stock_diffusers(hub, images):
    from diffusers import StableDiffusionPipeline

    pipe = DUOPipeline.from_pretrained(NUDITY)
    assert type(pipe) is StableDiffusionPipeline
    assert pipe.get_active_adapters() == ["nudity"]
    assert active_concepts(pipe) == {"nudity": 1.0}
    record = pipe.duo_concepts["nudity"]
    assert record.source == NUDITY and record.commit == hub["commits"][NUDITY] and not record.fused
    image = generate(pipe)
    np.testing.assert_allclose(image, images["nudity"], atol=1e-6)
    # The adapter changes the output: the comparison above is not base against base.
    assert np.abs(images["nudity"] - images["base"]).max() > 1e-3


@pytest.mark.slow
def test_a_fresh_process_with_hf_hub_offline_loads_by_repo_id(hub, images, tmp_path):
    """The user's case: only environment variables, no patched constants."""
    import sys

    script = (
        "import sys, numpy, torch\n"
        "from duo_plugin.pipeline import DUOPipeline\n"
        f"pipe = DUOPipeline.from_pretrained({NUDITY!r})\n"
        f"image = pipe({PROMPT!r}, num_inference_steps=3, guidance_scale=5.0, generator=torch.Generator().manual_seed(0), output_type='np').images\n"
        "numpy.save(sys.argv[1], image)\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub["cache"]), "OMP_NUM_THREADS": "1"}
    result = run_process([sys.executable, "-c", script, str(tmp_path / "image.npy")], env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    # Another process may use another number of threads, which reorders float sums (seen: 1.3e-6).
    np.testing.assert_allclose(np.load(tmp_path / "image.npy"), images["nudity"], atol=1e-5)


def test_loads_from_the_training_output_folder(hub, images):
    pipe = DUOPipeline.from_pretrained(str(hub["nudity"]))
    np.testing.assert_allclose(generate(pipe), images["nudity"], atol=1e-6)
    assert pipe.duo_concepts["nudity"].commit is None


def test_two_adapters_compose_with_weights(hub, images):
    pipe = DUOPipeline.from_pretrained(
        {"nudity": NUDITY, "blood": BLOOD}, adapter_weights={"nudity": 0.7, "blood": 0.4}
    )
    assert sorted(pipe.get_active_adapters()) == ["blood", "nudity"]
    assert active_concepts(pipe) == {"nudity": 0.7, "blood": 0.4}
    both = generate(pipe)
    np.testing.assert_allclose(both, images["both"], atol=1e-6)
    for alone in ("nudity", "blood", "base"):
        assert np.abs(both - images[alone]).max() > 1e-3, alone

    # The listing follows diffusers' own adapter calls.
    pipe.set_adapters(["blood"], [0.25])
    assert active_concepts(pipe) == {"blood": 0.25}
    pipe.disable_lora()
    assert active_concepts(pipe) == {}


def test_fused_equals_unfused_and_leaves_no_lora_layers(hub, images):
    from peft.tuners.tuners_utils import BaseTunerLayer

    pipe = DUOPipeline.from_pretrained([NUDITY, BLOOD], adapter_weights=[0.7, 0.4], fuse=True)
    assert not any(isinstance(m, BaseTunerLayer) for m in pipe.unet.modules())
    assert pipe.get_list_adapters() == {}
    assert active_concepts(pipe) == {"nudity": 0.7, "blood": 0.4}
    assert all(record.fused for record in pipe.duo_concepts.values())
    np.testing.assert_allclose(generate(pipe), images["both"], atol=1e-4)


def test_revision_pins_the_adapter_commit(hub, images):
    history = "duo-test/sd-duo-history"
    latest = DUOPipeline.from_pretrained(history)
    assert list(active_concepts(latest)) == ["blood"]
    np.testing.assert_allclose(generate(latest), images["blood"], atol=1e-6)
    pinned = DUOPipeline.from_pretrained(history, adapter_revision=hub["commits"]["old"])
    assert pinned.duo_concepts["nudity"].commit == hub["commits"]["old"]
    np.testing.assert_allclose(generate(pinned), images["nudity"], atol=1e-6)


def test_base_revision_comes_from_the_config_unless_given(hub, images, tmp_path):
    # main of this base repo is an incompatible (wider) model; the adapter was trained on an older commit.
    repo = "duo-test/tiny-sd-revisions"
    trained_on = add_to_hub_cache(hub["cache"], repo, hub["base_dir"], commit="c" * 40, absent=SD_ABSENT)
    add_to_hub_cache(hub["cache"], repo, hub["wide_dir"], commit="d" * 40, only=(".json",))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ADAPTER_FILES:
        shutil.copy(hub["nudity"] / name, adapter)
    config = json.loads((adapter / DUO_CONFIG_NAME).read_text())
    config.update(base_model=repo, base_model_revision=trained_on)
    (adapter / DUO_CONFIG_NAME).write_text(json.dumps(config))

    pipe = DUOPipeline.from_pretrained(str(adapter))
    np.testing.assert_allclose(generate(pipe), images["nudity"], atol=1e-6)
    with pytest.raises(UsageError, match="cross_attention_dim 32 vs 48"):
        DUOPipeline.from_pretrained(str(adapter), revision="main")


def test_load_adapters_onto_a_pipeline_you_have(hub, images):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(hub["base_dir"])
    assert load_adapters(pipe, NUDITY) is pipe
    np.testing.assert_allclose(generate(pipe), images["nudity"], atol=1e-6)
    # A second call adds to the active adapters instead of replacing them.
    load_adapters(pipe, BLOOD, weights=0.4)
    pipe.set_adapters(["nudity", "blood"], [0.7, 0.4])
    assert active_concepts(pipe) == {"nudity": 0.7, "blood": 0.4}
    np.testing.assert_allclose(generate(pipe), images["both"], atol=1e-6)
    with pytest.raises(UsageError, match="already has adapters named \\['nudity'\\]"):
        load_adapters(pipe, NUDITY)
    with pytest.raises(UsageError, match="fuse=True would also merge"):
        load_adapters(pipe, {"again": NUDITY}, fuse=True)


def test_explicit_base_and_family_class(hub, images):
    pipe = DUOStableDiffusionPipeline.from_pretrained(hub["base_dir"], duo_adapters=NUDITY)
    np.testing.assert_allclose(generate(pipe), images["nudity"], atol=1e-6)
    with pytest.raises(UsageError, match="DUOStableDiffusion3Pipeline loads Stable Diffusion 3 bases"):
        DUOStableDiffusion3Pipeline.from_pretrained(BASE, duo_adapters=NUDITY)


def test_pickle_only_adapter_is_refused(hub, tmp_path):
    with pytest.raises(UsageError, match="offers only pickle weights \\(pytorch_lora_weights.bin\\).*arbitrary code"):
        DUOPipeline.from_pretrained("duo-test/pickle-only")
    local = tmp_path / "local_pickle"
    shutil.copytree(hub["root"] / "pickle_only", local)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(hub["base_dir"])
    with pytest.raises(UsageError, match="offers only pickle weights"):
        load_adapters(pipe, str(local))
    assert pipe.get_list_adapters() == {}


def test_unsafe_or_missing_bases_are_refused(hub, tmp_path):
    from diffusers import UNet2DConditionModel

    pickle_base = tmp_path / "pickle_base"
    shutil.copytree(hub["base_dir"], pickle_base)
    unet = UNet2DConditionModel.from_pretrained(pickle_base, subfolder="unet")
    os.remove(pickle_base / "unet" / "diffusion_pytorch_model.safetensors")
    unet.save_pretrained(pickle_base / "unet", safe_serialization=False)
    with pytest.raises(UsageError, match="lacks safetensors weights.*arbitrary code"):
        DUOPipeline.from_pretrained(NUDITY, base_model=str(pickle_base))

    foreign = tmp_path / "foreign_base"
    shutil.copytree(hub["base_dir"], foreign)
    index = json.loads((foreign / "model_index.json").read_text())
    index["text_encoder"] = ["my_encoders", "Encoder"]
    (foreign / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(UsageError, match="outside diffusers and transformers.*never runs code"):
        DUOPipeline.from_pretrained(NUDITY, base_model=str(foreign))

    moved = tmp_path / "adapter_of_a_local_base"
    shutil.copytree(hub["nudity"], moved, ignore=shutil.ignore_patterns("logs"))
    config = json.loads((moved / DUO_CONFIG_NAME).read_text())
    config["base_model"] = str(tmp_path / "gone" / "tiny_sd")
    (moved / DUO_CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(
        UsageError, match="trained on the local folder .*gone/tiny_sd, which is not here: pass base_model="
    ):
        DUOPipeline.from_pretrained(str(moved))
    with pytest.raises(UsageError, match="duo-test/tiny-sd-absent .*not in the local Hugging Face cache"):
        DUOPipeline.from_pretrained(NUDITY, base_model="duo-test/tiny-sd-absent")


def test_architecture_mismatch_is_refused_before_any_weight(hub):
    # The wide base is cached with its configs only: reading a weight would fail differently.
    with pytest.raises(UsageError, match="cross_attention_dim 32 vs 48; adapter vs base"):
        DUOPipeline.from_pretrained(NUDITY, base_model="duo-test/tiny-sd-wide")
    from diffusers import StableDiffusionPipeline

    wide = StableDiffusionPipeline.from_pretrained(hub["wide_dir"])
    with pytest.raises(UsageError, match="cross_attention_dim 32 vs 48"):
        load_adapters(wide, NUDITY)
    assert wide.get_list_adapters() == {}


def test_prediction_type_mismatch_is_refused(hub, tmp_path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(hub["base_dir"])
    pipe.scheduler.register_to_config(prediction_type="v_prediction")
    with pytest.raises(UsageError, match="prediction_type epsilon vs v_prediction"):
        load_adapters(pipe, NUDITY)


def test_sd_adapter_on_sd3_base_is_refused(hub):
    from duo_plugin import testing

    sd3_dir = testing.make_tiny_sd3_pipeline(str(hub["root"] / "sd3_configs"), with_t5=False)
    add_to_hub_cache(hub["cache"], "duo-test/tiny-sd3-configs", sd3_dir, only=(".json",))
    with pytest.raises(UsageError, match="family sd vs sd3"):
        DUOPipeline.from_pretrained(NUDITY, base_model="duo-test/tiny-sd3-configs")


def test_refusals(hub, tmp_path):
    for kwargs, message in (
        ({"trust_remote_code": True}, "never runs code from a repository"),
        ({"custom_pipeline": "lpw_stable_diffusion"}, "never runs code from a repository"),
        ({"use_safetensors": False}, "safetensors only"),
        ({"adapter_weights": [0.5, 0.5]}, "one adapter weight per adapter"),
        ({"adapter_weights": {"violence": 0.5}}, "not among the concepts \\['nudity'\\]"),
        ({"adapter_weights": float("nan")}, "finite"),
        ({"adapter_revision": "v2"}, "has no revision|not in the local Hugging Face cache"),
    ):
        with pytest.raises(UsageError, match=message):
            DUOPipeline.from_pretrained(NUDITY, **kwargs)
    with pytest.raises(UsageError, match="not in the local Hugging Face cache.*hf download duo-test/absent"):
        DUOPipeline.from_pretrained("duo-test/absent")
    with pytest.raises(UsageError, match="two adapters are named 'nudity'"):
        DUOPipeline.from_pretrained([NUDITY, str(hub["nudity"])])
    plain = tmp_path / "plain_lora"
    plain.mkdir()
    shutil.copy(hub["nudity"] / LORA_WEIGHT_NAME, plain)
    with pytest.raises(UsageError, match="not a DUO adapter"):
        DUOPipeline.from_pretrained(str(plain))
    with pytest.raises(EnvironmentError, match="from_pretrained"):
        DUOPipeline()


def test_sd3_adapter_loads_onto_its_base(hub, tiny_pairs):
    from diffusers import StableDiffusion3Pipeline

    from duo_plugin import testing

    root, cache = hub["root"], hub["cache"]
    base_dir = testing.make_tiny_sd3_pipeline(str(root / "sd3_base"))
    add_to_hub_cache(cache, "duo-test/tiny-sd3", base_dir, absent=SD3_ABSENT)
    adapter = train_adapter(
        cache, "duo-test/tiny-sd3", tiny_pairs, root / "sd3_nudity", "train_duo_sd3.py", "--concept", "nudity"
    )
    add_to_hub_cache(cache, "duo-test/sd3-duo-nudity", adapter, only=ADAPTER_FILES)

    pipe = DUOPipeline.from_pretrained("duo-test/sd3-duo-nudity")
    assert type(pipe) is StableDiffusion3Pipeline and active_concepts(pipe) == {"nudity": 1.0}
    stock = StableDiffusion3Pipeline.from_pretrained("duo-test/tiny-sd3")
    base_image = generate(stock)
    stock.load_lora_weights("duo-test/sd3-duo-nudity", weight_name=LORA_WEIGHT_NAME, adapter_name="nudity")
    stock.set_adapters(["nudity"], [1.0])
    image = generate(pipe)
    np.testing.assert_allclose(image, generate(stock), atol=1e-6)
    assert np.abs(image - base_image).max() > 1e-4
    fused = DUOPipeline.from_pretrained("duo-test/sd3-duo-nudity", fuse=True)
    np.testing.assert_allclose(generate(fused), image, atol=1e-4)
    with pytest.raises(UsageError, match="family sd3 vs sd"):
        DUOPipeline.from_pretrained("duo-test/sd3-duo-nudity", base_model=BASE)
