"""The package's house rules, measured by benchmarks/architecture.py: no import circles (lazy imports included),
between modules or between sub-packages; no module over 600 lines; the README's layout names every room."""

import importlib.util
import os
import pathlib

import pytest


REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def survey():
    spec = importlib.util.spec_from_file_location("architecture", REPO_ROOT / "benchmarks" / "architecture.py")
    architecture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(architecture)
    return architecture.survey(REPO_ROOT / "duo_plugin")


def test_no_import_circle_and_every_arrow_points_down(survey):
    assert survey["circles"] == []
    assert survey["house_circles"] == []
    assert survey["back_arrows"] == []


def test_no_module_over_600_lines(survey):
    assert survey["modules_over_600_lines"] == []


def test_the_survey_finds_a_circle_it_is_shown(tmp_path):
    spec = importlib.util.spec_from_file_location("architecture", REPO_ROOT / "benchmarks" / "architecture.py")
    architecture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(architecture)
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from .high import g\n")  # a lazy import counts
    (package / "high.py").write_text("from . import low\n")
    (package / "sub" / "__init__.py").write_text("from .inner import x\n")
    (package / "sub" / "inner.py").write_text("from ..low import f\nx = 1\n")
    result = architecture.survey(package)
    assert result["circles"] == [["pkg.high", "pkg.low"]]
    assert sorted(result["back_arrows"]) == ["pkg.high -> pkg.low", "pkg.low -> pkg.high"]
    assert result["houses"] == 4  # __init__, low, high, and sub/ as one house


def test_a_room_s_floor_is_the_longest_chain_below_it(tmp_path):
    spec = importlib.util.spec_from_file_location("architecture", REPO_ROOT / "benchmarks" / "architecture.py")
    architecture = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(architecture)
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "ground.py").write_text("")
    (package / "middle.py").write_text("from . import ground\n")
    (package / "top.py").write_text("from . import ground, middle\n")
    result = architecture.survey(package)
    assert (result["floors"], result["arrows"], result["circles"]) == (3, 3, [])


def test_the_readme_layout_names_every_house():
    readme = (REPO_ROOT / "README.md").read_text()
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    package = REPO_ROOT / "duo_plugin"
    houses = sorted(
        name
        for name in os.listdir(package)
        if (name.endswith(".py") and name != "__init__.py") or (package / name / "__init__.py").is_file()
    )
    missing = [name for name in houses if f"`{name.removesuffix('.py')}" not in layout]
    assert missing == []


def test_an_installed_package_carries_every_sub_package():
    import tomllib
    from setuptools import find_packages

    with open(REPO_ROOT / "pyproject.toml", "rb") as f:
        include = tomllib.load(f)["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = set(find_packages(where=str(REPO_ROOT), include=include))
    on_disk = {
        ".".join(path.parent.relative_to(REPO_ROOT).parts) for path in (REPO_ROOT / "duo_plugin").rglob("__init__.py")
    }
    assert on_disk - shipped == set() and "duo_plugin.families" in shipped


def test_docs_layout_names_every_module():
    layout = (REPO_ROOT / "docs" / "layout.md").read_text()
    package = REPO_ROOT / "duo_plugin"
    rooms = sorted(
        path.parent.name if path.stem == "__init__" else path.stem
        for path in package.rglob("*.py")
        if path.stem != "__main__" and path != package / "__init__.py"
    )
    missing = [name for name in rooms if f"`{name}" not in layout]
    assert missing == []
