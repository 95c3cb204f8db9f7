"""Nothing lost: a full or read-only disk, foreign files in the output folder, pair data changed under a
checkpoint, broken state files, nonsense numbers and files that are not what they claim (issue 29)."""

import errno
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch
from conftest import (
    REPO_ROOT,
    RUN_FLAGS,
    assert_refused,
    load_script,
    reset_accelerate_state,
    run_main,
    run_process,
    tiny_train_args,
    train_in_process,
)
from PIL import Image
from safetensors.torch import load_file, save_file

from duo_plugin import checkpoints, files, lora, outputs, run_guard, training
from duo_plugin.data import PairImages
from duo_plugin.errors import StorageError, TrainingHalted, UsageError, exit_on_usage_error, storage_reason
from duo_plugin.input_checks import read_tensor_file, to_rgb


@pytest.fixture(scope="module")
def train_duo():
    return load_script("train_duo.py").main


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """In-process runs share accelerate's singletons: each test starts from none and leaves none."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


FULL_DISK = OSError(errno.ENOSPC, "No space left on device")
TORCH_FULL_DISK = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 4480 vs 4376")


# --------------------------------------------------------------------------------------------------
# Disk full, read-only, permission denied
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error, reason",
    [
        (FULL_DISK, "the disk is full"),
        (OSError(errno.EROFS, "Read-only file system"), "the file system is read-only"),
        (OSError(errno.EACCES, "Permission denied"), "permission denied"),
        (TORCH_FULL_DISK, "the disk is full"),
        (
            type("SafetensorError", (Exception,), {})("Error while serializing: No space left on device"),
            "the disk is full",
        ),
        (OSError(errno.ENOENT, "No such file"), None),
        (ValueError("unexpected pos"), None),
    ],
)
def test_storage_errors_are_told_from_other_errors(error, reason):
    assert storage_reason(error) == reason


def test_a_full_disk_anywhere_becomes_one_line_and_exit_code_2(capsys):
    @exit_on_usage_error
    def main():
        raise OSError(errno.ENOSPC, "No space left on device", "/data/pairs/pair-0001.png")

    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "/data/pairs/pair-0001.png" in err and "the disk is full" in err and "free space" in err


def test_other_errors_keep_their_traceback():
    @exit_on_usage_error
    def main():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        main()


def test_an_atomic_write_that_fails_keeps_the_old_file_and_leaves_nothing_staged(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    files.atomic_write_json(str(path), {"old": 1})

    def fsync(_):
        raise FULL_DISK

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(OSError):
        files.atomic_write_json(str(path), {"new": 2})
    assert json.loads(path.read_text()) == {"old": 1}
    assert sorted(os.listdir(tmp_path)) == ["results.json"]


class FakeAccelerator:
    """The parts of an Accelerator a checkpoint save touches, with a save that fails like torch's writer."""

    is_main_process = True

    def __init__(self, fail_with=None):
        self.fail_with = fail_with

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "pytorch_lora_weights.safetensors"), "wb") as f:
            f.write(b"half a file")
        if self.fail_with is not None:
            raise self.fail_with
        for name in run_guard.CHECKPOINT_FILES[1:]:
            with open(os.path.join(folder, name), "wb") as f:
                f.write(b"state")


def test_a_checkpoint_save_on_a_full_disk_keeps_the_previous_one_and_removes_the_staged_one(tmp_path):
    out = str(tmp_path)
    checkpoints.save_checkpoint(FakeAccelerator(), out, 2, None, {"seed": 0})
    with pytest.raises(StorageError) as refusal:
        checkpoints.save_checkpoint(FakeAccelerator(TORCH_FULL_DISK), out, 4, None, {"seed": 0}, needed_bytes=3 << 20)
    line = str(refusal.value)
    assert "checkpoint-4" in line and "the disk is full" in line and "3.0 MiB" in line
    assert "checkpoint-2" in line and "--resume_from_checkpoint latest" in line
    assert sorted(os.listdir(out)) == ["checkpoint-2"]
    assert run_guard.complete_checkpoints(out) == [os.path.join(out, "checkpoint-2")]


