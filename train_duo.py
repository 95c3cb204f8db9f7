#!/usr/bin/env python
"""Direct Unlearning Optimization (DUO) for Stable Diffusion 1.x/2.x.

Removes a visual concept from a UNet text-to-image model by training a LoRA adapter with a
Diffusion-DPO preference loss that prefers the safe twin of each unsafe image, conditioned on the
empty prompt, plus an output-preservation regulariser on pure noise. See duo_plugin.objective.

    accelerate launch train_duo.py --concept nudity --output_dir duo-nudity
"""

import argparse
import os
from dataclasses import dataclass

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import ProjectConfiguration, set_seed
from tqdm.auto import tqdm

from duo_plugin import data, objective, training
from duo_plugin.errors import UsageError, exit_on_usage_error
from duo_plugin.pairs import get_pair_images

logger = get_logger(__name__)

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="DUO concept unlearning for Stable Diffusion 1.x/2.x (UNet models).")
    training.add_training_arguments(parser, default_model=DEFAULT_MODEL, default_resolution=512)
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


def generate(pipeline, prompt, seeds, num_inference_steps, autocast):
    generators = [torch.Generator().manual_seed(seed) for seed in seeds]
    with autocast:
        return pipeline(
            [prompt] * len(seeds), num_inference_steps=num_inference_steps, generator=generators
        ).images


def log_validation(args, accelerator, unet, vae, text_encoder, tokenizer, noise_scheduler, weight_dtype, step):
    """Base vs unlearned on the validation prompts, same seeds; saved and sent to the trackers.

    The live model is used as it is (never cast): the adapter is switched off for the base images.
    """
    logger.info("Running validation at step %d", step)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    model = accelerator.unwrap_model(unet)
    pipeline = make_validation_pipeline(args, model, vae, text_encoder, tokenizer, noise_scheduler)
    autocast = torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    seeds = [args.seed + i for i in range(args.num_validation_images)]
    rows = []
    for prompt in args.validation_prompts:
        with training.adapters_disabled(model):
            base = generate(pipeline, prompt, seeds, args.num_validation_inference_steps, autocast)
        unlearned = generate(pipeline, prompt, seeds, args.num_validation_inference_steps, autocast)
        rows.append(base + unlearned)
    grid = training.image_grid(rows)
    os.makedirs(os.path.join(args.output_dir, "validation"), exist_ok=True)
    grid.save(os.path.join(args.output_dir, "validation", f"step-{step:06d}.png"))
    training.log_images_to_trackers(accelerator, "validation (left: base, right: unlearned)", grid, step)
    vae.to("cpu")
    text_encoder.to("cpu")
    return pipeline, autocast


