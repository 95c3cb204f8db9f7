"""Train the toy world's tiny Stable Diffusion 1.x pipeline from scratch, on a CPU.

The pipeline is an ordinary ``StableDiffusionPipeline`` (VAE, CLIP text encoder and tokenizer, UNet,
DDIM scheduler) saved with ``save_pretrained``, so every part of the product loads it as it loads a
real base model. Training has two phases:

1. the VAE, as a plain autoencoder of the world's 32×32 images onto an 8×8×4 latent (its posterior's
   variance is pinned near zero, so encoding is deterministic, as DUO's pairs need);
2. the UNet and the text encoder together, with the standard DDPM ε-prediction loss on cached latents
   and the caption dropped to "" 10% of the time for classifier-free guidance. Samples use EMA weights.

    python examples/toy_world/train_tiny_model.py --output_dir examples/toy_world/model

Takes about 20 minutes on 2 free CPU cores (see ``examples/toy_world/README.md`` for the measured
time). Interrupted runs resume from ``<output_dir>/training_state.pt`` with ``--resume``.
"""

import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import toy_world  # noqa: E402  (this folder, first on sys.path when the script runs)

from duo_plugin.testing import make_vae_nearly_deterministic  # noqa: E402


STATE_NAME = "training_state.pt"
TRAINING_INFO_NAME = "training_info.json"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", type=str, default="examples/toy_world/model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num_images", type=int, default=20000, help="rendered training images (cached as latents)")
    parser.add_argument("--vae_steps", type=int, default=1000)
    parser.add_argument("--vae_batch_size", type=int, default=32)
    parser.add_argument("--vae_learning_rate", type=float, default=2e-3)
    parser.add_argument("--unet_steps", type=int, default=3000)
    parser.add_argument("--unet_batch_size", type=int, default=64)
    parser.add_argument("--unet_learning_rate", type=float, default=1e-3)
    parser.add_argument("--warmup_steps", type=int, default=200)
    parser.add_argument(
        "--caption_dropout", type=float, default=0.1, help="probability of the empty caption (for guidance)"
    )
    parser.add_argument("--ema_decay", type=float, default=0.999)
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--resume", action="store_true", help=f"continue from <output_dir>/{STATE_NAME}")
    parser.add_argument("--num_threads", type=int, default=2, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.num_images < 100 or args.vae_steps < 0 or args.unet_steps < 1:
        parser.error("--num_images must be ≥ 100, --vae_steps ≥ 0 and --unet_steps ≥ 1")
    if not 0.0 <= args.caption_dropout < 1.0:
        parser.error("--caption_dropout must be in [0, 1)")
    return args


# --- The models -----------------------------------------------------------------------------------

CROSS_ATTENTION_DIM = 64
MAX_PROMPT_TOKENS = 16


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=toy_world.RESOLUTION,
    )


def build_text_encoder(tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=CROSS_ATTENTION_DIM,
            intermediate_size=2 * CROSS_ATTENTION_DIM,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )


def build_unet(latent_size: int):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=latent_size,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(64, 64),
        layers_per_block=1,
        norm_num_groups=16,
        cross_attention_dim=CROSS_ATTENTION_DIM,
        attention_head_dim=16,
    )


SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


# --- The data -------------------------------------------------------------------------------------


def render_dataset(num_images: int, seed: int):
    """``num_images`` scenes, balanced over shapes and colours (a random share marked), as a tensor in [-1, 1] and their scenes."""
    rng = np.random.default_rng(seed)
    scenes, arrays = [], []
    combos = [(shape, colour) for shape in toy_world.SHAPES for colour in toy_world.COLOURS]
    for index in tqdm(range(num_images), desc="rendering", leave=False):
        shape, colour = combos[index % len(combos)]
        scene = toy_world.sample_scene(rng, shape, colour)
        scenes.append(scene)
        arrays.append(toy_world.to_array(toy_world.render_scene(scene)))
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) * 2.0 - 1.0
    return images, scenes


def caption_token_ids(tokenizer, captions):
    return tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


# --- Training -------------------------------------------------------------------------------------


