"""The math of the diagnostic, from the per-image records: curves, crossing points, the recommended window.

Definitions (on the switch-to-"" curve f(t), t the first timestep sampled with the empty prompt):

* the concept is **committed** at t_c, where f crosses one half (linear between the measured points):
  below t_c, dropping the prompt keeps the concept in most images;
* it is **open** at t while the normalised curve (f(t) − f(first step)) / (1 − f(first step)) is at
  most ``--open_level`` (0.1): there, switching still undoes ≥ 90% of what the prompt decided;
* the **recommended window** runs from the lowest open timestep down: for SD1.x/2.x and SDXL (DDPM
  UNets) ``--t_max`` = that timestep + 1, rounded up to a multiple of 50 (at most num_train_timesteps). A
  concept decided at the first step (open only there) gets t_max = num_train_timesteps. For SD3 and
  FLUX.1 (rectified flow), whose ``--t_max`` indexes the descending σ table of training, it is the table
  index where the concept has become committed (normalised curve ≥ 1 − open_level), rounded up likewise.
  The sampling step and the table entry are matched by their noise level σ (see ``recommended_t_max_flow``).
"""

import math
from typing import List, Optional, Sequence

from ..errors import UsageError
from .records import RENOISE, UNSWITCHED


DEFAULT_OPEN_LEVEL = 0.1
ROUND_TO = 50


def crossing(timesteps: Sequence[float], fractions: Sequence[float], level: float = 0.5) -> Optional[float]:
    """The largest t at which the curve, read from low t upward, first falls below ``level``.

    ``timesteps`` ascend. Returns the linearly interpolated crossing between the last point at or above
    the level and the first below it; None when the curve never falls below (committed before the
    first measured point); the first t when it starts below.
    """
    points = list(zip(timesteps, fractions))
    if not points:
        return None
    if points[0][1] < level:
        return float(points[0][0])
    for (t0, f0), (t1, f1) in zip(points, points[1:]):
        if f1 < level:
            return float(t0 + (t1 - t0) * (f0 - level) / (f0 - f1))
    return None


def normalised(fractions_by_step: Sequence[float]) -> Optional[List[float]]:
    """(f − f₀) / (1 − f₀) over switch steps k = 0…S (f₀: switched before the first step; f_S = 1)."""
    first = fractions_by_step[0]
    if first >= 1.0 - 1e-9:
        return None
    return [(f - first) / (1.0 - first) for f in fractions_by_step]


def round_up(t: float, to: int = ROUND_TO, limit: int = 1000) -> int:
    return int(min(limit, math.ceil(t / to) * to))


def recommend_window(
    switch_timesteps: Sequence[float],
    fractions_by_step: Sequence[float],
    num_train_timesteps: int,
    open_level: float = DEFAULT_OPEN_LEVEL,
) -> dict:
    """Open and committed timesteps from the switch-to-"" curve, indexed by switch step k = 0…S.

    ``switch_timesteps[k]`` is the first timestep sampled with the target prompt (descending in k; the
    last entry, k = S, "never switched", is 0).
    """
    levels = normalised(fractions_by_step)
    if levels is None:
        return {
            "open_timestep": None,
            "done_timestep": None,
            "note": "the empty prompt alone produces the concept on these seeds",
        }
    # Open: the longest run of switch steps from the first on whose normalised level stays ≤ open_level.
    last_open = 0
    while last_open + 1 < len(levels) and levels[last_open + 1] <= open_level:
        last_open += 1
    # Committed: the first switch step from which the level stays ≥ 1 − open_level.
    first_done = len(levels) - 1
    while first_done > 0 and levels[first_done - 1] >= 1.0 - open_level:
        first_done -= 1
    return {
        "open_timestep": float(switch_timesteps[last_open]),
        "done_timestep": float(switch_timesteps[first_done]),
        "open_step": last_open,
        "done_step": first_done,
        "levels": levels,
        "note": "decided at the first sampling step"
        if last_open == 0 and levels[1 if len(levels) > 1 else 0] > open_level
        else "",
    }


def recommended_t_max_sd(window: dict, num_train_timesteps: int) -> int:
    """SD1.x/2.x: the window [t_min, t_max) must reach the lowest open timestep."""
    if window.get("open_timestep") is None:
        return num_train_timesteps
    return round_up(window["open_timestep"] + 1, ROUND_TO, num_train_timesteps)


def recommended_t_max_sd3(window: dict, sigma_table: Sequence[float], num_train_timesteps: int) -> int:
    """SD3 and FLUX.1: ``--t_max`` indexes the descending σ table of training; the window must reach down to where
    the concept is committed.

    The sampling step and the table entry are matched by σ, the noise level itself (x_σ = (1 − σ)·x + σ·ε, and the
    model is told σ in both), not by their positions: a flow-matching pipeline's timestep is 1000·σ of its own,
    possibly shifted, schedule, so σ = t / num_train_timesteps. For SD3 the training table is shifted as sampling
    is (shift 3 in both). FLUX.1's scheduler shifts only at sampling time (``use_dynamic_shifting``: μ from the
    image's token count, about 1.15 at 1024², a shift of e^μ ≈ 3.2), while its training table, the scheduler's
    ``sigmas`` as loaded, is unshifted, σ_i ≈ 1 − i/1000. So a FLUX.1 step at σ = 0.76 (halfway through a 1024²
    schedule) is table index ≈ 240, not the 500 its position would suggest.
    """
    if window.get("done_timestep") is None:
        return num_train_timesteps
    sigma_done = window["done_timestep"] / num_train_timesteps
    index = next((i for i, sigma in enumerate(sigma_table) if sigma <= sigma_done), len(sigma_table))
    return round_up(index + 1, ROUND_TO, num_train_timesteps)


