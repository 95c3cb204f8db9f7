"""The output folder of a timing run: its settings (checked on every start), the work units and one record per image
(``records.rank<i>.jsonl``, read back on a rerun so that finished units are not sampled again)."""

from dataclasses import dataclass
from typing import List, Tuple

from ..resumable import ProcessLogs, ResumableFolder


RESULT_NAME = "timing.json"
PLOT_NAME = "timing.png"
SETTINGS_NAME = "timing_settings.json"
CURVES = ("empty", "safe")  # prompt-switch targets
UNSWITCHED = "unswitched"
RENOISE = "renoise"


@dataclass(frozen=True)
class Unit:
    """One batch of images: the unswitched run, a prompt switch at step k, or a re-noise at step k."""

    kind: str  # unswitched | empty | safe | renoise
    step: int  # switch step k, or re-noise start index k (images noised to timesteps[k])
    prompt_index: int  # the batch: of (prompt pair, image) jobs (switch), or of source images (re-noise)

    @property
    def key(self) -> Tuple[str, int, int]:
        return (self.kind, self.step, self.prompt_index)


def image_seed(seed: int, prompt_index: int, image_index: int) -> int:
    return seed + prompt_index + image_index * 1_000_003


class RecordStore:
    """``records.rank<i>.jsonl`` under the output folder: one line per image; a unit is done when all its images are there."""

    def __init__(self, output_dir: str):
        self.output_dir = output_dir
        self.logs = ProcessLogs(output_dir, "records")

    def read(self) -> List[dict]:
        # A line cut short by a killed run is skipped: its unit runs again.
        return self.logs.rows()

    def append(self, process_index: int, rows: List[dict]):
        self.logs.append(process_index, rows)


def check_settings(output_dir: str, settings: dict, is_main: bool):
    """Refuse a rerun whose settings differ from those ``output_dir`` was measured with; the main process records
    them."""
    folder = ResumableFolder(
        output_dir,
        SETTINGS_NAME,
        contents="a timing run",
        resume_hint="rerun with the same flags to resume, or use a new --output_dir",
    )
    folder.check_settings(settings, is_main)
