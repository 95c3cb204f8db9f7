"""The paper's main figure in the toy world: DSR against preservation over β × λ, several training seeds.

Runs ``python -m duo_plugin.sweep`` (the product's sweep) on a toy-world concept with the demo's pairs,
training flags and evaluation (``run_demo.py``), trains the demo's ESD-x baseline once, and reads every
image of the prompts without the concept with the world's exact pixel rules (colour, shape, spots as asked,
the same reading as the base image of the same seed), which the sweep itself cannot know. Writes, in
``<output_dir>/<concept>/``: ``sweep/curve.json`` and ``sweep/curve.png`` (the sweep's), and ``curve.json``
and ``curve.md`` (each setting's mean [min, max] over the seeds with the world's readings, the Pareto front
on pixel preservation, the pre-registered checks).

    python examples/toy_world/curve.py --concept spots                        # 8 β × 3 λ × 3 seeds, ~1 h on 2 cores
    python examples/toy_world/curve.py --concept spots --beta_dpo 5 500 --train_seeds 0   # a smaller grid

The timestep window is the timing diagnostic's recommendation (``--t_max`` from ``<concept>/pairs-timing``),
unless ``--t_max`` is given. A rerun skips every evaluated run (the sweep resumes).
"""

import argparse
import json
import os
import shlex
import sys
from typing import Dict, List


TOY_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, TOY_DIR)

import run_demo  # noqa: E402  (this folder)

from duo_plugin import sweep  # noqa: E402
from duo_plugin.errors import UsageError, exit_on_usage_error  # noqa: E402


BETAS = (1, 5, 20, 50, 100, 250, 500, 1000)
# 0, the recipe's 1e6·β/100, and one between (a hundredth of the recipe's).
PRESERVATION_WEIGHTS = ("0", "recipe*0.01", "recipe")
WORLD_READINGS = ("same_reading_as_base", "colour_as_asked", "shape_as_asked", "mark_as_asked", "pixel_preservation")
# A point "keeps everything else" when both the world's readings and the pixels stay within these.
KEEPS = {"same_reading_as_base": 0.95, "pixel_preservation": 0.95}
REMOVES = 0.9


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concept", choices=list(run_demo.CONCEPTS), default="spots")
    parser.add_argument("--model", type=str, default=os.path.join(TOY_DIR, "model"))
    parser.add_argument("--output_dir", type=str, default="runs/toy_world_curve")
    parser.add_argument("--beta_dpo", type=float, nargs="+", default=list(BETAS))
    parser.add_argument("--preservation_weight", type=str, nargs="+", default=list(PRESERVATION_WEIGHTS))
    parser.add_argument("--train_seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument(
        "--objective",
        type=str,
        nargs="+",
        default=None,
        choices=["paper", "concept"],
        help="train_duo.py --objective values (an axis of the grid); default: the paper's only",
    )
    parser.add_argument(
        "--retain_weight", type=float, nargs="+", default=None, help="λ_r values of the concept objective (an axis)"
    )
    parser.add_argument(
        "--compare",
        type=str,
        nargs="*",
        default=[],
        help="other curve.json files (e.g. the committed paper curve) drawn on the same objectives plot",
    )
    parser.add_argument("--t_max", type=int, default=None, help="default: the timing diagnostic's recommendation")
    parser.add_argument(
        "--full_evaluation",
        action="store_true",
        help="the demo's full evaluation sizes (default: its --quick sizes, 4 images per prompt)",
    )
    args = parser.parse_args(argv)
    demo_argv = ["--model", args.model, "--output_dir", args.output_dir, "--concepts", args.concept, "--ablations"]
    args.demo = run_demo.parse_args(demo_argv + ([] if args.full_evaluation else ["--quick"]))
    return args


def prepare(args, concept, out: str) -> Dict[str, str]:
    """The demo's pairs, timing diagnostic and ESD-x baseline (each skipped when done)."""
    stages, _, _, timing_dir = run_demo.concept_stages(args.demo, concept, out)
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    for stage, done_file, command in stages:
        if stage not in ("pairs", "timing", "esd"):
            continue
        if os.path.exists(done_file):
            print(f"= {concept.name}/{stage}: done already ({done_file})")
            continue
        run_demo.run(command, os.path.join(out, "logs", f"{stage}.log"))
    with open(os.path.join(timing_dir, "timing.json")) as f:
        timing = json.load(f)
    return {
        "pairs": os.path.join(out, "pairs"),
        "esd": os.path.join(out, "esd", "unet.safetensors"),
        "recommended_t_max": timing["recommended_t_max"],
        "timing_verdict": timing.get("verdict"),
    }


