"""A folder that a job fills over several runs, from one process or several at once.

Pair generation, the timing diagnostic, evaluation, the sweep and training checkpoints all keep their work this way:
a settings file checked on every start (a rerun with other settings would mix two experiments in one folder), and
per-process JSON-lines logs of finished work (each process appends to its own file; readers merge them). A kill or a
full disk can cut the last row short: readers skip such a row and its work is done again.
"""

import glob
import json
import os
import re
from typing import Callable, Dict, Iterable, List, Optional

from .errors import UsageError
from .files import append_jsonl, atomic_write_json, read_state_json


def settings_changes(stored: dict, current: dict) -> List[str]:
    """Names set in both whose values differ; a dict value is compared entry by entry (``name.entry``), so a
    setting that grows (evaluation's per-model records) is not a change."""
    changes = []
    for name, value in current.items():
        if name not in stored:
            continue
        if isinstance(value, dict) and isinstance(stored[name], dict):
            changes += [f"{name}.{key}" for key in value if key in stored[name] and stored[name][key] != value[key]]
        elif stored[name] != value:
            changes.append(name)
    return changes


def merged_settings(stored: dict, current: dict) -> dict:
    """``stored`` with ``current`` written over it, dict values merged entry by entry."""
    merged = dict(stored)
    for name, value in current.items():
        old = stored.get(name)
        merged[name] = {**old, **value} if isinstance(value, dict) and isinstance(old, dict) else value
    return merged


class ResumableFolder:
    """``folder`` with its settings file ``settings_name``.

    ``contents`` says what the folder holds in a refusal ("a timing run", "images"); ``resume_hint`` is how to go
    on ("rerun with the same flags to resume, or use a new --output_dir"); ``refusal`` words the refusal from
    ``folder``, ``contents``, ``changes`` (the changed names, comma-separated) and ``hint``.
    """

    REFUSAL = "{folder} holds {contents} made with other settings ({changes}): {hint}"

    def __init__(self, folder: str, settings_name: str, contents: str, resume_hint: str, refusal: str = REFUSAL):
        self.folder = folder
        self.settings_path = os.path.join(folder, settings_name)
        self.contents = contents
        self.resume_hint = resume_hint
        self.refusal = refusal

    def stored_settings(self) -> dict:
        if not os.path.isfile(self.settings_path):
            return {}
        return read_state_json(
            self.settings_path, "delete it (or the whole folder) to start again, or use a new --output_dir"
        )

    def check_settings(self, settings: dict, is_main: bool = True) -> dict:
        """Refuse settings that differ from the stored ones (naming each); the main process records the merge."""
        stored = self.stored_settings()
        changes = settings_changes(stored, settings)
        if changes:
            raise UsageError(
                self.refusal.format(
                    folder=self.folder, contents=self.contents, changes=", ".join(changes), hint=self.resume_hint
                )
            )
        merged = merged_settings(stored, settings)
        if is_main:
            os.makedirs(self.folder, exist_ok=True)
            atomic_write_json(self.settings_path, merged)  # other processes may be reading it right now
        return merged


class ProcessLogs:
    """``<folder>/<stem>.rank<i>.jsonl``: process ``i`` appends a row per finished piece of work."""

    def __init__(self, folder: str, stem: str, name_format: str = "{stem}.rank{index}.jsonl"):
        self.folder = folder
        self.stem = stem
        self.name_format = name_format

    def path(self, process_index: int) -> str:
        return os.path.join(self.folder, self.name_format.format(stem=self.stem, index=process_index))

    def append(self, process_index: int, rows: Iterable[dict], durable: bool = True):
        os.makedirs(self.folder, exist_ok=True)
        append_jsonl(self.path(process_index), rows, durable=durable)

    def paths(self) -> List[str]:
        pattern = re.sub(r"\{index[^}]*\}", "*", self.name_format).format(stem=glob.escape(self.stem))
        # Name order: every reader resolves rows of the same work from two processes the same way.
        return sorted(glob.glob(os.path.join(glob.escape(self.folder), pattern)))

    def rows(self, parse: Callable[[bytes], Optional[dict]] = None) -> List[dict]:
        """Every row of every process, files in name order; rows cut short by a kill are skipped. ``parse`` reads
        one line (None: skip it); a job that must refuse a row a person edited badly gives its own."""
        parse = parse or parse_row
        found = []
        for path in self.paths():
            with open(path, "rb") as f:
                for line in f:
                    row = parse(line)
                    if row is not None:
                        found.append(row)
        return found

    def rows_by(self, key: str) -> Dict[object, dict]:
        """The last row of each ``row[key]``."""
        return {row[key]: row for row in self.rows() if key in row}


def parse_row(line: bytes) -> Optional[dict]:
    """A row as written, or None for a blank line or one a kill cut short."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return row if isinstance(row, dict) else None
