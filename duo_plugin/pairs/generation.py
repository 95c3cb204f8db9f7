"""Making the pairs: the unsafe image from the base pipeline, its safe twin by SDEdit, each checked by the verifier,
attempt by attempt, on every process, resuming from the progress logs."""

import gc
import inspect
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from ..detectors import Detection, describe_detector
from ..errors import DUOError, UsageError
from ..families import base_has_t5
from ..files import atomic_write_text
from ..precision import torch_dtype
from .card import PairReport, make_report, write_dataset_card
from .folder import (
    METADATA_NAME,
    check_folder_matches,
    metadata_rows,
    pair_file_names,
    pending_pairs,
    progress_logs,
    read_progress,
    write_recipe_file,
)
from .recipe import PairRecipe, image_seed, make_verifier, text2img_class


# The name the module had before it became a package: log lines keep their source.
logger = logging.getLogger("duo_plugin.pairs")

DEFAULT_BATCH_SIZE = 4


class NotEnoughPairs(DUOError):
    """Fewer pairs than ``--min_pairs`` passed verification; the accepted ones are kept."""


def generation_dtype(name: str, device: torch.device, family: Optional[str] = None) -> torch.dtype:
    """``auto``: fp16 on a GPU (the usual inference precision of these models; bf16 for FLUX.1, released in bf16,
    whose T5 encoder overflows in fp16), fp32 on CPU."""
    if name == "auto":
        name = ("bf16" if family == "flux" else "fp16") if device.type == "cuda" else "fp32"
    if name == "fp16" and device.type == "cpu":
        raise UsageError("--dtype fp16 needs a GPU: use fp32 or bf16 on CPU")
    return torch_dtype(name)


def load_text2img_pipeline(recipe: PairRecipe, device, dtype: torch.dtype, cache_dir: Optional[str] = None):
    """The base text-to-image pipeline, without the SD safety checker: it would black out the very images DUO learns from."""
    kwargs = {"revision": recipe.revision, "variant": recipe.variant, "cache_dir": cache_dir, "dtype": dtype}
    if recipe.family == "sd":
        kwargs.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif recipe.family == "sd3" and not base_has_t5(recipe.base_model, recipe.revision, cache_dir):
        kwargs.update(text_encoder_3=None, tokenizer_3=None)
    pipeline = text2img_class(recipe.family).from_pretrained(recipe.base_model, **kwargs)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


class SDEditPairMaker:
    """Unsafe images from the base pipeline, safe twins by SDEdit with its img2img pipeline (same weights).

    SD 1.x/2.x, SDXL and SD3 run classifier-free guidance at ``guidance_scale`` for both images: the unsafe image
    against the empty prompt, its twin against the unsafe prompt as negative prompt. FLUX.1 is guidance-distilled:
    ``guidance_scale`` is the value of its guidance embedding (FLUX.1-dev; FLUX.1-schnell has none), and its
    pipelines drop a negative prompt unless ``true_cfg_scale`` > 1. The unsafe image is drawn as FLUX.1 is used
    (no negative prompt, one pass per step); the twin's edit adds true CFG at ``recipe.true_cfg_scale`` with the
    unsafe prompt as negative prompt, because steering away from the concept is what makes it the safe twin.
    """

    def __init__(self, text2img, recipe: PairRecipe):
        from diffusers import AutoPipelineForImage2Image

        self.recipe = recipe
        self.text2img = text2img
        # from_pipe shares every module with text2img: no weight is loaded twice.
        self.img2img = AutoPipelineForImage2Image.from_pipe(text2img)
        self.img2img.set_progress_bar_config(disable=True)
        parameters = inspect.signature(self.img2img.__call__).parameters
        self._img2img_takes_size = "height" in parameters
        self._edit_guidance = {}
        if recipe.true_cfg_scale is not None:
            if "true_cfg_scale" not in parameters or "negative_prompt" not in parameters:
                import diffusers

                raise UsageError(
                    f"{type(self.img2img).__name__} of diffusers {diffusers.__version__} takes no negative prompt "
                    f"(true_cfg_scale), which the safe twin's edit needs: upgrade diffusers"
                )
            self._edit_guidance = {"true_cfg_scale": recipe.true_cfg_scale}

    @staticmethod
    def _generators(seeds: Sequence[int]):
        # CPU generators: the same seed gives the same noise on any device.
        return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

    @torch.no_grad()
    def unsafe_images(self, unsafe_prompts: List[str], seeds: List[int]):
        r = self.recipe
        return self.text2img(
            prompt=unsafe_prompts,
            height=r.resolution,
            width=r.resolution,
            num_inference_steps=r.num_inference_steps,
            guidance_scale=r.guidance_scale,
            generator=self._generators(seeds),
        ).images

    @torch.no_grad()
    def safe_twins(self, unsafe_images, safe_prompts: List[str], unsafe_prompts: List[str], seeds: List[int]):
        r = self.recipe
        size = {"height": r.resolution, "width": r.resolution} if self._img2img_takes_size else {}
        return self.img2img(
            prompt=safe_prompts,
            negative_prompt=unsafe_prompts,
            image=list(unsafe_images),
            strength=r.strength,
            num_inference_steps=r.num_inference_steps,
            guidance_scale=r.guidance_scale,
            generator=self._generators(seeds),
            **size,
            **self._edit_guidance,
        ).images