def without_concept_inversion(flags: List[str]) -> List[str]:
    """The demo's evaluation without Concept Inversion: at the demo's budget the inverted word never brings
    the spots back even on the base model (its DSR under the attack is 1.00), so it would cost every run time
    and tell nothing."""
    kept, skip = [], False
    for flag in flags:
        if skip:
            skip = False
        elif flag == "concept_inversion":
            continue
        elif flag.startswith("--inversion_"):
            skip = True
        elif flag.startswith("--no-inversion_"):
            continue
        else:
            kept.append(flag)
    return kept


def sweep_argv(args, concept, out: str, prepared: dict, t_max: int) -> List[str]:
    prompts = run_demo.prompt_files(os.path.join(out, "prompts"), concept.name)
    # The sweep owns the seed and the steps of every run: leave them out of the shared training flags.
    training = run_demo.training_flags(args.demo, concept, seed=0)
    for owned in ("--seed", "--max_train_steps"):
        index = training.index(owned)
        del training[index : index + 2]
    if args.objective and "concept" in args.objective:
        # The sweep trains one run at a time: the first concept run makes the retain set, the others read it.
        training += run_demo.retain_flags(args.demo, concept, prompts) + ["--retain_dir", os.path.join(out, "retain")]
    evaluation = without_concept_inversion(run_demo.evaluation_flags(args.demo, concept, prompts, prepared["pairs"]))
    axes = (["--objective", *args.objective] if args.objective else []) + (
        ["--retain_weight", *[f"{w:g}" for w in args.retain_weight]] if args.retain_weight else []
    )
    return [
        *axes,
        "--pretrained_model_name_or_path",
        args.model,
        "--concept",
        concept.name,
        "--unsafe_prompt",
        "@" + prompts["unsafe"],
        "--safe_prompt",
        "@" + prompts["safe"],
        "--dataset_name",
        prepared["pairs"],
        "--beta_dpo",
        *[f"{b:g}" for b in args.beta_dpo],
        "--preservation_weight",
        *args.preservation_weight,
        "--t_max",
        str(t_max),
        "--max_train_steps",
        str(args.demo.max_train_steps),
        "--train_seeds",
        *[str(s) for s in args.train_seeds],
        "--train_args",
        shlex.join(training),
        "--eval_args",
        shlex.join(evaluation),
        "--baseline_unet",
        f"esd={prepared['esd']}",
        "--preservation_axis",
        "pixel_preservation",
        "--output_dir",
        os.path.join(out, "sweep"),
    ]


def world_table(curve: dict, sweep_dir: str, concept) -> dict:
    """Every setting's DSR (the sweep's spread over its seeds) and the world's readings, mean [min, max] over its
    seeds; the base and ESD-x alike."""
    from duo_plugin.evaluate import ImageStore

    eval_dir = os.path.join(sweep_dir, sweep.EVAL_DIR)
    models = ["base", "esd", *(run for point in curve["points"] for run in point["runs"])]
    # Each evaluation rewrites the folder's manifest.jsonl with its own models: read every model's own manifests.
    store = ImageStore(eval_dir)
    manifest = {(model, "unrelated"): list(store.rows(model, "unrelated").values()) for model in models}
    readings = run_demo.preservation_readings(eval_dir, manifest, models)
    sets = run_demo.dsr_sets(concept)

    def row(runs: List[str], dsr: Dict[str, dict], extra: dict) -> dict:
        entry = dict(extra, dsr={s: dsr[s] for s in sets if s in dsr})
        for key in WORLD_READINGS:
            entry[key] = sweep.spread([readings[m][key] for m in runs])
        return entry

    def single(record: dict) -> Dict[str, dict]:
        return {s: sweep.spread([value]) for s, value in record["dsr"].items()}

    rows = {
        "base": row(["base"], single(curve["base"]), {"label": "base"}),
        "esd": row(["esd"], single(curve["baselines"]["esd"]), {"label": "ESD-x"}),
    }
    for point in sorted(
        curve["points"],
        key=lambda p: (p.get("objective") or "", p["beta_dpo"], p["preservation_weight"], p.get("retain_weight") or 0),
    ):
        end = point.get("training_end") or {}
        objective = point.get("objective")
        label = f"β {point['beta_dpo']:g}, λ {point['preservation_weight']:g}"
        if objective == "concept":
            label = f"concept, {label}" + (
                f", λ_r {point['retain_weight']:g}" if point.get("retain_weight") is not None else ""
            )
        rows[point["name"]] = row(
            point["runs"],
            point["dsr"],
            {
                "label": label,
                "objective": objective or "paper",
                "retain_weight": point.get("retain_weight"),
                "beta_dpo": point["beta_dpo"],
                "preservation_weight": point["preservation_weight"],
                "seeds": point["seeds"],
                **{key: end.get(key) for key in ("saturated_share", "unsafe_error_change", "margin")},
            },
        )
    return rows


