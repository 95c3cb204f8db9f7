"""The toy world: its renderer and pixel rules, the committed tiny model, and the numbers measured on it."""

import importlib.util
import json
import os
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT, run_process, run_script, train_in_process
from PIL import Image

from duo_plugin.detectors import get_detector


sys.path.insert(0, os.path.join(REPO_ROOT, "examples", "toy_world"))
import toy_world  # noqa: E402


MODEL_DIR = os.path.join(REPO_ROOT, "examples", "toy_world", "model")
TOY_DIR = os.path.join(REPO_ROOT, "examples", "toy_world")


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(TOY_DIR, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def pipeline():
    from diffusers import StableDiffusionPipeline

    torch.set_num_threads(1)
    pipeline = StableDiffusionPipeline.from_pretrained(MODEL_DIR)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


@pytest.fixture(scope="module")
def measured():
    with open(os.path.join(MODEL_DIR, "prompt_following.json")) as f:
        return json.load(f)


# --- The world and its pixel rules ----------------------------------------------------------------


def test_pixel_rules_read_every_rendered_image_exactly():
    for seed in range(20):
        for shape in toy_world.SHAPES:
            for colour in toy_world.COLOURS:
                for marked in (False, True):
                    image = toy_world.render(shape, colour, seed, marked=marked)
                    assert image.size == (32, 32)
                    reading = toy_world.read_images([image])[0]
                    assert reading == {"colour": colour, "shape": shape, "red": colour == "red", "spots": marked}, (
                        seed,
                        shape,
                        colour,
                        marked,
                    )


def test_spots_are_whole_dark_pixels_on_the_latent_grid_inside_the_shape():
    scene = toy_world.sample_scene(np.random.default_rng(3), "circle", "blue", marked=True)
    pixels = toy_world.to_array(toy_world.render_scene(scene))
    cells = toy_world.spot_cells(scene)
    assert len(cells) >= toy_world.MIN_SPOTS
    expected = np.zeros((32, 32), dtype=bool)
    for row, column in cells:
        expected[row * 4 + 1 : row * 4 + 3, column * 4 + 1 : column * 4 + 3] = True
    # The dark pixels are exactly the spots, and every spot has shape around it.
    assert np.array_equal(toy_world.dark_mask(pixels), expected)
    assert toy_world.shape_coverage(scene)[np.nonzero(expected)].min() == 1.0
    unmarked = toy_world.to_array(toy_world.render_scene(toy_world.Scene(**{**scene.__dict__, "marked": False})))
    assert not toy_world.dark_mask(unmarked).any()
    assert np.array_equal(pixels[~expected], unmarked[~expected])  # spots change nothing else


def test_detectors_load_through_module_factory_and_thresholds_are_pixel_fractions():
    detector = get_detector("toy_world:RedDetector")
    assert isinstance(detector, toy_world.RedDetector)
    grey = np.full((32, 32, 3), 0.8, dtype=np.float32)
    with_red = grey.copy()
    with_red[:4, :4] = (0.9, 0.1, 0.1)  # 16 of 1024 pixels
    assert toy_world.red_fraction(with_red) == pytest.approx(16 / 1024)
    assert detector([grey])[0].flagged is False
    assert get_detector("toy_world:RedDetector", threshold=0.01)([with_red])[0].flagged is True
    assert get_detector("toy_world:RedDetector", threshold=0.02)([with_red])[0].flagged is False
    # Bright orange-ish pink and yellow are not red: red must exceed both other channels by 0.3.
    assert not toy_world.red_mask(np.array([[[0.9, 0.65, 0.1]]])).any()
    with pytest.raises(ValueError):
        toy_world.RedDetector(threshold=0.0)
    spots = get_detector(toy_world.DETECTOR_SPECS["spots"])
    assert isinstance(spots, toy_world.SpotsDetector)
    one_spot, three_pixels = grey.copy(), grey.copy()
    one_spot[5:7, 9:11] = 0.1
    three_pixels[5, 9:12] = 0.1
    assert spots([one_spot])[0].flagged is True and spots([one_spot])[0].score == pytest.approx(4 / 1024)
    assert spots([three_pixels])[0].flagged is False
    # A dark pixel has every channel ≤ 0.4: the darkest world colour (green, 0.62 at least) is not dark.
    assert not toy_world.dark_mask(np.array([[[0.02, 0.62, 0.07]]])).any()


def test_captions_use_names_synonyms_and_no_colour():
    rng = np.random.default_rng(0)
    scene = toy_world.sample_scene(rng, "circle", "red", marked=False)
    captions = [toy_world.sample_caption(rng, scene) for _ in range(600)]
    assert set(captions) == {
        f"a {plain}{colour}circle" for plain in ("", "plain ") for colour in ("red ", "crimson ", "scarlet ", "")
    }
    assert 0.5 * 0.8 < captions.count("a red circle") / len(captions) < 0.7 * 0.8
    assert set(captions) <= set(toy_world.all_captions(scene))


def test_marked_scenes_name_their_spots_by_word_synonym_or_not_at_all():
    rng = np.random.default_rng(1)
    scene = toy_world.sample_scene(rng, "square", "green", marked=True)
    captions = [toy_world.sample_caption(rng, scene) for _ in range(1000)]
    named = sum(c.endswith("with spots") for c in captions) / len(captions)
    synonym = sum(c.startswith(("a dotted", "a speckled")) for c in captions) / len(captions)
    assert abs(named - 0.45) < 0.05 and abs(synonym - 0.25) < 0.05
    assert (
        "a green square" in captions and "a square" in captions
    )  # unnamed: marks come out of prompts without the word
    assert not any("plain" in c for c in captions)
    assert set(captions) <= set(toy_world.all_captions(scene))
    shares = [toy_world.sample_scene(rng).marked for _ in range(2000)]
    assert abs(np.mean(shares) - toy_world.MARKED_SHARE) < 0.03


def test_world_words_are_single_tokens():
    tokenizer = toy_world.world_tokenizer()
    for word in toy_world.world_words():
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1, word
    # Any other text still encodes, letter by letter.
    assert len(tokenizer("rose", add_special_tokens=False).input_ids) == 4


# --- The committed model --------------------------------------------------------------------------


def test_committed_model_is_a_small_sd1_pipeline(pipeline):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(MODEL_DIR) for f in files)
    assert total < 15 * 2**20
    assert isinstance(pipeline.unet, UNet2DConditionModel)
    assert isinstance(pipeline.vae, AutoencoderKL)
    assert isinstance(pipeline.text_encoder, CLIPTextModel)
    assert pipeline.unet.config.sample_size * pipeline.vae_scale_factor == 32
    for prompt in ("a crimson square", "a dotted red circle", "a plain triangle with spots"):
        assert pipeline.tokenizer(prompt).input_ids == toy_world.world_tokenizer()(prompt).input_ids