@dataclass
class _PairInProgress:
    index: int
    unsafe_prompt: str
    safe_prompt: str
    attempt: int
    done: bool = False
    unsafe_image: object = None
    unsafe_seed: Optional[int] = None
    unsafe_detection: Optional[Detection] = None
    last_detections: Dict[str, Optional[Detection]] = field(default_factory=dict)


def _detect(detector, images) -> List[Optional[Detection]]:
    return list(detector(images)) if detector is not None else [None] * len(images)


def _score_fields(role: str, detection: Optional[Detection]) -> dict:
    if detection is None:
        return {}
    return {f"{role}_score": float(detection.score), f"{role}_labels": list(detection.labels)}


def make_pair_batch(maker, detector, recipe: PairRecipe, pairs: List[_PairInProgress], output_dir: str, on_finished):
    """Make one batch of pairs, attempt by attempt, calling ``on_finished(row)`` as each pair is accepted or given up.

    An attempt draws an unsafe image unless one is kept, then edits it. A drawn image the detector
    does not flag ends the attempt; an edit it flags ends the attempt but keeps the unsafe image.
    """
    active = list(pairs)
    while active:
        drawing = [p for p in active if p.unsafe_image is None]
        if drawing:
            seeds = [image_seed(recipe.seed, p.index, p.attempt, 0) for p in drawing]
            images = maker.unsafe_images([p.unsafe_prompt for p in drawing], seeds)
            for pair, image, seed, detection in zip(drawing, images, seeds, _detect(detector, images)):
                pair.last_detections = {"unsafe": detection}
                if detection is None or detection.flagged:
                    pair.unsafe_image, pair.unsafe_seed, pair.unsafe_detection = image, seed, detection
                else:
                    pair.attempt += 1
        editing = [p for p in active if p.unsafe_image is not None]
        if editing:
            seeds = [image_seed(recipe.seed, p.index, p.attempt, 1) for p in editing]
            twins = maker.safe_twins(
                [p.unsafe_image for p in editing],
                [p.safe_prompt for p in editing],
                [p.unsafe_prompt for p in editing],
                seeds,
            )
            for pair, twin, seed, detection in zip(editing, twins, seeds, _detect(detector, twins)):
                pair.last_detections = {"unsafe": pair.unsafe_detection, "safe": detection}
                if detection is None or not detection.flagged:
                    on_finished(_accept(pair, twin, seed, detection, recipe, output_dir))
                    pair.done = True
                else:
                    pair.attempt += 1
        for pair in active:
            if not pair.done and pair.attempt >= recipe.max_attempts:
                on_finished(_reject(pair, recipe))
                pair.done = True
        active = [pair for pair in active if not pair.done]


def _recipe_fields(recipe: PairRecipe) -> dict:
    fields = {
        "strength": recipe.strength,
        "guidance_scale": recipe.guidance_scale,
        "num_inference_steps": recipe.num_inference_steps,
    }
    if recipe.true_cfg_scale is not None:
        fields["true_cfg_scale"] = recipe.true_cfg_scale
    return fields


def _accept(pair: _PairInProgress, twin, safe_seed: int, detection, recipe: PairRecipe, output_dir: str) -> dict:
    unsafe_name, safe_name = pair_file_names(pair.index)
    # PNG is lossless: the saved files are exactly the images the detector judged.
    pair.unsafe_image.save(os.path.join(output_dir, unsafe_name), format="PNG")
    twin.save(os.path.join(output_dir, safe_name), format="PNG")
    return {
        "unsafe_file_name": unsafe_name,
        "safe_file_name": safe_name,
        "unsafe_prompt": pair.unsafe_prompt,
        "safe_prompt": pair.safe_prompt,
        "pair_index": pair.index,
        "unsafe_seed": pair.unsafe_seed,
        "safe_seed": safe_seed,
        "attempts": pair.attempt + 1,
        **_recipe_fields(recipe),
        **_score_fields("unsafe", pair.unsafe_detection),
        **_score_fields("safe", detection),
        "accepted": True,
    }


