"""Pair data: loading, joint augmentation, latent caching and deterministic batch sampling.

A pair is an unsafe image and its safe SDEdit twin. The two are spatially aligned, so every geometric
transform (resize, crop, flip) is applied to both with the same parameters.
"""

import hashlib
import io
import os
from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch
from PIL import Image

from .errors import UsageError
from .input_checks import check_pair_contents, check_pair_metadata, to_rgb


@dataclass
class PairImages:
    """Decoded pairs, checked before any model is loaded."""

    unsafe: List[Image.Image]
    safe: List[Image.Image]
    unsafe_prompts: Optional[List[str]]
    safe_prompts: Optional[List[str]]

    def __len__(self):
        return len(self.unsafe)

    def fingerprint(self) -> dict:
        """Short content hashes of every image and every pair's prompts, in order: what a checkpoint records of its
        data, so a resume on changed pairs (edited, swapped, reordered, added) is caught whatever folder or Hub id
        holds them."""

        def digest(*parts) -> str:
            content = hashlib.sha256()
            for part in parts:
                content.update(part if isinstance(part, bytes) else repr(part).encode())
            return content.hexdigest()[:16]

        unsafe_prompts = self.unsafe_prompts or [None] * len(self)
        safe_prompts = self.safe_prompts or [None] * len(self)
        return {
            "unsafe": [digest(image.size, image.mode, image.tobytes()) for image in self.unsafe],
            "safe": [digest(image.size, image.mode, image.tobytes()) for image in self.safe],
            "prompts": [digest(a, b) for a, b in zip(unsafe_prompts, safe_prompts)],
        }


def _load_hf_dataset(dataset_name: str, revision: Optional[str], cache_dir: Optional[str]):
    from datasets import load_dataset

    if os.path.isdir(dataset_name):
        if not os.path.exists(os.path.join(dataset_name, "metadata.jsonl")):
            raise UsageError(
                f"--dataset_name {dataset_name} has no metadata.jsonl: a pair folder needs metadata.jsonl rows with "
                f"unsafe_file_name and safe_file_name (python -m duo_plugin.pairs writes one)"
            )
        check_pair_metadata(dataset_name)
        with open(os.path.join(dataset_name, "metadata.jsonl"), encoding="utf-8") as f:
            if not any(line.strip() for line in f):
                raise UsageError(f"dataset {dataset_name} is empty: its metadata.jsonl lists no pair")
        try:
            return load_dataset("imagefolder", data_dir=dataset_name, split="train", cache_dir=cache_dir)
        except Exception as error:
            raise UsageError(
                f"could not read the pair folder {dataset_name} ({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}): "
                f"check that metadata.jsonl rows name existing files in unsafe_file_name/safe_file_name"
            ) from error
    if os.path.exists(dataset_name):
        raise UsageError(f"--dataset_name {dataset_name} is a file: give a pair folder or a Hub dataset id")
    try:
        return load_dataset(dataset_name, revision=revision, split="train", cache_dir=cache_dir)
    except Exception as error:  # datasets raises many types for a missing/unreachable dataset
        raise UsageError(
            f"could not load --dataset_name {dataset_name!r} ({type(error).__name__}: {str(error).splitlines()[0]}): "
            f"give an existing local pair folder or a Hub dataset id you can reach"
        ) from error


def _decode(cell, column: str, row: int) -> Image.Image:
    path = cell.get("path") if isinstance(cell, dict) else None
    try:
        if isinstance(cell, dict) and cell.get("bytes") is not None:
            image = Image.open(io.BytesIO(cell["bytes"]))
        elif path is not None:
            image = Image.open(path)
        else:
            raise ValueError("no image data")
        image.load()
        return to_rgb(image)
    except Exception as error:
        raise UsageError(
            f"unreadable image in column {column!r}, row {row} ({path or 'embedded bytes'}): {error}; "
            f"replace or remove that pair"
        ) from error


