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
  table there (t ≈ 1, the last sampling step) with the same pure-noise input.

Memory: every prompt the run needs (the empty prompt; the validation prompts) is encoded once with the
three text encoders, which are then freed; the pair latents are cached once and the VAE leaves the
accelerator until validation. With ``--mixed_precision bf16 --gradient_checkpointing --use_8bit_adam``
only the transformer and the adapter remain on the GPU while training.

    accelerate launch train_duo_sd3.py --concept nudity --mixed_precision bf16 --gradient_checkpointing
"""

import argparse
from dataclasses import dataclass
from typing import Dict, List

import torch
from accelerate.logging import get_logger

from duo_plugin import data, objective, timing, training
from duo_plugin.errors import UsageError, exit_on_usage_error
from duo_plugin.pairs import add_generation_arguments, get_pair_images

logger = get_logger(__name__)

DEFAULT_MODEL = "stabilityai/stable-diffusion-3-medium-diffusers"
# The official SD3 run: lr 3e-5 at β = 100, scaled by 100 / β like SD1's 3e-4.
BASE_LEARNING_RATE = 3e-5
DEFAULT_T_MIN, DEFAULT_T_MAX = 1, 750


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="DUO concept unlearning for Stable Diffusion 3 (flow-matching transformer models).")
    training.add_training_arguments(parser, default_model=DEFAULT_MODEL, default_resolution=1024)
    add_generation_arguments(parser, for_training=True)
    flow = parser.add_argument_group("flow matching (as in diffusers' SD3 LoRA script)")
    flow.add_argument(
        "--weighting_scheme", type=str, default="none", choices=list(objective.FLOW_MATCHING_WEIGHTING_SCHEMES),
        help="none (official DUO): σ uniform over the t range, unit weights; logit_normal/mode: σ drawn from that density "
        "over the t range; sigma_sqrt/cosmap: uniform σ, weighted loss",
    )
    flow.add_argument("--logit_mean", type=float, default=0.0, help="mean of the logit_normal density")
    flow.add_argument("--logit_std", type=float, default=1.0, help="std of the logit_normal density")
    flow.add_argument("--mode_scale", type=float, default=1.29, help="scale of the mode density")
    flow.add_argument(
        "--precondition_outputs", type=int, nargs="?", const=1, default=1, choices=[0, 1],
        help="1 (default, as diffusers and the official run): compare x_σ − σ·v̂ with x; 0: compare v̂ with ε − x",
    )
    flow.add_argument("--max_sequence_length", type=int, default=256, help="T5 tokens of the prompt embeddings (the pipeline's default)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Prompts: encoded once, then every text encoder is freed
# --------------------------------------------------------------------------------------------------


@dataclass
class PromptEmbeddings:
    """SD3 prompt embeddings (CLIP-L, CLIP-G and T5 tokens) and pooled projections, on the CPU."""

    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    index: Dict[str, int]

    def __call__(self, prompts: List[str]):
        rows = torch.tensor([self.index[prompt] for prompt in prompts])
        return self.prompt_embeds[rows], self.pooled_prompt_embeds[rows]


def load_text_pipeline(args, transformer, dtype):
    """The base pipeline's text encoders and tokenizers, without a second copy of the transformer or a VAE.

    The transformer being trained is lent to the pipeline: a T5-less base needs its
    ``joint_attention_dim`` for the zero T5 embeddings; it is never called here.
    """
    from diffusers import StableDiffusion3Pipeline

    without_t5 = {} if training.base_has_t5(args.pretrained_model_name_or_path, args.revision, args.cache_dir) else {"text_encoder_3": None, "tokenizer_3": None}
    return StableDiffusion3Pipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        transformer=transformer,
        vae=None,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        **training.dtype_kwargs(dtype),
        **without_t5,
    )


@torch.no_grad()
def encode_prompts_once(args, prompts: List[str], transformer, device, dtype, batch_size: int = 8) -> PromptEmbeddings:
    """Encode every prompt the run will need, then free all text encoders (T5-XXL alone is ~9.5 GB in fp16).

    Called before the transformer moves to the accelerator, so the encoders and the transformer are
    never there together.
    """
    from diffusers.training_utils import free_memory

    unique = list(dict.fromkeys(prompts))
    text_pipeline = load_text_pipeline(args, transformer, dtype)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(text_pipeline, name) is not None:
            getattr(text_pipeline, name).to(device)
    prompt_embeds, pooled_prompt_embeds = [], []
    for start in range(0, len(unique), batch_size):
        embeds, _, pooled, _ = text_pipeline.encode_prompt(
            unique[start : start + batch_size], None, None,
            device=device, do_classifier_free_guidance=False, max_sequence_length=args.max_sequence_length,
        )
        prompt_embeds.append(embeds.float().cpu())
        pooled_prompt_embeds.append(pooled.float().cpu())
    del text_pipeline
    free_memory()
    return PromptEmbeddings(torch.cat(prompt_embeds), torch.cat(pooled_prompt_embeds), {p: i for i, p in enumerate(unique)})


# --------------------------------------------------------------------------------------------------
# One DUO step under flow matching
# --------------------------------------------------------------------------------------------------


@dataclass
class DUOBatch:
    """One micro-step's inputs: the concatenated [x⁻_σ; x⁺_σ; x_1] batch and the pair targets."""

    model_input: torch.Tensor
    sigmas: torch.Tensor
    timesteps: torch.Tensor
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    target: torch.Tensor
    weighting: torch.Tensor


