"""Will it fit? The peak GPU memory of a DUO recipe, computed without a GPU and without weights.

Only the base model's config files are read (a Hub id or a folder). Every model is built from its config
inside ``torch._subclasses.fake_tensor.FakeTensorMode``: parameters and activations are fake tensors that
carry shape, dtype and storage size but no data, so a full training step of SD3-medium at 1024 px runs in
seconds on a laptop CPU. A ``TorchDispatchMode`` (``AllocationTracker``, accounting.py) sees every tensor the step
creates, as PyTorch's own ``torch.distributed._tools.mem_tracker.MemTracker`` does, and keeps the live
bytes and their peak, split into weights / LoRA + optimizer state / activations / gradients /
temporaries. We use our own tracker rather than ``MemTracker`` for the estimate because ``MemTracker``
re-scans every module's statistics on every operator (seconds become minutes on a 1000-module UNet) and
has no category for LoRA parameters; ``MemTracker`` on *real* tensors is the independent measurement the
tests compare the estimate with (``measure_training_step``).

What the estimate models, and why (the GPU step of ``train_duo.py`` / ``train_duo_sd3.py`` /
``train_duo_flux.py``; families: SD1/2 and SDXL UNets, SD3 and FLUX.1 transformers):

* **Resident weights.** The frozen denoiser in the mixed-precision dtype (fp32 without mixed precision),
  buffers included and cast as ``from_pretrained(dtype=...)`` casts them (SD3.5's 384² positional embedding
  is a 0.45 GB bf16 buffer). Ours frees the encoders after
  caching: SD1/2 moves the VAE and text encoder to the CPU; SDXL, SD3 and FLUX delete the text encoders
  after encoding every prompt once and keep their VAE (fp32 while caching: SD3's latents are sensitive,
  SDXL's VAE overflows in fp16) on the CPU. ``encoders_resident`` keeps them on the GPU (the benchmark's
  "kept" case). The re-created official step (``benchmarks/benchmark_step.py``) keeps the VAE and every
  text encoder on the GPU and calls them every step: both pair images VAE-encoded (SDXL's, SD3's and
  FLUX's VAE in fp32), the empty prompt encoded by CLIP (SDXL: CLIP-L and CLIP-G; SD3: CLIP-L, CLIP-G and
  T5-XXL at ``max_sequence_length`` tokens; FLUX: CLIP-L and T5-XXL).
* **LoRA and optimizer state.** LoRA parameters are fp32 (``cast_lora_params_to_fp32``), built by the
  same ``lora.add_duo_adapter`` on the same target modules. AdamW keeps two fp32 moments per LoRA
  weight; its step runs ``foreach`` (PyTorch's default on CUDA), whose intermediate lists are counted as
  temporaries. bitsandbytes' ``AdamW8bit`` cannot run on fake tensors; its state is accounted
  analytically: tensors of at least 4096 elements keep two uint8 moments plus one fp32 absmax per
  256-element block for each moment, smaller ones two fp32 moments (bitsandbytes' ``min_8bit_size``); its
  fused kernel updates in place, so its step adds no temporaries.
* **The batch.** One micro-step is the concatenated batch [x⁻_t; x⁺_t; x_T] of 3·B samples
  (B = ``--train_batch_size`` pairs) at resolution/8 (SD3, FLUX: 16 latent channels; FLUX packs 2×2
  patches into tokens, [3·B, (H/2)(W/2), 64] at H = resolution/8, and the loss unpacks them), its
  conditioning (77 CLIP tokens; SDXL: + the pooled CLIP-G projection and 6 time ids; SD3: 77 +
  ``max_sequence_length`` tokens; FLUX: ``max_sequence_length`` T5 tokens, 512 by default as train_duo_flux.py's, the pooled CLIP-L
  vector, text and image position ids and, for [dev], the fp32 guidance vector) and the fp32 targets of the
  2·B pair images.
* **Activations.** The reference forward runs under ``no_grad`` with the adapter disabled: its
  activations are freed as it goes and only its (3·B) prediction stays. The adapted forward keeps what
  autograd saves for the backward; with ``--gradient_checkpointing`` diffusers' non-reentrant checkpoint
  keeps only block inputs and recomputes each block inside the backward (counted there). Mixed precision
  is ``accelerator.autocast()`` on CUDA; CUDA's autocast cannot run on a CPU (the CPU autocast keeps
  group/layer norms in bf16, CUDA runs them in fp32), so ``CudaAutocast`` re-creates CUDA's policy as a
  ``TorchFunctionMode``: matmuls, linears, convolutions and attention in the half dtype; norms, softmax,
  losses, exp/log/pow and reductions in fp32 — the casts then create (and autograd saves) the same
  copies as on the GPU. The adapted model's output is converted to fp32 (accelerate's
  ``convert_outputs_to_fp32``); the reference prediction stays in the half dtype (it comes from the
  unwrapped model).
* **Attention.** On a GPU, PyTorch's SDPA picks flash attention (fp16/bf16) or memory-efficient attention
  (fp32): both save the output and the per-row log-sum-exp, never the L×L matrix. On fake CPU tensors SDPA
  dispatches to the CPU flash kernel, which saves the same tensors, so the accounting matches; the CUDA
  kernels' internal backward workspace (FA2's fp32 dq accumulator, B·H·L·D·4 bytes for one attention
  at a time) is not seen at the dispatcher and is not counted (≤ 2 % at SD1.4@512). xformers behaves like
  memory-efficient attention and is estimated as SDPA.
* **Gradients.** fp32 gradients of the LoRA parameters only (the base is frozen); the activation
  gradients of the backward are temporaries. Under fp16 the loss is scaled and the gradients unscaled in
  place (no extra copies).
* **The CUDA allocator.** Every allocation is rounded up to a multiple of 512 bytes, as the caching
  allocator rounds its blocks; the estimate is therefore what ``torch.cuda.max_memory_allocated`` reports.
  Not modelled: blocks the allocator leaves unsplit (at most 1 MB each), the reserved-but-free memory of
  fragmentation (``max_memory_reserved`` − allocated), the CUDA context and the cuBLAS/cuDNN workspaces.
  The card check adds these as a margin: a recipe fits a card when peak × 1.10 + 0.75 GiB ≤ the card's
  memory.
* **The run's peak.** Training peaks at the maximum of the step and of the in-training validation (the
  VAE, and for SD1/2 the text encoder, come back to the GPU beside the LoRA and its optimizer state;
  2 images with classifier-free guidance, FLUX without; ``--skip_validation`` drops it). Pair generation
  (``python -m duo_plugin.pairs``: the whole text-to-image and img2img pipelines resident in fp16, 4 pairs
  per call, CFG) and evaluation (``python -m duo_plugin.evaluate``: 8 images per call, CFG; the detectors
  are not included) are estimated the same way, under ``no_grad``, as the maximum over their phases
  (text encoders, one denoiser call, VAE encode/decode). FLUX.1's pipelines use no CFG (dev's guidance is
  distilled into its guidance embedding) and T5 at 512 tokens (SD3's: 256). SDXL's pipelines upcast an
  fp16 VAE whose config says ``force_upcast`` (SDXL-base's) to fp32 for the decode and img2img's encode;
  an fp16-safe VAE (``--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix``) stays in fp16.

A quantized base (quantized.py) and several GPUs (sharding.py) are modelled in their own modules.
"""

