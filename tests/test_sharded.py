"""Sharded training under FSDP2 (DeepSpeed ZeRO-2: tests/test_deepspeed.py).

The checkpoints of an FSDP run hold the adapter and its optimizer state gathered from every process, in the layout
and format a DDP run writes; the final adapter is gathered the same way. The fast tests run FSDP2 in this process on
a one-process gloo group (the parameters become DTensors all the same); the slow ones launch two CPU processes
(``sharded_launches``).
"""

import os
from types import SimpleNamespace

import pytest
import torch
from sharded_launches import (
    TOLERANCE,
    adapted_unet,
    adapter,
    assert_adapters_close,
    assert_bit_equal,
    check_sharded_run_against_ddp,
    checkpoint_accelerator,
    ddp_launch,
    duo_ordered_loss,
    one_gloo_process,
    optimizer_state,
    read_metrics,
    resume_launch,
    run_args,
    sharded_launch,
    stock_diffusers_adapter,
    unet_inputs,
)

from duo_plugin import checkpoints, lora
from duo_plugin.errors import UsageError


# --------------------------------------------------------------------------------------------------
# Fast: FSDP2 in this process (one gloo process, so the adapter is made of DTensors), the formats, the refusals
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_process_group():
    from torch.distributed.device_mesh import init_device_mesh

    with one_gloo_process():
        yield init_device_mesh("cpu", (1,))


def shard(unet, mesh, blocks=True):
    """FSDP2 as accelerate applies it: each transformer block, then the root (``blocks=False``: the root only)."""
    from torch.distributed.fsdp import fully_shard

    if blocks:
        for module in list(unet.modules()):
            if type(module).__name__ == "BasicTransformerBlock":
                fully_shard(module, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    return unet


def train_steps(unet, optimizer, steps=2):
    for step in range(steps):
        duo_ordered_loss(unet, unet, unet_inputs(step)).backward()
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
        return checkpoints.ShardedState(
            checkpoint_accelerator(), unet, optimizer, scheduler, sd.save_lora_weights, "unet"
        )

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
        load_state=lambda folder: pytest.fail("accelerate's load_state under FSDP or DeepSpeed"),
    )


def test_sharded_setups_whose_adapter_cannot_be_gathered_are_refused(monkeypatch, caplog):
    fsdp1 = fake_accelerator("FSDP", fsdp_plugin=SimpleNamespace(fsdp_version=1))
    with pytest.raises(UsageError, match="FSDP version 1 is not supported.*fsdp_version: 2"):
        checkpoints.check_sharding(fsdp1)
    zero3 = fake_accelerator("DEEPSPEED", deepspeed_plugin=SimpleNamespace(zero_stage=3))
    with pytest.raises(UsageError, match="ZeRO stage 3 is not supported.*would be saved empty"):
        checkpoints.check_sharding(zero3)
    zero1 = fake_accelerator("DEEPSPEED", deepspeed_plugin=SimpleNamespace(zero_stage=1))
    with pytest.raises(UsageError, match="ZeRO stage 1 is not supported.*set zero_stage: 2"):
        checkpoints.check_sharding(zero1)
    checkpoints.check_sharding(fake_accelerator("FSDP", fsdp_plugin=SimpleNamespace(fsdp_version=2)))
    checkpoints.check_sharding(fake_accelerator("DEEPSPEED", deepspeed_plugin=SimpleNamespace(zero_stage=2)))
    # On CPU processes accelerate sets up DDP whatever the launch asked for: said, not refused.
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with caplog.at_level("WARNING", logger="duo_plugin.checkpoints"):
        checkpoints.check_sharding(fake_accelerator("MULTI_CPU"))
    assert "FSDP was asked for but accelerate set up" in caplog.text


@pytest.mark.parametrize("kind", ["FSDP", "DEEPSPEED"])
def test_sharded_checkpoints_never_fall_back_to_accelerates_whole_model_save(kind, tmp_path):
    accelerator = fake_accelerator(kind)
    assert checkpoints.sharding_engine(accelerator) == {"FSDP": "FSDP", "DEEPSPEED": "DeepSpeed"}[kind]
    assert checkpoints.sharding_engine(fake_accelerator("MULTI_CPU")) is None
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
    return ddp_launch(tiny_sd, tiny_pairs, tmp_path_factory.mktemp("ddp") / "out")


@pytest.mark.slow
def test_fsdp_trains_and_writes_once_what_ddp_writes(fsdp_run, ddp_run):
    """Rank divergence included: the checkpoint's adapter and optimizer state and the final adapter equal the DDP
    run's, every tensor whole, the rows rank 1 held trained like the others; the validation grids and card samples
    are its images."""
    output_dir, log = fsdp_run
    check_sharded_run_against_ddp(output_dir, log, ddp_run)


@pytest.mark.slow
def test_fsdp_resume_is_bit_exact(fsdp_run, tiny_sd, tiny_pairs, tmp_path):
    output_dir, _ = fsdp_run
    resumed = resume_launch("fsdp", output_dir / "checkpoint-2", tiny_sd, tiny_pairs, tmp_path)
    assert_bit_equal(adapter(resumed), adapter(output_dir))
    assert read_metrics(resumed) == read_metrics(output_dir)[2:]


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_under_fsdp(ddp_run, tiny_sd, tiny_pairs, tmp_path):
    resumed = resume_launch("fsdp", ddp_run / "checkpoint-2", tiny_sd, tiny_pairs, tmp_path)
    assert_adapters_close(adapter(resumed), adapter(ddp_run), atol=TOLERANCE)


@pytest.mark.slow
def test_the_fsdp_adapter_loads_in_stock_diffusers(fsdp_run, tiny_sd):
    output_dir, _ = fsdp_run
    assert_bit_equal(stock_diffusers_adapter("sd", tiny_sd, output_dir), adapter(output_dir))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd3_and_flux_train_resume_and_load_under_fsdp(family, request, tiny_pairs, tmp_path):
    """Their transformer blocks are what FSDP wraps (the models' _no_split_modules); the adapter's prefix is
    ``transformer``."""
    model = request.getfixturevalue(f"tiny_{family}")
    script = f"train_duo_{family}.py"
    extra = ("--max_train_steps", "3", "--max_sequence_length", "16", "--skip_validation")
    full = tmp_path / "full"
    sharded_launch("fsdp", script, run_args(model, tiny_pairs, full / "out", *extra), full)
    resumed = resume_launch(
        "fsdp", full / "out" / "checkpoint-2", model, tiny_pairs, tmp_path / "resumed", *extra, script=script
    )
    assert_bit_equal(adapter(resumed), adapter(full / "out"))
    assert_bit_equal(stock_diffusers_adapter(family, model, resumed), adapter(resumed))
