"""The sweep's output folder: the names of what it writes there, and how its JSON records are written and read."""

from ..files import atomic_write_json, read_state_json


CURVE_NAME = "curve.json"
PLOT_NAME = "curve.png"
SWEEP_SETTINGS_NAME = "sweep_settings.json"
RUN_RESULT_NAME = "evaluation.json"
BASELINES_NAME = "baselines.json"
EVAL_DIR = "eval"


def write_json(path: str, value):
    """Written aside and renamed, so a killed sweep never leaves half a file that a rerun would trust."""
    atomic_write_json(path, value, indent=1)


def read_json(path: str):
    return read_state_json(path, "delete it (the sweep redoes what it recorded) or choose a new --output_dir")
