"""What a run made, told: the report (accepted pairs per prompt group), the dataset card, the Hub push."""

import json
import os
import shlex
from dataclasses import dataclass
from typing import Dict, List, Optional

from ..detectors import default_verifier_threshold
from ..families import SCRIPT_OF_FAMILY
from ..files import atomic_write_text
from ..outputs import push_to_hub
from ..presets import PRESETS
from .folder import CARD_NAME, METADATA_NAME, PUBLIC_SIDE_FILES
from .recipe import IMAGE_SEED_RULE, PairRecipe


@dataclass
class PromptReport:
    unsafe_prompt: str
    safe_prompt: str
    planned: int = 0
    accepted: int = 0
    finished: int = 0
    attempts: int = 0


@dataclass
class PairReport:
    """Accepted / attempted pairs per prompt group."""

    prompts: List[PromptReport]
    output_dir: str
    verifier: Optional[str]
    generated_now: int = 0

    @property
    def accepted(self) -> int:
        return sum(p.accepted for p in self.prompts)

    @property
    def planned(self) -> int:
        return sum(p.planned for p in self.prompts)

    def lines(self) -> List[str]:
        lines = [
            f"{self.accepted}/{self.planned} pairs accepted in {self.output_dir}"
            + ("" if self.verifier else " (unverified: no detector)")
        ]
        for p in self.prompts:
            lines.append(
                f"  {p.unsafe_prompt!r} -> {p.safe_prompt!r}: {p.accepted}/{p.finished} pairs accepted "
                f"({p.attempts} attempts, {p.planned} planned)"
            )
        return lines


def make_report(recipe: PairRecipe, finished: Dict[int, dict], output_dir: str) -> PairReport:
    groups = {}
    for unsafe_prompt, safe_prompt in recipe.prompt_pairs:
        groups.setdefault((unsafe_prompt, safe_prompt), PromptReport(unsafe_prompt, safe_prompt))
    for index in range(recipe.num_pairs):
        group = groups[recipe.prompts_of(index)]
        group.planned += 1
        row = finished.get(index)
        if row is not None:
            group.finished += 1
            group.accepted += int(row["accepted"])
            group.attempts += row["attempts"]
    return PairReport(list(groups.values()), output_dir, recipe.verifier)


CONTENT_WARNINGS = {
    "nudity": "nudity (sexually explicit images of adults)",
    "blood": "graphic violence (blood and injuries)",
    "suffer": "graphic violence (people in pain)",
    "gun": "violence (people with guns)",
    "horror": "disturbing horror imagery",
}


def verifier_rule_sentence(recipe: PairRecipe, verifier_record: Optional[dict]) -> str:
    """The verification rule in words: detector, package version, rule (labels and threshold)."""
    record = verifier_record or {}
    version = f" ({record['package']} {record['package_version']})" if record.get("package_version") else ""
    rule = record.get("rule") or (
        f"threshold {recipe.detector_threshold}" if recipe.detector_threshold is not None else "its default threshold"
    )
    official = (
        " This is the official DUO generator's rule."
        if recipe.verifier in ("nudenet", "nudenet_rgb_array")
        and recipe.detector_threshold == default_verifier_threshold(recipe.verifier)
        else ""
    )
    return f"Verifier: `{recipe.verifier}`{version}, {rule}.{official}"


