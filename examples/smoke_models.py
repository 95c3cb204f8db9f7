"""Tiny models for the recipes' smoke runs (``run.sh --smoke``): built from configs, nothing downloaded.

    python examples/smoke_models.py --kind sd --output runs/tiny-sd
    python examples/smoke_models.py --kind other_unet --base_model runs/tiny-sd --output runs/other-unet.safetensors

- ``sd`` / ``sd3``: the tiny Stable Diffusion 1.x / 3 pipelines of ``duo_plugin.testing`` (random weights).
- ``clip``: a tiny CLIP model and processor, for the CLIP zero-shot detector of the evaluation.
- ``other_unet``: a stand-in for another erasure method's checkpoint, for plumbing only: the base's UNet
  with its cross-attention weights perturbed (as ESD-x fine-tunes the cross-attention), saved as a
  safetensors state dict like the UNet checkpoints such methods publish.

Images made with these models are noise: a smoke run checks that every command and file format of
a recipe works, not what the recipe achieves.
"""

import argparse
import os
import sys

import torch


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

KINDS = ("sd", "sd3", "clip", "other_unet")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--output", required=True, help="folder to create (a .safetensors file for other_unet)")
    parser.add_argument("--base_model", default=None, help="other_unet: the tiny SD pipeline whose UNet is perturbed")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--perturbation", type=float, default=0.1, help="other_unet: noise std relative to each weight's std"
    )
    args = parser.parse_args(argv)
    if args.kind == "other_unet" and not args.base_model:
        parser.error("--kind other_unet needs --base_model (the tiny SD pipeline it stands in a checkpoint for)")
    return args


def make_other_unet(base_model: str, output_file: str, perturbation: float, seed: int = 0) -> str:
    """The base UNet with noise on every cross-attention weight, saved as a safetensors state dict."""
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file

    unet = UNet2DConditionModel.from_pretrained(base_model, subfolder="unet")
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, weight in unet.state_dict().items():
        if ".attn2." in name and weight.dtype.is_floating_point and weight.numel() > 1:
            weight = weight + perturbation * weight.std() * torch.randn(weight.shape, generator=generator)
        state_dict[name] = weight.contiguous()
    os.makedirs(os.path.dirname(os.path.abspath(output_file)), exist_ok=True)
    save_file(state_dict, output_file)
    return output_file


def main(argv=None):
    args = parse_args(argv)
    from duo_plugin.testing import make_tiny_clip, make_tiny_sd3_pipeline, make_tiny_sd_pipeline

    if args.kind == "sd":
        make_tiny_sd_pipeline(args.output, seed=args.seed)
    elif args.kind == "sd3":
        make_tiny_sd3_pipeline(args.output, seed=args.seed)
    elif args.kind == "clip":
        make_tiny_clip(args.output, seed=args.seed)
    else:
        make_other_unet(args.base_model, args.output, args.perturbation, seed=args.seed)
    print(f"Built a tiny {args.kind} in {args.output}")


if __name__ == "__main__":
    main()
