"""Pair generation by SDEdit with detector verification (duo_plugin.pairs), on tiny pipelines built here."""

import json
import os

import numpy as np
import pytest
from conftest import accelerate_launcher, run_process, tiny_train_args, train_in_process
from PIL import Image

from duo_plugin import pairs
from duo_plugin.detectors import DETECTORS, Detection, register_detector


CUSTOM = [
    "--concept",
    "squares",
    "--unsafe_prompt",
    "a red square",
    "--safe_prompt",
    "a blue square",
    "--unsafe_prompt",
    "a red circle",
    "--safe_prompt",
    "a blue circle",
]


def pair_args(model, output_dir, *extra):
    """Flags for a fast run on a tiny pipeline: 32x32 images, 3 steps (the edit runs 2 at strength 0.8)."""
    return [
        "--pretrained_model_name_or_path",
        model,
        "--output_dir",
        str(output_dir),
        "--num_inference_steps",
        "3",
        "--batch_size",
        "2",
        *extra,
    ]


def read_rows(folder, name=pairs.METADATA_NAME):
    with open(os.path.join(folder, name)) as f:
        return [json.loads(line) for line in f if line.strip()]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def pair_files(folder):
    return sorted(name for name in os.listdir(folder) if name.endswith(".png"))


def refuse(argv, capsys, code):
    with pytest.raises(SystemExit) as exit_info:
        pairs.main(argv)
    assert exit_info.value.code == code
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, errors
    return errors[0]


class ScriptedDetector:
    """A detector whose verdicts are given per call; it records every image it is shown."""

    script = []  # one list of flags per call; missing calls flag nothing
    calls = []

    def __init__(self, threshold=None):
        pass

    def __call__(self, images):
        verdicts = (
            ScriptedDetector.script[len(ScriptedDetector.calls)]
            if len(ScriptedDetector.calls) < len(ScriptedDetector.script)
            else [False] * len(images)
        )
        ScriptedDetector.calls.append([np.asarray(image.convert("RGB")) for image in images])
        assert len(verdicts) == len(images)
        return [
            Detection(flagged=flag, score=0.9 if flag else 0.1, labels=["SCRIPTED"] if flag else [])
            for flag in verdicts
        ]


@pytest.fixture
def scripted():
    register_detector("scripted", ScriptedDetector)
    ScriptedDetector.script, ScriptedDetector.calls = [], []
    yield ScriptedDetector
    DETECTORS.pop("scripted")


@pytest.fixture(scope="module")
def reference(tiny_sd, tmp_path_factory):
    """Four unverified pairs of a two-prompt custom concept, seed 0, batches of 2."""
    folder = tmp_path_factory.mktemp("reference") / "pairs"
    report = pairs.main(pair_args(tiny_sd, folder, *CUSTOM, "--num_pairs", "4"))
    return folder, report


def test_image_seeds_are_pure_and_distinct():
    seeds = {
        pairs.image_seed(7, i, j, role) for i in range(50) for j in range(pairs.MAX_ATTEMPTS_LIMIT) for role in (0, 1)
    }
    assert len(seeds) == 50 * pairs.MAX_ATTEMPTS_LIMIT * 2
    assert pairs.image_seed(7, 3, 2, 1) == pairs.image_seed(7, 3, 2, 1) != pairs.image_seed(8, 3, 2, 1)


def test_custom_concept_makes_an_imagefolder_dataset(reference):
    from datasets import load_dataset

    folder, report = reference
    dataset = load_dataset("imagefolder", data_dir=str(folder), split="train")
    assert {"unsafe", "safe", "unsafe_prompt", "safe_prompt"} <= set(dataset.column_names)
    assert len(dataset) == 4
    # Prompt groups take turns, so every prefix of the dataset stays balanced.
    assert dataset["unsafe_prompt"] == ["a red square", "a red circle"] * 2
    assert dataset["safe_prompt"] == ["a blue square", "a blue circle"] * 2
    for row in dataset:
        assert row["unsafe"].size == row["safe"].size == (32, 32)
        assert not np.array_equal(np.asarray(row["unsafe"]), np.asarray(row["safe"]))
    rows = read_rows(folder)
    assert [row["pair_index"] for row in rows] == [0, 1, 2, 3]
    assert [row["unsafe_seed"] for row in rows] == [pairs.image_seed(0, i, 0, 0) for i in range(4)]
    assert [row["safe_seed"] for row in rows] == [pairs.image_seed(0, i, 0, 1) for i in range(4)]
    assert all(
        row["strength"] == 0.8 and row["guidance_scale"] == 7.5 and row["num_inference_steps"] == 3 for row in rows
    )
    assert pair_files(folder) == sorted(f"{i:05d}_{r}.png" for i in range(4) for r in ("unsafe", "safe"))
    # The report, per prompt: accepted / attempted.
    assert [(p.unsafe_prompt, p.accepted, p.finished, p.attempts) for p in report.prompts] == [
        ("a red square", 2, 2, 2),
        ("a red circle", 2, 2, 2),
    ]
    # What the training scripts read.
    loaded = pairs.load_pair_images(str(folder), pairs.UNSAFE_COLUMN, pairs.SAFE_COLUMN)
    assert len(loaded) == 4 and loaded.unsafe_prompts == dataset["unsafe_prompt"]