def test_a_lock_that_cannot_be_written_is_not_left_behind(tmp_path, monkeypatch):
    real_fdopen = os.fdopen

    def fdopen(descriptor, mode="r", *args, **kwargs):
        handle = real_fdopen(descriptor, mode, *args, **kwargs)
        handle.write = lambda _: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return handle

    monkeypatch.setattr(os, "fdopen", fdopen)
    with pytest.raises(StorageError, match="the run's lock in .*the disk is full"):
        run_guard.acquire_output_lock(str(tmp_path))
    assert not os.path.exists(tmp_path / run_guard.LOCK_NAME)


def save_tiny_adapter(folder):
    save_file({"lora.down.weight": torch.ones(2, 3)}, os.path.join(folder, "pytorch_lora_weights.safetensors"))


def test_the_final_adapter_on_a_full_disk_is_saved_elsewhere_and_the_line_says_where(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"the previous run's adapter")
    calls = []

    def save(folder):
        calls.append(folder)
        if folder.startswith(str(out)):
            save_tiny_adapter(folder)
            raise FULL_DISK
        save_tiny_adapter(folder)

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with pytest.raises(StorageError) as refusal:
        outputs.save_adapter(str(out), save)
    rescue = calls[1]
    assert f"saved to {rescue} instead" in str(refusal.value)
    assert load_file(os.path.join(rescue, "pytorch_lora_weights.safetensors"))["lora.down.weight"].sum() == 6
    # Nothing half-written stays; the earlier file is untouched.
    assert sorted(os.listdir(out)) == ["pytorch_lora_weights.safetensors"]
    assert (out / "pytorch_lora_weights.safetensors").read_bytes() == b"the previous run's adapter"


def test_the_final_adapter_is_renamed_into_place(tmp_path):
    outputs.save_adapter(str(tmp_path), save_tiny_adapter)
    assert sorted(os.listdir(tmp_path)) == ["pytorch_lora_weights.safetensors"]


def test_a_nearly_full_disk_is_refused_before_training(tmp_path, monkeypatch):
    args = types.SimpleNamespace(
        output_dir=str(tmp_path), max_train_steps=1000, checkpointing_steps=500, checkpoints_total_limit=None
    )
    parameters = 1_000_000  # 4 MB of adapter, 12 MB a checkpoint
    assert run_guard.check_free_space(args, parameters) == run_guard.checkpoint_bytes(parameters)
    monkeypatch.setattr(shutil, "disk_usage", lambda _: types.SimpleNamespace(free=10 << 20))
    with pytest.raises(StorageError, match=r"has 10.0 MiB free, the run needs about 16.3 MiB .*1 checkpoint"):
        run_guard.check_free_space(args, parameters)


# --------------------------------------------------------------------------------------------------
# Files the product did not write
# --------------------------------------------------------------------------------------------------


def test_an_output_dir_with_the_users_readme_or_adapter_is_refused(tmp_path):
    (tmp_path / "README.md").write_text("# my project\n")
    with pytest.raises(UsageError, match="holds README.md that no DUO run wrote"):
        run_guard.check_foreign_files(str(tmp_path))
    (tmp_path / "README.md").unlink()
    save_tiny_adapter(str(tmp_path))
    with pytest.raises(UsageError, match="pytorch_lora_weights.safetensors that no DUO run wrote"):
        run_guard.check_foreign_files(str(tmp_path))


# --------------------------------------------------------------------------------------------------
# Pair data changed under a checkpoint
# --------------------------------------------------------------------------------------------------


def pair_images(seed=0, n=3):
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)) for _ in range(2 * n)]
    return PairImages(images[:n], images[n:], [f"unsafe {i}" for i in range(n)], None)