def make_duo_batch(latents_cache, pair_indices, generator, noise_scheduler, args, empty_condition, pair_condition=None):
    """Sample the pairs' latents, one noise and one σ per pair (shared by both images), and pure noise at
    σ = 1 for the preservation branch. All draws come from ``generator``.

    ``args`` carries t_min, t_max, weighting_scheme, logit_mean, logit_std, mode_scale and
    precondition_outputs; ``empty_condition`` and ``pair_condition`` are (prompt_embeds, pooled) pairs
    of one row and of one row per pair.
    """
    num_pairs = len(pair_indices)
    flips = torch.randint(0, latents_cache.mean.shape[1], (num_pairs,), generator=generator)
    unsafe_latents, safe_latents = latents_cache.sample(pair_indices, flips, generator)
    noise = torch.randn(unsafe_latents.shape, generator=generator)
    indices = objective.sample_flow_matching_indices(
        num_pairs, args.t_min, args.t_max, generator, args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale
    )
    pure_noise = torch.randn(unsafe_latents.shape, generator=generator)

    pair_sigmas, pair_timesteps = objective.flow_matching_sigmas_and_timesteps(noise_scheduler, indices)
    noise_sigma, noise_timestep = objective.pure_noise_sigma_and_timestep(noise_scheduler)
    sigmas = torch.cat([pair_sigmas, pair_sigmas, noise_sigma.expand(num_pairs)])
    timesteps = torch.cat([pair_timesteps, pair_timesteps, noise_timestep.expand(num_pairs)])
    # At σ = 1 the clean part is multiplied by 0: the preservation input is exactly the pure noise.
    clean = torch.cat([unsafe_latents, safe_latents, torch.zeros_like(unsafe_latents)])
    all_noise = torch.cat([noise, noise, pure_noise])

    empty_embeds, empty_pooled = (c.expand(num_pairs, *c.shape[1:]) for c in empty_condition)
    pair_embeds, pair_pooled = pair_condition if pair_condition is not None else (empty_embeds, empty_pooled)
    pair_weighting = objective.flow_matching_loss_weighting(args.weighting_scheme, sigmas[: 2 * num_pairs])
    return DUOBatch(
        model_input=objective.flow_matching_noisy(clean, all_noise, sigmas),
        sigmas=sigmas,
        timesteps=timesteps,
        prompt_embeds=torch.cat([pair_embeds, pair_embeds, empty_embeds]),
        pooled_prompt_embeds=torch.cat([pair_pooled, pair_pooled, empty_pooled]),
        target=objective.flow_matching_target(clean[: 2 * num_pairs], all_noise[: 2 * num_pairs], bool(args.precondition_outputs)),
        weighting=pair_weighting.reshape(-1, *([1] * (clean.ndim - 1))),
    )


