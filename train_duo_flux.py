#!/usr/bin/env python
"""Direct Unlearning Optimization (DUO) for FLUX.1 [dev] and [schnell].

The same product as train_duo_sd3.py for ``FluxPipeline`` models, modeled on diffusers'
train_dreambooth_lora_flux.py: rectified flow (σ drawn from the scheduler's training table, velocity target,
preconditioned to x_σ − σ·v̂ as for SD3), packed latents with their image ids, and for [dev] the guidance
embedding at the value the pairs were sampled with (``--guidance_scale``, default 3.5; recorded). The empty
prompt's CLIP pooled and T5 embeddings are computed once and the text encoders freed. LoRA sits on the
transformer's attention projections (to_q, to_k, to_v, to_out.0), the analogue of the official SD3 choice.

Output preservation is on pure noise told σ = 1, with λ set so that its effective strength on mean ‖v_θ − v_ref‖²
is the official SD3 run's: λ·1² = λ_off·σ_off², σ_off = 0.002994 the last entry of SD3's shift-3 table (44.8 at
β = 500). The paper has no FLUX run; this carries SD3's strength over because the term compares velocities of
the same kind of model at the same σ. FLUX's own table ends at σ = 0.001 (it is shifted only at sampling time),
so ``--preservation_placement official`` there means σ = 0.001 with the official λ.

    accelerate launch train_duo_flux.py --concept nudity --mixed_precision bf16 --gradient_checkpointing --use_8bit_adam
"""

import argparse

import torch

from duo_plugin import arguments, lora, memory, official_flags, outputs, run_guard, samples, training
from duo_plugin.errors import exit_on_usage_error
from duo_plugin.families import flux, quantization, sd3
from duo_plugin.families.prompts import pipeline_prompt_kwargs
from duo_plugin.help_defaults import show_defaults
from duo_plugin.pairs import FLUX_TRUE_CFG_SCALE, add_generation_arguments


DEFAULT_MODEL = "black-forest-labs/FLUX.1-dev"
DEFAULT_RESOLUTION = 512


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="DUO concept unlearning for FLUX.1 [dev] and [schnell].")
    arguments.add_training_arguments(parser, default_model=DEFAULT_MODEL, default_resolution=DEFAULT_RESOLUTION)
    add_generation_arguments(parser, for_training=True)
    arguments.add_flow_matching_arguments(parser, flux.DEFAULT_MAX_SEQUENCE_LENGTH)
    official_flags.add_official_arguments(parser, family="sd3")
    memory.add_memory_check_arguments(parser)
    return show_defaults(parser).parse_args(argv)


@exit_on_usage_error
def main(argv=None):
    # From here on the flags are resolved (preset, recipe, λ) and read-only: duo_plugin.settings.
    args, preset, pipeline_class, family = training.resolve_run_args(parse_args(argv), "flux", "train_duo_flux.py")
    flux.check_flux_args(args)
    memory.check_training_memory(args, family)  # before any weight is downloaded
    accelerator = training.create_accelerator(args)
    run_guard.claim_output_dir(args, accelerator)
    # FLUX.1 has no classifier-free guidance of its own: the guided preference uses the pairs' true CFG scale.
    args, run_data = training.load_run_data(
        args, preset, pipeline_class, accelerator, sampler_guidance=args.true_cfg_scale or FLUX_TRUE_CFG_SCALE
    )

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    weight_dtype = training.weight_dtype_for(accelerator)
    device = accelerator.device
    model_kwargs = {"revision": args.revision, "cache_dir": args.cache_dir}
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="scheduler", **model_kwargs
    )
    training.check_timestep_range(args, noise_scheduler.config.num_train_timesteps, " (indices into the sigma table)")
    transformer = quantization.load_quantized(
        lambda: FluxTransformer2DModel.from_pretrained(
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
    guidance = flux.training_guidance(args, transformer)

    # Everything the loop and the validation need from CLIP and T5, computed once; then they are freed.
    prompts = training.prompts_to_encode(args, preset, run_data)
    embeddings = flux.encode_prompts_once(args, prompts, transformer, device, weight_dtype)

    # The pair latents, cached once in fp32 (as for SD3); the VAE then leaves the accelerator.
    vae = AutoencoderKL.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant, **model_kwargs
    )
    latents_cache, retain_latents = training.cache_latents(args, accelerator, vae, run_data, torch.float32)
    if retain_latents is not None:
        retain_latents = sd3.RetainLatents(retain_latents, embeddings(run_data.retain_prompts))

    quantization.to_device(transformer, training.denoiser_home(accelerator))
    target_modules = lora.prepare_denoiser_for_training(args, transformer)
    family_step = flux.family_step(
        args, latents_cache, noise_scheduler, embeddings, run_data, guidance, retain_latents
    )
    run = training.TrainingRun(args, accelerator, transformer, flux.save_lora_weights, "transformer", run_data)
    validation = samples.ValidationSampler(
        args,
        accelerator,
        vae,
        flux.validation_pipeline(noise_scheduler),
        pipeline_prompt_kwargs(embeddings, negative=False),
        weight_dtype,
        extra_kwargs={} if guidance is None else {"guidance_scale": guidance},
        every_process=run.sharded,
    )

    for step in run.start("FLUX.1", sd3.describe_flow_matching(args) + f"; guidance embedding = {guidance}"):
        step_logs = []
        for micro_step in range(args.gradient_accumulation_steps):
            result = run.micro_step(family_step, step, micro_step)
            step_logs.append(result.losses.to_log())
        run.end_step(step + 1, step_logs)
        if run.validation_due(step + 1):
            validation.during_training(run.denoiser, step + 1)
    run.finish()

    config = run.save_adapter(  # by the main process
        flux.save_lora_weights,
        flux.architecture_info(pipeline_class, run.model, noise_scheduler),
        target_modules,
        extra={
            **sd3.flow_matching_config(args),
            **official_flags.sd3_preservation_record(args),
            "training_guidance_scale": guidance,
        },
    )
    # Under FSDP every process takes part in sampling the sharded model; the main process keeps the images.
    card_samples = validation.card_samples(run.denoiser, args.max_train_steps, preset)
    if accelerator.is_main_process:
        outputs.finish_run(args, config, pipeline_class, card_samples)
    accelerator.end_training()


if __name__ == "__main__":
    main()
