"""The package layout: no import circles among the project's modules (module-level or deferred)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("gateskip", "gateskip_core", "analysis", "dashboard")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> project modules it imports anywhere in its body (deferred imports included)."""
    files = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets.add(base)
                targets |= {f"{base}.{a.name}" for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name and not name.startswith(t + ".")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_no_import_circles():
    graph = import_graph()
    assert graph["gateskip_core.forward.execution"], "the graph reads the imports"
    assert cycles(graph) == []


def test_a_circle_is_found():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == [["a", "b", "c", "a"]]


def folder_graph(graph: dict[str, set[str]], package: str = "gateskip_core") -> dict[str, set[str]]:
    """The import graph of `package`'s folders: each module stands for its folder one level below the
    package (`gateskip_core.forward.execution` -> `gateskip_core.forward`; a top-level module for itself)."""

    def folder(module: str) -> str | None:
        parts = module.split(".")
        return ".".join(parts[:2]) if parts[0] == package and len(parts) > 1 else None

    folders: dict[str, set[str]] = {}
    for module, targets in graph.items():
        if (source := folder(module)) is not None:
            found = {folder(t) for t in targets} - {None, source}
            folders.setdefault(source, set()).update(found)
    return folders


def test_the_cores_folders_import_each_other_without_a_circle():
    """Each folder of the core does one job, in one direction: the plan is decided in `skipping/`, the
    walk in `forward/` reads it; what runs the model to fit or measure something lives in `training/`."""
    folders = folder_graph(import_graph())
    assert {"gateskip_core.skipping", "gateskip_core.gating"} <= folders["gateskip_core.forward"], "reads the imports"
    assert cycles(folders) == []


def test_a_circle_between_folders_is_found():
    graph = {
        "gateskip_core.a.x": {"gateskip_core.b.y"},
        "gateskip_core.b.z": {"gateskip_core.a.w"},
        "analysis.q": set(),
    }
    assert cycles(folder_graph(graph)) == [["gateskip_core.a", "gateskip_core.b", "gateskip_core.a"]]


MAX_FUNCTION_LINES = 60  # the house bar: a longer function is split into named steps


def long_functions(root: Path, folders: tuple[str, ...], limit: int = MAX_FUNCTION_LINES) -> list[str]:
    """'path:line name (N lines)' for every function or method under `root`/`folders` over `limit`
    lines, decorators included."""
    found = []
    for path in sorted(p for folder in folders for p in (root / folder).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
                if (n := node.end_lineno - start + 1) > limit:
                    found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({n} lines)")
    return found


def test_no_function_is_longer_than_the_house_bar():
    assert long_functions(ROOT, (*PACKAGES, "scripts")) == []


def test_a_long_function_is_found(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"def short():\n    pass\n\n\n@decorated\ndef long():\n{body}\n")
    assert long_functions(tmp_path, ("pkg",)) == [f"pkg/m.py:6 long ({MAX_FUNCTION_LINES + 2} lines)"]


def test_every_folder_of_modules_is_a_package_the_install_finds():
    """pyproject finds packages by their __init__.py: a folder of modules without one would be left out
    of a wheel while an editable install still imports it."""
    folders = {p.parent for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    assert ROOT / "analysis" / "traces" in folders
    assert sorted(str(f.relative_to(ROOT)) for f in folders if not (f / "__init__.py").is_file()) == []


def test_the_trace_half_of_analysis_reads_a_trace_file_without_torch(tiny_llama, tmp_path):
    """analysis.traces (and the core's traces group) need a trace, not a model: on a machine without
    torch a CSV trace still opens, and its statistics and figures come out."""
    import subprocess
    import sys

    trace = tiny_llama.trace(["The cat sat on the mat.", "Hello, world!"], skip=0.3)
    path = trace.to_csv(tmp_path / "t.csv")
    script = f"""
import sys
sys.modules["torch"] = None  # any import of torch now fails
from analysis.traces import figures
from analysis.traces.flow import layer_skip_summary
from analysis.traces.tracedb import TraceDB
from gateskip_core import read_trace
db = TraceDB({str(path)!r})
table = db.layer_table()
assert len(table) == 2 * {tiny_llama.spec.n_layers}, table
layer_skip_summary(table)
figures.gate_heatmap(read_trace({str(path)!r}))
print(db.counts()["tokens"])
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.strip()) == sum(s.n_tokens for s in trace.sequences)
