"""duo_plugin.memory: the fake-tensor estimate against real accounting, the closed forms, the start-up check."""

import os
import types

import pytest
import torch

from duo_plugin import memory
from duo_plugin.errors import UsageError


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def relative_error(estimate: int, measured: int) -> float:
    return abs(estimate / measured - 1)


@pytest.mark.parametrize(
    "family, recipe, gradient_checkpointing, mixed_precision",
    [
        ("sd", "ours", False, "no"),
        ("sd", "official", True, "no"),
        ("sd", "ours", True, "bf16"),
        ("sd3", "ours", True, "no"),
        ("sd3", "official", False, "no"),
    ],
)
def test_fake_estimate_matches_memtracker_on_real_tensors(
    family, recipe, gradient_checkpointing, mixed_precision, tiny_sd, tiny_sd3
):
    """The acceptance check: the estimate (fake tensors) within 10 % of PyTorch's MemTracker measuring the same
    step on real CPU tensors (no allocator rounding on a CPU, so none in the estimate either)."""
    configs = memory.load_base_model_configs(tiny_sd if family == "sd" else tiny_sd3)
    settings = memory.TrainingMemorySettings(
        resolution=32,
        mixed_precision=mixed_precision,
        rank=4,
        recipe=recipe,
        gradient_checkpointing=gradient_checkpointing,
        validation=False,
    )
    estimate = memory.estimate_training(configs, settings, rounding=1)["training step"]
    measured = memory.measure_training_step(configs, settings)
    assert relative_error(estimate.peak_bytes, measured) < 0.10, (estimate.peak_bytes, measured)
    assert sum(estimate.breakdown.values()) == estimate.peak_bytes


def test_breakdown_counts_the_resident_weights_and_adam_state(tiny_sd):
    configs = memory.load_base_model_configs(tiny_sd)
    settings = memory.TrainingMemorySettings(resolution=32, mixed_precision="no", rank=4, validation=False)
    estimate = memory.estimate_training(configs, settings, rounding=1)["training step"]
    with torch.device("meta"):
        unet = memory.build_denoiser(configs, torch.float32)
        lora = memory.add_adapter(unet, settings, "sd")
    lora_bytes = sum(p.numel() * 4 for p in lora)
    frozen_bytes = sum(p.numel() * 4 for p in unet.parameters() if not p.requires_grad) + sum(
        b.numel() * b.element_size() for b in unet.buffers()
    )
    assert estimate.breakdown["weights"] == frozen_bytes
    assert estimate.breakdown["lora_and_optimizer"] == 3 * lora_bytes  # fp32 weights + AdamW's two moments


def test_eight_bit_adam_state_closed_form():
    numels = [10, 4095, 4096, 4097, 256 * 1000 + 1]
    tensors = memory.eight_bit_adam_state([torch.empty(n, device="meta") for n in numels])
    assert sum(t.numel() * t.element_size() for t in tensors) == memory.eight_bit_adam_state_bytes(numels)
    # at least 4096 elements: two uint8 moments and one fp32 absmax per 256-element block each
    assert memory.eight_bit_adam_state_bytes([4096]) == 2 * 4096 + 2 * 4 * 16
    assert memory.eight_bit_adam_state_bytes([100]) == 800


def test_allocator_rounding_and_cards():
    tracker = memory.AllocationTracker(rounding=512)
    tensor = torch.empty(3, device="meta")
    tracker.register(tensor, "activations")  # 12 bytes -> one 512-byte block
    assert tracker.current["activations"] == 512
    del tensor
    assert tracker.current["activations"] == 0 and tracker.peak == 512
    assert memory.card_requirement_bytes(10 * memory.GiB) == int(11 * memory.GiB) + memory.CUDA_CONTEXT_BYTES
    assert memory.smallest_card(int(6.5 * memory.GiB)) == 8  # 6.5 x 1.1 + 0.75 = 7.9 GiB
    assert memory.smallest_card(int(7 * memory.GiB)) == 12
    assert memory.smallest_card(100 * memory.GiB) is None


def test_options_lower_the_estimate(tiny_sd):
    configs = memory.load_base_model_configs(tiny_sd)
    base = memory.TrainingMemorySettings(resolution=64, mixed_precision="bf16", rank=4, validation=False)

    def peak(**change):
        return memory.estimate_training(configs, memory.replace(base, **change))["training step"].peak_bytes

    off = peak()
    assert peak(gradient_checkpointing=True) < off
    assert peak(recipe="official") > off  # VAE and text encoder resident and called
    assert peak(train_batch_size=2) > off


