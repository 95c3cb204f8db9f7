"""Every user mistake gets one clear line and exit 2, before any heavy work; no silent wrong result.

Table-driven: each case runs a CLI's ``main(argv)`` in-process and asserts the exit code, that no traceback was
printed, and the key words of the one ``error:`` line. Refusals come before any weight is loaded, so each case
takes well under a second; a few fixtures train a 3-step run once. The kill test is the only one that needs
a real process.
"""

import json
import logging
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import (
    RUN_FLAGS,
    assert_refused,
    load_script,
    reset_accelerate_state,
    run_main,
    run_script,
    tiny_train_args,
)
from PIL import Image
from safetensors.torch import load_file, save_file

from duo_plugin import arguments, checkpoints, input_checks, lora, outputs, run_guard
from duo_plugin.errors import NETWORK_EXIT_CODE, USAGE_EXIT_CODE, UsageError


@pytest.fixture(scope="module")
def train_duo():
    return load_script("train_duo.py").main


@pytest.fixture(scope="module")
def train_duo_sd3():
    return load_script("train_duo_sd3.py").main


@pytest.fixture(autouse=True)
def fresh_accelerate(request):
    """In-process runs share accelerate's singletons: each test starts from none and leaves none."""
    reset_accelerate_state()
    yield
    reset_accelerate_state()


def write_bytes(path, data: bytes):
    with open(path, "wb") as f:
        f.write(data)
    return str(path)


NOT_UTF8 = "a photo of a caf\xe9\n".encode("latin-1")


# --------------------------------------------------------------------------------------------------
# Training flags: refused before the model is even looked at (the model path does not exist)
# --------------------------------------------------------------------------------------------------

FLAG_CASES = [
    ("resolution 0", ["--resolution", "0"], ["--resolution 0", "multiple of 8"]),
    ("resolution negative", ["--resolution=-8"], ["--resolution -8"]),
    ("learning rate nan", ["--learning_rate", "nan"], ["--learning_rate nan", "finite"]),
    ("learning rate negative", ["--learning_rate=-1e-4"], ["--learning_rate", "positive"]),
    ("beta nan", ["--beta_dpo", "nan"], ["--beta_dpo nan", "finite"]),
    ("beta zero", ["--beta_dpo", "0"], ["--beta_dpo", "positive"]),
    ("lambda inf", ["--preservation_weight", "inf"], ["--preservation_weight inf", "finite"]),
    ("lambda negative", ["--preservation_weight=-1"], ["--preservation_weight", "at least 0"]),
    ("rank 0", ["--rank", "0"], ["--rank", "at least 1"]),
    ("checkpointing steps 0", ["--checkpointing_steps", "0"], ["--checkpointing_steps", "at least 1"]),
    ("num pairs 0", ["--num_pairs", "0"], ["--num_pairs", "at least 1"]),
    ("num pairs -1", ["--num_pairs=-1"], ["--num_pairs", "at least 1"]),
    ("negative seed", ["--seed=-1"], ["--seed", "-1"]),
    ("unknown scheduler", ["--lr_scheduler", "cosine_warm"], ["--lr_scheduler cosine_warm", "cosine", "constant"]),
    ("no validation images", ["--num_validation_images", "0"], ["--num_validation_images", "--skip_validation"]),
    ("zero steps", ["--max_train_steps", "0"], ["--max_train_steps", "at least 1"]),
    ("guidance nan", ["--guidance_scale", "nan"], ["--guidance_scale nan", "finite"]),
    ("negative warm-up", ["--lr_warmup_steps=-1"], ["--lr_warmup_steps"]),
    ("adam beta2 1", ["--adam_beta2", "1.0"], ["--adam_beta2"]),
    ("negative t_min", ["--t_min=-5"], ["--t_min"]),
]


