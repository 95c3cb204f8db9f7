"""FLUX.1 [dev] and [schnell] (MMDiT transformer, rectified flow): prompts encoded once, the denoiser's call on
packed latents, the adapter's file.

``train_duo_flux.py`` shows the loop. The batch is SD3's (``duo_plugin.families.sd3.make_duo_batch``: one σ per pair from
the scheduler's training table, x_σ = (1 − σ)·x + σ·ε, pure noise told σ = 1), drawn on unpacked latents, so the
objective sees the same tensors as for SD3. What FLUX adds is only in ``predict``: its transformer reads 2×2 latent
patches packed into tokens with their positions (``img_ids``), the text tokens' positions (``txt_ids``, zeros),
the timestep as σ (t / 1000), and, for [dev], the guidance embedding's value; its output is unpacked again.
"""

import functools
from typing import List, Optional

import torch

from .. import objective
from ..errors import UsageError
from ..lora import require_joint_attention_target, save_denoiser_lora
from ..step import FamilyStep
from . import sd3
from .prompts import PromptEmbeddings, encode_once, pipeline_for_embeddings
from .quantization import text_quantization_config, to_device


# FLUX.1-dev's distilled guidance at training: the value diffusers' FLUX LoRA scripts default to (and the pipeline's).
DEFAULT_GUIDANCE_SCALE = 3.5
# FLUX.1's T5 length: FluxPipeline's sampling default (and diffusers' FLUX LoRA scripts'), so that the empty
# prompt the adapter learns on is the very condition the sampler feeds (its padding tokens included).
DEFAULT_MAX_SEQUENCE_LENGTH = 512


def encode_prompts_once(args, prompts: List[str], transformer, device, dtype, batch_size: int = 8) -> PromptEmbeddings:
    """Encode every prompt the run needs with CLIP (pooled) and T5, then free both encoders."""
    from diffusers.training_utils import free_memory

    encode_batch = _prompt_encoder(args, transformer, device, dtype)
    embeddings = encode_once(prompts, encode_batch, batch_size)
    del encode_batch  # the only reference to the text encoders
    free_memory()
    return embeddings


