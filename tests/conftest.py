import importlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile

import pytest


REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The training scripts are imported by name for in-process runs; the repository's duo_plugin wins over any install.
sys.path.insert(0, REPO_ROOT)
# The toy world (a demo, not part of the package) is imported by its tests as `toy_world`.
sys.path.insert(0, os.path.join(REPO_ROOT, "examples", "toy_world"))

# Tests never touch the network: everything they load is built here from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Under pytest-xdist (the README's `-n auto`) the cores are shared between the workers: each worker's torch, and
# the processes its tests start, get their share instead of every worker using every core.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    _threads = max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ.setdefault("OMP_NUM_THREADS", str(_threads))
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(autouse=True)
def isolated_hf_home(tmp_path_factory, monkeypatch):
    """Each test session gets its own Hugging Face cache, so datasets/hub caches never leak between runs."""
    home = tmp_path_factory.getbasetemp() / "hf_home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_DATASETS_CACHE", str(home / "datasets"))


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    from duo_plugin.testing import make_tiny_sd_pipeline

    return make_tiny_sd_pipeline(str(tmp_path_factory.mktemp("tiny_sd")))


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory):
    from duo_plugin.testing import make_tiny_sd_pipeline

    return make_tiny_sd_pipeline(str(tmp_path_factory.mktemp("tiny_sd_v")), prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory):
    from duo_plugin.testing import make_tiny_sd3_pipeline

    return make_tiny_sd3_pipeline(str(tmp_path_factory.mktemp("tiny_sd3")))


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory):
    from duo_plugin.testing import make_tiny_sdxl_pipeline

    return make_tiny_sdxl_pipeline(str(tmp_path_factory.mktemp("tiny_sdxl")))


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory):
    from duo_plugin.testing import make_tiny_flux_pipeline

    return make_tiny_flux_pipeline(str(tmp_path_factory.mktemp("tiny_flux")))


@pytest.fixture(scope="session")
def tiny_pairs(tmp_path_factory):
    from duo_plugin.testing import make_tiny_pair_folder

    return make_tiny_pair_folder(str(tmp_path_factory.mktemp("tiny_pairs")), num_pairs=4)


# A checkpoint of a two-process run: the adapter and the run state only (no model weights, no per-rank optimizer).
DDP_CHECKPOINT_FILES = [
    "duo_checkpoint.json",
    "optimizer.bin",
    "pytorch_lora_weights.safetensors",
    "random_states_0.pkl",
    "random_states_1.pkl",
    "scheduler.bin",
]


def sample_red_square(pipe):
    """Three sampling steps of an SD pipeline at a fixed seed, as numbers (the tests' before/after an adapter)."""
    import torch

    return pipe(
        "a red square", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images


def tiny_train_args(model, pairs, output_dir, *extra):
    """Flags for a fast train_duo.py run on the tiny pipeline."""
    return [
        "--pretrained_model_name_or_path",
        model,
        "--dataset_name",
        pairs,
        "--output_dir",
        str(output_dir),
        "--resolution",
        "32",
        "--rank",
        "4",
        "--max_train_steps",
        "4",
        "--gradient_accumulation_steps",
        "1",
        "--train_batch_size",
        "2",
        "--report_to",
        "none",
        "--num_validation_images",
        "1",
        "--num_validation_inference_steps",
        "2",
        *extra,
    ]


# Process groups the tests started whose members outlived their leader: the session fails if any is found.
LEAKED_PROCESSES = []


def run_in_own_group(command, env=None, cwd=REPO_ROOT):
    """Run ``command`` to completion in a new session (its own process group) and reap the whole group.

    No wall-clock limit: a loaded machine is slow, not wrong. Output goes to files, not pipes, so a process the
    command leaves behind cannot hold the test waiting for end-of-file. Whatever is left in the group when the
    leader exits (a launcher's worker, a backgrounded job), or when the test is interrupted, is killed.
    Returns ``(CompletedProcess, pids of the members found alive after the leader exited)``.
    """
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        process = subprocess.Popen(
            command, stdout=stdout, stderr=stderr, text=True, env=env, cwd=cwd, start_new_session=True
        )
        try:
            process.wait()
        finally:
            leftovers = kill_process_group(process.pid)
            if process.poll() is None:
                process.wait()
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(command, process.returncode, stdout.read(), stderr.read()), leftovers


def kill_process_group(pgid: int):
    """Kill every process still in group ``pgid``; returns their pids."""
    import psutil

    members = []
    for candidate in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(candidate.pid) == pgid and candidate.status() != psutil.STATUS_ZOMBIE:
                members.append(candidate.pid)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    if members:
        try:
            os.killpg(pgid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return members


def run_process(command, env=None, cwd=REPO_ROOT):
    """``subprocess.run`` for tests: no timeout, and nothing the command starts outlives it (leaks are recorded)."""
    result, leftovers = run_in_own_group(command, env=env, cwd=cwd)
    if leftovers:
        LEAKED_PROCESSES.append((" ".join(map(str, command))[:200], leftovers))
    return result


@pytest.fixture(scope="session", autouse=True)
def no_process_outlives_the_session():
    """Nothing a test starts may outlive the test session: no child of pytest is left, and no group a test
    started had members left when its leader exited."""
    import psutil

    yield
    children = [child for child in psutil.Process().children(recursive=True) if child.status() != psutil.STATUS_ZOMBIE]
    assert not children, f"processes started by the tests are still running: {[c.cmdline()[:3] for c in children]}"
    assert not LEAKED_PROCESSES, f"processes outlived the command that started them (killed): {LEAKED_PROCESSES}"


def accelerate_launcher(num_processes=1):
    """``accelerate launch`` as the tests run it: no config file needed, N CPU processes when N > 1."""
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
    ]
    if num_processes > 1:
        return launcher + ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", "0"]
    return launcher + ["--num_processes", "1"]


def run_script(script, args, accelerate=True, num_processes=1, env=None):
    """Run a training script as a user would, in a subprocess; returns the CompletedProcess."""
    if accelerate:
        command = accelerate_launcher(num_processes) + [os.path.join(REPO_ROOT, script)] + list(args)
    else:
        command = [sys.executable, os.path.join(REPO_ROOT, script)] + list(args)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return run_process(command, env=full_env)


def reset_accelerate_state():
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons: each in-process run starts from none and leaves none."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def train_in_process(script: str, argv):
    """``main(argv)`` of ``train_duo.py`` or ``train_duo_sd3.py`` in this process, as one process of
    ``accelerate launch`` runs it (a subprocess would only add interpreter start-up). Raises SystemExit on a
    refusal, as the script exits."""
    module = importlib.import_module(os.path.splitext(script)[0])
    reset_accelerate_state()
    try:
        module.main([str(arg) for arg in argv])
    finally:
        reset_accelerate_state()


# --------------------------------------------------------------------------------------------------
# In-process command-line runs and their refusals (tests/test_bad_inputs.py, tests/test_faults.py)
# --------------------------------------------------------------------------------------------------

RUN_FLAGS = ("--max_train_steps", "3", "--checkpointing_steps", "1", "--skip_validation", "--learning_rate", "1e-3")


def load_script(name):
    spec = importlib.util.spec_from_file_location(name.replace(".py", ""), os.path.join(REPO_ROOT, name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_main(main, argv, capsys):
    """(exit code, stderr) of an in-process CLI run; 0 when main returned."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    return code, capsys.readouterr().err


def assert_refused(code, err, words, exit_code=2):
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == exit_code, err[-3000:]
    assert len(errors) == 1, err[-3000:]
    for word in words:
        assert word in errors[0], (word, errors[0])
    return errors[0]
