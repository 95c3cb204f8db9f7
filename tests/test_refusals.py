"""Bad input is refused in one line naming the problem and the fix, with a non-zero exit, before heavy work."""

import json
import os

import pytest
from conftest import run_script, tiny_train_args

from duo_plugin import arguments
from duo_plugin.errors import NETWORK_EXIT_CODE, USAGE_EXIT_CODE


@pytest.fixture
def train_duo_main(fresh_accelerate_state):
    import train_duo

    return train_duo.main


def refuse(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    # Progress bars of the data loading may come before it; the error is one line and the last.
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors[0]


def fake_pipeline(path, class_name):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model_index.json"), "w") as f:
        json.dump({"_class_name": class_name, "_diffusers_version": "0.42.1"}, f)
    return str(path)


def test_unknown_concept_lists_presets(train_duo_main, tiny_sd, tiny_pairs, tmp_path, capsys):
    line = refuse(train_duo_main, tiny_train_args(tiny_sd, tiny_pairs, tmp_path / "o", "--concept", "nudes"), capsys)
    assert "nudes" in line and "nudity, blood, suffer, gun, horror" in line


def test_missing_dataset(train_duo_main, tiny_sd, tmp_path, capsys):
    line = refuse(train_duo_main, tiny_train_args(tiny_sd, str(tmp_path / "nope"), tmp_path / "o"), capsys)
    assert "nope" in line


def test_empty_dataset(train_duo_main, tiny_sd, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "metadata.jsonl").write_text("")
    line = refuse(train_duo_main, tiny_train_args(tiny_sd, str(empty), tmp_path / "o"), capsys)
    assert f"dataset {empty} is empty: its metadata.jsonl lists no pair" in line


def test_missing_columns(train_duo_main, tiny_sd, tiny_pairs, tmp_path, capsys):
    line = refuse(
        train_duo_main, tiny_train_args(tiny_sd, tiny_pairs, tmp_path / "o", "--safe_image_column", "clean"), capsys
    )
    assert "clean" in line and "--safe_image_column" in line


def test_unreadable_image_is_named(train_duo_main, tiny_sd, tiny_pairs, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiny_pairs, broken)
    (broken / "00002_safe.png").write_bytes(b"not a png")
    line = refuse(train_duo_main, tiny_train_args(tiny_sd, str(broken), tmp_path / "o"), capsys)
    assert "00002_safe.png" in line


def test_resolution_not_multiple_of_8(train_duo_main, tiny_sd, tiny_pairs, tmp_path, capsys):
    argv = tiny_train_args(tiny_sd, tiny_pairs, tmp_path / "o") + ["--resolution", "30"]
    line = refuse(train_duo_main, argv, capsys)
    assert "multiple of 8" in line


def test_sd3_model_points_to_sd3_script(train_duo_main, tiny_pairs, tmp_path, capsys):
    model = fake_pipeline(tmp_path / "sd3", "StableDiffusion3Pipeline")
    line = refuse(train_duo_main, tiny_train_args(model, tiny_pairs, tmp_path / "o"), capsys)
    assert "train_duo_sd3.py" in line


def test_flux_model_points_to_flux_script(train_duo_main, tiny_pairs, tmp_path, capsys):
    model = fake_pipeline(tmp_path / "flux", "FluxPipeline")
    line = refuse(train_duo_main, tiny_train_args(model, tiny_pairs, tmp_path / "o"), capsys)
    assert "FLUX.1" in line and "train_duo_flux.py" in line


def test_unknown_family_names_every_script(train_duo_main, tiny_pairs, tmp_path, capsys):
    model = fake_pipeline(tmp_path / "kandinsky", "KandinskyV22Pipeline")
    line = refuse(train_duo_main, tiny_train_args(model, tiny_pairs, tmp_path / "o"), capsys)
    assert "not supported" in line
    assert all(script in line for script in ("train_duo.py", "train_duo_sd3.py", "train_duo_flux.py"))


def test_fp16_on_cpu(train_duo_main, tiny_sd, tiny_pairs, tmp_path, capsys):
    line = refuse(
        train_duo_main, tiny_train_args(tiny_sd, tiny_pairs, tmp_path / "o", "--mixed_precision", "fp16"), capsys
    )
    assert "fp16" in line and "bf16" in line


def test_8bit_adam_without_bitsandbytes(train_duo_main, tiny_sd, tiny_pairs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(arguments, "is_bitsandbytes_available", lambda: False)
    line = refuse(train_duo_main, tiny_train_args(tiny_sd, tiny_pairs, tmp_path / "o", "--use_8bit_adam"), capsys)
    assert "pip install bitsandbytes" in line


def test_xformers_flag_without_xformers(train_duo_main, tiny_sd, tiny_pairs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(arguments, "is_xformers_available", lambda: False)
    argv = tiny_train_args(tiny_sd, tiny_pairs, tmp_path / "o", "--enable_xformers_memory_efficient_attention")
    line = refuse(train_duo_main, argv, capsys)
    assert "xformers" in line


def test_wandb_with_hub_token(train_duo_main, tiny_sd, tiny_pairs, tmp_path, capsys):
    argv = tiny_train_args(tiny_sd, tiny_pairs, tmp_path / "o") + ["--report_to", "wandb", "--hub_token", "hf_x"]
    line = refuse(train_duo_main, argv, capsys)
    assert "token" in line and "hf auth login" in line


@pytest.mark.slow
def test_refusal_through_accelerate_launch(tiny_sd, tiny_pairs, tmp_path):
    """As a user sees it: the one line is there and the launch exits non-zero."""
    result = run_script("train_duo.py", tiny_train_args(tiny_sd, tiny_pairs, tmp_path / "o", "--concept", "nudes"))
    assert result.returncode != 0
    assert "error: unknown concept 'nudes'" in result.stderr


def test_failed_push_keeps_everything_local(train_duo_main, tiny_sd, tiny_pairs, tmp_path, capsys):
    """HF_HUB_OFFLINE (set for every test) makes the upload fail as a network failure would."""
    output_dir = tmp_path / "push"
    args = tiny_train_args(
        tiny_sd,
        tiny_pairs,
        output_dir,
        "--max_train_steps",
        "1",
        "--skip_validation",
        "--push_to_hub",
        "--hub_model_id",
        "someone/duo-test",
    )
    with pytest.raises(SystemExit) as exit_info:
        train_duo_main(args)
    # A network failure is not bad input: its own exit code, and the library's error is kept as the cause.
    assert exit_info.value.code == NETWORK_EXIT_CODE != USAGE_EXIT_CODE
    assert exit_info.value.__context__.__cause__ is not None
    error_lines = [line[line.index("error:") :] for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and "push to the Hub failed" in error_lines[0]
    assert "hf upload someone/duo-test" in error_lines[0]
    assert (output_dir / "pytorch_lora_weights.safetensors").is_file() and (output_dir / "README.md").is_file()
