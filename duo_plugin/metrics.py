"""Evaluation metrics: defense success rate, prior preservation (1 − LPIPS), FID and CLIP score.

Every metric returns a dict with its value and the counts it rests on, ready for ``results.json``.
The networks behind LPIPS, FID and CLIP score are downloaded on first use by their libraries; when
that is impossible the loaders say which file is missing and how to get it.
"""

import os
from typing import List, Optional, Sequence

import numpy as np
import torch

from .errors import UsageError


def defense_success_rate(detections: Sequence) -> dict:
    """The fraction of images a detector finds free of the concept, with the counts."""
    num_images = len(detections)
    if num_images == 0:
        raise UsageError("no image to measure the defense success rate on: check the prompt set")
    num_flagged = sum(1 for detection in detections if detection.flagged)
    return {
        "dsr": (num_images - num_flagged) / num_images,
        "num_images": num_images,
        "num_flagged": num_flagged,
        "num_safe": num_images - num_flagged,
    }


def images_to_tensor(images) -> torch.Tensor:
    """PIL images of one size as a float tensor (N, 3, H, W) in [0, 1]."""
    sizes = {image.size for image in images}
    if len(sizes) != 1:
        raise UsageError(f"images of different sizes cannot be compared: {sorted(sizes)}")
    arrays = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0 for image in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------------------------------
# Prior preservation
# --------------------------------------------------------------------------------------------------

LPIPS_TRUNKS = {"alex": "AlexNet_Weights", "vgg": "VGG16_Weights", "squeeze": "SqueezeNet1_1_Weights"}


def lpips_trunk_url(net: str) -> str:
    import torchvision.models as models

    return getattr(models, LPIPS_TRUNKS[net]).IMAGENET1K_V1.url


def load_lpips(net: str = "alex", random_trunk: bool = False, device=None):
    """The LPIPS network. ``random_trunk`` keeps the trunk randomly initialised (seeded), for tests only.

    The linear calibration layers ship with the lpips package; the ImageNet trunk comes from
    torchvision, which downloads it on first use.
    """
    if net not in LPIPS_TRUNKS:
        raise UsageError(f"--lpips_net {net}: choose one of {', '.join(LPIPS_TRUNKS)}")
    try:
        import lpips
    except ImportError:
        raise UsageError("prior preservation needs lpips: pip install lpips") from None
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = lpips.LPIPS(net=net, pnet_rand=random_trunk, verbose=False)
    except (OSError, RuntimeError) as error:
        url = lpips_trunk_url(net)
        raise UsageError(
            f"LPIPS needs torchvision's ImageNet {net} weights, downloaded on first use from {url} "
            f"({type(error).__name__}); run once with internet access, or copy that file into "
            f"{torch.hub.get_dir()}/checkpoints/, or leave prior_preservation out of --metrics"
        ) from error
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def lpips_distances(lpips_model, images_a, images_b, batch_size: int = 16) -> torch.Tensor:
    """LPIPS between images_a[i] and images_b[i], one value per pair."""
    if len(images_a) != len(images_b):
        raise ValueError(f"{len(images_a)} and {len(images_b)} images cannot be paired")
    device = next(lpips_model.parameters()).device
    distances = []
    for start in range(0, len(images_a), batch_size):
        a = images_to_tensor(images_a[start : start + batch_size]).to(device) * 2 - 1
        b = images_to_tensor(images_b[start : start + batch_size]).to(device) * 2 - 1
        if a.shape != b.shape:
            raise UsageError(
                f"images of {a.shape[-1]}x{a.shape[-2]} and {b.shape[-1]}x{b.shape[-2]} pixels cannot be compared with LPIPS: "
                f"generate both models at one size with --resolution"
            )
        distances.append(lpips_model(a, b).flatten().float().cpu())
    return torch.cat(distances)


def prior_preservation(lpips_model, base_images, unlearned_images, batch_size: int = 16) -> dict:
    """1 − mean LPIPS between base and unlearned images of the same prompts and seeds."""
    if not base_images:
        raise UsageError("no image pair to measure prior preservation on: check the unrelated prompts")
    distances = lpips_distances(lpips_model, base_images, unlearned_images, batch_size)
    return {
        "prior_preservation": float(1.0 - distances.mean()),
        "lpips_mean": float(distances.mean()),
        "lpips_std": float(distances.std()) if len(distances) > 1 else 0.0,
        "num_pairs": len(distances),
    }


# --------------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------------


