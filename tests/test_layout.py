"""The package layout: subpackages in the study's order, every module importable on its own, and no import cycle
among module-level imports (a lazy import inside a function is how a light module reaches a heavy one)."""

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "clipbackdoor"
# dataset -> poison -> fine-tune -> decompose -> prototypes -> defend -> metrics, then B² and the pipeline around them
STUDY_ORDER = ["data", "models", "attacks", "training", "decomposition", "defenses", "detectors", "analysis", "t2i",
               "pipeline"]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def module_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Package modules ``name`` imports by name at import time: its top-level import statements (``if`` / ``try``
    blocks included), not those inside functions or classes. ``from pkg import sub`` names the sub-module, ``from
    pkg import NAME`` the package (its ``__init__`` must have run). A module importing a sibling through the full
    path while its package initialises is not a cycle: only names that must already be defined count."""
    found = set()

    def visit(nodes):
        for node in nodes:
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body + getattr(node, "orelse", []) + getattr(node, "finalbody", [])
                      + [n for h in getattr(node, "handlers", []) for n in h.body])
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("clipbackdoor"):
                subs = {f"{node.module}.{a.name}" for a in node.names}
                found.update(subs & known if subs <= known else {node.module})
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("clipbackdoor"))

    visit(ast.parse(path.read_text()).body)
    return found & known - {name}


def test_subpackages_follow_the_study():
    packages = sorted(p.name for p in SRC.iterdir() if (p / "__init__.py").exists())
    assert packages == sorted(STUDY_ORDER)
    flat = sorted(p.stem for p in SRC.glob("*.py"))  # what stays at the top: shared plumbing and the public API
    assert flat == ["__init__", "__main__", "compat", "config", "errors", "extensions", "io", "logs", "runtime"]
    for name in STUDY_ORDER:
        assert ast.get_docstring(ast.parse((SRC / name / "__init__.py").read_text())), f"{name}/ says what it holds"


def test_no_import_cycles():
    mods = modules()
    graph = {name: module_level_imports(name, path, set(mods)) for name, path in mods.items()}
    assert graph["clipbackdoor.detectors.detect"] >= {"clipbackdoor.attacks", "clipbackdoor.detectors.scores"}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def walk(node, path):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                walk(nxt, path + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])


def test_every_module_imports_on_its_own():
    names = [n for n in modules() if not n.endswith("__main__")]
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    proc = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