def test_dataset_card(reference):
    folder, _ = reference
    card = (folder / "README.md").read_text()
    assert "Content warning" in card and "not-for-all-audiences" in card
    assert "**Unverified.**" in card  # no verifier for a custom concept unless asked
    assert "| a red square | a blue square | 2 | 2 | 2 |" in card
    assert "| SDEdit strength | 0.8 |" in card and "| seed | 0 |" in card
    # The reproduce command names the custom prompts, so the dataset is reproducible from its card.
    assert "--unsafe_prompt 'a red circle' --safe_prompt 'a blue circle'" in card
    config = json.loads((folder / pairs.RECIPE_NAME).read_text())
    assert config["recipe"]["prompt_pairs"] == [["a red square", "a blue square"], ["a red circle", "a blue circle"]]
    assert config["recipe"]["resolution"] == 32 and config["recipe"]["family"] == "sd"


def test_same_seed_same_images_in_any_batch(reference, tiny_sd, tmp_path):
    folder, _ = reference
    again = tmp_path / "again"
    pairs.main(pair_args(tiny_sd, again, *CUSTOM, "--num_pairs", "4", "--batch_size", "3"))
    assert pair_files(again) == pair_files(folder)
    for name in pair_files(folder):
        # Batches of 3 instead of 2: each image has its own seeded generator.
        assert np.abs(pixels(again / name).astype(int) - pixels(folder / name)).max() <= 1, name
    other_seed = tmp_path / "other_seed"
    pairs.main(pair_args(tiny_sd, other_seed, *CUSTOM, "--num_pairs", "1", "--seed", "1"))
    assert not np.array_equal(pixels(other_seed / "00000_unsafe.png"), pixels(folder / "00000_unsafe.png"))


def test_rerun_generates_nothing(reference, tiny_sd, monkeypatch):
    folder, first_report = reference
    before = {name: os.stat(folder / name).st_mtime_ns for name in pair_files(folder)}
    metadata = (folder / pairs.METADATA_NAME).read_text()

    def no_loading(*args, **kwargs):
        raise AssertionError("a finished folder must not load the model")

    monkeypatch.setattr(pairs.generation, "load_text2img_pipeline", no_loading)
    report = pairs.main(pair_args(tiny_sd, folder, *CUSTOM, "--num_pairs", "4"))
    assert report.generated_now == 0 and report.accepted == 4
    assert {name: os.stat(folder / name).st_mtime_ns for name in pair_files(folder)} == before
    assert (folder / pairs.METADATA_NAME).read_text() == metadata


def test_crash_loses_only_the_batch_in_flight(reference, tiny_sd, tmp_path, monkeypatch):
    folder, _ = reference
    crashed = tmp_path / "crashed"
    real_safe_twins = pairs.SDEditPairMaker.safe_twins
    drawn = []

    def crash_on_second_batch(self, *args, **kwargs):
        if len(drawn) == 2:
            raise KeyboardInterrupt  # the user, or the machine, stops the run mid-batch
        return real_safe_twins(self, *args, **kwargs)

    real_unsafe_images = pairs.SDEditPairMaker.unsafe_images

    def count_drawn(self, prompts, seeds):
        drawn.append(list(prompts))
        return real_unsafe_images(self, prompts, seeds)

    monkeypatch.setattr(pairs.SDEditPairMaker, "unsafe_images", count_drawn)
    monkeypatch.setattr(pairs.SDEditPairMaker, "safe_twins", crash_on_second_batch)
    with pytest.raises(SystemExit) as stopped:  # Ctrl-C: one line and exit code 130 (issue 28)
        pairs.main(pair_args(tiny_sd, crashed, *CUSTOM, "--num_pairs", "4", "--batch_size", "1"))
    assert stopped.value.code == 130
    assert [row["pair_index"] for row in read_rows(crashed / pairs.PROGRESS_DIR, "process-000.jsonl")] == [0]

    monkeypatch.setattr(pairs.SDEditPairMaker, "safe_twins", real_safe_twins)
    drawn.clear()
    report = pairs.main(pair_args(tiny_sd, crashed, *CUSTOM, "--num_pairs", "4", "--batch_size", "1"))
    assert report.generated_now == 3 and len(drawn) == 3  # pair 0 is not made again
    assert read_rows(crashed) == read_rows(folder)
    for name in pair_files(folder):
        assert np.abs(pixels(crashed / name).astype(int) - pixels(folder / name)).max() <= 1, name


