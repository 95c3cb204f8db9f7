"""Stable Diffusion 3 (MMDiT transformer, flow matching): prompts encoded once, the DUO batch, the forward
pass, the adapter's file.

``train_duo_sd3.py`` shows the loop; these are the pieces of its step that benchmarks and tests use too.
"""

import functools
from dataclasses import dataclass
from typing import List

import torch

from .. import objective
from ..errors import UsageError
from ..lora import require_joint_attention_target, save_denoiser_lora
from ..step import FamilyStep, StepSettings, duo_losses
from . import base_has_t5
from .prompts import PromptEmbeddings, encode_once, pair_condition, pipeline_for_embeddings
from .quantization import text_quantization_config, to_device


def load_text_pipeline(args, transformer, dtype):
    """The base pipeline's text encoders and tokenizers, without a second copy of the transformer or a VAE.

    The transformer being trained is lent to the pipeline: a T5-less base needs its
    ``joint_attention_dim`` for the zero T5 embeddings; it is never called here.
    """
    from diffusers import StableDiffusion3Pipeline

    without_t5 = (
        {}
        if base_has_t5(args.pretrained_model_name_or_path, args.revision, args.cache_dir)
        else {"text_encoder_3": None, "tokenizer_3": None}
    )
    return StableDiffusion3Pipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        transformer=transformer,
        vae=None,
        revision=args.revision,
        variant=args.variant,
        cache_dir=args.cache_dir,
        dtype=dtype,
        quantization_config=text_quantization_config(
            getattr(args, "quantize_base", "none"), dtype, ["text_encoder_3"] if not without_t5 else []
        ),
        **without_t5,
    )


def encode_prompts_once(args, prompts: List[str], transformer, device, dtype, batch_size: int = 8) -> PromptEmbeddings:
    """Encode every prompt the run will need, then free all text encoders (T5-XXL alone is ~9.5 GB in fp16).

    Called before the transformer moves to the accelerator, so the encoders and the transformer are
    never there together.
    """
    from diffusers.training_utils import free_memory

    encode_batch = _prompt_encoder(args, transformer, device, dtype)
    embeddings = encode_once(prompts, encode_batch, batch_size)
    del encode_batch  # the only reference to the text encoders
    free_memory()
    return embeddings