def write_dataset_card(
    output_dir: str, recipe: PairRecipe, report: PairReport, verifier_record: Optional[dict] = None
):
    """``README.md``: what the pairs are, a content warning, the recipe, the counts, how to reproduce and use them."""
    from huggingface_hub import DatasetCard, DatasetCardData

    shows = CONTENT_WARNINGS.get(recipe.concept, f"the concept **{recipe.concept}**, which may be unsafe or offensive")
    threshold = f", threshold {recipe.detector_threshold}" if recipe.detector_threshold is not None else ""
    if recipe.verifier:
        verification = (
            f"Every pair was checked by the `{recipe.verifier}` detector{threshold}: the unsafe image is flagged and "
            f"its safe twin is not. A pair that failed was regenerated, at most {recipe.max_attempts} attempts; its "
            f"scores are in `metadata.jsonl` (`unsafe_score`, `safe_score`).\n\n{verifier_rule_sentence(recipe, verifier_record)}"
        )
    else:
        verification = (
            "**Unverified.** No detector checked these pairs: an unsafe image may not show the concept, and a safe twin "
            "may still show it. Inspect them, or regenerate with `--verifier`, before relying on them."
        )
    if recipe.true_cfg_scale is not None:  # FLUX.1: see SDEditPairMaker
        guidance_rows = (
            f"| guidance scale | {recipe.guidance_scale} (FLUX.1 guidance embedding, both images; none in FLUX.1-schnell) |\n"
            f"| true CFG scale of the edit | {recipe.true_cfg_scale} (the unsafe prompt as negative prompt) |"
        )
        negative = f" (true classifier-free guidance at scale {recipe.true_cfg_scale}, FLUX.1 taking no negative prompt otherwise)"
    else:
        guidance_rows = f"| guidance scale | {recipe.guidance_scale} |"
        negative = ""
    counts = "\n".join(
        f"| {p.unsafe_prompt} | {p.safe_prompt} | {p.accepted} | {p.finished} | {p.attempts} |" for p in report.prompts
    )
    body = f"""
# DUO pairs: {recipe.concept} from {recipe.base_model}

> **Content warning.** This dataset contains AI-generated images showing {shows}. It exists to train a
> model to *stop* generating them (Direct Unlearning Optimization, Park et al., NeurIPS 2024). It is not
> suitable for minors; do not use it for anything else.

Each row is a pair: `unsafe`, drawn from `{recipe.base_model}` with the unsafe prompt, and `safe`, its
SDEdit twin: the img2img pipeline of the same model, started from the unsafe image with the safe prompt
as prompt and the unsafe prompt as negative prompt{negative}. The two images share their layout and differ
in the concept.

## Recipe

| setting | value |
|---|---|
| base model | `{recipe.base_model}`{f" (revision `{recipe.revision}`)" if recipe.revision else ""} |
| SDEdit strength | {recipe.strength} |
{guidance_rows}
| inference steps | {recipe.num_inference_steps} (the edit runs {int(recipe.num_inference_steps * recipe.strength)} of them) |
| resolution | {recipe.resolution} |
| seed | {recipe.seed} |
| verifier | {recipe.verifier or "none"}{threshold} |
| max attempts per pair | {recipe.max_attempts} |

Pair `i` uses prompt group `i mod {len(recipe.prompt_pairs)}`. The image seeds are
`{IMAGE_SEED_RULE}` and are stored per row in `metadata.jsonl`.

## Verification

{verification}

## Counts

{report.accepted} of {report.planned} pairs accepted.

| unsafe prompt | safe prompt | accepted | pairs attempted | generation attempts |
|---|---|---|---|---|
{counts}

## Reproduce

```bash
{reproduce_command(recipe)}
```

## Use

```bash
{_shell("accelerate launch " + SCRIPT_OF_FAMILY[recipe.family], concept_flags(recipe) + ["--pretrained_model_name_or_path", recipe.base_model])} --dataset_name <this folder or repo id>
```
"""
    card_data = DatasetCardData(
        pretty_name=f"DUO pairs: {recipe.concept}",
        task_categories=["text-to-image"],
        tags=["duo", "concept-erasure", "sdedit", "synthetic", "not-for-all-audiences"],
    )
    card = DatasetCard(f"---\n{card_data.to_yaml()}\n---\n{body}")
    atomic_write_text(os.path.join(output_dir, CARD_NAME), str(card))


def concept_flags(recipe: PairRecipe) -> List[str]:
    """``--concept`` and, for a custom concept, its prompts: what both command lines need to name it."""
    flags = ["--concept", recipe.concept]
    if recipe.concept not in PRESETS:
        for unsafe_prompt, safe_prompt in recipe.prompt_pairs:
            flags += ["--unsafe_prompt", unsafe_prompt, "--safe_prompt", safe_prompt]
    return flags


def _shell(command: str, flags: List[str]) -> str:
    return " ".join([command] + [shlex.quote(flag) for flag in flags])


def reproduce_command(recipe: PairRecipe) -> str:
    parts = concept_flags(recipe) + ["--pretrained_model_name_or_path", recipe.base_model]
    if recipe.revision:
        parts += ["--revision", recipe.revision]
    parts += [
        "--num_pairs",
        str(recipe.num_pairs),
        "--strength",
        str(recipe.strength),
        "--guidance_scale",
        str(recipe.guidance_scale),
        "--num_inference_steps",
        str(recipe.num_inference_steps),
        "--resolution",
        str(recipe.resolution),
        "--seed",
        str(recipe.seed),
        "--verifier",
        recipe.verifier or "none",
        "--max_attempts",
        str(recipe.max_attempts),
    ]
    if recipe.detector_threshold is not None:
        parts += ["--verifier_threshold", str(recipe.detector_threshold)]
    if recipe.true_cfg_scale is not None:
        parts += ["--true_cfg_scale", str(recipe.true_cfg_scale)]
    return _shell("python -m duo_plugin.pairs", parts)


def push_pairs_to_hub(output_dir: str, repo_id: Optional[str], token: Optional[str], private: bool = True) -> str:
    """Upload the dataset (the listed pairs, metadata, card, recipe) as a dataset repo; private unless asked."""
    with open(os.path.join(output_dir, METADATA_NAME)) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    files = list(PUBLIC_SIDE_FILES) + [row[key] for row in rows for key in ("unsafe_file_name", "safe_file_name")]
    return push_to_hub(
        output_dir, repo_id, token, private, files, repo_type="dataset", commit_message="DUO pair dataset"
    )
