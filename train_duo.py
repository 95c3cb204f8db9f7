#!/usr/bin/env python
"""Direct Unlearning Optimization (DUO) for Stable Diffusion 1.x/2.x.

Removes a visual concept from a UNet text-to-image model by training a LoRA adapter with a
Diffusion-DPO preference loss that prefers the safe twin of each unsafe image, conditioned on the
empty prompt, plus an output-preservation regulariser on pure noise. See duo_plugin.objective.

    accelerate launch train_duo.py --concept nudity --output_dir duo-nudity
"""

import argparse
import os

import torch
from accelerate.logging import get_logger
from diffusers.training_utils import free_memory, offload_models
from tqdm.auto import tqdm

from duo_plugin import (
    arguments,
    checkpoints,
    data,
    families,
    fidelity,
    lora,
    memory,
    outputs,
    retain,
    run_guard,
    saturation,
    sd,
    timing,
    training,
    validation,
)
from duo_plugin.errors import UsageError, exit_on_usage_error
from duo_plugin.help_defaults import show_defaults
from duo_plugin.pairs import add_generation_arguments, get_pair_images


logger = get_logger(__name__)

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="DUO concept unlearning for Stable Diffusion 1.x/2.x (UNet models).")
    arguments.add_training_arguments(parser, default_model=DEFAULT_MODEL, default_resolution=512)
    add_generation_arguments(parser, for_training=True)
    fidelity.add_official_arguments(parser, family="sd")
    memory.add_memory_check_arguments(parser)
    return show_defaults(parser).parse_args(argv)


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


