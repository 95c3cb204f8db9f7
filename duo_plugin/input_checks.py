"""Refusals of bad input that the flag parser and the loaders cannot see, each in one line naming the fix.

Numbers that argparse accepts but that would crash later or silently train the wrong thing (NaN, 0,
negative), pair data that decodes to the wrong pixels or to no preference at all, prompt files that are
not text, and adapter files whose weights cannot be what their config says.
"""

import json
import logging
import math
import os
from typing import TYPE_CHECKING, Dict, Iterable, List, Optional, Sequence

import numpy as np

from .errors import UsageError


if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------------


def check_finite_flags(args, names: Optional[Iterable[str]] = None):
    """Refuse a NaN or infinite float flag: argparse's ``float("nan")`` would pass every ``<``/``>`` test."""
    for name in names if names is not None else sorted(vars(args)):
        value = getattr(args, name, None)
        if isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"--{name} {value} is not a finite number: give a real value")


def at_least(args, name: str, minimum: int, hint: str = ""):
    value = getattr(args, name, None)
    if value is not None and value < minimum:
        raise UsageError(f"--{name} must be at least {minimum}, got {value}" + (f": {hint}" if hint else ""))


def scheduler_names() -> List[str]:
    from diffusers.optimization import SchedulerType

    return [member.value for member in SchedulerType]


def check_training_args(args):
    """Every flag of a training run that can be checked before anything is loaded (after the preset filled them)."""
    check_finite_flags(args)
    if args.resolution < 8:
        raise UsageError(
            f"--resolution {args.resolution} is too small: give a positive multiple of 8 (512 for SD 1.x)"
        )
    if args.beta_dpo <= 0:
        raise UsageError(f"--beta_dpo must be positive, got {args.beta_dpo}")
    if args.learning_rate <= 0:
        raise UsageError(f"--learning_rate must be positive, got {args.learning_rate}")
    if args.preservation_weight < 0:
        raise UsageError(f"--preservation_weight must be at least 0, got {args.preservation_weight}")
    at_least(args, "rank", 1, "LoRA rank, e.g. 32")
    at_least(args, "lora_alpha", 1)
    at_least(args, "max_train_steps", 1, "a run of 0 steps would save an adapter that changes nothing")
    at_least(args, "checkpointing_steps", 1, "save a checkpoint every N steps")
    at_least(args, "validation_steps", 1)
    at_least(args, "num_pairs", 1)
    at_least(args, "lr_warmup_steps", 0)
    at_least(args, "lr_num_cycles", 1)
    at_least(args, "t_min", 0)
    if not args.skip_validation:
        at_least(args, "num_validation_images", 1, "or pass --skip_validation")
        at_least(args, "num_validation_inference_steps", 1, "or pass --skip_validation")
    for name in ("seed", "generation_seed"):
        value = getattr(args, name, None)
        if value is not None and not 0 <= value < 2**32:
            raise UsageError(f"--{name} must be between 0 and 2**32 - 1, got {value}")
    if args.lr_scheduler not in scheduler_names():
        raise UsageError(f"unknown --lr_scheduler {args.lr_scheduler}: choose from {', '.join(scheduler_names())}")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise UsageError(f"--{name} must be in [0, 1), got {getattr(args, name)}")
    if args.adam_epsilon <= 0 or args.adam_weight_decay < 0 or args.max_grad_norm <= 0:
        raise UsageError("--adam_epsilon and --max_grad_norm must be positive and --adam_weight_decay at least 0")
    check_output_dir(args.output_dir)


def check_zero2_optimizer(use_8bit_adam: bool):
    """Under DeepSpeed ZeRO-2 a checkpoint gathers AdamW's moments weight by weight; bitsandbytes' 8-bit state
    (block-wise codes and scales) has no such layout."""
    if use_8bit_adam:
        raise UsageError(
            "--use_8bit_adam does not run under DeepSpeed ZeRO-2 (its 8-bit optimizer state cannot be gathered into "
            "a checkpoint): drop --use_8bit_adam (ZeRO-2 already splits the optimizer state across GPUs) or use FSDP"
        )


