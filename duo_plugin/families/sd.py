"""Stable Diffusion 1.x/2.x and SDXL (UNet, ε- or v-prediction): prompts encoded once, the DUO batch, the forward
pass, the adapter's file.

``train_duo.py`` shows the loop; these are the family's pieces of ``duo_plugin.step``'s micro-step.
SDXL differs from SD 1.x/2.x only in its conditioning: two text encoders whose pooled embedding and the image's
size and crop (``add_time_ids``) reach the UNet as ``added_cond_kwargs``.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from .. import objective
from ..lora import save_denoiser_lora
from ..step import FamilyStep, StepSettings, duo_losses
from .prompts import (
    PromptEmbeddings,
    concat_conditions,
    condition_rows,
    encode_once,
    pair_condition,
    pipeline_for_embeddings,
    repeat_rows,
)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts, device):
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return text_encoder(tokens.input_ids.to(device))[0]


def encode_prompts_once(args, family: str, prompts, device, dtype) -> PromptEmbeddings:
    """Encode every prompt the run needs with the base's text encoder(s), then free them."""
    from diffusers.training_utils import free_memory

    encode_batch = _prompt_encoder(args, family, device, dtype)
    embeddings = encode_once(prompts, encode_batch)
    del encode_batch  # the only reference to the text encoders
    free_memory()
    return embeddings


def _prompt_encoder(args, family: str, device, dtype):
    """``encode_batch(prompts) -> (token embeddings,)`` or, for SDXL, ``(token embeddings, pooled)``.

    SDXL's empty prompt is what its pipeline uses for the unconditional branch: zeros where the model's
    ``force_zeros_for_empty_prompt`` is set (the base model's case), so that the adapter learns on the very
    condition that classifier-free guidance subtracts at sampling time.
    """
    model_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir, "variant": args.variant}
    if family == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        text_pipeline = StableDiffusionXLPipeline.from_pretrained(
            args.pretrained_model_name_or_path, unet=None, vae=None, dtype=dtype, **model_kwargs
        )
        text_pipeline.text_encoder.to(device)
        text_pipeline.text_encoder_2.to(device)
        zero_empty = bool(text_pipeline.config.get("force_zeros_for_empty_prompt", True))

        def encode_batch(batch):
            embeds, _, pooled, _ = text_pipeline.encode_prompt(
                batch, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            if zero_empty:
                empty = torch.tensor([prompt == "" for prompt in batch], device=embeds.device)
                embeds = torch.where(empty[:, None, None], torch.zeros_like(embeds), embeds)
                pooled = torch.where(empty[:, None], torch.zeros_like(pooled), pooled)
            return embeds, pooled

        return encode_batch

    from transformers import CLIPTextModel, CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="tokenizer", revision=args.revision, cache_dir=args.cache_dir
    )
    text_encoder = CLIPTextModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="text_encoder", **model_kwargs
    ).to(device, dtype)

    def encode_batch(batch):
        return (encode_prompts(tokenizer, text_encoder, batch, device),)

    return encode_batch


def add_time_ids(resolution: int) -> torch.Tensor:
    """SDXL's size conditioning of a square training image: original size, crop origin (0, 0), target size."""
    return torch.tensor([resolution, resolution, 0, 0, resolution, resolution], dtype=torch.float32)


@dataclass
class DUOBatch:
    """One micro-step's inputs: the concatenated batch laid out as ``layout`` and the pair targets; SDXL's
    batches also carry the pooled embeddings and the size conditioning."""

    model_input: torch.Tensor
    timesteps: torch.Tensor
    condition: torch.Tensor
    target: torch.Tensor
    layout: objective.BatchLayout = None
    pooled: Optional[torch.Tensor] = None
    time_ids: Optional[torch.Tensor] = None

    def __post_init__(self):
        # A batch built without a layout is the paper's [x⁻_t; x⁺_t; x_T].
        if self.layout is None:
            self.layout = objective.BatchLayout(self.target.shape[0] // 2)


@dataclass
class RetainLatents:
    """The retain set, encoded once: clean latents of base-model images of unrelated prompts and their prompts'
    embeddings (one row each; a tuple with the pooled embeddings for SDXL)."""

    latents: torch.Tensor
    embeddings: object


def _as_condition(embedding):
    return embedding if embedding is None or isinstance(embedding, tuple) else (embedding,)


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
    time_ids=None,
):
    """Sample the pairs' latents, one noise per pair (shared by both images), timesteps (one per pair, or one per
    image with ``pair_timesteps_mode="independent"``), and pure noise at the last training timestep for the
    preservation branch (its own draw, or the pair's noise with ``preservation_noise="pair"``). All draws
    come from ``generator``.

    The pair images are run under each of ``pair_conditions`` ("empty", "prompt": the rows of
    ``pair_condition``); by default once, under the pair's prompt if ``pair_condition`` is given, else the
    empty prompt. With ``retain`` (a ``RetainLatents``), B retain images, noised at their own timesteps in the
    same range, follow the pure noise once per ``retain_conditions``; their draws come after all others, so
    the paper's batch is unchanged by the option. Conditions are token embeddings, or (token embeddings,
    pooled) tuples for SDXL, whose ``time_ids`` then go with the batch.
    """
    empty_condition, pair_condition = _as_condition(empty_embedding), _as_condition(pair_condition)
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
    empty = condition_rows(empty_condition, num_pairs)
    pair_embeddings = {"empty": empty, "prompt": pair_condition}
    noisy_pairs = noise_scheduler.add_noise(clean, pair_noise, pair_timesteps)
    inputs = [noisy_pairs] * len(pair_conditions) + [pure_noise]
    timesteps = [pair_timesteps] * len(pair_conditions) + [torch.full((num_pairs,), last_timestep)]
    conditions = [repeat_rows(pair_embeddings[c], 2) for c in pair_conditions] + [empty]
    num_retain = 0
    if retain is not None and retain_conditions:
        num_retain = num_pairs
        rows = torch.randint(0, retain.latents.shape[0], (num_retain,), generator=generator)
        retain_noise = torch.randn((num_retain, *retain.latents.shape[1:]), generator=generator)
        retain_timesteps = objective.sample_pair_timesteps(num_retain, t_min, t_max, generator)
        noisy_retain = noise_scheduler.add_noise(retain.latents[rows], retain_noise, retain_timesteps)
        retain_embeddings = {
            "empty": condition_rows(empty_condition, num_retain),
            "prompt": tuple(tensor[rows] for tensor in _as_condition(retain.embeddings)),
        }
        inputs += [noisy_retain] * len(retain_conditions)
        timesteps += [retain_timesteps] * len(retain_conditions)
        conditions += [retain_embeddings[c] for c in retain_conditions]
    condition = concat_conditions(conditions)
    return DUOBatch(
        model_input=torch.cat(inputs),
        timesteps=torch.cat(timesteps),
        condition=condition[0],
        target=objective.diffusion_target(noise_scheduler, clean, pair_noise, pair_timesteps),
        layout=objective.BatchLayout(
            num_pairs, tuple(pair_conditions), num_retain, tuple(retain_conditions) if num_retain else ()
        ),
        pooled=condition[1] if len(condition) > 1 else None,
        time_ids=time_ids if len(condition) > 1 else None,
    )


