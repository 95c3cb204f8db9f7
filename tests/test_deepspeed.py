"""DeepSpeed ZeRO-2: checkpoints in a DDP run's format, resumed exactly.

ZeRO-2 keeps every weight whole and splits what the optimizer holds (a flat fp32 master copy of the adapter and its
AdamW moments, one slice per process). A DUO checkpoint gathers them into the files a DDP run writes, so a checkpoint
of any kind resumes under the others. The fast tests run a real one-process ZeRO-2 engine in this process (gloo,
DeepSpeed's CPU accelerator); the slow ones launch two CPU processes through accelerate and compare them with DDP.
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
    assert_optimizer_states_close,
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


deepspeed = pytest.importorskip("deepspeed")

# What accelerate hands DeepSpeed for examples/multi_gpu/deepspeed_zero2.yaml, less the batch bookkeeping.
ZERO2_CONFIG = {
    "train_micro_batch_size_per_gpu": 1,
    "gradient_accumulation_steps": 1,
    "zero_optimization": {"stage": 2},
    "zero_allow_untested_optimizer": True,  # accelerate's default: the run's own torch AdamW
}


# --------------------------------------------------------------------------------------------------
# Fast: a one-process ZeRO-2 engine in this process
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero2_process_group():
    environment = dict(os.environ)
    os.environ["LOCAL_RANK"] = "0"  # DeepSpeed asks for it; accelerate launch sets it
    try:
        with one_gloo_process():
            yield
    finally:
        # Whatever DeepSpeed set (LOCAL_RANK above, its rank variables) would make later tests' accelerate
        # believe it runs under a launcher.
        os.environ.clear()
        os.environ.update(environment)


def zero2_run(unet, engine=True, bf16=False):
    """The run's AdamW and cosine schedule, and what a ZeRO-2 run makes of them (``engine=False``: plain; ``bf16``:
    accelerate's bf16 mixed precision, under which DeepSpeed casts the model, adapter included, to bf16)."""
    from diffusers.optimization import get_scheduler

    from duo_plugin.families import sd

    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    parameter_groups = [list(group["params"]) for group in optimizer.param_groups]
    scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=2, num_training_steps=10)
    if not engine:
        return SimpleNamespace(model=unet, engine=None, optimizer=optimizer, lr_scheduler=scheduler)
    config = {**ZERO2_CONFIG, "bf16": {"enabled": bf16}}
    engine, zero_optimizer, _, _ = deepspeed.initialize(model=unet, optimizer=optimizer, config=config)
    state = checkpoints.ShardedState(
        checkpoint_accelerator(),
        unet,
        SimpleNamespace(optimizer=zero_optimizer),  # accelerate's optimizer wrapper
        scheduler,
        sd.save_lora_weights,
        "unet",
        engine="DeepSpeed",
        parameter_groups=parameter_groups,
    )
    state.engine_module = engine
    return state


def train_steps(run, steps, first=0, dtype=torch.float32):
    for step in range(first, first + steps):
        engine = getattr(run, "engine_module", None)
        loss = duo_ordered_loss(run.model, engine or run.model, unet_inputs(step, dtype))
        if engine is None:
            loss.backward()
            run.optimizer.step()
            run.optimizer.zero_grad(set_to_none=True)
        else:
            engine.backward(loss)
            engine.step()
        run.lr_scheduler.step()


def master_weights(run):
    """The engine's fp32 master copy of the adapter, in the file's names."""
    return {f"unet.{key}": value for key, value in run.whole_adapter().items()}


def test_a_zero2_checkpoint_holds_what_a_ddp_checkpoint_holds_and_resumes_exactly(
    zero2_process_group, tiny_sd, tmp_path, fresh_accelerate_state
):
    from accelerate.state import PartialState

    PartialState()
    plain, zero2 = zero2_run(adapted_unet(tiny_sd), engine=False), zero2_run(adapted_unet(tiny_sd))
    for run in (plain, zero2):
        train_steps(run, 3)
    zero2.save(str(tmp_path / "checkpoint-3"))
    assert sorted(os.listdir(tmp_path / "checkpoint-3")) == [
        "optimizer.bin",
        "pytorch_lora_weights.safetensors",
        "random_states_0.pkl",
        "scheduler.bin",
    ]
    # The unsharded optimizer's own format (positions, every tensor whole), and the unsharded run's values: the
    # flat buffer's AdamW differs from the per-weight one only in rounding.
    written, unsharded = optimizer_state(tmp_path / "checkpoint-3"), plain.optimizer.state_dict()
    assert written["param_groups"] == unsharded["param_groups"]
    assert_optimizer_states_close(written, unsharded)
    assert_adapters_close(adapter(tmp_path / "checkpoint-3"), master_weights(zero2), atol=0)
    assert_adapters_close(
        adapter(tmp_path / "checkpoint-3"),
        {f"unet.{k}": v for k, v in lora.lora_state_dict(plain.model).items()},
        atol=1e-6,
    )

    # A fresh engine from other initial weights resumes: adapter, master copy, moments and schedule, bit for bit.
    resumed = zero2_run(adapted_unet(tiny_sd, seed=1))
    assert not torch.equal(*[next(iter(master_weights(run).values())) for run in (resumed, zero2)])
    resumed.load(str(tmp_path / "checkpoint-3"))
    assert_bit_equal(master_weights(resumed), master_weights(zero2))
    assert_bit_equal(lora.lora_state_dict(resumed.model), lora.lora_state_dict(zero2.model))
    assert resumed.lr_scheduler.state_dict() == zero2.lr_scheduler.state_dict()
    for run in (resumed, zero2):
        train_steps(run, 2, first=3)
    assert_bit_equal(master_weights(resumed), master_weights(zero2))


