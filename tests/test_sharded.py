"""Sharded training: FSDP2 (and DeepSpeed ZeRO-2 where DeepSpeed is installed).

The checkpoints of an FSDP run hold the adapter and its optimizer state gathered from every process, in the layout
and format a DDP run writes; the final adapter is gathered the same way. The fast tests run FSDP2 in this process on
a one-process gloo group (the parameters become DTensors all the same); the slow ones launch two CPU processes.

accelerate sets FSDP and DeepSpeed up only on accelerators: on CPU processes it runs DDP instead (the scripts say so
in a warning). The launches here therefore go through a small entry script (``ENTRIES``) that lets accelerate's
FSDP2 (or DeepSpeed) code path run on CPU tensors with gloo, then runs the training script unchanged.
"""

import json
import os
import shutil
import sys
import tempfile
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, run_process, run_script, tiny_train_args
from PIL import Image
from safetensors.torch import load_file

from duo_plugin import checkpoints, lora
from duo_plugin.errors import UsageError


FSDP_CONFIG = os.path.join(REPO_ROOT, "examples", "multi_gpu", "accelerate_fsdp.yaml")
ZERO2_CONFIG = os.path.join(REPO_ROOT, "examples", "multi_gpu", "deepspeed_zero2.yaml")
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
        FSDP_CONFIG if kind == "fsdp" else ZERO2_CONFIG,
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


# --------------------------------------------------------------------------------------------------
# Fast: FSDP2 in this process (one gloo process, so the adapter is made of DTensors), the formats, the refusals
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process_group():
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("gloo", store=dist.FileStore(os.path.join(folder, "store"), 1), rank=0, world_size=1)
        try:
            from torch.distributed.device_mesh import init_device_mesh

            yield init_device_mesh("cpu", (1,))
        finally:
            dist.destroy_process_group()


def adapted_unet(model_dir, seed=0):
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


def shard(unet, mesh, blocks=True):
    """FSDP2 as accelerate applies it: each transformer block, then the root (``blocks=False``: the root only)."""
    from torch.distributed.fsdp import fully_shard

    if blocks:
        for module in list(unet.modules()):
            if type(module).__name__ == "BasicTransformerBlock":
                fully_shard(module, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    return unet


def unet_inputs(seed=0):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 16, 16, generator=generator),
        torch.tensor([10, 500]),
        torch.randn(2, 4, 32, generator=generator),
    )


