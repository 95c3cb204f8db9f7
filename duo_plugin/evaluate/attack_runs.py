"""Attacks that build their prompts or their concept against a loaded model: Ring-A-Bell's search,
UnlearnDiffAtk, and Concept Inversion with its held-out concept images."""

import dataclasses
import json
import logging
import os
from typing import List

from .. import attacks
from ..errors import UsageError
from ..files import append_jsonl, atomic_write_json, atomic_write_text, read_jsonl, read_state_json
from ..resumable import ProcessLogs
from .images import ImageStore, Job, generate_one, prompt_guidance
from .prompt_sets import HELDOUT_IMAGES, UNLEARNDIFFATK, unlearndiffatk_config


logger = logging.getLogger("duo_plugin.evaluate")


# Held-out seeds start far above the pair generator's (seed·1000003 + pair)·2000 + … for small seeds and pair counts.
HELDOUT_SEED_OFFSET = 7_000_000_000_000


def ring_a_bell_logs(output_dir: str) -> ProcessLogs:
    """``attacks/ring_a_bell/prompts.rank<i>.jsonl``: a row per target each process searched."""
    return ProcessLogs(os.path.join(output_dir, "attacks", "ring_a_bell"), "prompts")


def ring_a_bell_prompts(pipe, targets, args, preset, config, output_dir, state) -> List[attacks.PromptSpec]:
    """One adversarial prompt per target, searched once with the base text encoder and cached on disk."""
    logs = ring_a_bell_logs(output_dir)
    folder = logs.folder
    os.makedirs(folder, exist_ok=True)
    done = logs.rows_by("target_index")
    for index, row in done.items():
        if index < len(targets) and row["target"] != targets[index].prompt:
            raise UsageError(f"{folder} holds Ring-A-Bell prompts of other targets: use a new --output_dir")
    todo = [i for i in range(len(targets)) if i not in done]
    state.wait_for_everyone()
    mine = todo[state.process_index :: state.num_processes]
    if mine:
        # SD 1.x/2.x: its CLIP encoder; SDXL: both CLIP encoders, as its UNet reads them (attacks.TextCondition).
        condition = attacks.TextCondition.from_pipe(pipe, "Ring-A-Bell", needs_unet=False)
        direction, source = ring_a_bell_direction(args, preset, condition, condition.tokenizer)
        if state.is_main_process:
            atomic_write_text(os.path.join(folder, "concept_vector.json"), json.dumps(source))
        vocabulary = attacks.ring_a_bell_vocabulary(condition.tokenizer, config)
        from tqdm.auto import tqdm

        for index in tqdm(mine, desc="Ring-A-Bell prompts", disable=not state.is_local_main_process):
            target_config = dataclasses.replace(config, seed=config.seed + index)
            result = attacks.ring_a_bell_search(
                condition, condition.tokenizer, targets[index].prompt, direction, target_config, vocabulary
            )
            logs.append(state.process_index, [{"target_index": index, **result}])
    state.wait_for_everyone()
    done = logs.rows_by("target_index")
    return [
        attacks.PromptSpec(done[i]["prompt"], targets[i].seed, targets[i].guidance_scale) for i in range(len(targets))
    ]


def ring_a_bell_log(output_dir: str, settings: dict, num_prompts: int) -> dict:
    """The search as results.json records it: its settings, where the concept vector came from, and the searched
    prompts' mean distances."""
    logs = ring_a_bell_logs(output_dir)
    searched = logs.rows()
    vector_path = os.path.join(logs.folder, "concept_vector.json")
    vector_source = (
        read_state_json(vector_path, "delete it to search the concept vector again")
        if os.path.isfile(vector_path)
        else None
    )
    return {
        "config": settings,
        "concept_vector_source": vector_source,
        "num_prompts": num_prompts,
        "mean_distance": sum(r["distance"] for r in searched) / max(len(searched), 1),
        "mean_target_distance": sum(r["target_distance"] for r in searched) / max(len(searched), 1),
        "prompts": "attacks/ring_a_bell/prompts.rank*.jsonl",
    }


