"""The package's layout (README, Layout): imports point inwards, with no cycles, and only the
runner (risda/runner/) imports ray, pandas or matplotlib. Read from the source with `ast`,
function-level imports included; nothing is imported."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "risda"
RUNNER_ONLY = ("ray", "pandas", "matplotlib")
# A single run draws its own knowledge graph (<out>/graph.png); the one exception, lazily imported.
ALLOWED = {"risda.trainer.graph_plot": {"matplotlib"}}


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict) -> tuple[set[str], set[str]]:
    """(risda modules, other top-level packages) that module `name` imports anywhere in its code."""
    inside, outside = set(), set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[:len(package) - node.level + 1] + [node.module or ""]).strip(".") if node.level \
                else node.module
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            if t.split(".")[0] == "risda":
                if t != name and t in known:
                    inside.add(t)
            else:
                outside.add(t.split(".")[0])
    return inside, outside


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    known = modules()
    edges, external = {}, {}
    for name, path in known.items():
        edges[name], external[name] = imports(name, path, known)
    return edges, external


def test_no_import_cycles():
    edges, _ = graph()
    done, on_path = set(), []

    def visit(m):
        if m in on_path:
            raise AssertionError("import cycle: " + " -> ".join(on_path[on_path.index(m):] + [m]))
        if m in done:
            return
        on_path.append(m)
        for n in sorted(edges[m]):
            visit(n)
        on_path.pop()
        done.add(m)

    for m in sorted(edges):
        visit(m)


def test_only_the_runner_imports_ray_pandas_matplotlib_and_nothing_imports_the_runner():
    edges, external = graph()
    outside_runner = [m for m in edges if not m.startswith("risda.runner")]
    heavy = {m: external[m] & set(RUNNER_ONLY) - ALLOWED.get(m, set()) for m in outside_runner}
    assert {m: sorted(v) for m, v in heavy.items() if v} == {}
    assert {m: sorted(n for n in edges[m] if n.startswith("risda.runner")) for m in outside_runner
            if any(n.startswith("risda.runner") for n in edges[m])} == {}
    assert "risda.runner.search" in edges and "risda.runner.ablation.cli" in edges  # the walk found the runner


LAYERS = ("method", "trainer", "runner")  # from the inside out: each imports only the layers before it


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def test_the_three_layers_are_folders_and_imports_point_inwards():
    """`ls risda/` shows the layers; the method imports nothing of the trainer or the runner (not
    even Config), the trainer nothing of the runner. Only the package root and the `python -m
    risda.train` entry sit beside them."""
    assert sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__")) \
        == ["__init__.py", "method", "runner", "train.py", "trainer"]
    edges, external = graph()
    outward = {m: sorted(n for n in targets if layer(n) and layer(m)
                         and LAYERS.index(layer(n)) > LAYERS.index(layer(m)))
               for m, targets in edges.items()}
    assert {m: v for m, v in outward.items() if v} == {}
    method = [m for m in edges if layer(m) == "method"]
    assert len(method) >= 6 and all(external[m] <= {"torch", "__future__", "dataclasses", "warnings", "math"}
                                    for m in method), {m: external[m] for m in method}


def test_importing_the_method_loads_no_trainer(tmp_path):
    """`import risda.method` (or `from risda import RISDALoss`) never imports the trainer or the runner."""
    import subprocess
    import sys
    code = ("import sys; from risda import RISDALoss, LDAMLoss; import risda.method; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('risda.') and m.count('.') >= 1}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['method']"