def test_under_bf16_the_checkpoint_holds_the_fp32_master_weights_and_resumes_exactly(
    zero2_process_group, tiny_sd, tmp_path, fresh_accelerate_state
):
    """Under bf16 the model's copy of the adapter is bf16; the optimizer's fp32 master copy is what trains. The
    checkpoint and the final adapter hold the master copy, and a resume restores both copies."""
    from accelerate.state import PartialState

    PartialState()
    trained = zero2_run(adapted_unet(tiny_sd), bf16=True)
    train_steps(trained, 3, dtype=torch.bfloat16)
    model_copy = lora.lora_state_dict(trained.model)
    assert {value.dtype for value in model_copy.values()} == {torch.bfloat16}
    trained.save(str(tmp_path / "checkpoint-3"))
    saved = adapter(tmp_path / "checkpoint-3")
    assert {value.dtype for value in saved.values()} == {torch.float32}
    assert_bit_equal(saved, master_weights(trained))
    # The master copy is not the bf16 copy widened: saving the model's copy would lose the last steps' updates.
    assert max((saved[f"unet.{k}"] - v.float()).abs().max().item() for k, v in model_copy.items()) > 1e-4

    resumed = zero2_run(adapted_unet(tiny_sd, seed=1), bf16=True)
    resumed.load(str(tmp_path / "checkpoint-3"))
    assert_bit_equal(master_weights(resumed), saved)
    assert_bit_equal(lora.lora_state_dict(resumed.model), model_copy)
    for run in (resumed, trained):
        train_steps(run, 2, first=3, dtype=torch.bfloat16)
    assert_bit_equal(master_weights(resumed), master_weights(trained))


def test_a_ddp_checkpoint_loads_into_a_zero2_engine(zero2_process_group, tiny_sd, tmp_path, fresh_accelerate_state):
    """The DDP run's files (accelerate's save_state with the adapter hooks) give the engine the same state."""
    from accelerate.state import PartialState
    from accelerate.utils import save

    from duo_plugin.families import sd

    PartialState()
    plain = zero2_run(adapted_unet(tiny_sd), engine=False)
    train_steps(plain, 2)
    folder = tmp_path / "checkpoint-2"
    folder.mkdir()
    sd.save_lora_weights(str(folder), lora.lora_state_dict(plain.model), plain.model)
    save(plain.optimizer.state_dict(), str(folder / "optimizer.bin"))
    zero2 = zero2_run(adapted_unet(tiny_sd, seed=1))
    zero2.parts.load_adapter(str(folder), "unet")
    zero2.parts.load_optimizer_state(optimizer_state(folder), str(folder))
    assert_bit_equal(master_weights(zero2), adapter(folder))
    reread = zero2.parts.whole_optimizer_state()
    assert reread["param_groups"] == plain.optimizer.state_dict()["param_groups"]
    for position, values in plain.optimizer.state_dict()["state"].items():
        assert_bit_equal(reread["state"][position], values)


def test_fp16s_dynamic_loss_scale_is_kept_in_the_checkpoint(tmp_path):
    """DeepSpeed's CPU accelerator has no fp16, so the engine is stood in for: its loss scaler's moving parts."""
    from duo_plugin.checkpoints import _Zero2Parts

    def parts(scaler, dynamic=True):
        weight = torch.nn.Parameter(torch.zeros(2))
        zero = SimpleNamespace(optimizer=torch.optim.AdamW([weight]), dynamic_loss_scale=dynamic, loss_scaler=scaler)
        return _Zero2Parts(None, SimpleNamespace(optimizer=zero), [[weight]])

    trained = SimpleNamespace(cur_scale=2.0**11, cur_iter=40, last_overflow_iter=33, cur_hysteresis=1)
    parts(trained).save_engine_state(str(tmp_path))
    fresh = SimpleNamespace(cur_scale=2.0**16, cur_iter=0, last_overflow_iter=-1, cur_hysteresis=2)
    parts(fresh).load_engine_state(str(tmp_path))
    assert vars(fresh) == vars(trained)
    # fp32 and bf16 runs have a static scale of 1: nothing is written.
    static = tmp_path / "static"
    static.mkdir()
    parts(SimpleNamespace(cur_scale=1.0), dynamic=False).save_engine_state(str(static))
    assert os.listdir(static) == []


