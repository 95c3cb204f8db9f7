"""Tiny pipelines built from configs, for tests, benchmarks and demos that must run without downloads.

Nothing here is a stand-in for the real models: the pipelines are ordinary diffusers pipelines with
small configs and random weights, saved with ``save_pretrained`` so that every loading path of the
product (``from_pretrained``, ``load_lora_weights``) is exercised for real.
"""

import json
import os
import string
from typing import Optional

import torch


TINY_WORDS = (
    "a naked dressed white black woman man realistic photo bleeding comfort suffering enjoying with gun "
    "peace horror red blue green square circle triangle lighthouse cliff sunset of on at the in shower "
    "artistic nude wounded soldier covered gore screaming agony aiming rifle terrifying haunted house "
    "monster crimson scarlet"
).split()


def tiny_clip_tokenizer(model_max_length: int = 16):
    """A CLIP BPE tokenizer over letters in which every word of ``TINY_WORDS`` is one token, built in memory."""
    return clip_word_tokenizer(sorted(set(TINY_WORDS)), model_max_length)


def clip_word_tokenizer(words, model_max_length: int = 16):
    """A CLIP BPE tokenizer where each of ``words`` is one token; other text falls back to letters.

    Letters keep any prompt encodable; whole-word tokens make the words single embeddings, as common words
    are in CLIP's vocabulary. Shared by the test pipelines and the toy world.
    """
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for char in string.ascii_lowercase + string.digits + ",.!'-":
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    ranks = {}
    for word in words:
        # Merges learnt for earlier words may already split this one ("red" takes "re" from "green"):
        # apply them first, then join what is left. A merge added last never changes earlier words.
        pieces = _apply_merges(list(word[:-1]) + [word[-1] + "</w>"], ranks)
        while len(pieces) > 1:
            ranks[(pieces[0], pieces[1])] = len(ranks)
            vocab.setdefault(pieces[0] + pieces[1], len(vocab))
            pieces = _apply_merges(pieces, ranks)
    return CLIPTokenizer(vocab=vocab, merges=list(ranks), model_max_length=model_max_length)


def _apply_merges(pieces, ranks):
    """Byte-pair encoding of one word: repeatedly join the adjacent pair of lowest merge rank."""
    while len(pieces) > 1:
        ranked = [(ranks[pair], pair) for pair in zip(pieces, pieces[1:]) if pair in ranks]
        if not ranked:
            break
        _, (left, right) = min(ranked)
        joined, index = [], 0
        while index < len(pieces):
            if index + 1 < len(pieces) and (pieces[index], pieces[index + 1]) == (left, right):
                joined.append(left + right)
                index += 2
            else:
                joined.append(pieces[index])
                index += 1
        pieces = joined
    return pieces


def tiny_t5_tokenizer(model_max_length: int = 16):
    """A T5 unigram tokenizer over letters, built in memory."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + c, -1.0) for c in string.ascii_lowercase] + [(c, -2.0) for c in string.ascii_lowercase]
    vocab += [(c, -3.0) for c in string.digits + ",.!'-"]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


def tiny_t5_encoder(width: int, seed: int):
    """The tiny T5 tokenizer and a 2-layer T5 encoder of hidden size ``width`` (SD3's and FLUX's prompt encoder)."""
    from transformers import T5Config, T5EncoderModel

    tokenizer = tiny_t5_tokenizer()
    torch.manual_seed(seed)
    encoder = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer),
            d_model=width,
            d_kv=8,
            d_ff=2 * width,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )
    return tokenizer, encoder


def make_vae_nearly_deterministic(vae, logvar_bias: float = -20.0):
    """Collapse the posterior's variance so a pair's images stay distinguishable in latent space.

    A random VAE has std ≈ 1, which would drown the difference between the two images of a pair.
    """
    latent_channels = vae.config.latent_channels
    # The last layer producing (mean, logvar) is quant_conv when the VAE has one, else the encoder's conv_out.
    out = vae.quant_conv if getattr(vae, "quant_conv", None) is not None else vae.encoder.conv_out
    with torch.no_grad():
        out.weight[latent_channels:] = 0.0
        out.bias[latent_channels:] = logvar_bias
    return vae


def _calibrate_scaling_factor(vae, resolution: int, seed: int = 0) -> float:
    """1 / std of latent means over random images, so latents are of unit size like SD's."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(8, 3, resolution, resolution, generator=generator) * 2 - 1
    with torch.no_grad():
        mean = vae.encode(images).latent_dist.mean
    shift = vae.config.shift_factor or 0.0
    return float(1.0 / (mean - shift).std())