def test_the_fingerprint_names_a_swap_an_edit_and_a_count():
    before = pair_images().fingerprint()
    assert pair_images().fingerprint() == before
    changed = pair_images()
    changed.unsafe[0], changed.safe[0] = changed.safe[0], changed.unsafe[0]
    changed.safe[2] = changed.safe[2].rotate(90)
    assert run_guard.pair_data_differences(before, changed.fingerprint()) == [
        "pair 0: unsafe and safe images swapped",
        "pair 2: safe image changed",
    ]
    assert run_guard.pair_data_differences(before, pair_images(n=4).fingerprint())[0] == "3 pairs then, 4 now"
    reprompted = pair_images()
    reprompted.unsafe_prompts[1] = "another prompt"
    assert run_guard.pair_data_differences(before, reprompted.fingerprint()) == ["pair 1: prompts changed"]


def test_a_resume_on_changed_pairs_is_refused(tmp_path):
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    (checkpoint / run_guard.CHECKPOINT_MARKER).write_text(
        json.dumps({"step": 2, "complete": True, "settings": {"pair_data": pair_images().fingerprint()}})
    )
    args = types.SimpleNamespace(resume_from_checkpoint="latest", output_dir=str(tmp_path))
    run_guard.check_resume_pairs(args, pair_images().fingerprint())
    swapped = pair_images()
    swapped.unsafe, swapped.safe = swapped.safe, swapped.unsafe
    with pytest.raises(UsageError, match="trained on other pair data .pair 0: unsafe and safe images swapped; pair 1"):
        run_guard.check_resume_pairs(args, swapped.fingerprint())


def test_training_refuses_to_resume_after_the_pair_folders_were_swapped(tiny_sd, tiny_pairs, tmp_path, capsys):
    pairs = tmp_path / "pairs"
    shutil.copytree(tiny_pairs, pairs)
    flags = ("--max_train_steps", "2", "--checkpointing_steps", "1", "--skip_validation")
    out = tmp_path / "out"
    train_in_process("train_duo.py", tiny_train_args(tiny_sd, pairs, out, *flags))
    assert (out / "checkpoint-1").is_dir()
    run_guard.check_foreign_files(str(out))  # the card and adapter a DUO run wrote may be replaced by the next
    rows = [json.loads(line) for line in (pairs / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        row["unsafe_file_name"], row["safe_file_name"] = row["safe_file_name"], row["unsafe_file_name"]
    (pairs / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(SystemExit) as exit_info:
        train_in_process(
            "train_duo.py", tiny_train_args(tiny_sd, pairs, out, *flags, "--resume_from_checkpoint", "latest")
        )
    assert exit_info.value.code == 2
    assert "trained on other pair data (pair 0: unsafe and safe images swapped" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# State files
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("content", ['{"seed": 0', "[1, 2]", "\xff\xfe"])
def test_a_broken_state_file_is_one_line_naming_it_and_the_fix(tmp_path, content):
    path = tmp_path / "evaluation_settings.json"
    path.write_bytes(content.encode("latin-1"))
    with pytest.raises(UsageError) as refusal:
        files.read_state_json(str(path), "delete it")
    assert str(path) in str(refusal.value) and str(refusal.value).endswith("delete it")


def test_the_evaluation_timing_and_sweep_read_their_state_through_the_loader(tmp_path):
    from duo_plugin import evaluate, sweep, timing

    broken = '{"truncated": '
    (tmp_path / evaluate.SETTINGS_NAME).write_text(broken)
    with pytest.raises(UsageError, match="not readable JSON"):
        evaluate.check_settings(str(tmp_path), {"seed": 0}, True)
    (tmp_path / timing.SETTINGS_NAME).write_text(broken)
    with pytest.raises(UsageError, match="not readable JSON"):
        timing.check_settings(str(tmp_path), {"seed": 0}, True)
    (tmp_path / "evaluation.json").write_text(broken)
    with pytest.raises(UsageError, match="delete it .the sweep redoes"):
        sweep.read_json(str(tmp_path / "evaluation.json"))


# --------------------------------------------------------------------------------------------------
# Numbers no tool should accept
# --------------------------------------------------------------------------------------------------


def refusal_line(main, argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--resolution", "0"], "--resolution 0 is not a positive multiple of 8"),
        (["--train_batch_size", "-1"], "--train_batch_size must be at least 1"),
        (["--json", "/no/such/folder/estimate.json"], "the folder /no/such/folder does not exist"),
    ],
)
def test_the_memory_estimate_refuses_nonsense(argv, expected, capsys):
    from duo_plugin import memory

    assert expected in refusal_line(memory.main, argv, capsys)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--window", "900", "100"], "0 <= T_MIN < T_MAX"),
        (["--max_prompts", "0"], "--max_prompts must be at least 1"),
        (["--num_images_per_prompt", "0"], "--num_images_per_prompt must be at least 1"),
        (["--open_level", "1.5"], "--open_level 1.5"),
    ],
)
def test_the_timing_diagnostic_refuses_nonsense(argv, expected, capsys):
    from duo_plugin import timing

    assert expected in refusal_line(
        timing.main, ["--pretrained_model_name_or_path", "x", "--concept", "nudity", *argv], capsys
    )


