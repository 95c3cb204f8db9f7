"""FLOPs of one full-size step, counted on the meta device."""

import sys
from pathlib import Path
from typing import Callable


BENCHMARKS_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCHMARKS_DIR.parent
CONFIG_DIR = BENCHMARKS_DIR / "configs"
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from bench_measure import GB  # noqa: E402
from bench_models import full_size_bundle  # noqa: E402
from bench_report import print_table  # noqa: E402


def count_flops(fn: Callable) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def full_size_step_flops(
    name: str, resolution: int, weight_dtype: torch.dtype = torch.bfloat16, max_sequence_length: int = 256
) -> dict:
    """FLOPs of one DUO step (one pair) of a full-size model, counted on the meta device: shapes only, no
    memory and no arithmetic, so it runs on any machine.

    Both recipes run the denoiser's reference forward, adapted forward and backward over the 3-sample batch
    [x⁻; x⁺; x_T]; the backward computes input gradients only (the base weights are frozen; the LoRA
    adapter's own FLOPs, well under 1 %, are left out). The official step adds the VAE encoding of both
    images and the text encoders on the empty prompt. Gradient checkpointing adds one more forward.
    """
    meta = torch.device("meta")
    bundle = full_size_bundle(name, meta, weight_dtype)
    vae_scale = 2 ** (len(bundle.vae.config.block_out_channels) - 1)
    latent_size = resolution // vae_scale
    latents = torch.randn(
        3,
        bundle.vae.config.latent_channels,
        latent_size,
        latent_size,
        device=meta,
        dtype=weight_dtype,
        requires_grad=True,
    )
    timesteps = torch.ones(3, device=meta)
    if bundle.family == "sd":
        condition = torch.randn(3, 77, bundle.denoiser.config.cross_attention_dim, device=meta, dtype=weight_dtype)

        def denoise():
            return bundle.denoiser(latents, timesteps, condition).sample

        clip_ids = torch.zeros(1, 77, dtype=torch.long, device=meta)
        encoders = {"text_encoder": lambda: bundle.text_encoders["text_encoder"](clip_ids)}
    else:
        config = bundle.denoiser.config
        condition = torch.randn(
            3, 77 + max_sequence_length, config.joint_attention_dim, device=meta, dtype=weight_dtype
        )
        pooled = torch.randn(3, config.pooled_projection_dim, device=meta, dtype=weight_dtype)

        def denoise():
            return bundle.denoiser(
                hidden_states=latents, timestep=timesteps, encoder_hidden_states=condition, pooled_projections=pooled
            ).sample

        clip_ids = torch.zeros(1, 77, dtype=torch.long, device=meta)
        t5_ids = torch.zeros(1, max_sequence_length, dtype=torch.long, device=meta)
        encoders = {
            "text_encoder": lambda: bundle.text_encoders["text_encoder"](clip_ids, output_hidden_states=True),
            "text_encoder_2": lambda: bundle.text_encoders["text_encoder_2"](clip_ids, output_hidden_states=True),
            "text_encoder_3": lambda: bundle.text_encoders["text_encoder_3"](t5_ids),
        }
    pixels = torch.randn(2, 3, resolution, resolution, device=meta, dtype=next(bundle.vae.parameters()).dtype)

    with torch.no_grad():
        forward = count_flops(denoise)
        vae_encode = count_flops(lambda: bundle.vae.encode(pixels))
        text_encode = {encoder: count_flops(call) for encoder, call in encoders.items()}
    forward_backward = count_flops(lambda: denoise().float().pow(2).mean().backward())
    ours = forward + forward_backward
    official = ours + vae_encode + sum(text_encode.values())

    def parameter_bytes(module):
        return sum(p.numel() * p.element_size() for p in module.parameters())

    encoder_bytes = parameter_bytes(bundle.vae) + sum(parameter_bytes(m) for m in bundle.text_encoders.values())
    return {
        "model": name,
        "resolution": resolution,
        "denoiser_forward_flops": forward,
        "denoiser_backward_flops": forward_backward - forward,
        "vae_encode_flops": vae_encode,
        "text_encode_flops": text_encode,
        "ours_step_flops": ours,
        "official_step_flops": official,
        "flop_ratio": ours / official,
        "flop_ratio_with_gradient_checkpointing": (ours + forward) / (official + forward),
        # Weights each recipe keeps on the accelerator while training (the LoRA adapter and its optimizer
        # state, tens of MB, and the activations come on top).
        "ours_resident_parameter_bytes": parameter_bytes(bundle.denoiser),
        "official_resident_parameter_bytes": parameter_bytes(bundle.denoiser) + encoder_bytes,
        "weight_dtype": str(weight_dtype).replace("torch.", ""),
    }


def run_flops_suite(args) -> dict:
    rows = []
    for name in args.models:
        native = 512 if name == "sd14" else 1024
        for resolution in args.resolutions or (native, 1024 if native == 512 else 512):
            print(f"   counting {name} at {resolution} px ...", end=" ", flush=True)
            rows.append(full_size_step_flops(name, resolution))
            print(f"ours/official FLOPs {rows[-1]['flop_ratio']:.3f}", flush=True)
    note = (
        "FLOPs counted with torch.utils.flop_counter on the meta device; no step ran. If time followed FLOPs, "
        "flop_ratio would be the best ours/official step-time ratio that caching the VAE and text encoders can reach."
    )
    return {"flops": rows, "notes": [note]}


def print_flops_report(report: dict):
    print(f"\nDUO step FLOPs at full size (meta device, one pair per step), {report['date']}")
    print_table(
        [
            "model",
            "px",
            "denoiser fwd TFLOP",
            "bwd",
            "VAE encode",
            "text encoders",
            "ours step",
            "official step",
            "ours/official",
            "with GC",
            "weights on GPU: ours",
            "official",
        ],
        [
            [
                r["model"],
                r["resolution"],
                f"{r['denoiser_forward_flops'] / 1e12:.2f}",
                f"{r['denoiser_backward_flops'] / 1e12:.2f}",
                f"{r['vae_encode_flops'] / 1e12:.2f}",
                f"{sum(r['text_encode_flops'].values()) / 1e12:.3f}",
                f"{r['ours_step_flops'] / 1e12:.2f}",
                f"{r['official_step_flops'] / 1e12:.2f}",
                f"{r['flop_ratio']:.3f}",
                f"{r['flop_ratio_with_gradient_checkpointing']:.3f}",
                f"{r['ours_resident_parameter_bytes'] / GB:.2f} GB",
                f"{r['official_resident_parameter_bytes'] / GB:.2f} GB",
            ]
            for r in report["flops"]
        ],
    )
    for note in report["notes"]:
        print(f"note: {note}")