def ring_a_bell_direction(args, preset, text_encoder, tokenizer):
    """(concept vector, where it came from): a saved vector, the user's prompt pairs, or the concept's own pairs.

    ``text_encoder``: a CLIP encoder with its ``tokenizer``, or an ``attacks.TextCondition`` (SDXL: the vector
    spans both encoders' features, 2048 wide, so SD1.4's published 768-wide vectors are refused)."""
    text_encoder = attacks.TextCondition.of(text_encoder, tokenizer)
    shape = text_encoder.shape
    if args.ring_a_bell_concept_vector:
        return attacks.load_concept_vector(args.ring_a_bell_concept_vector, shape), {
            "vector": args.ring_a_bell_concept_vector
        }
    if args.ring_a_bell_concept_prompts:
        pairs = attacks.read_concept_prompt_pairs(*args.ring_a_bell_concept_prompts)
        source = {"prompt_files": list(args.ring_a_bell_concept_prompts), "num_pairs": len(pairs)}
    else:
        pairs = list(preset.prompt_pairs)
        logger.warning(
            "Ring-A-Bell's concept vector comes from the concept's %d prompt pair(s); the original averages ~200 curated pairs: "
            "pass --ring_a_bell_concept_prompts WITH WITHOUT or --ring_a_bell_concept_vector",
            len(pairs),
        )
        source = {"preset_pairs": [list(p) for p in pairs], "num_pairs": len(pairs)}
    return attacks.concept_vector(text_encoder, tokenizer, pairs), source


def unlearndiffatk_target_images(pipe, targets, args, state) -> str:
    """The base model's image of each target (its seed and guidance): what the attack makes the model denoise."""
    folder = os.path.join(args.output_dir, "attacks", UNLEARNDIFFATK, "target_images")
    os.makedirs(folder, exist_ok=True)
    if state.is_main_process:
        for index, target in enumerate(targets):
            path = os.path.join(folder, f"{index:05d}.png")
            if not os.path.isfile(path):
                guidance = prompt_guidance(target, args)
                generate_one(pipe, target.prompt, target.seed, guidance, args).save(path + ".tmp.png")
                os.replace(path + ".tmp.png", path)
    state.wait_for_everyone()
    return folder


def run_unlearndiffatk(pipe, model: str, targets, detector, store: ImageStore, args, state) -> dict:
    """Attack every target against this model (main process); the image each attack last judged is the
    set's image, so the set's DSR is 1 − ASR by construction. Finished targets are kept across reruns."""
    import time

    from PIL import Image

    folder = os.path.join(args.output_dir, "attacks", UNLEARNDIFFATK, model)
    images_folder = os.path.join(args.output_dir, "attacks", UNLEARNDIFFATK, "target_images")
    log_path = os.path.join(folder, "prompts.jsonl")
    os.makedirs(folder, exist_ok=True)
    os.makedirs(store.folder(model, UNLEARNDIFFATK), exist_ok=True)
    if state.is_main_process:
        done = {row["target_index"]: row for row in read_jsonl(log_path)}
        stored = store.rows(model, UNLEARNDIFFATK)
        config = unlearndiffatk_config(args)
        vocabulary = attacks.all_token_ids(pipe.tokenizer)
        for index, target in enumerate(targets):
            if index in done and (index, 0) in stored and os.path.isfile(store.path(stored[(index, 0)])):
                continue
            guidance = prompt_guidance(target, args)
            judged = {}

            def is_flagged(prompt):
                judged["image"] = generate_one(pipe, prompt, target.seed, guidance, args)
                return bool(detector([judged["image"]])[0].flagged)

            started = time.time()
            target_image = Image.open(os.path.join(images_folder, f"{index:05d}.png")).convert("RGB")
            result = attacks.unlearndiffatk(
                pipe,
                target.prompt,
                target_image,
                is_flagged,
                dataclasses.replace(config, seed=config.seed + index),
                vocabulary,
            )
            result["seconds"] = round(time.time() - started, 2)
            job = Job(index, 0, result["prompt"], target.seed, guidance)
            relative = os.path.relpath(
                os.path.join(store.folder(model, UNLEARNDIFFATK), job.file_name), store.output_dir
            )
            judged["image"].save(os.path.join(store.output_dir, relative))
            store.append(
                model,
                UNLEARNDIFFATK,
                state.process_index,
                [{"model": model, "prompt_set": UNLEARNDIFFATK, "file": relative, **dataclasses.asdict(job)}],
            )
            append_jsonl(log_path, [{"target_index": index, "seed": target.seed, **result}])
    state.wait_for_everyone()
    rows = {row["target_index"]: row for row in read_jsonl(log_path)}
    finished = [rows[i] for i in range(len(targets)) if i in rows]
    summary = attacks.attack_success_rate(finished)
    summary["seconds"] = round(sum(r.get("seconds", 0.0) for r in finished), 1)
    summary["prompts"] = os.path.relpath(log_path, args.output_dir)
    return summary


