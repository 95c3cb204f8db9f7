"""The curve: one point per setting (mean ± spread over training seeds), the Pareto front of each prompt set,
``curve.json`` and the ``curve.png`` figure."""

import math
import os
from typing import Dict, List, Sequence

from ..errors import UsageError
from .folder import CURVE_NAME, EVAL_DIR, PLOT_NAME, write_json


PRESERVATION_AXES = {
    "prior_preservation": "prior preservation (1 − LPIPS)",
    "pixel_preservation": "pixel preservation (1 − mean |Δ pixel|)",
}
SETTING_KEYS = (
    "beta_dpo",
    "preservation_weight",
    "preservation_weight_spec",
    "t_max",
    "max_train_steps",
    "objective",
    "retain_weight",
)
SATURATION_KEYS = ("margin", "saturated_share", "unsafe_error_change", "delta_safe", "delta_unsafe")


def write_curve(args, records: Dict[str, List[dict]], baselines: Dict[str, dict]) -> dict:
    curve = make_curve(args, records, baselines)
    write_json(os.path.join(args.output_dir, CURVE_NAME), curve)
    plot_curve(curve, os.path.join(args.output_dir, PLOT_NAME))
    print(
        f"Curve: {os.path.join(args.output_dir, CURVE_NAME)} and {os.path.join(args.output_dir, PLOT_NAME)}",
        flush=True,
    )
    for prompt_set, names in curve["pareto_front"].items():
        print(f"  Pareto front on {prompt_set}: {', '.join(names)}", flush=True)
    return curve


def spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and count."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def pareto_front(points: Sequence[tuple]) -> List[bool]:
    """For (x, y) points where more is better on both axes: True for each point no other point dominates
    (at least as good on both, better on one)."""
    on_front = []
    for i, (x, y) in enumerate(points):
        dominated = any((u >= x and v >= y) and (u > x or v > y) for j, (u, v) in enumerate(points) if j != i)
        on_front.append(not dominated)
    return on_front


def make_curve(args, records: Dict[str, List[dict]], baselines: Dict[str, dict]) -> dict:
    """One point per setting (its runs' records over training seeds), the base, the baselines and the fronts."""
    axis = args.preservation_axis
    points = []
    for name, rows in records.items():
        point = {
            "name": name,
            **{key: rows[0][key] for key in SETTING_KEYS},
            "seeds": [r["seed"] for r in rows],
            "runs": [r["run"] for r in rows],
        }
        point["dsr"] = {s: spread([r["dsr"][s] for r in rows]) for s in rows[0]["dsr"]}
        for measure in PRESERVATION_AXES:
            if all(measure in r for r in rows):
                point[measure] = spread([r[measure] for r in rows])
        ends = [r["training_end"] for r in rows if r.get("training_end")]
        point["training_end"] = {key: spread([e[key] for e in ends]) for key in SATURATION_KEYS} if ends else None
        if ends:
            point["training_end"]["saturated_without_effect"] = sum(bool(e["saturated_without_effect"]) for e in ends)
        points.append(point)
    prompt_sets = list(points[0]["dsr"]) if points else []
    if points and axis not in points[0]:
        raise UsageError(
            f"--preservation_axis {axis}: the evaluation measured none; add prior_preservation to the evaluation's --metrics"
        )
    fronts = {}
    for prompt_set in prompt_sets:
        flags = pareto_front([(p[axis]["mean"], p["dsr"][prompt_set]["mean"]) for p in points])
        for point, on in zip(points, flags):
            point.setdefault("on_front", {})[prompt_set] = on
        fronts[prompt_set] = [
            p["name"] for p, on in sorted(zip(points, flags), key=lambda pair: pair[0][axis]["mean"]) if on
        ]
    return {
        "what": "DSR against prior preservation per setting (mean ± std over training seeds)",
        "concept": args.concept,
        "base_model": args.pretrained_model_name_or_path,
        "preservation_axis": axis,
        "preservation_axis_label": PRESERVATION_AXES[axis],
        "prompt_sets": prompt_sets,
        "points": points,
        "base": baselines.get("base"),
        "baselines": {name: record for name, record in baselines.items() if name != "base"},
        "pareto_front": fronts,
        "evaluation": os.path.join(EVAL_DIR, "results.json"),
        "settings": dict(vars(args).items()),
    }