def front(rows: Dict[str, dict], prompt_set: str) -> List[str]:
    """DUO settings no other setting beats on both the prompt set's DSR and pixel preservation (means)."""
    names = [n for n in rows if n not in ("base", "esd")]
    flags = sweep.pareto_front(
        [(rows[n]["pixel_preservation"]["mean"], rows[n]["dsr"][prompt_set]["mean"]) for n in names]
    )
    return sorted((n for n, on in zip(names, flags) if on), key=lambda n: rows[n]["pixel_preservation"]["mean"])


def worst_dsr(entry: dict, key: str = "mean") -> float:
    return min(d[key] for d in entry["dsr"].values())


def keeps(entry: dict) -> bool:
    return all(entry[k]["mean"] >= v for k, v in KEEPS.items())


def verdicts(rows: Dict[str, dict], concept) -> List[dict]:
    """The acceptance question and the choice of a toy preset, read off the table."""
    duo = {n: r for n, r in rows.items() if n not in ("base", "esd")}
    first = concept.dsr_sets[0]
    good = [n for n, r in duo.items() if keeps(r) and worst_dsr(r) >= REMOVES]
    kept = [n for n, r in duo.items() if keeps(r)]
    best_kept = max(kept, key=lambda n: (worst_dsr(duo[n]), duo[n]["dsr"][first]["mean"]), default=None)
    esd = rows["esd"]
    dominating = [
        n
        for n, r in duo.items()
        if r["dsr"][first]["mean"] >= esd["dsr"][first]["mean"]
        and r["pixel_preservation"]["mean"] >= esd["pixel_preservation"]["mean"]
    ]
    recipe = [
        n
        for n, r in duo.items()
        if r["beta_dpo"] == 500 and r["preservation_weight"] == 5e6 and r.get("objective", "paper") == "paper"
    ]
    return [
        {
            "claim": f"a DUO point with DSR ≥ {REMOVES} on every prompt set and attack (mean over seeds) at pixel preservation ≥ 0.95 and the same reading as the base ≥ 0.95",
            "holds": bool(good),
            "detail": ", ".join(good)
            if good
            else (
                f"none; among the points that keep ≥ 0.95, the best is {rows[best_kept]['label']} with lowest DSR {worst_dsr(duo[best_kept]):.2f}"
                if best_kept
                else "none keeps ≥ 0.95"
            ),
        },
        {
            "claim": f"a DUO point at least as good as ESD-x on both {first} DSR and pixel preservation",
            "holds": bool(dominating),
            "detail": ", ".join(rows[n]["label"] for n in dominating) or "none",
        },
        {
            "claim": f"the recipe (β 500, λ 5e6) is on the front on {first} prompts",
            "holds": bool(recipe) and recipe[0] in front(rows, first),
            "detail": "front: " + " → ".join(rows[n]["label"] for n in front(rows, first)),
        },
        {
            "claim": "the toy preset we would ship (the best removal among the points that keep ≥ 0.95)",
            "holds": None,
            "detail": rows[best_kept]["label"]
            if best_kept and duo[best_kept]["dsr"][first]["mean"] > rows["base"]["dsr"][first]["mean"] + 0.1
            else f"none: no point that keeps ≥ 0.95 removes more than the base does (DSR {first} within 0.1)",
        },
    ]


def cell(value: dict, digits: int = 2) -> str:
    if value["min"] == value["max"]:
        return f"{value['mean']:.{digits}f}"
    return f"{value['mean']:.{digits}f} [{value['min']:.{digits}f}, {value['max']:.{digits}f}]"