import contextlib
import time
from dataclasses import replace
from typing import Dict

import torch

from .accounting import ALLOCATOR_ROUNDING, HALF_DTYPES, AllocationTracker
from .configs import INFERENCE_T5_TOKENS, BaseModelConfigs
from .models import (
    BuiltModels,
    build_denoiser,
    build_text_encoders,
    build_vae,
    new_fake_mode,
    silence_library_logs,
    to_fake,
)
from .recipes import MemoryEstimate, TrainingMemorySettings
from .sharding import shard_estimate, sharding_layout
from .steps import (
    build_training_models,
    cast_module,
    encode_prompt,
    run_denoiser_and_vae,
    run_training_step,
    run_validation,
    uses_cfg,
    vae_needs_upcast,
)


PROMPT_ENCODING_BATCH = 8  # duo_plugin.families.prompts.encode_once: distinct prompts encoded at a time


def _register_resident(
    tracker: AllocationTracker, models: BuiltModels, settings: TrainingMemorySettings, with_encoders: bool
):
    lora = {id(p) for p in models.lora_params}
    modules = [models.denoiser] + ([models.vae, *models.text_encoders.values()] if with_encoders else [])
    for module in modules:
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in lora:
                tracker.register(tensor, "weights")
    for tensor in models.lora_params + models.optimizer.state:
        tracker.register(tensor, "lora_and_optimizer")