def generate_heldout_concept_images(pipe, preset, specs, args, state) -> str:
    """Concept Inversion's images, held out from DUO's training pairs: the base model's images of the
    concept's unsafe prompts with seeds from a range the pair generator does not use (and none a pair
    folder of the evaluated adapters lists)."""
    folder = os.path.join(args.output_dir, HELDOUT_IMAGES)
    used_seeds = set()
    for spec in specs:
        dataset = (spec.duo_config or {}).get("dataset")
        if dataset and os.path.isfile(os.path.join(dataset, "metadata.jsonl")):
            for row in read_jsonl(os.path.join(dataset, "metadata.jsonl")):
                used_seeds.update(row.get(key) for key in ("unsafe_seed", "safe_seed"))
    prompts = [unsafe for unsafe, _ in preset.prompt_pairs] or list(preset.validation_prompts)
    if state.is_main_process:
        os.makedirs(folder, exist_ok=True)
        seed = HELDOUT_SEED_OFFSET + args.seed * 100_003
        rows = []
        for index in range(args.inversion_num_images):
            while seed in used_seeds:
                seed += 1
            prompt = prompts[index % len(prompts)]
            path = os.path.join(folder, f"{index:05d}.png")
            if not os.path.isfile(path):
                generate_one(pipe, prompt, seed, args.guidance_scale, args).save(path + ".tmp.png")
                os.replace(path + ".tmp.png", path)
            rows.append({"file_name": os.path.basename(path), "prompt": prompt, "seed": seed})
            seed += 1
        atomic_write_text(os.path.join(folder, "images.jsonl"), "".join(json.dumps(row) + "\n" for row in rows))
    state.wait_for_everyone()
    return folder


def apply_concept_inversion(pipe, model: str, images, config, output_dir, state) -> dict:
    """Learn the token against this model (once, on the main process) and load it into ``pipe``."""
    folder = os.path.join(output_dir, "attacks", "concept_inversion", model)
    embedding_path = os.path.join(folder, "learned_embeds.safetensors")
    log_path = os.path.join(folder, "inversion.json")
    learned_here = False
    if not os.path.isfile(embedding_path) and state.is_main_process:
        result = attacks.concept_inversion(pipe, images(), config, progress=True)
        attacks.save_learned_embedding(result, embedding_path + ".tmp")
        os.replace(embedding_path + ".tmp", embedding_path)
        atomic_write_json(log_path, {**result.to_log(), "losses": result.losses}, indent=None)
        learned_here = True
    state.wait_for_everyone()
    if not learned_here:
        attacks.load_learned_embedding(pipe, embedding_path, config.token)
    log = read_state_json(log_path, f"delete {folder} to learn the embedding again")
    return {k: v for k, v in log.items() if k != "losses"}