def test_the_timing_diagnostic_refuses_an_output_dir_that_is_a_file(tmp_path, capsys):
    from duo_plugin import timing

    (tmp_path / "file").write_text("x")
    argv = ["--pretrained_model_name_or_path", "x", "--output_dir", str(tmp_path / "file")]
    assert "is a file: give a folder" in refusal_line(timing.main, argv, capsys)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--max_prompts", "0"], "--max_prompts 0: give at least 1"),
        (["--max_prompts", "-1"], "--max_prompts -1: give at least 1"),
        (["--num_images_per_prompt", "100000000"], "more than 10000"),
    ],
)
def test_the_evaluation_refuses_nonsense_sizes(argv, expected):
    from duo_plugin import evaluate

    with pytest.raises(UsageError, match=expected):
        evaluate.check_args(evaluate.parse_args(["--base", "some/model", *argv]))


def test_the_evaluation_refuses_a_plan_too_large_to_keep():
    from duo_plugin import evaluate

    evaluate.check_image_count({"a": [None] * 100}, 10, 2)
    with pytest.raises(UsageError, match="would make 2,000,100 images"):
        evaluate.check_image_count({"a": [None] * 200_010}, 10, 1)


@pytest.mark.parametrize("seed", [2**70, -1])
def test_a_prompt_file_seed_outside_the_generator_range_is_refused(tmp_path, seed):
    from duo_plugin import attacks

    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "a cat", "seed": seed}) + "\n")
    with pytest.raises(UsageError, match=f"line 1: seed {seed} is outside 0 to 2\\*\\*32 - 1"):
        attacks.read_prompts(str(path))
    csv_path = tmp_path / "prompts.csv"
    csv_path.write_text(f"prompt,evaluation_seed\na cat,{seed}\n")
    with pytest.raises(UsageError, match="line 2: seed"):
        attacks.read_prompts(str(csv_path))


def test_the_empty_prompt_is_a_jsonl_row_on_purpose(tmp_path):
    from duo_plugin import attacks

    path = tmp_path / "empty.jsonl"
    path.write_text(json.dumps({"prompt": "", "seed": 3}) + "\n")
    assert [(p.prompt, p.seed) for p in attacks.read_prompts(str(path))] == [("", 3)]


# --------------------------------------------------------------------------------------------------
# Files that are not what they claim
# --------------------------------------------------------------------------------------------------


class RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickles_object_arrays_and_garbage_are_refused_without_running_anything(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "evil.bin").write_bytes(pickle.dumps({"weight": RunsCode()}))
    np.save(tmp_path / "vector.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (tmp_path / "garbage.safetensors").write_bytes(b"\xff" * 64)
    for name in ("evil.bin", "vector.npy", "garbage.safetensors"):
        with pytest.raises(
            UsageError, match=f"refused --unet {tmp_path / name}: not a plain .* nothing in it was run"
        ):
            read_tensor_file(str(tmp_path / name), "--unet")
    assert not (tmp_path / "pwned").exists()
    torch.save({"weight": torch.ones(2)}, tmp_path / "plain.bin")
    assert read_tensor_file(str(tmp_path / "plain.bin"), "--unet")["weight"].sum() == 2


def test_a_pickled_ring_a_bell_vector_is_refused(tmp_path):
    from duo_plugin import attacks

    path = tmp_path / "vector.npy"
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(UsageError, match="refused --ring_a_bell_concept_vector"):
        attacks.load_concept_vector(str(path), (4, 8))


def test_a_checkpoint_with_a_malicious_optimizer_state_is_refused(tmp_path, monkeypatch, fresh_accelerate_state):
    from accelerate import Accelerator

    monkeypatch.chdir(tmp_path)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    accelerator = Accelerator(cpu=True)
    model, optimizer = accelerator.prepare(model, optimizer)
    folder = tmp_path / "checkpoint-1"
    accelerator.save_state(str(folder))
    (folder / "optimizer.bin").write_bytes(pickle.dumps({"state": RunsCode()}))
    with pytest.raises(
        UsageError, match="refused checkpoint .*checkpoint-1: a state file is not one a DUO run writes"
    ):
        checkpoints.load_checkpoint(accelerator, str(folder))
    assert not (tmp_path / "pwned").exists()


def test_a_pair_file_linking_out_of_its_folder_is_refused(tmp_path, tiny_pairs):
    from duo_plugin.input_checks import check_pair_metadata

    pairs = tmp_path / "pairs"
    shutil.copytree(tiny_pairs, pairs)
    secret = tmp_path / "secret.png"
    row = json.loads((pairs / "metadata.jsonl").read_text().splitlines()[0])
    shutil.copy(pairs / row["unsafe_file_name"], secret)
    os.remove(pairs / row["unsafe_file_name"])
    os.symlink(secret, pairs / row["unsafe_file_name"])
    with pytest.raises(UsageError, match="is a link that leads out of"):
        check_pair_metadata(str(pairs))


def test_a_progress_row_naming_a_file_outside_the_folder_is_refused():
    from duo_plugin.pairs import parse_progress_row

    row = {"pair_index": 0, "accepted": True, "attempts": 1, "unsafe_file_name": "../../outside/secret.png"}
    with pytest.raises(UsageError, match="not a finished pair"):
        parse_progress_row(json.dumps(row))
    row["unsafe_file_name"] = "0000_unsafe.png"
    assert parse_progress_row(json.dumps(row))["unsafe_file_name"] == "0000_unsafe.png"


def test_a_model_index_naming_no_class_is_refused(tmp_path):
    from duo_plugin.families import detect_pipeline_class

    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": ["a", "b"]}))
    with pytest.raises(UsageError, match="names the pipeline class as \\['a', 'b'\\]"):
        detect_pipeline_class(str(tmp_path), None)


@pytest.mark.parametrize(
    "key, value, expected",
    [
        ("weight_name", 123, "weight_name is 123, not text"),
        ("base_model", 42, "base_model is 42, not text"),
        ("format_version", "1", "format '1', which no duo_plugin writes"),
        ("rank", "4", "rank is '4', not a whole number"),
    ],
)
def test_an_edited_duo_config_is_refused_with_what_is_wrong(key, value, expected):
    from duo_plugin.pipeline import fetching as pipeline

    config = {"format_version": 1, "architecture": {"family": "sd"}, "concept": "nudity", key: value}
    with pytest.raises(UsageError, match=expected):
        pipeline._check_adapter_config(config, "a/b")


@pytest.mark.parametrize("weight", [1e30, -11, float("nan")])
def test_absurd_adapter_weights_are_refused(weight):
    from duo_plugin.pipeline import attaching as pipeline

    with pytest.raises(UsageError, match="give a finite number between -10 and 10"):
        pipeline._normalize_weights(weight, ["nudity"])
    assert pipeline._normalize_weights(2.5, ["nudity"]) == [2.5]


@pytest.mark.parametrize("mode, values", [("I", [0, 128, 255]), ("F", [0.0, 128.0, 255.0]), ("F", [0.0, 0.5, 1.0])])
def test_32_bit_images_keep_their_contrast(mode, values):
    image = Image.fromarray(np.array([values], dtype=np.int32 if mode == "I" else np.float32), mode=mode)
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == [0, 128, 255]


def test_a_detector_flag_naming_something_else_is_refused_before_it_runs():
    from duo_plugin.detectors import resolve_detector_factory

    for name in ("os:system", "json:dumps", "collections:OrderedDict"):
        with pytest.raises(UsageError, match="is not a detector"):
            resolve_detector_factory(name)
    assert resolve_detector_factory("duo_plugin.testing:MeanChannelDetector").__name__ == "MeanChannelDetector"


# --------------------------------------------------------------------------------------------------
# The fault campaign: a disk that fills mid-checkpoint, then is freed
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_disk_that_fills_mid_checkpoint_then_is_freed_resumes_to_the_uninterrupted_adapter(
    tiny_sd, tiny_pairs, tmp_path, monkeypatch, capsys
):
    common = ("--max_train_steps", "6", "--checkpointing_steps", "2", "--skip_validation", "--learning_rate", "1e-3")
    full = tmp_path / "full"
    train_in_process("train_duo.py", tiny_train_args(tiny_sd, tiny_pairs, full, *common))

    out = tmp_path / "out"
    real_save = torch.save

    def save_until_the_disk_fills(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f) and str(f).endswith("optimizer.bin"):
            with open(f, "wb") as handle:
                handle.write(b"PK\x03\x04 part of a zip")
            raise TORCH_FULL_DISK
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_the_disk_fills)
    with pytest.raises(SystemExit) as exit_info:
        train_in_process("train_duo.py", tiny_train_args(tiny_sd, tiny_pairs, out, *common))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "could not save checkpoint-4" in err and "the disk is full" in err and "checkpoint-2" in err
    assert sorted(p for p in os.listdir(out) if p.startswith("checkpoint")) == ["checkpoint-2"]

    monkeypatch.setattr(torch, "save", real_save)  # the disk is freed
    train_in_process(
        "train_duo.py", tiny_train_args(tiny_sd, tiny_pairs, out, *common, "--resume_from_checkpoint", "latest")
    )
    expected = load_file(full / "pytorch_lora_weights.safetensors")
    actual = load_file(out / "pytorch_lora_weights.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--t_max", "0"], "--t_max 0: give timesteps between 1 and 1000"),
        (["--max_train_steps", "0"], "--max_train_steps 0: give at least 1"),
        (["--train_seeds", "-1"], "--train_seeds -1: give seeds between 0"),
    ],
)
def test_the_sweep_refuses_nonsense(argv, expected, tmp_path):
    from duo_plugin import sweep

    base = ["--pretrained_model_name_or_path", "m", "--concept", "nudity", "--output_dir", str(tmp_path / "s")]
    with pytest.raises(UsageError, match=expected):
        sweep.check_args(sweep.parse_args([*base, "--beta_dpo", "100", *argv]))


