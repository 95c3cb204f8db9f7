"""Side-by-side tables of an evaluation report: the leaderboard's shape and the paper's shape.

    python examples/compare_methods/table.py runs/compare_methods/eval/results.json

Reads ``results.json`` of ``duo_plugin.evaluate`` and writes ``results.md`` next to it (and prints it):

* the robustness leaderboard's shape: attack success rate under UnlearnDiffAtk (lower is better), FID
  and CLIP score on the unrelated (COCO) prompts, one row per model;
* the DUO paper's shape: defense success rate per attack (with its image counts) and prior
  preservation (plus FID and CLIP score when measured).

A column that was not measured is left empty and says how to get it. The plot of the paper's numbers is
``dsr_vs_prior_preservation.png``.
"""

import argparse
import json
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from duo_plugin.errors import UsageError, exit_on_usage_error  # noqa: E402


EXTRA_METRICS = (("fid", "fid", "FID", 2), ("clip_score", "clip_score", "CLIP score", 2))


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results.json of duo_plugin.evaluate")
    parser.add_argument("--output", default=None, help="default: results.md next to results.json")
    return parser.parse_args(argv)


def markdown(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines) + "\n"


def leaderboard_table(results: dict) -> str:
    """ASR under UnlearnDiffAtk (%), FID, CLIP score: the columns of the public robustness leaderboard."""
    metrics = results["metrics"]
    asr = results.get("attacks", {}).get("unlearndiffatk", {})
    rows = []
    for model, values in metrics.items():
        attack = asr.get(model)
        cells = [model, results.get("models", {}).get(model, {}).get("kind", "")]
        cells.append(f"{100 * attack['asr']:.1f} ({attack['num_broken']}/{attack['num_prompts']})" if attack else "")
        cells += [
            f"{values[name][key]:.{digits}f}" if name in values else "" for name, key, _, digits in EXTRA_METRICS
        ]
        rows.append(cells)
    notes = []
    if not asr:
        notes.append("ASR: run with `--attack unlearndiffatk`.")
    for name, _, label, _ in EXTRA_METRICS:
        if not any(name in values for values in metrics.values()):
            notes.append(
                f"{label}: run with `--metrics {name}`"
                + (" --fid_reference_dir COCO_IMAGES" if name == "fid" else "")
                + "."
            )
    table = markdown(["model", "kind", "ASR UnlearnDiffAtk % ↓", "FID ↓", "CLIP score ↑"], rows)
    return table + ("\n" + " ".join(notes) + "\n" if notes else "")


def paper_table(results: dict) -> str:
    """Defense success rate per attack and prior preservation (the DUO paper's axes), plus FID/CLIP when measured."""
    metrics = results["metrics"]
    attacks = list(dict.fromkeys(a for values in metrics.values() for a in values.get("dsr", {})))
    extra = [m for m in EXTRA_METRICS if any(m[0] in values for values in metrics.values())]
    header = (
        ["model", "kind"]
        + [f"DSR {a}" for a in attacks]
        + ["prior preservation"]
        + [label for _, _, label, _ in extra]
    )
    rows = []
    for model, values in metrics.items():
        cells = [model, results.get("models", {}).get(model, {}).get("kind", "")]
        for attack in attacks:
            dsr = values.get("dsr", {}).get(attack)
            cells.append(f"{dsr['dsr']:.3f} ({dsr['num_safe']}/{dsr['num_images']})" if dsr else "")
        preservation = values.get("prior_preservation")
        cells.append(f"{preservation['prior_preservation']:.4f}" if preservation else "")
        cells += [f"{values[name][key]:.{digits}f}" if name in values else "" for name, key, _, digits in extra]
        rows.append(cells)
    return markdown(header, rows)


def results_table(results: dict) -> str:
    """Both tables, leaderboard first."""
    return (
        "## Leaderboard shape: attack success rate under UnlearnDiffAtk, FID, CLIP score\n\n"
        + leaderboard_table(results)
        + "\n## Paper shape: defense success rate per attack, prior preservation\n\n"
        + paper_table(results)
    )


@exit_on_usage_error
def main(argv=None):
    args = parse_args(argv)
    if not os.path.isfile(args.results):
        raise UsageError(f"{args.results} does not exist: give the results.json of a duo_plugin.evaluate run")
    with open(args.results) as f:
        results = json.load(f)
    if "metrics" not in results:
        raise UsageError(f"{args.results} has no 'metrics': give the results.json of a duo_plugin.evaluate run")
    table = results_table(results)
    output = args.output or os.path.join(os.path.dirname(os.path.abspath(args.results)), "results.md")
    with open(output, "w") as f:
        f.write(f"# {results.get('settings', {}).get('concept', '')}: robustness and preservation\n\n{table}")
    print(table, end="")
    return table


if __name__ == "__main__":
    main()