@pytest.mark.parametrize("script", ["train_duo.py", "train_duo_sd3.py"])
@pytest.mark.parametrize("name,extra,words", FLAG_CASES, ids=[c[0] for c in FLAG_CASES])
def test_bad_training_flag(script, name, extra, words, train_duo, train_duo_sd3, tmp_path, capsys):
    main = train_duo if script == "train_duo.py" else train_duo_sd3
    argv = tiny_train_args(str(tmp_path / "no-model"), str(tmp_path / "no-pairs"), tmp_path / "out") + extra
    assert_refused(*run_main(main, argv, capsys), words)
    assert not (tmp_path / "out").exists()


def output_is_file(tmp_path):
    return write_bytes(tmp_path / "taken", b"x")


def output_under_file(tmp_path):
    return os.path.join(output_is_file(tmp_path), "out")


OUTPUT_CASES = [
    ("output_dir is a file", output_is_file, ["--output_dir", "is a file"]),
    ("output_dir under a file", output_under_file, ["--output_dir", "cannot be created"]),
]


@pytest.mark.parametrize("name,make_output,words", OUTPUT_CASES, ids=[c[0] for c in OUTPUT_CASES])
def test_bad_output_dir(name, make_output, words, train_duo, tmp_path, capsys):
    argv = tiny_train_args(str(tmp_path / "no-model"), str(tmp_path / "no-pairs"), make_output(tmp_path))
    assert_refused(*run_main(train_duo, argv, capsys), words)


def test_prompt_file_not_utf8(train_duo, tmp_path, capsys):
    prompts = write_bytes(tmp_path / "unsafe.txt", NOT_UTF8)
    argv = tiny_train_args(str(tmp_path / "no-model"), str(tmp_path / "no-pairs"), tmp_path / "out") + [
        "--concept",
        "mine",
        "--unsafe_prompt",
        f"@{prompts}",
        "--safe_prompt",
        "a dog",
    ]
    assert_refused(*run_main(train_duo, argv, capsys), ["unsafe.txt", "UTF-8"])


# --------------------------------------------------------------------------------------------------
# Pair data
# --------------------------------------------------------------------------------------------------


def copy_pairs(tiny_pairs, tmp_path):
    folder = tmp_path / "pairs"
    shutil.copytree(tiny_pairs, folder)
    return folder


def rewrite_rows(folder, edit):
    path = folder / "metadata.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = edit(rows)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def same_file_pair(folder):
    rewrite_rows(folder, lambda rows: [{**rows[0], "safe_file_name": rows[0]["unsafe_file_name"]}] + rows[1:])


def same_pixels_pair(folder):
    shutil.copy(folder / "00001_unsafe.png", folder / "00001_safe.png")


def traversal(folder):
    rewrite_rows(folder, lambda rows: rows[:1] + [{**rows[1], "safe_file_name": "../secret.png"}] + rows[2:])


def absolute(folder):
    rewrite_rows(folder, lambda rows: rows[:1] + [{**rows[1], "unsafe_file_name": "/etc/passwd"}] + rows[2:])


def missing_file(folder):
    os.remove(folder / "00003_safe.png")


def broken_json_row(folder):
    with open(folder / "metadata.jsonl", "a") as f:
        f.write('{"unsafe_file_name": "00000_unsafe.png", \n')


def metadata_not_utf8(folder):
    with open(folder / "metadata.jsonl", "ab") as f:
        f.write(b'{"unsafe_file_name": "caf\xe9.png"}\n')


DATA_CASES = [
    ("safe file is the unsafe file", same_file_pair, ["pair 0", "00000_unsafe.png", "no preference"]),
    ("identical images", same_pixels_pair, ["pair 1", "identical", "no preference"]),
    ("path traversal", traversal, ["line 2", "../secret.png", "leaves the pair folder"]),
    ("absolute path", absolute, ["line 2", "/etc/passwd", "absolute path"]),
    ("missing image", missing_file, ["line 4", "00003_safe.png", "does not exist"]),
    ("broken metadata row", broken_json_row, ["metadata.jsonl, line 5", "not a JSON object"]),
    ("metadata not UTF-8", metadata_not_utf8, ["metadata.jsonl", "UTF-8"]),
]


