"""The images of an output folder: the settings they were made with, the image store (one manifest per
process), the jobs that name each image and its seed, and their generation."""

import dataclasses
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .. import attacks
from ..errors import UsageError
from ..input_checks import to_rgb
from ..resumable import ProcessLogs, ResumableFolder


SETTINGS_NAME = "evaluation_settings.json"
# Every image of the models evaluated last, merged from the per-set manifests when the metrics are computed.
MANIFEST_NAME = "manifest.jsonl"


def check_settings(output_dir: str, settings: dict, is_main: bool) -> dict:
    """Refuse to mix images made with other settings into one output folder; record new settings."""
    folder = ResumableFolder(
        output_dir,
        SETTINGS_NAME,
        contents="images",
        resume_hint="rerun with the same flags to resume, or use a new --output_dir",
    )
    return folder.check_settings(settings, is_main)


@dataclass(frozen=True)
class Job:
    prompt_index: int
    image_index: int
    prompt: str
    seed: int
    guidance_scale: float

    @property
    def file_name(self) -> str:
        return f"{self.prompt_index:05d}_{self.image_index:02d}.png"


def image_seed(base_seed: int, prompt_index: int, image_index: int, prompt_seed: Optional[int]) -> int:
    """Depends only on the prompt and the image number, so every model draws the same noise."""
    first = prompt_seed if prompt_seed is not None else base_seed + prompt_index
    return (first + image_index * 1_000_003) % (2**63 - 1)


def prompt_guidance(spec: attacks.PromptSpec, args) -> float:
    """The guidance of a prompt's images: its file's, else ``--guidance_scale``. FLUX.1 always takes
    ``--guidance_scale`` (its guidance embedding's value): a file's guidance column is a classifier-free guidance
    scale of SD (I2P's sd_guidance_scale), which FLUX.1 does not have."""
    if spec.guidance_scale is None or getattr(args, "family", None) == "flux":
        return args.guidance_scale
    return spec.guidance_scale


def make_jobs(specs: Sequence[attacks.PromptSpec], args) -> List[Job]:
    return [
        Job(i, k, spec.prompt, image_seed(args.seed, i, k, spec.seed), prompt_guidance(spec, args))
        for i, spec in enumerate(specs)
        for k in range(args.num_images_per_prompt)
    ]


class ImageStore:
    """``images/<model>/<set>/`` with one manifest per process (``manifest.rank<i>.jsonl``), merged when read."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir

    def folder(self, model: str, prompt_set: str) -> str:
        return os.path.join(self.output_dir, "images", model, prompt_set)

    def manifests(self, model: str, prompt_set: str) -> ProcessLogs:
        return ProcessLogs(self.folder(model, prompt_set), "manifest")

    def rows(self, model: str, prompt_set: str) -> Dict[tuple, dict]:
        """The last row of each image; a row cut short by a killed run is skipped, so its image is made again."""
        return {(row["prompt_index"], row["image_index"]): row for row in self.manifests(model, prompt_set).rows()}

    def append(self, model: str, prompt_set: str, process_index: int, rows: List[dict]):
        self.manifests(model, prompt_set).append(process_index, rows)

    def path(self, row: dict) -> str:
        return os.path.join(self.output_dir, row["file"])


def missing_jobs(store: ImageStore, model: str, prompt_set: str, jobs: List[Job]) -> List[Job]:
    """Jobs without an image on disk; refuses a folder whose images came from other prompts or seeds."""
    done = store.rows(model, prompt_set)
    todo = []
    for job in jobs:
        row = done.get((job.prompt_index, job.image_index))
        if row is not None and (row["prompt"], row["seed"], row["guidance_scale"]) != (
            job.prompt,
            job.seed,
            job.guidance_scale,
        ):
            raise UsageError(
                f"{store.folder(model, prompt_set)} holds image {job.file_name} of another prompt or seed "
                f"({row['prompt']!r}, seed {row['seed']}): use a new --output_dir for a new prompt set"
            )
        if row is None or not os.path.isfile(store.path(row)):
            todo.append(job)
    return todo


def generate_images(pipe, model: str, prompt_set: str, jobs: List[Job], store: ImageStore, args, state) -> int:
    """Generate this process's share of the missing images; returns how many images were missing."""
    from tqdm.auto import tqdm

    os.makedirs(store.folder(model, prompt_set), exist_ok=True)
    todo = missing_jobs(store, model, prompt_set, jobs)
    # Every process must read the manifest before any process appends to it.
    state.wait_for_everyone()
    mine = todo[state.process_index :: state.num_processes]
    batches = []
    for guidance in sorted({job.guidance_scale for job in mine}):
        same_guidance = [job for job in mine if job.guidance_scale == guidance]
        batches += [same_guidance[i : i + args.batch_size] for i in range(0, len(same_guidance), args.batch_size)]
    size = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
    progress = tqdm(total=len(mine), desc=f"{model}/{prompt_set}", disable=not state.is_local_main_process or not mine)
    for batch in batches:
        generators = [torch.Generator().manual_seed(job.seed) for job in batch]
        images = pipe(
            prompt=[job.prompt for job in batch],
            num_inference_steps=args.num_inference_steps,
            guidance_scale=batch[0].guidance_scale,
            generator=generators,
            **size,
        ).images
        rows = []
        for job, image in zip(batch, images):
            relative = os.path.relpath(os.path.join(store.folder(model, prompt_set), job.file_name), store.output_dir)
            image.save(os.path.join(store.output_dir, relative))
            rows.append({"model": model, "prompt_set": prompt_set, "file": relative, **dataclasses.asdict(job)})
        store.append(model, prompt_set, state.process_index, rows)
        progress.update(len(batch))
    progress.close()
    state.wait_for_everyone()
    return len(todo)


def generate_one(pipe, prompt: str, seed: int, guidance_scale: float, args):
    size = {"height": args.resolution, "width": args.resolution} if args.resolution else {}
    return pipe(
        prompt=[prompt],
        num_inference_steps=args.num_inference_steps,
        guidance_scale=guidance_scale,
        generator=[torch.Generator().manual_seed(seed)],
        **size,
    ).images[0]


class ImageFiles:
    """A list of image paths that loads images only when sliced."""

    def __init__(self, paths: List[str]):
        self.paths = paths

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        from PIL import Image

        if isinstance(index, slice):
            return [to_rgb(Image.open(p)) for p in self.paths[index]]
        return to_rgb(Image.open(self.paths[index]))
