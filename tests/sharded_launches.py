"""What the sharded tests share (tests/test_sharded.py, tests/test_deepspeed.py): two-process launches under FSDP2 and
DeepSpeed ZeRO-2 on CPU and what they are compared with (a DDP run of the same seed), and the pieces of the in-process
tests (a one-process gloo group, a tiny adapted UNet, DUO-ordered steps, the accelerator a ShardedState reads).

accelerate sets FSDP and DeepSpeed up only on accelerators: on CPU processes it runs DDP instead (the scripts say so
in a warning). The launches therefore go through a small entry script (``ENTRIES``) that lets accelerate's FSDP2 (or
DeepSpeed) code path run on CPU tensors with gloo, then runs the training script unchanged.
"""

import contextlib
import json
import os
import sys
import tempfile
from types import SimpleNamespace

import numpy as np
import torch
from conftest import DDP_CHECKPOINT_FILES, REPO_ROOT, run_process, run_script, sample_red_square, tiny_train_args
from PIL import Image
from safetensors.torch import load_file

from duo_plugin import lora


FSDP_CONFIG_FILE = os.path.join(REPO_ROOT, "examples", "multi_gpu", "accelerate_fsdp.yaml")
ZERO2_CONFIG_FILE = os.path.join(REPO_ROOT, "examples", "multi_gpu", "deepspeed_zero2.yaml")
SHARDED_MARKER = "test entry: sharded run on CPU processes"

ENTRIES = {
    "fsdp": f'''
import os, runpy, sys
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def __init__(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    # accelerate keeps MULTI_CPU when no accelerator is found; FSDP2 itself runs on CPU tensors with gloo.
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        print("{SHARDED_MARKER}", flush=True)


AcceleratorState.__init__ = __init__
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
''',
    "deepspeed": f'''
import os, runpy, sys
import accelerate
from accelerate.utils import InitProcessGroupKwargs

_init = accelerate.Accelerator.__init__


def __init__(self, *args, cpu=False, kwargs_handlers=None, **kwargs):
    # DeepSpeed is set up only without cpu=True, and on CPU accelerate must be told the backend.
    handlers = [*(kwargs_handlers or []), InitProcessGroupKwargs(backend="gloo")]
    _init(self, *args, cpu=False, kwargs_handlers=handlers, **kwargs)
    print("{SHARDED_MARKER}", flush=True)


accelerate.Accelerator.__init__ = __init__
script, sys.argv = sys.argv[1], sys.argv[1:]
sys.path.insert(0, os.path.dirname(script))
runpy.run_path(script, run_name="__main__")
''',
}

# One optimizer step moves every LoRA weight by up to the learning rate (AdamW normalises the gradient), and the
# runs compared here train at 1e-3. The sharded run all-gathers and reduce-scatters where DDP all-reduces, and its
# matmuls read parameters from other buffers: its gradients differ from DDP's in the last bits, and AdamW turns a
# gradient that is itself at rounding level (|g| ~ eps, the lora_A weights on the step after lora_B leaves zero)
# into a step of up to the learning rate. Measured: ≤ 4e-6 over 4 steps (≤ 3e-11 after one step). A shard that was
# lost or kept from an older step is off by whole steps (≥ 1e-3 here), 100 times the tolerance.
TOLERANCE = 1e-5
LEARNING_RATE = "1e-3"


