"""The README's first command: run what this machine can run.

    python -m duo_plugin.quickstart              # after pip install -r requirements.txt && pip install -e .

With a CUDA GPU it runs the real recipe: ``train_duo.py --concept nudity --mixed_precision fp16`` on
Stable Diffusion 1.4 (downloaded from the Hub, pairs generated and verified, adapter in ``duo-nudity/``).
Without one it says so in one line and runs the CPU toy demo (``examples/toy_world/run_demo.py``): the
whole product on a tiny committed model, no download. Extra flags go to the command it runs, so
``python -m duo_plugin.quickstart --output_dir elsewhere`` works on both. ``--dry_run`` prints the
command without running it.

The job runs as one plain ``python`` process (not ``accelerate launch``), so a refusal is the last line
shown and its exit code (2) is this command's exit code.
"""

import argparse
import os
import shlex
import shutil
import sys
from pathlib import Path
from typing import List, Optional, Tuple

from .errors import UsageError, exit_on_usage_error
from .help_defaults import show_defaults


REPO_ROOT = Path(__file__).resolve().parents[1]
GPU_RECIPE = ["train_duo.py", "--concept", "nudity", "--mixed_precision", "fp16", "--output_dir", "duo-nudity"]
CPU_DEMO = ["examples/toy_world/run_demo.py"]
# Stable Diffusion 1.4's fp32 safetensors (UNet, text encoder, VAE, safety checker) as listed on the Hub,
# plus room for the pairs and the adapter.
GPU_RECIPE_DISK_GB = 8


def has_cuda_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def choose_job(has_gpu: bool, extra: List[str], repo_root: Path = REPO_ROOT) -> Tuple[str, List[str]]:
    """(the line that says what runs and why, the command) for this machine."""
    script, *flags = GPU_RECIPE if has_gpu else CPU_DEMO
    path = repo_root / script
    if not path.is_file():
        raise UsageError(
            f"{script} is not next to this duo_plugin ({repo_root}): the quickstart runs from a clone of the "
            f"repository; install it with `pip install -e .` from the clone and run the command there"
        )
    command = [sys.executable, str(path), *flags, *extra]
    if has_gpu:
        return (
            "CUDA GPU found: training DUO on Stable Diffusion 1.4 (the nudity recipe; adapter in "
            f"{flag_value(extra, '--output_dir', 'duo-nudity')}/)",
            command,
        )
    return (
        "No CUDA GPU found: the real recipe needs one; running the CPU toy demo instead "
        f"(about 8 min on 2 idle cores, reports in {flag_value(extra, '--output_dir', 'runs/toy_world')}/<concept>/report.md)",
        command,
    )


def flag_value(argv: List[str], flag: str, default: str) -> str:
    """The value ``argv`` gives ``flag`` (``--flag V`` or ``--flag=V``; the last one wins, as argparse reads it)."""
    value = default
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def low_disk_warning(required_gb: float = GPU_RECIPE_DISK_GB) -> Optional[str]:
    """A line when the Hugging Face cache's disk has less room than the real recipe downloads."""
    from huggingface_hub import constants

    folder = Path(constants.HF_HUB_CACHE)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    free_gb = shutil.disk_usage(folder).free / 1e9
    if free_gb < required_gb:
        return f"warning: {free_gb:.1f} GB free under {folder}; the recipe needs about {required_gb} GB (set HF_HOME to a larger disk)"
    return None


@exit_on_usage_error
def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description="Run what this machine can: the DUO recipe on a CUDA GPU, else the CPU toy demo. Other flags go to that command.",
    )
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="print the command, do not run it")
    parser.add_argument("--cpu", action="store_true", help="run the CPU toy demo even where a GPU is present")
    args, extra = show_defaults(parser).parse_known_args(argv)
    has_gpu = not args.cpu and has_cuda_gpu()
    message, command = choose_job(has_gpu, extra)
    print(message, flush=True)
    if has_gpu:
        warning = low_disk_warning()
        if warning:
            print(warning, flush=True)
    print("+ " + shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    # The job replaces this process: its exit code (2 for a refusal) is this command's, Ctrl-C and kill
    # reach it directly, and nothing is left behind.
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