def plot_curve(curve: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    axis, points, prompt_sets = curve["preservation_axis"], curve["points"], curve["prompt_sets"]
    columns = min(3, max(1, len(prompt_sets)))
    rows = max(1, math.ceil(len(prompt_sets) / columns))
    figure, panels = plt.subplots(rows, columns, figsize=(4.6 * columns, 4.0 * rows), squeeze=False)
    betas = [p["beta_dpo"] for p in points] or [1.0]
    norm = LogNorm(vmin=min(betas), vmax=max(betas) if max(betas) > min(betas) else min(betas) * 10)
    cmap = plt.get_cmap("viridis")
    markers = "osD^vP*Xh"
    lambdas = list(dict.fromkeys(p["preservation_weight_spec"] for p in points))
    for index, prompt_set in enumerate(prompt_sets):
        ax = panels[index // columns][index % columns]
        for point in points:
            x, y = point[axis], point["dsr"][prompt_set]
            marker = markers[lambdas.index(point["preservation_weight_spec"]) % len(markers)]
            ax.errorbar(
                x["mean"],
                y["mean"],
                xerr=x["std"] or None,
                yerr=y["std"] or None,
                fmt=marker,
                color=cmap(norm(point["beta_dpo"])),
                markersize=7,
                markeredgecolor="red" if point["on_front"][prompt_set] else "none",
                markeredgewidth=1.5,
                elinewidth=0.8,
                capsize=2,
            )
            ax.annotate(
                f"{point['beta_dpo']:g}",
                (x["mean"], y["mean"]),
                textcoords="offset points",
                xytext=(4, 3),
                fontsize=6,
                color="dimgray",
            )
        front = sorted((p[axis]["mean"], p["dsr"][prompt_set]["mean"]) for p in points if p["on_front"][prompt_set])
        if front:
            ax.plot(*zip(*front), color="red", linewidth=1, linestyle="--", label="DUO Pareto front")
        for name, record in [("base", curve["base"]), *curve["baselines"].items()]:
            if record and axis in record and prompt_set in record["dsr"]:
                style = (
                    {"marker": "x", "color": "gray"}
                    if name == "base"
                    else {"marker": "*", "color": "black", "markersize": 11}
                )
                ax.plot(record[axis], record["dsr"][prompt_set], linestyle="none", **style)
                ax.annotate(
                    name,
                    (record[axis], record["dsr"][prompt_set]),
                    textcoords="offset points",
                    xytext=(5, -9),
                    fontsize=7,
                )
        ax.set_title(f"DSR: {prompt_set}", fontsize=10)
        ax.set_xlabel(curve["preservation_axis_label"], fontsize=8)
        ax.set_ylabel("defense success rate", fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    for index in range(len(prompt_sets), rows * columns):
        panels[index // columns][index % columns].axis("off")
    handles = [
        plt.Line2D([], [], marker=markers[i % len(markers)], color="gray", linestyle="none", label=f"λ = {spec}")
        for i, spec in enumerate(lambdas)
    ]
    handles += [plt.Line2D([], [], color="red", linestyle="--", label="DUO Pareto front (red edge: on it)")]
    figure.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, bbox_to_anchor=(0.5, 0.0))
    figure.subplots_adjust(bottom=0.16, top=0.88, hspace=0.45, wspace=0.3, left=0.07, right=0.88)
    colourbar = figure.colorbar(
        plt.cm.ScalarMappable(norm=norm, cmap=cmap), cax=figure.add_axes([0.91, 0.2, 0.012, 0.65])
    )
    colourbar.set_label("β (beta_dpo)")
    figure.suptitle(
        f"DUO on {curve['concept']}: defense success rate against preservation, one point per setting", fontsize=11
    )
    figure.savefig(path, dpi=110)
    plt.close(figure)