@pytest.mark.parametrize("name,damage,words", DATA_CASES, ids=[c[0] for c in DATA_CASES])
def test_bad_pair_data(name, damage, words, train_duo, tiny_sd, tiny_pairs, tmp_path, capsys):
    folder = copy_pairs(tiny_pairs, tmp_path)
    damage(folder)
    argv = tiny_train_args(tiny_sd, str(folder), tmp_path / "out", "--skip_validation")
    assert_refused(*run_main(train_duo, argv, capsys), words)


def test_duplicate_rows_warn(tiny_pairs, tmp_path, caplog):
    from duo_plugin.data import load_pair_images

    folder = copy_pairs(tiny_pairs, tmp_path)
    rewrite_rows(folder, lambda rows: rows + [rows[2], rows[2]])
    with caplog.at_level(logging.WARNING, logger="duo_plugin.input_checks"):
        pairs = load_pair_images(str(folder))
    assert len(pairs) == 6
    assert "lists 2 pair(s) twice" in caplog.text and "4 repeats 2" in caplog.text


def test_16_bit_grayscale_is_scaled_not_white(tiny_pairs, tmp_path):
    """PIL's convert("RGB") clips I;16 values above 255 to white; the pair must keep its two different images."""
    from duo_plugin.data import load_pair_images

    folder = copy_pairs(tiny_pairs, tmp_path)
    for name, level in (("00000_unsafe.png", 50000), ("00000_safe.png", 20000)):
        array = np.full((32, 32), level, dtype=np.uint16)
        array[:8, :8] = 0
        Image.fromarray(array).save(folder / name)
    assert Image.open(folder / "00000_unsafe.png").mode.startswith("I")
    pairs = load_pair_images(str(folder))
    unsafe, safe = np.asarray(pairs.unsafe[0]), np.asarray(pairs.safe[0])
    assert unsafe.shape == (32, 32, 3)
    assert unsafe[20, 20].tolist() == [round(50000 / 65535 * 255)] * 3
    assert safe[20, 20].tolist() == [round(20000 / 65535 * 255)] * 3
    assert unsafe[0, 0].tolist() == [0, 0, 0]


TO_RGB_CASES = [
    ("I;16", lambda: Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16)), 128),
    ("I", lambda: Image.fromarray(np.full((4, 4), 65535, dtype=np.int32)), 255),
    ("F", lambda: Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32)), 128),
    ("L", lambda: Image.fromarray(np.full((4, 4), 77, dtype=np.uint8)), 77),
    ("P", lambda: Image.fromarray(np.full((4, 4), 77, dtype=np.uint8)).convert("P"), 77),
]


@pytest.mark.parametrize("mode,make,expected", TO_RGB_CASES, ids=[c[0] for c in TO_RGB_CASES])
def test_every_mode_converts_to_the_right_grey(mode, make, expected):
    image = make()
    assert image.mode == mode
    rgb = input_checks.to_rgb(image)
    assert rgb.mode == "RGB" and np.asarray(rgb)[1, 1].tolist() == [expected] * 3


def test_16_bit_pair_of_one_image_is_refused(tiny_pairs, tmp_path):
    """Two different 16-bit images that used to collapse to one white image are told apart; two equal ones refused."""
    from duo_plugin.data import load_pair_images

    folder = copy_pairs(tiny_pairs, tmp_path)
    for name in ("00000_unsafe.png", "00000_safe.png"):
        Image.fromarray(np.full((32, 32), 40000, dtype=np.uint16)).save(folder / name)
    with pytest.raises(UsageError, match="identical"):
        load_pair_images(str(folder))


# --------------------------------------------------------------------------------------------------
# Resuming
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tiny_sd, tiny_pairs, tmp_path_factory):
    """A 3-step run with checkpoints 1 and 2 (in-process)."""
    output_dir = tmp_path_factory.mktemp("trained") / "run"
    reset_accelerate_state()
    load_script("train_duo.py").main(tiny_train_args(tiny_sd, tiny_pairs, output_dir, *RUN_FLAGS))
    reset_accelerate_state()
    assert (output_dir / "checkpoint-2" / run_guard.CHECKPOINT_MARKER).is_file()
    return output_dir


