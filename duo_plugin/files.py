"""Files other processes may be reading: whole files replaced atomically, JSON-lines logs appended row by row."""

import glob
import json
import os
from typing import Iterable, List


def atomic_write_text(path: str, text: str):
    """Write ``text`` aside and rename it over ``path``: a reader sees the old file or the new one, never half."""
    staging = path + ".tmp"
    with open(staging, "w") as f:
        f.write(text)
    os.replace(staging, path)


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
