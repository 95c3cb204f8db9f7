"""The GPU work the estimate traces, as the scripts and pipelines run it: one DUO training step, the in-training
validation, and a sampling call of the inference pipelines (text encoders, one denoiser call, the VAE)."""

import contextlib
from typing import Callable, Optional

import torch

from .accounting import HALF_DTYPES, mixed_precision_autocast
from .configs import INFERENCE_T5_TOKENS, SDXL_TIME_IDS, BaseModelConfigs, clip_length, is_t5, vae_scale_factor
from .models import BuiltModels, LoraOptimizer, add_adapter, build_denoiser, build_text_encoders, build_vae, to_fake
from .quantized import build_quantized_denoiser, disable_lora_input_cast, quantize_text_encoders
from .recipes import TrainingMemorySettings


def build_training_models(
    configs: BaseModelConfigs, settings: TrainingMemorySettings, need_encoders: bool, fake_mode=None
) -> BuiltModels:
    """The run's models; with ``fake_mode``, built on the meta device and turned into fake CPU tensors."""
    weight_dtype = HALF_DTYPES.get(settings.mixed_precision, torch.float32)
    # train_duo_sd3.py keeps its VAE in fp32 (SD3's latents are sensitive); so do the SDXL (its VAE overflows in
    # fp16) and FLUX runs.
    vae_dtype = torch.float32 if configs.family in ("sdxl", "sd3", "flux") else weight_dtype
    quantize = settings.quantize_base
    with torch.device("meta") if fake_mode is not None else contextlib.nullcontext():
        if quantize == "none":
            denoiser = build_denoiser(configs, weight_dtype)
        else:
            denoiser = build_quantized_denoiser(configs, weight_dtype, quantize)
        if settings.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing(_checkpointing_under_autocast(settings.mixed_precision))
        add_adapter(denoiser, settings, configs.family)
        if quantize != "none":
            disable_lora_input_cast(denoiser, settings.mixed_precision)
        vae = build_vae(configs, vae_dtype) if need_encoders else None
        text_encoders = build_text_encoders(configs, weight_dtype) if need_encoders else {}
        quantize_text_encoders(configs, text_encoders, quantize, weight_dtype)
    if fake_mode is not None:
        for module in (denoiser, vae, *text_encoders.values()):
            if module is not None:
                to_fake(module, fake_mode)
    lora_params = [p for p in denoiser.parameters() if p.requires_grad]
    with fake_mode if fake_mode is not None else contextlib.nullcontext():
        optimizer = LoraOptimizer(lora_params, settings.use_8bit_adam)
    return BuiltModels(configs.family, denoiser, vae, text_encoders, lora_params, optimizer, weight_dtype, vae_dtype)


def _checkpointing_under_autocast(mixed_precision: str):
    """diffusers' checkpointing function (non-reentrant), its recomputation under ``CudaAutocast``: the real
    checkpoint restores the forward's autocast state for it, which a function mode does not get."""
    from torch.utils.checkpoint import checkpoint

    def gradient_checkpointing_func(module, *args):
        def run(*inputs):
            with mixed_precision_autocast(mixed_precision):
                return module(*inputs)

        return checkpoint(run, *args, use_reentrant=False)

    return gradient_checkpointing_func


def uses_cfg(family: str) -> bool:
    """FLUX.1's pipelines sample without classifier-free guidance (dev has the guidance distilled into its
    guidance embedding, schnell none): their batch is not doubled."""
    return family != "flux"


def encode_prompt(configs: BaseModelConfigs, name: str, encoder, batch: int, t5_tokens: int):
    """One text encoder's call on ``batch`` prompts, as the family's pipeline calls it: CLIP at 77 tokens, T5 at
    ``t5_tokens``; SD3 and SDXL take CLIP's penultimate hidden states (all hidden states are returned), FLUX takes
    CLIP's pooled output and T5's last layer."""
    config = configs.text_encoders[name]
    clip_tokens = min(clip_length(configs), config.get("max_position_embeddings", 77))
    ids = torch.zeros(batch, t5_tokens if is_t5(config) else clip_tokens, dtype=torch.long)
    return encoder(ids, output_hidden_states=configs.family in ("sd3", "sdxl"))