# --------------------------------------------------------------------------------------------------
# Checkpoint saves: interrupted at every point, disk full
# --------------------------------------------------------------------------------------------------


class FolderAccelerator:
    """Just what save_checkpoint uses of an Accelerator: one process whose save_state writes real files."""

    is_main_process = True
    num_processes = 1

    def __init__(self, payload: bytes = b"new", fail_after: int = None, error=None):
        self.payload, self.fail_after, self.error = payload, fail_after, error

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        os.makedirs(folder)
        for number, name in enumerate(run_guard.CHECKPOINT_FILES):
            if self.fail_after is not None and number == self.fail_after:
                raise self.error
            (open(os.path.join(folder, name), "wb")).write(self.payload)


def saved_checkpoint(output_dir, step, payload):
    checkpoints.save_checkpoint(FolderAccelerator(payload), str(output_dir), step, None, {"learning_rate": 1.0})
    return output_dir / f"checkpoint-{step}"


class Killed(BaseException):
    """Stands for SIGKILL at one point of a save: nothing after it runs."""


@pytest.mark.parametrize("kill_at", range(6))
def test_resave_interrupted_anywhere_leaves_a_complete_checkpoint(kill_at, tmp_path, monkeypatch):
    """Re-saving step 2 over an existing checkpoint-2; a kill at the k-th rename/delete leaves a complete step 2."""
    saved_checkpoint(tmp_path, 2, b"old")
    calls = {"n": 0}
    real_replace, real_rmtree = os.replace, shutil.rmtree

    def counted(real):
        def wrapper(*args, **kwargs):
            if calls["n"] == kill_at:
                raise Killed()
            calls["n"] += 1
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(run_guard.os, "replace", counted(real_replace))
    monkeypatch.setattr(run_guard.shutil, "rmtree", counted(real_rmtree))
    try:
        checkpoints.save_checkpoint(FolderAccelerator(b"new"), str(tmp_path), 2, None, {"learning_rate": 1.0})
        finished = True
    except Killed:
        finished = False
    monkeypatch.undo()

    run_guard.recover_interrupted_saves(str(tmp_path))
    assert checkpoints.resolve_resume_path("latest", str(tmp_path)) == str(tmp_path / "checkpoint-2")
    for name in run_guard.CHECKPOINT_FILES:
        assert (tmp_path / "checkpoint-2" / name).read_bytes() in (b"old", b"new")
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    if finished:
        assert (tmp_path / "checkpoint-2" / "optimizer.bin").read_bytes() == b"new"


