#!/usr/bin/env python
"""Direct Unlearning Optimization (DUO) for Stable Diffusion 1.x/2.x.

Removes a visual concept from a UNet text-to-image model by training a LoRA adapter with a
Diffusion-DPO preference loss that prefers the safe twin of each unsafe image, conditioned on the
empty prompt, plus an output-preservation regulariser on pure noise. See duo_plugin.objective.

    accelerate launch train_duo.py --concept nudity --output_dir duo-nudity
"""

import argparse
from dataclasses import dataclass

import torch
from accelerate.logging import get_logger

from duo_plugin import data, objective, timing, training
from duo_plugin.errors import UsageError, exit_on_usage_error
from duo_plugin.pairs import add_generation_arguments, get_pair_images

logger = get_logger(__name__)

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="DUO concept unlearning for Stable Diffusion 1.x/2.x (UNet models).")
    training.add_training_arguments(parser, default_model=DEFAULT_MODEL, default_resolution=512)
    add_generation_arguments(parser, for_training=True)
    return parser.parse_args(argv)


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts, device):
    tokens = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
    return text_encoder(tokens.input_ids.to(device))[0]


@dataclass
class DUOBatch:
    """One micro-step's inputs: the concatenated [x⁻_t; x⁺_t; x_T] batch and the pair targets."""

    model_input: torch.Tensor
    timesteps: torch.Tensor
    condition: torch.Tensor
    target: torch.Tensor


def make_duo_batch(latents_cache, pair_indices, generator, noise_scheduler, t_min, t_max, empty_embedding, pair_condition=None):
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
    condition = torch.cat([pair_condition, pair_condition, empty]) if pair_condition is not None else empty.repeat(3, 1, 1)
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
    with torch.no_grad(), accelerator.autocast(), training.adapters_disabled(model):
        ref_prediction = model(model_input, timesteps, condition).sample
    with accelerator.autocast():
        model_prediction = unet(model_input, timesteps, condition).sample
    return objective.duo_losses(model_prediction, ref_prediction, batch.target.to(device), beta_dpo, preservation_weight)


def make_validation_pipeline(args, unet, vae, text_encoder, tokenizer, noise_scheduler):
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def image_generator(args, pipeline, weight_dtype, device):
    """``generate(prompt, seeds) -> images`` with the live model (never cast: autocast handles fp16/bf16)."""
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)

    def generate(prompt, seeds):
        with autocast:
            return pipeline(
                [prompt] * len(seeds),
                num_inference_steps=args.num_validation_inference_steps,
                generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            ).images

    return generate


def run_validation(args, accelerator, unet, vae, text_encoder, tokenizer, noise_scheduler, weight_dtype, step, preset=None):
    """Validation grid (and, with ``preset``, the model card samples); the VAE and text encoder are on the
    accelerator only meanwhile."""
    device = accelerator.device
    model = accelerator.unwrap_model(unet)
    vae.to(device)
    text_encoder.to(device)
    pipeline = make_validation_pipeline(args, model, vae, text_encoder, tokenizer, noise_scheduler)
    generate = image_generator(args, pipeline, weight_dtype, device)
    training.validation_grid(args, accelerator, model, generate, step)
    samples = training.save_model_card_samples(args, preset, generate) if preset is not None else []
    vae.to("cpu")
    text_encoder.to("cpu")
    return samples