def training_args(path, **overrides):
    args = {
        "pretrained_model_name_or_path": path,
        "revision": None,
        "cache_dir": None,
        "resolution": 32,
        "train_batch_size": 1,
        "mixed_precision": "no",
        "rank": 4,
        "lora_target": None,
        "gradient_checkpointing": False,
        "use_8bit_adam": False,
        "num_validation_images": 2,
        "skip_validation": False,
        "skip_memory_check": False,
    }
    args.update(overrides)
    return types.SimpleNamespace(**args)


def test_start_up_check_stops_with_the_flags_that_fit(tiny_sd, monkeypatch):
    configs = memory.load_base_model_configs(tiny_sd)
    args = training_args(tiny_sd)
    settings = memory.settings_from_args(args, "sd")
    run_peak = memory.estimate_training(configs, settings)["run"].peak_bytes
    with_checkpointing = memory.estimate_training(configs, memory.replace(settings, gradient_checkpointing=True))[
        "run"
    ].peak_bytes
    assert with_checkpointing < run_peak
    free = int(with_checkpointing * (1 + memory.FRAGMENTATION_MARGIN)) + 1  # fits only with checkpointing
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * memory.GiB))
    with pytest.raises(UsageError, match=r"add --gradient_checkpointing \(or --skip_memory_check"):
        memory.check_training_memory(args, "sd")
    assert memory.check_training_memory(training_args(tiny_sd, skip_memory_check=True), "sd") is None
    assert (
        memory.check_training_memory(training_args(tiny_sd, gradient_checkpointing=True), "sd").peak_bytes
        == with_checkpointing
    )


def test_no_check_without_a_gpu(tiny_sd, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert memory.check_training_memory(training_args(tiny_sd), "sd") is None


def test_cli_prints_every_peak_and_card(tiny_sd, capsys, tmp_path):
    rows = memory.main(
        [
            "--pretrained_model_name_or_path",
            tiny_sd,
            "--resolution",
            "32",
            "--rank",
            "4",
            "--json",
            str(tmp_path / "m.json"),
        ]
    )
    out = capsys.readouterr().out
    for label in (
        "training step, your flags",
        "official recipe",
        "validation during training",
        "pair generation",
        "evaluation",
    ):
        assert label in out
    assert len(rows) == 6 and all(e.peak_bytes > 0 for _, e in rows)
    assert (tmp_path / "m.json").exists()


@pytest.mark.slow
def test_full_size_configs_need_no_weights():
    """SD1.4's published config, full size, on fake tensors: the resident weights are the bf16 UNet."""
    configs = memory.load_base_model_configs(os.path.join(REPO_ROOT, "benchmarks", "configs", "sd14"))
    settings = memory.TrainingMemorySettings(resolution=64, mixed_precision="bf16", validation=False)
    estimate = memory.estimate_training(configs, settings)["training step"]
    assert 859_520_964 * 2 <= estimate.breakdown["weights"] <= 859_520_964 * 2 * 1.001  # + buffers, 512-byte rounding


@pytest.mark.slow
@pytest.mark.parametrize("gradient_checkpointing", [False, True])
def test_full_size_sd14_estimate_matches_real_tensors(gradient_checkpointing, resolution=64):
    """Mid-size check: the full-size SD1.4 UNet (860M parameters, fp32, real tensors on the CPU) at 64 px, with and
    without gradient checkpointing (64 px keeps CI's slow tier short; 128 px, tested until 2026-12-04, met the
    same 10 % bound)."""
    configs = memory.load_base_model_configs(os.path.join(REPO_ROOT, "benchmarks", "configs", "sd14"))
    settings = memory.TrainingMemorySettings(
        resolution=resolution, mixed_precision="no", validation=False, gradient_checkpointing=gradient_checkpointing
    )
    estimate = memory.estimate_training(configs, settings, rounding=1)["training step"]
    measured = memory.measure_training_step(configs, settings)
    print(
        f"SD1.4 UNet at {resolution} px: estimate {estimate.peak_bytes} B, MemTracker {measured} B, error {100 * (estimate.peak_bytes / measured - 1):+.2f} %"
    )
    assert relative_error(estimate.peak_bytes, measured) < 0.10


# --------------------------------------------------------------------------------------------------
# SDXL and FLUX.1
# --------------------------------------------------------------------------------------------------

CONFIGS_DIR = os.path.join(REPO_ROOT, "benchmarks", "configs")


@pytest.fixture(scope="module")
def tiny_sdxl_base(tmp_path_factory):
    from duo_plugin.testing import make_tiny_sdxl_pipeline

    return make_tiny_sdxl_pipeline(str(tmp_path_factory.mktemp("tiny_sdxl_memory")))


@pytest.fixture(scope="module")
def tiny_flux_bases(tmp_path_factory):
    """A tiny FLUX.1-dev-like base (guidance embedding) and its FLUX.1-schnell-like twin (none)."""
    from duo_plugin.testing import make_tiny_flux_pipeline

    return {
        guidance: make_tiny_flux_pipeline(
            str(tmp_path_factory.mktemp(f"tiny_flux_{guidance}")), guidance_embeds=guidance
        )
        for guidance in (True, False)
    }


def test_full_size_configs_are_the_published_models():
    """benchmarks/configs: the families detected, and the denoisers' parameter counts on the meta device (no
    weights): SDXL-base's UNet 2.57 B, FLUX.1-dev's transformer 11.90 B, schnell's the same less the guidance
    embedder."""
    counts = {}
    for name, family, encoders in (
        ("sdxl-base", "sdxl", ["text_encoder", "text_encoder_2"]),
        ("flux1-dev", "flux", ["text_encoder", "text_encoder_2"]),
        ("flux1-schnell", "flux", ["text_encoder", "text_encoder_2"]),
    ):
        configs = memory.load_base_model_configs(os.path.join(CONFIGS_DIR, name))
        assert configs.family == family and sorted(configs.text_encoders) == encoders
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in memory.build_denoiser(configs, torch.bfloat16).parameters())
    assert counts["sdxl-base"] == 2_567_463_684
    assert counts["flux1-dev"] == 11_901_408_320
    assert abs(counts["flux1-dev"] / 11.9e9 - 1) < 0.001
    # schnell has no guidance embedder: two linears 256 -> 3072 -> 3072 (10.2 M parameters, 0.09 %)
    assert counts["flux1-dev"] - counts["flux1-schnell"] == (256 * 3072 + 3072) + (3072 * 3072 + 3072)