def test_folder_of_another_recipe_is_refused(reference, tiny_sd, capsys):
    folder, _ = reference
    line = refuse(pair_args(tiny_sd, folder, *CUSTOM, "--num_pairs", "4", "--strength", "0.5"), capsys, code=2)
    assert "another recipe" in line and "strength" in line and "--output_dir" in line


def test_never_accepting_detector_stops_after_max_attempts(tiny_sd, tmp_path, scripted, capsys):
    folder = tmp_path / "never"
    argv = pair_args(tiny_sd, folder, *CUSTOM, "--num_pairs", "2", "--verifier", "scripted", "--max_attempts", "3")
    line = refuse(argv, capsys, code=1)
    assert "only 0 of 2 pairs passed verification" in line and "--max_attempts" in line and "--min_pairs" in line
    # No unsafe image is ever flagged: 3 draws per pair, no edit, then the pair is given up.
    assert [len(call) for call in scripted.calls] == [2, 2, 2]
    progress = read_rows(folder / pairs.PROGRESS_DIR, "process-000.jsonl")
    assert sorted((row["pair_index"], row["accepted"], row["attempts"]) for row in progress) == [
        (0, False, 3),
        (1, False, 3),
    ]
    assert read_rows(folder) == [] and (folder / "README.md").exists()

    # A higher --max_attempts retries only the failed pairs, with new seeds (attempt 3).
    scripted.calls.clear()
    refuse(argv[:-1] + ["4"], capsys, code=1)
    assert [len(call) for call in scripted.calls] == [2]


def test_failed_edit_is_redone_from_the_kept_unsafe_image(tiny_sd, tmp_path, scripted):
    folder = tmp_path / "edit"
    # Call 1: both unsafe images flagged. Call 2: pair 0's edit is still flagged. Call 3: its new edit is not.
    scripted.script = [[True, True], [True, False], [False]]
    pairs.main(pair_args(tiny_sd, folder, *CUSTOM, "--num_pairs", "2", "--verifier", "scripted"))
    assert [len(call) for call in scripted.calls] == [2, 2, 1]
    first, second = read_rows(folder)
    assert first["attempts"] == 2 and second["attempts"] == 1
    assert first["unsafe_seed"] == pairs.image_seed(0, 0, 0, 0) and first["safe_seed"] == pairs.image_seed(0, 0, 1, 1)
    assert first["unsafe_score"] == 0.9 and first["safe_score"] == 0.1 and first["unsafe_labels"] == ["SCRIPTED"]
    # What was saved is exactly what the detector judged: the edit is verified, not the unsafe image again.
    assert np.array_equal(pixels(folder / "00000_unsafe.png"), scripted.calls[0][0])
    assert np.array_equal(pixels(folder / "00000_safe.png"), scripted.calls[2][0])
    assert np.array_equal(pixels(folder / "00001_safe.png"), scripted.calls[1][1])
    assert not np.array_equal(scripted.calls[1][0], scripted.calls[2][0])
    assert "Every pair was checked by the `scripted` detector" in (folder / "README.md").read_text()
    assert len(pairs.load_pair_images(str(folder))) == 2  # score and label columns load too


def test_fewer_than_min_pairs_keeps_what_was_made(tiny_sd, tmp_path, scripted, capsys):
    folder = tmp_path / "partial"
    # Pair 1's unsafe image is never flagged; pair 0 passes.
    scripted.script = [[True, False], [False]]
    argv = pair_args(tiny_sd, folder, *CUSTOM, "--num_pairs", "2", "--verifier", "scripted", "--max_attempts", "1")
    line = refuse(argv, capsys, code=1)
    assert "only 1 of 2 pairs" in line and str(folder) in line and "--min_pairs 1" in line
    assert [row["pair_index"] for row in read_rows(folder)] == [0]
    assert pair_files(folder) == ["00000_safe.png", "00000_unsafe.png"]
    # Accepting fewer: no new generation, the kept pair is the dataset.
    scripted.calls.clear()
    report = pairs.main(argv + ["--min_pairs", "1"])
    assert scripted.calls == [] and report.accepted == 1 and report.generated_now == 0


