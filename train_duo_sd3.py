#!/usr/bin/env python
"""Direct Unlearning Optimization (DUO) for Stable Diffusion 3 (SD3-medium, SD3.5), within 16 GB.

The same product as train_duo.py for ``StableDiffusion3Pipeline`` models: a LoRA adapter on every
attention projection of the MMDiT transformer, trained with the DUO objective of
``duo_plugin.objective`` under flow matching:

* x_σ = (1 − σ)·x + σ·ε, with one ε and one σ per pair, shared by its two images. σ comes from the
  scheduler's (descending) sigma table at an index drawn in ``[--t_min, --t_max)`` (default 1 and 750
  of 1000, the official SD3 recipe), or by ``--weighting_scheme``'s density when it is one.
* per-sample error: the flow-matching MSE (target ε − x; or x with ``--precondition_outputs``, the
  default, where the prediction becomes x_σ − σ·v̂), times the scheme's loss weight; then Δ⁺, Δ⁻ and
  L_DUO exactly as for SD1.
* output preservation on pure noise **at σ = 1, timestep = num_train_timesteps** — the first sampling
  step, which is where a pure-noise input belongs. The official SD3 code passes the other end of the
  table there (σ ≈ 0.003, t ≈ 3, the last sampling step) with the same pure-noise input. Preconditioned,
  the term is λ·σ²·‖v_θ − v_ref‖², so the default λ is scaled by σ_off² to keep the official run's
  strength (``presets.sd3_preservation_weight_for_beta``); ``--preservation_placement official``
  reproduces the official placement and λ exactly.

Memory: every prompt the run needs (the empty prompt; the validation prompts) is encoded once with the
three text encoders, which are then freed; the pair latents are cached once and the VAE leaves the
accelerator until validation. With ``--mixed_precision bf16 --gradient_checkpointing --use_8bit_adam``
only the transformer and the adapter remain on the GPU while training.

    accelerate launch train_duo_sd3.py --concept nudity --mixed_precision bf16 --gradient_checkpointing
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
    objective,
    outputs,
    retain,
    run_guard,
    saturation,
    sd3,
    timing,
    training,
    validation,
)
from duo_plugin.errors import UsageError, exit_on_usage_error
from duo_plugin.help_defaults import show_defaults
from duo_plugin.pairs import add_generation_arguments, get_pair_images


logger = get_logger(__name__)

DEFAULT_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
# The official SD3 run's image size and T5 length (its script's defaults; diffusers' pipeline uses 1024 and 256).
DEFAULT_RESOLUTION, DEFAULT_MAX_SEQUENCE_LENGTH = 512, 77


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="DUO concept unlearning for Stable Diffusion 3 (flow-matching transformer models)."
    )
    arguments.add_training_arguments(parser, default_model=DEFAULT_MODEL, default_resolution=DEFAULT_RESOLUTION)
    add_generation_arguments(parser, for_training=True)
    flow = parser.add_argument_group("flow matching (as in diffusers' SD3 LoRA script)")
    flow.add_argument(
        "--weighting_scheme",
        type=str,
        default="none",
        choices=list(objective.FLOW_MATCHING_WEIGHTING_SCHEMES),
        help="none (official DUO): σ uniform over the t range, unit weights; logit_normal/mode: σ drawn from that density "
        "over the t range; sigma_sqrt/cosmap: uniform σ, weighted loss",
    )
    flow.add_argument("--logit_mean", type=float, default=0.0, help="mean of the logit_normal density")
    flow.add_argument("--logit_std", type=float, default=1.0, help="std of the logit_normal density")
    flow.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode density")
    flow.add_argument(
        "--precondition_outputs",
        type=int,
        nargs="?",
        const=1,
        default=1,
        choices=[0, 1],
        help="1 (default, as diffusers and the official run): compare x_σ − σ·v̂ with x; 0: compare v̂ with ε − x",
    )
    flow.add_argument(
        "--max_sequence_length",
        type=int,
        default=DEFAULT_MAX_SEQUENCE_LENGTH,
        help="T5 tokens of the prompt embeddings (77, as the official SD3 run; the pipeline's default is 256)",
    )
    fidelity.add_official_arguments(parser, family="sd3")
    memory.add_memory_check_arguments(parser)
    return show_defaults(parser).parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Validation: only the VAE comes back; the prompts were encoded at the start
# --------------------------------------------------------------------------------------------------


def make_validation_pipeline(transformer, vae, noise_scheduler):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    # A scheduler of its own: set_timesteps must not touch the training table.
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config),
        vae=vae,
        text_encoder=None,
        tokenizer=None,
        text_encoder_2=None,
        tokenizer_2=None,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def image_generator(args, pipeline, embeddings: sd3.PromptEmbeddings, weight_dtype, device):
    """``generate(prompt, seeds) -> images`` from the prompt embeddings computed at the start."""
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)

    def generate(prompt, seeds):
        prompt_embeds, pooled = embeddings([prompt] * len(seeds))
        negative_embeds, negative_pooled = embeddings([""] * len(seeds))
        with autocast:
            return pipeline(
                prompt_embeds=prompt_embeds.to(device, weight_dtype),
                pooled_prompt_embeds=pooled.to(device, weight_dtype),
                negative_prompt_embeds=negative_embeds.to(device, weight_dtype),
                negative_pooled_prompt_embeds=negative_pooled.to(device, weight_dtype),
                height=args.resolution,
                width=args.resolution,
                num_inference_steps=args.num_validation_inference_steps,
                generator=[torch.Generator().manual_seed(seed) for seed in seeds],
            ).images

    return generate


def log_validation(args, accelerator, transformer, vae, noise_scheduler, embeddings, weight_dtype, step, preset=None):
    """Base vs unlearned grid (and, with ``preset``, the model card samples) with the VAE on the accelerator only
    meanwhile. Returns the model card samples."""

    device = accelerator.device
    model = accelerator.unwrap_model(transformer)
    with offload_models(vae, device=device):
        pipeline = make_validation_pipeline(model, vae, noise_scheduler)
        generate = image_generator(args, pipeline, embeddings, weight_dtype, device)
        outputs.validation_grid(args, accelerator, model, generate, step)
        samples = outputs.save_model_card_samples(args, preset, generate) if preset is not None else []
        del pipeline, generate
    free_memory()
    return samples


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    # A λ the user gave, or the named objective's own (the concept objective's 0), is not SD3's derived default.
    preservation_weight_given = (
        args.preservation_weight is not None or "preservation_weight" in arguments.OBJECTIVES[args.objective]
    )
    arguments.check_environment_args(args)
    preset = arguments.resolve_training_args(args, family="sd3")
    sd3.check_sd3_args(args)
    validation.check_training_args(args)
    memory.check_cpu_run(args)  # before any download
    pipeline_class = families.detect_pipeline_class(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    families.require_family(pipeline_class, "sd3", "train_duo_sd3.py")
    memory.check_training_memory(args, "sd3")  # before any weight is downloaded

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
    retain_prompts = []
    if variant.uses_retain:
        retain_images, retain_prompts, args.retain_record = retain.get_retain_set(
            args, preset, pipeline_class, accelerator, conditions=variant.retain_conditions
        )

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers.optimization import get_scheduler

    weight_dtype = training.weight_dtype_for(accelerator)
    device = accelerator.device
    model_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", **model_kwargs
    )
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if not 0 <= args.t_min < args.t_max <= num_train_timesteps:
        raise UsageError(
            f"--t_min/--t_max must satisfy 0 <= t_min < t_max <= {num_train_timesteps} (indices into the sigma table)"
        )
    fidelity.resolve_sd3_preservation(args, noise_scheduler, preservation_weight_given)
    transformer = SD3Transformer2DModel.from_pretrained(
        args.pretrained_model_name_or_path,
        subfolder="transformer",
        variant=args.variant,
        dtype=weight_dtype,
        **model_kwargs,
    )
    transformer.requires_grad_(False)

    # Everything the loop and the validation need from the text encoders, computed once; then they are freed.
    prompts = [""]
    if not args.skip_validation:
        prompts += list(args.validation_prompts) + list(preset.unrelated_prompts)
    if arguments.needs_unsafe_prompts(args):
        prompts += list(pairs.unsafe_prompts)
    prompts += retain_prompts
    embeddings = sd3.encode_prompts_once(args, prompts, transformer, device, weight_dtype)
    empty_condition = embeddings([""])
    has_t5 = families.base_has_t5(args.pretrained_model_name_or_path, args.revision, args.cache_dir)

    # The pair latents, cached once; the VAE (fp32: it is small and SD3's latents are sensitive) then leaves.
    vae = AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant, **model_kwargs
    )
    vae.requires_grad_(False)
    vae.to(device)
    latents_cache = data.encode_pairs(
        vae,
        pairs,
        args.resolution,
        args.center_crop,
        args.random_flip,
        args.seed,
        device=device,
        dtype=torch.float32,
        progress=accelerator.is_local_main_process,
    )
    retain_latents = None
    if variant.uses_retain:
        retain_latents = sd3.RetainLatents(
            latents=retain.encode_retain_latents(vae, retain_images, args.resolution, device, torch.float32),
            condition=embeddings(retain_prompts),
        )
    vae.to("cpu")
    free_memory()

    transformer.to(device)
    target_modules = lora.prepare_denoiser_for_training(args, transformer)

    lora_params = [p for p in transformer.parameters() if p.requires_grad]
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
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    model = accelerator.unwrap_model(transformer)
    checkpoints.register_adapter_state_hooks(accelerator, model, sd3.save_lora_weights, lora_prefix="transformer")

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
    logger.info("***** Running DUO training (SD3) *****", main_process_only=True)
    logger.info(
        f"  Concept = {args.concept}, pairs = {len(pairs)}, β = {args.beta_dpo:g}, λ = {args.preservation_weight:g}, lr = {args.learning_rate:g}",
        main_process_only=True,
    )
    logger.info(
        f"  Pairs per optimizer step = {pairs_per_step}, steps = {args.max_train_steps} (from {first_step})",
        main_process_only=True,
    )
    logger.info(
        f"  σ-table indices [{args.t_min}, {args.t_max}), weighting = {args.weighting_scheme}, "
        f"preconditioned = {bool(args.precondition_outputs)}; preservation at σ = {args.preservation_sigma:.4g} with "
        f"λ = {args.preservation_weight:g} (effective weight {args.preservation_effective_weight:g}, the official "
        f"run's {args.official_preservation_effective_weight:g})",
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
            with accelerator.accumulate(transformer):
                pair_condition = (
                    embeddings([pairs.unsafe_prompts[i] for i in pair_indices.tolist()])
                    if arguments.needs_unsafe_prompts(args)
                    else None
                )
                batch = sd3.make_duo_batch(
                    latents_cache,
                    pair_indices,
                    generator,
                    noise_scheduler,
                    args,
                    empty_condition,
                    pair_condition,
                    variant.pair_conditions,
                    retain_latents,
                    variant.retain_conditions,
                )
                losses = sd3.duo_forward(
                    accelerator,
                    transformer,
                    batch,
                    args.beta_dpo,
                    args.preservation_weight,
                    weight_dtype,
                    args.precondition_outputs,
                    variant,
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
                    args, accelerator, transformer, vae, noise_scheduler, embeddings, weight_dtype, global_step
                )
            accelerator.wait_for_everyone()
    progress_bar.close()
    accelerator.wait_for_everyone()

    if accelerator.is_main_process:
        outputs.save_adapter(
            args.output_dir,
            lambda folder: sd3.save_lora_weights(folder, lora.lora_state_dict(model), model),
            last_checkpoint,
        )
        # The config before anything optional (validation images, card, push) can fail: the folder loads.
        config = outputs.write_duo_config(
            args.output_dir,
            args,
            sd3.architecture_info(pipeline_class, model, noise_scheduler, has_t5),
            target_modules,
            extra={**sd3.flow_matching_config(args), **fidelity.sd3_preservation_record(args)},
        )
        samples = []
        if not args.skip_validation:
            samples = log_validation(
                args,
                accelerator,
                transformer,
                vae,
                noise_scheduler,
                embeddings,
                weight_dtype,
                args.max_train_steps,
                preset,
            )
        outputs.finish_run(args, config, pipeline_class, samples)
    accelerator.end_training()


if __name__ == "__main__":
    main()
