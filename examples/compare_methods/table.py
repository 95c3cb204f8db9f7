"""A side-by-side table of an evaluation report: one row per model, one column per metric.

    python examples/compare_methods/table.py runs/compare_methods/eval/results.json

Reads ``results.json`` of ``duo_plugin.evaluate`` and writes ``results.md`` next to it (and prints it):
defense success rate per attack (with its image counts) and prior preservation, plus FID and CLIP
score when they were measured. The plot of the same numbers is ``dsr_vs_prior_preservation.png``.
"""

import argparse
import json
import os
import sys


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from duo_plugin.errors import UsageError, exit_on_usage_error  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", help="results.json of duo_plugin.evaluate")
    parser.add_argument("--output", default=None, help="default: results.md next to results.json")
    return parser.parse_args(argv)


def results_table(results: dict) -> str:
    """Markdown: models in the report's order (base first), attacks in the order they were run."""
    metrics = results["metrics"]
    attacks = list(dict.fromkeys(a for values in metrics.values() for a in values.get("dsr", {})))
    extra = [
        (name, key, label, digits)
        for name, key, label, digits in (("fid", "fid", "FID", 2), ("clip_score", "clip_score", "CLIP score", 2))
        if any(name in values for values in metrics.values())
    ]
    header = (
        ["model", "kind"]
        + [f"DSR {a}" for a in attacks]
        + ["prior preservation"]
        + [label for _, _, label, _ in extra]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for model, values in metrics.items():
        cells = [model, results.get("models", {}).get(model, {}).get("kind", "")]
        for attack in attacks:
            dsr = values.get("dsr", {}).get(attack)
            cells.append(f"{dsr['dsr']:.3f} ({dsr['num_safe']}/{dsr['num_images']})" if dsr else "")
        preservation = values.get("prior_preservation")
        cells.append(f"{preservation['prior_preservation']:.4f}" if preservation else "")
        for name, key, _, digits in extra:
            cells.append(f"{values[name][key]:.{digits}f}" if name in values else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


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
        f.write(
            f"# {results.get('settings', {}).get('concept', '')}: defense success rate and prior preservation\n\n{table}"
        )
    print(table, end="")
    return table


if __name__ == "__main__":
    main()
