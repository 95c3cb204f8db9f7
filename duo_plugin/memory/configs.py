"""A base model's config files, the only thing an estimate reads (a Hub id, a pipeline folder or a flat folder of
config files such as benchmarks/configs), and what each family's pipeline and training script take from them."""

import json
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

from ..errors import UsageError


# What each family's training script adapts by default (--lora_target): the UNet's self-attention, or every
# attention projection of the transformer (SD3's joint attention, FLUX's double and single blocks).
DEFAULT_LORA_TARGET = {"sd": "self_attn", "sdxl": "self_attn", "sd3": "attn", "flux": "attn"}
TRAINING_SCRIPT = {
    "sd": "train_duo.py",
    "sdxl": "train_duo.py",
    "sd3": "train_duo_sd3.py",
    "flux": "train_duo_flux.py",
}
# T5 tokens of the inference pipelines' prompts (their max_sequence_length defaults).
INFERENCE_T5_TOKENS = {"sd3": 256, "flux": 512}
# T5 tokens of the training prompts when --max_sequence_length is not given: FLUX follows train_duo_flux.py's default
# (duo_plugin.families.flux.DEFAULT_MAX_SEQUENCE_LENGTH, 512, FluxPipeline's sampling length); SD3's estimate keeps the SD3
# pipeline's 256, an upper bound of train_duo_sd3.py's 77.
SD3_TRAINING_T5_TOKENS = 256
# The text encoders each family's pipeline has, in model_index.json's names.
TEXT_ENCODER_NAMES = {
    "sd": ("text_encoder",),
    "sdxl": ("text_encoder", "text_encoder_2"),
    "sd3": ("text_encoder", "text_encoder_2", "text_encoder_3"),
    "flux": ("text_encoder", "text_encoder_2"),
}
SDXL_TIME_IDS = 6  # original size, crop top-left, target size


@dataclass
class BaseModelConfigs:
    """The configs a DUO run builds its models from; ``family`` is "sd" (SD1/2 UNet), "sdxl" (SDXL UNet),
    "sd3" (MMDiT) or "flux" (FLUX.1 transformer)."""

    family: str
    denoiser: dict
    vae: dict
    text_encoders: Dict[str, dict]  # name -> transformers config dict (with "architectures")
    scheduler: dict = field(default_factory=dict)
    source: str = ""


def _read_config(path: str, subfolder: str, filename: str, revision=None, cache_dir=None) -> Optional[dict]:
    """``<path>/<subfolder>/<filename>`` of a pipeline folder, ``<path>/<subfolder>.json`` of a flat config
    folder (benchmarks/configs), or the file from the Hub (config files only; never weights)."""
    if os.path.isdir(path):
        for candidate in (os.path.join(path, subfolder, filename), os.path.join(path, f"{subfolder}.json")):
            if os.path.isfile(candidate):
                with open(candidate) as f:
                    return json.load(f)
        return None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    try:
        local = hf_hub_download(path, filename, subfolder=subfolder, revision=revision, cache_dir=cache_dir)
    except EntryNotFoundError:
        return None
    except Exception as error:
        raise UsageError(
            f"cannot read {subfolder}/{filename} of {path!r} ({type(error).__name__}): give a diffusers pipeline folder, "
            f"a folder of config files, or a Hub id that is cached or reachable"
        ) from None
    with open(local) as f:
        return json.load(f)


def denoiser_family(config: dict, is_transformer: bool) -> str:
    """ "flux" (FluxTransformer2DModel) or "sd3" for a transformer config; "sdxl" (a UNet conditioned on pooled text
    embeddings and time ids, ``addition_embed_type: text_time``) or "sd" for a UNet config."""
    if is_transformer:
        flux = config.get("_class_name", "").startswith("Flux") or "num_single_layers" in config
        return "flux" if flux else "sd3"
    return "sdxl" if config.get("addition_embed_type") == "text_time" else "sd"


def _read_vae_config(vae_path: str, revision=None, cache_dir=None) -> Optional[dict]:
    """A separate VAE's config (e.g. madebyollin/sdxl-vae-fp16-fix): a folder or Hub id with config.json, or the
    config file itself."""
    if os.path.isfile(vae_path):
        with open(vae_path) as f:
            return json.load(f)
    if os.path.isdir(vae_path):
        return _read_config(vae_path, "", "config.json") or _read_config(vae_path, "vae", "config.json")
    from huggingface_hub import hf_hub_download

    try:
        local = hf_hub_download(vae_path, "config.json", revision=revision, cache_dir=cache_dir)
    except Exception as error:
        raise UsageError(
            f"cannot read config.json of the VAE {vae_path!r} ({type(error).__name__}): give a folder, a config file, "
            f"or a Hub id that is cached or reachable"
        ) from None
    with open(local) as f:
        return json.load(f)


def load_base_model_configs(
    path: str, revision: Optional[str] = None, cache_dir: Optional[str] = None, vae_path: Optional[str] = None
) -> BaseModelConfigs:
    """The base model's configs; ``vae_path`` replaces its VAE's (a separate, e.g. fp16-safe, VAE)."""
    read = lambda sub, name="config.json": _read_config(path, sub, name, revision, cache_dir)  # noqa: E731
    transformer = read("transformer")
    unet = None if transformer is not None else read("unet")
    if transformer is None and unet is None:
        raise UsageError(
            f"{path!r} has neither a unet nor a transformer config: give a Stable Diffusion 1.x/2.x, SDXL, SD3 or "
            f"FLUX.1 base"
        )
    family = denoiser_family(transformer or unet, is_transformer=transformer is not None)
    vae = read("vae") if vae_path is None else _read_vae_config(vae_path, revision, cache_dir)
    if vae is None:
        raise UsageError(f"{path!r} has no vae config")
    names = TEXT_ENCODER_NAMES[family]
    model_index = read(".", "model_index.json") if not os.path.isdir(path) else None
    text_encoders = {}
    for name in names:
        if model_index is not None and (model_index.get(name) or [None])[0] is None:
            continue  # e.g. a T5-less SD3 base
        config = read(name)
        if config is not None:
            text_encoders[name] = config
    scheduler = read("scheduler", "scheduler_config.json") or {}
    return BaseModelConfigs(family, transformer or unet, vae, text_encoders, scheduler, source=path)


def text_encoder_class(config: dict):
    import transformers

    architecture = (config.get("architectures") or ["CLIPTextModel"])[0]
    if config.get("model_type") == "t5" or architecture.startswith("T5"):
        return transformers.T5EncoderModel, transformers.T5Config
    model_class = getattr(transformers, architecture, transformers.CLIPTextModel)
    return model_class, transformers.CLIPTextConfig


def vae_scale_factor(vae_config: dict) -> int:
    return 2 ** (len(vae_config.get("block_out_channels", [0, 0, 0, 0])) - 1)


def clip_length(configs: BaseModelConfigs) -> int:
    """CLIP tokens per prompt: 77 (the tokenizers pad to the position table; tiny test models have fewer)."""
    return min(77, configs.text_encoders.get("text_encoder", {}).get("max_position_embeddings", 77))


def is_t5(config: dict) -> bool:
    return config.get("model_type") == "t5" or (config.get("architectures") or [""])[0].startswith("T5")
