"""Concept Inversion (Pham et al., ICLR 2024): textual inversion against the unlearned model, its adapter active:
a new token's embedding is learned from images of the concept with the diffusion loss; generating with that token
shows whether the concept can still be reached.
"""

import os
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .concept_images import encode_latents, images_to_pixels
from .text_condition import TextCondition


INVERSION_TEMPLATES = (
    "a photo of {}",
    "a realistic photo of {}",
    "a picture of {}",
    "{}",
)


@dataclass
class InversionConfig:
    """Defaults of the Concept Inversion code (Pham et al.): 5000 steps of 4 images × 4 accumulated
    micro-batches, learning rate 5e-3 scaled by the effective batch (``--scale_lr``: 0.08), constant."""

    token: str = "<duo-concept>"
    initializer: str = "person"
    templates: Tuple[str, ...] = INVERSION_TEMPLATES
    num_steps: int = 5000
    learning_rate: float = 5e-3
    batch_size: int = 4
    gradient_accumulation_steps: int = 4
    scale_lr: bool = True
    weight_decay: float = 1e-2  # diffusers' textual inversion default (AdamW)
    num_eval_draws: int = 16
    seed: int = 0

    @property
    def effective_learning_rate(self) -> float:
        """diffusers' ``--scale_lr``: learning rate × batch size × accumulation steps (one process)."""
        return self.learning_rate * (self.batch_size * self.gradient_accumulation_steps if self.scale_lr else 1)


@dataclass
class InversionResult:
    token: str
    embedding: torch.Tensor  # the first (SD: the only) text encoder's row
    initial_loss: float
    final_loss: float
    losses: List[float] = field(default_factory=list)
    # SDXL: the row of every text encoder, by diffusers' SDXL textual-inversion keys ("clip_l", "clip_g").
    embeddings: Optional[dict] = None

    def to_log(self) -> dict:
        return {
            "token": self.token,
            "initial_loss": self.initial_loss,
            "final_loss": self.final_loss,
            "num_steps": len(self.losses),
        }


def add_placeholder_token(tokenizer, text_encoder, token: str, initializer: str) -> int:
    """Add ``token`` to the tokenizer; its embedding starts at the mean embedding of ``initializer``."""
    if tokenizer.add_tokens(token) == 0:
        raise UsageError(f"--inversion_token {token} is already in the tokenizer's vocabulary: choose a new token")
    token_id = tokenizer.convert_tokens_to_ids(token)
    initializer_ids = tokenizer(initializer, add_special_tokens=False).input_ids
    if not initializer_ids:
        raise UsageError(f"--inversion_initializer {initializer!r} tokenizes to nothing: give a word")
    text_encoder.resize_token_embeddings(len(tokenizer))
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_id] = weight[initializer_ids].mean(dim=0)
    return token_id


SDXL_EMBEDDING_KEYS = ("clip_l", "clip_g")  # diffusers' SDXL textual-inversion files: one row per text encoder