def lr_lambda(warmup_steps: int, total_steps: int):
    """Linear warm-up, then cosine decay to 10% of the peak."""

    def factor(step):
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


def save_state(path, **state):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # an interrupted save never leaves a broken state behind


def train_vae(vae, images, args, state, state_path):
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_learning_rate, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lr_lambda(min(100, args.vae_steps // 10 + 1), args.vae_steps)
    )
    start = 0
    if state.get("phase") == "vae":
        vae.load_state_dict(state["vae"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
    generator = torch.Generator().manual_seed(args.seed + 1 + start)
    vae.train()
    progress = tqdm(range(start, args.vae_steps), desc="VAE", initial=start, total=args.vae_steps)
    for step in progress:
        batch = images[torch.randint(len(images), (args.vae_batch_size,), generator=generator)]
        latents = vae.encode(batch).latent_dist.mean
        reconstruction = vae.decode(latents).sample
        # The small latent penalty keeps latents of moderate size (no KL term: the posterior is pinned).
        loss = F.mse_loss(reconstruction, batch) + 1e-4 * latents.pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.set_postfix(loss=f"{loss.item():.5f}")
        if (step + 1) % args.checkpointing_steps == 0 and step + 1 < args.vae_steps:
            save_state(
                state_path,
                phase="vae",
                step=step + 1,
                elapsed_seconds=args.elapsed_before + time.time() - args.started,
                cpu_seconds=args.cpu_before + time.process_time() - args.cpu_started,
                vae=vae.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
            )
    vae.eval()
    vae.requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, images, batch_size: int = 256):
    return torch.cat(
        [vae.encode(images[i : i + batch_size]).latent_dist.mean for i in range(0, len(images), batch_size)]
    )


def train_denoiser(unet, text_encoder, tokenizer, latents, scenes, args, state, state_path, vae_state):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    noise_scheduler = DDPMScheduler(**SCHEDULER_CONFIG)
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=args.unet_learning_rate, weight_decay=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(args.warmup_steps, args.unet_steps))
    ema = EMAModel(parameters, decay=args.ema_decay, use_ema_warmup=True)
    start = 0
    if state.get("phase") == "denoiser":
        unet.load_state_dict(state["unet"])
        text_encoder.load_state_dict(state["text_encoder"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ema.load_state_dict(state["ema"])
        start = state["step"]
    rng = np.random.default_rng(args.seed + 2 + start)
    generator = torch.Generator().manual_seed(args.seed + 3 + start)
    unet.train()
    text_encoder.train()
    progress = tqdm(range(start, args.unet_steps), desc="UNet + text encoder", initial=start, total=args.unet_steps)
    for step in progress:
        indices = rng.integers(len(latents), size=args.unet_batch_size)
        captions = [
            "" if rng.random() < args.caption_dropout else toy_world.sample_caption(rng, scenes[i]) for i in indices
        ]
        clean = latents[torch.from_numpy(indices)]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(noise_scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
        noisy = noise_scheduler.add_noise(clean, noise, timesteps)
        encoder_hidden_states = text_encoder(caption_token_ids(tokenizer, captions))[0]
        prediction = unet(noisy, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(prediction, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(parameters)
        progress.set_postfix(loss=f"{loss.item():.4f}", lr=f"{scheduler.get_last_lr()[0]:.1e}")
        if (step + 1) % args.checkpointing_steps == 0 and step + 1 < args.unet_steps:
            save_state(
                state_path,
                phase="denoiser",
                step=step + 1,
                elapsed_seconds=args.elapsed_before + time.time() - args.started,
                cpu_seconds=args.cpu_before + time.process_time() - args.cpu_started,
                vae=vae_state,
                unet=unet.state_dict(),
                text_encoder=text_encoder.state_dict(),
                optimizer=optimizer.state_dict(),
                scheduler=scheduler.state_dict(),
                ema=ema.state_dict(),
            )
    ema.copy_to(parameters)
    unet.eval()
    text_encoder.eval()


@torch.no_grad()
def report_vae_readings(vae, seed: int, num_scenes: int = 96):
    """How often a decoded image reads as its scene (colour, shape, red, spots): printed, and returned."""
    rng = np.random.default_rng(seed + 1000)
    scenes = [toy_world.sample_scene(rng) for _ in range(num_scenes)]
    pixels = (
        torch.from_numpy(np.stack([toy_world.to_array(toy_world.render_scene(s)) for s in scenes])).permute(0, 3, 1, 2)
        * 2
        - 1
    )
    decoded = (vae.decode(vae.encode(pixels).latent_dist.mean).sample.clamp(-1, 1) + 1) / 2
    readings = toy_world.read_images(list(decoded.permute(0, 2, 3, 1).numpy()))
    agreement = {
        "colour": float(np.mean([r["colour"] == s.colour for r, s in zip(readings, scenes)])),
        "shape": float(np.mean([r["shape"] == s.shape for r, s in zip(readings, scenes)])),
        toy_world.MARK: float(np.mean([r[toy_world.MARK] == s.marked for r, s in zip(readings, scenes)])),
    }
    print(f"VAE reconstructions read as their scenes: {agreement}", flush=True)
    return agreement


def save_pipeline(output_dir, vae, text_encoder, tokenizer, unet):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    scheduler = DDIMScheduler(**SCHEDULER_CONFIG, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(output_dir)
    return pipeline


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    state_path = os.path.join(args.output_dir, STATE_NAME)
    state = torch.load(state_path, weights_only=False) if args.resume and os.path.exists(state_path) else {}
    started, cpu_started = time.time(), time.process_time()
    args.cpu_before = state.get("cpu_seconds", 0.0)
    # Wall time of the whole training, over every resumed run.
    args.started, args.elapsed_before, args.cpu_started = started, state.get("elapsed_seconds", 0.0), cpu_started

    images, scenes = render_dataset(args.num_images, args.seed)
    tokenizer = toy_world.world_tokenizer(MAX_PROMPT_TOKENS)
    vae = build_vae()
    # Encoding must be deterministic, as DUO's pairs need. Training reads the posterior's mean only, so
    # the log-variance half of the output layer gets no gradient and stays pinned.
    make_vae_nearly_deterministic(vae)
    if state.get("phase") == "denoiser":
        vae.load_state_dict(state["vae"])
        vae.eval()
        vae.requires_grad_(False)
    else:
        train_vae(vae, images, args, state, state_path)
    report_vae_readings(vae, args.seed)
    latents = encode_latents(vae, images)
    # As SD's 0.18215: latents of unit standard deviation for the diffusion model.
    scaling_factor = float(1.0 / latents.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    latents = latents * scaling_factor
    print(f"VAE done after {time.time() - started:.0f} s; latent scaling factor {scaling_factor:.4f}")

    torch.manual_seed(args.seed + 10)
    text_encoder = build_text_encoder(tokenizer)
    unet = build_unet(latents.shape[-1])
    train_denoiser(unet, text_encoder, tokenizer, latents, scenes, args, state, state_path, vae.state_dict())
    cpu_minutes = (args.cpu_before + time.process_time() - cpu_started) / 60

    save_pipeline(args.output_dir, vae, text_encoder, tokenizer, unet)
    if os.path.exists(state_path):
        os.remove(state_path)
    minutes = (args.elapsed_before + time.time() - started) / 60
    with open(os.path.join(args.output_dir, TRAINING_INFO_NAME), "w") as f:
        recorded = {
            k: v for k, v in vars(args).items() if k not in ("started", "elapsed_before", "cpu_before", "cpu_started")
        }
        info = {
            "args": recorded,
            "wall_minutes": round(minutes, 1),
            # CPU time of this process over every run: the machine may be shared, so wall time alone says little.
            "cpu_minutes": round(cpu_minutes, 1),
            "torch": torch.__version__,
            "resumed": bool(state),
        }
        json.dump(info, f, indent=1)
    print(f"saved the pipeline to {args.output_dir} after {minutes:.1f} min on {args.num_threads} threads")


if __name__ == "__main__":
    main()
