#!/usr/bin/env python
"""Direct Unlearning Optimization (DUO) for Stable Diffusion 1.x/2.x and SDXL (UNet models).

Removes a visual concept from a UNet text-to-image model by training a LoRA adapter with a
Diffusion-DPO preference loss that prefers the safe twin of each unsafe image, conditioned on the
empty prompt, plus an output-preservation regulariser on pure noise. See duo_plugin.objective.
The family is read from the base model's model_index.json; SDXL adds its pooled embeddings and size
conditioning (``add_time_ids``) to the same step, and trains at 1024 px by default.

    accelerate launch train_duo.py --concept nudity --output_dir duo-nudity
    accelerate launch train_duo.py --concept nudity --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \
        --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix --mixed_precision fp16
"""

import argparse

import torch

from duo_plugin import arguments, lora, memory, official_flags, outputs, run_guard, samples, training
from duo_plugin.errors import exit_on_usage_error
from duo_plugin.families import quantization, sd
from duo_plugin.families.prompts import pipeline_prompt_kwargs
from duo_plugin.help_defaults import show_defaults
from duo_plugin.pairs import add_generation_arguments


DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="DUO concept unlearning for Stable Diffusion 1.x/2.x and SDXL (UNet models)."
    )
    arguments.add_training_arguments(parser, default_model=DEFAULT_MODEL, default_resolution=None)
    parser.add_argument(
        "--pretrained_vae_model_name_or_path",
        type=str,
        default=None,
        help="SDXL: a VAE to use instead of the base's, e.g. madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE overflows in "
        "fp16, so it is kept in fp32 unless this is given)",
    )
    add_generation_arguments(parser, for_training=True)
    official_flags.add_official_arguments(parser, family="sd")
    memory.add_memory_check_arguments(parser)
    return show_defaults(parser).parse_args(argv)


@exit_on_usage_error
def main(argv=None):
    # From here on the flags are resolved (preset, recipe, λ) and read-only: duo_plugin.settings.
    args, preset, pipeline_class, family = training.resolve_run_args(parse_args(argv), ("sd", "sdxl"), "train_duo.py")
    memory.check_training_memory(args, family)  # before any weight is downloaded
    accelerator = training.create_accelerator(args)
    run_guard.claim_output_dir(args, accelerator)
    args, run_data = training.load_run_data(args, preset, pipeline_class, accelerator)

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    model_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    weight_dtype = training.weight_dtype_for(accelerator)
    device = accelerator.device
    noise_scheduler = DDPMScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", **model_kwargs
    )
    training.check_timestep_range(args, noise_scheduler.config.num_train_timesteps)
    unet = quantization.load_quantized(
        lambda: UNet2DConditionModel.from_pretrained(
            args.pretrained_model_name_or_path,
            subfolder="unet",
            variant=args.variant,
            dtype=weight_dtype,
            **quantization.denoiser_load_kwargs(args.quantize_base, weight_dtype, device),
            **model_kwargs,
        ),
        args.quantize_base,
    )
    unet.requires_grad_(False)

    # Everything the loop and the validation need from the text encoders, computed once; then they are freed.
    embeddings = sd.encode_prompts_once(
        args, family, training.prompts_to_encode(args, preset, run_data), device, weight_dtype
    )

    # The pair latents, cached once; the VAE then leaves the accelerator until validation.
    if args.pretrained_vae_model_name_or_path is not None:
        vae = AutoencoderKL.from_pretrained(args.pretrained_vae_model_name_or_path, **model_kwargs)
    else:
        vae = AutoencoderKL.from_pretrained(
            args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant, **model_kwargs
        )
    # SDXL's own VAE overflows in fp16 (diffusers' SDXL scripts keep it in fp32 too).
    vae_dtype = torch.float32 if family == "sdxl" and args.pretrained_vae_model_name_or_path is None else weight_dtype
    latents_cache, retain_latents = training.cache_latents(args, accelerator, vae, run_data, vae_dtype)
    if retain_latents is not None:
        retain_latents = sd.RetainLatents(retain_latents, embeddings(run_data.retain_prompts))

    quantization.to_device(
        unet, training.denoiser_home(accelerator), None if weight_dtype == torch.float32 else weight_dtype
    )
    target_modules = lora.prepare_denoiser_for_training(args, unet)
    family_step = sd.family_step(args, latents_cache, noise_scheduler, embeddings, run_data, retain_latents, family)
    run = training.TrainingRun(args, accelerator, unet, sd.save_lora_weights, "unet", run_data)

    validation = samples.ValidationSampler(
        args,
        accelerator,
        vae,
        sd.validation_pipeline(family, noise_scheduler),
        pipeline_prompt_kwargs(embeddings),
        weight_dtype,
        every_process=run.sharded,
    )

    for step in run.start("SDXL" if family == "sdxl" else "SD 1.x/2.x"):
        step_logs = []
        for micro_step in range(args.gradient_accumulation_steps):
            result = run.micro_step(family_step, step, micro_step)
            step_logs.append(result.losses.to_log())
        run.end_step(step + 1, step_logs)
        if run.validation_due(step + 1):
            validation.during_training(run.denoiser, step + 1)
    run.finish()

    config = run.save_adapter(  # by the main process
        sd.save_lora_weights,
        sd.architecture_info(pipeline_class, run.model, noise_scheduler, family),
        target_modules,
    )
    # Under FSDP every process takes part in sampling the sharded model; the main process keeps the images.
    card_samples = validation.card_samples(run.denoiser, args.max_train_steps, preset)
    if accelerator.is_main_process:
        outputs.finish_run(args, config, pipeline_class, card_samples)
    accelerator.end_training()


if __name__ == "__main__":
    main()
