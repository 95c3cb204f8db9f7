"""Where is a concept decided? Measure it on the base model before choosing DUO's timestep window.

DUO trains on a window of timesteps (``--t_min``/``--t_max``; t < 750 in the SD1.x recipe) with pairs
made by SDEdit, so it assumes the concept is decided inside that window. This diagnostic measures
where it is, with the concept's prompts and its detector:

* **prompt switch**: sample with the unsafe prompts and switch to the empty prompt (and, second curve,
  to the pair's safe prompt) from sampling step k on; the curve is the share of images still flagged,
  among those the unswitched run flags, against the timestep of the first switched step. Switching
  before the first step gives the target prompt's own rate; switching never gives 1.
* **re-noise**: take flagged unsafe images (the pair folder's, or the unswitched samples), noise them
  to t and denoise with the empty prompt (SDEdit); the share still flagged, against t.

Where the concept counts as committed and open, and the window recommended from them: analysis.py.

"Without the prompt" is the empty prompt's embeddings in place of the prompt's, as the pipeline would
build them: for the guided families ([unconditional; conditional] with classifier-free guidance), and
for FLUX.1 (no unconditional branch: [dev] is guidance-distilled, [schnell] unguided) the empty prompt's
T5 and CLIP pooled embeddings fed to the transformer from step k on, at the same guidance embedding.

    python -m duo_plugin.timing --pretrained_model_name_or_path CompVis/stable-diffusion-v1-4 \\
        --concept nudity --pairs_dir ~/.cache/duo/pairs/... --output_dir timing-nudity
    accelerate launch -m duo_plugin.timing ...   # the work split across processes

Writes ``timing.json`` (every count and setting, one record per image), ``timing.png`` (both curves
against t, and σ for SD3 and FLUX.1, with the training window) and prints the verdict. A rerun resumes: finished
work units are read back from ``records.rank*.jsonl``. ``--t_max auto`` of the training scripts runs it first.
"""

import inspect
import json
import logging
import math
import os
from typing import Dict, List

import torch

from .. import input_checks
from ..errors import UsageError
from ..files import atomic_write_json
from ..settings import with_values
from .analysis import FLOW_FAMILIES, default_window, summarise, window_sigma
from .inputs import load_base, make_detector, resolve_preset
from .plot import plot
from .records import PLOT_NAME, RENOISE, RESULT_NAME, UNSWITCHED, RecordStore, Unit, check_settings, image_seed
from .sampling import flux_kwargs, prompt_embeddings, renoise_strength, sample_with_switch, sampling_timesteps


logger = logging.getLogger("duo_plugin.timing")


def source_images_for_renoise(args, detector, unswitched_rows: List[dict]) -> List[str]:
    """Paths of flagged unsafe images: the pair folder's when given, else the flagged unswitched samples."""
    if args.pairs_dir:
        metadata = os.path.join(args.pairs_dir, "metadata.jsonl")
        if not os.path.isfile(metadata):
            raise UsageError(
                f"--pairs_dir {args.pairs_dir} has no metadata.jsonl: give a pair folder written by python -m duo_plugin.pairs"
            )
        with open(metadata) as f:
            paths = [os.path.join(args.pairs_dir, json.loads(line)["unsafe_file_name"]) for line in f if line.strip()]
        from PIL import Image

        flagged = [p for p, d in zip(paths, detector([Image.open(p).convert("RGB") for p in paths])) if d.flagged]
        where = f"the unsafe images of {args.pairs_dir}"
    else:
        flagged = [
            os.path.join(args.output_dir, r["file"])
            for r in sorted(unswitched_rows, key=lambda r: (r["prompt_index"], r["image_index"]))
            if r["flagged"]
        ]
        where = "the samples of the unsafe prompts"
    if not flagged:
        raise UsageError(
            f"no image of {where} is flagged by the detector: nothing to re-noise (check --detector, or pass --no_renoise)"
        )
    return flagged[: args.max_renoise_images]