def train_steps(unet, optimizer, steps=2):
    """DUO's order: the reference forward with the adapter off and no grad, then the adapted forward."""
    for step in range(steps):
        x, t, context = unet_inputs(step)
        with torch.no_grad(), lora.adapters_disabled(unet):
            reference = unet(x, t, context).sample
        prediction = unet(x, t, context).sample
        ((prediction - reference) ** 2 + prediction**2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_the_gathered_adapter_is_the_unsharded_one(one_process_group, tiny_sd):
    plain = adapted_unet(tiny_sd)
    sharded = shard(adapted_unet(tiny_sd), one_process_group)
    assert not lora.lora_is_sharded(plain) and lora.lora_is_sharded(sharded)
    assert_bit_equal(lora.gather_lora_state_dict(sharded), lora.lora_state_dict(plain))
    # Unsharded, gathering is the plain state dict: nothing changes for single-process and DDP runs.
    assert_bit_equal(lora.gather_lora_state_dict(plain), lora.lora_state_dict(plain))


@pytest.mark.parametrize("blocks", [True, False], ids=["blocks", "root-only"])
def test_the_reference_pass_leaves_the_sharded_adapter_trainable(one_process_group, tiny_sd, blocks):
    """peft switches requires_grad on the parameters registered when it is called: with the adapter in FSDP2's root
    group, those are the shards going in and the all-gathered copies coming out, so the shards stayed frozen."""
    unet = shard(adapted_unet(tiny_sd), one_process_group, blocks=blocks)
    trainable = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    before = {k: v.clone() for k, v in lora.gather_lora_state_dict(unet).items()}
    train_steps(unet, optimizer)
    assert all(p.requires_grad for p in trainable)
    assert [p for p in unet.parameters() if p.requires_grad] == trainable
    after = lora.gather_lora_state_dict(unet)
    assert all(not torch.equal(after[key], before[key]) for key in before)


def test_a_sharded_adapter_is_written_once_and_read_back_into_every_shard(one_process_group, tiny_sd, tmp_path):
    from duo_plugin.families import sd

    trained = shard(adapted_unet(tiny_sd), one_process_group)
    train_steps(trained, torch.optim.AdamW([p for p in trained.parameters() if p.requires_grad], lr=1e-3))
    saved = []

    def save(folder, state, model):
        saved.append(folder)
        sd.save_lora_weights(folder, state, model)

    for main in (False, True):
        accelerator = SimpleNamespace(is_main_process=main, unwrap_model=lambda m: m, distributed_type=None)
        accelerator.register_save_state_pre_hook = lambda hook: setattr(accelerator, "save_hook", hook)
        accelerator.register_load_state_pre_hook = lambda hook: setattr(accelerator, "load_hook", hook)
        checkpoints.register_adapter_state_hooks(accelerator, trained, save, lora_prefix="unet")
        accelerator.save_hook([trained], [{}], str(tmp_path / f"main-{main}"))
    assert saved == [str(tmp_path / "main-True")]

    expected = lora.gather_lora_state_dict(trained)
    assert_bit_equal({f"unet.{k}": v for k, v in expected.items()}, adapter(saved[0]))
    fresh = shard(adapted_unet(tiny_sd, seed=1), one_process_group)
    assert not any(torch.equal(v, expected[k]) for k, v in lora.gather_lora_state_dict(fresh).items())
    lora.load_lora_state_dict(fresh, saved[0], "unet")
    assert_bit_equal(lora.gather_lora_state_dict(fresh), expected)


def test_a_sharded_checkpoint_round_trips_in_the_unsharded_format(
    one_process_group, tiny_sd, tmp_path, fresh_accelerate_state
):
    """ShardedState writes what a DDP checkpoint holds (optimizer.bin in the unsharded optimizer's own format) and
    restores the adapter, the optimizer and the LR schedule exactly."""
    from accelerate.state import PartialState
    from diffusers.optimization import get_scheduler

    from duo_plugin.families import sd

    PartialState()

    def run_state(unet):
        optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
        scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=2, num_training_steps=10)
        accelerator = SimpleNamespace(
            is_main_process=True,
            process_index=0,
            step=0,
            scaler=None,
            project_configuration=SimpleNamespace(save_on_each_node=False),
        )
        return checkpoints.ShardedState(accelerator, unet, optimizer, scheduler, sd.save_lora_weights, "unet")

    plain = adapted_unet(tiny_sd)
    plain_state = run_state(plain)
    sharded = shard(adapted_unet(tiny_sd), one_process_group)
    state = run_state(sharded)
    for current in (plain_state, state):
        train_steps(current.model, current.optimizer, steps=3)
        for _ in range(3):
            current.lr_scheduler.step()
    state.save(str(tmp_path / "checkpoint-3"))
    assert sorted(os.listdir(tmp_path / "checkpoint-3")) == [
        "optimizer.bin",
        "pytorch_lora_weights.safetensors",
        "random_states_0.pkl",
        "scheduler.bin",
    ]
    # The format the unsharded optimizer writes (positions, not names; every tensor whole), holding the values of
    # the sharded optimizer's slices.
    written, unsharded = optimizer_state(tmp_path / "checkpoint-3"), plain_state.optimizer.state_dict()
    assert written["param_groups"] == unsharded["param_groups"]
    own = state.optimizer.state_dict()["state"]
    assert written["state"].keys() == unsharded["state"].keys() == own.keys()
    for position, values in unsharded["state"].items():
        assert written["state"][position].keys() == values.keys()
        for name, value in values.items():
            assert written["state"][position][name].shape == value.shape
            mine = own[position][name]
            assert torch.equal(written["state"][position][name], mine.full_tensor() if name != "step" else mine)

    resumed = run_state(shard(adapted_unet(tiny_sd, seed=1), one_process_group))
    resumed.load(str(tmp_path / "checkpoint-3"))
    assert_bit_equal(lora.gather_lora_state_dict(resumed.model), lora.gather_lora_state_dict(sharded))
    assert resumed.lr_scheduler.state_dict() == state.lr_scheduler.state_dict()
    for current in (resumed, state):
        train_steps(current.model, current.optimizer, steps=2)
    assert_bit_equal(lora.gather_lora_state_dict(resumed.model), lora.gather_lora_state_dict(sharded))