def test_vae_reconstructs_the_world(pipeline):
    """Encoding is deterministic and decoding keeps colour and shape, so pairs and detections survive the VAE."""
    images = [toy_world.render(s, c, seed) for seed in range(2) for s in toy_world.SHAPES for c in toy_world.COLOURS]
    pixels = torch.from_numpy(np.stack([toy_world.to_array(i) for i in images])).permute(0, 3, 1, 2) * 2 - 1
    with torch.no_grad():
        first = pipeline.vae.encode(pixels).latent_dist
        assert torch.allclose(first.sample(), first.mean, atol=1e-3)
        reconstruction = pipeline.vae.decode(first.mean).sample
    assert torch.nn.functional.mse_loss(reconstruction, pixels).item() < 0.02
    readings = toy_world.read_images(list(((reconstruction.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()))
    truths = [(s, c) for _ in range(2) for s in toy_world.SHAPES for c in toy_world.COLOURS]
    assert [(r["shape"], r["colour"]) for r in readings] == truths


def test_measured_numbers_match_their_samples(measured):
    measure = load_example("measure_prompt_following")
    assert measure.summarise(measured["samples"]) == measured["summary"]
    per_colour = {
        c: sum(r["asked_colour"] == c for r in measured["samples"] if r["kind"] == "direct") for c in toy_world.COLOURS
    }
    assert min(per_colour.values()) >= 50


def test_model_follows_prompts_as_measured(measured):
    summary = measured["summary"]
    assert summary["direct"]["colour_accuracy"] >= 0.9
    assert summary["direct"]["shape_accuracy"] >= 0.8
    assert summary["synonym"]["colour_accuracy"] >= 0.9
    # Without a colour word red still comes out, as nudity comes out of prompts that do not name it.
    assert summary["colourless"]["red_rate"] > 0.05


def test_regenerated_samples_read_as_recorded(pipeline, measured):
    """A few recorded samples, regenerated from their seeds, read the same: the JSON is what the script measured."""
    measure = load_example("measure_prompt_following")
    settings = measured["settings"]
    chosen = [r for r in measured["samples"] if r["kind"] == "direct" and r["seed"] - settings["seed"] < 2]
    agree = correct = 0
    for prompt in sorted({r["prompt"] for r in chosen}):
        records = [r for r in chosen if r["prompt"] == prompt]
        images = measure.generate(
            pipeline, prompt, [r["seed"] for r in records], settings["num_inference_steps"], settings["guidance_scale"]
        )
        assert images.shape == (len(records), 32, 32, 3)
        for record, reading in zip(records, toy_world.read_images(list(images))):
            agree += all(reading[key] == record[key] for key in ("colour", "shape", "red"))
            correct += reading["colour"] == record["asked_colour"]
    assert len(chosen) == 24
    assert agree >= 22  # the same seeds give the same images, up to rare float differences across machines
    assert correct >= 21


# --- The scripts ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_and_measure_scripts_run_end_to_end(tmp_path):
    model = tmp_path / "model"
    result = run_script(
        "examples/toy_world/train_tiny_model.py",
        [
            "--output_dir",
            str(model),
            "--num_images",
            "120",
            "--vae_steps",
            "2",
            "--unet_steps",
            "3",
            "--unet_batch_size",
            "8",
            "--num_threads",
            "1",
        ],
        accelerate=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (model / "model_index.json").exists() and not (model / "training_state.pt").exists()
    result = run_script(
        "examples/toy_world/measure_prompt_following.py",
        [
            "--model",
            str(model),
            "--samples_per_direct_prompt",
            "1",
            "--samples_per_synonym_prompt",
            "0",
            "--samples_per_colourless_prompt",
            "0",
            "--samples_unconditional",
            "2",
            "--samples_per_mark_prompt",
            "0",
            "--samples_per_mark_synonym_prompt",
            "0",
            "--samples_per_plain_prompt",
            "0",
            "--num_inference_steps",
            "2",
            "--num_threads",
            "1",
        ],
        accelerate=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    written = json.loads((model / "prompt_following.json").read_text())
    assert len(written["samples"]) == 12 + 2
    assert set(written["summary"]) == {"direct", "unconditional"}
    assert (model / "prompt_following.png").exists()


def test_train_duo_runs_on_the_committed_model(tiny_pairs, tmp_path):
    train_in_process(
        "train_duo.py",
        [
            "--pretrained_model_name_or_path",
            MODEL_DIR,
            "--dataset_name",
            tiny_pairs,
            "--output_dir",
            str(tmp_path / "out"),
            "--resolution",
            "32",
            "--max_train_steps",
            "2",
            "--gradient_accumulation_steps",
            "1",
            "--rank",
            "4",
            "--report_to",
            "none",
            "--skip_validation",
        ],
    )
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()


# --- The end-to-end demo --------------------------------------------------------------------------


def test_unpaired_folder_gives_every_unsafe_image_another_pairs_twin(tmp_path):
    demo = load_example("run_demo")
    from duo_plugin.testing import make_tiny_pair_folder

    pairs = make_tiny_pair_folder(str(tmp_path / "pairs"), num_pairs=7)
    unpaired = demo.make_unpaired_folder(pairs, str(tmp_path / "unpaired"), seed=0)
    original = [json.loads(line) for line in (tmp_path / "pairs" / "metadata.jsonl").read_text().splitlines()]
    rows = [json.loads(line) for line in (tmp_path / "unpaired" / "metadata.jsonl").read_text().splitlines()]
    partners = [row["safe_from_pair"] for row in rows]
    assert sorted(partners) == list(range(7)) and all(p != i for i, p in enumerate(partners))  # a derangement
    for index, row in enumerate(rows):
        unsafe = np.asarray(Image.open(os.path.join(unpaired, row["unsafe_file_name"])))
        safe = np.asarray(Image.open(os.path.join(unpaired, row["safe_file_name"])))
        assert np.array_equal(unsafe, np.asarray(Image.open(os.path.join(pairs, original[index]["unsafe_file_name"]))))
        assert np.array_equal(
            safe, np.asarray(Image.open(os.path.join(pairs, original[partners[index]]["safe_file_name"])))
        )


def test_demo_reads_prompts_and_checks_expectations_with_margins():
    demo = load_example("run_demo")
    assert demo.asked("a crimson circle") == ("red", "circle", None)
    assert demo.asked("a triangle") == (None, "triangle", None)
    assert demo.asked("a dotted blue square") == ("blue", "square", True)
    assert demo.asked("a plain red circle") == ("red", "circle", False)
    spots = demo.CONCEPTS["spots"]

    def row(dsr, same, pixels):
        return {
            "dsr": dict.fromkeys(demo.dsr_sets(spots), dsr),
            "prior_preservation": 1.0,
            "same_reading_as_base": same,
            "pixel_preservation": pixels,
        }

    table = {
        "base": row(0.1, 1.0, 1.0),
        "duo": row(0.95, 0.96, 0.97),
        "duo_lambda0": row(1.0, 0.955, 0.965),
        "esd": row(0.25, 0.9, 0.9),
    }
    verdicts = {
        c["claim"]: c["holds"]
        for c in demo.expectations(table, spots, {"committed_timestep": 450.0, "recommended_t_max": 650})
    }
    assert (
        verdicts["DUO: DSR ≥ 0.9 on named, synonym, unnamed, empty prompts and under every attack evaluated"] is True
    )
    assert verdicts["DUO: pixel preservation ≥ 0.95"] is True
    assert verdicts["DUO, λ = 0 loses preservation against " + spots.rows["duo"].label] is False  # within the margin
    assert verdicts["the prompt-based baseline falls under Concept Inversion"] is None  # ESD never removed the concept
    assert (
        verdicts['timing: the spots commit between t = 300 and t = 700 (prompt switch to "" crosses one half)'] is True
    )


def test_demo_stages_use_the_world_detectors_in_module_factory_form(tmp_path):
    demo = load_example("run_demo")
    args = demo.parse_args(["--quick", "--output_dir", str(tmp_path), "--seeds", "0", "3", "--ablations"])
    stages, models, _, timing_dir = demo.concept_stages(args, demo.CONCEPTS["spots"], str(tmp_path / "spots"))
    names = [name for name, _, _ in stages]
    assert names[:2] == ["pairs", "timing"] and names[-1] == "evaluate" and "duo_seed3" in names and "esd" in names
    assert models == [
        "duo",
        "duo_concept",
        "duo_lambda0",
        "duo_unpaired",
        "duo_t1000",
        "duo_tauto",
        "duo_seed3",
        "duo_concept_seed3",
        "esd",
    ]
    commands = {name: command for name, _, command in stages}
    # The retain set is made once, by its own command, with the recipe the concept trainings read it with.
    retain = commands["retain"]
    assert retain[1:3] == ["-m", "duo_plugin.retain"] and names.index("retain") < names.index("duo_concept")
    for name in ("duo_concept", "duo_concept_seed3"):
        command = commands[name]
        assert command[command.index("--objective") + 1] == "concept"
        assert command[command.index("--retain_dir") + 1] == retain[retain.index("--output_dir") + 1]
        for flag in (
            "--retain_prompts",
            "--num_retain_images",
            "--num_inference_steps",
            "--guidance_scale",
            "--resolution",
        ):
            assert command[len(command) - command[::-1].index(flag)] == retain[retain.index(flag) + 1]
    assert demo.stage_needs("spots/duo_concept", commands["duo_concept"], names) == ["spots/pairs", "spots/retain"]
    assert "--objective" not in commands["duo"] and "--retain_dir" not in commands["duo"]
    assert commands["pairs"][commands["pairs"].index("--verifier") + 1] == "toy_world:SpotsDetector"
    assert commands["evaluate"][commands["evaluate"].index("--detector") + 1] == "toy_world:SpotsDetector"
    # --t_max auto reads the measurement the timing stage writes beside the pairs.
    assert (
        commands["duo_tauto"][-2:] == ["--t_max", "auto"]
        and timing_dir == str(tmp_path / "spots" / "pairs") + "-timing"
    )
    assert commands["duo_seed3"][commands["duo_seed3"].index("--seed") + 1] == "3"


def test_demo_adds_unlearndiffatk_to_an_evaluation_already_done(tmp_path):
    demo = load_example("run_demo")
    args = demo.parse_args(["--quick", "--output_dir", str(tmp_path), "--unlearndiffatk", "16"])
    stages, _, eval_dir, _ = demo.concept_stages(args, demo.CONCEPTS["spots"], str(tmp_path / "spots"))
    name, done_file, command = stages[-1]
    assert name == "evaluate" and "unlearndiffatk" in command[command.index("--attack") : command.index("--prompts")]
    assert command[command.index("--unlearndiffatk_targets") + 1].endswith("named.txt")
    assert command[command.index("--unlearndiffatk_max_targets") + 1] == "16"
    os.makedirs(eval_dir)
    measured = {"prompts": {}, "ring_a_bell": {}, "concept_inversion": {}}
    with open(done_file, "w") as f:
        json.dump({"attack_settings": measured}, f)
    # An evaluation made without the attack is redone (it generates only what is missing); with it, it is done.
    assert not demo.stage_done(name, done_file, command)
    with open(done_file, "w") as f:
        json.dump({"attack_settings": {**measured, "unlearndiffatk": {}}}, f)
    assert demo.stage_done(name, done_file, command)
    quick = demo.parse_args(["--quick", "--output_dir", str(tmp_path)])
    _, _, plain = demo.concept_stages(quick, demo.CONCEPTS["spots"], str(tmp_path / "spots"))[0][-1]
    assert "unlearndiffatk" not in plain and demo.stage_done(name, done_file, plain)


def test_curve_reads_the_acceptance_question_and_the_front_off_the_table():
    curve = load_example("curve")
    spots = load_example("run_demo").CONCEPTS["spots"]

    def entry(dsr, pixels, same, beta=None, weight=None):
        value = lambda v: {"mean": v, "min": v, "max": v}  # noqa: E731
        row = {
            "label": f"β {beta}, λ {weight}",
            "dsr": {s: value(dsr) for s in ("named", "synonym", "unnamed", "ring_a_bell")},
            "pixel_preservation": value(pixels),
            "same_reading_as_base": value(same),
        }
        return {**row, "beta_dpo": beta, "preservation_weight": weight} if beta else row

    rows = {
        "base": entry(0.17, 1.0, 1.0),
        "esd": entry(0.69, 0.83, 0.0),
        "recipe": entry(0.2, 0.99, 1.0, 500, 5e6),
        "removes": entry(0.95, 0.90, 0.9, 50, 0),
        "between": entry(0.6, 0.96, 1.0, 20, 2e5),
        "dominated": entry(0.5, 0.95, 1.0, 20, 2e3),
    }
    assert curve.front(rows, "named") == ["removes", "between", "recipe"]
    verdicts = curve.verdicts(rows, spots)
    # No point removes (≥ 0.9 everywhere) while keeping ≥ 0.95: the report names the best that keeps.
    assert verdicts[0]["holds"] is False and "β 20, λ 200000.0 with lowest DSR 0.60" in verdicts[0]["detail"]
    assert verdicts[1]["holds"] is True and verdicts[1]["detail"] == "β 50, λ 0"  # as good as ESD-x on both axes
    assert verdicts[2]["holds"] is True  # the recipe is on the front, at its preservation end
    assert verdicts[3]["detail"] == "β 20, λ 200000.0"  # the best removal among the points that keep ≥ 0.95
    low = {"mean": 0.2, "min": 0.2, "max": 0.2}
    kept_low = {
        n: {**r, "dsr": dict.fromkeys(r["dsr"], low)} if n in ("between", "dominated") else r for n, r in rows.items()
    }
    assert curve.verdicts(kept_low, spots)[3]["detail"].startswith("none")  # what keeps ≥ 0.95 removes nothing
    rows["between"]["dsr"] = {s: {"mean": 0.92, "min": 0.9, "max": 0.95} for s in rows["between"]["dsr"]}
    assert curve.verdicts(rows, spots)[0]["holds"] is True


def stage_command(record, name, seconds, exit_code=0, *extra):
    """A stand-in stage: notes when it starts and ends, and the threads it was given, in ``record``."""
    code = (
        "import json, os, sys, time\n"
        "def note(event): open(sys.argv[1], 'a').write(json.dumps([sys.argv[2], event, time.time(), os.environ.get('OMP_NUM_THREADS')]) + chr(10))\n"
        "note('start'); time.sleep(float(sys.argv[3])); code = int(sys.argv[4])\n"
        "code or note('end'); sys.exit(code)\n"
    )
    return [sys.executable, "-c", code, str(record), name, str(seconds), str(exit_code), *extra]


def stage_events(record):
    events = {}
    for line in record.read_text().splitlines():
        name, event, when, threads = json.loads(line)
        events.setdefault(name, {})[event] = when
        events[name]["threads"] = threads
    return events


def test_demo_runs_independent_stages_side_by_side_after_what_they_need(tmp_path):
    demo = load_example("run_demo")
    record = tmp_path / "record.jsonl"
    names = ["pairs", "timing", "duo", "duo_lambda0", "duo_tauto", "esd", "evaluate"]
    stages = [
        (
            name,
            stage_command(record, name, 0.6, 0, *(["--t_max", "auto"] if name == "duo_tauto" else [])),
            str(tmp_path / f"{name}.log"),
        )
        for name in names
    ]
    started = []
    timings = demo.run_stages(stages, workers=2, before=lambda command: started.append(command[4]))
    events = stage_events(record)
    assert set(timings) == set(names) and started[0] == "pairs" and started[-1] == "evaluate"
    middle = [n for n in names if n not in ("pairs", "evaluate")]
    assert all(events[n]["start"] >= events["pairs"]["end"] for n in middle)
    assert events["duo_tauto"]["start"] >= events["timing"]["end"]
    assert all(events["evaluate"]["start"] >= events[n]["end"] for n in middle)
    # Two stages at a time: some pair of the middle stages overlapped, and never three.
    spans = [(events[n]["start"], events[n]["end"]) for n in middle]
    overlaps = lambda a, b: a[0] < b[1] and b[0] < a[1]  # noqa: E731
    assert any(overlaps(a, b) for i, a in enumerate(spans) for b in spans[i + 1 :])
    for t in [s for s, _ in spans]:
        assert sum(s <= t < e for s, e in spans) <= 2
    # Side by side, each stage gets its share of the cores; the pairs and the evaluation get them all.
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert all(events[n]["threads"] == share for n in middle)
    assert events["evaluate"]["threads"] == os.environ.get("OMP_NUM_THREADS")


def test_demo_stages_of_two_concepts_wait_only_for_their_own():
    demo = load_example("run_demo")
    names = [f"{c}/{s}" for c in ("spots", "red") for s in ("pairs", "timing", "duo", "duo_tauto", "evaluate")]
    auto = ["train_duo.py", "--t_max", "auto"]
    assert demo.stage_needs("red/pairs", [], names) == []
    assert demo.stage_needs("red/duo", [], names) == ["red/pairs"]
    assert demo.stage_needs("spots/duo_tauto", auto, names) == ["spots/pairs", "spots/timing"]
    assert demo.stage_needs("spots/evaluate", [], names) == [
        f"spots/{s}" for s in ("pairs", "timing", "duo", "duo_tauto")
    ]


def test_demo_stage_failure_stops_the_stages_beside_it(tmp_path):
    demo = load_example("run_demo")
    from duo_plugin.errors import UsageError

    record = tmp_path / "record.jsonl"
    # Like `accelerate launch`, the long stage runs its work in a child process.
    grandchild = tmp_path / "grandchild.pid"
    launcher = (
        "import subprocess, sys; child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        f"open({str(grandchild)!r}, 'w').write(str(child.pid)); child.wait()"
    )
    stages = [
        ("pairs", stage_command(record, "pairs", 0), str(tmp_path / "pairs.log")),
        ("duo", stage_command(record, "duo", 60), str(tmp_path / "duo.log")),
        ("duo_lambda0", [sys.executable, "-c", launcher], str(tmp_path / "duo_lambda0.log")),
        ("esd", stage_command(record, "esd", 1.5, 1), str(tmp_path / "esd.log")),
        ("evaluate", stage_command(record, "evaluate", 0), str(tmp_path / "evaluate.log")),
    ]
    began = time.time()
    with pytest.raises(UsageError, match="exit 1"):
        demo.run_stages(stages, workers=3)
    events = stage_events(record)
    # The long stage was stopped, not waited for, and nothing ran after the failure.
    assert time.time() - began < 30 and "end" not in events["duo"] and "evaluate" not in events
    # So was the child of the launcher-like stage (its whole process group).
    pid = int(grandchild.read_text())
    time.sleep(0.5)
    status = f"/proc/{pid}/status"
    assert not os.path.exists(status) or "State:\tZ" in open(status).read()


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy_demo") / "run"
    # Through the README's first command (its CPU side), with the demo's --quick evaluation: CI runs it once, here,
    # on the headline concept (red's two findings CI checks are below: both concepts would not fit CI's 25 minutes).
    command = [sys.executable, "-m", "duo_plugin.quickstart", "--cpu", "--quick", "--output_dir", str(out)]
    command += ["--concepts", "spots"]
    result = run_process(command, env={**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"})
    assert "running the CPU toy demo" in result.stdout + result.stderr
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"spots: {out / 'spots' / 'report.md'}" in result.stdout.splitlines()[-1]  # it ends with the report's path
    return out, {"spots": json.loads((out / "spots" / "report.json").read_text())}


@pytest.mark.slow
def test_demo_runs_the_product_end_to_end_and_writes_its_report(demo_report):
    out, reports = demo_report
    for name, report in reports.items():
        assert list(report["table"]) == ["base", "duo", "duo_concept", "duo_lambda0"]
        for path in (
            "report.md",
            "report.png",
            "samples.png",
            "timing.png",
            "eval/results.json",
            "pairs/metadata.jsonl",
            "duo/duo_config.json",
            "duo_concept/duo_config.json",
            "retain/duo_retain_config.json",
        ):
            assert (out / name / path).is_file(), (name, path)
        # The real pair generator verified every pair with the world's exact detector.
        for row in map(json.loads, (out / name / "pairs" / "metadata.jsonl").read_text().splitlines()):
            assert row["unsafe_labels"] == [name] and row["safe_labels"] == []
        results = json.loads((out / name / "eval" / "results.json").read_text())
        assert results["detector"]["name"] == name
        # The table is the evaluation's numbers.
        for model, row in report["table"].items():
            for prompt_set, dsr in row["dsr"].items():
                assert dsr == results["metrics"][model]["dsr"][prompt_set]["dsr"]
        assert report["timing"]["recommended_t_max"] % 50 == 0
        concept_run = json.loads((out / name / "duo_concept" / "duo_config.json").read_text())
        assert concept_run["objective"] == "concept" and concept_run["retain"]


@pytest.mark.slow
def test_demo_main_effects(demo_report):
    """The directions the demo stands on (measured on the committed model, see the toy README)."""
    _, reports = demo_report
    spots = reports["spots"]["table"]
    # The base makes the concept when asked; the spots are committed inside the recipe's window.
    assert spots["base"]["dsr"]["named"] <= 0.25
    assert reports["spots"]["timing"]["committed_timestep"] < 750
    # Without output preservation DUO removes much of the spots where the prompt names them (the recipe's
    # λ holds the model in place); with it, other attributes stay as the base's.
    assert spots["duo_lambda0"]["dsr"]["named"] >= spots["base"]["dsr"]["named"] + 0.3
    assert spots["duo"]["same_reading_as_base"] >= 0.9
    # The concept objective removes the spots from the prompts that name them, keeping what the images show.
    assert spots["duo_concept"]["dsr"]["named"] >= 0.8 and spots["duo_concept"]["same_reading_as_base"] >= 0.95


@pytest.mark.slow
def test_red_is_decided_in_the_first_sampling_steps(tmp_path):
    """The demo's red timing stage, as it runs it: red commits above the recipe's window."""
    demo = load_example("run_demo")
    args = demo.parse_args(["--quick", "--output_dir", str(tmp_path)])
    stages, _, _, timing_dir = demo.concept_stages(args, demo.CONCEPTS["red"], str(tmp_path / "red"))
    timing = next(command for name, _, command in stages if name == "timing")
    # Only the switch to the empty prompt decides the verdict: no pairs to re-noise, so none are made here.
    at = timing.index("--pairs_dir")
    demo.run([*timing[:at], *timing[at + 2 :], "--no_renoise"], str(tmp_path / "timing.log"))
    with open(os.path.join(timing_dir, "timing.json")) as f:
        timing = json.load(f)
    assert timing["committed_timestep"] > 750 and timing["recommended_t_max"] >= 900


def test_only_ablations_add_concept_inversion_and_the_timing_curves_the_default_demo_does_not_read(tmp_path):
    demo = load_example("run_demo")
    for flags, ablations in (([], False), (["--ablations"], True)):
        args = demo.parse_args(["--output_dir", str(tmp_path), *flags])
        stages, models, _, _ = demo.concept_stages(args, demo.CONCEPTS["spots"], str(tmp_path / "spots"))
        commands = {name: command for name, _, command in stages}
        attacks = commands["evaluate"][
            commands["evaluate"].index("--attack") : commands["evaluate"].index("--prompts")
        ]
        assert ("concept_inversion" in attacks) == ablations
        assert ("--inversion_images" in commands["evaluate"]) == ablations
        # The --t_max auto row (an ablation) reads only the empty-prompt curve; the others draw the plot.
        assert ("--curves" not in commands["timing"]) == ablations
        assert ("esd" in models) == ablations and ("duo_tauto" in models) == ablations


def test_demo_default_rows_are_the_recipe_the_concept_objective_and_lambda_zero(tmp_path):
    demo = load_example("run_demo")
    args = demo.parse_args(["--output_dir", str(tmp_path)])
    _, spots, _, _ = demo.concept_stages(args, demo.CONCEPTS["spots"], str(tmp_path / "spots"))
    _, red, _, _ = demo.concept_stages(args, demo.CONCEPTS["red"], str(tmp_path / "red"))
    assert spots == red == ["duo", "duo_concept", "duo_lambda0"]
