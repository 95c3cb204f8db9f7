"""Adapter-only accelerate checkpoints: saved atomically, listed, resumed from.

Under FSDP (version 2) accelerate's ``save_state`` would write the whole sharded model; a DUO checkpoint holds only
what training changes, in the layout a DDP run writes (the same files, the same optimizer format), gathered from
every process by ``ShardedState``: a checkpoint of either kind resumes under the other.
"""

import logging
import os
import shutil
from dataclasses import dataclass
from typing import Callable, List, Optional

from . import run_guard
from .errors import UsageError, storage_reason
from .lora import gather_lora_state_dict, load_lora_state_dict, lora_is_sharded, lora_state_dict
from .run_guard import CHECKPOINT_PATTERN, checkpoint_step, resolve_resume_path  # noqa: F401 - the scripts' names


logger = logging.getLogger(__name__)


def list_checkpoints(output_dir: str) -> List[str]:
    """``checkpoint-<step>`` folders, oldest first, for rotation; ``latest`` uses ``run_guard.complete_checkpoints``."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(match.group(1)), os.path.join(output_dir, name)))
    return [path for _, path in sorted(found)]


def save_checkpoint(
    accelerator,
    output_dir: str,
    step: int,
    total_limit: Optional[int],
    settings: Optional[dict] = None,
    needed_bytes: Optional[int] = None,
    sharded_state: Optional["ShardedState"] = None,
) -> str:
    """Save accelerate state atomically (into ``*.tmp``, marker last, then renames), then drop the oldest beyond the limit.

    A crash during the save leaves an unmarked ``.tmp`` folder, which ``latest`` ignores; see ``run_guard``.
    With a limit, the oldest checkpoints beyond limit - 1 go before the save, so a full disk has room.
    Under FSDP, ``sharded_state`` saves instead of accelerate (every process calls this, as always).
    """
    save_state = _state_saver(accelerator, sharded_state)
    final = os.path.join(output_dir, f"checkpoint-{step}")
    staging = final + ".tmp"
    if accelerator.is_main_process:
        run_guard.make_room_for_checkpoint(
            output_dir, total_limit, [p for p in list_checkpoints(output_dir) if p != final]
        )
        if os.path.exists(staging):
            shutil.rmtree(staging)
    accelerator.wait_for_everyone()
    try:
        save_state(staging)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            run_guard.finish_checkpoint(staging, final, step, settings)
    except Exception as error:
        # torch's writer reports a full disk as a RuntimeError, safetensors as its own error.
        if not isinstance(error, OSError) and storage_reason(error) is None:
            raise
        raise run_guard.save_failed(error, staging, output_dir, needed_bytes) from None
    if accelerator.is_main_process:
        if total_limit is not None:
            for stale in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(stale)
        logger.info("Saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: str, sharded_state: Optional["ShardedState"] = None) -> int:
    """Restore the adapter, optimizer, scheduler and RNG states of ``path``; returns its step. A state file that is
    not what a DUO run writes (a pickle with code in it, a cut file) is refused with one line; nothing in it runs.
    Under FSDP, ``sharded_state`` loads instead of accelerate."""
    import pickle

    load_state = accelerator.load_state if sharded_state is None else sharded_state.load
    if sharded_state is None and is_fsdp(accelerator):
        raise ValueError("under FSDP, load_checkpoint needs the run's ShardedState")
    try:
        load_state(path)
    except (pickle.UnpicklingError, EOFError, RuntimeError, ValueError) as error:
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise UsageError(
            f"refused checkpoint {path}: a state file is not one a DUO run writes ({type(error).__name__}: {first}); "
            f"nothing in it was run: resume from another checkpoint, or delete this one"
        ) from None
    return checkpoint_step(path)


def register_adapter_state_hooks(accelerator, model, save_lora_weights, lora_prefix: str):
    """Make ``save_state``/``load_state`` store only the adapter, not the frozen base weights.

    ``save_lora_weights(output_dir, state_dict, model)`` is the family's pipeline saver; ``model`` is the
    unwrapped denoiser that carries the adapter, the only model a DUO run prepares. Under DeepSpeed the
    engine saves and restores its own state (there are no weights to drop); the adapter file is still
    written, and read back into the live model. Under FSDP2 the adapter is gathered from every process (the
    hook runs on all of them) and written once; ``save_checkpoint`` then uses ``ShardedState`` instead.
    """
    from accelerate.utils import DistributedType

    def check_models(models):
        for candidate in models:
            if not isinstance(accelerator.unwrap_model(candidate), type(model)):
                raise ValueError(
                    f"unexpected model in the accelerate state: {type(candidate).__name__}, expected {type(model).__name__}"
                )

    def save_hook(models, weights, output_dir):
        check_models(models)
        # Sharded, gathering is collective: every process takes part, the main one writes.
        gathered = gather_lora_state_dict(model) if lora_is_sharded(model) else None
        if accelerator.is_main_process:
            save_lora_weights(output_dir, gathered if gathered is not None else lora_state_dict(model), model)
        # The adapter file replaces the full state dict accelerate would save next to it.
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        check_models(models)
        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            # Nothing for accelerate to load: the adapter is all there is, restored here.
            while models:
                models.pop()
        load_lora_state_dict(model, input_dir, lora_prefix)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# --------------------------------------------------------------------------------------------------
# Sharded runs: FSDP2 (and the refusals of what the adapter cannot be gathered from)
# --------------------------------------------------------------------------------------------------


def is_fsdp(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return getattr(accelerator, "distributed_type", None) == DistributedType.FSDP


def _state_saver(accelerator, sharded_state):
    if sharded_state is not None:
        return sharded_state.save
    if is_fsdp(accelerator):
        # accelerate would write the whole sharded model into every checkpoint.
        raise ValueError("under FSDP, save_checkpoint needs the run's ShardedState")
    return accelerator.save_state


def check_sharding(accelerator):
    """Refuse the sharded setups whose adapter cannot be gathered (FSDP1, DeepSpeed ZeRO-3), and say when accelerate
    set up plain data parallelism instead of the FSDP or DeepSpeed the launch asked for (it shards only on GPUs and
    other accelerators: on CPU processes it runs DDP, which trains the same adapter)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP and accelerator.state.fsdp_plugin.fsdp_version != 2:
        raise UsageError(
            "FSDP version 1 is not supported (its adapter cannot be gathered for the checkpoints): set "
            "fsdp_version: 2 in the accelerate config (examples/multi_gpu/accelerate_fsdp.yaml) or pass --fsdp_version 2"
        )
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise UsageError(
            "DeepSpeed ZeRO stage 3 is not supported (it partitions the adapter, which would be saved empty): "
            "use ZeRO stage 2 (examples/multi_gpu/deepspeed_zero2.yaml) or FSDP (examples/multi_gpu/accelerate_fsdp.yaml)"
        )
    for flag, name, wanted in (
        ("ACCELERATE_USE_FSDP", "FSDP", DistributedType.FSDP),
        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", DistributedType.DEEPSPEED),
    ):
        if os.environ.get(flag, "false").lower() == "true" and kind != wanted and accelerator.is_main_process:
            logger.warning(
                "%s was asked for but accelerate set up %s (it shards only on accelerators): every process holds "
                "the whole model",
                name,
                kind,
            )