def test_full_size_adapters_train_only_lora_on_the_expected_targets():
    """sdxl: LoRA on the UNet's self-attention (attn1) only; flux: on to_q/to_k/to_v/to_out.0 of every attention
    (the double blocks' four projections, the single blocks' three: they have no to_out), never on the text
    projections (add_q_proj, ...) — the training scripts' defaults."""
    settings = memory.TrainingMemorySettings(resolution=1024, rank=32)
    for name, expected_layers in (("sdxl-base", 70 * 4), ("flux1-dev", 19 * 4 + 38 * 3)):
        configs = memory.load_base_model_configs(os.path.join(CONFIGS_DIR, name))
        with torch.device("meta"):
            denoiser = memory.build_denoiser(configs, torch.bfloat16)
            lora_params = memory.add_adapter(denoiser, settings, configs.family)
        trainable = {n: p for n, p in denoiser.named_parameters() if p.requires_grad}
        assert len(trainable) == len(lora_params) == 2 * expected_layers
        assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
        assert all(p.dtype == torch.float32 for p in lora_params)
        layers = {n.split(".lora_")[0] for n in trainable}
        if configs.family == "sdxl":
            assert all(".attn1." in layer for layer in layers)
        else:
            assert {layer.split(".attn.")[1] for layer in layers} == {"to_q", "to_k", "to_v", "to_out.0"}
            assert not any(layer.startswith("single_transformer_blocks") and "to_out" in layer for layer in layers)
        if name == "flux1-dev":  # 190 projections of 3072 x 3072, rank 32: 37.4 M LoRA parameters
            assert sum(p.numel() for p in lora_params) == 190 * 2 * 32 * 3072


@pytest.mark.parametrize(
    "family, recipe, gradient_checkpointing, mixed_precision",
    [
        ("sdxl", "ours", False, "no"),
        ("sdxl", "official", True, "no"),
        ("sdxl", "ours", True, "bf16"),
        ("flux", "ours", False, "no"),
        ("flux", "ours", True, "no"),
        ("flux", "official", False, "bf16"),
    ],
)
def test_sdxl_and_flux_estimates_match_memtracker_on_real_tensors(
    family, recipe, gradient_checkpointing, mixed_precision, tiny_sdxl_base, tiny_flux_bases
):
    """The acceptance check of the new families: fake-tensor estimate within 10 % of MemTracker on real tensors."""
    configs = memory.load_base_model_configs(tiny_sdxl_base if family == "sdxl" else tiny_flux_bases[True])
    assert configs.family == family
    settings = memory.TrainingMemorySettings(
        resolution=32,
        mixed_precision=mixed_precision,
        rank=4,
        recipe=recipe,
        gradient_checkpointing=gradient_checkpointing,
        max_sequence_length=16,
        validation=False,
    )
    estimate = memory.estimate_training(configs, settings, rounding=1)["training step"]
    measured = memory.measure_training_step(configs, settings)
    assert relative_error(estimate.peak_bytes, measured) < 0.10, (estimate.peak_bytes, measured)
    assert sum(estimate.breakdown.values()) == estimate.peak_bytes