def sharded_launch(kind, script, args, tmp_path, num_processes=2, env=None):
    """``accelerate launch --config_file <FSDP or ZeRO-2 config>`` of a training script on CPU processes."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    entry = tmp_path / f"{kind}_on_cpu.py"
    entry.write_text(ENTRIES[kind])
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        FSDP_CONFIG_FILE if kind == "fsdp" else ZERO2_CONFIG_FILE,
        "--num_processes",
        str(num_processes),
        "--mixed_precision",
        "no",
        "--main_process_port",
        "0",
        str(entry),
        os.path.join(REPO_ROOT, script),
        *map(str, args),
    ]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    result = run_process(command, env=full_env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-6000:]
    log = result.stdout + result.stderr
    assert log.count(SHARDED_MARKER) == num_processes, log[-3000:]
    assert "was asked for but accelerate set up" not in log
    return log


def run_args(model, pairs, output_dir, *extra):
    """4 optimizer steps of one pair per process, a checkpoint at step 2; no preservation term (its λ = 5e6 times
    a difference of two nearly equal outputs makes fp32 rounding, not sharding, decide the later steps)."""
    return tiny_train_args(
        model,
        pairs,
        output_dir,
        "--train_batch_size",
        "1",
        "--checkpointing_steps",
        "2",
        "--learning_rate",
        LEARNING_RATE,
        "--preservation_weight",
        "0",
        *extra,
    )


def read_metrics(output_dir):
    with open(os.path.join(output_dir, "logs", "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def adapter(folder):
    return load_file(os.path.join(folder, lora.LORA_WEIGHT_NAME))


def optimizer_state(folder):
    return torch.load(os.path.join(folder, "optimizer.bin"), weights_only=True)


def assert_adapters_close(actual, expected, atol):
    assert actual.keys() == expected.keys()
    for key in expected:
        assert actual[key].shape == expected[key].shape, key
        torch.testing.assert_close(actual[key], expected[key], atol=atol, rtol=0, msg=key)


def loaded_adapter(denoiser, prefix):
    """The weights ``load_lora_weights`` put into ``denoiser``, under the file's names."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    (name,) = denoiser.peft_config
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name=name))
    return {f"{prefix}.{key}": value for key, value in state.items()}


def assert_bit_equal(actual, expected):
    assert actual.keys() == expected.keys()
    assert all(torch.equal(actual[key], expected[key]) for key in expected)


def assert_optimizer_states_close(actual, expected):
    """Optimizer states by position: the same steps; moments compared relative to the largest value of each tensor
    (the rounding argument of ``TOLERANCE``)."""
    assert actual["state"].keys() == expected["state"].keys()
    for position, values in expected["state"].items():
        assert actual["state"][position].keys() == values.keys()
        assert torch.equal(actual["state"][position]["step"], values["step"])
        for name in ("exp_avg", "exp_avg_sq"):
            scale = values[name].abs().max().item()
            torch.testing.assert_close(actual["state"][position][name], values[name], rtol=0, atol=1e-3 * scale)


def ddp_launch(model, pairs, output_dir):
    """The reference: two CPU processes under DDP, validation at step 2 and at the end."""
    result = run_script("train_duo.py", run_args(model, pairs, output_dir, "--validation_steps", "2"), num_processes=2)
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir


def resume_launch(kind, checkpoint, model, pairs, tmp, *extra, script="train_duo.py"):
    """A fresh output folder holding only ``checkpoint``, resumed from it under ``kind``; returns the folder."""
    import shutil

    output_dir = tmp / "out"
    output_dir.mkdir(parents=True)
    shutil.copytree(checkpoint, output_dir / os.path.basename(checkpoint))
    extra = extra or ("--skip_validation",)
    log = sharded_launch(
        kind, script, run_args(model, pairs, output_dir, *extra, "--resume_from_checkpoint", "latest"), tmp
    )
    assert "Resuming from" in log
    return output_dir


