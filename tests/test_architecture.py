"""The package's shape: no import cycle, library below study below presentation, one stage module per notebook,
notebooks free of functions and literals, and every paper number in `cfmoe.claims` only."""

import ast
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "cfmoe"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The cfmoe modules `name` imports anywhere in its body (also inside functions): for `from X import y`,
    X.y when it is a module, else X."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "cfmoe"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != "cfmoe":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found - {name}


GRAPH = {name: imports(name) for name in MODULES}


def test_the_import_walker_sees_relative_absolute_and_function_level_imports():
    assert "cfmoe.stages.runs" in GRAPH["cfmoe.stages.cache_management"]
    assert "cfmoe.claims" in GRAPH["cfmoe.costmodel"]
    assert "cfmoe.serving_sim" in GRAPH["cfmoe.serving.engine"]
    assert {"cfmoe.moe", "cfmoe.provenance"} <= GRAPH["cfmoe.routing"]  # absolute form


def test_no_import_cycle():
    state, cycles = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def layer(name: str) -> int:
    """0: the library, 1: the study (cfmoe.stages), 2: presentation's report."""
    if name.startswith("cfmoe.stages"):
        return 1
    return 2 if name in ("cfmoe.present.report", "cfmoe.present.notebooks") else 0


def test_library_below_study_below_report():
    upward = [(a, b) for a, targets in GRAPH.items() for b in targets if layer(b) > layer(a)]
    assert not upward, f"imports against the layering: {upward}"
    # model and run loading sits below every stage and imports none of them
    assert not {t for t in GRAPH["cfmoe.stages.runs"] if t.startswith("cfmoe.stages")}


UNITS = {1e3, 1e6, 1e9}  # ms, MB, GB: the only float literals a notebook may hold


def stage_of(notebook: Path) -> str:
    return "cfmoe.stages." + notebook.stem.split("_", 1)[1]


def code_cells(notebook: Path) -> list[str]:
    cells = json.loads(notebook.read_text())["cells"]
    return ["".join(c["source"]) for c in cells
            if c["cell_type"] == "code" and "parameters" not in c.get("metadata", {}).get("tags", [])]


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_each_notebook_calls_its_own_stage_module_and_holds_no_function_or_number(notebook):
    assert stage_of(notebook) in MODULES, f"{notebook.name} has no module {stage_of(notebook)}"
    used = set()
    for source in code_cells(notebook):
        tree = ast.parse(source)
        for node in ast.walk(tree):
            assert not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)), \
                f"{notebook.name} defines a function: {ast.unparse(node)[:60]}"
            if isinstance(node, ast.Constant) and isinstance(node.value, float) and node.value not in UNITS:
                raise AssertionError(f"{notebook.name} holds the number {node.value}; it belongs in cfmoe.claims")
            if isinstance(node, ast.ImportFrom) and node.module == "cfmoe.stages":
                used |= {f"cfmoe.stages.{a.name}" for a in node.names}
    assert used == {stage_of(notebook)}, f"{notebook.name} imports stages {sorted(used)}"


# the paper's numbers (and the real-routing reference): written in cfmoe.claims and nowhere else
PAPER_NUMBERS = {0.3255, 0.442, 0.357, 0.358, 45.0, 75.0, 2.25, 112.5, 1408, 2048, 2.82, 0.265, 0.35, 0.85}


def test_paper_numbers_and_targets_live_in_claims_only():
    where = {}
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value in PAPER_NUMBERS:
                where.setdefault(node.value, set()).add(name)
    assert set(where) == PAPER_NUMBERS - {0.358}, "claims.py holds each paper number (0.358 is derived)"
    elsewhere = {value: sorted(names - {"cfmoe.claims"}) for value, names in where.items() if names != {"cfmoe.claims"}}
    assert not elsewhere, f"paper numbers outside cfmoe.claims: {elsewhere}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_prose_quotes_no_paper_number(notebook):
    """Prose names the claims (`claims.PAPER_MEMORY_SAVED`); the printed verdicts give the numbers."""
    text = "".join("".join(c["source"]) for c in json.loads(notebook.read_text())["cells"])
    quoted = [n for n in ("0.3255", "0.442", "0.326", "35.7%", "35.8%", "4.866", "1408", "2048", "4.5 GB/s")
              if n in text]
    assert not quoted, f"{notebook.name} quotes {quoted}"