def test_sdxl_and_flux_estimates_grow_with_resolution(tiny_sdxl_base, tiny_flux_bases):
    """Training step and validation (and SDXL's pair generation) need more at 64 px than at 32 px; the step's
    resident weights stay, its activations grow with the 4x pixels (latent tokens)."""
    for base in (tiny_sdxl_base, tiny_flux_bases[True]):
        configs = memory.load_base_model_configs(base)
        settings = memory.TrainingMemorySettings(resolution=32, rank=4, max_sequence_length=16)

        def peaks(resolution):
            training = memory.estimate_training(configs, memory.replace(settings, resolution=resolution))
            generation = memory.estimate_inference(configs, resolution, 2, encode=True)
            return training["training step"], training["validation"], generation

        small, large = peaks(32), peaks(64)
        assert large[0].peak_bytes > small[0].peak_bytes and large[1].peak_bytes > small[1].peak_bytes
        # tiny FLUX's generation peaks in T5 at 512 tokens (its position bias), which no resolution changes
        assert large[2].peak_bytes > small[2].peak_bytes or (
            configs.family == "flux" and large[2].peak_bytes == small[2].peak_bytes
        )
        assert large[0].breakdown["weights"] == small[0].breakdown["weights"]
        growth = large[0].breakdown["activations"] / small[0].breakdown["activations"]
        assert 2.5 < growth < 5, (configs.family, growth)


def test_flux_guidance_embedding_changes_nothing_big(tiny_flux_bases):
    """dev (guidance embedding) vs schnell (none): the same estimate up to the embedder's weights and its few
    activations."""
    settings = memory.TrainingMemorySettings(resolution=32, rank=4, max_sequence_length=16, validation=False)
    dev, schnell = (memory.load_base_model_configs(tiny_flux_bases[g]) for g in (True, False))
    assert dev.denoiser["guidance_embeds"] and not schnell.denoiser["guidance_embeds"]
    with torch.device("meta"):
        embedder = memory.build_denoiser(dev, torch.bfloat16).time_text_embed.guidance_embedder
    embedder_bytes = sum(p.numel() * p.element_size() for p in embedder.parameters())
    step = {g: memory.estimate_training(c, settings, rounding=1)["training step"] for g, c in ((1, dev), (0, schnell))}
    assert step[1].breakdown["weights"] - step[0].breakdown["weights"] == embedder_bytes
    assert 0 <= step[1].peak_bytes - step[0].peak_bytes < 2 * embedder_bytes + 64 * 1024


def test_flux_inference_runs_without_cfg_and_t5_at_512_tokens(tiny_flux_bases):
    """Pair generation and evaluation of FLUX: no doubled batch; the pipeline's 512 T5 tokens (the training
    prompts' 77 by default), so the activations grow with the batch, not twice as fast."""
    configs = memory.load_base_model_configs(tiny_flux_bases[True])
    one = memory.estimate_inference(configs, 32, 1, encode=False)
    two = memory.estimate_inference(configs, 32, 2, encode=False)
    assert one.breakdown["weights"] == two.breakdown["weights"]
    assert two.peak_bytes > one.peak_bytes