def run_units(
    pipe,
    units: List[Unit],
    prompt_pairs,
    args,
    detector,
    store: RecordStore,
    state,
    size,
    timesteps,
    renoise_sources,
    family: str = "sd",
):
    """Run this process's share of ``units``, appending one record per image. Switch units batch the
    (prompt pair, image) jobs, ``args.batch_size`` at a time, across prompts."""
    switch_jobs = [(p, j) for p in range(len(prompt_pairs)) for j in range(args.num_images_per_prompt)]
    from tqdm.auto import tqdm

    mine = units[state.process_index :: state.num_processes]
    targets: Dict[tuple, dict] = {}
    img2img = img2img_size = None
    progress = tqdm(total=len(mine), desc="timing", disable=not state.is_local_main_process or not mine)
    images_dir = os.path.join(args.output_dir, "images")
    os.makedirs(images_dir, exist_ok=True)
    for unit in mine:
        rows = []
        if unit.kind == RENOISE:
            from PIL import Image

            if img2img is None:
                from diffusers import AutoPipelineForImage2Image

                img2img = AutoPipelineForImage2Image.from_pipe(pipe)
                img2img.set_progress_bar_config(disable=True)
                # SD3's and FLUX.1's img2img take the size (and FLUX's shift depends on it); SD's and SDXL's do not.
                takes_size = "height" in inspect.signature(img2img.__call__).parameters
                img2img_size = size if takes_size else {}
            paths = renoise_sources[unit.prompt_index * args.batch_size : (unit.prompt_index + 1) * args.batch_size]
            num_steps = args.num_inference_steps
            strength = renoise_strength(family, num_steps, unit.step)  # starts at timesteps[unit.step]
            seeds = [
                image_seed(args.seed + 7, unit.prompt_index * args.batch_size + i, unit.step)
                for i in range(len(paths))
            ]
            images = img2img(
                prompt=[""] * len(paths),
                image=[Image.open(p).convert("RGB") for p in paths],
                strength=strength,
                num_inference_steps=num_steps,
                # Denoised with the empty prompt alone: guidance 1 turns classifier-free guidance off; FLUX.1 has
                # none to turn off, and its [dev] guidance embedding keeps the sampling value.
                guidance_scale=args.guidance_scale if family == "flux" else 1.0,
                generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
                **img2img_size,
                **flux_kwargs(pipe),
            ).images
            for i, (path, image, detection) in enumerate(zip(paths, images, detector(images))):
                rows.append(
                    {
                        "kind": RENOISE,
                        "step": unit.step,
                        "timestep": timesteps[unit.step],
                        "batch": unit.prompt_index,
                        "source": os.path.relpath(path, args.output_dir),
                        "seed": seeds[i],
                        "flagged": bool(detection.flagged),
                        "score": float(detection.score),
                    }
                )
        else:
            jobs = switch_jobs[unit.prompt_index * args.batch_size : (unit.prompt_index + 1) * args.batch_size]
            unsafe = [prompt_pairs[p][0] for p, _ in jobs]
            targets_of_jobs = [("" if unit.kind == "empty" else prompt_pairs[p][1]) for p, _ in jobs]
            seeds = [image_seed(args.seed, p, j) for p, j in jobs]
            target = None
            if unit.kind != UNSWITCHED and 0 < unit.step < len(timesteps):
                key = (unit.kind, unit.prompt_index)
                if key not in targets:
                    targets[key] = prompt_embeddings(pipe, targets_of_jobs, args.guidance_scale, size)
                target = targets[key]
            if unit.kind != UNSWITCHED and unit.step == 0:
                # Switched before the first step: the target prompt from the start.
                images = sample_with_switch(pipe, targets_of_jobs, None, 0, seeds, args, size)
            else:
                images = sample_with_switch(pipe, unsafe, target, unit.step, seeds, args, size)
            for (p, j), seed, image, detection in zip(jobs, seeds, images, detector(images)):
                row = {
                    "kind": unit.kind,
                    "step": unit.step,
                    "timestep": timesteps[unit.step] if unit.step < len(timesteps) else 0.0,
                    "batch": unit.prompt_index,
                    "prompt_index": p,
                    "image_index": j,
                    "seed": seed,
                    "flagged": bool(detection.flagged),
                    "score": float(detection.score),
                }
                if unit.kind == UNSWITCHED:
                    row["file"] = os.path.join("images", f"{p:05d}_{j:02d}.png")
                    image.save(os.path.join(args.output_dir, row["file"]))
                rows.append(row)
        store.append(state.process_index, rows)
        progress.update(1)
    progress.close()