def save_lora_weights(output_dir, unet_lora_state_dict, unet=None):
    from diffusers import StableDiffusionPipeline

    metadata = unet.peft_config["default"].to_dict() if unet is not None else None
    StableDiffusionPipeline.save_lora_weights(
        output_dir,
        unet_lora_layers=unet_lora_state_dict,
        weight_name=training.LORA_WEIGHT_NAME,
        unet_lora_adapter_metadata=metadata,
    )


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    training.check_environment_args(args)
    preset = training.resolve_concept(args, architecture="sd", base_learning_rate=3e-4)
    args.lora_target = args.lora_target or "self_attn"
    args.t_min = 0 if args.t_min is None else args.t_min
    pipeline_class = training.detect_pipeline_class(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    training.require_family(pipeline_class, "sd", "train_duo.py")

    accelerator = training.create_accelerator(args)

    # Pairs first: bad data is refused before any model weight is loaded.
    pairs = get_pair_images(args, preset, pipeline_class, accelerator)
    args.t_max = timing.resolve_t_max(args, preset, accelerator, default=750)  # auto: measured where the concept is decided

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    model_kwargs = dict(revision=args.revision, cache_dir=args.cache_dir)
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler", **model_kwargs)
    tokenizer = CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer", **model_kwargs)
    text_encoder = CLIPTextModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder", variant=args.variant, **model_kwargs)
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant, **model_kwargs)
    unet = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet", variant=args.variant, **model_kwargs)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if not 0 <= args.t_min < args.t_max <= num_train_timesteps:
        raise UsageError(f"--t_min/--t_max must satisfy 0 <= t_min < t_max <= {num_train_timesteps}")

    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    weight_dtype = training.weight_dtype_for(accelerator)
    for module in (unet, vae, text_encoder):
        module.to(accelerator.device, **({} if weight_dtype == torch.float32 else {"dtype": weight_dtype}))
    target_modules = training.prepare_denoiser_for_training(args, unet)

    # Everything the loop needs from the VAE and the text encoder, computed once.
    latents_cache = data.encode_pairs(
        vae, pairs, args.resolution, args.center_crop, args.random_flip, args.seed,
        device=accelerator.device, dtype=weight_dtype, progress=accelerator.is_local_main_process,
    )
    if args.condition_on_prompts:
        if pairs.unsafe_prompts is None:
            raise UsageError("--condition_on_prompts needs an unsafe_prompt column in the pair data")
        prompt_embeddings = encode_prompts(tokenizer, text_encoder, pairs.unsafe_prompts, accelerator.device).cpu()
    empty_embedding = encode_prompts(tokenizer, text_encoder, [""], accelerator.device).cpu()
    vae.to("cpu")
    text_encoder.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    unet, optimizer, lr_scheduler, lora_params, resume_path, first_step = training.prepare_optimization(
        args, accelerator, unet, save_lora_weights, lora_prefix="unet"
    )
    model = accelerator.unwrap_model(unet)

    def compute_losses(pair_indices, generator):
        pair_condition = prompt_embeddings[pair_indices] if args.condition_on_prompts else None
        batch = make_duo_batch(
            latents_cache, pair_indices, generator, noise_scheduler, args.t_min, args.t_max, empty_embedding, pair_condition
        )
        return duo_forward(accelerator, unet, batch, args.beta_dpo, args.preservation_weight, weight_dtype)

    def validate(step, preset=None):
        return run_validation(args, accelerator, unet, vae, text_encoder, tokenizer, noise_scheduler, weight_dtype, step, preset)

    training.train_duo_steps(
        args, accelerator, unet, optimizer, lr_scheduler, lora_params, len(pairs), first_step, resume_path,
        compute_losses, validate, project_name="duo",
    )

    if accelerator.is_main_process:
        save_lora_weights(args.output_dir, training.lora_state_dict(model), model)
        samples = []
        if not args.skip_validation:
            samples = validate(args.max_train_steps, preset)
        architecture = {
            "family": "sd",
            "pipeline_class": pipeline_class,
            "denoiser": "unet",
            "cross_attention_dim": model.config.cross_attention_dim,
            "block_out_channels": list(model.config.block_out_channels),
            "prediction_type": noise_scheduler.config.prediction_type,
        }
        config = training.write_duo_config(args.output_dir, args, architecture, target_modules)
        training.finish_run(args, accelerator, config, pipeline_class, samples)
    accelerator.end_training()


if __name__ == "__main__":
    main()