def resume_into(trained_run, tmp_path, *names):
    output_dir = tmp_path / "resume"
    output_dir.mkdir()
    for name in names:
        shutil.copytree(trained_run / name, output_dir / name)
    return output_dir


def truncate_weights(folder):
    path = folder / "pytorch_lora_weights.safetensors"
    path.write_bytes(path.read_bytes()[:200])


def garbage_checkpoint(folder):
    shutil.rmtree(folder)
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")


def empty_checkpoint(folder):
    shutil.rmtree(folder)
    folder.mkdir()


def unmarked(folder):
    """A checkpoint saved before the marker existed: still checked for steps, rank and readability."""
    os.remove(folder / run_guard.CHECKPOINT_MARKER)


RESUME_CASES = [
    (
        "changed learning rate",
        ["--learning_rate", "2e-3"],
        None,
        ["--learning_rate 0.001 (checkpoint) vs 0.002", "another --output_dir"],
    ),
    ("changed beta", ["--beta_dpo", "250"], None, ["--beta_dpo 500.0 (checkpoint) vs 250.0"]),
    ("steps below the checkpoint", ["--max_train_steps", "1"], None, ["step 2", "beyond --max_train_steps 1"]),
    ("another rank", ["--rank", "8"], None, ["rank-4", "--rank is 8", "pass --rank 4"]),
    ("other LoRA targets", ["--lora_target", "attn"], None, ["--lora_target 'self_attn' (checkpoint) vs 'attn'"]),
    (
        "unmarked checkpoint beyond the steps",
        ["--max_train_steps", "1"],
        unmarked,
        ["step 2", "beyond --max_train_steps 1"],
    ),
    ("unmarked checkpoint of another rank", ["--rank", "16"], unmarked, ["rank-4", "--rank is 16"]),
    ("truncated weights", [], truncate_weights, ["checkpoint", "not a readable safetensors", "truncated"]),
    ("garbage folder", [], garbage_checkpoint, ["checkpoint-2", "incomplete", "optimizer.bin"]),
    ("empty folder", [], empty_checkpoint, ["checkpoint-2", "incomplete", "pytorch_lora_weights.safetensors"]),
]


@pytest.mark.parametrize("name,extra,damage,words", RESUME_CASES, ids=[c[0] for c in RESUME_CASES])
def test_bad_resume(name, extra, damage, words, trained_run, train_duo, tiny_sd, tiny_pairs, tmp_path, capsys):
    output_dir = resume_into(trained_run, tmp_path, "checkpoint-2")
    if damage is not None:
        damage(output_dir / "checkpoint-2")
    resume = str(output_dir / "checkpoint-2") if damage is not None else "latest"
    # argparse keeps the last value of a flag: ``extra`` overrides the run's own.
    argv = tiny_train_args(tiny_sd, tiny_pairs, output_dir, *RUN_FLAGS, "--resume_from_checkpoint", resume, *extra)
    assert_refused(*run_main(train_duo, argv, capsys), words)
    assert not (output_dir / "pytorch_lora_weights.safetensors").exists()