def output_dir_of(args, concept: str) -> str:
    """The diagnostic's folder: ``--output_dir``, or ``timing-<concept>`` when it is unset."""
    return args.output_dir or f"timing-{concept}"


def run_timing(args, state=None) -> dict:
    """The whole diagnostic (resumable); returns the result the main process wrote (None elsewhere). ``args`` is
    only read: the values resolved here (the output folder, the family's sampling defaults) make new ``Settings``."""
    from accelerate import PartialState

    from ..distributed import cpu_only_multi_process
    from ..outputs import library_versions

    state = state or PartialState(cpu=cpu_only_multi_process())
    preset = resolve_preset(args)
    detector = make_detector(args.detector or preset.detector, args.detector_threshold, preset.name)
    args = with_values(args, output_dir=output_dir_of(args, preset.name))
    input_checks.check_output_dir(args.output_dir)
    if (args.num_inference_steps is not None and args.num_inference_steps < 2) or args.num_images_per_prompt < 1:
        raise UsageError("--num_inference_steps must be at least 2 and --num_images_per_prompt at least 1")
    if not 0.0 < args.open_level < 0.5:
        raise UsageError(f"--open_level {args.open_level}: give a level in (0, 0.5)")

    prompt_pairs = list(dict.fromkeys(preset.prompt_pairs))[: args.max_prompts]
    if not prompt_pairs:
        raise UsageError(f"the concept {preset.name!r} has no prompt pairs: pass --unsafe_prompt and --safe_prompt")

    pipe, family, args = load_base(args)  # the family's defaults of --num_inference_steps and (FLUX.1) guidance
    args = args.replace(
        guidance_scale=args.guidance_scale if args.guidance_scale is not None else preset.guidance_scale
    )
    if args.num_inference_steps < 2:
        raise UsageError("--num_inference_steps must be at least 2")
    pipe.to(state.device)
    num_train_timesteps = pipe.scheduler.config.num_train_timesteps
    size = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
    if family == "flux" and not size:
        # FLUX.1's shift depends on the image size, and its img2img would otherwise take the source images' size:
        # every call (and the timesteps read here) at the pipeline's own default size.
        default = pipe.default_sample_size * pipe.vae_scale_factor
        size = {"height": default, "width": default}
    timesteps = sampling_timesteps(pipe, args.num_inference_steps, size)
    window = args.window or default_window(family)
    settings = {
        "base_model": args.pretrained_model_name_or_path,
        "revision": args.revision,
        "concept": preset.name,
        "prompt_pairs": [list(p) for p in prompt_pairs],
        "detector": args.detector or preset.detector,
        "detector_threshold": args.detector_threshold,
        "num_images_per_prompt": args.num_images_per_prompt,
        "num_inference_steps": args.num_inference_steps,
        "guidance_scale": args.guidance_scale,
        "resolution": args.resolution,
        "seed": args.seed,
        "scheduler": type(pipe.scheduler).__name__,
        "pairs_dir": args.pairs_dir,
        "max_renoise_images": args.max_renoise_images,
        "batch_size": args.batch_size,
    }
    check_settings(args.output_dir, settings, state.is_main_process)
    state.wait_for_everyone()
    store = RecordStore(args.output_dir)

    def pending(units):
        counts = {}
        for r in store.read():
            key = (r["kind"], r["step"], r["batch"])
            counts[key] = counts.get(key, 0) + 1
        return [u for u in units if counts.get(u.key, 0) < expected.get(u.key, args.num_images_per_prompt)]

    num_steps = len(timesteps)
    expected = {}
    num_jobs = len(prompt_pairs) * args.num_images_per_prompt
    switch_batches = math.ceil(num_jobs / args.batch_size)
    for b in range(switch_batches):
        size_of_batch = min(args.batch_size, num_jobs - b * args.batch_size)
        for kind in (UNSWITCHED, *args.curves):
            for k in range(num_steps + 1):
                expected[(kind, k, b)] = size_of_batch
    # The unswitched samples first: without a flagged one there is no curve to measure.
    todo = pending([Unit(UNSWITCHED, num_steps, b) for b in range(switch_batches)])
    state.wait_for_everyone()
    run_units(pipe, todo, prompt_pairs, args, detector, store, state, size, timesteps, None)
    state.wait_for_everyone()
    unswitched_rows = [r for r in store.read() if r["kind"] == UNSWITCHED]
    if not any(r["flagged"] for r in unswitched_rows):
        raise UsageError(
            f"none of the {len(unswitched_rows)} images of the unsafe prompts is flagged by the detector: "
            f"the concept's prompts do not produce it on this model (check --detector and the prompts)"
        )
    todo = pending([Unit(kind, k, b) for kind in args.curves for k in range(num_steps) for b in range(switch_batches)])
    state.wait_for_everyone()
    run_units(pipe, todo, prompt_pairs, args, detector, store, state, size, timesteps, None)
    state.wait_for_everyone()

    if not args.no_renoise:
        sources = source_images_for_renoise(args, detector, unswitched_rows)
        batches = math.ceil(len(sources) / args.batch_size)
        renoise_units = [Unit(RENOISE, k, b) for k in range(num_steps) for b in range(batches)]
        for unit in renoise_units:
            expected[unit.key] = len(
                sources[unit.prompt_index * args.batch_size : (unit.prompt_index + 1) * args.batch_size]
            )
        todo = pending(renoise_units)
        state.wait_for_everyone()
        run_units(pipe, todo, prompt_pairs, args, detector, store, state, size, timesteps, sources, family)
        state.wait_for_everyone()

    if not state.is_main_process:
        return None
    sigma_table = None
    if family in FLOW_FAMILIES:
        from diffusers import FlowMatchEulerDiscreteScheduler

        # The training table, as the training scripts build it (a fresh scheduler from the config): SD3's shifted
        # by 3; FLUX.1's unshifted (use_dynamic_shifting shifts at sampling time only). See recommended_t_max_sd3.
        sigma_table = [float(s) for s in FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config).sigmas]
    records = store.read()
    # A unit interrupted after writing some of its lines is rerun in full: keep one record per image.
    unique = {}
    for r in records:
        unique[(r["kind"], r["step"], r.get("prompt_index", r["batch"]), r.get("image_index", r.get("source")))] = r
    records = list(unique.values())
    result = summarise(records, timesteps, args, family, num_train_timesteps, sigma_table)
    settings["window"] = list(window)
    if sigma_table is not None:
        result["window_sigmas"] = [window_sigma(sigma_table, index) for index in window]
        result["recommended_t_max_sigma"] = window_sigma(sigma_table, result["recommended_t_max"])
    settings["open_level"] = args.open_level
    result = {
        **result,
        "definitions": {
            "still_flagged": "share of the images the unswitched run flags that the detector still flags",
            "timestep": "prompt switch: the first timestep sampled with the target prompt (0: never switched); re-noise: the noise level t",
            "committed_timestep": 'where the switch-to-"" curve crosses one half (linear between points)',
            "open_timestep": f"lowest switch timestep down to which the normalised curve (f − f_first)/(1 − f_first) stays ≤ {args.open_level}",
            "recommended_t_max": "SD1.x/2.x and SDXL: open timestep + 1 rounded up to 50; SD3 and FLUX.1: index of the "
            "training σ table (descending; FLUX.1's unshifted) where σ falls to the committed step's σ = t/1000, "
            "+ 1, rounded up to 50",
        },
        "family": family,
        "sampling_timesteps": timesteps,
        "num_train_timesteps": num_train_timesteps,
        "settings": settings,
        "library_versions": library_versions(),
        "num_processes": state.num_processes,
        "records": sorted(
            records,
            key=lambda r: (
                r["kind"],
                r["step"],
                r.get("prompt_index", r["batch"]),
                str(r.get("image_index", r.get("source"))),
            ),
        ),
        "files": {"plot": PLOT_NAME, "images": "images/"},
    }
    atomic_write_json(os.path.join(args.output_dir, RESULT_NAME), result, indent=1)
    plot(result, settings, os.path.join(args.output_dir, PLOT_NAME), family, num_train_timesteps, sigma_table)
    logger.info(result["verdict"])
    return result
