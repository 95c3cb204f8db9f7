"""Watching the preference loss saturate during training, and saying so in the logs and the model card.

The math (margin, saturated share, relative change of the unsafe images' denoising error, and the
rule for the warning) lives in ``duo_plugin.objective``; this module averages the step logs over a
window and turns them into a warning and a model-card paragraph.
"""

import logging
import os
from collections import deque
from typing import Dict, List, Optional

from . import objective
from .files import read_jsonl


logger = logging.getLogger(__name__)

# Steps averaged before judging: one step's pairs have random timesteps, whose errors differ by orders
# of magnitude, so a single step's Δ⁻ / e_ref says little.
WINDOW = 20
SUMMARY_KEYS = ("margin", "saturated_share", "delta_safe", "delta_unsafe", "ref_error_unsafe", "loss_duo")


def window_summary(rows: List[dict]) -> Optional[Dict[str, float]]:
    """Means of the step logs in ``rows``; the error change is Σ Δ⁻ / Σ e_ref(x⁻) over the window."""
    rows = [row for row in rows if all(key in row for key in SUMMARY_KEYS)]
    if not rows:
        return None
    summary = {key: sum(row[key] for row in rows) / len(rows) for key in SUMMARY_KEYS}
    summary["unsafe_error_change"] = (
        summary["delta_unsafe"] / summary["ref_error_unsafe"] if summary["ref_error_unsafe"] > 0 else 0.0
    )
    summary["num_steps"] = len(rows)
    summary["last_step"] = rows[-1].get("step")
    summary["saturated_without_effect"] = objective.is_saturated_without_effect(
        summary["saturated_share"], summary["unsafe_error_change"]
    )
    return summary


def warning_text(summary: Dict[str, float]) -> str:
    return (
        f"the preference loss has saturated: {summary['saturated_share']:.0%} of the pairs have a loss below "
        f"{objective.SATURATED_LOSS} (mean margin β·(Δ⁻ − Δ⁺) = {summary['margin']:.2f}) while the unsafe images' "
        f"denoising error has changed by {summary['unsafe_error_change']:+.2%} of the reference's (under "
        f"{objective.MIN_UNSAFE_ERROR_CHANGE:.0%}): little gradient is left, so the adapter changes slowly from here. "
        f"This does not say whether the concept is gone (in the toy world runs removed it at +146% and kept it at "
        f"+264%): look at the validation samples, and if the concept is still there try a smaller --beta_dpo (e.g. a "
        f"tenth) or compare settings with python -m duo_plugin.sweep"
    )


class SaturationWatch:
    """Fed every step's logs; warns once when the last ``window`` steps are saturated without effect."""

    def __init__(self, window: int = WINDOW, enabled: bool = True):
        self.rows = deque(maxlen=window)
        self.enabled = enabled
        self.warned = False

    def update(self, step: int, logs: dict):
        self.rows.append({"step": step, **logs})
        if not self.enabled or self.warned or len(self.rows) < self.rows.maxlen:
            return
        summary = window_summary(list(self.rows))
        if summary is not None and summary["saturated_without_effect"]:
            logger.warning("Step %d: %s", step, warning_text(summary))
            self.warned = True


def summary_from_metrics(path: str, window: int = WINDOW) -> Optional[Dict[str, float]]:
    """The last ``window`` steps of a run's ``metrics.jsonl``; None when the file is missing or has no such columns."""
    if not os.path.isfile(path):
        return None
    return window_summary(read_jsonl(path)[-window:])


def model_card_section(summary: Optional[Dict[str, float]]) -> str:
    """A paragraph for the model card on how far the preference loss had saturated at the end of training."""
    if summary is None:
        return "No training log was found for the saturation summary."
    lines = [
        f"Mean over the last {summary['num_steps']} steps: margin β·(Δ⁻ − Δ⁺) {summary['margin']:.3g}, "
        f"share of pairs with a preference loss below {objective.SATURATED_LOSS} (no gradient left) "
        f"{summary['saturated_share']:.0%}, Δ⁺ {summary['delta_safe']:.3g}, Δ⁻ {summary['delta_unsafe']:.3g}, "
        f"change of the unsafe images' denoising error {summary['unsafe_error_change']:+.2%} of the reference's.",
    ]
    if summary["saturated_without_effect"]:
        lines += ["", f"**Warning:** {warning_text(summary)}."]
    return "\n".join(lines)