def duo_forward(accelerator, transformer, batch, beta_dpo, preservation_weight, weight_dtype, precondition_outputs):
    """The reference forward (adapter off, unwrapped model, no grad) and the adapted forward over one batch."""
    model = accelerator.unwrap_model(transformer)
    device = accelerator.device
    model_input = batch.model_input.to(device, dtype=weight_dtype)
    inputs = dict(
        hidden_states=model_input,
        timestep=batch.timesteps.to(device),
        encoder_hidden_states=batch.prompt_embeds.to(device, dtype=weight_dtype),
        pooled_projections=batch.pooled_prompt_embeds.to(device, dtype=weight_dtype),
        return_dict=False,
    )
    with torch.no_grad(), accelerator.autocast(), training.adapters_disabled(model):
        ref_prediction = model(**inputs)[0]
    with accelerator.autocast():
        model_prediction = transformer(**inputs)[0]
    if precondition_outputs:
        sigmas = batch.sigmas.to(device)
        ref_prediction = objective.precondition_flow_matching_output(ref_prediction.float(), model_input.float(), sigmas)
        model_prediction = objective.precondition_flow_matching_output(model_prediction.float(), model_input.float(), sigmas)
    return objective.duo_losses(
        model_prediction, ref_prediction, batch.target.to(device), beta_dpo, preservation_weight, weighting=batch.weighting.to(device)
    )


def save_lora_weights(output_dir, transformer_lora_state_dict, transformer=None):
    from diffusers import StableDiffusion3Pipeline

    metadata = transformer.peft_config["default"].to_dict() if transformer is not None else None
    StableDiffusion3Pipeline.save_lora_weights(
        output_dir,
        transformer_lora_layers=transformer_lora_state_dict,
        weight_name=training.LORA_WEIGHT_NAME,
        transformer_lora_adapter_metadata=metadata,
    )


def architecture_info(pipeline_class, transformer, noise_scheduler, has_t5: bool) -> dict:
    config = transformer.config
    return {
        "family": "sd3",
        "pipeline_class": pipeline_class,
        "denoiser": "transformer",
        "joint_attention_dim": config.joint_attention_dim,
        "num_layers": config.num_layers,
        "num_attention_heads": config.num_attention_heads,
        "attention_head_dim": config.attention_head_dim,
        "in_channels": config.in_channels,
        "patch_size": config.patch_size,
        "pooled_projection_dim": config.pooled_projection_dim,
        "dual_attention_layers": list(config.dual_attention_layers),
        "has_t5": has_t5,
        "prediction_type": "flow_matching",
        "scheduler_shift": noise_scheduler.config.shift,
    }


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


def image_generator(args, pipeline, embeddings: PromptEmbeddings, weight_dtype, device):
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


def run_validation(args, accelerator, transformer, vae, noise_scheduler, embeddings, weight_dtype, step, preset=None):
    """Validation grid (and, with ``preset``, the model card samples) with the VAE on the accelerator only meanwhile."""
    from diffusers.training_utils import free_memory

    device = accelerator.device
    model = accelerator.unwrap_model(transformer)
    vae.to(device)
    pipeline = make_validation_pipeline(model, vae, noise_scheduler)
    generate = image_generator(args, pipeline, embeddings, weight_dtype, device)
    training.validation_grid(args, accelerator, model, generate, step)
    samples = training.save_model_card_samples(args, preset, generate) if preset is not None else []
    del pipeline, generate
    vae.to("cpu")
    free_memory()
    return samples


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------


