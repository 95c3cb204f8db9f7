"""The models a benchmark runs: tiny pipelines (as the tests build them) or full size from the published configs."""

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict


BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
CONFIG_DIR = BENCHMARKS_DIR / "configs"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from duo_plugin import data  # noqa: E402
from duo_plugin.errors import UsageError  # noqa: E402


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
    from diffusers import (
        DDPMScheduler,
        FlowMatchEulerDiscreteScheduler,
        StableDiffusion3Pipeline,
        StableDiffusionPipeline,
    )

    from duo_plugin.testing import make_tiny_sd3_pipeline, make_tiny_sd_pipeline

    path = os.path.join(workdir, f"tiny-{family}")
    if family == "sd":
        pipeline = StableDiffusionPipeline.from_pretrained(make_tiny_sd_pipeline(path))
        return ModelBundle(
            name="tiny-sd",
            family="sd",
            denoiser=pipeline.unet,
            vae=pipeline.vae,
            text_encoders={"text_encoder": pipeline.text_encoder},
            tokenizers={"tokenizer": pipeline.tokenizer},
            noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config),
            native_resolution=32,
            full_size=False,
            pipeline_scheduler=pipeline.scheduler,
        )
    pipeline = StableDiffusion3Pipeline.from_pretrained(make_tiny_sd3_pipeline(path))
    return ModelBundle(
        name="tiny-sd3",
        family="sd3",
        denoiser=pipeline.transformer,
        vae=pipeline.vae,
        text_encoders={name: getattr(pipeline, name) for name in ("text_encoder", "text_encoder_2", "text_encoder_3")},
        tokenizers={name: getattr(pipeline, name) for name in ("tokenizer", "tokenizer_2", "tokenizer_3")},
        noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config),
        native_resolution=32,
        full_size=False,
        pipeline_scheduler=pipeline.scheduler,
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
            name=name,
            family="sd",
            denoiser=build(lambda: UNet2DConditionModel.from_config(read_config(config_dir, "unet")), weight_dtype),
            vae=build(lambda: AutoencoderKL.from_config(read_config(config_dir, "vae")), weight_dtype),
            text_encoders={
                "text_encoder": build(
                    lambda: CLIPTextModel(CLIPTextConfig.from_dict(read_config(config_dir, "text_encoder"))),
                    weight_dtype,
                )
            },
            tokenizers={"tokenizer": tiny_clip_tokenizer(model_max_length=77)},
            noise_scheduler=DDPMScheduler.from_config(read_config(config_dir, "scheduler")),
            pipeline_scheduler=PNDMScheduler.from_config(read_config(config_dir, "scheduler")),
            native_resolution=512,
            full_size=True,
        )
    if name == "sd3-medium":
        config_dir = "sd3-medium"

        def clip(config_name):
            return lambda: CLIPTextModelWithProjection(CLIPTextConfig.from_dict(read_config(config_dir, config_name)))

        return ModelBundle(
            name=name,
            family="sd3",
            denoiser=build(
                lambda: SD3Transformer2DModel.from_config(read_config(config_dir, "transformer")), weight_dtype
            ),
            # train_duo_sd3.py keeps the SD3 VAE in fp32.
            vae=build(lambda: AutoencoderKL.from_config(read_config(config_dir, "vae")), torch.float32),
            text_encoders={
                "text_encoder": build(clip("text_encoder"), weight_dtype),
                "text_encoder_2": build(clip("text_encoder_2"), weight_dtype),
                "text_encoder_3": build(
                    lambda: T5EncoderModel(T5Config.from_dict(read_config(config_dir, "text_encoder_3"))), weight_dtype
                ),
            },
            tokenizers={
                "tokenizer": tiny_clip_tokenizer(model_max_length=77),
                "tokenizer_2": tiny_clip_tokenizer(model_max_length=77),
                "tokenizer_3": tiny_t5_tokenizer(model_max_length=256),
            },
            noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(read_config(config_dir, "scheduler")),
            pipeline_scheduler=FlowMatchEulerDiscreteScheduler.from_config(read_config(config_dir, "scheduler")),
            native_resolution=1024,
            full_size=True,
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

    folder = make_tiny_pair_folder(
        os.path.join(workdir, f"pairs-{resolution}"), num_pairs=num_pairs, resolution=resolution, seed=seed
    )
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