def test_sdxl_vae_upcast_unless_fp16_safe(tiny_sdxl_base, tmp_path):
    """SDXL's pipelines upcast an fp16 VAE whose config says force_upcast (SDXL-base's: it overflows) to fp32 for
    the decode; an fp16-safe VAE (force_upcast false, as madebyollin/sdxl-vae-fp16-fix) stays in fp16."""
    import json

    configs = memory.load_base_model_configs(tiny_sdxl_base)
    assert memory.vae_needs_upcast(configs, torch.float16) and configs.vae.get("force_upcast", True)
    assert not memory.vae_needs_upcast(configs, torch.bfloat16)
    safe = dict(configs.vae, force_upcast=False)
    (tmp_path / "config.json").write_text(json.dumps(safe))
    safe_configs = memory.load_base_model_configs(tiny_sdxl_base, vae_path=str(tmp_path))
    assert safe_configs.vae == safe and not memory.vae_needs_upcast(safe_configs, torch.float16)
    # A VAE wide enough (relative to the tiny UNet) that the decode is the peak, as SDXL's at 1024 px is.
    wide = memory.replace(configs, vae=dict(configs.vae, block_out_channels=[64, 128], norm_num_groups=32))
    wide_safe = memory.replace(wide, vae=dict(wide.vae, force_upcast=False))
    with torch.device("meta"):
        vae_fp16_bytes = sum(p.numel() * 2 for p in memory.build_vae(wide, torch.float16).parameters())
    upcast = memory.estimate_inference(wide, 128, 4, encode=True, rounding=1)
    fp16 = memory.estimate_inference(wide_safe, 128, 4, encode=True, rounding=1)
    # at the peak (the decode), the upcast VAE's weights are fp32, its fp16 copy freed; its activations fp32 too
    assert upcast.breakdown["weights"] - fp16.breakdown["weights"] == vae_fp16_bytes
    assert 1.95 < upcast.breakdown["activations"] / fp16.breakdown["activations"] <= 2


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_start_up_check_accepts_sdxl_and_flux(family, tiny_sdxl_base, tiny_flux_bases, monkeypatch):
    base = tiny_sdxl_base if family == "sdxl" else tiny_flux_bases[True]
    # 8-bit Adam: torch's AdamW step asks CUDA for its stream once is_available says True (patched below)
    args = training_args(base, max_sequence_length=16, use_8bit_adam=True)
    settings = memory.settings_from_args(args, family)
    assert settings.lora_target == {"sdxl": "self_attn", "flux": "attn"}[family]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * memory.GiB, 80 * memory.GiB))
    estimate = memory.check_training_memory(args, family)
    configs = memory.load_base_model_configs(base)
    assert estimate.peak_bytes == memory.estimate_training(configs, settings)["run"].peak_bytes
    # every memory flag already on and still too big: no flag to advise (and no estimate per flag combination)
    all_on = training_args(
        base,
        max_sequence_length=16,
        mixed_precision="bf16",
        gradient_checkpointing=True,
        use_8bit_adam=True,
        skip_validation=True,
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (estimate.peak_bytes // 4, 80 * memory.GiB))
    with pytest.raises(UsageError, match="exceeds .*: lower --resolution"):
        memory.check_training_memory(all_on, family)


def test_cli_flux_defaults(tiny_flux_bases, capsys):
    """FLUX: the training prompts' T5 tokens by default as train_duo_flux.py's (512, its pipeline's sampling length),
    train_duo_flux.py named, a resolution refused unless it packs into 2x2 patches."""
    rows = memory.main(["--pretrained_model_name_or_path", tiny_flux_bases[True], "--resolution", "32", "--rank", "4"])
    out = capsys.readouterr().out
    assert "train_duo_flux.py" in out and len(rows) == 6 and all(e.peak_bytes > 0 for _, e in rows)
    assert memory.settings_from_args(training_args(tiny_flux_bases[True]), "flux").max_sequence_length == 512
    with pytest.raises(SystemExit):  # FLUX.1: 8x VAE, 2x2 patches
        memory.main(["--pretrained_model_name_or_path", os.path.join(CONFIGS_DIR, "flux1-dev"), "--resolution", "520"])
    assert "not a multiple of 16" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# --quantize_base nf4|int8, and several GPUs (DDP, FSDP, DeepSpeed ZeRO-2)
# --------------------------------------------------------------------------------------------------


@pytest.fixture
def quantizing_on_cpu(monkeypatch):
    """diffusers' and transformers' bitsandbytes quantizers on the CPU: only their GPU check lifted (bitsandbytes
    has CPU kernels for nf4 and int8), as in tests/test_quantization.py."""
    pytest.importorskip("bitsandbytes")
    from diffusers.quantizers.bitsandbytes import bnb_quantizer
    from transformers.quantizers import quantizer_bnb_4bit, quantizer_bnb_8bit

    def allow(self, *args, **kwargs):
        return None

    for quantizer in (bnb_quantizer.BnB4BitDiffusersQuantizer, bnb_quantizer.BnB8BitDiffusersQuantizer):
        monkeypatch.setattr(quantizer, "validate_environment", allow)
    for module in (quantizer_bnb_4bit, quantizer_bnb_8bit):
        for name in dir(module):
            candidate = getattr(module, name)
            if isinstance(candidate, type) and name.startswith("Bnb") and hasattr(candidate, "validate_environment"):
                monkeypatch.setattr(candidate, "validate_environment", allow)


def bitsandbytes_bytes(model) -> int:
    """Bytes a bitsandbytes-quantized model holds: its parameters and buffers, plus each 4-bit weight's QuantState
    (absmax, code book) and each int8 weight's row scales (SCB), which are not parameters."""
    tensors = {}
    for module in model.modules():
        for tensor in list(module._parameters.values()) + list(module._buffers.values()):
            if tensor is not None:
                tensors[id(tensor)] = tensor
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        if state is not None:
            tensors.update({id(t): t for t in (state.absmax, state.code)})
            assert not state.nested  # the scripts' config: no double quantization
        if getattr(weight, "SCB", None) is not None:
            tensors[id(weight.SCB)] = weight.SCB
    return sum(t.numel() * t.element_size() for t in tensors.values())


def test_quantized_weight_closed_form():
    """nf4: half a byte per weight plus one fp32 absmax per 64 and the 16-value code book (0.5625 bytes per weight);
    int8: a byte per weight plus one fp32 scale per output row."""
    n = 3072 * 3072
    assert memory.quantized_weight_bytes(3072, 3072, "nf4") == n // 2 + 4 * n // 64 + 4 * 16
    assert memory.quantized_weight_bytes(3072, 3072, "int8") == n + 4 * 3072
    assert memory.quantized_weight_bytes(3, 5, "nf4", rounding=512) == 3 * 512  # three tensors, one block each
    with pytest.raises(ValueError):
        memory.quantized_weight_bytes(3, 5, "fp8")


@pytest.mark.parametrize("family, mode", [("flux", "nf4"), ("flux", "int8"), ("sdxl", "nf4")])
def test_quantized_weights_match_bitsandbytes(family, mode, quantizing_on_cpu, tiny_sdxl_base, tiny_flux_bases):
    """The estimate's resident weights of a quantized base equal (within 1 %) the bytes of the same tiny denoiser
    loaded by diffusers' own bitsandbytes quantizer, as the training scripts load it (real Params4bit / Int8Params on
    the CPU): the same layers quantized, the rest in the load dtype (train_duo.py's UNet: fp16, diffusers' default);
    likewise FLUX's T5 through transformers' quantizer (its ``wo`` layers kept unquantized)."""
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    from duo_plugin.families import quantization

    base = tiny_sdxl_base if family == "sdxl" else tiny_flux_bases[True]
    configs = memory.load_base_model_configs(base)
    load = quantization.denoiser_load_kwargs(mode, torch.bfloat16, "cpu")
    if family == "sdxl":  # train_duo.py passes no dtype
        real = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **load)
    else:
        real = FluxTransformer2DModel.from_pretrained(base, subfolder="transformer", dtype=torch.bfloat16, **load)
    assert any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in real.modules())
    settings = memory.TrainingMemorySettings(
        resolution=32, rank=4, max_sequence_length=16, quantize_base=mode, validation=False
    )
    estimate = memory.estimate_training(configs, settings, rounding=1)["training step"]
    assert relative_error(estimate.breakdown["weights"], bitsandbytes_bytes(real)) < 0.01
    with torch.device("meta"):
        full_precision = memory.build_denoiser(configs, torch.bfloat16)
    assert estimate.breakdown["weights"] < 0.7 * sum(p.numel() * 2 for p in full_precision.parameters())
    if family == "flux":
        import transformers

        # the scripts' T5 quantization (PipelineQuantizationConfig's kwargs) through transformers' own quantizer
        kwargs = quantization.text_quantization_config(mode, torch.bfloat16, ["text_encoder_2"]).quant_kwargs
        t5 = transformers.T5EncoderModel.from_pretrained(
            base,
            subfolder="text_encoder_2",
            dtype=torch.bfloat16,
            device_map={"": "cpu"},
            quantization_config=transformers.BitsAndBytesConfig(**kwargs),
        )
        with torch.device("meta"):
            encoders = memory.build_text_encoders(configs, torch.bfloat16)
            t5_estimate = memory.quantize_text_encoders(configs, encoders, mode, torch.bfloat16)["text_encoder_2"]
        estimated = sum(t.numel() * t.element_size() for t in [*t5_estimate.parameters(), *t5_estimate.buffers()])
        assert relative_error(estimated, bitsandbytes_bytes(t5)) < 0.01


