"""``--t_max auto`` of the training scripts: the diagnostic run once before training (its result cached beside the pair
folder), its recommendation used as ``--t_max``."""

import os
from typing import Optional, Tuple

from ..files import read_state_json
from ..settings import with_values
from .cli import parse_args
from .diagnostic import run_timing
from .records import RESULT_NAME


def resolve_t_max(args, preset, accelerator, default: int) -> Tuple[int, Optional[dict]]:
    """``(t_max, measurement)``: ``args.t_max`` as an integer, the default when unset, measured when ``auto`` (cached
    in ``<pair folder>-timing``); the measurement (recorded in duo_config.json and the model card) is None unless
    measured. ``args`` is only read: a run's settings are read-only (duo_plugin.settings).
    """
    if args.t_max is None:
        return default, None
    if args.t_max != "auto":
        return args.t_max, None
    folder = (
        args.dataset_name
        if args.dataset_name and os.path.isdir(args.dataset_name)
        else getattr(args, "pairs_dir", None)
    )
    # Beside the pair folder, not in it: a pair folder is read as an image dataset.
    cache = folder.rstrip("/\\") + "-timing" if folder else os.path.join(args.output_dir or ".", "timing")
    flags = parse_args(
        [
            "--pretrained_model_name_or_path",
            args.pretrained_model_name_or_path,
            "--concept",
            preset.name,
            "--output_dir",
            cache,
            "--seed",
            "0",
            "--curves",
            "empty",
            *(["--revision", args.revision] if args.revision else []),
            *(["--variant", args.variant] if args.variant else []),
            *(["--detector", args.verifier] if getattr(args, "verifier", None) else []),
            *(
                ["--detector_threshold", str(args.detector_threshold)]
                if getattr(args, "detector_threshold", None) is not None
                else []
            ),
            *(["--pairs_dir", folder] if folder and os.path.isfile(os.path.join(folder, "metadata.jsonl")) else []),
            *(
                ["--guidance_scale", str(args.guidance_scale)]
                if getattr(args, "guidance_scale", None) is not None
                else []
            ),
            *(
                ["--num_inference_steps", str(args.num_inference_steps)]
                if getattr(args, "num_inference_steps", None)
                else []
            ),
            *(["--resolution", str(args.resolution)]),
        ]
    )
    # The preset's prompts (a custom concept's included) come from ``preset``, not from the flags.
    timing_args = with_values(
        flags,
        unsafe_prompt=[u for u, _ in preset.prompt_pairs],
        safe_prompt=[s for _, s in preset.prompt_pairs],
        detector=flags.detector or preset.detector,
    )
    result_path = os.path.join(cache, RESULT_NAME)
    if not os.path.isfile(result_path):
        run_timing(timing_args)
    accelerator.wait_for_everyone()
    result = read_state_json(result_path, f"delete {cache} to measure again")
    measurement = {
        "file": os.path.abspath(result_path),
        "committed_timestep": result["committed_timestep"],
        "open_timestep": result["open_timestep"],
        "recommended_t_max": result["recommended_t_max"],
        "verdict": result["verdict"],
    }
    return int(result["recommended_t_max"]), measurement
