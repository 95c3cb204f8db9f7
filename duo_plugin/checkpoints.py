"""Adapter-only accelerate checkpoints: saved atomically, listed, resumed from.

Under FSDP (version 2) and DeepSpeed ZeRO-2 accelerate's ``save_state`` would write the whole model (the frozen base
included) in the engine's own per-process layout; a DUO checkpoint holds only what training changes, in the layout a
DDP run writes (the same files, the same optimizer format), gathered from every process by ``ShardedState``: a
checkpoint of any of the three kinds resumes under the others, on any number of processes.
"""

import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from . import run_guard
from .errors import UsageError, storage_reason
from .lora import gather_lora_state_dict, load_lora_state_dict, lora_is_sharded, lora_parameters, lora_state_dict
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
    Under FSDP and ZeRO-2, ``sharded_state`` saves instead of accelerate (every process calls this, as always).
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
    Under FSDP and ZeRO-2, ``sharded_state`` loads instead of accelerate."""
    import pickle

    load_state = accelerator.load_state if sharded_state is None else sharded_state.load
    if sharded_state is None and sharding_engine(accelerator) is not None:
        raise ValueError(f"under {sharding_engine(accelerator)}, load_checkpoint needs the run's ShardedState")
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
    unwrapped denoiser that carries the adapter, the only model a DUO run prepares. Under FSDP2 and ZeRO-2
    ``save_checkpoint`` uses ``ShardedState`` and never calls ``save_state``; the hook still gathers an adapter whose
    weights are sharded (FSDP2's DTensors) from every process (it runs on all of them) and writes it once.
    """

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
        # Nothing for accelerate to load: the adapter is all there is, restored here.
        while models:
            models.pop()
        load_lora_state_dict(model, input_dir, lora_prefix)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# --------------------------------------------------------------------------------------------------
# Sharded runs: FSDP2 and DeepSpeed ZeRO-2 (and the refusals of what the adapter cannot be gathered from)
# --------------------------------------------------------------------------------------------------


def is_fsdp(accelerator) -> bool:
    return sharding_engine(accelerator) == "FSDP"


def sharding_engine(accelerator) -> Optional[str]:
    """``"FSDP"`` or ``"DeepSpeed"`` when the run's state is split across processes and ``ShardedState`` saves it;
    None for one process and DDP, whose checkpoints accelerate's ``save_state`` writes."""
    from accelerate.utils import DistributedType

    kind = getattr(accelerator, "distributed_type", None)
    return {DistributedType.FSDP: "FSDP", DistributedType.DEEPSPEED: "DeepSpeed"}.get(kind)


