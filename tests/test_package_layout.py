"""The package reads as the pipeline: harness/ is grouped by stage, no module imports from a later
stage, models/ has no import circle, and no module or function outgrows a screenful or two."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from conftest import ROOT

STAGES = ("core", "study", "data", "train", "measure", "evaluate", "analysis", "report", "workflow", "tools", "cli")
"""harness/'s packages in pipeline order: a module may import from its own stage and earlier ones."""
ENTRY = {"harness", "harness.__main__", "harness.launch", "harness.reuse", "harness.devices"}
"""The package itself and its ``python -m`` entry points: above every stage."""
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 600, 80


def _modules(package: str) -> dict[str, Path]:
    root = ROOT / package
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports from the project, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            package = ROOT / node.module.replace(".", "/")
            found |= {f"{node.module}.{a.name}" for a in node.names if (package / f"{a.name}.py").is_file()}
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {m for m in found if m.split(".")[0] in ("harness", "models")}


def _stage(module: str) -> int:
    if module in ENTRY:
        return len(STAGES)
    part = module.split(".")[1]
    assert part in STAGES, f"{module}: harness/{part} is not a stage of {STAGES}"
    return STAGES.index(part)


def test_harness_holds_only_the_stages_and_its_entry_points():
    names = {p.name for p in (ROOT / "harness").iterdir() if not p.name.startswith(("_", "."))}
    modules = {n.removesuffix(".py") for n in names if n.endswith(".py")}
    assert names - {f"{m}.py" for m in modules} == set(STAGES)
    assert {f"harness.{m}" for m in modules} == ENTRY - {"harness", "harness.__main__"}


@pytest.mark.parametrize("module", sorted(m for m in _modules("harness") if m not in ENTRY))
def test_no_import_runs_from_a_stage_up_to_a_later_one(module):
    path = _modules("harness")[module]
    later = sorted(
        m for m in _imports(path) if m.startswith("harness.") and m not in ENTRY and _stage(m) > _stage(module)
    )
    assert not later, f"{path.relative_to(ROOT)} ({STAGES[_stage(module)]}) imports from later stages: {later}"


def test_models_import_nothing_of_harness_and_hold_no_circle():
    modules = _modules("models")
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    assert not any(i.startswith("harness") for p in modules.values() for i in _imports(p))
    del graph["models"]  # the package re-exports its modules: not part of any circle among them

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        return any(n == goal or (n not in seen and reaches(n, goal, seen | {n})) for n in graph.get(start, ()))

    circles = sorted(m for m in graph if reaches(m, m, set()))
    assert not circles, f"modules of models/ that import themselves through others: {circles}"


def _sources() -> list[Path]:
    return sorted([*(ROOT / "harness").rglob("*.py"), *(ROOT / "models").rglob("*.py")])


def test_no_module_is_over_600_lines():
    long = {
        str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    }
    assert not long, f"modules over {MAX_MODULE_LINES} lines: {long}"


def test_no_function_is_over_80_lines():
    long = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = lines
    assert not long, f"functions over {MAX_FUNCTION_LINES} lines: {long}"