def test_disk_full_during_a_save_keeps_the_previous_checkpoints(tmp_path):
    import errno

    saved_checkpoint(tmp_path, 1, b"one")
    full = FolderAccelerator(fail_after=1, error=OSError(errno.ENOSPC, "No space left on device"))
    with pytest.raises(StorageError) as info:
        checkpoints.save_checkpoint(full, str(tmp_path), 2, None, {})
    message = str(info.value)
    assert "could not save checkpoint-2" in message and "disk is full" in message
    assert "previous checkpoints are intact" in message and "checkpoint-1" in message and "resume" in message
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]
    assert (tmp_path / "checkpoint-1" / "optimizer.bin").read_bytes() == b"one"


def test_rotation_frees_space_before_the_save(tmp_path):
    """With --checkpoints_total_limit 2, the oldest goes before the third is written (the disk needs room for it)."""
    for step in (1, 2):
        checkpoints.save_checkpoint(FolderAccelerator(), str(tmp_path), step, 2, {})
    seen_during_save = []

    class Watching(FolderAccelerator):
        def save_state(self, folder):
            seen_during_save.extend(sorted(n for n in os.listdir(tmp_path) if not n.endswith(".tmp")))
            super().save_state(folder)

    checkpoints.save_checkpoint(Watching(), str(tmp_path), 3, 2, {})
    assert seen_during_save == ["checkpoint-2"]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-3"]