def _denoiser_config(configs: BaseModelConfigs, models=None) -> dict:
    """The denoiser's config with the class defaults filled in (the built model's), else the file's."""
    return dict(models.denoiser.config) if models is not None else configs.denoiser


def sdxl_pooled_dim(unet_config: dict) -> int:
    """The pooled text embedding SDXL's UNet takes: its added-condition input less the time ids' embeddings
    (2816 − 6·256 = 1280, CLIP-G's projection)."""
    return (
        unet_config["projection_class_embeddings_input_dim"] - SDXL_TIME_IDS * unet_config["addition_time_embed_dim"]
    )


def _condition_shapes(configs: BaseModelConfigs, t5_tokens: int, batch: int, models=None):
    """(prompt embeddings shape, pooled shape or None) the denoiser is conditioned on. SD3 concatenates the CLIP
    and T5 tokens; FLUX's tokens are T5's alone (CLIP-L gives only the pooled vector)."""
    config = _denoiser_config(configs, models)
    if configs.family == "sd":
        return (batch, clip_length(configs), config["cross_attention_dim"]), None
    if configs.family == "sdxl":
        return (batch, clip_length(configs), config["cross_attention_dim"]), (batch, sdxl_pooled_dim(config))
    tokens = t5_tokens if configs.family == "flux" else clip_length(configs) + t5_tokens
    return (batch, tokens, config["joint_attention_dim"]), (batch, config["pooled_projection_dim"])


def _latent_shape(configs: BaseModelConfigs, resolution: int, batch: int):
    size = resolution // vae_scale_factor(configs.vae)
    channels = configs.vae.get("latent_channels", 4)
    return (batch, channels, size, size)


