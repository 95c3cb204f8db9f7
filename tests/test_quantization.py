"""``--quantize_base nf4|int8``: the frozen denoiser (and T5) loaded quantized by bitsandbytes, the LoRA in full
precision.

What runs here, exactly: diffusers' and transformers' own bitsandbytes quantizers, and bitsandbytes' CPU kernels
(bitsandbytes 0.49+ quantizes and multiplies NF4 and int8 weights on the CPU). Both libraries refuse to quantize
without a GPU as a precaution; the ``quantizing_on_cpu`` fixture lifts only that check, nothing else. The CUDA
kernels themselves are not exercised (no GPU here).
"""

import json

import pytest
import torch
from conftest import tiny_train_args, train_in_process
from safetensors.torch import load_file

from duo_plugin import step
from duo_plugin.families import quantization


SCRIPTS = {"flux": "train_duo_flux.py", "sd3": "train_duo_sd3.py"}
BNB_LAYERS = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}


@pytest.fixture
def quantizing_on_cpu(monkeypatch):
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


def train_quantized(family, model, pairs, output_dir, mode, monkeypatch):
    """Train 4 steps (λ 0, a large rate, so the adapter moves) and return the module kinds the loss saw."""
    seen = {}
    losses = step.duo_losses

    def spy(accelerator, denoiser, predict, batch, settings):
        seen["modules"] = {type(module).__name__ for module in accelerator.unwrap_model(denoiser).modules()}
        return losses(accelerator, denoiser, predict, batch, settings)

    monkeypatch.setattr(step, "duo_losses", spy)
    argv = tiny_train_args(model, pairs, output_dir, "--max_sequence_length", "16", "--quantize_base", mode)
    argv += ["--skip_validation", "--preservation_weight", "0", "--learning_rate", "1e-2"]
    train_in_process(SCRIPTS[family], argv)
    return seen["modules"]


@pytest.mark.parametrize("family, mode", [("flux", "nf4"), ("flux", "int8"), ("sd3", "nf4")])
def test_trains_a_full_precision_adapter_on_a_quantized_base(
    family, mode, quantizing_on_cpu, request, tiny_pairs, tmp_path, monkeypatch
):
    from diffusers import DiffusionPipeline

    model = request.getfixturevalue(f"tiny_{family}")
    output_dir = tmp_path / "out"
    modules = train_quantized(family, model, tiny_pairs, output_dir, mode, monkeypatch)
    # The base the loss ran on (with and without the adapter) holds bitsandbytes layers, under LoRA.
    assert BNB_LAYERS[mode] in modules and "LoraModel" not in modules
    config = json.loads((output_dir / "duo_config.json").read_text())
    assert config["quantized_base"]["mode"] == mode and config["quantized_base"]["method"] == "bitsandbytes"
    assert f"quantized to {mode}" in (output_dir / "README.md").read_text()
    weights = load_file(output_dir / "pytorch_lora_weights.safetensors")
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())
    assert max(tensor.abs().max().item() for key, tensor in weights.items() if ".up." in key or "lora_B" in key) > 0

    # The adapter loads on the full-precision base like any LoRA and changes its images.
    pipe = DiffusionPipeline.from_pretrained(model)

    def sample():
        return pipe(
            "a red square",
            num_inference_steps=2,
            height=32,
            width=32,
            max_sequence_length=16,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images

    base = sample()
    pipe.load_lora_weights(str(output_dir))
    assert abs(sample() - base).max() > 1e-4


def test_t5_is_quantized_with_the_denoiser(quantizing_on_cpu, tiny_flux, tiny_pairs, tmp_path, monkeypatch):
    from duo_plugin.families import flux

    placed = {}

    def spy(module, device, dtype=None):
        placed[type(module).__name__] = {type(m).__name__ for m in module.modules()}
        return quantization.to_device(module, device, dtype)

    monkeypatch.setattr(flux, "to_device", spy)
    train_quantized("flux", tiny_flux, tiny_pairs, tmp_path / "out", "nf4", monkeypatch)
    assert "Linear4bit" in placed["T5EncoderModel"]


def test_without_a_gpu_the_refusal_is_one_line(tiny_flux, tiny_pairs, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(
            "train_duo_flux.py",
            tiny_train_args(
                tiny_flux, tiny_pairs, tmp_path / "o", "--max_sequence_length", "16", "--quantize_base", "nf4"
            ),
        )
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--quantize_base nf4 needs a CUDA GPU" in line


def test_load_arguments():
    assert quantization.denoiser_load_kwargs("none", torch.bfloat16, "cuda:1") == {}
    nf4 = quantization.denoiser_load_kwargs("nf4", torch.bfloat16, "cuda:1")
    assert nf4["device_map"] == {"": "cuda:1"}
    config = nf4["quantization_config"]
    assert (
        config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype == torch.bfloat16
    )
    assert quantization.denoiser_load_kwargs("int8", torch.float16, "cuda:0")["quantization_config"].load_in_8bit
    assert quantization.text_quantization_config("none", torch.bfloat16, ["text_encoder_2"]) is None
    assert quantization.text_quantization_config("nf4", torch.bfloat16, []) is None
    assert quantization.quantization_record("none") is None