@pytest.mark.parametrize(
    "family, mode, gradient_checkpointing, mixed_precision",
    [("flux", "nf4", True, "bf16"), ("flux", "int8", False, "no"), ("sdxl", "nf4", False, "bf16")],
)
def test_quantized_estimate_matches_memtracker_on_real_tensors(
    family, mode, gradient_checkpointing, mixed_precision, tiny_sdxl_base, tiny_flux_bases
):
    """The quantized layers' stand-ins (bitsandbytes' storage and allocations, on fake tensors) account the same on
    real CPU tensors, as PyTorch's MemTracker measures them."""
    configs = memory.load_base_model_configs(tiny_sdxl_base if family == "sdxl" else tiny_flux_bases[True])
    settings = memory.TrainingMemorySettings(
        resolution=32,
        mixed_precision=mixed_precision,
        rank=4,
        gradient_checkpointing=gradient_checkpointing,
        max_sequence_length=16,
        quantize_base=mode,
        validation=False,
    )
    estimate = memory.estimate_training(configs, settings, rounding=1)["training step"]
    measured = memory.measure_training_step(configs, settings)
    assert relative_error(estimate.peak_bytes, measured) < 0.10, (estimate.peak_bytes, measured)
    assert sum(estimate.breakdown.values()) == estimate.peak_bytes


