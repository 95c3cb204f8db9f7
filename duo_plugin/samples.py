"""Validation images and model-card samples from the live model, for every family.

The prompts were encoded once at the start (the text encoders are gone); only the VAE comes back to the
accelerator meanwhile. A family supplies its text-to-image pipeline around the denoiser and the VAE, and the
keyword arguments that hand it a prompt's embeddings (``prompt_embeds`` and, where the family has them, the
pooled and negative embeddings).
"""

from dataclasses import dataclass, field
from typing import Callable

import torch

from . import outputs


@dataclass
class ValidationSampler:
    """``make_pipeline(model, vae)`` builds the family's pipeline; ``prompt_kwargs(prompts)`` returns its embedding
    arguments for a list of prompts; ``extra_kwargs`` are the family's other sampling arguments (FLUX.1-dev's
    guidance)."""

    args: object
    accelerator: object
    vae: torch.nn.Module
    make_pipeline: Callable
    prompt_kwargs: Callable
    weight_dtype: torch.dtype
    extra_kwargs: dict = field(default_factory=dict)
    # A sharded denoiser (``TrainingRun.sharded``) needs every process in each forward: then all of them sample the
    # same images (same seeds) and the main process keeps them.
    every_process: bool = False

    @property
    def samples_here(self) -> bool:
        return not self.args.skip_validation and (self.every_process or self.accelerator.is_main_process)

    def during_training(self, denoiser, step: int):
        """The base-vs-unlearned grid at ``step``, saved by the main process; every process waits for it."""
        if self.samples_here:
            self(denoiser, step)
        self.accelerator.wait_for_everyone()

    def card_samples(self, denoiser, step: int, preset) -> list:
        """The last grid and the model card's samples; [] with ``--skip_validation`` and on other processes."""
        samples = self(denoiser, step, preset) if self.samples_here else []
        return samples if self.accelerator.is_main_process else []

    def __call__(self, denoiser, step: int, preset=None) -> list:
        """Base vs unlearned grid (and, with ``preset``, the model card samples). Returns the model card samples."""
        from diffusers.training_utils import free_memory, offload_models

        args, accelerator, weight_dtype = self.args, self.accelerator, self.weight_dtype
        device = accelerator.device
        model = accelerator.unwrap_model(denoiser)
        # autocast handles fp16/bf16; the live model is never cast.
        autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
        with offload_models(self.vae, device=device):
            pipeline = self.make_pipeline(model, self.vae)
            pipeline.set_progress_bar_config(disable=True)

            def generate(prompt, seeds):
                embeddings = self.prompt_kwargs([prompt] * len(seeds))
                with autocast:
                    return pipeline(
                        **{key: value.to(device, weight_dtype) for key, value in embeddings.items()},
                        **self.extra_kwargs,
                        height=args.resolution,
                        width=args.resolution,
                        num_inference_steps=args.num_validation_inference_steps,
                        generator=[torch.Generator().manual_seed(seed) for seed in seeds],
                    ).images

            keep = accelerator.is_main_process
            outputs.validation_grid(args, accelerator, model, generate, step, save=keep)
            samples = outputs.save_model_card_samples(args, preset, generate, save=keep) if preset is not None else []
        free_memory()
        return samples