def _unwrapped_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def optimizer_state_by_index(state: dict) -> dict:
    """A whole optimizer state keyed by parameter names (``torch.distributed.checkpoint``'s) → keyed by position,
    as the unsharded optimizer's ``state_dict()`` is: the format of a DDP checkpoint's ``optimizer.bin``."""
    positions, groups = {}, []
    for group in state["param_groups"]:
        names = group["params"]
        positions.update({name: len(positions) + i for i, name in enumerate(names)})
        groups.append({**group, "params": [positions[name] for name in names]})
    return {"state": {positions[name]: value for name, value in state["state"].items()}, "param_groups": groups}


def optimizer_state_by_name(state: dict, names: List[str], source: str = "the checkpoint") -> dict:
    """The inverse of ``optimizer_state_by_index``: ``names`` are the optimizer's parameters' names, in its order."""
    count = sum(len(group["params"]) for group in state["param_groups"])
    if count != len(names) or any(position not in range(count) for position in state["state"]):
        raise ValueError(f"{source} holds the optimizer state of {count} adapter weights, this run has {len(names)}")
    groups = [
        {**group, "params": [names[position] for position in group["params"]]} for group in state["param_groups"]
    ]
    return {"state": {names[position]: value for position, value in state["state"].items()}, "param_groups": groups}


