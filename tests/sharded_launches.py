"""Two-process launches under FSDP2 and DeepSpeed ZeRO-2 on CPU, and what they are compared with: a DDP run of the
same seed (tests/test_sharded.py, tests/test_deepspeed.py).

accelerate sets FSDP and DeepSpeed up only on accelerators: on CPU processes it runs DDP instead (the scripts say so
in a warning). The launches therefore go through a small entry script (``ENTRIES``) that lets accelerate's FSDP2 (or
DeepSpeed) code path run on CPU tensors with gloo, then runs the training script unchanged.
"""

import json
import os
import sys

import numpy as np
import torch
from conftest import REPO_ROOT, run_process, run_script, tiny_train_args
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
        == [
            "duo_checkpoint.json",
            "optimizer.bin",
            "pytorch_lora_weights.safetensors",
            "random_states_0.pkl",
            "random_states_1.pkl",
            "scheduler.bin",
        ]
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

        def sample():
            return pipe(
                "a red square", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
            ).images

        base = sample()
        pipe.load_lora_weights(str(adapter_dir))
        assert np.abs(sample() - base).max() > 1e-3
        return loaded_adapter(pipe.unet, "unet")
    pipe.load_lora_weights(str(adapter_dir))
    return loaded_adapter(pipe.transformer, "transformer")
