"""Images of the concept (Concept Inversion's training images, UnlearnDiffAtk's targets): read from a folder, and
as the pixels and latents the denoiser reads."""

import os
from typing import List, Optional

import torch

from ..errors import UsageError
from ..input_checks import to_rgb


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def list_images(folder: str) -> List[str]:
    """Image files of a folder, sorted by name."""
    if not os.path.isdir(folder):
        raise UsageError(f"image folder {folder} does not exist")
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise UsageError(f"image folder {folder} holds no image ({', '.join(IMAGE_EXTENSIONS)})")
    return [os.path.join(folder, f) for f in files]


def load_concept_images(folder: str, limit: Optional[int] = None):
    """Images of the concept: the unsafe images of a DUO pair folder, or every image of a folder."""
    from PIL import Image

    if os.path.isfile(os.path.join(folder, "metadata.jsonl")):
        from ..data import load_pair_images

        return load_pair_images(folder, num_pairs=limit).unsafe
    paths = list_images(folder)[:limit] if limit else list_images(folder)
    return [to_rgb(Image.open(path)) for path in paths]


def images_to_pixels(images, resolution: int) -> torch.Tensor:
    """Resize the shorter side to ``resolution``, centre crop; (N, 3, H, W) in [-1, 1]."""
    import numpy as np
    from PIL import Image

    pixels = []
    for image in images:
        width, height = image.size
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2
        image = image.convert("RGB").resize(size, Image.BICUBIC).crop((left, top, left + resolution, top + resolution))
        pixels.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(pixels)


def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Latents of [-1, 1] pixels as the denoiser reads them ((mean − shift)·scale), in fp32. A VAE that overflows
    in fp16 (SDXL's, ``force_upcast``) encodes in fp32, as its pipelines do."""
    upcast = bool(getattr(vae.config, "force_upcast", False)) and vae.dtype == torch.float16
    dtype = vae.dtype
    if upcast:
        vae.to(torch.float32)
    try:
        pixels = pixels.to(vae.device, dtype=vae.dtype)
        latents = torch.cat(
            [vae.encode(pixels[i : i + batch_size]).latent_dist.mean for i in range(0, len(pixels), batch_size)]
        )
    finally:
        if upcast:
            vae.to(dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latents - shift) * vae.config.scaling_factor).float()
