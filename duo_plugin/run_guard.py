"""What keeps a training run's output folder trustworthy: one run at a time, complete checkpoints only, and
a resume that trains with the settings its checkpoint was made with.

- ``--output_dir`` is locked by the run that writes it (``.duo_lock`` with the holder's pid); a lock whose
  process is gone is taken over with a warning.
- A checkpoint is complete when its marker ``duo_checkpoint.json`` exists; the marker is written last and
  also stores the run's training settings. ``latest`` picks only complete checkpoints.
- Re-saving a step swaps folders by renames only, so a kill at any moment leaves a complete checkpoint of
  that step on disk, which the next run's recovery puts back under its name.
"""

import atexit
import json
import logging
import os
import re
import shutil
import socket
import time
from typing import List, Optional

from .errors import StorageError, TrainingHalted, UsageError, storage_error, storage_reason
from .lora import LORA_WEIGHT_NAME
from .resumable import settings_changes


logger = logging.getLogger(__name__)

LOCK_NAME = ".duo_lock"
CHECKPOINT_MARKER = "duo_checkpoint.json"
CHECKPOINT_FILES = ("pytorch_lora_weights.safetensors", "optimizer.bin", "scheduler.bin")
STAGING_SUFFIX = ".tmp"
REPLACED_SUFFIX = ".old"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
_SAVE_FOLDER = re.compile(r"^checkpoint-(\d+)(\.tmp|\.old)?$")

# Flags that change what training computes: a resume with any of them changed would train a mix of two runs
# (the optimizer's restored state keeps the old learning rate, the data order depends on the batch layout).
TRAINING_SETTINGS = (
    "pretrained_model_name_or_path",
    "revision",
    "variant",
    "concept",
    "dataset_name",
    "dataset_revision",
    "unsafe_image_column",
    "safe_image_column",
    "num_pairs",
    "strength",
    "guidance_scale",
    "num_inference_steps",
    "generation_seed",
    "verifier",
    "resolution",
    "center_crop",
    "random_flip",
    "beta_dpo",
    "preservation_weight",
    "t_min",
    "t_max",
    "lora_target",
    "condition_on_prompts",
    "seed",
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_num_cycles",
    "lr_power",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "max_grad_norm",
    "rank",
    "lora_alpha",
    "use_8bit_adam",
    "weighting_scheme",
    "logit_mean",
    "logit_std",
    "mode_scale",
    "precondition_outputs",
    "max_sequence_length",
    "pair_timesteps",
    "preservation_noise",
    "preservation_placement",
)


# --------------------------------------------------------------------------------------------------
# The output folder lock
# --------------------------------------------------------------------------------------------------