def _prompt_encoder(args, transformer, device, dtype):
    from diffusers import FluxPipeline

    # The transformer being trained is lent to the pipeline so that no second copy is loaded; it is never called.
    text_pipeline = FluxPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        transformer=transformer,
        vae=None,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        dtype=dtype,
        quantization_config=text_quantization_config(
            getattr(args, "quantize_base", "none"), dtype, ["text_encoder_2"]
        ),
    )
    text_pipeline.text_encoder.to(device)
    to_device(text_pipeline.text_encoder_2, device)

    def encode_batch(batch):
        embeds, pooled, _ = text_pipeline.encode_prompt(
            batch, None, device=device, max_sequence_length=args.max_sequence_length
        )
        return embeds, pooled

    return encode_batch


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)(W/2), 4C], FLUX's token layout."""
    from diffusers import FluxPipeline

    batch, channels, height, width = latents.shape
    return FluxPipeline._pack_latents(latents, batch, channels, height, width)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack`` for a latent grid of ``height`` × ``width``."""
    from diffusers import FluxPipeline

    # _unpack_latents takes pixel sizes and the VAE factor; a factor of 1 makes them latent sizes.
    return FluxPipeline._unpack_latents(tokens, height, width, 1)


def predict(
    transformer,
    batch,
    device,
    dtype,
    precondition_outputs: bool = True,
    guidance_scale=None,
) -> torch.Tensor:
    """The transformer's velocity on the batch's unpacked latents, or with ``precondition_outputs`` the clean-latent
    estimate x_σ − σ·v̂ (as SD3). ``guidance_scale`` is [dev]'s guidance embedding value (None for [schnell])."""
    from diffusers import FluxPipeline

    model_input = batch.model_input.to(device, dtype=dtype)
    num_rows, _, height, width = model_input.shape
    prompt_embeds = batch.prompt_embeds.to(device, dtype=dtype)
    guidance = None
    if guidance_scale is not None:
        guidance = torch.full((num_rows,), float(guidance_scale), device=device, dtype=torch.float32)
    tokens = transformer(
        hidden_states=pack(model_input),
        timestep=batch.timesteps.to(device) / 1000,
        guidance=guidance,
        pooled_projections=batch.pooled_prompt_embeds.to(device, dtype=dtype),
        encoder_hidden_states=prompt_embeds,
        txt_ids=torch.zeros(prompt_embeds.shape[1], 3, device=device, dtype=dtype),
        img_ids=FluxPipeline._prepare_latent_image_ids(num_rows, height // 2, width // 2, device, dtype),
        return_dict=False,
    )[0]
    prediction = unpack(tokens, height, width)
    if precondition_outputs:
        return objective.precondition_flow_matching_output(
            prediction.float(), model_input.float(), batch.sigmas.to(device)
        )
    return prediction


def training_guidance(args, transformer) -> Optional[float]:
    """The guidance embedding's value during training: the pairs' ``--guidance_scale`` (3.5 unless given) for [dev],
    as diffusers' FLUX LoRA scripts train with the value they sample with; None for [schnell], which has none."""
    if not transformer.config.guidance_embeds:
        return None
    return DEFAULT_GUIDANCE_SCALE if args.guidance_scale is None else args.guidance_scale


def family_step(
    args, latents_cache, noise_scheduler, embeddings: PromptEmbeddings, run_data, guidance, retain=None
) -> FamilyStep:
    """The FLUX half of ``duo_plugin.step``: SD3's batch, FLUX's call."""
    flux_predict = functools.partial(
        predict, precondition_outputs=bool(args.precondition_outputs), guidance_scale=guidance
    )
    return sd3.family_step(args, latents_cache, noise_scheduler, embeddings, run_data, retain, predict_fn=flux_predict)


def save_lora_weights(output_dir, transformer_lora_state_dict, transformer=None):
    from diffusers import FluxPipeline

    save_denoiser_lora(FluxPipeline, "transformer", output_dir, transformer_lora_state_dict, transformer)


def validation_pipeline(noise_scheduler):
    """``make(transformer, vae)``: FLUX's text-to-image pipeline without text encoders (prompts come as
    embeddings), with a scheduler of its own."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    def make(transformer, vae):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
        return pipeline_for_embeddings(FluxPipeline, transformer=transformer, vae=vae, scheduler=scheduler)

    return make


def architecture_info(pipeline_class, transformer, noise_scheduler) -> dict:
    config = transformer.config
    return {
        "family": "flux",
        "pipeline_class": pipeline_class,
        "denoiser": "transformer",
        "joint_attention_dim": config.joint_attention_dim,
        "num_layers": config.num_layers,
        "num_single_layers": config.num_single_layers,
        "num_attention_heads": config.num_attention_heads,
        "attention_head_dim": config.attention_head_dim,
        "in_channels": config.in_channels,
        "pooled_projection_dim": config.pooled_projection_dim,
        "guidance_embeds": bool(config.guidance_embeds),
        "prediction_type": "flow_matching",
        "scheduler_shift": noise_scheduler.config.shift,
    }


def check_flux_args(args):
    """FLUX-only refusals, after the family's defaults are filled in."""
    require_joint_attention_target(args.lora_target, "FLUX")
    if args.max_sequence_length < 1 or args.max_sequence_length > 512:
        raise UsageError(f"--max_sequence_length {args.max_sequence_length}: FLUX's T5 takes 1 to 512 tokens")
    if args.resolution % 16 != 0:
        raise UsageError(
            f"--resolution {args.resolution}: FLUX packs 2×2 latent patches, so the size must be a multiple of 16; "
            f"use e.g. {max(16, args.resolution // 16 * 16)}"
        )