RUN_PHASES = ("prompt encoding", "training step", "validation")


def estimate_training(
    configs: BaseModelConfigs, settings: TrainingMemorySettings, fake: bool = True, rounding: int = ALLOCATOR_ROUNDING
) -> Dict[str, MemoryEstimate]:
    """Peaks of one training step, of the in-training validation (``settings.validation``) and, for a quantized
    base (``settings.quantize_base``), of the prompt encoding at start-up; the ``"run"`` entry is the largest. With
    ``settings.num_processes`` > 1 the step and the validation are one GPU's (``shard_estimate``). With
    ``fake=False`` the same accounting runs on real CPU tensors."""
    silence_library_logs()
    start = time.perf_counter()
    official = settings.recipe == "official"
    with_encoders = official or settings.encoders_resident
    results = {}
    fake_mode = new_fake_mode() if fake else None
    # A quantized denoiser is loaded onto the GPU (device_map) before the prompts are encoded; a full-precision one
    # waits on the CPU until the encoders are gone.
    encoding_phase = settings.quantize_base != "none" and not with_encoders
    need_encoders = with_encoders or settings.validation or encoding_phase
    models = build_training_models(configs, settings, need_encoders, fake_mode)
    with fake_mode if fake else contextlib.nullcontext():
        if encoding_phase:
            results["prompt encoding"] = _estimate_prompt_encoding(configs, models, settings, rounding, start)
        if settings.validation and not with_encoders:
            # SDXL, SD3 and FLUX delete their text encoders after encoding the prompts once; SD1/2 keeps its
            # text encoder on the CPU and brings it back.
            models_for_validation = ["vae"] + (["text_encoder"] if configs.family == "sd" else [])
        else:
            models_for_validation = []
        tracker = AllocationTracker(rounding)
        _register_resident(tracker, models, settings, with_encoders)
        for param in models.lora_params:
            param.register_post_accumulate_grad_hook(lambda p: tracker.register(p.grad, "gradients"))

        def set_phase(name):
            tracker.category = name

        with tracker:
            run_training_step(configs, models, settings, set_phase)
        results["training step"] = MemoryEstimate(
            tracker.peak, dict(tracker.peak_breakdown), "training step", time.perf_counter() - start
        )
        if settings.validation:
            for name in models_for_validation:
                module = models.vae if name == "vae" else models.text_encoders[name]
                for tensor in list(module.parameters()) + list(module.buffers()):
                    tracker.register(tensor, "weights")
            tracker.reset_peak()
            with tracker:
                run_validation(configs, models, settings, set_phase)
            results["validation"] = MemoryEstimate(
                tracker.peak, dict(tracker.peak_breakdown), "validation", time.perf_counter() - start
            )
    layout = sharding_layout(models, configs.family, rounding)
    for phase in ("training step", "validation"):
        if phase in results:
            results[phase] = shard_estimate(
                replace(results[phase], layout=layout), settings.num_processes, settings.sharding
            )
    run = max((results[phase] for phase in RUN_PHASES if phase in results), key=lambda e: e.peak_bytes)
    results["run"] = replace(run, seconds=time.perf_counter() - start)
    return results


def _estimate_prompt_encoding(configs, models: BuiltModels, settings: TrainingMemorySettings, rounding: int, start):
    """The start-up encoding of a quantized run: the quantized denoiser already on the GPU (no adapter yet), the text
    encoders (T5 quantized) encoding ``PROMPT_ENCODING_BATCH`` prompts at a time without grad. Not sharded: each
    process loads the quantized denoiser whole before accelerate prepares it."""
    tracker = AllocationTracker(rounding)
    lora = {id(p) for p in models.lora_params}
    for module in (models.denoiser, *models.text_encoders.values()):
        for tensor in list(module.parameters()) + list(module.buffers()):
            if id(tensor) not in lora:
                tracker.register(tensor, "weights")
    tracker.category = "activations"
    with tracker, torch.no_grad():
        for name, encoder in models.text_encoders.items():
            output = encode_prompt(configs, name, encoder, PROMPT_ENCODING_BATCH, settings.max_sequence_length)
            del output
    return MemoryEstimate(tracker.peak, dict(tracker.peak_breakdown), "prompt encoding", time.perf_counter() - start)