def log_validation(
    args, accelerator, unet, vae, text_encoder, tokenizer, noise_scheduler, weight_dtype, step, preset=None
):
    """Base vs unlearned grid (and, with ``preset``, the model card samples); the VAE and text encoder are on the
    accelerator only meanwhile. Returns the model card samples."""
    device = accelerator.device
    model = accelerator.unwrap_model(unet)
    with offload_models(vae, text_encoder, device=device):
        pipeline = make_validation_pipeline(args, model, vae, text_encoder, tokenizer, noise_scheduler)
        generate = image_generator(args, pipeline, weight_dtype, device)
        outputs.validation_grid(args, accelerator, model, generate, step)
        samples = outputs.save_model_card_samples(args, preset, generate) if preset is not None else []
    return samples


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    arguments.check_environment_args(args)
    preset = arguments.resolve_training_args(args, family="sd")
    validation.check_training_args(args)
    memory.check_cpu_run(args)  # before any download
    pipeline_class = families.detect_pipeline_class(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    families.require_family(pipeline_class, "sd", "train_duo.py")
    memory.check_training_memory(args, "sd")  # before any weight is downloaded

    accelerator = training.create_accelerator(args)
    run_guard.claim_output_dir(args, accelerator)

    # Pairs first: bad data is refused before any model weight is loaded.
    pairs = get_pair_images(args, preset, pipeline_class, accelerator)
    pair_fingerprint = pairs.fingerprint()
    run_guard.check_resume_pairs(args, pair_fingerprint)
    args.t_max = timing.resolve_t_max(
        args, preset, accelerator, default=args.t_max
    )  # auto: measured where the concept is decided
    if arguments.needs_unsafe_prompts(args) and pairs.unsafe_prompts is None:
        raise UsageError(
            "--preference_conditions prompt/guided (or --condition_on_prompts) needs an unsafe_prompt column in the pair data"
        )
    variant = arguments.variant_settings(args, guidance_scale=args.guidance_scale or preset.guidance_scale)
    if variant.uses_retain:
        retain_images, retain_prompts, args.retain_record = retain.get_retain_set(
            args, preset, pipeline_class, accelerator, conditions=variant.retain_conditions
        )

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from transformers import CLIPTextModel, CLIPTokenizer

    model_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    noise_scheduler = DDPMScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", **model_kwargs
    )
    tokenizer = CLIPTokenizer.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="tokenizer", **model_kwargs
    )
    text_encoder = CLIPTextModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="text_encoder", variant=args.variant, **model_kwargs
    )
    vae = AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant, **model_kwargs
    )
    unet = UNet2DConditionModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="unet", variant=args.variant, **model_kwargs
    )
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if not 0 <= args.t_min < args.t_max <= num_train_timesteps:
        raise UsageError(f"--t_min/--t_max must satisfy 0 <= t_min < t_max <= {num_train_timesteps}")

    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    weight_dtype = training.weight_dtype_for(accelerator)
    for module in (unet, vae, text_encoder):
        module.to(accelerator.device, **({} if weight_dtype == torch.float32 else {"dtype": weight_dtype}))
    target_modules = lora.prepare_denoiser_for_training(args, unet)

    # Everything the loop needs from the VAE and the text encoder, computed once.
    latents_cache = data.encode_pairs(
        vae,
        pairs,
        args.resolution,
        args.center_crop,
        args.random_flip,
        args.seed,
        device=accelerator.device,
        dtype=weight_dtype,
        progress=accelerator.is_local_main_process,
    )
    if arguments.needs_unsafe_prompts(args):
        prompt_embeddings = sd.encode_prompts(tokenizer, text_encoder, pairs.unsafe_prompts, accelerator.device).cpu()
    empty_embedding = sd.encode_prompts(tokenizer, text_encoder, [""], accelerator.device).cpu()
    retain_latents = None
    if variant.uses_retain:
        retain_latents = sd.RetainLatents(
            latents=retain.encode_retain_latents(
                vae, retain_images, args.resolution, accelerator.device, weight_dtype
            ),
            embeddings=sd.encode_prompts(tokenizer, text_encoder, retain_prompts, accelerator.device).cpu(),
        )
    vae.to("cpu")
    text_encoder.to("cpu")
    free_memory()

    lora_params = [p for p in unet.parameters() if p.requires_grad]
    checkpoint_size = run_guard.check_free_space(args, lora_params)
    optimizer = training.make_optimizer(args, lora_params)
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        # A prepared scheduler steps once per process per optimizer step.
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
        num_cycles=args.lr_num_cycles,
        power=args.lr_power,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    model = accelerator.unwrap_model(unet)
    checkpoints.register_adapter_state_hooks(accelerator, model, sd.save_lora_weights, lora_prefix="unet")

    first_step = 0
    last_checkpoint = checkpoints.resolve_resume_path(args.resume_from_checkpoint, args.output_dir)
    if last_checkpoint is not None:
        accelerator.print(f"Resuming from {last_checkpoint}")
        first_step = checkpoints.load_checkpoint(accelerator, last_checkpoint)

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_name, config=training.tracker_config(args))
    metrics = outputs.MetricsLog(
        os.path.join(args.output_dir, args.logging_dir, "metrics.jsonl"),
        accelerator.is_main_process,
        append=last_checkpoint is not None,
    )
    metrics.truncate_after(first_step)
    # Warns once if the preference loss saturates before the unsafe images' denoising error has moved.
    saturation_watch = saturation.SaturationWatch(enabled=accelerator.is_main_process)

    pairs_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running DUO training *****", main_process_only=True)
    logger.info(
        f"  Concept = {args.concept}, pairs = {len(pairs)}, β = {args.beta_dpo:g}, λ = {args.preservation_weight:g}, lr = {args.learning_rate:g}",
        main_process_only=True,
    )
    logger.info(
        f"  Pairs per optimizer step = {pairs_per_step}, steps = {args.max_train_steps} (from {first_step})",
        main_process_only=True,
    )
    progress_bar = tqdm(
        range(args.max_train_steps), initial=first_step, desc="Steps", disable=not accelerator.is_local_main_process
    )

    for step in range(first_step, args.max_train_steps):
        step_logs = []
        for micro_step in range(args.gradient_accumulation_steps):
            # Every random draw of a micro-step comes from its own generator, so resuming is exact.
            generator = data.step_generator(args.seed, step, micro_step, accelerator.process_index)
            pair_indices = data.pair_indices_for_step(
                len(pairs),
                step,
                micro_step,
                args.gradient_accumulation_steps,
                args.train_batch_size,
                accelerator.process_index,
                accelerator.num_processes,
                args.seed,
            )
            with accelerator.accumulate(unet):
                pair_condition = prompt_embeddings[pair_indices] if arguments.needs_unsafe_prompts(args) else None
                batch = sd.make_duo_batch(
                    latents_cache,
                    pair_indices,
                    generator,
                    noise_scheduler,
                    args.t_min,
                    args.t_max,
                    empty_embedding,
                    pair_condition,
                    args.pair_timesteps,
                    args.preservation_noise,
                    variant.pair_conditions,
                    retain_latents,
                    variant.retain_conditions,
                )
                losses = sd.duo_forward(
                    accelerator, unet, batch, args.beta_dpo, args.preservation_weight, weight_dtype, variant
                )
                training.check_finite(accelerator, losses.loss, step + 1, last_checkpoint)
                accelerator.backward(losses.loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(lora_params, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            step_logs.append(losses.to_log())

        global_step = step + 1
        progress_bar.update(1)
        logs = training.average_logs(step_logs)
        logs["lr"] = lr_scheduler.get_last_lr()[0]
        progress_bar.set_postfix(loss=f"{logs['loss']:.4g}", acc=f"{logs['implicit_acc']:.2f}")
        accelerator.log(logs, step=global_step)
        metrics.write(global_step, logs)
        saturation_watch.update(global_step, logs)

        if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
            settings = run_guard.run_settings(args, accelerator, pair_fingerprint)
            last_checkpoint = checkpoints.save_checkpoint(
                accelerator, args.output_dir, global_step, args.checkpoints_total_limit, settings, checkpoint_size
            )
        if args.validation_steps and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
            if accelerator.is_main_process and not args.skip_validation:
                log_validation(
                    args, accelerator, unet, vae, text_encoder, tokenizer, noise_scheduler, weight_dtype, global_step
                )
            accelerator.wait_for_everyone()
    progress_bar.close()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        outputs.save_adapter(
            args.output_dir,
            lambda folder: sd.save_lora_weights(folder, lora.lora_state_dict(model), model),
            last_checkpoint,
        )
        # The config before anything optional (validation images, card, push) can fail: the folder loads.
        config = outputs.write_duo_config(
            args.output_dir, args, sd.architecture_info(pipeline_class, model, noise_scheduler), target_modules
        )
        samples = []
        if not args.skip_validation:
            samples = log_validation(
                args,
                accelerator,
                unet,
                vae,
                text_encoder,
                tokenizer,
                noise_scheduler,
                weight_dtype,
                args.max_train_steps,
                preset,
            )
        outputs.finish_run(args, config, pipeline_class, samples)
    accelerator.end_training()


if __name__ == "__main__":
    main()