def check_sharded_run_against_ddp(output_dir, log, ddp_dir):
    """What a sharded run of ``run_args`` (validation every 2 steps) must equal in the DDP run of the same seed."""
    assert log.count("Saved the DUO adapter") == 1
    # The validation grids and card samples are the unsharded run's images.
    samples = sorted(os.listdir(output_dir / "samples"))
    assert samples == sorted(os.listdir(ddp_dir / "samples")) and samples
    for image in ["validation/step-000002.png", "validation/step-000004.png"] + [f"samples/{n}" for n in samples]:
        sharded_image = np.asarray(Image.open(output_dir / image), dtype=np.float64)
        ddp_image = np.asarray(Image.open(ddp_dir / image), dtype=np.float64)
        assert sharded_image.shape == ddp_image.shape and np.abs(sharded_image - ddp_image).mean() < 0.5, image
    assert [r["step"] for r in read_metrics(output_dir)] == [1, 2, 3, 4]
    # The adapter-only layout of a DDP checkpoint: no model weights, no per-rank optimizer files.
    assert (
        sorted(os.listdir(output_dir / "checkpoint-2"))
        == sorted(os.listdir(ddp_dir / "checkpoint-2"))
        == DDP_CHECKPOINT_FILES
    )
    # Rank divergence: the checkpoint and the final adapter equal the DDP run's, every tensor whole.
    for folder in ("checkpoint-2", "."):
        assert_adapters_close(adapter(output_dir / folder), adapter(ddp_dir / folder), atol=TOLERANCE)
    sharded, unsharded = optimizer_state(output_dir / "checkpoint-2"), optimizer_state(ddp_dir / "checkpoint-2")
    assert sharded["param_groups"] == unsharded["param_groups"]
    assert_optimizer_states_close(sharded, unsharded)
    # Every row of every weight (the second process's slices too) moved between the checkpoint and the end by far
    # more than the tolerance.
    start, end = adapter(output_dir / "checkpoint-2"), adapter(output_dir)
    for key in end:
        moved = (end[key] - start[key]).abs().flatten(1).amax(dim=1)
        assert moved.min().item() > 20 * TOLERANCE, key


def stock_diffusers_adapter(family, model_dir, adapter_dir):
    """The adapter stock diffusers loads from ``adapter_dir`` (``load_lora_weights``), under the file's names; for
    SD its outputs change."""
    import diffusers

    pipeline_class = {
        "sd": diffusers.StableDiffusionPipeline,
        "sd3": diffusers.StableDiffusion3Pipeline,
        "flux": diffusers.FluxPipeline,
    }[family]
    pipe = pipeline_class.from_pretrained(model_dir, **({"safety_checker": None} if family == "sd" else {}))
    if family == "sd":
        base = sample_red_square(pipe)
        pipe.load_lora_weights(str(adapter_dir))
        assert np.abs(sample_red_square(pipe) - base).max() > 1e-3
        return loaded_adapter(pipe.unet, "unet")
    pipe.load_lora_weights(str(adapter_dir))
    return loaded_adapter(pipe.transformer, "transformer")


# --------------------------------------------------------------------------------------------------
# In process: one gloo process, a tiny adapted UNet, steps in DUO's order
# --------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def one_gloo_process():
    """A one-process gloo group for this process (skipped where one exists already), destroyed afterwards."""
    import pytest
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(folder, "store"), 1), rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def adapted_unet(model_dir, seed=0):
    """The tiny UNet with a rank-4 DUO adapter on its self-attention, its LoRA weights drawn from ``seed``."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet").requires_grad_(False)
    flags = SimpleNamespace(
        enable_xformers_memory_efficient_attention=False,
        gradient_checkpointing=False,
        allow_tf32=False,
        lora_target="self_attn",
        rank=4,
        lora_alpha=4,
    )
    torch.manual_seed(seed)
    lora.prepare_denoiser_for_training(flags, unet)
    return unet


def unet_inputs(seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 16, 16, generator=generator).to(dtype),
        torch.tensor([10, 500]),
        torch.randn(2, 4, 32, generator=generator).to(dtype),
    )


def duo_ordered_loss(unet, forward, inputs):
    """DUO's order: the reference forward with the adapter off and no grad, then the adapted forward through
    ``forward`` (the engine, where one wraps ``unet``); a loss that trains the adapter."""
    with torch.no_grad(), lora.adapters_disabled(unet):
        reference = unet(*inputs).sample.float()
    prediction = forward(*inputs).sample.float()
    return ((prediction - reference) ** 2 + prediction**2).mean()


def checkpoint_accelerator():
    """What ``ShardedState`` reads of the accelerator in a one-process test."""
    return SimpleNamespace(
        is_main_process=True,
        process_index=0,
        step=0,
        scaler=None,
        project_configuration=SimpleNamespace(save_on_each_node=False),
    )
