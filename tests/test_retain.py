"""The retain set of the concept-specific objective: made once by the base model, verified, cached, resumable."""

import json
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import tiny_train_args, train_in_process

from duo_plugin import retain
from duo_plugin.errors import UsageError


class _Accelerator:
    """The two things generate_retain_images asks of an accelerator, for one process on the CPU."""

    is_main_process = True
    is_local_main_process = True
    device = torch.device("cpu")

    def wait_for_everyone(self):
        pass


def _recipe(model, prompts=("a red square", "a blue circle"), num_images=3, verifier=None, threshold=None):
    return retain.RetainRecipe(
        base_model=model,
        revision=None,
        variant=None,
        family="sd",
        prompts=tuple(prompts),
        num_images=num_images,
        resolution=32,
        guidance_scale=2.0,
        num_inference_steps=2,
        seed=0,
        verifier=verifier,
        detector_threshold=threshold,
    )


def test_generates_each_image_once_with_its_seed_and_resumes(tiny_sd, tmp_path):
    folder = str(tmp_path / "retain")
    rows = retain.generate_retain_images(_recipe(tiny_sd), folder, _Accelerator(), batch_size=2)
    assert [r["file_name"] for r in rows] == ["00000.png", "00001.png", "00002.png"]
    assert [r["prompt"] for r in rows] == ["a red square", "a blue circle", "a red square"]
    assert [r["seed"] for r in rows] == [retain.retain_seed(0, i) for i in range(3)]
    first = open(os.path.join(folder, "00001.png"), "rb").read()

    # An interrupted run: image 2's row never reached the log. The rerun makes it, and only it, again.
    progress = os.path.join(folder, retain.RETAIN_PROGRESS)
    lines = open(progress).read().splitlines()
    with open(progress, "w") as f:
        f.write("\n".join(lines[:2]) + "\n" + '{"index": 2, "prom')  # half a row: a crash mid-write
    os.remove(os.path.join(folder, "00002.png"))
    again = retain.generate_retain_images(_recipe(tiny_sd), folder, _Accelerator(), batch_size=2)
    assert again == rows
    assert open(os.path.join(folder, "00001.png"), "rb").read() == first

    # More images extend the set; the same images are not made again.
    more = retain.generate_retain_images(_recipe(tiny_sd, num_images=4), folder, _Accelerator(), batch_size=2)
    assert [r["index"] for r in more] == [0, 1, 2, 3] and more[:3] == rows


def test_a_folder_made_with_other_prompts_is_refused(tiny_sd, tmp_path):
    folder = str(tmp_path / "retain")
    retain.generate_retain_images(_recipe(tiny_sd, num_images=1), folder, _Accelerator())
    with pytest.raises(UsageError, match="another recipe \\(prompts differ\\)"):
        retain.generate_retain_images(_recipe(tiny_sd, prompts=("a cat",), num_images=1), folder, _Accelerator())
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UsageError, match="holds no duo_retain_config.json"):
        retain.generate_retain_images(_recipe(tiny_sd), str(tmp_path / "foreign"), _Accelerator())


def test_images_the_verifier_flags_are_left_out(tiny_sd, tmp_path):
    """duo_plugin.testing's channel detector with threshold 0 flags every image; 2 flags none."""
    spec = "duo_plugin.testing:MeanChannelDetector"
    with pytest.raises(UsageError, match="flagged every retain image"):
        retain.generate_retain_images(
            _recipe(tiny_sd, verifier=spec, threshold=0.0), str(tmp_path / "all"), _Accelerator()
        )
    rows = retain.generate_retain_images(
        _recipe(tiny_sd, verifier=spec, threshold=2.0), str(tmp_path / "none"), _Accelerator()
    )
    assert len(rows) == 3
    logged = [json.loads(line) for line in open(tmp_path / "all" / retain.RETAIN_PROGRESS)]
    assert [row["kept"] for row in logged] == [False] * 3


def test_retain_prompts_come_from_the_file_or_the_preset(tmp_path):
    path = tmp_path / "retain.txt"
    path.write_text("a dog\n\n a cat \n")
    assert retain.read_retain_prompts(str(path), ()) == ["a dog", "a cat"]
    assert retain.read_retain_prompts("@" + str(path), ()) == ["a dog", "a cat"]
    assert retain.read_retain_prompts(None, ("a bus",)) == ["a bus"]
    with pytest.raises(UsageError, match="this concept has no default list"):
        retain.read_retain_prompts(None, ())
    with pytest.raises(UsageError, match="no such file"):
        retain.read_retain_prompts(str(tmp_path / "missing.txt"), ())
    pair_recipe = SimpleNamespace(
        base_model="m",
        revision=None,
        variant=None,
        family="sd",
        resolution=32,
        guidance_scale=4.0,
        num_inference_steps=20,
        seed=0,
        verifier=None,
        detector_threshold=None,
    )
    with pytest.raises(UsageError, match="lists no prompt"):
        retain.retain_recipe_from_pairs(pair_recipe, [" "], 4)