def resolve_sd3_defaults(args):
    args.lora_target = args.lora_target or "attn"
    if args.lora_target != "attn":
        raise UsageError(
            f"--lora_target {args.lora_target}: SD3's joint attention has no separate self-attention; use --lora_target attn "
            f"(to_q, to_k, to_v, to_out.0 of every transformer block)"
        )
    args.t_min = DEFAULT_T_MIN if args.t_min is None else args.t_min
    args.t_max = DEFAULT_T_MAX if args.t_max is None else args.t_max
    if args.max_sequence_length < 1:
        raise UsageError("--max_sequence_length must be at least 1 (the pipeline's default is 256)")


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    training.check_environment_args(args)
    preset = training.resolve_concept(args, architecture="sd3", base_learning_rate=BASE_LEARNING_RATE)
    resolve_sd3_defaults(args)
    pipeline_class = training.detect_pipeline_class(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
    training.require_family(pipeline_class, "sd3", "train_duo_sd3.py")

    accelerator = training.create_accelerator(args)

    # Pairs first: bad data is refused before any model weight is loaded.
    pairs = get_pair_images(args, preset, pipeline_class, accelerator)
    args.t_max = timing.resolve_t_max(args, preset, accelerator, default=DEFAULT_T_MAX)  # auto: measured where the concept is decided
    if args.condition_on_prompts and pairs.unsafe_prompts is None:
        raise UsageError("--condition_on_prompts needs an unsafe_prompt column in the pair data")

    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    weight_dtype = training.weight_dtype_for(accelerator)
    device = accelerator.device
    model_kwargs = dict(revision=args.revision, cache_dir=args.cache_dir)
    noise_scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler", **model_kwargs)
    num_train_timesteps = noise_scheduler.config.num_train_timesteps
    if not 0 <= args.t_min < args.t_max <= num_train_timesteps:
        raise UsageError(f"--t_min/--t_max must satisfy 0 <= t_min < t_max <= {num_train_timesteps} (indices into the sigma table)")
    transformer = SD3Transformer2DModel.from_pretrained(
        args.pretrained_model_name_or_path, subfolder="transformer", variant=args.variant, **training.dtype_kwargs(weight_dtype), **model_kwargs
    )
    transformer.requires_grad_(False)

    # Everything the loop and the validation need from the text encoders, computed once; then they are freed.
    prompts = [""]
    if not args.skip_validation:
        prompts += list(args.validation_prompts) + list(preset.unrelated_prompts)
    if args.condition_on_prompts:
        prompts += list(pairs.unsafe_prompts)
    embeddings = encode_prompts_once(args, prompts, transformer, device, weight_dtype)
    empty_condition = embeddings([""])
    has_t5 = training.base_has_t5(args.pretrained_model_name_or_path, args.revision, args.cache_dir)

    # The pair latents, cached once; the VAE (fp32: it is small and SD3's latents are sensitive) then leaves.
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", variant=args.variant, **model_kwargs)
    vae.requires_grad_(False)
    vae.to(device)
    latents_cache = data.encode_pairs(
        vae, pairs, args.resolution, args.center_crop, args.random_flip, args.seed,
        device=device, dtype=torch.float32, progress=accelerator.is_local_main_process,
    )
    vae.to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()

    transformer.to(device)
    target_modules = training.prepare_denoiser_for_training(args, transformer)

    transformer, optimizer, lr_scheduler, lora_params, resume_path, first_step = training.prepare_optimization(
        args, accelerator, transformer, save_lora_weights, lora_prefix="transformer"
    )
    model = accelerator.unwrap_model(transformer)
    logger.info(
        "σ-table indices [%d, %d), weighting = %s, preconditioned = %s",
        args.t_min, args.t_max, args.weighting_scheme, bool(args.precondition_outputs), main_process_only=True,
    )

    def compute_losses(pair_indices, generator):
        pair_condition = embeddings([pairs.unsafe_prompts[i] for i in pair_indices.tolist()]) if args.condition_on_prompts else None
        batch = make_duo_batch(latents_cache, pair_indices, generator, noise_scheduler, args, empty_condition, pair_condition)
        return duo_forward(accelerator, transformer, batch, args.beta_dpo, args.preservation_weight, weight_dtype, args.precondition_outputs)

    def validate(step, preset=None):
        return run_validation(args, accelerator, transformer, vae, noise_scheduler, embeddings, weight_dtype, step, preset)

    training.train_duo_steps(
        args, accelerator, transformer, optimizer, lr_scheduler, lora_params, len(pairs), first_step, resume_path,
        compute_losses, validate, project_name="duo-sd3",
    )

    if accelerator.is_main_process:
        save_lora_weights(args.output_dir, training.lora_state_dict(model), model)
        samples = []
        if not args.skip_validation:
            samples = validate(args.max_train_steps, preset)
        extra = {
            "weighting_scheme": args.weighting_scheme,
            "logit_mean": args.logit_mean,
            "logit_std": args.logit_std,
            "mode_scale": args.mode_scale,
            "precondition_outputs": bool(args.precondition_outputs),
            "max_sequence_length": args.max_sequence_length,
            "timestep_range_indexes": "the scheduler's descending sigma table (index 0: sigma = 1)",
            "preservation_sigma": 1.0,
        }
        config = training.write_duo_config(args.output_dir, args, architecture_info(pipeline_class, model, noise_scheduler, has_t5), target_modules, extra)
        training.finish_run(args, accelerator, config, pipeline_class, samples)
    accelerator.end_training()


if __name__ == "__main__":
    main()