def _read_lock(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else None
    except (OSError, ValueError):
        return None


def _lock_is_stale(holder: Optional[dict], path: str) -> bool:
    if holder is None:
        # Unreadable: a run that died while writing it, unless it is being written right now.
        return time.time() - os.path.getmtime(path) > 10
    if holder.get("host") != socket.gethostname():
        return False  # another machine's process cannot be checked from here
    pid = holder.get("pid")
    if pid == os.getpid():
        return True  # an earlier run in this same process (a notebook, a test) that did not release it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, TypeError, ValueError):
        return False
    return False


def release_output_lock(path: str):
    holder = _read_lock(path)
    if holder is not None and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        try:
            os.remove(path)
        except FileNotFoundError:
            pass


def acquire_output_lock(output_dir: str) -> str:
    """Take ``output_dir/.duo_lock`` or refuse with the holder's pid; returns the lock's path."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_NAME)
    for _ in range(3):
        try:
            descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _read_lock(path)
            if _lock_is_stale(holder, path):
                logger.warning(
                    "%s: taking over the lock of a run that is gone (%s)", output_dir, holder or "unreadable lock"
                )
                try:
                    os.remove(path)
                except FileNotFoundError:
                    pass
                continue
            raise UsageError(
                f"--output_dir {output_dir} is in use by another run (pid {holder.get('pid')} on {holder.get('host')}, "
                f"since {holder.get('started')}): wait for it or choose another --output_dir; if that process is gone, "
                f"delete {path}"
            ) from None
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        try:
            with os.fdopen(descriptor, "w") as f:
                json.dump(holder, f)
        except OSError as error:
            # An empty lock would block the next run for 10 s and then be taken over: leave none.
            os.remove(path)
            raise storage_error(error, "the run's lock", output_dir) or error from None
        atexit.register(release_output_lock, path)
        return path
    raise UsageError(
        f"--output_dir {output_dir}: could not take {path} (another run keeps taking it): choose another --output_dir"
    )


# --------------------------------------------------------------------------------------------------
# Checkpoints: settings, completeness, atomic saves
# --------------------------------------------------------------------------------------------------


def run_settings(args, accelerator=None, pair_data: Optional[dict] = None) -> dict:
    """What a checkpoint records of its run; ``pair_data`` is ``PairImages.fingerprint()``, checked on resume by
    ``check_resume_pairs`` (not by the settings comparison, which names flags)."""
    settings = {name: getattr(args, name) for name in TRAINING_SETTINGS if hasattr(args, name)}
    settings["max_train_steps"] = args.max_train_steps
    if accelerator is not None:
        settings["num_processes"] = accelerator.num_processes
        settings["mixed_precision"] = accelerator.mixed_precision
    if pair_data is not None:
        settings["pair_data"] = pair_data
    return json.loads(json.dumps(settings))  # as stored: tuples become lists


def read_checkpoint_record(path: str) -> Optional[dict]:
    try:
        with open(os.path.join(path, CHECKPOINT_MARKER)) as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def is_complete(path: str) -> bool:
    return read_checkpoint_record(path) is not None


def complete_checkpoints(output_dir: str) -> List[str]:
    """``checkpoint-<step>`` folders whose marker exists, oldest first; the others are named in a warning."""
    if not os.path.isdir(output_dir):
        return []
    found, broken = [], []
    for name in os.listdir(output_dir):
        match = _SAVE_FOLDER.match(name)
        if not match or match.group(2) or not os.path.isdir(os.path.join(output_dir, name)):
            continue
        path = os.path.join(output_dir, name)
        (found if is_complete(path) else broken).append((int(match.group(1)), path))
    if broken:
        logger.warning(
            "skipping incomplete checkpoint(s) %s (no %s: a save was interrupted, or it predates it); "
            "pass one to --resume_from_checkpoint explicitly if you know it is complete",
            ", ".join(path for _, path in sorted(broken)),
            CHECKPOINT_MARKER,
        )
    return [path for _, path in sorted(found)]


def recover_interrupted_saves(output_dir: str):
    """Put back under its name the complete checkpoint of a save that was killed; drop leftovers. Main process only."""
    if not os.path.isdir(output_dir):
        return
    steps = {}
    for name in os.listdir(output_dir):
        match = _SAVE_FOLDER.match(name)
        if match and os.path.isdir(os.path.join(output_dir, name)):
            steps.setdefault(int(match.group(1)), {})[match.group(2) or ""] = os.path.join(output_dir, name)
    for step, folders in sorted(steps.items()):
        final = os.path.join(output_dir, f"checkpoint-{step}")
        staging, replaced = folders.get(STAGING_SUFFIX), folders.get(REPLACED_SUFFIX)
        if not is_complete(final):
            # The newest complete save of this step wins: the staged one, else the one it was replacing.
            candidate = next((path for path in (staging, replaced) if path and is_complete(path)), None)
            if candidate is None:
                continue  # nothing complete to restore; complete_checkpoints warns about the folder
            if os.path.isdir(final):
                os.replace(final, final + ".broken")
                shutil.rmtree(final + ".broken")
            os.replace(candidate, final)
            logger.warning("recovered %s from an interrupted save (%s)", final, os.path.basename(candidate))
        for leftover in (staging, replaced):
            if leftover and os.path.isdir(leftover):
                shutil.rmtree(leftover)


def make_room_for_checkpoint(output_dir: str, total_limit: Optional[int], checkpoints: List[str]):
    """Before a save, drop the oldest checkpoints beyond ``total_limit - 1`` (never the last one), so the space
    is free before it is needed."""
    if total_limit is None:
        return
    keep = max(total_limit - 1, 1)
    for stale in checkpoints[:-keep]:
        shutil.rmtree(stale)


def checkpoint_bytes(adapter_parameters: int) -> int:
    """The size of one checkpoint: the fp32 adapter, AdamW's two moments of it, and a little for the rest."""
    return 3 * 4 * adapter_parameters + 64 * 1024


def check_free_space(args, adapter_parameters) -> int:
    """Refuse, before training, an ``--output_dir`` without room for the final adapter and the checkpoints kept on
    the way (checked on every process: they share the folder). Returns the size of one checkpoint in bytes."""
    count = (
        sum(p.numel() for p in adapter_parameters) if not isinstance(adapter_parameters, int) else adapter_parameters
    )
    one = checkpoint_bytes(count)
    saves = max(args.max_train_steps - 1, 0) // args.checkpointing_steps
    kept = min(saves, args.checkpoints_total_limit) if args.checkpoints_total_limit else saves
    needed = 4 * count + kept * one + 1024 * 1024
    free = shutil.disk_usage(args.output_dir).free
    if free < needed:
        raise StorageError(
            f"--output_dir {args.output_dir} has {free / 2**20:.1f} MiB free, the run needs about "
            f"{needed / 2**20:.1f} MiB (the adapter and {kept} checkpoint(s) of {one / 2**20:.1f} MiB): free space, "
            f"lower --checkpoints_total_limit or choose another --output_dir"
        )
    return one


def save_failed(error: Exception, staging: str, output_dir: str, needed_bytes: Optional[int] = None) -> Exception:
    """Clean a failed save and say what is kept; the caller raises the result (a StorageError when the disk or
    its permissions were the cause, else a TrainingHalted)."""
    shutil.rmtree(staging, ignore_errors=True)
    kept = complete_checkpoints(output_dir)
    reason = storage_reason(error)
    line = (
        f"could not save {os.path.basename(staging)[: -len(STAGING_SUFFIX)]} in {output_dir} "
        f"({reason or type(error).__name__ + ': ' + str(getattr(error, 'strerror', None) or error)}"
        f"{f'; one checkpoint needs about {needed_bytes / 2**20:.1f} MiB' if needed_bytes else ''}); "
        f"{'the previous checkpoints are intact, latest ' + kept[-1] if kept else 'no earlier checkpoint exists'}. "
        f"Free space (or set --checkpoints_total_limit) and resume with --resume_from_checkpoint latest"
    )
    return StorageError(line) if reason else TrainingHalted(line)


def finish_checkpoint(staging: str, final: str, step: int, settings: Optional[dict]):
    """Write the marker last into the staged save, then swap it in by renames only."""
    marker = os.path.join(staging, CHECKPOINT_MARKER)
    with open(marker + ".part", "w") as f:
        json.dump({"step": step, "complete": True, "settings": settings or {}}, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(marker + ".part", marker)
    if os.path.exists(final):
        # A kill between these renames leaves the complete old and new saves, which recovery resolves.
        replaced = final + REPLACED_SUFFIX
        if os.path.exists(replaced):
            shutil.rmtree(replaced)
        os.replace(final, replaced)
        os.replace(staging, final)
        shutil.rmtree(replaced)
    else:
        os.replace(staging, final)


def checkpoint_step(path: str) -> int:
    match = CHECKPOINT_PATTERN.match(os.path.basename(os.path.normpath(path)))
    if not match:
        raise UsageError(f"--resume_from_checkpoint {path}: not a checkpoint-<step> folder")
    return int(match.group(1))


def resolve_resume_path(resume_from_checkpoint: Optional[str], output_dir: str) -> Optional[str]:
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = complete_checkpoints(output_dir)
        if not checkpoints:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s, starting a new run", output_dir)
            return None
        return checkpoints[-1]
    path = resume_from_checkpoint
    if not os.path.isdir(path) and os.path.isdir(os.path.join(output_dir, path)):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path):
        raise UsageError(
            f"--resume_from_checkpoint {resume_from_checkpoint} does not exist: give a checkpoint folder or 'latest'"
        )
    checkpoint_step(path)
    return path


# --------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------


def _checkpoint_lora_layout(path: str):
    """(ranks, adapts cross-attention) of a checkpoint's adapter file; refuses an unreadable one."""
    from .input_checks import LORA_DOWN_SUFFIXES, read_lora_file

    tensors = read_lora_file(os.path.join(path, CHECKPOINT_FILES[0]), f"checkpoint {path}")
    ranks = {
        tensor.shape[0] for key, tensor in tensors.items() if key.endswith(LORA_DOWN_SUFFIXES) and tensor.ndim == 2
    }
    return ranks, any(".attn2." in key for key in tensors)


def check_resume_checkpoint(path: str, args, accelerator=None):
    """Refuse a checkpoint that is incomplete, unreadable, of another adapter, or made with other settings."""
    missing = [name for name in CHECKPOINT_FILES if not os.path.isfile(os.path.join(path, name))]
    if missing:
        raise UsageError(
            f"checkpoint {path} is incomplete or not a DUO checkpoint (no {', '.join(missing)}): "
            f"resume from another checkpoint, or drop --resume_from_checkpoint"
        )
    ranks, has_cross_attention = _checkpoint_lora_layout(path)
    if ranks and ranks != {args.rank}:
        raise UsageError(
            f"checkpoint {path} holds a rank-{min(ranks)} adapter but --rank is {args.rank}: pass --rank {min(ranks)}"
        )
    if getattr(args, "lora_target", None) == "self_attn" and has_cross_attention:
        raise UsageError(
            f"checkpoint {path} adapts cross-attention too, but --lora_target is self_attn: pass --lora_target attn"
        )
    match = _SAVE_FOLDER.match(os.path.basename(os.path.normpath(path)))
    step = int(match.group(1)) if match else None
    if step is not None and step > args.max_train_steps:
        raise UsageError(
            f"checkpoint {path} is at step {step}, beyond --max_train_steps {args.max_train_steps}: "
            f"pass --max_train_steps {step} or more, or resume from an earlier checkpoint"
        )
    record = read_checkpoint_record(path)
    if record is None:
        logger.warning("checkpoint %s predates recorded settings: resuming without checking them", path)
        return
    stored, current = record.get("settings") or {}, run_settings(args, accelerator)
    names = settings_changes(stored, current)
    if "max_train_steps" in names and current.get("lr_scheduler") == "constant":
        names.remove("max_train_steps")  # a constant rate does not depend on the run's length
    if names:
        listing = "; ".join(f"--{name} {stored[name]!r} (checkpoint) vs {current[name]!r}" for name in names[:6])
        raise UsageError(
            f"checkpoint {path} was trained with other settings ({listing}): resume with the checkpoint's values, "
            f"or start a new run in another --output_dir"
        )


# What a run writes at the top of --output_dir, and how to tell that an earlier DUO run wrote it.
CARD_NAME = "README.md"
CARD_MARK = "- concept-erasure"  # a tag every DUO model card carries in its metadata
CONFIG_NAME = "duo_config.json"
ADAPTER_NAME = LORA_WEIGHT_NAME


def check_foreign_files(output_dir: str):
    """Refuse an ``--output_dir`` holding a model card or an adapter that no DUO run wrote: the run would replace
    them. Files of an earlier DUO run (the card's tag, ``duo_config.json`` beside the adapter) are replaced."""
    card = os.path.join(output_dir, CARD_NAME)
    foreign = []
    if os.path.isfile(card):
        with open(card, errors="replace") as f:
            head = f.read(4096)
        if not (head.startswith("---") and CARD_MARK in head.split("\n---", 1)[0]):
            foreign.append(CARD_NAME)
    if os.path.isfile(os.path.join(output_dir, ADAPTER_NAME)) and not os.path.isfile(
        os.path.join(output_dir, CONFIG_NAME)
    ):
        foreign.append(ADAPTER_NAME)
    if foreign:
        raise UsageError(
            f"--output_dir {output_dir} holds {' and '.join(foreign)} that no DUO run wrote, which this run would "
            f"replace: choose an empty --output_dir (or move the file(s) away)"
        )


def pair_data_differences(stored: dict, current: dict, limit: int = 5) -> List[str]:
    """What changed between the pair data a checkpoint was trained on and the data given now, pair by pair."""
    if stored == current:
        return []
    before, now = len(stored.get("unsafe", [])), len(current["unsafe"])
    changes = [] if before == now else [f"{before} pairs then, {now} now"]
    old_prompts = stored.get("prompts", [None] * before)
    for index, (old_unsafe, old_safe, old_prompt, unsafe, safe, prompt) in enumerate(
        zip(
            stored.get("unsafe", []),
            stored.get("safe", []),
            old_prompts,
            *(current[k] for k in ("unsafe", "safe", "prompts")),
        )
    ):
        if (old_unsafe, old_safe) == (safe, unsafe) and unsafe != safe:
            what = ["unsafe and safe images swapped"]
        else:
            what = [
                f"{name} image changed"
                for name, a, b in (("unsafe", old_unsafe, unsafe), ("safe", old_safe, safe))
                if a != b
            ]
        if old_prompt != prompt:
            what.append("prompts changed")
        if what:
            changes.append(f"pair {index}: {', '.join(what)}")
    hidden = len(changes) - limit
    return changes[:limit] + ([f"{hidden} more"] if hidden > 0 else [])


def check_resume_pairs(args, fingerprint: dict):
    """Refuse to resume a checkpoint on pair data other than the data it was trained on (a swap of the safe and
    unsafe folders would otherwise train the reversed preference without a word)."""
    path = resolve_resume_path(args.resume_from_checkpoint, args.output_dir)
    record = read_checkpoint_record(path) if path is not None else None
    stored = (record or {}).get("settings", {}).get("pair_data")
    if not isinstance(stored, dict):
        return  # no checkpoint, or one that predates the record (the settings check warned already)
    changes = pair_data_differences(stored, fingerprint)
    if changes:
        raise UsageError(
            f"checkpoint {path} was trained on other pair data ({'; '.join(changes)}): resume with the data it was "
            f"trained on, or start a new run in another --output_dir"
        )


def claim_output_dir(args, accelerator):
    """Lock ``--output_dir``, restore interrupted checkpoint saves, and check the checkpoint to resume from,
    before any weight is loaded. Every process gets the same refusal."""
    refusal = None
    if accelerator.is_main_process:
        try:
            if os.path.isdir(args.output_dir):
                check_foreign_files(args.output_dir)
            acquire_output_lock(args.output_dir)
            recover_interrupted_saves(args.output_dir)
        except UsageError as error:
            refusal = str(error)
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        refusal = broadcast_object_list([refusal])[0]
    if refusal is not None:
        raise UsageError(refusal)
    accelerator.wait_for_everyone()
    path = resolve_resume_path(args.resume_from_checkpoint, args.output_dir)
    if path is not None:
        check_resume_checkpoint(path, args, accelerator)