recommended_t_max_flow = recommended_t_max_sd3
FLOW_FAMILIES = ("sd3", "flux")  # --t_max indexes the σ table; t = 1000·σ


def summarise(
    records: List[dict], timesteps: List[float], args, family: str, num_train_timesteps: int, sigma_table=None
) -> dict:
    """Curves, crossing points and the recommendation, from the per-image records."""
    num_steps = len(timesteps)
    unswitched = {(r["prompt_index"], r["image_index"]): r["flagged"] for r in records if r["kind"] == UNSWITCHED}
    made = {key for key, flagged in unswitched.items() if flagged}
    if not made:
        raise UsageError(
            f"none of the {len(unswitched)} images of the unsafe prompts is flagged by the detector: "
            f"the concept's prompts do not produce it on this model (check --detector and the prompts)"
        )
    switch_t = [timesteps[k] if k < num_steps else 0.0 for k in range(num_steps + 1)]
    curves = {}
    for kind in args.curves:
        flagged_of = {}
        for r in records:
            if r["kind"] == kind:
                flagged_of[(r["step"], r["prompt_index"], r["image_index"])] = r["flagged"]
        fractions, raw, counts = [], [], []
        for k in range(num_steps + 1):
            if k == num_steps:
                values = [unswitched[key] for key in made]
                all_values = list(unswitched.values())
            else:
                values = [flagged_of[(k, *key)] for key in made]
                all_values = [flagged_of[(k, *key)] for key in unswitched]
            fractions.append(sum(values) / len(values))
            raw.append(sum(all_values) / len(all_values))
            counts.append(f"{sum(values)}/{len(values)}")
        ascending = list(zip(*sorted(zip(switch_t, fractions))))
        curves[kind] = {
            "switch_step": list(range(num_steps + 1)),
            "timestep": switch_t,
            "still_flagged": fractions,
            "still_flagged_counts": counts,
            "flagged_among_all_seeds": raw,
            "committed_timestep": crossing(ascending[0], ascending[1], 0.5),
        }
    result = {"curves": curves}
    if any(r["kind"] == RENOISE for r in records):
        by_step = {}
        for r in records:
            if r["kind"] == RENOISE:
                by_step.setdefault(r["step"], []).append(r["flagged"])
        steps = sorted(by_step, key=lambda k: timesteps[k])
        t = [timesteps[k] for k in steps]
        kept = [sum(by_step[k]) / len(by_step[k]) for k in steps]
        result["renoise"] = {
            "start_step": steps,
            "timestep": t,
            "still_flagged": kept,
            "still_flagged_counts": [f"{sum(by_step[k])}/{len(by_step[k])}" for k in steps],
            "num_source_images": len(by_step[steps[0]]),
            "half_kept_timestep": crossing(t, kept, 0.5),
        }
    reference = "empty" if "empty" in curves else next(iter(curves))
    window = recommend_window(switch_t, curves[reference]["still_flagged"], num_train_timesteps, args.open_level)
    if family in FLOW_FAMILIES:
        t_max = recommended_t_max_flow(window, sigma_table, num_train_timesteps)
    else:
        t_max = recommended_t_max_sd(window, num_train_timesteps)
    committed = curves[reference]["committed_timestep"]
    result.update(
        {
            "reference_curve": reference,
            "committed_timestep": committed,
            "open_timestep": window.get("open_timestep"),
            "done_timestep": window.get("done_timestep"),
            "recommended_t_max": t_max,
            "num_flagged_unswitched": len(made),
            "num_unswitched": len(unswitched),
        }
    )
    result["verdict"] = verdict(args.concept, result, args.open_level)
    return result


def verdict(concept: str, result: dict, open_level: float) -> str:
    committed = result["committed_timestep"]
    where = (
        f"committed at t ≈ {committed:.0f}" if committed is not None else "committed before the first sampling step"
    )
    open_t = result["open_timestep"]
    still = f"still open (≤ {open_level:.0%} decided) down to t ≈ {open_t:.0f}" if open_t is not None else "never open"
    return f'{concept}: {where} (prompt switch to "" crosses one half); {still}: recommended --t_max {result["recommended_t_max"]}'


def default_window(family: str) -> List[int]:
    """The family's training window [t_min, t_max) of its recipe (σ-table indices for SD3 and FLUX.1)."""
    from ..presets import FAMILY_RECIPES

    recipe = FAMILY_RECIPES.get(family, FAMILY_RECIPES["sd"])
    return [recipe.t_min, recipe.t_max]


def window_sigma(sigma_table: Sequence[float], index: int) -> float:
    """σ at a table index of a window bound (the index past the table's end: its last σ)."""
    return float(sigma_table[min(index, len(sigma_table) - 1)])