def _denoiser_input_shape(configs: BaseModelConfigs, resolution: int, batch: int):
    """The latents as the denoiser takes them: FLUX packs 2×2 patches into tokens, (B, (h/2)·(w/2), 4·C)."""
    batch, channels, size, _ = _latent_shape(configs, resolution, batch)
    if configs.family != "flux":
        return (batch, channels, size, size)
    return (batch, (size // 2) ** 2, 4 * channels)


def _pack(latents: torch.Tensor) -> torch.Tensor:
    """``FluxPipeline._pack_latents``: (B, C, h, w) -> (B, (h/2)·(w/2), 4·C), a copy."""
    batch, channels, height, width = latents.shape
    latents = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(batch, (height // 2) * (width // 2), channels * 4)


def _unpack(latents: torch.Tensor, size: int) -> torch.Tensor:
    """``FluxPipeline._unpack_latents``: the inverse of ``_pack`` for a square latent of ``size``, a copy."""
    batch, _, packed_channels = latents.shape
    channels = packed_channels // 4
    latents = latents.view(batch, size // 2, size // 2, channels, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(batch, channels, size, size)


FLUX_GUIDANCE_SCALE = 3.5  # FLUX.1-dev's guidance embedding input (diffusers' FLUX scripts' default)


def _extra_inputs(configs: BaseModelConfigs, models, resolution: int, batch: int, t5_tokens: int, dtype) -> dict:
    """The denoiser's inputs beyond latents, timesteps and prompt embeddings: SDXL's time ids (original size,
    crop, target size); FLUX's position ids of the image and text tokens and, for a guidance-distilled model
    ([dev]), the fp32 guidance vector."""
    if configs.family == "sdxl":
        return {"time_ids": torch.randn(batch, SDXL_TIME_IDS, dtype=dtype)}
    if configs.family != "flux":
        return {}
    size = resolution // vae_scale_factor(configs.vae)
    extra = {
        "img_ids": torch.zeros((size // 2) ** 2, 3, dtype=dtype),
        "txt_ids": torch.zeros(t5_tokens, 3, dtype=dtype),
    }
    if _denoiser_config(configs, models).get("guidance_embeds"):
        extra["guidance"] = torch.full((batch,), FLUX_GUIDANCE_SCALE)
    return extra


def _denoise(models: BuiltModels, model_input, timesteps, condition, pooled, extra: Optional[dict] = None):
    extra = extra or {}
    if models.family == "sd":
        return models.denoiser(model_input, timesteps, condition).sample
    if models.family == "sdxl":
        added = {"text_embeds": pooled, "time_ids": extra["time_ids"]}
        return models.denoiser(model_input, timesteps, condition, added_cond_kwargs=added).sample
    return models.denoiser(
        hidden_states=model_input,
        timestep=timesteps,
        encoder_hidden_states=condition,
        pooled_projections=pooled,
        return_dict=False,
        **extra,
    )[0]


def _encode_prompts_every_step(
    configs: BaseModelConfigs, models: BuiltModels, settings: TrainingMemorySettings, num_pairs: int
):
    """The official step's text encoding of the empty prompt (no grad)."""
    return [
        encode_prompt(configs, name, encoder, num_pairs, settings.max_sequence_length)
        for name, encoder in models.text_encoders.items()
    ]


def run_training_step(
    configs: BaseModelConfigs, models: BuiltModels, settings: TrainingMemorySettings, set_phase: Callable[[str], None]
):
    """One optimizer step of DUO (one micro-step), as the training scripts run it on the accelerator.

    ``set_phase`` is told "activations" before each forward and "temporaries" before the backward.
    """
    from .. import lora, objective

    num_pairs = settings.train_batch_size
    weight_dtype = models.weight_dtype
    family = configs.family
    set_phase("activations")
    if settings.recipe == "official":
        with torch.no_grad():
            pixels = torch.randn(2 * num_pairs, 3, settings.resolution, settings.resolution, dtype=models.vae_dtype)
            latents = models.vae.encode(pixels).latent_dist.sample().float()
            del pixels
            encoded = _encode_prompts_every_step(configs, models, settings, num_pairs)
            del encoded
    else:
        latents = torch.randn(_latent_shape(configs, settings.resolution, 2 * num_pairs))
    # make_duo_batch: [x⁻_t; x⁺_t; x_T], the conditioning of 3·B samples, fp32 targets of the 2·B pair images.
    model_input = torch.cat([latents, torch.randn(_latent_shape(configs, settings.resolution, num_pairs))])
    if family == "flux":
        model_input = _pack(model_input)
    model_input = model_input.to(weight_dtype)
    target = torch.randn_like(latents)
    latent_size = latents.shape[-1]
    del latents
    timesteps = torch.ones(3 * num_pairs, dtype=torch.long if family in ("sd", "sdxl") else torch.float32)
    condition_shape, pooled_shape = _condition_shapes(configs, settings.max_sequence_length, 3 * num_pairs, models)
    condition = torch.randn(condition_shape, dtype=weight_dtype)
    pooled = torch.randn(pooled_shape, dtype=weight_dtype) if pooled_shape else None
    extra = _extra_inputs(
        configs, models, settings.resolution, 3 * num_pairs, settings.max_sequence_length, weight_dtype
    )

    autocast = mixed_precision_autocast(settings.mixed_precision)
    with torch.no_grad(), autocast, lora.adapters_disabled(models.denoiser):
        ref_prediction = _denoise(models, model_input, timesteps, condition, pooled, extra)
    set_phase("activations")  # the adapted forward: the same modules called a second time
    with autocast:
        model_prediction = _denoise(models, model_input, timesteps, condition, pooled, extra)
    model_prediction = model_prediction.float()  # accelerate's convert_outputs_to_fp32
    if family == "flux":  # the loss compares latents in the VAE's layout, as diffusers' FLUX scripts do
        ref_prediction = _unpack(ref_prediction, latent_size)
        model_prediction = _unpack(model_prediction, latent_size)
        model_input = _unpack(model_input, latent_size)
    if family in ("sd3", "flux"):
        sigmas = torch.rand(3 * num_pairs)
        ref_prediction = objective.precondition_flow_matching_output(
            ref_prediction.float(), model_input.float(), sigmas
        )
        model_prediction = objective.precondition_flow_matching_output(model_prediction, model_input.float(), sigmas)
    losses = objective.duo_losses(model_prediction, ref_prediction, target, 500.0, 1.0)
    loss = losses.loss * 2.0**16 if settings.mixed_precision == "fp16" else losses.loss  # GradScaler
    del model_prediction, ref_prediction, losses
    set_phase("temporaries")
    loss.backward()
    del loss
    torch.nn.utils.clip_grad_norm_(models.lora_params, 1.0, foreach=True)
    models.optimizer.step()
    models.optimizer.zero_grad()


def _validation_t5_tokens(configs: BaseModelConfigs, settings: TrainingMemorySettings) -> int:
    """T5 tokens of the validation prompts: FLUX's run encodes them once at its --max_sequence_length; SD3's
    estimate keeps the pipeline's 256 (an upper bound of its script's --max_sequence_length, 77 by default)."""
    return settings.max_sequence_length if configs.family == "flux" else INFERENCE_T5_TOKENS.get(configs.family, 0)


def run_validation(
    configs: BaseModelConfigs, models: BuiltModels, settings: TrainingMemorySettings, set_phase: Callable[[str], None]
):
    """The in-training validation: VAE (and SD1/2's text encoder) back on the GPU, over
    ``num_validation_images`` (CFG doubles the denoiser's batch, except FLUX's), one denoiser call and the VAE
    decode, all without grad."""
    batch = settings.num_validation_images
    set_phase("temporaries")
    with torch.no_grad(), mixed_precision_autocast(settings.mixed_precision):
        if configs.family == "sd":
            models.text_encoders["text_encoder"](torch.zeros(2 * batch, clip_length(configs), dtype=torch.long))
        run_denoiser_and_vae(
            configs,
            models,
            settings.resolution,
            batch,
            models.weight_dtype,
            encode=False,
            t5_tokens=_validation_t5_tokens(configs, settings),
        )


def run_denoiser_and_vae(
    configs, models: BuiltModels, resolution: int, batch: int, dtype, encode: bool, t5_tokens: int, before_vae=None
):
    """One sampling step of ``batch`` images (CFG doubles the denoiser's batch, except FLUX's), ``before_vae()``,
    then the VAE decode of ``batch`` latents (FLUX's unpacked first) and, with ``encode``, img2img's VAE encoding
    of ``batch`` images."""
    rows = 2 * batch if uses_cfg(configs.family) else batch
    latents = torch.randn(_denoiser_input_shape(configs, resolution, rows), dtype=dtype)
    condition_shape, pooled_shape = _condition_shapes(configs, t5_tokens, rows, models)
    condition = torch.randn(condition_shape, dtype=dtype)
    pooled = torch.randn(pooled_shape, dtype=dtype) if pooled_shape else None
    extra = _extra_inputs(configs, models, resolution, rows, t5_tokens, dtype)
    prediction = _denoise(models, latents, torch.ones(rows), condition, pooled, extra)
    del prediction, condition, pooled, extra
    if before_vae is not None:
        before_vae()
    latents = latents[:batch]
    if configs.family == "flux":
        latents = _unpack(latents, resolution // vae_scale_factor(configs.vae))
    latents = latents.to(models.vae_dtype)
    models.vae.decode(latents).sample
    if encode:
        pixels = torch.randn(batch, 3, resolution, resolution, dtype=models.vae_dtype)
        models.vae.encode(pixels).latent_dist.sample()


def vae_needs_upcast(configs: BaseModelConfigs, dtype: torch.dtype) -> bool:
    """SDXL's pipelines run an fp16 VAE whose config says ``force_upcast`` (SDXL-base's does: it overflows in fp16)
    in fp32 for the decode and img2img's encode; an fp16-safe VAE (madebyollin/sdxl-vae-fp16-fix, ``force_upcast:
    false``) stays in fp16. SD3's and FLUX's pipelines never upcast."""
    return configs.family == "sdxl" and dtype == torch.float16 and configs.vae.get("force_upcast", True)


def cast_module(module: torch.nn.Module, dtype: torch.dtype):
    """``module.to(dtype)`` for fake tensors (which refuse ``module.to``'s swap): new floating parameters and
    buffers in place; the old ones are freed with their last reference."""
    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is not None and param.is_floating_point():
                submodule._parameters[name] = torch.nn.Parameter(param.data.to(dtype), requires_grad=False)
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None and buffer.is_floating_point():
                submodule._buffers[name] = buffer.to(dtype)
