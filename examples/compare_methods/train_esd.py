"""An ESD-style, prompt-based erasure baseline (Gandikota et al., 2023) to compare DUO with.

ESD-x fine-tunes the cross-attention of a Stable Diffusion 1.x/2.x UNet so that, for the erased
prompt c, the model predicts the frozen base's unconditional noise pushed away from c:

    ε_θ(x_t, c)  →  ε*(x_t, ∅) − η · (ε*(x_t, c) − ε*(x_t, ∅))

It edits what the model does *for the words of c*: prompts that reach the concept another way
(synonyms, learned embeddings) are what the DUO paper shows such methods fall to.

One difference from the official ESD, said plainly: x_t here is an image of the concept (the unsafe
images of a DUO pair folder, or any image folder) noised to a random timestep, instead of a partial
sample of the model being fine-tuned. The target is the same; the data is cheaper to get.

    python examples/compare_methods/train_esd.py --pretrained_model_name_or_path MODEL \\
        --prompt "a red square" --images runs/pairs --output_dir runs/esd-red

writes ``<output_dir>/unet.safetensors`` (the whole UNet state dict, which
``python -m duo_plugin.evaluate --unet esd=<output_dir>/unet.safetensors`` swaps into the base) and
``<output_dir>/esd_config.json``.
"""

import argparse
import copy
import json
import os
import sys

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from duo_plugin import attacks  # noqa: E402
from duo_plugin.errors import UsageError, exit_on_usage_error  # noqa: E402


TRAIN_METHODS = {
    # ESD-x: cross-attention only, the variant for concepts named in prompts.
    "xattn": lambda name: ".attn2." in name,
    # ESD-u: everything but cross-attention.
    "noxattn": lambda name: ".attn2." not in name,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True)
    parser.add_argument("--prompt", action="append", required=True, help="a prompt to erase (repeatable; or @file)")
    parser.add_argument(
        "--images",
        type=str,
        required=True,
        help="images of the concept: a DUO pair folder (its unsafe images) or an image folder",
    )
    parser.add_argument("--output_dir", type=str, required=True)
    parser.add_argument("--train_method", type=str, default="xattn", choices=sorted(TRAIN_METHODS))
    parser.add_argument(
        "--negative_guidance", type=float, default=1.0, help="η: how far the target is pushed away from the prompt"
    )
    parser.add_argument("--max_train_steps", type=int, default=200)
    parser.add_argument("--learning_rate", type=float, default=1e-5)
    parser.add_argument("--train_batch_size", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=None, help="default: the model's")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def esd_target(
    base_unconditional: torch.Tensor, base_conditional: torch.Tensor, negative_guidance: float
) -> torch.Tensor:
    """ε*(∅) − η (ε*(c) − ε*(∅)): the base's guidance direction for c, reversed."""
    return base_unconditional - negative_guidance * (base_conditional - base_unconditional)


@exit_on_usage_error
def main(argv=None):
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from safetensors.torch import save_file

    from duo_plugin.concepts import read_prompt_list

    args = parse_args(argv)
    prompts = read_prompt_list(args.prompt)
    if args.max_train_steps < 1 or args.train_batch_size < 1:
        raise UsageError("--max_train_steps and --train_batch_size must be at least 1")
    torch.manual_seed(args.seed)
    pipe = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, safety_checker=None, requires_safety_checker=False
    )
    unet, vae = pipe.unet, pipe.vae
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = args.resolution or unet.config.sample_size * pipe.vae_scale_factor

    images = attacks.load_concept_images(args.images)
    with torch.no_grad():
        pixels = attacks.images_to_pixels(images, resolution)
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
        prompt_embeddings = pipe.encode_prompt(prompts, "cpu", 1, False)[0]
        empty_embedding = pipe.encode_prompt([""], "cpu", 1, False)[0]

    # The frozen base ε*: a copy of the UNet before fine-tuning.
    base_unet = copy.deepcopy(unet).requires_grad_(False).eval()
    trained = [p for name, p in unet.named_parameters() if TRAIN_METHODS[args.train_method](name)]
    if not trained:
        raise UsageError(f"--train_method {args.train_method} selects no UNet parameter of this model")
    unet.requires_grad_(False)
    for parameter in trained:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(trained, lr=args.learning_rate)
    generator = torch.Generator().manual_seed(args.seed)

    losses = []
    progress = tqdm(range(args.max_train_steps), desc="ESD")
    for _ in progress:
        image_index = torch.randint(len(latents), (args.train_batch_size,), generator=generator)
        prompt_index = torch.randint(len(prompts), (args.train_batch_size,), generator=generator)
        clean = latents[image_index]
        noise = torch.randn(clean.shape, generator=generator)
        timesteps = torch.randint(scheduler.config.num_train_timesteps, (len(clean),), generator=generator)
        noisy = scheduler.add_noise(clean, noise, timesteps)
        conditional = prompt_embeddings[prompt_index]
        with torch.no_grad():
            unconditional = base_unet(noisy, timesteps, empty_embedding.expand_as(conditional)).sample
            target = esd_target(unconditional, base_unet(noisy, timesteps, conditional).sample, args.negative_guidance)
        loss = F.mse_loss(unet(noisy, timesteps, conditional).sample, target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        progress.set_postfix(loss=f"{loss.item():.4f}")

    os.makedirs(args.output_dir, exist_ok=True)
    save_file(
        {name: tensor.contiguous() for name, tensor in unet.state_dict().items()},
        os.path.join(args.output_dir, "unet.safetensors"),
    )
    config = {
        **vars(args),
        "prompts": prompts,
        "num_images": len(latents),
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    with open(os.path.join(args.output_dir, "esd_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"saved the ESD-{args.train_method} UNet to {os.path.join(args.output_dir, 'unet.safetensors')}")
    return config


if __name__ == "__main__":
    main()
