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
    """One micro-step's inputs: the concatenated batch laid out as ``layout`` and the pair targets."""

    model_input: torch.Tensor
    timesteps: torch.Tensor
    condition: torch.Tensor
    target: torch.Tensor
    layout: objective.BatchLayout = None

    def __post_init__(self):
        # A batch built without a layout is the paper's [x⁻_t; x⁺_t; x_T].
        if self.layout is None:
            self.layout = objective.BatchLayout(self.target.shape[0] // 2)


@dataclass
class RetainLatents:
    """The retain set, encoded once: clean latents of base-model images of unrelated prompts and their prompts'
    embeddings (one row each)."""

    latents: torch.Tensor
    embeddings: torch.Tensor


def make_duo_batch(
    latents_cache,
    pair_indices,
    generator,
    noise_scheduler,
    t_min,
    t_max,
    empty_embedding,
    pair_condition=None,
    pair_timesteps_mode="shared",
    preservation_noise="fresh",
    pair_conditions=None,
    retain=None,
    retain_conditions=(),
):
    """Sample the pairs' latents, one noise per pair (shared by both images), timesteps (one per pair, or one per
    image with ``pair_timesteps_mode="independent"``), and pure noise at the last training timestep for the
    preservation branch (its own draw, or the pair's noise with ``preservation_noise="pair"``). All draws
    come from ``generator``.

    The pair images are run under each of ``pair_conditions`` ("empty", "prompt": the rows of
    ``pair_condition``); by default once, under the pair's prompt if ``pair_condition`` is given, else the
    empty prompt. With ``retain`` (a ``RetainLatents``), B retain images, noised at their own timesteps in the
    same range, follow the pure noise once per ``retain_conditions``; their draws come after all others, so
    the paper's batch is unchanged by the option.
    """
    num_pairs = len(pair_indices)
    flips = torch.randint(0, latents_cache.mean.shape[1], (num_pairs,), generator=generator)
    unsafe_latents, safe_latents = latents_cache.sample(pair_indices, flips, generator)
    noise = torch.randn(unsafe_latents.shape, generator=generator)
    pair_timesteps = objective.pair_image_timesteps(
        lambda n: objective.sample_pair_timesteps(n, t_min, t_max, generator), num_pairs, pair_timesteps_mode
    )
    pure_noise = torch.randn(unsafe_latents.shape, generator=generator)
    if preservation_noise == "pair":
        pure_noise = noise
    if pair_conditions is None:
        pair_conditions = ("prompt",) if pair_condition is not None else ("empty",)

    clean = torch.cat([unsafe_latents, safe_latents])
    pair_noise = torch.cat([noise, noise])
    last_timestep = noise_scheduler.config.num_train_timesteps - 1
    empty = empty_embedding.expand(num_pairs, -1, -1)
    pair_embeddings = {"empty": empty, "prompt": pair_condition}
    noisy_pairs = noise_scheduler.add_noise(clean, pair_noise, pair_timesteps)
    inputs = [noisy_pairs] * len(pair_conditions) + [pure_noise]
    timesteps = [pair_timesteps] * len(pair_conditions) + [torch.full((num_pairs,), last_timestep)]
    conditions = [pair_embeddings[c].repeat(2, 1, 1) for c in pair_conditions] + [empty]
    num_retain = 0
    if retain is not None and retain_conditions:
        num_retain = num_pairs
        rows = torch.randint(0, retain.latents.shape[0], (num_retain,), generator=generator)
        retain_noise = torch.randn((num_retain, *retain.latents.shape[1:]), generator=generator)
        retain_timesteps = objective.sample_pair_timesteps(num_retain, t_min, t_max, generator)
        noisy_retain = noise_scheduler.add_noise(retain.latents[rows], retain_noise, retain_timesteps)
        retain_embeddings = {"empty": empty_embedding.expand(num_retain, -1, -1), "prompt": retain.embeddings[rows]}
        inputs += [noisy_retain] * len(retain_conditions)
        timesteps += [retain_timesteps] * len(retain_conditions)
        conditions += [retain_embeddings[c] for c in retain_conditions]
    return DUOBatch(
        model_input=torch.cat(inputs),
        timesteps=torch.cat(timesteps),
        condition=torch.cat(conditions),
        target=objective.diffusion_target(noise_scheduler, clean, pair_noise, pair_timesteps),
        layout=objective.BatchLayout(
            num_pairs, tuple(pair_conditions), num_retain, tuple(retain_conditions) if num_retain else ()
        ),
    )


def duo_forward(accelerator, unet, batch, beta_dpo, preservation_weight, weight_dtype, variant=None):
    """The reference forward (adapter off, unwrapped model, no grad) and the adapted forward over one batch.

    ``variant`` (an ``objective.VariantSettings``) adds the concept-specific objective's pieces."""
    model = accelerator.unwrap_model(unet)
    device = accelerator.device
    model_input = batch.model_input.to(device, dtype=weight_dtype)
    timesteps = batch.timesteps.to(device)
    condition = batch.condition.to(device, dtype=weight_dtype)
    with torch.no_grad(), accelerator.autocast(), adapters_disabled(model):
        ref_prediction = model(model_input, timesteps, condition).sample
    with accelerator.autocast():
        model_prediction = unet(model_input, timesteps, condition).sample
    return objective.concept_losses(
        model_prediction,
        ref_prediction,
        batch.target.to(device),
        batch.layout,
        beta_dpo,
        preservation_weight,
        **(variant.loss_kwargs() if variant is not None else {}),
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
