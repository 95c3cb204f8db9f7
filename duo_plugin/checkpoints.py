"""Adapter-only accelerate checkpoints: saved atomically, listed, resumed from."""

import logging
import os
import shutil
from typing import List, Optional

from . import run_guard
from .errors import UsageError, storage_reason
from .lora import load_lora_state_dict, lora_state_dict
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
) -> str:
    """Save accelerate state atomically (into ``*.tmp``, marker last, then renames), then drop the oldest beyond the limit.

    A crash during the save leaves an unmarked ``.tmp`` folder, which ``latest`` ignores; see ``run_guard``.
    With a limit, the oldest checkpoints beyond limit - 1 go before the save, so a full disk has room.
    """
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
        accelerator.save_state(staging)
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


def load_checkpoint(accelerator, path: str) -> int:
    """Restore the adapter, optimizer, scheduler and RNG states of ``path``; returns its step. A state file that is
    not what a DUO run writes (a pickle with code in it, a cut file) is refused with one line; nothing in it runs."""
    import pickle

    try:
        accelerator.load_state(path)
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
    written, and read back into the live model.
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
        if accelerator.is_main_process:
            save_lora_weights(output_dir, lora_state_dict(model), model)
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