def test_quantized_run_counts_the_prompt_encoding_and_the_dequantized_weights(tiny_flux_bases):
    """A quantized run encodes its prompts with the quantized denoiser already on the GPU (T5 quantized too); the
    dequantized weight of one layer at a time is a temporary of the step."""
    configs = memory.load_base_model_configs(tiny_flux_bases[True])
    settings = memory.TrainingMemorySettings(resolution=32, rank=4, max_sequence_length=16, validation=False)
    plain = memory.estimate_training(configs, settings, rounding=1)
    nf4 = memory.estimate_training(configs, memory.replace(settings, quantize_base="nf4"), rounding=1)
    assert "prompt encoding" not in plain and "prompt encoding" in nf4
    assert nf4["prompt encoding"].breakdown["weights"] > nf4["training step"].breakdown["weights"]
    assert nf4["run"].peak_bytes == max(nf4[p].peak_bytes for p in ("prompt encoding", "training step"))
    with torch.device("meta"):
        denoiser = memory.build_quantized_denoiser(configs, torch.bfloat16, "nf4")
    quantized = [m for m in denoiser.modules() if isinstance(m, memory.QuantizedLinear)]
    assert quantized and not any(type(m) is torch.nn.Linear for m in denoiser.modules())  # every linear layer


def test_quantized_layer_dequantizes_one_weight_at_a_time():
    """nf4: the forward and the backward each dequantize the layer's weight into the compute dtype, a temporary
    freed with the call; int8: the int32 product and its fp16 dequantization, and the input kept for the
    backward."""
    linear = torch.nn.Linear(128, 256, dtype=torch.bfloat16)
    for mode in ("nf4", "int8"):
        layer = memory.QuantizedLinear(linear, mode, torch.bfloat16)
        x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
        tracker = memory.AllocationTracker(rounding=1)
        with tracker:
            y = layer(x)
        output_bytes = 4 * 256 * 2
        if mode == "nf4":
            assert tracker.peak == 256 * 128 * 2 + output_bytes
            assert tracker.peak_breakdown["temporaries"] == 256 * 128 * 2
        else:
            assert tracker.peak_breakdown["temporaries"] >= 4 * 256 * (4 + 2)  # int32 product + fp16 output
        assert tracker.current["temporaries"] == 0
        tracker.reset_peak()
        with tracker:
            y.float().sum().backward()
        weight_copy = 256 * 128 * 2
        assert tracker.peak - tracker.current["activations"] >= weight_copy and x.grad.shape == x.shape