def check_output_file(path: str, flag: str):
    """Refuse an output file that is a folder, or whose folder is missing or not writable, before any work."""
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder: give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{flag} {path}: the folder {folder} does not exist: create it or give another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: the folder {folder} is not writable: choose a folder you can write to")


def check_resolution(value: Optional[int], flag: str = "--resolution"):
    if value is not None and (value < 8 or value % 8):
        raise UsageError(f"{flag} {value} is not a positive multiple of 8: the VAE downsamples by 8 (512 for SD 1.x)")


def check_output_dir(output_dir: str, flag: str = "--output_dir"):
    """Refuse an output folder that is a file or cannot be created or written, before any work."""
    path = os.path.abspath(output_dir)
    if os.path.exists(path) and not os.path.isdir(path):
        raise UsageError(f"{flag} {output_dir} is a file: give a folder")
    existing = path
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise UsageError(f"{flag} {output_dir} cannot be created: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {output_dir} is not writable ({existing}): choose a folder you can write to")


# --------------------------------------------------------------------------------------------------
# Text files
# --------------------------------------------------------------------------------------------------


def not_utf8_error(path: str, error: UnicodeDecodeError) -> UsageError:
    return UsageError(
        f"{path} is not UTF-8 text (byte {error.object[error.start : error.start + 1].hex()} at offset {error.start}): "
        f"save it as UTF-8"
    )


def read_text_lines(path: str) -> List[str]:
    """The non-empty, stripped lines of a UTF-8 text file."""
    try:
        with open(path, encoding="utf-8") as f:
            return [line.strip() for line in f if line.strip()]
    except UnicodeDecodeError as error:
        raise not_utf8_error(path, error) from None


# --------------------------------------------------------------------------------------------------
# Pair data
# --------------------------------------------------------------------------------------------------


def json_object_rows(path: str, lines: Iterable[str]):
    """``(line number, row)`` of each non-blank line of a JSON-lines file a person may have edited; a line that is
    not a JSON object is refused naming the file and the line."""
    for line_number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise UsageError(
                f"{path}, line {line_number}: not a JSON object ({error.msg}): fix or remove that line"
            ) from None
        if not isinstance(row, dict):
            raise UsageError(f"{path}, line {line_number}: not a JSON object: fix or remove that line")
        yield line_number, row


def check_pair_metadata(folder: str, metadata_name: str = "metadata.jsonl"):
    """Refuse metadata.jsonl rows that are not JSON objects or name files outside the folder or missing.

    datasets' own error for these names neither the line nor the problem.
    """
    path = os.path.join(folder, metadata_name)
    try:
        with open(path, encoding="utf-8") as f:
            lines = list(f)
    except UnicodeDecodeError as error:
        raise not_utf8_error(path, error) from None
    for line_number, row in json_object_rows(path, lines):
        for key, value in row.items():
            if not key.endswith("file_name"):
                continue
            if not isinstance(value, str) or not value:
                raise UsageError(f"{path}, line {line_number}: {key} must be a file name, got {value!r}")
            if os.path.isabs(value) or os.path.splitdrive(value)[0]:
                raise UsageError(
                    f"{path}, line {line_number}: {key} {value!r} is an absolute path: name files relative to {folder}"
                )
            if ".." in value.replace("\\", "/").split("/"):
                raise UsageError(
                    f"{path}, line {line_number}: {key} {value!r} leaves the pair folder: name files inside {folder}"
                )
            if not os.path.isfile(os.path.join(folder, value)):
                raise UsageError(f"{path}, line {line_number}: {key} {value!r} does not exist in {folder}")
            if not is_inside(os.path.join(folder, value), folder):
                raise UsageError(
                    f"{path}, line {line_number}: {key} {value!r} is a link that leads out of {folder}: copy the file "
                    f"into the pair folder instead"
                )


def is_inside(path: str, folder: str) -> bool:
    """Whether ``path``, links resolved, lies inside ``folder`` (links resolved too)."""
    root = os.path.realpath(folder)
    return os.path.commonpath([os.path.realpath(path), root]) == root


