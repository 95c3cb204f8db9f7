"""Sampling with a prompt switch: the base pipeline's own loop, its prompt embeddings replaced from step k on; the
timesteps it samples at; img2img's strength for a re-noise from step k."""

from typing import Dict, List, Optional

import torch

from .analysis import FLOW_FAMILIES


# FLUX.1's T5 length while sampling: FluxPipeline's default, given explicitly so that the empty prompt's embeddings
# (encoded outside the loop) have the length of the loop's own.
FLUX_MAX_SEQUENCE_LENGTH = 512


def is_flux(pipe) -> bool:
    from ..families import pipeline_family

    return pipeline_family(type(pipe).__name__) == "flux"


def embedding_names(pipe) -> List[str]:
    """The loop's prompt tensors a step callback may replace: the sequence embeddings and, where the pipeline
    has one, the pooled embedding (SD3's ``pooled_prompt_embeds``, SDXL's ``add_text_embeds``)."""
    names = ["prompt_embeds"]
    for pooled in ("pooled_prompt_embeds", "add_text_embeds"):
        if pooled in getattr(pipe, "_callback_tensor_inputs", []):
            names.append(pooled)
    return names


def flux_kwargs(pipe) -> dict:
    return {"max_sequence_length": FLUX_MAX_SEQUENCE_LENGTH} if is_flux(pipe) else {}


@torch.no_grad()
def prompt_embeddings(pipe, prompts: List[str], guidance_scale: float, size: dict) -> Dict[str, torch.Tensor]:
    """The embeddings the pipeline's loop uses for ``prompts`` (with classifier-free guidance: [negative; positive]).

    Read from the pipeline itself through its step callback, then interrupted: whatever the pipeline
    (SD, SDXL, SD3), the switch then hands the loop exactly what it would have built. FLUX.1's callback exposes
    only the T5 embeddings, not the CLIP pooled one: its two are taken from ``encode_prompt``, the call its loop
    makes (FLUX.1 has no classifier-free guidance, so there is no negative half).
    """
    if is_flux(pipe):
        embeds, pooled, _ = pipe.encode_prompt(
            prompts, None, device=pipe._execution_device, max_sequence_length=FLUX_MAX_SEQUENCE_LENGTH
        )
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
    names = embedding_names(pipe)
    captured = {}

    def capture(pipeline, step, timestep, tensors):
        captured.update({name: tensors[name].clone() for name in names})
        pipeline._interrupt = True
        return {}

    pipe(
        prompt=prompts,
        num_inference_steps=2,
        guidance_scale=guidance_scale,
        output_type="latent",
        callback_on_step_end=capture,
        callback_on_step_end_tensor_inputs=names,
        **size,
    )
    return captured


@torch.no_grad()
def sample_with_switch(
    pipe,
    prompts: List[str],
    target: Optional[Dict[str, torch.Tensor]],
    switch_step: int,
    seeds: List[int],
    args,
    size: dict,
):
    """Images sampled with ``prompts`` for steps < ``switch_step`` and with ``target``'s embeddings from it on.

    FLUX.1: "without the prompt" means the empty prompt's T5 and CLIP pooled embeddings in the transformer's
    call from step k on (the guidance embedding unchanged). FLUX.1-dev is guidance-distilled and has no
    unconditional branch to switch to; the empty prompt's embeddings are what its true-CFG "negative" branch
    would read, the nearest thing to the unconditional model. Its loop lets a callback replace only the T5
    embeddings, so both are swapped in a pre-hook on the transformer, turned on by the callback after step k − 1.
    """
    names = embedding_names(pipe)
    hook = None
    switched = {"on": False}
    if is_flux(pipe) and target is not None:

        def replace_prompt(module, module_args, kwargs):
            if not switched["on"]:
                return None
            dtype = kwargs["encoder_hidden_states"].dtype
            return module_args, {
                **kwargs,
                "encoder_hidden_states": target["prompt_embeds"].to(dtype),
                "pooled_projections": target["pooled_prompt_embeds"].to(dtype),
            }

        hook = pipe.transformer.register_forward_pre_hook(replace_prompt, with_kwargs=True)

    def switch(pipeline, step, timestep, tensors):
        # Called after step ``step``: the next step is the first with the target prompt.
        if target is not None and step == switch_step - 1:
            if hook is not None:
                switched["on"] = True
                return {}
            return {name: target[name] for name in names}
        return {}

    try:
        return pipe(
            prompt=prompts,
            num_inference_steps=args.num_inference_steps,
            guidance_scale=args.guidance_scale,
            generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
            callback_on_step_end=switch,
            callback_on_step_end_tensor_inputs=names,
            **size,
            **flux_kwargs(pipe),
        ).images
    finally:
        if hook is not None:
            hook.remove()


@torch.no_grad()
def sampling_timesteps(pipe, num_inference_steps: int, size: Optional[dict] = None) -> List[float]:
    """The timesteps the pipeline samples at (descending), as its own loop sets them.

    A scheduler with resolution-dependent shift (FLUX.1's ``use_dynamic_shifting``) is set by the pipeline with
    μ from the image's token count (and FLUX with its own σ grid), so its timesteps are read from the pipeline
    itself: one call at ``size`` whose first step callback reads the scheduler and stops the loop.
    """
    from copy import deepcopy

    if getattr(pipe.scheduler.config, "use_dynamic_shifting", False):
        seen = []

        def read(pipeline, step, timestep, tensors):
            seen.extend(float(t) for t in pipeline.scheduler.timesteps)
            pipeline._interrupt = True
            return {}

        pipe(
            prompt=[""],
            num_inference_steps=num_inference_steps,
            output_type="latent",
            callback_on_step_end=read,
            callback_on_step_end_tensor_inputs=["latents"],
            **(size or {}),
            **flux_kwargs(pipe),
        )
        return seen
    scheduler = deepcopy(pipe.scheduler)
    scheduler.set_timesteps(num_inference_steps)
    return [float(t) for t in scheduler.timesteps]


def renoise_strength(family: str, num_steps: int, start_step: int) -> float:
    """The img2img strength whose first step is sampling step ``start_step``.

    SD 1.x/2.x and SDXL img2img start at step S − int(S·strength); SD3 and FLUX.1 at int(S − S·strength). Half a
    step off the exact value on the side each rounding needs gives ``start_step`` in both.
    """
    if family in FLOW_FAMILIES:
        return (num_steps - start_step - 0.5) / num_steps
    return min(1.0, (num_steps - start_step + 0.5) / num_steps)