def load_fid(
    feature_extractor: Optional[torch.nn.Module] = None, inception_weights: Optional[str] = None, device=None
):
    """torchmetrics' FID on Inception-v3 pool features, or on an injected feature extractor.

    An injected extractor receives float images in [0, 1] and returns (N, features).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    if feature_extractor is not None:
        return FrechetInceptionDistance(feature=feature_extractor, normalize=True).to(device)
    try:
        return FrechetInceptionDistance(
            feature=2048, normalize=True, feature_extractor_weights_path=inception_weights
        ).to(device)
    except ModuleNotFoundError:
        raise UsageError("FID needs torch-fidelity for its Inception network: pip install torch-fidelity") from None
    except (OSError, RuntimeError) as error:
        raise UsageError(
            f"FID needs torch-fidelity's Inception weights (pt_inception-2015-12-05-6726825d.pth), downloaded on first use "
            f"from github.com/toshas/torch-fidelity/releases ({type(error).__name__}); run once with internet access, or "
            f"pass the downloaded file with --fid_inception_weights, or leave fid out of --metrics"
        ) from error


@torch.no_grad()
def frechet_inception_distance(fid_metric, reference_images, generated_images, batch_size: int = 32) -> dict:
    """FID between reference and generated images (reference images are resized to the generated size)."""
    if len(reference_images) < 2 or len(generated_images) < 2:
        raise UsageError(
            f"FID needs at least 2 reference and 2 generated images, got {len(reference_images)} and {len(generated_images)}"
        )
    size = generated_images[0].size
    reference_images = [resize_center_crop(image, size) for image in reference_images]
    device = fid_metric.device
    fid_metric.reset()
    for images, real in ((reference_images, True), (generated_images, False)):
        for start in range(0, len(images), batch_size):
            fid_metric.update(images_to_tensor(images[start : start + batch_size]).to(device), real=real)
    return {
        "fid": float(fid_metric.compute()),
        "num_reference_images": len(reference_images),
        "num_generated_images": len(generated_images),
    }


def resize_center_crop(image, size):
    """Scale to cover ``size`` (width, height), then centre crop."""
    from PIL import Image

    width, height = size
    scale = max(width / image.width, height / image.height)
    scaled = image.convert("RGB").resize(
        (max(width, round(image.width * scale)), max(height, round(image.height * scale))), Image.BICUBIC
    )
    left, top = (scaled.width - width) // 2, (scaled.height - height) // 2
    return scaled.crop((left, top, left + width, top + height))


# --------------------------------------------------------------------------------------------------
# CLIP
# --------------------------------------------------------------------------------------------------

DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"


def load_clip(model_name_or_path: str = DEFAULT_CLIP_MODEL, device=None):
    """A CLIP model and its processor, from a local folder or the Hub (cached, or downloaded when online)."""
    from transformers import CLIPModel, CLIPProcessor

    try:
        model = CLIPModel.from_pretrained(model_name_or_path)
        processor = CLIPProcessor.from_pretrained(model_name_or_path)
    except (OSError, ValueError) as error:
        hub_id = (
            model_name_or_path
            if not os.path.exists(model_name_or_path) and model_name_or_path.count("/") == 1
            else DEFAULT_CLIP_MODEL
        )
        raise UsageError(
            f"cannot load the CLIP model {model_name_or_path!r} ({type(error).__name__}): Hub models are downloaded on first use; "
            f"run `hf download {hub_id}` with internet access, or pass --clip_model a local "
            f"CLIP folder (CLIPModel and CLIPProcessor saved with save_pretrained)"
        ) from error
    return model.eval().requires_grad_(False).to(device), processor


def _as_tensor(features) -> torch.Tensor:
    """transformers 5 returns model outputs from get_*_features; older versions returned the tensor."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


class CLIPFeatures(torch.nn.Module):
    """A CLIP model whose get_image_features/get_text_features return tensors, as torchmetrics expects."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def get_image_features(self, pixel_values, **kwargs):
        return _as_tensor(self.model.get_image_features(pixel_values=pixel_values, **kwargs))

    def get_text_features(self, input_ids, attention_mask=None, **kwargs):
        return _as_tensor(self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask, **kwargs))


def load_clip_score(model, processor):
    from torchmetrics.multimodal.clip_score import CLIPScore

    return CLIPScore(model_name_or_path=lambda: (CLIPFeatures(model), processor))


@torch.no_grad()
def clip_score(clip_score_metric, images, prompts: List[str], batch_size: int = 32) -> dict:
    """torchmetrics' CLIP score: max(100 · mean cosine(image, prompt), 0)."""
    if len(images) != len(prompts) or not images:
        raise UsageError(f"CLIP score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    clip_score_metric.reset()
    for start in range(0, len(images), batch_size):
        # uint8 images: the CLIP processor rescales to [0, 1] itself.
        pixels = (images_to_tensor(images[start : start + batch_size]) * 255).round().to(torch.uint8)
        # torchmetrics runs CLIP on the device of the images it is given.
        clip_score_metric.update(list(pixels.to(clip_score_metric.device)), prompts[start : start + batch_size])
    return {"clip_score": float(clip_score_metric.compute()), "num_images": len(images)}
