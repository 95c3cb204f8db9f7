"""Stable Diffusion 1.x/2.x (UNet, ε- or v-prediction): the DUO batch, the forward pass, the adapter's file.

``train_duo.py`` shows the loop; these are the pieces of its step that benchmarks and tests use too.
"""

from dataclasses import dataclass

import torch

from . import objective
from .lora import LORA_WEIGHT_NAME, adapters_disabled


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts, device):
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return text_encoder(tokens.input_ids.to(device))[0]


@dataclass
class DUOBatch:
    """One micro-step's inputs: the concatenated [x⁻_t; x⁺_t; x_T] batch and the pair targets."""

    model_input: torch.Tensor
    timesteps: torch.Tensor
    condition: torch.Tensor
    target: torch.Tensor


def make_duo_batch(
    latents_cache, pair_indices, generator, noise_scheduler, t_min, t_max, empty_embedding, pair_condition=None
):
    """Sample the pairs' latents, one noise and one timestep per pair (shared by both images), and pure noise
    at the last training timestep for the preservation branch. All draws come from ``generator``."""
    num_pairs = len(pair_indices)
    flips = torch.randint(0, latents_cache.mean.shape[1], (num_pairs,), generator=generator)
    unsafe_latents, safe_latents = latents_cache.sample(pair_indices, flips, generator)
    noise = torch.randn(unsafe_latents.shape, generator=generator)
    timesteps = objective.sample_pair_timesteps(num_pairs, t_min, t_max, generator)
    pure_noise = torch.randn(unsafe_latents.shape, generator=generator)

    clean = torch.cat([unsafe_latents, safe_latents])
    pair_noise = torch.cat([noise, noise])
    pair_timesteps = torch.cat([timesteps, timesteps])
    last_timestep = noise_scheduler.config.num_train_timesteps - 1
    empty = empty_embedding.expand(num_pairs, -1, -1)
    condition = (
        torch.cat([pair_condition, pair_condition, empty]) if pair_condition is not None else empty.repeat(3, 1, 1)
    )
    return DUOBatch(
        model_input=torch.cat([noise_scheduler.add_noise(clean, pair_noise, pair_timesteps), pure_noise]),
        timesteps=torch.cat([pair_timesteps, torch.full((num_pairs,), last_timestep)]),
        condition=condition,
        target=objective.diffusion_target(noise_scheduler, clean, pair_noise, pair_timesteps),
    )


def duo_forward(accelerator, unet, batch, beta_dpo, preservation_weight, weight_dtype):
    """The reference forward (adapter off, unwrapped model, no grad) and the adapted forward over one batch."""
    model = accelerator.unwrap_model(unet)
    device = accelerator.device
    model_input = batch.model_input.to(device, dtype=weight_dtype)
    timesteps = batch.timesteps.to(device)
    condition = batch.condition.to(device, dtype=weight_dtype)
    with torch.no_grad(), accelerator.autocast(), adapters_disabled(model):
        ref_prediction = model(model_input, timesteps, condition).sample
    with accelerator.autocast():
        model_prediction = unet(model_input, timesteps, condition).sample
    return objective.duo_losses(
        model_prediction, ref_prediction, batch.target.to(device), beta_dpo, preservation_weight
    )


def save_lora_weights(output_dir, unet_lora_state_dict, unet=None):
    from diffusers import StableDiffusionPipeline

    metadata = unet.peft_config["default"].to_dict() if unet is not None else None
    StableDiffusionPipeline.save_lora_weights(
        output_dir,
        unet_lora_layers=unet_lora_state_dict,
        weight_name=LORA_WEIGHT_NAME,
        unet_lora_adapter_metadata=metadata,
    )


def architecture_info(pipeline_class: str, unet, noise_scheduler) -> dict:
    """The ``architecture`` entry of ``duo_config.json``: what ``DUOPipeline`` checks a base model against."""
    return {
        "family": "sd",
        "pipeline_class": pipeline_class,
        "denoiser": "unet",
        "cross_attention_dim": unet.config.cross_attention_dim,
        "block_out_channels": list(unet.config.block_out_channels),
        "prediction_type": noise_scheduler.config.prediction_type,
    }