def test_optimizer_state_names_and_positions_convert_both_ways():
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    model[0].bias.requires_grad_(False)
    optimizer = torch.optim.AdamW(
        [{"params": [model[0].weight]}, {"params": [model[2].weight, model[2].bias], "lr": 0.5}], lr=0.1
    )
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    by_name = get_optimizer_state_dict(model, optimizer)
    assert by_name["param_groups"][1]["params"] == ["2.weight", "2.bias"]
    by_index = checkpoints.optimizer_state_by_index(by_name)
    assert by_index == optimizer.state_dict()
    assert checkpoints.optimizer_state_by_name(by_index, ["0.weight", "2.weight", "2.bias"]) == by_name
    with pytest.raises(ValueError, match="optimizer state of 3 adapter weights, this run has 2"):
        checkpoints.optimizer_state_by_name(by_index, ["0.weight", "2.weight"])


def fake_accelerator(kind, **state):
    from accelerate.utils import DistributedType

    return SimpleNamespace(
        distributed_type=getattr(DistributedType, kind),
        is_main_process=True,
        state=SimpleNamespace(**state),
        wait_for_everyone=lambda: None,
        save_state=lambda folder: pytest.fail("accelerate's save_state would write the whole sharded model"),
        load_state=lambda folder: pytest.fail("accelerate's load_state under FSDP"),
    )