def _prompt_encoder(args, transformer, device, dtype):
    text_pipeline = load_text_pipeline(args, transformer, dtype)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(text_pipeline, name) is not None:
            to_device(getattr(text_pipeline, name), device)

    def encode_batch(batch):
        embeds, _, pooled, _ = text_pipeline.encode_prompt(
            batch,
            None,
            None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=args.max_sequence_length,
        )
        return embeds, pooled

    return encode_batch


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
    layout: objective.BatchLayout = None

    def __post_init__(self):
        # A batch built without a layout is the paper's [x⁻_t; x⁺_t; x_T].
        if self.layout is None:
            self.layout = objective.BatchLayout(self.target.shape[0] // 2)


@dataclass
class RetainLatents:
    """The retain set, encoded once: clean latents and their prompts' (prompt_embeds, pooled) rows."""

    latents: torch.Tensor
    condition: tuple


def make_duo_batch(
    latents_cache,
    pair_indices,
    generator,
    noise_scheduler,
    args,
    empty_condition,
    pair_condition=None,
    pair_conditions=None,
    retain=None,
    retain_conditions=(),
):
    """Sample the pairs' latents, one noise per pair (shared by both images), σ (one per pair, or one per image
    with ``--pair_timesteps independent``), and pure noise for the preservation branch, told σ = 1 (or the
    table's last entry with ``--preservation_placement official``). All draws come from ``generator``.

    ``args`` carries t_min, t_max, weighting_scheme, logit_mean, logit_std, mode_scale,
    precondition_outputs, pair_timesteps, preservation_noise and preservation_placement;
    ``empty_condition`` and ``pair_condition`` are (prompt_embeds, pooled) pairs of one row and of one
    row per pair. ``pair_conditions``, ``retain`` and ``retain_conditions`` lay out the concept-specific
    objective's batch as ``sd.make_duo_batch`` does (the retain images' draws come last).
    """
    num_pairs = len(pair_indices)
    flips = torch.randint(0, latents_cache.mean.shape[1], (num_pairs,), generator=generator)
    unsafe_latents, safe_latents = latents_cache.sample(pair_indices, flips, generator)
    noise = torch.randn(unsafe_latents.shape, generator=generator)
    indices = objective.pair_image_timesteps(
        lambda n: objective.sample_flow_matching_indices(
            n,
            args.t_min,
            args.t_max,
            generator,
            args.weighting_scheme,
            args.logit_mean,
            args.logit_std,
            args.mode_scale,
        ),
        num_pairs,
        getattr(args, "pair_timesteps", "shared"),
    )
    pure_noise = torch.randn(unsafe_latents.shape, generator=generator)
    if getattr(args, "preservation_noise", "fresh") == "pair":
        pure_noise = noise

    pair_sigmas, pair_timesteps = objective.flow_matching_sigmas_and_timesteps(noise_scheduler, indices)
    noise_sigma, noise_timestep = objective.preservation_sigma_and_timestep(
        noise_scheduler, getattr(args, "preservation_placement", "sigma_one")
    )
    clean = torch.cat([unsafe_latents, safe_latents])
    pair_noise = torch.cat([noise, noise])
    if pair_conditions is None:
        pair_conditions = ("prompt",) if pair_condition is not None else ("empty",)

    empty_embeds, empty_pooled = (c.expand(num_pairs, *c.shape[1:]) for c in empty_condition)
    pair_embeddings = {"empty": (empty_embeds, empty_pooled), "prompt": pair_condition}
    pair_weighting = objective.flow_matching_loss_weighting(args.weighting_scheme, pair_sigmas)
    # The preservation input is the pure noise itself, whatever σ the model is told.
    noisy_pairs = objective.flow_matching_noisy(clean, pair_noise, pair_sigmas)
    inputs = [noisy_pairs] * len(pair_conditions) + [pure_noise]
    sigmas = [pair_sigmas] * len(pair_conditions) + [noise_sigma.expand(num_pairs)]
    timesteps = [pair_timesteps] * len(pair_conditions) + [noise_timestep.expand(num_pairs)]
    conditions = [tuple(c.repeat(2, *[1] * (c.ndim - 1)) for c in pair_embeddings[name]) for name in pair_conditions]
    conditions.append((empty_embeds, empty_pooled))
    num_retain = 0
    if retain is not None and retain_conditions:
        num_retain = num_pairs
        rows = torch.randint(0, retain.latents.shape[0], (num_retain,), generator=generator)
        retain_noise = torch.randn((num_retain, *retain.latents.shape[1:]), generator=generator)
        retain_indices = objective.sample_flow_matching_indices(num_retain, args.t_min, args.t_max, generator)
        retain_sigmas, retain_timesteps = objective.flow_matching_sigmas_and_timesteps(noise_scheduler, retain_indices)
        noisy_retain = objective.flow_matching_noisy(retain.latents[rows], retain_noise, retain_sigmas)
        retain_embeddings = {
            "empty": tuple(c.expand(num_retain, *c.shape[1:]) for c in empty_condition),
            "prompt": tuple(c[rows] for c in retain.condition),
        }
        inputs += [noisy_retain] * len(retain_conditions)
        sigmas += [retain_sigmas] * len(retain_conditions)
        timesteps += [retain_timesteps] * len(retain_conditions)
        conditions += [retain_embeddings[name] for name in retain_conditions]
    return DUOBatch(
        model_input=torch.cat(inputs),
        sigmas=torch.cat(sigmas),
        timesteps=torch.cat(timesteps),
        prompt_embeds=torch.cat([embeds for embeds, _ in conditions]),
        pooled_prompt_embeds=torch.cat([pooled for _, pooled in conditions]),
        target=objective.flow_matching_target(clean, pair_noise, bool(args.precondition_outputs)),
        weighting=pair_weighting.reshape(-1, *([1] * (clean.ndim - 1))),
        layout=objective.BatchLayout(
            num_pairs, tuple(pair_conditions), num_retain, tuple(retain_conditions) if num_retain else ()
        ),
    )


def predict(transformer, batch: DUOBatch, device, dtype, precondition_outputs: bool = True) -> torch.Tensor:
    """The transformer's velocity, or with ``precondition_outputs`` the clean-latent estimate x_σ − σ·v̂."""
    model_input = batch.model_input.to(device, dtype=dtype)
    prediction = transformer(
        hidden_states=model_input,
        timestep=batch.timesteps.to(device),
        encoder_hidden_states=batch.prompt_embeds.to(device, dtype=dtype),
        pooled_projections=batch.pooled_prompt_embeds.to(device, dtype=dtype),
        return_dict=False,
    )[0]
    if precondition_outputs:
        return objective.precondition_flow_matching_output(
            prediction.float(), model_input.float(), batch.sigmas.to(device)
        )
    return prediction


def family_step(
    args, latents_cache, noise_scheduler, embeddings: PromptEmbeddings, run_data, retain=None, predict_fn=None
) -> FamilyStep:
    """The SD3 half of ``duo_plugin.step``: batches drawn as ``make_duo_batch`` with the run's flags; ``run_data``
    (a ``training.RunData``) gives the pairs' prompts and the objective. FLUX passes its own ``predict_fn``."""
    variant = run_data.variant

    def make_batch(pair_indices, generator):
        return make_duo_batch(
            latents_cache,
            pair_indices,
            generator,
            noise_scheduler,
            args,
            embeddings([""]),
            pair_condition(embeddings, run_data.unsafe_prompts, pair_indices),
            variant.pair_conditions,
            retain,
            variant.retain_conditions,
        )

    if predict_fn is None:
        predict_fn = functools.partial(predict, precondition_outputs=bool(args.precondition_outputs))
    return FamilyStep(make_batch, predict_fn)


def duo_forward(
    accelerator, transformer, batch, beta_dpo, preservation_weight, weight_dtype, precondition_outputs, variant=None
):
    """The reference and adapted forward over one batch and the DUO losses (``duo_plugin.step.duo_losses``)."""
    settings = StepSettings(
        beta_dpo, preservation_weight, weight_dtype, variant=variant or objective.VariantSettings()
    )
    return duo_losses(
        accelerator,
        transformer,
        functools.partial(predict, precondition_outputs=precondition_outputs),
        batch,
        settings,
    )


def save_lora_weights(output_dir, transformer_lora_state_dict, transformer=None):
    from diffusers import StableDiffusion3Pipeline

    save_denoiser_lora(StableDiffusion3Pipeline, "transformer", output_dir, transformer_lora_state_dict, transformer)


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


def check_sd3_args(args):
    """SD3-only refusals, after the family's defaults are filled in."""
    require_joint_attention_target(args.lora_target, "SD3")
    if args.max_sequence_length < 1:
        raise UsageError("--max_sequence_length must be at least 1 (the pipeline's default is 256)")


def flow_matching_config(args) -> dict:
    """The SD3-only entries of ``duo_config.json``."""
    return {
        "weighting_scheme": args.weighting_scheme,
        "logit_mean": args.logit_mean,
        "logit_std": args.logit_std,
        "mode_scale": args.mode_scale,
        "precondition_outputs": bool(args.precondition_outputs),
        "max_sequence_length": args.max_sequence_length,
        "timestep_range_indexes": "the scheduler's descending sigma table (index 0: sigma = 1)",
    }


def validation_pipeline(noise_scheduler):
    """``make(transformer, vae)``: SD3's text-to-image pipeline without text encoders (prompts come as embeddings),
    with a scheduler of its own (set_timesteps must not touch the training table)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    def make(transformer, vae):
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
        return pipeline_for_embeddings(StableDiffusion3Pipeline, transformer=transformer, vae=vae, scheduler=scheduler)

    return make


def describe_flow_matching(args) -> str:
    """The log line of a flow-matching run's σ draw and preservation placement."""
    return (
        f"σ-table indices [{args.t_min}, {args.t_max}), weighting = {args.weighting_scheme}, "
        f"preconditioned = {bool(args.precondition_outputs)}; preservation at σ = {args.preservation_sigma:.4g} with "
        f"λ = {args.preservation_weight:g} (effective weight {args.preservation_effective_weight:g}, the official "
        f"SD3 run's {args.official_preservation_effective_weight:g})"
    )