def concept_inversion(pipe, images, config: InversionConfig, progress: bool = False) -> InversionResult:
    """Learn an embedding for ``config.token`` that makes ``pipe`` (as loaded, adapter active) denoise the images.

    Only the new token's embedding row changes (SDXL: its row in each of the two text encoders, learned together,
    as diffusers' SDXL textual inversion does). The loss is the model's own diffusion loss
    (noise or v target, as it was trained); it is measured before and after on one fixed set of
    (image, prompt, noise, timestep) draws, so the two numbers are comparable.
    """
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from ..objective import diffusion_target

    missing = [name for name in ("tokenizer", "text_encoder", "unet", "vae") if getattr(pipe, name, None) is None]
    if missing:
        raise UsageError(
            f"concept inversion needs a UNet pipeline with CLIP text encoders (Stable Diffusion 1.x/2.x or XL); {type(pipe).__name__} lacks {', '.join(missing)}"
        )
    if not images:
        raise UsageError("concept inversion needs at least one image of the concept")
    if not all("{}" in template for template in config.templates):
        raise UsageError("every --inversion_template needs a {} where the learned token goes")
    condition = TextCondition.from_pipe(pipe, "concept inversion")
    unet, vae = pipe.unet, pipe.vae
    device = unet.device
    model_dtype = unet.dtype
    text_dtypes = [encoder.dtype for encoder in condition.text_encoders]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise UsageError(
            f"concept inversion supports epsilon and v-prediction models, not {noise_scheduler.config.prediction_type}"
        )

    token_ids = [
        add_placeholder_token(tokenizer, encoder, config.token, config.initializer)
        for tokenizer, encoder in zip(condition.tokenizers, condition.text_encoders)
    ]
    prompts = [template.format(config.token) for template in config.templates]
    prompt_ids = condition.tokenize(prompts)
    if not all((ids == token_id).any(dim=1).all() for ids, token_id in zip(prompt_ids, token_ids)):
        raise UsageError(f"the tokenizer splits --inversion_token {config.token}: choose a token like <my-concept>")

    for module in (unet, vae, *condition.text_encoders):
        module.requires_grad_(False)
    # The embedding trains in fp32 whatever the pipeline's dtype, as in diffusers' textual inversion.
    tables, frozen, originals = [], [], []
    for encoder, token_id in zip(condition.text_encoders, token_ids):
        encoder.to(torch.float32)
        table = encoder.get_input_embeddings().weight
        table.requires_grad_(True)
        tables.append(table)
        frozen.append(torch.arange(len(table), device=table.device) != token_id)
        originals.append(table.detach().clone())

    resolution = unet.config.sample_size * pipe.vae_scale_factor
    with torch.no_grad():
        latents = encode_latents(vae, images_to_pixels(images, resolution))
    num_timesteps = noise_scheduler.config.num_train_timesteps

    def draw(count, generator):
        return (
            torch.randint(len(latents), (count,), generator=generator),
            torch.randint(len(prompts), (count,), generator=generator),
            torch.randn((count, *latents.shape[1:]), generator=generator),
            torch.randint(0, num_timesteps, (count,), generator=generator),
        )

    def diffusion_loss(image_index, prompt_index, noise, timesteps):
        clean = latents[image_index.to(device)]
        noise, timesteps = noise.to(device), timesteps.to(device)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        target = diffusion_target(noise_scheduler, clean, noise, timesteps)
        states, pooled = condition.encode([ids[prompt_index] for ids in prompt_ids])
        extra = condition.unet_kwargs(pooled, len(clean), resolution, model_dtype)
        prediction = unet(noisy.to(model_dtype), timesteps, states.to(model_dtype), **extra).sample
        return F.mse_loss(prediction.float(), target.float())

    evaluation_draws = draw(config.num_eval_draws, torch.Generator().manual_seed(config.seed + 1))

    @torch.no_grad()
    def evaluation_loss():
        return (
            sum(
                float(diffusion_loss(*(part[i : i + config.batch_size] for part in evaluation_draws)))
                * min(config.batch_size, config.num_eval_draws - i)
                for i in range(0, config.num_eval_draws, config.batch_size)
            )
            / config.num_eval_draws
        )

    initial_loss = evaluation_loss()
    optimizer = torch.optim.AdamW(tables, lr=config.effective_learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    for _ in tqdm(range(config.num_steps), desc=f"Concept inversion {config.token}", disable=not progress):
        loss = 0.0
        for _ in range(config.gradient_accumulation_steps):
            micro_loss = diffusion_loss(*draw(config.batch_size, generator)) / config.gradient_accumulation_steps
            micro_loss.backward()
            loss = loss + micro_loss.detach()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():
            for table, rows, original in zip(tables, frozen, originals):
                table[rows] = original[rows]
        losses.append(float(loss.detach()))
    for table in tables:
        table.requires_grad_(False)
    final_loss = evaluation_loss()
    for encoder, dtype in zip(condition.text_encoders, text_dtypes):
        encoder.to(dtype)
    rows = [table[token_id].detach().float().cpu().clone() for table, token_id in zip(tables, token_ids)]
    return InversionResult(
        config.token,
        rows[0],
        initial_loss,
        final_loss,
        losses,
        embeddings=dict(zip(SDXL_EMBEDDING_KEYS, rows)) if condition.is_sdxl else None,
    )


def inversion_prompts(config: InversionConfig, num_prompts: int) -> List[str]:
    """Generation prompts for the learned token, cycling through the templates."""
    return [config.templates[i % len(config.templates)].format(config.token) for i in range(num_prompts)]


def save_learned_embedding(result: InversionResult, path: str):
    """diffusers' textual inversion format, loadable with ``pipe.load_textual_inversion(path)``; SDXL: one row per
    text encoder under "clip_l" and "clip_g", as diffusers' SDXL embeddings are saved (``load_learned_embedding``)."""
    from safetensors.torch import save_file

    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    if result.embeddings:
        save_file({key: row.contiguous() for key, row in result.embeddings.items()}, path)
    else:
        save_file({result.token: result.embedding.contiguous()}, path)


def load_learned_embedding(pipe, path: str, token: str):
    """Load a learned token into ``pipe``: SD's one row, or SDXL's row per text encoder."""
    from safetensors.torch import load_file

    rows = load_file(path)
    if set(rows) == set(SDXL_EMBEDDING_KEYS):
        pipe.load_textual_inversion(
            rows["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            rows["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
    else:
        pipe.load_textual_inversion(path)