def _reject(pair: _PairInProgress, recipe: PairRecipe) -> dict:
    row = {
        "unsafe_prompt": pair.unsafe_prompt,
        "safe_prompt": pair.safe_prompt,
        "pair_index": pair.index,
        "attempts": pair.attempt,
        **_recipe_fields(recipe),
        "accepted": False,
    }
    for role, detection in pair.last_detections.items():
        row.update(_score_fields(role, detection))
    return row


def generate_pairs(
    recipe: PairRecipe,
    output_dir: str,
    state=None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    dtype: str = "auto",
    min_pairs: Optional[int] = None,
    cache_dir: Optional[str] = None,
) -> PairReport:
    """Make the pairs of ``recipe`` in ``output_dir`` (resuming), on every process of ``state``; return the report.

    ``state`` is an accelerate ``Accelerator`` or ``PartialState`` (default: the current one). Raises
    ``NotEnoughPairs`` when fewer than ``min_pairs`` (default: all) pairs were accepted, after writing
    the metadata and card of the accepted ones.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    state = state if state is not None else PartialState()
    min_pairs = recipe.num_pairs if min_pairs is None else min_pairs
    if not 0 <= min_pairs <= recipe.num_pairs:
        raise UsageError(f"--min_pairs {min_pairs} must be between 0 and --num_pairs {recipe.num_pairs}")
    if batch_size < 1:
        raise UsageError(f"--batch_size must be at least 1, got {batch_size}")
    pipeline_dtype = generation_dtype(dtype, state.device, recipe.family)
    # The detector is built first: a bad --verifier fails before any model is loaded.
    detector = make_verifier(recipe)
    verifier_record = describe_detector(detector, role="pair verifier")

    os.makedirs(output_dir, exist_ok=True)
    check_folder_matches(output_dir, recipe)
    finished = read_progress(output_dir)
    pending = pending_pairs(recipe, finished)
    # Every process has read the folder before anyone writes to it, so all split the same list.
    state.wait_for_everyone()
    if state.is_main_process:
        write_recipe_file(
            output_dir, recipe, dtype, verifier_record
        )  # same identity; num_pairs and max_attempts may have changed
    mine = pending[state.process_index :: state.num_processes]

    if mine:
        if state.is_main_process:
            logger.info(
                "Generating %d pairs into %s (%d already done)",
                len(pending),
                output_dir,
                recipe.num_pairs - len(pending),
            )
        maker = SDEditPairMaker(load_text2img_pipeline(recipe, state.device, pipeline_dtype, cache_dir), recipe)
        logs = progress_logs(output_dir)
        finished_rows = []
        desc = "Pairs" if state.num_processes == 1 else f"Pairs (process {state.process_index})"
        progress_bar = tqdm(total=len(mine), desc=desc, disable=not state.is_local_main_process)

        def on_finished(row):
            logs.append(state.process_index, [row])
            finished_rows.append(row)
            progress_bar.update(1)
            progress_bar.set_postfix(accepted=sum(r["accepted"] for r in finished_rows))

        for start in range(0, len(mine), batch_size):
            batch = [
                # A pair given up earlier and retried under a higher --max_attempts goes on with new seeds.
                _PairInProgress(
                    index, *recipe.prompts_of(index), attempt=finished[index]["attempts"] if index in finished else 0
                )
                for index in mine[start : start + batch_size]
            ]
            make_pair_batch(maker, detector, recipe, batch, output_dir, on_finished)
        progress_bar.close()
        del maker
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    state.wait_for_everyone()
    finished = read_progress(output_dir)
    report = make_report(recipe, finished, output_dir)
    report.generated_now = len(pending)
    if state.is_main_process:
        rows = metadata_rows(recipe, finished)
        atomic_write_text(os.path.join(output_dir, METADATA_NAME), "".join(json.dumps(row) + "\n" for row in rows))
        write_dataset_card(output_dir, recipe, report, verifier_record)
        for line in report.lines():
            logger.info(line)
    state.wait_for_everyone()
    if report.accepted < min_pairs:
        raise NotEnoughPairs(
            f"only {report.accepted} of {report.planned} pairs passed verification by {recipe.verifier} "
            f"(at most {recipe.max_attempts} attempts each); the accepted pairs are kept in {output_dir}. Rerun with a "
            f"higher --max_attempts (only the failed pairs are retried), or accept fewer with --min_pairs {report.accepted}"
        )
    return report