def test_sharded_setups_whose_adapter_cannot_be_gathered_are_refused(monkeypatch, caplog):
    fsdp1 = fake_accelerator("FSDP", fsdp_plugin=SimpleNamespace(fsdp_version=1))
    with pytest.raises(UsageError, match="FSDP version 1 is not supported.*fsdp_version: 2"):
        checkpoints.check_sharding(fsdp1)
    zero3 = fake_accelerator("DEEPSPEED", deepspeed_plugin=SimpleNamespace(zero_stage=3))
    with pytest.raises(UsageError, match="ZeRO stage 3 is not supported.*would be saved empty"):
        checkpoints.check_sharding(zero3)
    checkpoints.check_sharding(fake_accelerator("FSDP", fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    checkpoints.check_sharding(fake_accelerator("DEEPSPEED", deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    # On CPU processes accelerate sets up DDP whatever the launch asked for: said, not refused.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level("WARNING", logger="duo_plugin.checkpoints"):
        checkpoints.check_sharding(fake_accelerator("MULTI_CPU"))
    assert "FSDP was asked for but accelerate set up" in caplog.text


def test_fsdp_checkpoints_never_fall_back_to_accelerates_whole_model_save(tmp_path):
    accelerator = fake_accelerator("FSDP")
    with pytest.raises(ValueError, match="save_checkpoint needs the run's ShardedState"):
        checkpoints.save_checkpoint(accelerator, str(tmp_path), 2, None, {})
    with pytest.raises(ValueError, match="load_checkpoint needs the run's ShardedState"):
        checkpoints.load_checkpoint(accelerator, str(tmp_path / "checkpoint-2"))
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------------------------------
# Slow: two CPU processes under FSDP2 (and DeepSpeed ZeRO-2), compared with two under DDP
# --------------------------------------------------------------------------------------------------


def test_under_fsdp_the_denoiser_waits_in_host_memory_for_its_shards():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from duo_plugin.training import denoiser_home

    gpu = torch.device("cuda", 1)  # never touched: only the choice is under test
    assert denoiser_home(SimpleNamespace(distributed_type=DistributedType.FSDP, device=gpu)) == torch.device("cpu")
    assert denoiser_home(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU, device=gpu)) == gpu


@pytest.fixture(scope="module")
def fsdp_run(tiny_sd, tiny_pairs, tmp_path_factory):
    """Validation at step 2 and the model card's samples: every process samples the sharded model."""
    tmp = tmp_path_factory.mktemp("fsdp")
    log = sharded_launch(
        "fsdp", "train_duo.py", run_args(tiny_sd, tiny_pairs, tmp / "out", "--validation_steps", "2"), tmp
    )
    return tmp / "out", log


@pytest.fixture(scope="module")
def ddp_run(tiny_sd, tiny_pairs, tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("ddp") / "out"
    result = run_script(
        "train_duo.py", run_args(tiny_sd, tiny_pairs, output_dir, "--validation_steps", "2"), num_processes=2
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return output_dir


def resume_under_fsdp(checkpoint, tiny_sd, tiny_pairs, tmp):
    output_dir = tmp / "out"
    output_dir.mkdir(parents=True)
    shutil.copytree(checkpoint, output_dir / os.path.basename(checkpoint))
    args = run_args(tiny_sd, tiny_pairs, output_dir, "--skip_validation", "--resume_from_checkpoint", "latest")
    log = sharded_launch("fsdp", "train_duo.py", args, tmp)
    assert "Resuming from" in log
    return output_dir


@pytest.mark.slow
def test_fsdp_trains_and_writes_once_what_ddp_writes(fsdp_run, ddp_run):
    output_dir, log = fsdp_run
    assert log.count("Saved the DUO adapter") == 1
    # The sharded model's validation grid and card samples are the unsharded run's images.
    samples = sorted(os.listdir(output_dir / "samples"))
    assert samples == sorted(os.listdir(ddp_run / "samples")) and samples
    for image in ["validation/step-000002.png", "validation/step-000004.png"] + [f"samples/{n}" for n in samples]:
        fsdp_image = np.asarray(Image.open(output_dir / image), dtype=np.float64)
        ddp_image = np.asarray(Image.open(ddp_run / image), dtype=np.float64)
        assert fsdp_image.shape == ddp_image.shape and np.abs(fsdp_image - ddp_image).mean() < 0.5, image
    assert [r["step"] for r in read_metrics(output_dir)] == [1, 2, 3, 4]
    # The adapter-only layout of a DDP checkpoint: no sharded model, no per-rank optimizer files.
    assert (
        sorted(os.listdir(output_dir / "checkpoint-2"))
        == sorted(os.listdir(ddp_run / "checkpoint-2"))
        == [
            "duo_checkpoint.json",
            "optimizer.bin",
            "pytorch_lora_weights.safetensors",
            "random_states_0.pkl",
            "random_states_1.pkl",
            "scheduler.bin",
        ]
    )


@pytest.mark.slow
def test_fsdp_adapter_and_optimizer_state_are_the_unsharded_runs(fsdp_run, ddp_run):
    """Rank divergence: the FSDP run's checkpoint and final adapter equal those of a DDP run with the same seed,
    every tensor whole, and the rows rank 1 held (the second half of each weight) trained like the others."""
    output_dir, _ = fsdp_run
    for folder in ("checkpoint-2", "."):
        assert_adapters_close(adapter(output_dir / folder), adapter(ddp_run / folder), atol=TOLERANCE)
    sharded, unsharded = optimizer_state(output_dir / "checkpoint-2"), optimizer_state(ddp_run / "checkpoint-2")
    assert sharded["param_groups"] == unsharded["param_groups"]
    assert sharded["state"].keys() == unsharded["state"].keys()
    for position, values in unsharded["state"].items():
        assert torch.equal(sharded["state"][position]["step"], values["step"])
        for name in ("exp_avg", "exp_avg_sq"):
            # Moments of gradients: compared relative to the largest of each tensor (same rounding argument).
            scale = values[name].abs().max().item()
            torch.testing.assert_close(sharded["state"][position][name], values[name], rtol=0, atol=1e-3 * scale)
    # Every row of every weight moved between the checkpoint and the end by far more than the tolerance.
    start, end = adapter(output_dir / "checkpoint-2"), adapter(output_dir)
    for key in end:
        moved = (end[key] - start[key]).abs().flatten(1).amax(dim=1)
        assert moved.min().item() > 20 * TOLERANCE, key


@pytest.mark.slow
def test_fsdp_resume_is_bit_exact(fsdp_run, tiny_sd, tiny_pairs, tmp_path):
    output_dir, _ = fsdp_run
    resumed = resume_under_fsdp(output_dir / "checkpoint-2", tiny_sd, tiny_pairs, tmp_path)
    assert_bit_equal(adapter(resumed), adapter(output_dir))
    assert read_metrics(resumed) == read_metrics(output_dir)[2:]


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_under_fsdp(ddp_run, tiny_sd, tiny_pairs, tmp_path):
    resumed = resume_under_fsdp(ddp_run / "checkpoint-2", tiny_sd, tiny_pairs, tmp_path)
    assert_adapters_close(adapter(resumed), adapter(ddp_run), atol=TOLERANCE)


@pytest.mark.slow
def test_the_fsdp_adapter_loads_in_stock_diffusers(fsdp_run, tiny_sd):
    from diffusers import StableDiffusionPipeline

    output_dir, _ = fsdp_run
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)

    def sample():
        return pipe(
            "a red square", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
        ).images

    base = sample()
    pipe.load_lora_weights(str(output_dir))
    assert np.abs(sample() - base).max() > 1e-3
    assert_bit_equal(loaded_adapter(pipe.unet, "unet"), adapter(output_dir))


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    from duo_plugin.testing import make_tiny_sd3_pipeline

    return make_tiny_sd3_pipeline(str(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd3_and_flux_train_resume_and_load_under_fsdp(family, request, tiny_pairs, tmp_path):
    """Their transformer blocks are what FSDP wraps (the models' _no_split_modules); the adapter's prefix is
    ``transformer``."""
    import diffusers

    model = request.getfixturevalue(f"tiny_{family}")
    script = f"train_duo_{family}.py"

    def family_args(output_dir, *extra):
        return run_args(model, tiny_pairs, output_dir, "--max_train_steps", "3", "--max_sequence_length", "16", *extra)

    full = tmp_path / "full"
    sharded_launch("fsdp", script, family_args(full / "out", "--skip_validation"), full)
    resumed = tmp_path / "resumed" / "out"
    resumed.mkdir(parents=True)
    shutil.copytree(full / "out" / "checkpoint-2", resumed / "checkpoint-2")
    sharded_launch(
        "fsdp",
        script,
        family_args(resumed, "--skip_validation", "--resume_from_checkpoint", "latest"),
        tmp_path / "resumed",
    )
    assert_bit_equal(adapter(resumed), adapter(full / "out"))

    pipeline_class = getattr(diffusers, {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[family])
    pipe = pipeline_class.from_pretrained(model)
    pipe.load_lora_weights(str(resumed))
    assert_bit_equal(loaded_adapter(pipe.transformer, "transformer"), adapter(resumed))


@pytest.mark.slow
def test_deepspeed_zero2_trains_the_ddp_adapter(ddp_run, tiny_sd, tiny_pairs, tmp_path):
    """ZeRO-2 shards gradients and optimizer state, not the parameters: the adapter is whole on every process and
    saved by the main one. Needs DeepSpeed (not a dependency); its CPU accelerator runs it on gloo."""
    pytest.importorskip("deepspeed")
    output_dir = tmp_path / "out"
    log = sharded_launch(
        "deepspeed", "train_duo.py", run_args(tiny_sd, tiny_pairs, output_dir, "--skip_validation"), tmp_path
    )
    assert log.count("Saved the DUO adapter") == 1
    assert_adapters_close(adapter(output_dir), adapter(ddp_run), atol=TOLERANCE)