def test_disk_full_through_the_cli(train_duo, tiny_sd, tiny_pairs, tmp_path, capsys, monkeypatch):
    """As the user sees it: one line, exit 2 (the disk, as issue 29 asks), checkpoint-1 intact and resumable."""
    import errno

    from accelerate import Accelerator

    real_save_state = Accelerator.save_state

    def save_state(self, output_dir=None, **kwargs):
        if "checkpoint-2" in str(output_dir):
            os.makedirs(output_dir, exist_ok=True)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save_state(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    output_dir = tmp_path / "out"
    code, err = run_main(train_duo, tiny_train_args(tiny_sd, tiny_pairs, output_dir, *RUN_FLAGS), capsys)
    assert_refused(
        code,
        err,
        ["could not save checkpoint-2", "disk is full", "checkpoint-1", "--resume_from_checkpoint latest"],
        exit_code=2,
    )
    assert sorted(n for n in os.listdir(output_dir) if n.startswith("checkpoint")) == ["checkpoint-1"]
    assert run_guard.is_complete(str(output_dir / "checkpoint-1"))


def test_non_finite_loss_names_lambda_in_its_hint():
    class OneProcess:
        num_processes = 1

    with pytest.raises(TrainingHalted) as info:
        training.check_finite(OneProcess(), torch.tensor(float("inf")), 7, None)
    assert "step 7" in str(info.value) and "--preservation_weight (λ)" in str(info.value)


# --------------------------------------------------------------------------------------------------
# The output folder lock
# --------------------------------------------------------------------------------------------------


def test_second_run_in_the_same_output_dir_is_refused(train_duo, tiny_sd, tiny_pairs, tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        output_dir = tmp_path / "out"
        output_dir.mkdir()
        (output_dir / run_guard.LOCK_NAME).write_text(
            json.dumps({"pid": holder.pid, "host": __import__("socket").gethostname(), "started": "now"})
        )
        argv = tiny_train_args(tiny_sd, tiny_pairs, output_dir, "--skip_validation")
        assert_refused(
            *run_main(train_duo, argv, capsys),
            ["--output_dir", "in use by another run", f"pid {holder.pid}", run_guard.LOCK_NAME],
        )
        assert not (output_dir / "logs").exists()
    finally:
        holder.kill()
        holder.wait()


def test_stale_lock_is_taken_over(tmp_path, caplog):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (tmp_path / run_guard.LOCK_NAME).write_text(
        json.dumps({"pid": gone.pid, "host": __import__("socket").gethostname(), "started": "then"})
    )
    with caplog.at_level(logging.WARNING, logger="duo_plugin.run_guard"):
        path = run_guard.acquire_output_lock(str(tmp_path))
    assert "taking over the lock" in caplog.text
    assert json.loads(open(path).read())["pid"] == os.getpid()
    run_guard.release_output_lock(path)
    assert not os.path.exists(path)


# --------------------------------------------------------------------------------------------------
# The config is written before anything optional can fail
# --------------------------------------------------------------------------------------------------


def test_config_is_written_before_validation_can_fail(train_duo, tiny_sd, tiny_pairs, tmp_path, capsys, monkeypatch):
    def broken_validation(*args, **kwargs):
        raise UsageError("validation failed on purpose")

    monkeypatch.setattr(outputs, "validation_grid", broken_validation)
    output_dir = tmp_path / "out"
    code, err = run_main(train_duo, tiny_train_args(tiny_sd, tiny_pairs, output_dir, "--max_train_steps", "1"), capsys)
    assert_refused(code, err, ["validation failed on purpose"])
    config = json.loads((output_dir / "duo_config.json").read_text())
    assert config["rank"] == 4 and (output_dir / "pytorch_lora_weights.safetensors").is_file()


# --------------------------------------------------------------------------------------------------
# A real kill during the re-save of an existing step
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_during_resave_then_latest_resumes_exactly(tiny_sd, tiny_pairs, tmp_path):
    """Resume from checkpoint-2 while checkpoint-3 exists, SIGKILL as soon as the re-save of step 3 starts; then
    ``latest`` resumes and the final adapter equals an uninterrupted run's."""
    flags = ("--max_train_steps", "5", "--checkpointing_steps", "1", "--skip_validation", "--learning_rate", "1e-3")
    full = tmp_path / "full"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO_ROOT}
    command = [sys.executable, os.path.join(REPO_ROOT, "train_duo.py")]
    assert run_process(command + tiny_train_args(tiny_sd, tiny_pairs, full, *flags), env=env).returncode == 0

    killed = tmp_path / "killed"
    killed.mkdir()
    for step in (2, 3):
        shutil.copytree(full / f"checkpoint-{step}", killed / f"checkpoint-{step}")
    process = subprocess.Popen(
        command
        + tiny_train_args(
            tiny_sd, tiny_pairs, killed, *flags, "--resume_from_checkpoint", str(killed / "checkpoint-2")
        ),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    while process.poll() is None:
        names = os.listdir(killed)
        if "checkpoint-3.tmp" in names or "checkpoint-3.old" in names:
            break
        time.sleep(0.001)
    try:
        assert process.poll() is None, "the run ended before the re-save was seen"
    finally:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()

    resumed = run_process(
        command + tiny_train_args(tiny_sd, tiny_pairs, killed, *flags, "--resume_from_checkpoint", "latest"), env=env
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resuming from" in resumed.stdout + resumed.stderr
    final, reference = load_file(killed / lora.LORA_WEIGHT_NAME), load_file(full / lora.LORA_WEIGHT_NAME)
    assert final.keys() == reference.keys()
    assert all(torch.equal(final[key], reference[key]) for key in final)
    assert not any(name.endswith((".tmp", ".old")) for name in os.listdir(killed))
