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

import torch

from duo_plugin import arguments, lora, memory, official_flags, outputs, run_guard, samples, training
from duo_plugin.errors import exit_on_usage_error
from duo_plugin.families import base_has_t5, quantization, sd3
from duo_plugin.families.prompts import pipeline_prompt_kwargs
from duo_plugin.help_defaults import show_defaults
from duo_plugin.pairs import add_generation_arguments


DEFAULT_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
# The official SD3 run's image size and T5 length (its script's defaults; diffusers' pipeline uses 1024 and 256).
DEFAULT_RESOLUTION, DEFAULT_MAX_SEQUENCE_LENGTH = 512, 77


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description="DUO concept unlearning for Stable Diffusion 3 (flow-matching transformer models)."
    )
    arguments.add_training_arguments(parser, default_model=DEFAULT_MODEL, default_resolution=DEFAULT_RESOLUTION)
    add_generation_arguments(parser, for_training=True)
    arguments.add_flow_matching_arguments(parser, DEFAULT_MAX_SEQUENCE_LENGTH)
    official_flags.add_official_arguments(parser, family="sd3")
    memory.add_memory_check_arguments(parser)
    return show_defaults(parser).parse_args(argv)


@exit_on_usage_error
def main(argv=None):
    # From here on the flags are resolved (preset, recipe, λ) and read-only: duo_plugin.settings.
    args, preset, pipeline_class, family = training.resolve_run_args(parse_args(argv), "sd3", "train_duo_sd3.py")
    sd3.check_sd3_args(args)
    memory.check_training_memory(args, family)  # before any weight is downloaded
    accelerator = training.create_accelerator(args)
    run_guard.claim_output_dir(args, accelerator)
    args, run_data = training.load_run_data(args, preset, pipeline_class, accelerator)

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    weight_dtype = training.weight_dtype_for(accelerator)
    device = accelerator.device
    model_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", **model_kwargs
    )
    training.check_timestep_range(args, noise_scheduler.config.num_train_timesteps, " (indices into the sigma table)")
    transformer = quantization.load_quantized(
        lambda: SD3Transformer2DModel.from_pretrained(
            args.pretrained_model_name_or_path,
            subfolder="transformer",
            variant=args.variant,
            dtype=weight_dtype,
            **quantization.denoiser_load_kwargs(args.quantize_base, weight_dtype, device),
            **model_kwargs,
        ),
        args.quantize_base,
    )
    transformer.requires_grad_(False)

    # Everything the loop and the validation need from the text encoders, computed once; then they are freed.
    prompts = training.prompts_to_encode(args, preset, run_data)
    embeddings = sd3.encode_prompts_once(args, prompts, transformer, device, weight_dtype)
    has_t5 = base_has_t5(args.pretrained_model_name_or_path, args.revision, args.cache_dir)

    # The pair latents, cached once; the VAE (fp32: it is small and SD3's latents are sensitive) then leaves.
    vae = AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant, **model_kwargs
    )
    latents_cache, retain_latents = training.cache_latents(args, accelerator, vae, run_data, torch.float32)
    if retain_latents is not None:
        retain_latents = sd3.RetainLatents(retain_latents, embeddings(run_data.retain_prompts))

    quantization.to_device(transformer, training.denoiser_home(accelerator))
    target_modules = lora.prepare_denoiser_for_training(args, transformer)
    family_step = sd3.family_step(args, latents_cache, noise_scheduler, embeddings, run_data, retain_latents)
    run = training.TrainingRun(args, accelerator, transformer, sd3.save_lora_weights, "transformer", run_data)
    validation = samples.ValidationSampler(
        args,
        accelerator,
        vae,
        sd3.validation_pipeline(noise_scheduler),
        pipeline_prompt_kwargs(embeddings),
        weight_dtype,
        every_process=run.sharded,
    )

    for step in run.start("SD3", sd3.describe_flow_matching(args)):
        step_logs = []
        for micro_step in range(args.gradient_accumulation_steps):
            result = run.micro_step(family_step, step, micro_step)
            step_logs.append(result.losses.to_log())
        run.end_step(step + 1, step_logs)
        if run.validation_due(step + 1):
            validation.during_training(run.denoiser, step + 1)
    run.finish()

    config = run.save_adapter(  # by the main process
        sd3.save_lora_weights,
        sd3.architecture_info(pipeline_class, run.model, noise_scheduler, has_t5),
        target_modules,
        extra={**sd3.flow_matching_config(args), **official_flags.sd3_preservation_record(args)},
    )
    # Under FSDP every process takes part in sampling the sharded model; the main process keeps the images.
    card_samples = validation.card_samples(run.denoiser, args.max_train_steps, preset)
    if accelerator.is_main_process:
        outputs.finish_run(args, config, pipeline_class, card_samples)
    accelerator.end_training()


if __name__ == "__main__":
    main()
