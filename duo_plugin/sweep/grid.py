"""The grid: one setting per combination of β, λ, t_max, steps, objective and retain weight; one run per training
seed of each."""

import itertools
import math
import re
from dataclasses import dataclass
from typing import List, Optional

from ..errors import UsageError
from ..presets import preservation_weight_for_beta


def preservation_weight_value(value: str, beta: float) -> float:
    """λ from a number, 'recipe' (1e6·β/100) or 'recipe*F'."""
    match = re.fullmatch(r"recipe(?:\*([0-9.eE+-]+))?", value.strip())
    try:
        if match:
            return preservation_weight_for_beta(beta) * (float(match.group(1)) if match.group(1) else 1.0)
        weight = float(value)
    except ValueError:
        weight = -1.0
    if not weight >= 0 or math.isinf(weight):
        raise UsageError(f"--preservation_weight {value}: give a number ≥ 0, 'recipe' or 'recipe*F'")
    return weight


def short_number(value: float) -> str:
    """A number as a name part: 500 → 500, 5e6 → 5e6, 0.5 → 0.5."""
    text = f"{value:g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")
    return text


@dataclass(frozen=True)
class Setting:
    """One point of the curve: everything but the training seed."""

    beta_dpo: float
    preservation_weight_spec: str
    preservation_weight: float
    t_max: Optional[int] = None
    max_train_steps: Optional[int] = None
    objective: Optional[str] = None
    retain_weight: Optional[float] = None

    @property
    def name(self) -> str:
        parts = [f"beta{short_number(self.beta_dpo)}", f"lambda{short_number(self.preservation_weight)}"]
        if self.t_max is not None:
            parts.append(f"tmax{self.t_max}")
        if self.max_train_steps is not None:
            parts.append(f"steps{self.max_train_steps}")
        if self.objective is not None:
            parts.append(self.objective)
        if self.retain_weight is not None:
            parts.append(f"retain{short_number(self.retain_weight)}")
        return "_".join(parts)

    def describe(self) -> dict:
        return {
            "beta_dpo": self.beta_dpo,
            "preservation_weight": self.preservation_weight,
            "preservation_weight_spec": self.preservation_weight_spec,
            "t_max": self.t_max,
            "max_train_steps": self.max_train_steps,
            "objective": self.objective,
            "retain_weight": self.retain_weight,
        }


@dataclass(frozen=True)
class Run:
    setting: Setting
    seed: int

    @property
    def name(self) -> str:
        return f"{self.setting.name}_seed{self.seed}"


def make_grid(args) -> List[Run]:
    settings = []
    for beta in args.beta_dpo or []:
        for spec in args.preservation_weight:
            for t_max, steps, objective, retain_weight in itertools.product(
                args.t_max or [None],
                args.max_train_steps or [None],
                args.objective or [None],
                args.retain_weight or [None],
            ):
                settings.append(
                    Setting(beta, spec, preservation_weight_value(spec, beta), t_max, steps, objective, retain_weight)
                )
    unique = list(dict.fromkeys(settings))
    names = [s.name for s in unique]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise UsageError(
            f"the grid names the setting {', '.join(repeated)} twice (e.g. λ 'recipe' equals a number given too): drop one"
        )
    return [Run(setting, seed) for setting in unique for seed in dict.fromkeys(args.train_seeds)]