def to_rgb(image):
    """An RGB copy of any PIL image, scaling 16- and 32-bit channels to 8 bits (``convert`` clips them to white)."""
    from PIL import Image

    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        if image.mode.startswith("I;16"):
            scaled = array / 65535.0
        else:
            # 32-bit integers and floats carry no range: PNG stores 16-bit grayscale as "I", TIFF writers store
            # 8-bit values as 32-bit, float images come in [0, 1] or [0, 255]. The smallest range that holds the
            # values is taken (the old fixed ranges turned such images black or white, and every pair "identical").
            peak = array.max(initial=0)
            limits = (1.0, 255.0, 65535.0) if image.mode == "F" else (255.0, 65535.0)
            scaled = array / next((limit for limit in limits if peak <= limit), max(float(peak), 1.0))
        gray = (np.clip(scaled, 0.0, 1.0) * 255.0).round().astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image.convert("RGB")


def check_pair_contents(
    unsafe: Sequence,
    safe: Sequence,
    unsafe_files: Sequence[Optional[str]],
    safe_files: Sequence[Optional[str]],
    dataset: str,
):
    """Refuse a pair whose two images are the same (it teaches nothing); warn on pairs listed twice."""
    seen: Dict[tuple, int] = {}
    duplicates = []
    for row, (a, b, a_file, b_file) in enumerate(zip(unsafe, safe, unsafe_files, safe_files)):
        same_file = a_file is not None and b_file is not None and os.path.realpath(a_file) == os.path.realpath(b_file)
        if same_file or (a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))):
            what = f"both name {os.path.basename(a_file)}" if same_file else "its unsafe and safe images are identical"
            raise UsageError(
                f"pair {row} of {dataset}: {what}, so it holds no preference: give the safe SDEdit twin, or remove that pair"
            )
        key = (os.path.realpath(a_file), os.path.realpath(b_file)) if a_file and b_file else None
        if key is not None:
            if key in seen:
                duplicates.append((seen[key], row))
            else:
                seen[key] = row
    if duplicates:
        listing = ", ".join(f"{later} repeats {first}" for first, later in duplicates[:5])
        logger.warning(
            "%s lists %d pair(s) twice (%s%s): they are trained on more often than the others; remove the repeated rows "
            "if that is not intended",
            dataset,
            len(duplicates),
            listing,
            ", ..." if len(duplicates) > 5 else "",
        )
    return len(duplicates)


# --------------------------------------------------------------------------------------------------
# Adapter files
# --------------------------------------------------------------------------------------------------

LORA_DOWN_SUFFIXES = (".lora.down.weight", ".lora_A.weight")
LORA_UP_SUFFIXES = (".lora.up.weight", ".lora_B.weight")


def read_tensor_file(path: str, source: str):
    """The tensors of a ``.safetensors`` file (a dict), a ``.npy`` array or a ``.pt``/``.bin`` file (whatever tensors
    it holds), read without running code: pickles that are not plain tensors, object arrays and garbage are refused
    with one line naming the file, never loaded."""
    import torch

    kind = os.path.splitext(path)[1].lower()
    try:
        if kind == ".safetensors":
            from safetensors.torch import load_file

            return load_file(path)
        if kind == ".npy":
            return torch.from_numpy(np.load(path, allow_pickle=False))
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # each reader raises its own types: UnpicklingError, ValueError, SafetensorError
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else "unreadable"
        raise UsageError(
            f"refused {source} {path}: not a plain {kind or 'tensor'} file of tensors ({type(error).__name__}: "
            f"{first}); nothing in it was run: give a file of weights only (safetensors is safest)"
        ) from None


