"""Pair data: joint transforms, latent caching and deterministic batch sampling."""

import torch
from PIL import Image

from duo_plugin import data


def test_joint_transform_crops_and_resizes_both_images_identically():
    # A horizontal gradient: if the two crops differed, the pixel values would differ.
    gradient = Image.linear_gradient("L").rotate(90).resize((80, 48)).convert("RGB")
    generator = torch.Generator().manual_seed(3)
    unsafe, safe = data.joint_transform(gradient, gradient.copy(), 32, center_crop=False, generator=generator)
    assert unsafe.shape == (3, 32, 32)
    assert torch.equal(unsafe, safe)
    assert unsafe.min() >= -1 and unsafe.max() <= 1


def test_pair_indices_cover_every_pair_once_per_epoch_across_processes():
    num_pairs, batch, accumulation, processes = 6, 1, 3, 2
    seen = []
    for micro_step in range(accumulation):
        for rank in range(processes):
            seen += data.pair_indices_for_step(
                num_pairs, 0, micro_step, accumulation, batch, rank, processes, seed=1
            ).tolist()
    assert sorted(seen) == list(range(num_pairs))
    again = data.pair_indices_for_step(num_pairs, 0, 1, accumulation, batch, 1, processes, seed=1)
    assert again.tolist() == [seen[3]]


def test_step_generator_depends_on_every_coordinate():
    draws = {
        key: torch.randn(4, generator=data.step_generator(*key)).tolist()
        for key in [(1, 0, 0, 0), (1, 1, 0, 0), (1, 0, 1, 0), (1, 0, 0, 1), (2, 0, 0, 0)]
    }
    assert len({tuple(v) for v in draws.values()}) == len(draws)
    assert torch.randn(4, generator=data.step_generator(1, 0, 0, 0)).tolist() == draws[(1, 0, 0, 0)]


def test_cached_latents_sample_from_the_posterior():
    mean = torch.zeros(2, 1, 2, 4, 2, 2)
    mean[:, :, 1] = 1.0  # safe images
    std = torch.full_like(mean, 1e-8)
    cache = data.CachedPairLatents(mean=mean, std=std, scaling_factor=2.0, shift_factor=0.5)
    unsafe, safe = cache.sample(torch.tensor([1, 0]), torch.tensor([0, 0]), torch.Generator().manual_seed(0))
    assert torch.allclose(unsafe, torch.full_like(unsafe, -1.0))  # (0 − 0.5)·2
    assert torch.allclose(safe, torch.full_like(safe, 1.0))  # (1 − 0.5)·2


def test_encode_pairs_caches_both_flips(tiny_sd, tiny_pairs):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_sd, subfolder="vae")
    pairs = data.load_pair_images(tiny_pairs)
    cache = data.encode_pairs(vae, pairs, 32, center_crop=True, random_flip=True, seed=0, progress=False)
    assert cache.mean.shape == (4, 2, 2, 4, 16, 16)
    # View 1 is the encoding of the mirrored pair, both images mirrored together.
    pixels = torch.stack(data.joint_transform(pairs.unsafe[2], pairs.safe[2], 32, True, torch.Generator()))
    with torch.no_grad():
        mirrored = vae.encode(pixels.flip(-1)).latent_dist.mean
    assert torch.allclose(cache.mean[2, 1], mirrored, atol=1e-5)
    assert cache.std.max() < 1e-3  # the test VAE is nearly deterministic
    assert cache.scaling_factor == vae.config.scaling_factor
