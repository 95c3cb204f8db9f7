"""The pair folder: its file names, the recipe file, the per-process progress logs and the merged metadata."""

import json
import os
from typing import Dict, List, Optional, Tuple, Union

from ..detectors import describe_detector
from ..errors import UsageError
from ..files import atomic_write_json, read_state_json
from ..outputs import library_versions
from ..resumable import ProcessLogs
from .recipe import IMAGE_SEED_RULE, RECIPE_IDENTITY, PairRecipe


UNSAFE_COLUMN, SAFE_COLUMN = "unsafe", "safe"
METADATA_NAME = "metadata.jsonl"
RECIPE_NAME = "duo_pairs_config.json"
CARD_NAME = "README.md"
# A hidden folder: the datasets library ignores it when it reads the pair folder.
PROGRESS_DIR = ".duo_progress"
PUBLIC_SIDE_FILES = (METADATA_NAME, RECIPE_NAME, CARD_NAME)


def pair_file_names(pair_index: int) -> Tuple[str, str]:
    return f"{pair_index:05d}_unsafe.png", f"{pair_index:05d}_safe.png"


def read_recipe_file(output_dir: str) -> Optional[dict]:
    path = os.path.join(output_dir, RECIPE_NAME)
    if not os.path.exists(path):
        return None
    stored = read_state_json(path, "it was edited; restore it or choose another output folder", kind=object)
    if not isinstance(stored, dict) or not isinstance(stored.get("recipe", {}), dict):
        raise UsageError(f"{path} is not a pair recipe: it was edited; restore it or choose another output folder")
    return stored


def check_folder_matches(output_dir: str, recipe: PairRecipe):
    """Refuse to extend a folder made with another recipe: its pairs would mix two datasets."""
    stored = read_recipe_file(output_dir)
    if stored is None:
        if os.path.exists(os.path.join(output_dir, METADATA_NAME)):
            raise UsageError(
                f"{output_dir} already holds a pair dataset not made by duo_plugin.pairs: "
                f"pass it as --dataset_name, or choose another output folder"
            )
        return
    expected = recipe.identity()
    stored_identity = {key: stored.get("recipe", {}).get(key) for key in RECIPE_IDENTITY}
    differences = [
        f"{key} {stored_identity[key]!r} vs {expected[key]!r}"
        for key in RECIPE_IDENTITY
        if stored_identity[key] != expected[key]
    ]
    if differences:
        raise UsageError(
            f"{output_dir} holds pairs made with another recipe ({'; '.join(differences[:3])}): "
            f"choose another output folder (--output_dir, or --pairs_dir when training) or delete that one"
        )


def write_recipe_file(output_dir: str, recipe: PairRecipe, dtype: str, verifier_record: Optional[dict] = None):
    config = {
        "format_version": 1,
        "recipe": recipe.to_dict(),
        "seed_rule": IMAGE_SEED_RULE,
        "dtype": dtype,
        "verifier": verifier_record or describe_detector(None),
        "library_versions": library_versions(),
    }
    atomic_write_json(os.path.join(output_dir, RECIPE_NAME), config)


def progress_logs(output_dir: str) -> ProcessLogs:
    """One log of finished pairs (accepted or rejected) per process, one JSON row per pair, made durable per row."""
    return ProcessLogs(os.path.join(output_dir, PROGRESS_DIR), "process", name_format="{stem}-{index:03d}.jsonl")


def read_progress(output_dir: str) -> Dict[int, dict]:
    """Every finished pair of every process (and every earlier run), by pair index.

    An accepted row wins over a rejected one; among rejected rows, the one with the most attempts.
    Half-written rows (a crash) are skipped.
    """
    finished: Dict[int, dict] = {}
    for row in progress_logs(output_dir).rows(parse=parse_progress_row):
        index = row["pair_index"]
        previous = finished.get(index)
        if previous is None or _rank(row) > _rank(previous):
            finished[index] = row
    return finished


def parse_progress_row(line: Union[str, bytes]) -> Optional[dict]:
    """A finished pair's row, or None for a half-written one (a crash); a row that parses but is not one is refused."""
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    if not (
        isinstance(row, dict)
        and isinstance(row.get("pair_index"), int)
        and row["pair_index"] >= 0
        and isinstance(row.get("accepted"), bool)
        and isinstance(row.get("attempts"), int)
        and all(_plain_file_name(row.get(key)) for key in ("unsafe_file_name", "safe_file_name") if key in row)
    ):
        # The logs are read as bytes: the refusal quotes the row as text, as it appears in the file.
        shown = line.decode("utf-8", "replace") if isinstance(line, bytes) else line
        raise UsageError(
            f"a progress file in {PROGRESS_DIR}/ holds a row that is not a finished pair ({shown.strip()[:80]!r}): "
            f"it was edited; delete that row (its pair is made again) or the whole {PROGRESS_DIR}/ folder"
        )
    return row


def _plain_file_name(name) -> bool:
    """A name of a file inside the pair folder: no folder part, no way out of it (``..``, absolute paths)."""
    return (
        isinstance(name, str) and name not in ("", ".", "..") and os.path.basename(name) == name and "\\" not in name
    )


def _rank(row: dict):
    return (bool(row["accepted"]), row["attempts"])


def pending_pairs(recipe: PairRecipe, finished: Dict[int, dict]) -> List[int]:
    """Pairs still to make: never tried, or rejected after fewer attempts than ``max_attempts`` now allows."""
    pending = []
    for index in range(recipe.num_pairs):
        row = finished.get(index)
        if row is None or (not row["accepted"] and row["attempts"] < recipe.max_attempts):
            pending.append(index)
    return pending


def metadata_rows(recipe: PairRecipe, finished: Dict[int, dict]) -> List[dict]:
    """The accepted pairs below ``num_pairs``, in pair order, without the bookkeeping fields."""
    rows = []
    for index in sorted(finished):
        row = finished[index]
        if row["accepted"] and index < recipe.num_pairs:
            rows.append({key: value for key, value in row.items() if key != "accepted"})
    return rows
