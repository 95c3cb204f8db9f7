"""Files other processes may be reading: whole files replaced atomically, JSON-lines logs appended row by row.

Every whole-file write of the product goes through ``atomic_write``: the new content is written aside, synced,
then renamed over the old, so a full disk or a kill leaves the previous file intact and no staged file behind.
"""

import contextlib
import glob
import json
import os
from typing import Dict, Iterable, List


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w"):
    """Open a staged file for writing; on success it replaces ``path``, on any failure it is removed."""
    staging = f"{path}.{os.getpid()}.tmp"
    try:
        with open(staging, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(staging)
        raise


def atomic_write_text(path: str, text: str):
    """Write ``text`` aside and rename it over ``path``: a reader sees the old file or the new one, never half."""
    with atomic_write(path) as f:
        f.write(text)


def atomic_write_json(path: str, value, indent: int = 2):
    atomic_write_text(path, json.dumps(value, indent=indent) + "\n")


def read_state_json(path: str, fix: str, kind: type = dict):
    """A JSON state file the product wrote (settings, results, records), or one line naming the file and ``fix``
    when it is corrupt, truncated or not what the product writes there."""
    from .errors import UsageError

    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise UsageError(f"{path} is not readable JSON ({error}): {fix}") from None
    except IsADirectoryError:
        raise UsageError(f"{path} is a folder, not the state file the product writes there: {fix}") from None
    if not isinstance(value, kind):
        raise UsageError(
            f"{path} holds a JSON {type(value).__name__}, not the {kind.__name__} the product writes: {fix}"
        )
    return value


def portable_paths(value, roots: Dict[str, str]):
    """``value`` (anything JSON holds) with each absolute path under one of ``roots`` rewritten as ``label/relative``
    (``label`` empty: plain relative): a report committed or shared then names no folder of the machine it ran on."""
    if isinstance(value, dict):
        return {key: portable_paths(item, roots) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [portable_paths(item, roots) for item in value]
    if isinstance(value, str) and os.path.isabs(value):
        for root, label in sorted(roots.items(), key=lambda item: -len(item[0])):
            root = os.path.abspath(root)
            if value == root or value.startswith(root + os.sep):
                relative = os.path.relpath(value, root)
                return relative if not label else label if relative == "." else f"{label}/{relative}"
    return value


def append_jsonl(path: str, rows: Iterable[dict], durable: bool = False):
    """Append one JSON row per line; ``durable`` also waits for the disk (a crash keeps every row written).

    A crash can leave half a row at the end: the first new row then starts on its own line."""
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.write(b"\n")
    with open(path, "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
        f.flush()
        if durable:
            os.fsync(f.fileno())


def read_jsonl(pattern: str) -> List[dict]:
    """The rows of every file matching ``pattern`` (a path or a glob), files in name order, blank lines skipped."""
    rows = []
    for path in sorted(glob.glob(pattern)):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows
