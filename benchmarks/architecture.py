"""The package's import structure: rooms (modules), floors, arrows (imports), circles and back-arrows.

    python benchmarks/architecture.py [--root duo_plugin] [--json]

Every ``import`` of the package counts, the lazy ones inside functions too. A room's floor is the length of the
longest chain of arrows below it (floor 0 imports no other room). Rooms group into houses: each sub-package is one
house, each top-level module its own. A circle is a set of rooms (or houses) that reach each other; a back-arrow is
an arrow inside a circle, the ones that would have to go for every arrow to point down. "Files to open for one
step" counts the rooms the DUO step and one family's batch (``step`` and ``families.sd``) reach.
"""

import argparse
import ast
import json
import pathlib
import sys
from typing import Dict, List, Set


def modules(root: pathlib.Path) -> Dict[str, pathlib.Path]:
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imports_of(name: str, path: pathlib.Path, known: Set[str]) -> Set[str]:
    """The package's modules that ``name`` imports, at any depth of its code."""
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            # ``from pkg import sub`` reaches the submodule; ``from pkg.mod import name`` reaches the module.
            candidates = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        for candidate in candidates:
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
    return targets


def strongly_connected(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """Tarjan's components with more than one member (the circles)."""
    index, low, stack, on_stack, result, counter = {}, {}, [], set(), [], [0]

    def visit(node):
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                result.append(sorted(component))

    sys.setrecursionlimit(10000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return result


def floors(graph: Dict[str, Set[str]]) -> Dict[str, int]:
    """Longest chain of arrows below each room (rooms in a circle share the circle's floor)."""
    floor: Dict[str, int] = {}

    def height(node, seen):
        if node in floor:
            return floor[node]
        if node in seen:
            return 0
        seen = seen | {node}
        floor[node] = value = 1 + max((height(t, seen) for t in graph.get(node, ())), default=-1)
        return value

    for node in graph:
        height(node, frozenset())
    return floor


def house_of(name: str, root: str, packages: Set[str]) -> str:
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 and ".".join(parts[:2]) in packages else name


def reachable(graph: Dict[str, Set[str]], starts: List[str]) -> Set[str]:
    seen, todo = set(), [s for s in starts if s in graph]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += graph.get(node, ())
    return seen


def survey(root: pathlib.Path) -> dict:
    found = modules(root)
    known = set(found)
    graph = {name: imports_of(name, path, known) for name, path in found.items()}
    packages = {name for name, path in found.items() if path.name == "__init__.py" and name != root.name}
    houses: Dict[str, Set[str]] = {}
    for name, targets in graph.items():
        house = house_of(name, root.name, packages)
        houses.setdefault(house, set())
        houses[house] |= {house_of(t, root.name, packages) for t in targets} - {house}
    module_circles, house_circles = strongly_connected(graph), strongly_connected(houses)
    back_arrows = sorted(f"{a} -> {b}" for circle in module_circles for a in circle for b in graph[a] if b in circle)
    floor = floors(graph)
    lines = {name: len(path.read_text().splitlines()) for name, path in found.items()}
    step = reachable(graph, [f"{root.name}.step", f"{root.name}.families.sd", f"{root.name}.sd"])
    return {
        "rooms": len(found),
        "houses": len(houses),
        "floors": 1 + max(floor.values()),
        "arrows": sum(len(t) for t in graph.values()),
        "circles": module_circles,
        "house_circles": house_circles,
        "back_arrows": back_arrows,
        "files_for_one_step": sorted(step),
        "largest_modules": sorted(lines.items(), key=lambda item: -item[1])[:8],
        "modules_over_600_lines": sorted(name for name, count in lines.items() if count > 600),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default=str(pathlib.Path(__file__).resolve().parents[1] / "duo_plugin"))
    parser.add_argument("--json", action="store_true", help="print the survey as JSON")
    args = parser.parse_args(argv)
    result = survey(pathlib.Path(args.root))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"rooms {result['rooms']}, houses {result['houses']}, floors {result['floors']}, arrows {result['arrows']}")
    print(f"circles {len(result['circles'])} {result['circles']}")
    print(f"circles between houses {len(result['house_circles'])} {result['house_circles']}")
    print(f"back-arrows {len(result['back_arrows'])} {result['back_arrows']}")
    print(f"files to open for one step {len(result['files_for_one_step'])}: {', '.join(result['files_for_one_step'])}")
    print(f"modules over 600 lines {result['modules_over_600_lines']}")
    print("largest " + ", ".join(f"{name} {count}" for name, count in result["largest_modules"]))


if __name__ == "__main__":
    main()