def test_zero2_refuses_optimizers_whose_state_it_cannot_gather(zero2_process_group, tiny_sd):
    from duo_plugin import input_checks

    # Before DeepSpeed is set up, from the flags (TrainingRun asks when the launch is DeepSpeed's) ...
    input_checks.check_zero2_optimizer(use_8bit_adam=False)
    with pytest.raises(UsageError, match="--use_8bit_adam does not run under DeepSpeed ZeRO-2.*or use FSDP"):
        input_checks.check_zero2_optimizer(use_8bit_adam=True)
    # ... and from the engine's optimizer, whatever made it.
    unet = adapted_unet(tiny_sd)
    stranger = torch.optim.SGD([p for p in unet.parameters() if p.requires_grad], lr=1e-3)
    with pytest.raises(UsageError, match="only with torch's AdamW \\(found SGD\\): drop --use_8bit_adam"):
        checkpoints.ShardedState(
            None,
            unet,
            SimpleNamespace(optimizer=SimpleNamespace(optimizer=stranger)),
            None,
            None,
            "unet",
            engine="DeepSpeed",
            parameter_groups=[list(stranger.param_groups[0]["params"])],
        )


# --------------------------------------------------------------------------------------------------
# Slow: two CPU processes under ZeRO-2 (accelerate launch), compared with two under DDP
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def zero2_launch(tiny_sd, tiny_pairs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zero2_launch")
    log = sharded_launch(
        "deepspeed", "train_duo.py", run_args(tiny_sd, tiny_pairs, tmp / "out", "--validation_steps", "2"), tmp
    )
    return tmp / "out", log


@pytest.fixture(scope="module")
def ddp_run(tiny_sd, tiny_pairs, tmp_path_factory):
    return ddp_launch(tiny_sd, tiny_pairs, tmp_path_factory.mktemp("ddp") / "out")


@pytest.mark.slow
def test_zero2_trains_and_writes_once_what_ddp_writes(zero2_launch, ddp_run):
    """Rank divergence included: the checkpoint's adapter and optimizer state, gathered from both processes' slices,
    and the final adapter equal the DDP run's; the validation grids and card samples are its images."""
    output_dir, log = zero2_launch
    check_sharded_run_against_ddp(output_dir, log, ddp_run)


@pytest.mark.slow
def test_zero2_resume_is_bit_exact(zero2_launch, tiny_sd, tiny_pairs, tmp_path):
    output_dir, _ = zero2_launch
    resumed = resume_launch("deepspeed", output_dir / "checkpoint-2", tiny_sd, tiny_pairs, tmp_path)
    assert_bit_equal(adapter(resumed), adapter(output_dir))
    assert read_metrics(resumed) == read_metrics(output_dir)[2:]


@pytest.mark.slow
def test_a_ddp_checkpoint_resumes_under_zero2_and_the_adapter_loads_in_stock_diffusers(
    ddp_run, tiny_sd, tiny_pairs, tmp_path
):
    resumed = resume_launch("deepspeed", ddp_run / "checkpoint-2", tiny_sd, tiny_pairs, tmp_path)
    assert_adapters_close(adapter(resumed), adapter(ddp_run), atol=TOLERANCE)
    assert_bit_equal(stock_diffusers_adapter("sd", tiny_sd, resumed), adapter(resumed))


@pytest.mark.slow
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_sd3_and_flux_train_resume_and_load_under_zero2(family, request, tiny_pairs, tmp_path):
    model = request.getfixturevalue(f"tiny_{family}")
    script = f"train_duo_{family}.py"
    extra = ("--max_train_steps", "3", "--max_sequence_length", "16", "--skip_validation")
    full = tmp_path / "full"
    sharded_launch("deepspeed", script, run_args(model, tiny_pairs, full / "out", *extra), full)
    resumed = resume_launch(
        "deepspeed", full / "out" / "checkpoint-2", model, tiny_pairs, tmp_path / "resumed", *extra, script=script
    )
    assert_bit_equal(adapter(resumed), adapter(full / "out"))
    assert_bit_equal(stock_diffusers_adapter(family, model, resumed), adapter(resumed))