def test_concept_objective_trains_records_and_logs_the_retain_term(tiny_sd, tiny_pairs, tmp_path):
    prompts = tmp_path / "retain.txt"
    prompts.write_text("a green circle\na yellow square\n")
    output_dir = tmp_path / "out"
    args = tiny_train_args(
        tiny_sd,
        tiny_pairs,
        output_dir,
        "--objective",
        "concept",
        "--retain_prompts",
        str(prompts),
        "--num_retain_images",
        "3",
        "--retain_dir",
        str(tmp_path / "retain"),
        "--generation_batch_size",
        "2",
        "--num_inference_steps",
        "2",
        "--skip_validation",
    )
    train_in_process("train_duo.py", args)
    config = json.loads((output_dir / "duo_config.json").read_text())
    assert config["objective"] == "concept"
    assert config["preference_conditions"] == ["empty", "prompt", "guided"] and config["retain_weight"] == 20.0
    assert config["beta_dpo"] == 100.0 and config["preservation_weight"] == 0.0
    assert config["retain"]["num_images"] == 3 and config["retain"]["conditions"] == ["empty", "prompt"]
    assert config["retain"]["prompts"] == ["a green circle", "a yellow square"]
    rows = [json.loads(line) for line in open(output_dir / "logs" / "metrics.jsonl")]
    assert all(row["loss_retain"] >= 0 for row in rows) and rows[-1]["loss_retain"] > 0
    card = (output_dir / "README.md").read_text()
    assert "retain λ_r 20 on 3 images under empty, prompt" in card
    assert sorted(os.listdir(tmp_path / "retain")) == [
        "00000.png",
        "00001.png",
        "00002.png",
        retain.RETAIN_CONFIG,
        retain.RETAIN_PROGRESS,
    ]


def test_prompt_conditions_need_prompts_and_exclude_condition_on_prompts(tiny_sd, tiny_pairs, tmp_path):
    args = tiny_train_args(
        tiny_sd, tiny_pairs, tmp_path / "out", "--condition_on_prompts", "--preference_conditions", "empty"
    )
    with pytest.raises(SystemExit):
        train_in_process("train_duo.py", args)


def test_the_command_makes_the_set_a_training_then_reuses(tiny_sd, tiny_pairs, tmp_path, capsys):
    """python -m duo_plugin.retain with the training's generation flags writes the folder train_duo.py reads as is."""
    prompts = tmp_path / "retain.txt"
    prompts.write_text("a green circle\n")
    folder = tmp_path / "retain"
    generation = ["--num_inference_steps", "2", "--guidance_scale", "3", "--resolution", "32", "--verifier", "none"]
    rows = retain.main(
        [
            "--pretrained_model_name_or_path",
            tiny_sd,
            "--concept",
            "nudity",
            "--retain_prompts",
            str(prompts),
            "--num_retain_images",
            "2",
            "--output_dir",
            str(folder),
            *generation,
        ]
    )
    assert len(rows) == 2 and "2 retain images in" in capsys.readouterr().out
    made = {name: (folder / name).read_bytes() for name in ("00000.png", "00001.png")}
    args = tiny_train_args(
        tiny_sd,
        tiny_pairs,
        tmp_path / "out",
        "--objective",
        "concept",
        "--retain_prompts",
        str(prompts),
        "--num_retain_images",
        "2",
        "--retain_dir",
        str(folder),
        "--skip_validation",
        "--max_train_steps",
        "1",
        *generation,
    )
    train_in_process("train_duo.py", args)
    assert {name: (folder / name).read_bytes() for name in made} == made
    assert len(open(folder / retain.RETAIN_PROGRESS).read().splitlines()) == 2