def estimate_inference(
    configs: BaseModelConfigs,
    resolution: int,
    batch_size: int,
    dtype: str = "fp16",
    encode: bool = True,
    rounding: int = ALLOCATOR_ROUNDING,
) -> MemoryEstimate:
    """Peak of generating ``batch_size`` images with CFG (FLUX: without), the whole pipeline resident in ``dtype``
    (pair generation: text-to-image, then img2img, which also VAE-encodes; evaluation: text-to-image). T5 encodes
    the pipeline's default ``max_sequence_length`` (SD3: 256, FLUX: 512); an SDXL VAE that needs it is upcast to
    fp32 for the decode and the encode, as the SDXL pipelines do (``vae_needs_upcast``)."""
    silence_library_logs()
    start = time.perf_counter()
    weight_dtype = HALF_DTYPES.get(dtype, torch.float32)
    fake_mode = new_fake_mode()
    with torch.device("meta"):
        modules = [
            build_denoiser(configs, weight_dtype),
            build_vae(configs, weight_dtype),
            build_text_encoders(configs, weight_dtype),
        ]
    for module in (modules[0], modules[1], *modules[2].values()):
        to_fake(module, fake_mode)
    models = BuiltModels(configs.family, modules[0], modules[1], modules[2], [], None, weight_dtype, weight_dtype)
    with fake_mode:
        tracker = AllocationTracker(rounding)
        for module in (models.denoiser, models.vae, *models.text_encoders.values()):
            for tensor in list(module.parameters()) + list(module.buffers()):
                tracker.register(tensor, "weights")
        tracker.category = "activations"
        t5_tokens = INFERENCE_T5_TOKENS.get(configs.family, 0)
        prompts = 2 * batch_size if uses_cfg(configs.family) else batch_size
        with tracker, torch.no_grad():
            for name, encoder in models.text_encoders.items():
                encode_prompt(configs, name, encoder, prompts, t5_tokens)

            def upcast_vae():  # StableDiffusionXLPipeline.upcast_vae: the VAE's weights become fp32
                if vae_needs_upcast(configs, weight_dtype):
                    tracker.category = "weights"
                    cast_module(models.vae, torch.float32)
                    models.vae_dtype = torch.float32
                    tracker.category = "activations"

            run_denoiser_and_vae(
                configs, models, resolution, batch_size, weight_dtype, encode, t5_tokens, before_vae=upcast_vae
            )
    return MemoryEstimate(tracker.peak, dict(tracker.peak_breakdown), "generation", time.perf_counter() - start)


def _total_mem_tracker():
    from torch.distributed._tools.mem_tracker import MemTracker

    class TotalMemTracker(MemTracker):
        """MemTracker's tensor accounting without its per-module statistics, which support neither a
        module called twice in a step (reference and adapted forward) nor frozen parameters (it hooks
        every parameter's gradient). The totals and their peak come from its dispatch mode alone."""

        def _pre_fw_hook(self, module, inputs):
            pass

        def _post_fw_hook(self, module, inputs, outputs):
            pass

        def _pre_bw_hook(self, module, args):
            pass

        def _post_bw_hook(self, module, args):
            pass

    return TotalMemTracker()


def measure_training_step(configs: BaseModelConfigs, settings: TrainingMemorySettings) -> int:
    """The same step on real CPU tensors, measured by PyTorch's own ``MemTracker`` (the independent
    check of the estimate): its peak bytes, weights and optimizer state included."""
    silence_library_logs()
    official = settings.recipe == "official"
    models = build_training_models(configs, settings, need_encoders=official or settings.encoders_resident)
    tracker = _total_mem_tracker()
    resident = [models.denoiser] + (
        [models.vae, *models.text_encoders.values()] if official or settings.encoders_resident else []
    )
    tracker.track_external(*resident, *models.lora_params, *models.optimizer.state)
    with tracker:
        run_training_step(configs, models, settings, lambda name: None)
    return max(snapshot["Total"] for snapshot in tracker.get_tracker_snapshot("peak").values())