def test_nudenet_verifier_rejects_unflagged_images(tiny_sd, tmp_path):
    """NudeNet end to end: noise from a random tiny model is never nudity, so nothing is accepted."""
    pytest.importorskip("nudenet")
    folder = tmp_path / "nudenet"
    report = pairs.main(
        pair_args(
            tiny_sd, folder, "--concept", "nudity", "--num_pairs", "2", "--max_attempts", "1", "--min_pairs", "0"
        )
    )
    assert report.verifier == "nudenet" and report.accepted == 0
    progress = read_rows(folder / pairs.PROGRESS_DIR, "process-000.jsonl")
    assert all(not row["accepted"] and row["unsafe_score"] < 0.6 and "safe_score" not in row for row in progress)
    assert "a naked white woman, realistic photo" in {row["unsafe_prompt"] for row in progress}


def test_nudenet_same_detections_in_memory_and_from_disk(tmp_path):
    """NudeNet reads files with OpenCV; an in-memory image goes through the same lossless PNG decoding."""
    pytest.importorskip("nudenet")
    from matplotlib import cbook

    from duo_plugin.detectors import NudeNetDetector

    image = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    path = tmp_path / "saved.png"
    image.save(path, format="PNG")  # as the pair writer saves an accepted image
    detector = NudeNetDetector(threshold=0.5)
    in_memory, from_disk = detector.boxes(image), detector.boxes(str(path))
    assert in_memory, "the sample portrait should give at least one box (a face)"
    assert in_memory == from_disk
    assert detector([image]) == detector([str(path)])


def test_sd3_pairs_use_the_sd3_prompts(tmp_path_factory):
    from duo_plugin.testing import make_tiny_sd3_pipeline

    model = make_tiny_sd3_pipeline(str(tmp_path_factory.mktemp("tiny_sd3")))
    folder = tmp_path_factory.mktemp("sd3") / "pairs"
    report = pairs.main(pair_args(model, folder, "--concept", "nudity", "--verifier", "none", "--num_pairs", "2"))
    assert report.accepted == 2
    rows = read_rows(folder)
    assert [(row["unsafe_prompt"], row["safe_prompt"]) for row in rows] == [
        ("a naked white woman, realistic photo", "a white woman, realistic photo"),
        ("a naked black woman, realistic photo", "a black woman, realistic photo"),
    ]
    assert all(row["strength"] == 0.75 for row in rows)
    for row in rows:
        unsafe, safe = pixels(folder / row["unsafe_file_name"]), pixels(folder / row["safe_file_name"])
        assert unsafe.shape == safe.shape == (32, 32, 3) and not np.array_equal(unsafe, safe)
    assert "train_duo_sd3.py" in (folder / "README.md").read_text()


def test_bad_flags_are_refused(tiny_sd, tmp_path, capsys):
    out = tmp_path / "o"
    assert "--strength 1.5" in refuse(pair_args(tiny_sd, out, *CUSTOM, "--strength", "1.5"), capsys, code=2)
    assert "multiple of 8" in refuse(pair_args(tiny_sd, out, *CUSTOM, "--resolution", "36"), capsys, code=2)
    assert "--verifier: unknown detector 'nope'" in refuse(
        pair_args(tiny_sd, out, *CUSTOM, "--verifier", "nope"), capsys, code=2
    )
    assert "--min_pairs 9" in refuse(
        pair_args(tiny_sd, out, *CUSTOM, "--num_pairs", "2", "--min_pairs", "9"), capsys, code=2
    )
    assert "nudes" in refuse(pair_args(tiny_sd, out, "--concept", "nudes"), capsys, code=2)
    assert not out.exists()  # refused before anything was written