def _state_saver(accelerator, sharded_state):
    if sharded_state is not None:
        return sharded_state.save
    if sharding_engine(accelerator) is not None:
        # accelerate would write the whole model (the frozen base included) into every checkpoint.
        raise ValueError(f"under {sharding_engine(accelerator)}, save_checkpoint needs the run's ShardedState")
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
    if kind == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage != 2:
        raise UsageError(
            f"DeepSpeed ZeRO stage {accelerator.state.deepspeed_plugin.zero_stage} is not supported (the checkpoints "
            "gather ZeRO stage 2's optimizer partitions): set zero_stage: 2 (examples/multi_gpu/deepspeed_zero2.yaml)"
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


def check_optimizer_positions(state: dict, count: int, source: str = "the checkpoint"):
    """An optimizer state by position (``optimizer.bin``) must hold ``count`` weights, each state at one of them."""
    held = sum(len(group["params"]) for group in state["param_groups"])
    if held != count or any(position not in range(held) for position in state["state"]):
        raise ValueError(f"{source} holds the optimizer state of {held} adapter weights, this run has {count}")


def optimizer_state_by_name(state: dict, names: List[str], source: str = "the checkpoint") -> dict:
    """The inverse of ``optimizer_state_by_index``: ``names`` are the optimizer's parameters' names, in its order."""
    check_optimizer_positions(state, len(names), source)
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


class _Fsdp2Parts:
    """FSDP2 splits every weight (DTensors) and its optimizer state; ``torch.distributed.checkpoint`` gathers and
    scatters the optimizer state, ``lora`` the adapter."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, _unwrapped_optimizer(optimizer)

    def whole_adapter(self) -> dict:
        return gather_lora_state_dict(self.model)

    def whole_optimizer_state(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        state = get_optimizer_state_dict(
            self.model, self.optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
        # Gathered to CPU, the state is whole on the first process only (the others get an empty dict).
        return optimizer_state_by_index(state) if state else None

    def load_adapter(self, folder: str, prefix: str):
        load_lora_state_dict(self.model, folder, prefix)

    # fp16's loss scale is accelerate's scaler here, which ShardedState saves and restores.
    def save_engine_state(self, folder: str):
        pass

    def load_engine_state(self, folder: str):
        pass

    def load_optimizer_state(self, state: dict, source: str):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        state = optimizer_state_by_name(state, _optimizer_parameter_names(self.model, self.optimizer), source)
        set_optimizer_state_dict(
            self.model, self.optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
        )


class _Zero2Parts:
    """DeepSpeed ZeRO-2 keeps every weight whole, in the compute dtype, and splits what the optimizer holds: per
    optimizer group one flat fp32 master copy of the weights and its optimizer state, one slice per process.
    DeepSpeed's fragment API (``deepspeed.utils.safe_get/set_full_*``) reads and writes them one weight at a time
    (reading is an all-reduce: every process calls it). ``parameter_groups`` are the adapter's weights per group as
    the run handed them to its optimizer: the positions of ``optimizer.bin``."""

    # fp16's dynamic loss scale (DeepSpeed's own, as accelerate's scaler is None under DeepSpeed): what changes as
    # it trains, so that a resume does not start again from the initial scale and skip steps the run did not.
    LOSS_SCALE_FILE = "deepspeed_loss_scale.json"
    LOSS_SCALE_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")

    def __init__(self, model, optimizer, parameter_groups: List[list]):
        zero = _unwrapped_optimizer(optimizer)
        self.model, self.parameter_groups = model, parameter_groups
        self.loss_scaler = getattr(zero, "loss_scaler", None) if getattr(zero, "dynamic_loss_scale", False) else None
        self.base = getattr(zero, "optimizer", None)  # the run's optimizer, now over the flat fp32 slices
        if type(self.base) is not torch.optim.AdamW or len(self.base.param_groups) != len(parameter_groups):
            raise UsageError(
                f"DeepSpeed ZeRO-2 runs DUO's checkpoints only with torch's AdamW (found {type(self.base).__name__}): "
                "drop --use_8bit_adam (ZeRO-2 already splits the optimizer state across processes) or use FSDP"
            )

    def whole_adapter(self) -> dict:
        from deepspeed.utils import safe_get_full_fp32_param

        # The fp32 master weights, not the model's copies (bf16 under bf16 mixed precision).
        return gather_lora_state_dict(self.model, whole_tensor=safe_get_full_fp32_param)

    def _flat_slices(self):
        """Per optimizer group: its flat fp32 slice, that slice's optimizer state, and the adapter's weights in it."""
        for group, weights in zip(self.base.param_groups, self.parameter_groups):
            (flat,) = group["params"]
            yield group, flat, weights

    def whole_optimizer_state(self) -> dict:
        from deepspeed.utils import safe_get_full_optimizer_state

        state, groups = {}, []
        for group, flat, weights in self._flat_slices():
            flat_state = self.base.state.get(flat, {})
            first = sum(len(g["params"]) for g in groups)
            for position, weight in enumerate(weights, start=first):
                if flat_state:  # after the first optimizer step
                    state[position] = {
                        key: safe_get_full_optimizer_state(weight, key).cpu()
                        if _is_flat_state(value, flat)
                        else value.clone()
                        for key, value in flat_state.items()
                    }
            groups.append(
                {
                    **{k: v for k, v in group.items() if k != "params"},
                    "params": list(range(first, first + len(weights))),
                }
            )
        return {"state": state, "param_groups": groups}

    def save_engine_state(self, folder: str):
        if self.loss_scaler is not None:
            state = {name: getattr(self.loss_scaler, name) for name in self.LOSS_SCALE_FIELDS}
            with open(os.path.join(folder, self.LOSS_SCALE_FILE), "w") as f:
                json.dump(state, f)

    def load_engine_state(self, folder: str):
        path = os.path.join(folder, self.LOSS_SCALE_FILE)
        if self.loss_scaler is not None and os.path.isfile(path):
            with open(path) as f:
                state = json.load(f)
            for name in self.LOSS_SCALE_FIELDS:
                setattr(self.loss_scaler, name, state[name])

    def load_adapter(self, folder: str, prefix: str):
        from deepspeed.utils import safe_set_full_fp32_param

        values = load_lora_state_dict(self.model, folder, prefix)
        weights = lora_parameters(self.model)
        for key, value in values.items():
            safe_set_full_fp32_param(weights[key], value.to(torch.float32))

    def load_optimizer_state(self, state: dict, source: str):
        from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_set_full_optimizer_state

        check_optimizer_positions(state, sum(len(weights) for weights in self.parameter_groups), source)
        if [len(g["params"]) for g in state["param_groups"]] != [len(w) for w in self.parameter_groups]:
            raise ValueError(f"{source} holds other optimizer groups than this run's")
        for (group, flat, weights), saved_group in zip(self._flat_slices(), state["param_groups"]):
            group.update({k: v for k, v in saved_group.items() if k != "params"})
            saved = [state["state"].get(position) for position in saved_group["params"]]
            if not any(saved):
                continue
            # The slice's state as the optimizer's first step makes it, then every weight's whole values put in.
            first = next(values for values in saved if values)
            self.base.state[flat] = {
                key: torch.zeros_like(flat) if value.dim() else value.clone() for key, value in first.items()
            }
            lazy_init_hp_params_optimizer_state(weights, flat, self.base.state)
            for weight, values in zip(weights, saved):
                for key, value in values.items():
                    if value.dim():
                        safe_set_full_optimizer_state(weight, value.to(flat.device, flat.dtype), key)


def _is_flat_state(value, flat) -> bool:
    return torch.is_tensor(value) and value.shape == flat.shape


@dataclass
class ShardedState:
    """What a checkpoint of an FSDP2 or DeepSpeed ZeRO-2 run holds, saved and loaded by every process: the adapter
    and the optimizer state gathered whole (only the main process writes them), the LR schedule, and each process's
    RNG states.

    The files are those a DDP run writes (``run_guard.CHECKPOINT_FILES`` and ``random_states_<rank>.pkl``), with
    ``optimizer.bin`` in the unsharded optimizer's own format; the frozen base weights are never saved. Loading,
    every process reads the whole files and keeps its own slices (the output folder is shared, as for DDP).
    ``engine`` is ``sharding_engine``'s name; ZeRO-2 needs ``parameter_groups`` (see ``_Zero2Parts``).
    """

    accelerator: object
    model: object  # the unwrapped denoiser: under FSDP2 the sharded one
    optimizer: object
    lr_scheduler: object
    save_lora_weights: Callable
    lora_prefix: str
    engine: str = "FSDP"
    parameter_groups: Optional[List[list]] = None

    def __post_init__(self):
        if self.engine == "FSDP":
            self.parts = _Fsdp2Parts(self.model, self.optimizer)
        else:
            self.parts = _Zero2Parts(self.model, self.optimizer, self.parameter_groups)

    def whole_adapter(self) -> dict:
        """The adapter gathered from every process: every process must call this."""
        return self.parts.whole_adapter()

    def save(self, folder: str):
        from accelerate.checkpointing import save_accelerator_state
        from accelerate.utils import save

        accelerator = self.accelerator
        os.makedirs(folder, exist_ok=True)
        # Both gathers are collective, on every process; only the adapter and its optimizer state are gathered.
        adapter = self.parts.whole_adapter()
        optimizer_state = self.parts.whole_optimizer_state()
        if accelerator.is_main_process:
            self.save_lora_weights(folder, adapter, self.model)
            save(optimizer_state, os.path.join(folder, "optimizer.bin"))
            self.parts.save_engine_state(folder)
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

        accelerator = self.accelerator
        self.parts.load_adapter(folder, self.lora_prefix)
        state = load(os.path.join(folder, "optimizer.bin"), map_location="cpu")
        if not isinstance(state, dict) or not {"state", "param_groups"} <= set(state):
            raise ValueError("optimizer.bin is not an optimizer state")
        self.parts.load_optimizer_state(state, folder)
        self.parts.load_engine_state(folder)
        # The schedule, the scaler and the RNG states last, as accelerate restores them.
        restored = load_accelerator_state(
            folder, [], [], [self.lr_scheduler], [], accelerator.process_index, accelerator.scaler, map_location="cpu"
        )
        if "step" in restored:
            accelerator.step = restored["step"]
