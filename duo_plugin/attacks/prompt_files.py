"""Prompt files the defense success rate is measured on: text (one prompt a line), I2P-style CSV (``prompt`` with
optional per-prompt seed and guidance columns), JSON lines, or a COCO captions annotation file (``read_prompts``).
"""

import csv
import json
import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence

from ..errors import UsageError
from ..input_checks import json_object_rows, not_utf8_error, read_text_lines


PROMPT_COLUMNS = ("prompt", "caption", "text")
SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance_scale")


@dataclass
class PromptSpec:
    """One prompt of a set, with the seed and guidance scale its source asks for (None: the defaults)."""

    prompt: str
    seed: Optional[int] = None
    guidance_scale: Optional[float] = None


def _first_column(columns: Sequence[str], candidates: Sequence[str]) -> Optional[str]:
    return next((name for name in candidates if name in columns), None)


NUDITY_PERCENTAGE_COLUMN = "nudity_percentage"


def _read_csv(
    path: str, categories: Optional[Sequence[str]], min_nudity_percentage: Optional[float] = None
) -> List[PromptSpec]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = reader.fieldnames or []
        prompt_column = _first_column(columns, PROMPT_COLUMNS)
        if prompt_column is None:
            raise UsageError(
                f"prompt file {path} has no prompt column (it has {', '.join(columns)}): name it 'prompt'"
            )
        if categories and "categories" not in columns:
            raise UsageError(f"--prompt_categories needs a 'categories' column (I2P layout); {path} has none")
        seed_column = _first_column(columns, SEED_COLUMNS)
        guidance_column = _first_column(columns, GUIDANCE_COLUMNS)
        # Ring-A-Bell attacks only I2P rows whose images were nude in more than half of I2P's samples.
        nudity_filter = min_nudity_percentage is not None and NUDITY_PERCENTAGE_COLUMN in columns
        prompts = []
        for row_number, row in enumerate(reader, start=2):
            text = (row.get(prompt_column) or "").strip()
            if not text:
                continue
            if categories:
                row_categories = {c.strip() for c in (row.get("categories") or "").split(",")}
                if not row_categories & set(categories):
                    continue
            if nudity_filter:
                try:
                    if float(row.get(NUDITY_PERCENTAGE_COLUMN) or 0.0) <= min_nudity_percentage:
                        continue
                except ValueError:
                    raise UsageError(
                        f"{path}, line {row_number}: the {NUDITY_PERCENTAGE_COLUMN} column must hold numbers"
                    ) from None
            try:
                seed = int(float(row[seed_column])) if seed_column and row.get(seed_column) not in (None, "") else None
                guidance = (
                    float(row[guidance_column])
                    if guidance_column and row.get(guidance_column) not in (None, "")
                    else None
                )
            except (ValueError, OverflowError):
                raise UsageError(f"{path}, line {row_number}: the seed/guidance columns must hold numbers") from None
            if guidance is not None and not math.isfinite(guidance):
                raise UsageError(f"{path}, line {row_number}: guidance scale {guidance} is not a finite number")
            check_seed(seed, path, row_number)
            prompts.append(PromptSpec(text, seed, guidance))
    return prompts


def check_seed(seed: Optional[int], path: str, line: int):
    """torch seeds a generator with 64 bits and wraps what is outside: refuse it rather than make another image."""
    if seed is not None and not 0 <= seed < 2**32:
        raise UsageError(f"{path}, line {line}: seed {seed} is outside 0 to 2**32 - 1: give a seed in that range")


def _read_json(path: str) -> List[PromptSpec]:
    with open(path, encoding="utf-8") as f:
        try:
            content = json.load(f)
        except json.JSONDecodeError as error:
            raise UsageError(f"prompt file {path} is not valid JSON ({error})") from error
    if isinstance(content, dict) and "annotations" in content:  # COCO captions_*.json
        annotations = content["annotations"] if isinstance(content["annotations"], list) else [None]
        for number, annotation in enumerate(annotations):
            if not isinstance(annotation, dict) or not isinstance(annotation.get("caption", ""), str):
                raise UsageError(f"prompt file {path}: annotation {number} has no text 'caption': fix or remove it")
        return [PromptSpec(a["caption"].strip()) for a in annotations if a.get("caption", "").strip()]
    if isinstance(content, list) and all(isinstance(p, str) for p in content):
        return [PromptSpec(p.strip()) for p in content if p.strip()]
    raise UsageError(
        f"prompt file {path}: a JSON prompt file is a list of strings or a COCO captions file with 'annotations'"
    )


def _read_jsonl(path: str) -> List[PromptSpec]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for line_number, row in json_object_rows(path, f):
            column = _first_column(list(row), PROMPT_COLUMNS)
            if column is None or not isinstance(row[column], str):
                raise UsageError(f"{path}, line {line_number}: no text 'prompt' field")
            seed_column, guidance_column = (
                _first_column(list(row), SEED_COLUMNS),
                _first_column(list(row), GUIDANCE_COLUMNS),
            )
            try:
                seed = int(row[seed_column]) if seed_column and row[seed_column] is not None else None
                guidance = (
                    float(row[guidance_column]) if guidance_column and row[guidance_column] is not None else None
                )
            except (TypeError, ValueError, OverflowError):
                raise UsageError(f"{path}, line {line_number}: the seed/guidance fields must hold numbers") from None
            if guidance is not None and not math.isfinite(guidance):
                raise UsageError(f"{path}, line {line_number}: guidance scale {guidance} is not a finite number")
            check_seed(seed, path, line_number)
            # An empty prompt is kept on purpose: it is the condition DUO trains on (a text file cannot hold one).
            prompts.append(PromptSpec(row[column].strip(), seed, guidance))
    return prompts


def read_prompts(
    path: str,
    limit: Optional[int] = None,
    categories: Optional[Sequence[str]] = None,
    min_nudity_percentage: Optional[float] = None,
) -> List[PromptSpec]:
    """Prompts from a text, CSV (I2P or Ring-A-Bell layout), JSON lines or COCO captions file.

    ``min_nudity_percentage`` keeps only CSV rows above it when the file has I2P's ``nudity_percentage``
    column (other files are read whole).
    """
    if not os.path.isfile(path):
        raise UsageError(f"prompt file {path} does not exist")
    extension = os.path.splitext(path)[1].lower()
    try:
        if extension == ".csv":
            prompts = _read_csv(path, categories, min_nudity_percentage)
        elif extension == ".json":
            prompts = _read_json(path)
        elif extension == ".jsonl":
            prompts = _read_jsonl(path)
        else:
            prompts = [PromptSpec(line) for line in read_text_lines(path)]
    except UnicodeDecodeError as error:
        raise not_utf8_error(path, error) from None
    except csv.Error as error:
        raise UsageError(
            f"prompt file {path} is not a readable CSV ({error}): fix it or save it as a .txt of one prompt a line"
        ) from None
    if categories and extension != ".csv":
        raise UsageError("--prompt_categories filters an I2P-style CSV: give a .csv prompt file")
    if not prompts:
        condition = f" of categories {', '.join(categories)}" if categories else ""
        if min_nudity_percentage is not None and extension == ".csv":
            condition += f" (kept: {NUDITY_PERCENTAGE_COLUMN} above {min_nudity_percentage:g} where the column exists)"
        raise UsageError(f"prompt file {path} holds no prompt{condition}")
    return prompts[:limit] if limit else prompts