def markdown(rows: Dict[str, dict], concept, checks: List[dict], t_max: int, seeds: List[int]) -> str:
    sets = [s for s in run_demo.dsr_sets(concept) if s in rows["base"]["dsr"]]
    fronts = {s: set(front(rows, s)) for s in sets}
    header = [
        "setting",
        *[f"DSR {s}" for s in sets],
        "pixel pres.",
        "same as base",
        "colour as asked",
        "saturated",
        "Δ⁻/e_ref",
    ]
    lines = [
        f"DUO on the toy world's {concept.name}: t < {t_max}, lr 1e-3 × 300 steps of 4 pairs, seeds {seeds}; "
        "mean [min, max] over the seeds; * = on the Pareto front of that prompt set (mean DSR against mean pixel preservation).",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for name, r in rows.items():
        dsr = [cell(r["dsr"][s]) + (" *" if name in fronts[s] else "") for s in sets]
        saturated = "" if r.get("saturated_share") is None else f"{r['saturated_share']['mean']:.2f}"
        change = "" if r.get("unsafe_error_change") is None else f"{r['unsafe_error_change']['mean']:+.2f}"
        lines.append(
            "| "
            + " | ".join(
                [
                    r["label"],
                    *dsr,
                    cell(r["pixel_preservation"], 3),
                    cell(r["same_reading_as_base"]),
                    cell(r["colour_as_asked"]),
                    saturated,
                    change,
                ]
            )
            + " |"
        )
    verdict = {True: "confirmed", False: "refuted", None: "choice"}
    lines += ["", "Checks:"] + [f"- {verdict[c['holds']]}: {c['claim']} ({c['detail']})" for c in checks]
    return "\n".join(lines) + "\n"


BAR_SETS = ("named", "synonym", "unnamed", "empty", "ring_a_bell")


def plot_objectives(rows: Dict[str, dict], compare: List[dict], path: str, concept_name: str):
    """Pixel preservation against the lowest DSR over the bar's sets (mean, min-max bars over seeds), each
    objective in its own colour; ``compare``: rows of other curve.json files (e.g. the committed paper curve)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def lowest(entry: dict, key: str) -> float:
        return min(entry["dsr"][s][key] for s in BAR_SETS if s in entry["dsr"])

    figure, axes = plt.subplots(figsize=(7.5, 5))
    colours = {"paper": "tab:grey", "concept": "tab:red"}
    drawn = set()
    for source in [rows, *compare]:
        for name, entry in source.items():
            if name in ("base", "esd"):
                continue
            objective = entry.get("objective", "paper")
            x, y = entry["pixel_preservation"], lowest(entry, "mean")
            axes.errorbar(
                x["mean"],
                y,
                xerr=[[x["mean"] - x["min"]], [x["max"] - x["mean"]]],
                yerr=[[y - lowest(entry, "min")], [lowest(entry, "max") - y]],
                fmt="o",
                color=colours.get(objective, "tab:blue"),
                label=None if objective in drawn else f"DUO, {objective} objective",
                markersize=5,
                capsize=2,
            )
            drawn.add(objective)
            if objective == "concept":
                axes.annotate(
                    entry["label"].split(", ")[-1],
                    (x["mean"], y),
                    fontsize=7,
                    xytext=(4, 4),
                    textcoords="offset points",
                )
    for name, marker in (("base", "s"), ("esd", "^")):
        if name in rows:
            entry = rows[name]
            axes.plot(
                entry["pixel_preservation"]["mean"], lowest(entry, "mean"), marker, color="black", label=entry["label"]
            )
    axes.axvline(0.95, color="gray", linestyle=":", linewidth=1)
    axes.axhline(0.9, color="gray", linestyle=":", linewidth=1)
    axes.set_xlabel("pixel preservation on prompts without the concept (1 − mean |Δ pixel|)")
    axes.set_ylabel(f"lowest DSR over {', '.join(BAR_SETS)}")
    axes.set_title(f"Toy world, {concept_name}: both objectives (mean, min–max over seeds)")
    axes.legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(os.path.join(args.model, "model_index.json")):
        raise UsageError(
            f"no toy-world pipeline at {args.model}: train one with examples/toy_world/train_tiny_model.py"
        )
    concept = run_demo.CONCEPTS[args.concept]
    out = os.path.join(os.path.abspath(args.output_dir), concept.name)
    # The sweep's commands load the world's detectors as toy_world:Factory.
    os.environ["PYTHONPATH"] = os.pathsep.join([run_demo.REPO_ROOT, TOY_DIR, os.environ.get("PYTHONPATH", "")])
    prepared = prepare(args, concept, out)
    t_max = args.t_max or prepared["recommended_t_max"]
    curve = sweep.main(sweep_argv(args, concept, out, prepared, t_max))
    rows = world_table(curve, os.path.join(out, "sweep"), concept)
    checks = verdicts(rows, concept)
    report = {
        "what": f"DSR of {concept.name} against preservation over β × λ in the toy world, with the world's pixel rules",
        "t_max": t_max,
        "timing": prepared["timing_verdict"],
        "seeds": args.train_seeds,
        "rows": rows,
        "pareto_front": {s: front(rows, s) for s in rows["base"]["dsr"]},
        "checks": checks,
        "sweep": "sweep/curve.json",
    }
    with open(os.path.join(out, "curve.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = markdown(rows, concept, checks, t_max, args.train_seeds)
    with open(os.path.join(out, "curve.md"), "w") as f:
        f.write(text)
    compare = []
    for path in args.compare:
        with open(path) as f:
            compare.append(json.load(f)["rows"])
    plot_objectives(rows, compare, os.path.join(out, "objectives.png"), concept.name)
    print(text)
    return report


if __name__ == "__main__":
    main()
