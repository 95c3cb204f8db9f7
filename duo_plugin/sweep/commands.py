"""The command lines the sweep runs: the family's training script per run and ``duo_plugin.evaluate`` per model,
through ``accelerate launch`` when they use several processes."""

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence

from ..errors import UsageError
from ..settings import Settings, with_values
from .folder import EVAL_DIR
from .grid import Run


# duo_plugin/sweep/commands.py: three levels up is the checkout holding the training scripts.
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# The training script of each family (families.SCRIPT_OF_FAMILY), as the messages name them.
TRAINING_SCRIPTS_TEXT = (
    "train_duo.py (Stable Diffusion 1.x/2.x and XL), train_duo_sd3.py (SD3) or train_duo_flux.py (FLUX.1)"
)


def base_model_family(args) -> Optional[str]:
    """The base model's family from its model_index.json, or None when that cannot be read here (a Hub id offline:
    the training script then says what is wrong)."""
    from ..families import detect_pipeline_class, pipeline_family

    try:
        return pipeline_family(detect_pipeline_class(args.pretrained_model_name_or_path, None))
    except Exception:  # noqa: BLE001 - any failure to read the config leaves the choice to the user
        return None


def resolve_training_script(args) -> Settings:
    """``args`` with ``--training_script`` resolved: the base model's family's DUO script unless given; a DUO
    script of another family is refused, naming the right one (any other script is taken as given). ``args`` is
    only read."""
    from ..families import FAMILY_NAMES, SCRIPT_OF_FAMILY

    family = base_model_family(args)
    script = args.training_script
    if script is None:
        script = os.path.join(REPO_ROOT, SCRIPT_OF_FAMILY.get(family, "train_duo.py"))
    if not os.path.isfile(script):
        raise UsageError(f"--training_script {script} does not exist: give {TRAINING_SCRIPTS_TEXT}")
    name = os.path.basename(script)
    expected = SCRIPT_OF_FAMILY.get(family)
    if expected is not None and name in SCRIPT_OF_FAMILY.values() and name != expected:
        raise UsageError(
            f"--training_script {name} does not train {args.pretrained_model_name_or_path}, a {FAMILY_NAMES[family]} "
            f"model: give {expected} ({TRAINING_SCRIPTS_TEXT})"
        )
    return with_values(args, training_script=script)


@dataclass
class Command:
    """A product command line: the launcher, the program (a script path or ``-m module``) and its flags."""

    launcher: List[str]
    program: List[str]
    args: List[str]

    def argv(self) -> List[str]:
        return self.launcher + self.program + self.args


def accelerate_launcher(num_processes: int) -> List[str]:
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--dynamo_backend",
        "no",
        "--num_processes",
        str(num_processes),
    ]
    if num_processes > 1:
        launcher += ["--multi_gpu", "--main_process_port", "0"]
    return launcher


def concept_flags(args) -> List[str]:
    flags = ["--concept", args.concept]
    for prompt in args.unsafe_prompt or []:
        flags += ["--unsafe_prompt", prompt]
    for prompt in args.safe_prompt or []:
        flags += ["--safe_prompt", prompt]
    return flags


def training_command(args, run: Run, output_dir: str) -> Command:
    setting = run.setting
    flags = ["--pretrained_model_name_or_path", args.pretrained_model_name_or_path, *concept_flags(args)]
    if args.dataset_name:
        flags += ["--dataset_name", args.dataset_name]
    flags += [
        "--output_dir",
        output_dir,
        "--beta_dpo",
        f"{setting.beta_dpo!r}",
        "--preservation_weight",
        f"{setting.preservation_weight!r}",
        "--seed",
        str(run.seed),
    ]
    if setting.t_max is not None:
        flags += ["--t_max", str(setting.t_max)]
    if setting.max_train_steps is not None:
        flags += ["--max_train_steps", str(setting.max_train_steps)]
    if setting.objective is not None:
        flags += ["--objective", setting.objective]
    if setting.retain_weight is not None:
        flags += ["--retain_weight", f"{setting.retain_weight!r}"]
    # A run killed mid-way continues from its latest checkpoint (a fresh start when it has none).
    flags += ["--resume_from_checkpoint", "latest", *shlex.split(args.train_args)]
    return Command(accelerate_launcher(args.train_num_processes), [args.training_script], flags)


def evaluation_command(args, models: Sequence[str]) -> Command:
    flags = ["--base_model", args.pretrained_model_name_or_path, *concept_flags(args), *models]
    flags += ["--output_dir", os.path.join(args.output_dir, EVAL_DIR), *shlex.split(args.eval_args)]
    launcher = accelerate_launcher(args.eval_num_processes) if args.eval_num_processes > 1 else [sys.executable]
    return Command(launcher, ["-m", "duo_plugin.evaluate"], flags)


def run_in_subprocess(command: Command, log_path: str):
    """Run a command with its output in ``log_path``; on failure stop with the log's tail."""
    env = {**os.environ, "PYTHONPATH": REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with open(log_path, "w") as log:
        log.write("+ " + shlex.join(command.argv()) + "\n")
        log.flush()
        result = subprocess.run(command.argv(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT)
    if result.returncode != 0:
        with open(log_path) as log:
            tail = log.read()[-3000:]
        raise UsageError(
            f"{shlex.join(command.program)} failed (exit {result.returncode}); its log {log_path} ends with:\n{tail}"
        )