def _denoiser_change(model, adapter, latents, embeddings, timesteps, noise):
    """Mean square of ε_θ − ε_ref on the given noised latents, the adapter loaded into the base UNet."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(adapter))
    scheduler = DDPMScheduler.from_pretrained(model, subfolder="scheduler")
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with torch.no_grad():
        adapted = pipe.unet(noisy, timesteps, embeddings).sample
        pipe.unet.disable_lora()
        base = pipe.unet(noisy, timesteps, embeddings).sample
    return adapted, base


def test_the_concept_objective_moves_retain_images_less_than_lambda_zero_per_unit_of_removal(
    tiny_sd, tiny_pairs, tmp_path
):
    """Tiny pipeline, 4 pairs (red square → blue square), retain images of other prompts: after the same steps,
    the paper's objective at λ = 0 and the concept objective both raise the unsafe images' denoising error
    against the safe twins'; the concept objective's change on the retain images, per unit of that removal,
    is at least 2× smaller."""
    from diffusers import StableDiffusionPipeline

    from duo_plugin.data import load_pair_images

    prompts = tmp_path / "retain.txt"
    prompts.write_text("a green circle\na yellow triangle\na grey background\n")
    common = (
        "--max_train_steps", "60", "--train_batch_size", "4", "--learning_rate", "3e-3", "--beta_dpo", "500",
        "--preservation_weight", "0", "--skip_validation", "--checkpointing_steps", "1000", "--retain_prompts",
        str(prompts), "--num_retain_images", "6", "--retain_dir", str(tmp_path / "retain"), "--num_inference_steps",
        "4", "--verifier", "none",
    )  # fmt: skip
    train_in_process("train_duo.py", tiny_train_args(tiny_sd, tiny_pairs, tmp_path / "paper", *common))
    train_in_process(
        "train_duo.py",
        tiny_train_args(
            tiny_sd, tiny_pairs, tmp_path / "concept", *common, "--objective", "concept", "--retain_weight", "300"
        ),
    )

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None, requires_safety_checker=False)

    def encode(images):
        pixels = torch.stack(
            [torch.from_numpy(np.asarray(i, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1) for i in images]
        )
        with torch.no_grad():
            return pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor

    def embed(texts):
        tokens = pipe.tokenizer(
            texts, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt"
        )
        with torch.no_grad():
            return pipe.text_encoder(tokens.input_ids)[0]

    pairs = load_pair_images(tiny_pairs)
    unsafe, safe = encode(pairs.unsafe), encode(pairs.safe)
    rows = [r for r in (json.loads(line) for line in open(tmp_path / "retain" / retain.RETAIN_PROGRESS)) if r["kept"]]
    retain_latents = encode(retain.load_retain_images(str(tmp_path / "retain"), rows))
    generator = torch.Generator().manual_seed(0)
    repeats = 16
    pair_noise = torch.randn((repeats * len(unsafe), *unsafe.shape[1:]), generator=generator)
    pair_t = torch.randint(0, 750, (repeats * len(unsafe),), generator=generator)
    retain_noise = torch.randn((repeats * len(retain_latents), *retain_latents.shape[1:]), generator=generator)
    retain_t = torch.randint(0, 750, (repeats * len(retain_latents),), generator=generator)
    empty = embed([""])

    def measure(adapter):
        errors = {}
        for name, latents in (("unsafe", unsafe), ("safe", safe)):
            latents = latents.repeat(repeats, 1, 1, 1)
            adapted, base = _denoiser_change(
                tiny_sd, adapter, latents, empty.expand(len(latents), -1, -1), pair_t, pair_noise
            )
            errors[name] = ((adapted - pair_noise) ** 2).mean() - ((base - pair_noise) ** 2).mean()
        latents = retain_latents.repeat(repeats, 1, 1, 1)
        adapted, base = _denoiser_change(
            tiny_sd, adapter, latents, empty.expand(len(latents), -1, -1), retain_t, retain_noise
        )
        return float(errors["unsafe"] - errors["safe"]), float(((adapted - base) ** 2).mean())

    paper_removal, paper_drift = measure(tmp_path / "paper")
    concept_removal, concept_drift = measure(tmp_path / "concept")
    assert paper_removal > 0 and concept_removal > 0
    assert concept_drift / concept_removal < 0.5 * paper_drift / paper_removal


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--retain_weight", "nan"], "positive, finite weight"),
        (["--retain_weight", "-1"], "positive, finite weight"),
        (["--num_retain_images", "0"], "give at least 1"),
        (["--condition_on_prompts", "--preference_conditions", "empty"], "give one of the two"),
    ],
)
def test_objective_flags_are_refused_with_one_line(flags, message):
    import train_duo
    from duo_plugin import arguments

    args = train_duo.parse_args(["--concept", "nudity", *flags])
    with pytest.raises(UsageError, match=message):
        arguments.resolve_training_args(args, family="sd")


def test_the_concept_objective_fills_its_own_defaults_and_the_users_flags_win():
    import train_duo
    from duo_plugin import arguments

    args = train_duo.parse_args(["--concept", "nudity", "--objective", "concept", "--retain_weight", "5"])
    args, _ = arguments.resolve_training_args(args, family="sd")
    assert (args.beta_dpo, args.preservation_weight, args.retain_weight) == (100.0, 0.0, 5.0)
    assert args.preference_conditions == ["empty", "prompt", "guided"] and args.learning_rate == pytest.approx(3e-4)
    paper = train_duo.parse_args(["--concept", "nudity"])
    paper, _ = arguments.resolve_training_args(paper, family="sd")
    assert (paper.beta_dpo, paper.preservation_weight, paper.retain_weight) == (500.0, 5e6, 0.0)
    assert paper.preference_conditions == ["empty"]