def test_sharding_divides_what_it_shards(tiny_flux_bases, tiny_sdxl_base):
    """Per GPU, 4 processes: FSDP < ZeRO-2 < one GPU < DDP (its gradient buckets); FSDP keeps the root and the
    largest unit whole; the estimate with num_processes equals the one-GPU estimate sharded."""
    for base in (tiny_flux_bases[True], tiny_sdxl_base):
        configs = memory.load_base_model_configs(base)
        settings = memory.TrainingMemorySettings(
            resolution=32, rank=4, max_sequence_length=16, gradient_checkpointing=True, use_8bit_adam=False
        )
        one = memory.estimate_training(configs, settings)
        step, layout = one["training step"], one["training step"].layout
        assert layout.num_units == {"flux": 3, "sdxl": 5}[configs.family]
        assert layout.largest_unit_frozen_bytes <= layout.denoiser_frozen_bytes - layout.root_frozen_bytes
        peaks = {s: memory.shard_estimate(step, 4, s).peak_bytes for s in memory.SHARDING_MODES}
        assert peaks["fsdp"] < peaks["zero2"] < step.peak_bytes < peaks["none"]
        fsdp = memory.shard_estimate(step, 4, "fsdp")
        sharded = layout.denoiser_frozen_bytes - layout.root_frozen_bytes
        expected_weights = -(-sharded // 4) + layout.root_frozen_bytes + layout.largest_unit_frozen_bytes
        assert fsdp.breakdown["weights"] == expected_weights and fsdp.num_processes == 4
        assert fsdp.breakdown["activations"] == step.breakdown["activations"]
        assert memory.shard_estimate(step, 1, "fsdp") is step
        four = memory.estimate_training(configs, memory.replace(settings, num_processes=4, sharding="fsdp"))
        assert four["training step"].peak_bytes == fsdp.peak_bytes
        assert four["run"].peak_bytes < one["run"].peak_bytes


def test_settings_follow_the_launch_environment(tiny_flux_bases, monkeypatch):
    """The start-up check reads --quantize_base and the launcher's environment (WORLD_SIZE; accelerate's FSDP and
    DeepSpeed variables) before any Accelerator exists."""
    for name in ("WORLD_SIZE", "ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_ZERO_STAGE"):
        monkeypatch.delenv(name, raising=False)
    args = training_args(tiny_flux_bases[True], quantize_base="nf4")
    settings = memory.settings_from_args(args, "flux")
    assert (settings.quantize_base, settings.num_processes, settings.sharding) == ("nf4", 1, "none")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert memory.settings_from_args(args, "flux").num_processes == 4
    assert memory.settings_from_args(args, "flux").sharding == "fsdp"
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2")
    assert memory.settings_from_args(args, "flux").sharding == "zero2"
    assert memory.sharding_of(types.SimpleNamespace(distributed_type="DistributedType.FSDP")) == "fsdp"
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED")
    assert memory.settings_from_args(training_args(tiny_flux_bases[True]), "flux").sharding == "none"  # DDP


def test_start_up_check_uses_quantize_base_and_the_process_count(tiny_flux_bases, monkeypatch):
    base = tiny_flux_bases[True]
    configs = memory.load_base_model_configs(base)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * memory.GiB, 80 * memory.GiB))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    # every memory flag on (8-bit Adam: no torch AdamW step asking CUDA for its stream), so a refusal tries none
    flags = {
        "max_sequence_length": 16,
        "mixed_precision": "bf16",
        "gradient_checkpointing": True,
        "use_8bit_adam": True,
        "skip_validation": True,
    }
    args = training_args(base, quantize_base="nf4", **flags)
    estimate = memory.check_training_memory(args, "flux")
    expected = memory.TrainingMemorySettings(
        resolution=32,
        mixed_precision="bf16",
        rank=4,
        lora_target="attn",
        gradient_checkpointing=True,
        use_8bit_adam=True,
        max_sequence_length=16,
        validation=False,
        quantize_base="nf4",
        num_processes=2,
        sharding="fsdp",
    )
    assert estimate.peak_bytes == memory.estimate_training(configs, expected)["run"].peak_bytes
    assert memory.check_training_memory(training_args(base, **flags), "flux").peak_bytes != estimate.peak_bytes
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (estimate.peak_bytes // 8, 80 * memory.GiB))
    with pytest.raises(UsageError, match=r"per GPU of 2 \(FSDP\).*lower --resolution"):
        memory.check_training_memory(args, "flux")


def test_cli_accepts_quantization_and_process_flags(tiny_flux_bases, capsys):
    rows = memory.main(
        [
            "--pretrained_model_name_or_path",
            tiny_flux_bases[True],
            "--resolution",
            "32",
            "--rank",
            "4",
            "--max_sequence_length",
            "16",
            "--quantize_base",
            "nf4",
            "--num_processes",
            "4",
            "--sharding",
            "fsdp",
        ]
    )
    out = capsys.readouterr().out
    assert "quantized to nf4" in out and "one GPU of 4 (FSDP)" in out and "prompt encoding" in out
    assert len(rows) == 7
    step = dict(rows)["training step, your flags"]
    assert step.num_processes == 4 and step.sharding == "fsdp"
    with pytest.raises(SystemExit):
        memory.main(["--pretrained_model_name_or_path", tiny_flux_bases[True], "--sharding", "zero3"])
    with pytest.raises(SystemExit):
        memory.main(["--pretrained_model_name_or_path", tiny_flux_bases[True], "--num_processes", "0"])