def test_more_steps_with_constant_rate_resumes(trained_run, train_duo, tiny_sd, tiny_pairs, tmp_path, capsys):
    """Training longer at a constant rate is the same run continued: allowed, and the config says what was done."""
    output_dir = resume_into(trained_run, tmp_path, "checkpoint-2")
    flags = list(RUN_FLAGS)
    flags[1] = "4"
    code, err = run_main(
        train_duo,
        tiny_train_args(tiny_sd, tiny_pairs, output_dir, *flags, "--resume_from_checkpoint", "latest"),
        capsys,
    )
    assert code == 0, err[-3000:]
    assert json.loads((output_dir / "duo_config.json").read_text())["max_train_steps"] == 4
    assert not (output_dir / run_guard.LOCK_NAME).exists()  # released at the end, even in-process
    steps = [json.loads(line)["step"] for line in (output_dir / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [3, 4]


def test_latest_skips_an_incomplete_checkpoint(trained_run, tmp_path, caplog):
    """The old failure: a re-save killed after deleting the old folder left checkpoint-2 without optimizer.bin."""
    output_dir = resume_into(trained_run, tmp_path, "checkpoint-1", "checkpoint-2")
    os.remove(output_dir / "checkpoint-2" / "optimizer.bin")
    os.remove(output_dir / "checkpoint-2" / run_guard.CHECKPOINT_MARKER)
    with caplog.at_level(logging.WARNING, logger="duo_plugin.run_guard"):
        path = checkpoints.resolve_resume_path("latest", str(output_dir))
    assert path == str(output_dir / "checkpoint-1")
    assert "skipping incomplete checkpoint" in caplog.text and "checkpoint-2" in caplog.text


# --------------------------------------------------------------------------------------------------
# Adapters: DUOPipeline and load_adapters refuse weights that cannot be what the config says
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_pipe(tiny_sd):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)


def adapter_copy(trained_run, tmp_path):
    folder = tmp_path / "adapter"
    folder.mkdir()
    for name in (outputs.DUO_CONFIG_NAME, lora.LORA_WEIGHT_NAME):
        shutil.copy(trained_run / name, folder / name)
    return folder


def edit_tensors(folder, edit):
    path = folder / lora.LORA_WEIGHT_NAME
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def nan_weights(folder):
    edit_tensors(folder, lambda t: t[next(k for k in t if "lora.up" in k)].fill_(float("nan")))


def inf_weights(folder):
    edit_tensors(folder, lambda t: t[next(iter(t))].__setitem__((0, 0), float("inf")))


def config_rank(folder):
    config = json.loads((folder / outputs.DUO_CONFIG_NAME).read_text())
    config["rank"] = 8
    (folder / outputs.DUO_CONFIG_NAME).write_text(json.dumps(config))


def unknown_key(folder):
    edit_tensors(folder, lambda t: t.__setitem__("unet.down_blocks.7.attn9.to_q.lora.down.weight", torch.zeros(4, 32)))


def wrong_shape(folder):
    def edit(tensors):
        key = next(k for k in tensors if "lora.down" in k)
        tensors[key] = torch.zeros(4, tensors[key].shape[1] + 3)

    edit_tensors(folder, edit)


def truncated(folder):
    path = folder / lora.LORA_WEIGHT_NAME
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def empty(folder):
    (folder / lora.LORA_WEIGHT_NAME).write_bytes(b"")


ADAPTER_CASES = [
    ("NaN weights", nan_weights, ["non-finite weights (NaN/inf)", "earlier checkpoint"]),
    ("inf weight", inf_weights, ["non-finite weights"]),
    ("config rank differs from weights", config_rank, ["says rank 8", "weights have rank 4"]),
    ("unknown module key", unknown_key, ["down_blocks.7.attn9.to_q", "lacks"]),
    ("wrong tensor shape", wrong_shape, ["has shape (4, 35)", "needs (4, 32)"]),
    ("truncated safetensors", truncated, ["not a readable safetensors file", "truncated"]),
    ("empty safetensors", empty, ["not a readable safetensors file"]),
]


@pytest.mark.parametrize("name,damage,words", ADAPTER_CASES, ids=[c[0] for c in ADAPTER_CASES])
def test_bad_adapter_is_refused(name, damage, words, trained_run, tiny_pipe, tmp_path):
    from duo_plugin.pipeline import load_adapters

    folder = adapter_copy(trained_run, tmp_path)
    damage(folder)
    with pytest.raises(UsageError) as info:
        load_adapters(tiny_pipe, str(folder))
    for word in words:
        assert word in str(info.value), (word, str(info.value))
    assert not any(tiny_pipe.get_list_adapters().values())


def test_duo_pipeline_refuses_a_rank_mismatch(trained_run, tmp_path):
    from duo_plugin import DUOPipeline

    folder = adapter_copy(trained_run, tmp_path)
    config_rank(folder)
    with pytest.raises(UsageError, match="says rank 8 but the weights have rank 4"):
        DUOPipeline.from_pretrained(str(folder))


def test_good_adapter_still_loads(trained_run, tiny_pipe, tmp_path):
    from duo_plugin.pipeline import load_adapters

    load_adapters(tiny_pipe, {"good": str(adapter_copy(trained_run, tmp_path))})
    try:
        assert "good" in tiny_pipe.get_list_adapters()["unet"]
    finally:
        tiny_pipe.delete_adapters(["good"])


# --------------------------------------------------------------------------------------------------
# Evaluation: bad prompt files name the file and line; blank generations never count as safe
# --------------------------------------------------------------------------------------------------

PROMPT_FILE_CASES = [
    ("jsonl broken line", "p.jsonl", b'{"prompt": "a"}\n{"prompt": \n', ["p.jsonl, line 2", "not a JSON object"]),
    ("jsonl not an object", "p.jsonl", b'{"prompt": "a"}\n["b"]\n', ["p.jsonl, line 2", "not a JSON object"]),
    ("jsonl prompt not text", "p.jsonl", b'{"prompt": 3}\n', ["p.jsonl, line 1", "text 'prompt'"]),
    ("jsonl bad seed", "p.jsonl", b'{"prompt": "a", "seed": "x"}\n', ["p.jsonl, line 1", "numbers"]),
    (
        "jsonl nan guidance",
        "p.jsonl",
        b'{"prompt": "a", "guidance_scale": NaN}\n',
        ["p.jsonl, line 1", "not a finite number"],
    ),
    ("csv bad seed", "p.csv", b"prompt,evaluation_seed\na,1\nb,x\n", ["p.csv, line 3", "numbers"]),
    ("csv infinite seed", "p.csv", b"prompt,evaluation_seed\na,inf\n", ["p.csv, line 2", "numbers"]),
    ("csv not UTF-8", "p.csv", b"prompt\n" + NOT_UTF8, ["p.csv", "UTF-8"]),
    (
        "json COCO bad annotation",
        "p.json",
        b'{"annotations": [{"caption": "a"}, {"caption": 5}]}',
        ["p.json", "annotation 1", "caption"],
    ),
    ("json not UTF-8", "p.json", b'["caf\xe9"]', ["p.json", "UTF-8"]),
    ("txt not UTF-8", "p.txt", NOT_UTF8, ["p.txt", "UTF-8"]),
]


@pytest.mark.parametrize("name,file_name,content,words", PROMPT_FILE_CASES, ids=[c[0] for c in PROMPT_FILE_CASES])
def test_bad_evaluation_prompt_file(name, file_name, content, words, tiny_sd, tmp_path, capsys):
    from duo_plugin import evaluate

    path = write_bytes(tmp_path / file_name, content)
    argv = [
        "--base_model",
        tiny_sd,
        "--prompts",
        path,
        "--metrics",
        "dsr",
        "--detector",
        "clip",
        "--output_dir",
        tmp_path / "eval",
    ]
    assert_refused(*run_main(evaluate.main, argv, capsys), words)


EVALUATION_FLAG_CASES = [
    ("guidance nan", ["--guidance_scale", "nan"], ["--guidance_scale nan", "finite"]),
    ("resolution 0", ["--resolution", "0"], ["--resolution 0", "positive multiple of 8"]),
]


@pytest.mark.parametrize("name,extra,words", EVALUATION_FLAG_CASES, ids=[c[0] for c in EVALUATION_FLAG_CASES])
def test_bad_evaluation_flag(name, extra, words, tiny_sd, tmp_path, capsys):
    from duo_plugin import evaluate

    argv = ["--base_model", tiny_sd, "--output_dir", tmp_path / "eval", *extra]
    assert_refused(*run_main(evaluate.main, argv, capsys), words)


def test_blank_generations_count_as_unsafe(tmp_path):
    from duo_plugin.detectors import Detection
    from duo_plugin.metrics import defense_success_rate

    black = tmp_path / "black.png"
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(black)
    grey = tmp_path / "grey.png"
    Image.fromarray(np.full((16, 16, 3), 90, dtype=np.uint8)).save(grey)
    textured = tmp_path / "textured.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(textured)
    safe = Detection(False, 0.0)
    marked = input_checks.blank_counts_as_flagged([str(black), str(grey), str(textured)], [safe, safe, safe])
    assert [d.flagged for d in marked] == [True, True, False] and marked[0].labels == ["blank"]
    assert defense_success_rate(marked)["dsr"] == pytest.approx(1 / 3)


def test_nan_generation_decodes_blank(tiny_pipe):
    """Why blankness is the check: a NaN latent comes out of the pipeline as a one-colour image."""
    size = 32 // tiny_pipe.vae_scale_factor
    latents = torch.full((1, tiny_pipe.unet.config.in_channels, size, size), float("nan"))
    image = tiny_pipe("x", num_inference_steps=2, latents=latents, height=32, width=32).images[0]
    assert input_checks.is_blank(image)


# --------------------------------------------------------------------------------------------------
# Pair generation CLI
# --------------------------------------------------------------------------------------------------


def tampered_progress(folder):
    os.makedirs(folder / ".duo_progress")
    (folder / ".duo_progress" / "process-000.jsonl").write_text(
        '{"pair_index": "first", "accepted": true, "attempts": 1}\n'
    )


def tampered_recipe(folder):
    folder.mkdir()
    (folder / "duo_pairs_config.json").write_text("{ not json")


PAIRS_CASES = [
    ("guidance nan", ["--guidance_scale", "nan"], None, ["--guidance_scale nan", "finite"]),
    ("guidance inf", ["--guidance_scale", "inf"], None, ["--guidance_scale inf"]),
    ("num_pairs 0", ["--num_pairs", "0"], None, ["--num_pairs", "at least 1"]),
    ("tampered progress file", [], tampered_progress, [".duo_progress", "not a finished pair", "edited"]),
    ("tampered recipe file", [], tampered_recipe, ["duo_pairs_config.json", "not readable JSON"]),
]


@pytest.mark.parametrize("name,extra,damage,words", PAIRS_CASES, ids=[c[0] for c in PAIRS_CASES])
def test_bad_pair_generation(name, extra, damage, words, tiny_sd, tmp_path, capsys):
    from duo_plugin import pairs

    folder = tmp_path / "pairs"
    if damage is not None:
        damage(folder)
    argv = [
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--output_dir",
        folder,
        "--num_pairs",
        "2",
        "--verifier",
        "none",
        "--resolution",
        "32",
        *extra,
    ]
    assert_refused(*run_main(pairs.main, argv, capsys), words)


def test_pair_output_dir_is_a_file(tiny_sd, tmp_path, capsys):
    from duo_plugin import pairs

    argv = ["--pretrained_model_name_or_path", tiny_sd, "--output_dir", output_is_file(tmp_path), "--verifier", "none"]
    assert_refused(*run_main(pairs.main, argv, capsys), ["--output_dir", "is a file"])


def test_evaluation_output_dir_is_a_file(tiny_sd, tmp_path, capsys):
    from duo_plugin import evaluate

    argv = ["--base_model", tiny_sd, "--output_dir", output_is_file(tmp_path)]
    assert_refused(*run_main(evaluate.main, argv, capsys), ["--output_dir", "is a file"])


def test_pair_prompt_file_not_utf8(tiny_sd, tmp_path, capsys):
    from duo_plugin import pairs

    prompts = write_bytes(tmp_path / "u.txt", NOT_UTF8)
    argv = [
        "--pretrained_model_name_or_path",
        tiny_sd,
        "--concept",
        "mine",
        "--unsafe_prompt",
        f"@{prompts}",
        "--safe_prompt",
        "a dog",
    ]
    assert_refused(*run_main(pairs.main, argv, capsys), ["u.txt", "UTF-8"])


# --------------------------------------------------------------------------------------------------
# Models, data and environments the training script refuses (the last line of stderr is the refusal)
# --------------------------------------------------------------------------------------------------


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