# The wrappers' names that torch.distributed.checkpoint leaves out of a parameter's name.
_WRAPPER_NAMES = ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")


def _optimizer_parameter_names(model, optimizer) -> List[str]:
    named = {id(param): name for name, param in model.named_parameters()}
    names = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            name = named[id(param)]
            names.append(".".join(part for part in name.split(".") if part not in _WRAPPER_NAMES))
    return names


@dataclass
class ShardedState:
    """What a checkpoint of an FSDP2 run holds, saved and loaded by every process: the adapter and the optimizer
    state gathered whole (only the main process writes them), the LR schedule, and each process's RNG states.

    The files are those a DDP run writes (``run_guard.CHECKPOINT_FILES`` and ``random_states_<rank>.pkl``), with
    ``optimizer.bin`` in the unsharded optimizer's own format; the frozen base weights are never saved. Loading,
    every process reads the whole files and keeps its own slices (the output folder is shared, as for DDP).
    """

    accelerator: object
    model: object  # the prepared (sharded) denoiser: under FSDP2 the unwrapped model is the sharded one
    optimizer: object
    lr_scheduler: object
    save_lora_weights: Callable
    lora_prefix: str

    def save(self, folder: str):
        from accelerate.checkpointing import save_accelerator_state
        from accelerate.utils import save
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        accelerator = self.accelerator
        os.makedirs(folder, exist_ok=True)
        # Both gathers are collective, on every process; only the adapter and its optimizer state are gathered.
        adapter = gather_lora_state_dict(self.model)
        optimizer_state = get_optimizer_state_dict(
            self.model,
            _unwrapped_optimizer(self.optimizer),
            options=StateDictOptions(full_state_dict=True, cpu_offload=True),
        )
        if accelerator.is_main_process:
            self.save_lora_weights(folder, adapter, self.model)
            save(optimizer_state_by_index(optimizer_state), os.path.join(folder, "optimizer.bin"))
        save_accelerator_state(
            folder,
            [],
            [],
            [self.lr_scheduler],
            [],
            accelerator.process_index,
            accelerator.step,
            accelerator.scaler,
            save_on_each_node=accelerator.project_configuration.save_on_each_node,
        )

    def load(self, folder: str):
        from accelerate.checkpointing import load_accelerator_state
        from accelerate.utils import load
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        accelerator = self.accelerator
        load_lora_state_dict(self.model, folder, self.lora_prefix)
        optimizer = _unwrapped_optimizer(self.optimizer)
        state = load(os.path.join(folder, "optimizer.bin"), map_location="cpu")
        if not isinstance(state, dict) or not {"state", "param_groups"} <= set(state):
            raise ValueError("optimizer.bin is not an optimizer state")
        state = optimizer_state_by_name(state, _optimizer_parameter_names(self.model, optimizer), folder)
        set_optimizer_state_dict(
            self.model, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )
        # The schedule, the scaler and the RNG states last, as accelerate restores them.
        restored = load_accelerator_state(
            folder, [], [], [self.lr_scheduler], [], accelerator.process_index, accelerator.scaler, map_location="cpu"
        )
        if "step" in restored:
            accelerator.step = restored["step"]