def predict(unet, batch: DUOBatch, device, dtype) -> torch.Tensor:
    """The UNet's output on the batch (ε or v, as the scheduler's ``prediction_type``)."""
    model_input = batch.model_input.to(device, dtype=dtype)
    added_cond_kwargs = None
    if batch.pooled is not None:
        added_cond_kwargs = {
            "text_embeds": batch.pooled.to(device, dtype=dtype),
            "time_ids": batch.time_ids.to(device, dtype=dtype).expand(model_input.shape[0], -1),
        }
    return unet(
        model_input,
        batch.timesteps.to(device),
        batch.condition.to(device, dtype=dtype),
        added_cond_kwargs=added_cond_kwargs,
    ).sample


def family_step(
    args, latents_cache, noise_scheduler, embeddings: PromptEmbeddings, run_data, retain=None, family="sd"
) -> FamilyStep:
    """The SD/SDXL half of ``duo_plugin.step``: batches drawn as ``make_duo_batch`` with the run's flags;
    ``run_data`` (a ``training.RunData``) gives the pairs' prompts and the objective."""
    time_ids = add_time_ids(args.resolution) if family == "sdxl" else None
    variant = run_data.variant

    def make_batch(pair_indices, generator):
        return make_duo_batch(
            latents_cache,
            pair_indices,
            generator,
            noise_scheduler,
            args.t_min,
            args.t_max,
            embeddings([""]),
            pair_condition(embeddings, run_data.unsafe_prompts, pair_indices),
            args.pair_timesteps,
            args.preservation_noise,
            variant.pair_conditions,
            retain,
            variant.retain_conditions,
            time_ids,
        )

    return FamilyStep(make_batch, predict)


def duo_forward(accelerator, unet, batch, beta_dpo, preservation_weight, weight_dtype, variant=None):
    """The reference and adapted forward over one batch and the DUO losses (``duo_plugin.step.duo_losses``)."""
    settings = StepSettings(
        beta_dpo, preservation_weight, weight_dtype, variant=variant or objective.VariantSettings()
    )
    return duo_losses(accelerator, unet, predict, batch, settings)


def save_lora_weights(output_dir, unet_lora_state_dict, unet=None):
    """The adapter in diffusers' LoRA format; SDXL's pipeline writes the same ``unet.`` keys as SD 1.x/2.x's."""
    from diffusers import StableDiffusionPipeline

    save_denoiser_lora(StableDiffusionPipeline, "unet", output_dir, unet_lora_state_dict, unet)


def validation_pipeline(family: str, noise_scheduler):
    """``make(unet, vae)``: the family's text-to-image pipeline without text encoders (prompts come as embeddings),
    with a sampling scheduler of its own (set_timesteps must not touch the training table)."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    def make(unet, vae):
        scheduler = DPMSolverMultistepScheduler.from_config(noise_scheduler.config)
        if family == "sdxl":
            return pipeline_for_embeddings(StableDiffusionXLPipeline, unet=unet, vae=vae, scheduler=scheduler)
        return pipeline_for_embeddings(
            StableDiffusionPipeline, unet=unet, vae=vae, scheduler=scheduler, requires_safety_checker=False
        )

    return make


def architecture_info(pipeline_class: str, unet, noise_scheduler, family: str = "sd") -> dict:
    """The ``architecture`` entry of ``duo_config.json``: what ``DUOPipeline`` checks a base model against."""
    info = {
        "family": family,
        "pipeline_class": pipeline_class,
        "denoiser": "unet",
        "cross_attention_dim": unet.config.cross_attention_dim,
        "block_out_channels": list(unet.config.block_out_channels),
        "prediction_type": noise_scheduler.config.prediction_type,
    }
    if family == "sdxl":
        info["addition_embed_type"] = unet.config.addition_embed_type
        info["projection_class_embeddings_input_dim"] = unet.config.projection_class_embeddings_input_dim
    return info