def load_pair_images(
    dataset_name: str,
    unsafe_image_column: str = "unsafe",
    safe_image_column: str = "safe",
    num_pairs: Optional[int] = None,
    revision: Optional[str] = None,
    cache_dir: Optional[str] = None,
) -> PairImages:
    """Load and decode every pair, refusing bad data with a message that names the fix."""
    from datasets import Image as ImageFeature

    dataset = _load_hf_dataset(dataset_name, revision, cache_dir)
    missing = [c for c in (unsafe_image_column, safe_image_column) if c not in dataset.column_names]
    if missing:
        raise UsageError(
            f"dataset {dataset_name} has no column(s) {', '.join(missing)} (it has {', '.join(dataset.column_names)}): "
            f"set --unsafe_image_column/--safe_image_column"
        )
    if len(dataset) == 0:
        raise UsageError(f"dataset {dataset_name} is empty: it needs at least one pair")
    if num_pairs is not None:
        dataset = dataset.select(range(min(num_pairs, len(dataset))))
    # Decode ourselves, so that an unreadable file is named instead of failing deep inside datasets.
    for column in (unsafe_image_column, safe_image_column):
        if isinstance(dataset.features[column], ImageFeature):
            dataset = dataset.cast_column(column, ImageFeature(decode=False))
    unsafe = [_decode(cell, unsafe_image_column, i) for i, cell in enumerate(dataset[unsafe_image_column])]
    safe = [_decode(cell, safe_image_column, i) for i, cell in enumerate(dataset[safe_image_column])]
    for row, (a, b) in enumerate(zip(unsafe, safe)):
        if a.size != b.size:
            raise UsageError(
                f"pair {row} is not aligned: unsafe image is {a.size[0]}x{a.size[1]}, safe image {b.size[0]}x{b.size[1]}; "
                f"the safe image must be an SDEdit twin of the same size"
            )

    paths = [
        [cell.get("path") if isinstance(cell, dict) else None for cell in dataset[c]]
        for c in (unsafe_image_column, safe_image_column)
    ]
    check_pair_contents(unsafe, safe, *paths, dataset=dataset_name)

    def column_or_none(name):
        return list(dataset[name]) if name in dataset.column_names else None

    return PairImages(unsafe, safe, column_or_none("unsafe_prompt"), column_or_none("safe_prompt"))


def joint_transform(
    unsafe: Image.Image,
    safe: Image.Image,
    resolution: int,
    center_crop: bool,
    generator: torch.Generator,
):
    """Resize the shorter side to ``resolution`` and crop both images of a pair identically.

    Returns two float tensors in [-1, 1] of shape (3, resolution, resolution). The random crop offset
    comes from ``generator`` so caching is reproducible.
    """
    width, height = unsafe.size
    scale = resolution / min(width, height)
    new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
    if center_crop:
        left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
    else:
        left = int(torch.randint(0, new_size[0] - resolution + 1, (1,), generator=generator))
        top = int(torch.randint(0, new_size[1] - resolution + 1, (1,), generator=generator))

    def to_tensor(image):
        image = image.resize(new_size, Image.BILINEAR).crop((left, top, left + resolution, top + resolution))
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()

    return to_tensor(unsafe), to_tensor(safe)


@dataclass
class CachedPairLatents:
    """The VAE posterior of every pair image, encoded once before training.

    ``mean``/``std`` have shape (num_pairs, num_flips, 2, C, h, w) where index 0 of the third axis is the
    unsafe image and 1 the safe one; ``num_flips`` is 2 with ``--random_flip`` (unflipped, flipped).
    Sampling from the posterior every step keeps training identical to encoding every step.
    """

    mean: torch.Tensor
    std: torch.Tensor
    scaling_factor: float
    shift_factor: float = 0.0

    def sample(self, pair_indices: torch.Tensor, flips: torch.Tensor, generator: torch.Generator):
        """Return (unsafe, safe) scaled latents for the given pairs, each (B, C, h, w)."""
        mean = self.mean[pair_indices, flips]
        std = self.std[pair_indices, flips]
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        latents = (mean + std * noise - self.shift_factor) * self.scaling_factor
        return latents[:, 0], latents[:, 1]