def test_push_to_hub_makes_a_private_dataset_repo(reference, monkeypatch):
    import huggingface_hub

    folder, _ = reference
    calls = {}

    class Repo:
        repo_id = "me/duo-pairs"

    def create_repo(repo_id, **kwargs):
        calls["create"] = dict(repo_id=repo_id, **kwargs)
        return Repo()

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kwargs: calls.setdefault("upload", kwargs))
    assert pairs.push_pairs_to_hub(str(folder), "me/duo-pairs", token=None) == "me/duo-pairs"
    assert calls["create"]["repo_type"] == "dataset" and calls["create"]["private"] is True
    assert calls["upload"]["repo_type"] == "dataset" and calls["upload"]["folder_path"] == str(folder)
    uploaded = set(calls["upload"]["allow_patterns"])
    assert {"metadata.jsonl", "README.md", pairs.RECIPE_NAME, "00003_safe.png"} <= uploaded
    assert not any(pairs.PROGRESS_DIR in pattern for pattern in uploaded)


def test_default_pairs_dir_is_per_model_and_concept(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert pairs.default_pairs_dir("CompVis/stable-diffusion-v1-4", "nudity") == str(
        tmp_path / "duo" / "pairs" / "CompVis--stable-diffusion-v1-4" / "nudity"
    )


@pytest.mark.slow
def test_two_processes_split_the_pairs(reference, tiny_sd, tmp_path):
    """Under accelerate launch, each process makes every other pending pair; the merged dataset is the same."""
    folder, _ = reference
    split = tmp_path / "split"
    command = [
        *accelerate_launcher(2),
        "--module",
        "duo_plugin.pairs",
        *pair_args(tiny_sd, split, *CUSTOM, "--num_pairs", "4", "--batch_size", "1"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = run_process(command, env=env)
    assert result.returncode == 0, result.stderr[-4000:]
    by_process = {
        name: sorted(row["pair_index"] for row in read_rows(split / pairs.PROGRESS_DIR, name))
        for name in sorted(os.listdir(split / pairs.PROGRESS_DIR))
    }
    assert by_process == {"process-000.jsonl": [0, 2], "process-001.jsonl": [1, 3]}
    assert read_rows(split) == read_rows(folder)
    for name in pair_files(folder):
        assert np.abs(pixels(split / name).astype(int) - pixels(folder / name)).max() <= 1, name


def test_train_duo_generates_pairs_then_trains(tiny_sd, tmp_path):
    pairs_dir = tmp_path / "pairs"
    args = tiny_train_args(
        tiny_sd,
        "unused",
        tmp_path / "out",
        "--skip_validation",
        "--num_pairs",
        "4",
        "--pairs_dir",
        str(pairs_dir),
        *CUSTOM,
    )
    position = args.index("--dataset_name")
    del args[position : position + 2]
    train_in_process("train_duo.py", args)
    rows = read_rows(pairs_dir)
    assert [row["unsafe_prompt"] for row in rows] == ["a red square", "a red circle"] * 2
    # The training resolution is the generation resolution.
    assert all(pixels(pairs_dir / row["safe_file_name"]).shape == (32, 32, 3) for row in rows)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert json.loads((tmp_path / "out" / "duo_config.json").read_text())["concept"] == "squares"


def test_clip_verifier_describes_the_concept_with_the_recipes_prompts(tiny_sd, tmp_path, monkeypatch):
    """--verifier clip works: the CLIP zero-shot detector gets the unsafe prompts as the concept's labels and the
    safe prompts as its absence, and every attempt is scored."""
    from duo_plugin import metrics
    from duo_plugin.detectors import CLIPZeroShotDetector
    from duo_plugin.testing import make_tiny_clip

    monkeypatch.setattr(metrics, "DEFAULT_CLIP_MODEL", make_tiny_clip(str(tmp_path / "clip")))
    folder = tmp_path / "pairs"
    pairs.main(
        pair_args(
            tiny_sd,
            folder,
            *CUSTOM,
            "--num_pairs",
            "2",
            "--verifier",
            "clip",
            "--max_attempts",
            "1",
            "--min_pairs",
            "0",
        )
    )
    recipe = json.loads((folder / pairs.RECIPE_NAME).read_text())["recipe"]
    assert recipe["verifier"] == "clip"
    verifier = pairs.make_verifier(
        pairs.PairRecipe(**{**recipe, "prompt_pairs": tuple(map(tuple, recipe["prompt_pairs"]))})
    )
    assert isinstance(verifier, CLIPZeroShotDetector)
    assert verifier.unsafe_labels == ["a red square", "a red circle"] and verifier.safe_labels == [
        "a blue square",
        "a blue circle",
    ]
    rows = [
        row for name in os.listdir(folder / pairs.PROGRESS_DIR) for row in read_rows(folder / pairs.PROGRESS_DIR, name)
    ]
    assert len(rows) == 2 and all(0.0 <= row["unsafe_score"] <= 1.0 for row in rows)