def read_lora_file(path: str, source: str) -> Dict[str, "torch.Tensor"]:
    """Every tensor of an adapter's safetensors file; a truncated or empty file is refused, not a traceback."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(path)
    except Exception as error:  # safetensors raises its own error type for a cut file, OSError for others
        raise UsageError(
            f"adapter {source}: {os.path.basename(path)} is not a readable safetensors file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'unreadable'}): it may be truncated; copy it again or re-run the training"
        ) from None
    if not tensors:
        raise UsageError(
            f"adapter {source}: {os.path.basename(path)} holds no tensor: copy it again or re-run the training"
        )
    return tensors


def check_lora_tensors(
    tensors: Dict[str, "torch.Tensor"], source: str, expected_rank: Optional[int] = None, modules=None
):
    """Refuse non-finite weights, a rank other than the config's, and keys or shapes the model does not have.

    ``modules`` maps a component prefix (``unet``, ``transformer``) to that module of the pipeline.
    """
    import torch

    non_finite = [
        key for key, tensor in tensors.items() if tensor.is_floating_point() and not torch.isfinite(tensor).all()
    ]
    if non_finite:
        raise UsageError(
            f"adapter {source} holds non-finite weights (NaN/inf) in {len(non_finite)} tensor(s), e.g. {non_finite[0]}: "
            f"its training diverged; use an earlier checkpoint or re-train with a lower --learning_rate"
        )
    ranks = {}
    for key, tensor in tensors.items():
        if key.endswith(LORA_DOWN_SUFFIXES) and tensor.ndim == 2:
            ranks[key] = tensor.shape[0]
    if expected_rank is not None:
        other = {key: rank for key, rank in ranks.items() if rank != expected_rank}
        if other:
            key, rank = next(iter(other.items()))
            raise UsageError(
                f"adapter {source}: duo_config.json says rank {expected_rank} but the weights have rank {rank} ({key}): "
                f"the config and the weights come from different runs; copy both from the same output folder"
            )
    if modules is None:
        return
    for key, tensor in tensors.items():
        if key.endswith(".alpha") and tensor.numel() == 1:
            continue  # kohya-style per-layer alpha: a scalar, no shape to check
        suffix = next((s for s in LORA_DOWN_SUFFIXES + LORA_UP_SUFFIXES if key.endswith(s)), None)
        prefix, _, rest = key.partition(".")
        if suffix is None or prefix not in modules:
            raise UsageError(
                f"adapter {source} has a weight {key} that is no LoRA weight of {', '.join(sorted(modules))}: "
                f"it was made for another model; give the adapter trained on this base"
            )
        module_name = rest[: -len(suffix)]
        try:
            layer = modules[prefix].get_submodule(module_name)
        except AttributeError:
            layer = None
        in_features, out_features = getattr(layer, "in_features", None), getattr(layer, "out_features", None)
        if in_features is None:
            raise UsageError(
                f"adapter {source} has a weight for {prefix}.{module_name}, which this model lacks: "
                f"it was made for another model; give the adapter trained on this base"
            )
        expected = (tensor.shape[0], in_features) if suffix in LORA_DOWN_SUFFIXES else (out_features, tensor.shape[1])
        if tuple(tensor.shape) != expected:
            raise UsageError(
                f"adapter {source}: {key} has shape {tuple(tensor.shape)}, but {prefix}.{module_name} needs {expected}: "
                f"it was made for another model; give the adapter trained on this base"
            )


def check_adapter_weights(pipe, adapter):
    """Read a DUO adapter's weights and check them against its config and the pipeline, before peft sees them."""
    tensors = read_lora_file(os.path.join(adapter.folder, adapter.weight_name), adapter.source)
    modules = {
        name: getattr(pipe, name)
        for name in ("unet", "transformer", "text_encoder")
        if getattr(pipe, name, None) is not None
    }
    check_lora_tensors(tensors, adapter.source, adapter.config.get("rank"), modules)


# --------------------------------------------------------------------------------------------------
# Generated images
# --------------------------------------------------------------------------------------------------


def is_blank(image) -> bool:
    """True for an image of one colour: what a NaN generation decodes to (black), never a real sample."""
    array = np.asarray(image)
    if array.size == 0:
        return True
    pixels = array.reshape(-1, array.shape[-1]) if array.ndim == 3 else array.reshape(-1, 1)
    return bool((pixels == pixels[0]).all())


def blank_counts_as_flagged(image_paths: Sequence[str], detections: List) -> List:
    """Blank (e.g. NaN) generations never count as safe: they are flagged with the label ``blank``."""
    from PIL import Image

    from .detectors import Detection

    marked, num_blank = [], 0
    for path, detection in zip(image_paths, detections):
        with Image.open(path) as image:
            blank = is_blank(image.convert("RGB"))
        num_blank += blank
        marked.append(Detection(True, 1.0, ["blank"]) if blank else detection)
    if num_blank:
        logger.warning(
            "%d of %d images are blank (one colour, as NaN outputs decode): counted as unsafe, never as safe",
            num_blank,
            len(marked),
        )
    return marked