def tiny_vae(
    resolution: int,
    latent_channels: int = 4,
    seed: int = 0,
    shift_factor: Optional[float] = None,
    use_quant_conv: bool = True,
):
    """A two-level AutoencoderKL (vae scale factor 2); ``use_quant_conv=False`` as FLUX's VAE, which has neither
    quant_conv nor post_quant_conv."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=resolution,
        shift_factor=shift_factor,
        use_quant_conv=use_quant_conv,
        use_post_quant_conv=use_quant_conv,
    )
    make_vae_nearly_deterministic(vae)
    vae.register_to_config(scaling_factor=_calibrate_scaling_factor(vae, resolution, seed))
    return vae


def make_tiny_sd_pipeline(
    output_dir: str,
    prediction_type: str = "epsilon",
    resolution: int = 32,
    seed: int = 0,
    cross_attention_dim: int = 32,
):
    """Build and save a tiny Stable Diffusion 1.x-style pipeline; returns ``output_dir``."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=cross_attention_dim,
            intermediate_size=2 * cross_attention_dim,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=tokenizer.model_max_length,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )
    vae = tiny_vae(resolution, seed=seed)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=resolution // 2,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=4,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )
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
    return output_dir


def make_tiny_pair_folder(output_dir: str, num_pairs: int = 4, resolution: int = 32, seed: int = 0) -> str:
    """A pair folder in the imagefolder layout train_duo.py reads: red-ish unsafe, blue-ish safe twins.

    The two images of a pair share their layout (a square at the same place) and differ only in colour,
    as SDEdit twins differ only in the concept.
    """
    import numpy as np
    from PIL import Image

    os.makedirs(output_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(num_pairs):
        background = rng.uniform(0.3, 0.7, size=3)
        unsafe = np.ones((resolution, resolution, 3)) * background
        safe = unsafe.copy()
        size = int(rng.integers(resolution // 4, resolution // 2))
        top, left = rng.integers(0, resolution - size, size=2)
        unsafe[top : top + size, left : left + size] = (0.9, 0.1, 0.1)
        safe[top : top + size, left : left + size] = (0.1, 0.1, 0.9)
        names = {}
        for kind, array in (("unsafe", unsafe), ("safe", safe)):
            names[kind] = f"{index:05d}_{kind}.png"
            Image.fromarray((array * 255).round().astype("uint8")).save(os.path.join(output_dir, names[kind]))
        rows.append(
            {
                "unsafe_file_name": names["unsafe"],
                "safe_file_name": names["safe"],
                "unsafe_prompt": "a red square",
                "safe_prompt": "a blue square",
            }
        )
    with open(os.path.join(output_dir, "metadata.jsonl"), "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return output_dir


def make_tiny_sd3_pipeline(output_dir: str, with_t5: bool = True, resolution: int = 32, seed: int = 0) -> str:
    """Build and save a tiny Stable Diffusion 3 pipeline; returns ``output_dir``.

    The shapes follow SD3's wiring: two CLIP encoders with projection (their hidden states, concatenated,
    fill ``joint_attention_dim`` and their pooled projections ``pooled_projection_dim``), a T5 encoder of
    width ``joint_attention_dim`` (or none, as a T5-less base), 16 latent channels, a VAE with a shift
    factor, and a flow-matching scheduler with SD3's shift of 3.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    clip_hidden_size, projection_dim, joint_attention_dim, latent_channels = 16, 16, 32, 16
    clip_tokenizer = tiny_clip_tokenizer()

    def clip_encoder(offset):
        torch.manual_seed(seed + offset)
        return CLIPTextModelWithProjection(
            CLIPTextConfig(
                vocab_size=len(clip_tokenizer),
                hidden_size=clip_hidden_size,
                intermediate_size=2 * clip_hidden_size,
                projection_dim=projection_dim,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=clip_tokenizer.model_max_length,
                bos_token_id=0,
                eos_token_id=1,
                pad_token_id=1,
                hidden_act="gelu",
            )
        )

    text_encoder_3 = tokenizer_3 = None
    if with_t5:
        tokenizer_3, text_encoder_3 = tiny_t5_encoder(joint_attention_dim, seed + 3)
    vae = tiny_vae(resolution, latent_channels=latent_channels, seed=seed, shift_factor=0.1)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(seed + 4)
    transformer = SD3Transformer2DModel(
        sample_size=resolution // vae_scale_factor,
        patch_size=2,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        caption_projection_dim=16,
        pooled_projection_dim=2 * projection_dim,
        pos_embed_max_size=resolution // vae_scale_factor,
    )
    pipeline = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=clip_encoder(1),
        tokenizer=clip_tokenizer,
        text_encoder_2=clip_encoder(2),
        tokenizer_2=tiny_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipeline.save_pretrained(output_dir)
    return output_dir


def _tiny_clip_text_config(tokenizer, hidden_size: int, projection_dim: Optional[int] = None):
    """A 2-layer CLIP text config over the tiny CLIP tokenizer (eos is token 1: pooling takes the first eos)."""
    from transformers import CLIPTextConfig

    kwargs = {} if projection_dim is None else {"projection_dim": projection_dim}
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_act="gelu",
        **kwargs,
    )


def make_tiny_sdxl_pipeline(output_dir: str, resolution: int = 32, seed: int = 0) -> str:
    """Build and save a tiny Stable Diffusion XL pipeline; returns ``output_dir``.

    The shapes follow SDXL's wiring: a CLIPTextModel and a CLIPTextModelWithProjection of different widths,
    whose penultimate hidden states, concatenated, fill the UNet's ``cross_attention_dim`` (768 + 1280 = 2048
    in SDXL, 16 + 32 here); the UNet's ``text_time`` added condition takes the second encoder's pooled
    projection and 6 micro-conditioning time ids of ``addition_time_embed_dim`` each, so
    ``projection_class_embeddings_input_dim`` = 6 x 8 + 32 (6 x 256 + 1280 = 2816 in SDXL); 4 latent channels,
    linear projections in the transformer blocks, and SDXL's EulerDiscreteScheduler (scaled-linear betas
    0.00085-0.012, leading spacing, steps offset 1).
    """
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    hidden_size, hidden_size_2, time_embed_dim = 16, 32, 8
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer()
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_clip_text_config(tokenizer, hidden_size))
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(
        _tiny_clip_text_config(tokenizer_2, hidden_size_2, projection_dim=hidden_size_2)
    )
    vae = tiny_vae(resolution, seed=seed)
    vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    torch.manual_seed(seed + 1)
    unet = UNet2DConditionModel(
        sample_size=resolution // vae_scale_factor,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(16, 32),
        layers_per_block=1,
        norm_num_groups=8,
        cross_attention_dim=hidden_size + hidden_size_2,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=6 * time_embed_dim + hidden_size_2,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        interpolation_type="linear",
        timestep_spacing="leading",
        steps_offset=1,
        use_karras_sigmas=False,
    )
    pipeline = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )
    pipeline.save_pretrained(output_dir)
    return output_dir


def make_tiny_flux_pipeline(output_dir: str, resolution: int = 32, seed: int = 0, guidance_embeds: bool = True) -> str:
    """Build and save a tiny FLUX.1 pipeline; returns ``output_dir``.

    The shapes follow FLUX.1's wiring: a CLIPTextModel whose pooled output fills ``pooled_projection_dim``
    (768 in FLUX.1, 16 here), a T5 encoder of width ``joint_attention_dim`` (4096, 32 here), a VAE with 16 latent
    channels, a shift factor and no quant convs, a transformer of patch size 1 whose ``in_channels`` is 4 x 16
    because the pipeline packs 2x2 latent patches into tokens, rotary axes summing to ``attention_head_dim``
    ((16, 56, 56) of 128, (4, 6, 6) of 16 here), a guidance embedding unless ``guidance_embeds=False``
    (FLUX.1-dev has one, FLUX.1-schnell none), and FLUX.1's flow-matching scheduler with resolution-dependent
    shift (base 0.5 at 256 image tokens to 1.15 at 4096).
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    clip_hidden_size, joint_attention_dim, latent_channels = 16, 32, 16
    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(_tiny_clip_text_config(tokenizer, clip_hidden_size))
    tokenizer_2, text_encoder_2 = tiny_t5_encoder(joint_attention_dim, seed + 3)
    vae = tiny_vae(resolution, latent_channels=latent_channels, seed=seed, shift_factor=0.1, use_quant_conv=False)
    torch.manual_seed(seed + 4)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * latent_channels,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=joint_attention_dim,
        pooled_projection_dim=clip_hidden_size,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    pipeline = FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(output_dir)
    return output_dir


def make_tiny_clip(output_dir: str, seed: int = 0) -> str:
    """A CLIP model and processor with the tiny CLIP tokenizer's vocabulary and 32-pixel images (for the
    CLIP zero-shot detector and the CLIP score without downloads)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = tiny_clip_tokenizer()
    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": tokenizer.model_max_length,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=8,
    )
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    )
    CLIPModel(config).save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def make_tiny_duo_adapter(
    output_dir: str, base_dir: str, base_model: str, concept: str = "nudity", rank: int = 4, seed: int = 0
) -> str:
    """A DUO adapter for a tiny SD pipeline without training: random LoRA weights on self-attention,
    saved as train_duo.py saves them (weights, ``duo_config.json`` naming ``base_model``); returns ``output_dir``.

    Its LoRA B matrices are non-zero, so the adapter visibly changes the images.
    """
    from diffusers import StableDiffusionPipeline

    from .lora import LORA_WEIGHT_NAME, add_duo_adapter, lora_state_dict, lora_target_modules, target_module_patterns
    from .outputs import DUO_CONFIG_NAME

    pipe = StableDiffusionPipeline.from_pretrained(base_dir)
    target_modules = lora_target_modules(pipe.unet, "self_attn")
    add_duo_adapter(pipe.unet, rank, rank, target_modules)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "lora_" in name:
                parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))
    os.makedirs(output_dir, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(
        output_dir, unet_lora_layers=lora_state_dict(pipe.unet), weight_name=LORA_WEIGHT_NAME
    )
    architecture = {  # as train_duo.py records it
        "family": "sd",
        "pipeline_class": "StableDiffusionPipeline",
        "denoiser": "unet",
        "cross_attention_dim": pipe.unet.config.cross_attention_dim,
        "block_out_channels": list(pipe.unet.config.block_out_channels),
        "prediction_type": pipe.scheduler.config.prediction_type,
    }
    config = {
        "format_version": 1,
        "base_model": base_model,
        "base_model_revision": None,
        "variant": None,
        "architecture": architecture,
        "concept": concept,
        "weight_name": LORA_WEIGHT_NAME,
        "rank": rank,
        "lora_alpha": rank,
        "lora_target": "self_attn",
        "target_modules": target_module_patterns(target_modules),
    }
    with open(os.path.join(output_dir, DUO_CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    return output_dir


class MeanChannelDetector:
    """For tests on tiny random pipelines: flagged when the mean of one RGB channel (in [0, 1]) is ≥ ``threshold``.

    Its score is that mean, so a test can set the threshold from scores it has measured. Use it as
    ``--detector duo_plugin.testing:MeanChannelDetector``.
    """

    name = "mean_channel"

    def __init__(self, threshold: float = 0.5, channel: int = 0):
        self.threshold, self.channel = threshold, channel

    def score(self, image) -> float:
        import numpy as np

        return float(np.asarray(image.convert("RGB"), dtype=np.float32)[..., self.channel].mean() / 255.0)

    def __call__(self, images):
        from .detectors import Detection

        scores = [self.score(image) for image in images]
        return [
            Detection(flagged=s >= self.threshold, score=s, labels=[self.name] if s >= self.threshold else [])
            for s in scores
        ]