@torch.no_grad()
def encode_pairs(
    vae,
    pairs: PairImages,
    resolution: int,
    center_crop: bool,
    random_flip: bool,
    seed: int,
    batch_size: int = 8,
    device=None,
    dtype=torch.float32,
    progress: bool = True,
) -> CachedPairLatents:
    """Encode every pair (and its mirror image with ``random_flip``) once with the VAE."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.stack(
        [
            torch.stack(joint_transform(u, s, resolution, center_crop, generator))
            for u, s in zip(pairs.unsafe, pairs.safe)
        ]
    )  # (N, 2, 3, H, W)
    views = [pixels, pixels.flip(-1)] if random_flip else [pixels]
    flat = torch.stack(views, dim=1).reshape(-1, *pixels.shape[2:])
    means, stds = [], []
    for start in tqdm(range(0, len(flat), batch_size), desc="Caching pair latents", disable=not progress):
        posterior = vae.encode(flat[start : start + batch_size].to(device=device, dtype=dtype)).latent_dist
        means.append(posterior.mean.float().cpu().contiguous())
        stds.append(posterior.std.float().cpu().contiguous())
    shape = (len(pixels), len(views), 2)
    mean = torch.cat(means).reshape(*shape, *means[0].shape[1:])
    std = torch.cat(stds).reshape(*shape, *stds[0].shape[1:])
    return CachedPairLatents(
        mean=mean,
        std=std,
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=float(getattr(vae.config, "shift_factor", None) or 0.0),
    )


# Seed mixing: (seed, step, micro-step, rank) and (seed, epoch) become one torch seed by nested multiply-adds
# with primes; the modulus keeps it a valid torch seed. Changing any of these changes every run's draws.
SEED_STRIDE = 1_000_003
STEP_STRIDE = 1009
MICRO_STEP_STRIDE = 8191
EPOCH_SEED_STRIDE = 7919
MAX_SEED = 2**63 - 1


def step_generator(seed: int, step: int, micro_step: int, process_index: int) -> torch.Generator:
    """A CPU generator determined by (seed, optimizer step, accumulation micro-step, rank).

    Every random draw of a training step comes from it, so a run resumed at step k draws exactly what
    the uninterrupted run drew, with no RNG state to save.
    """
    mixed = (((seed * SEED_STRIDE + step) * STEP_STRIDE + micro_step) * MICRO_STEP_STRIDE + process_index) % MAX_SEED
    return torch.Generator().manual_seed(mixed)


def pair_indices_for_step(
    num_pairs: int,
    step: int,
    micro_step: int,
    gradient_accumulation_steps: int,
    batch_size: int,
    process_index: int,
    num_processes: int,
    seed: int,
) -> torch.Tensor:
    """The pairs one process trains on at one micro-step.

    The pairs are visited in a fresh seeded permutation each epoch; each optimizer step consumes
    ``batch_size · num_processes · gradient_accumulation_steps`` consecutive positions, split between
    micro-steps and then processes. Pure in its arguments, so resuming needs no sampler state.
    """
    pairs_per_micro_step = batch_size * num_processes
    start = (step * gradient_accumulation_steps + micro_step) * pairs_per_micro_step + process_index * batch_size
    positions = torch.arange(start, start + batch_size)
    epochs = positions // num_pairs
    indices = torch.empty(batch_size, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        permutation = torch.randperm(
            num_pairs, generator=torch.Generator().manual_seed(seed * EPOCH_SEED_STRIDE + epoch)
        )
        mask = epochs == epoch
        indices[mask] = permutation[positions[mask] % num_pairs]
    return indices
