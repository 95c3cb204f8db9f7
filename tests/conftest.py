import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Tests never touch the network: everything they load is built here from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


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
def tiny_pairs(tmp_path_factory):
    from duo_plugin.testing import make_tiny_pair_folder

    return make_tiny_pair_folder(str(tmp_path_factory.mktemp("tiny_pairs")), num_pairs=4)


def tiny_train_args(model, pairs, output_dir, *extra):
    """Flags for a fast train_duo.py run on the tiny pipeline."""
    return [
        "--pretrained_model_name_or_path", model,
        "--dataset_name", pairs,
        "--output_dir", str(output_dir),
        "--resolution", "32",
        "--rank", "4",
        "--max_train_steps", "4",
        "--gradient_accumulation_steps", "1",
        "--train_batch_size", "2",
        "--report_to", "none",
        "--num_validation_images", "1",
        "--num_validation_inference_steps", "2",
        *extra,
    ]


def run_script(script, args, accelerate=True, num_processes=1, env=None, timeout=600):
    """Run a training script as a user would; returns the CompletedProcess."""
    if accelerate:
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if num_processes > 1:
            launcher += ["--multi_gpu", "--num_processes", str(num_processes), "--main_process_port", "0"]
        else:
            launcher += ["--num_processes", "1"]
        command = launcher + [os.path.join(REPO_ROOT, script)] + list(args)
    else:
        command = [sys.executable, os.path.join(REPO_ROOT, script)] + list(args)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, env=full_env, timeout=timeout, cwd=REPO_ROOT)