def save_model_card_samples(args, preset, pipeline, autocast):
    """Samples for the public model card: unrelated prompts only, and nothing a detector flags."""
    from duo_plugin.detectors import get_detector

    detector = get_detector(preset.detector) if preset.detector else None
    samples = []
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    seeds = [args.seed + i for i in range(args.num_validation_images)]
    for p, prompt in enumerate(preset.unrelated_prompts):
        images = generate(pipeline, prompt, seeds, args.num_validation_inference_steps, autocast)
        verdicts = detector(images) if detector else [None] * len(images)
        for i, (image, verdict) in enumerate(zip(images, verdicts)):
            if verdict is not None and verdict.flagged:
                continue
            name = f"samples/sample_{p}_{i}.png"
            image.save(os.path.join(args.output_dir, name))
            samples.append((name, prompt))
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
    args.t_max = 750 if args.t_max is None else args.t_max
    pipeline_class = training.detect_pipeline_class(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    training.require_family(pipeline_class, "sd", "train_duo.py")

    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
        cpu=training.cpu_only_multi_process(),
    )
    training.check_distributed_setup(accelerator)
    training.check_environment_args(args, accelerator.device.type)
    training.setup_logging(accelerator)
    set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    # Pairs first: bad data is refused before any model weight is loaded.
    pairs = get_pair_images(args, preset, pipeline_class, accelerator)

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel

    model_kwargs = dict(revision=args.revision, cache_dir=args.cache_dir)
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler", **model_kwargs)
    tokenizer = AutoTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer", **model_kwargs)
    text_encoder = CLIPTextModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder", variant=args.variant, **model_kwargs)
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant, **model_kwargs)
    unet = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet", variant=args.variant, **model_kwargs)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if not 0 <= args.t_min < args.t_max <= num_train_timesteps:
        raise UsageError(f"--t_min/--t_max must satisfy 0 <= t_min < t_max <= {num_train_timesteps}")

    for module in (vae, text_encoder, unet):
        module.requires_grad_(False)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    for module in (unet, vae, text_encoder):
        module.to(accelerator.device, **({} if weight_dtype == torch.float32 else {"dtype": weight_dtype}))
    if args.enable_xformers_memory_efficient_attention:
        unet.enable_xformers_memory_efficient_attention()
    if args.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True

    target_modules = training.lora_target_modules(unet, args.lora_target)
    training.add_duo_adapter(unet, args.rank, args.lora_alpha, target_modules)
    training.cast_lora_params_to_fp32(unet)
    lora_params = [p for p in unet.parameters() if p.requires_grad]

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

    optimizer = training.make_optimizer(args, lora_params)
    from diffusers.optimization import get_scheduler

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    training.register_adapter_state_hooks(
        accelerator, unet, lambda out, state: save_lora_weights(out, state, accelerator.unwrap_model(unet)), "unet"
    )

    first_step = 0
    resume_path = training.resolve_resume_path(args.resume_from_checkpoint, args.output_dir)
    if resume_path is not None:
        accelerator.print(f"Resuming from {resume_path}")
        accelerator.load_state(resume_path)
        first_step = training.checkpoint_step(resume_path)
    last_checkpoint = resume_path

    if accelerator.is_main_process:
        tracker_config = {k: (str(v) if isinstance(v, (list, tuple)) or v is None else v) for k, v in vars(args).items()}
        accelerator.init_trackers("duo", config=tracker_config)
    metrics = training.MetricsLog(os.path.join(logging_dir, "metrics.jsonl"), accelerator.is_main_process, append=resume_path is not None)
    metrics.truncate_after(first_step)

    pairs_per_step = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info("***** Running DUO training *****")
    logger.info("  Concept = %s, pairs = %d, β = %g, λ = %g, lr = %g", args.concept, len(pairs), args.beta_dpo, args.preservation_weight, args.learning_rate)
    logger.info("  Pairs per optimizer step = %d, steps = %d (from %d)", pairs_per_step, args.max_train_steps, first_step)

    model = accelerator.unwrap_model(unet)
    device = accelerator.device
    progress_bar = tqdm(range(args.max_train_steps), initial=first_step, desc="Steps", disable=not accelerator.is_local_main_process)
    for step in range(first_step, args.max_train_steps):
        step_logs = []
        for micro_step in range(args.gradient_accumulation_steps):
            generator = data.step_generator(args.seed, step, micro_step, accelerator.process_index)
            pair_indices = data.pair_indices_for_step(
                len(pairs), step, micro_step, args.gradient_accumulation_steps, args.train_batch_size,
                accelerator.process_index, accelerator.num_processes, args.seed,
            )
            pair_condition = prompt_embeddings[pair_indices] if args.condition_on_prompts else None
            batch = make_duo_batch(
                latents_cache, pair_indices, generator, noise_scheduler, args.t_min, args.t_max, empty_embedding, pair_condition
            )
            with accelerator.accumulate(unet):
                losses = duo_forward(accelerator, unet, batch, args.beta_dpo, args.preservation_weight, weight_dtype)
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
        logs = {key: sum(row[key] for row in step_logs) / len(step_logs) for key in step_logs[0]}
        logs["lr"] = lr_scheduler.get_last_lr()[0]
        progress_bar.set_postfix(loss=f"{logs['loss']:.4g}", acc=f"{logs['implicit_acc']:.2f}")
        accelerator.log(logs, step=global_step)
        metrics.write(global_step, logs)

        if global_step % args.checkpointing_steps == 0 and global_step < args.max_train_steps:
            last_checkpoint = training.save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
        if args.validation_steps and global_step % args.validation_steps == 0 and global_step < args.max_train_steps:
            if accelerator.is_main_process and not args.skip_validation:
                log_validation(args, accelerator, unet, vae, text_encoder, tokenizer, noise_scheduler, weight_dtype, global_step)
            accelerator.wait_for_everyone()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_lora_weights(args.output_dir, training.lora_state_dict(model), model)
        samples = []
        if not args.skip_validation:
            pipeline, autocast = log_validation(args, accelerator, unet, vae, text_encoder, tokenizer, noise_scheduler, weight_dtype, args.max_train_steps)
            vae.to(device)
            text_encoder.to(device)
            samples = save_model_card_samples(args, preset, pipeline, autocast)
        architecture = {
            "family": "sd",
            "pipeline_class": pipeline_class,
            "denoiser": "unet",
            "cross_attention_dim": model.config.cross_attention_dim,
            "block_out_channels": list(model.config.block_out_channels),
            "prediction_type": noise_scheduler.config.prediction_type,
        }
        config = training.write_duo_config(args.output_dir, args, architecture, target_modules)
        training.write_model_card(args.output_dir, config, pipeline_class, samples, args.hub_model_id)
        logger.info("Saved the DUO adapter to %s", args.output_dir)
        if args.push_to_hub:
            repo_id = training.push_to_hub(args.output_dir, args.hub_model_id, args.hub_token, args.hub_private)
            logger.info("Pushed to https://huggingface.co/%s", repo_id)
    accelerator.end_training()


if __name__ == "__main__":
    main()
