"""The import contract: modules depend downward only, so each idea stays in one place.

quant → formats/artifact → engine → prune, allocation → api → cli/sweep; export and lossless sit beside the
artifact and never import the layers above them; nothing outside quant/ asks which class a format is.
Imports inside functions count: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "src" / "sizewise"
MAX_LINES = 500
TOP = ("sizewise.api", "sizewise.cli", "sizewise.sweep")
# module prefix -> what it must never import
FORBIDDEN = {
    **{m: TOP for m in ("sizewise.quant", "sizewise.families", "sizewise.runtime", "sizewise.engine",
                        "sizewise.allocate", "sizewise.artifact", "sizewise.export", "sizewise.lossless",
                        "sizewise.plan", "sizewise.arch", "sizewise.sources", "sizewise.data",
                        "sizewise.evaluate", "sizewise.report", "sizewise.prune")},
}
NO_EXPORT = ("sizewise.quant", "sizewise.engine", "sizewise.artifact", "sizewise.allocate", "sizewise.runtime",
             "sizewise.families", "sizewise.evaluate", "sizewise.prune")
BELOW_EVERYTHING = ("sizewise.quant", "sizewise.families")     # import nothing of sizewise but these and errors
FORMAT_CLASSES = re.compile(r"\b(\w*Format|\w*Tensor)\b")


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        parts = p.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        mods[name] = p
    return mods


def _graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rpartition(".")[0]
        for node in ast.walk(ast.parse(p.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg.split(".")[: len(pkg.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([node.module] if node.module else []))
                targets = [f"{base}.{a.name}" for a in node.names]
            for t in targets:
                o = owner(t) if t.startswith("sizewise") else None
                # a module importing its own package's face is not a design edge
                if o and o != m and not m.startswith(o + "."):
                    graph[m].add(o)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_graph(_modules())) == []


def test_dependencies_point_down():
    graph = _graph(_modules())
    bad = [f"{m} -> {t}" for m, ts in graph.items() for t in ts
           for low, banned in FORBIDDEN.items() if (m == low or m.startswith(low + ".")) and t.startswith(banned)]
    bad += [f"{m} -> {t}" for m, ts in graph.items() for t in ts
            if m.startswith(NO_EXPORT) and t.startswith("sizewise.export")]
    bad += [f"{m} -> {t}" for m, ts in graph.items() for t in ts
            if m.startswith(BELOW_EVERYTHING) and not t.startswith(BELOW_EVERYTHING + ("sizewise.errors",))]
    assert bad == []


def test_only_quant_asks_which_class_a_format_is():
    bad = []
    for m, p in _modules().items():
        if m.startswith("sizewise.quant"):
            continue
        for node in ast.walk(ast.parse(p.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "isinstance"
                    and len(node.args) == 2):
                cls = ast.unparse(node.args[1])
                if FORMAT_CLASSES.search(cls) and cls != "torch.Tensor":
                    bad.append(f"{p.relative_to(ROOT)}:{node.lineno} {cls}")
    assert bad == []


def test_no_source_file_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in ROOT.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_contract_sees_a_violation(tmp_path):
    """The checks above can fail: a cycle and an upward import are found in a made-up graph."""
    g = {"sizewise.quant.a": {"sizewise.api"}, "sizewise.api": {"sizewise.quant.a"}}
    assert _cycles(g) == [["sizewise.api", "sizewise.quant.a"]]


def test_package_names_load_on_first_use():
    """`import sizewise` is light, yet its public names and subpackages work as attributes."""
    code = ("import sys, sizewise; assert 'torch' not in sys.modules; "
            "assert callable(sizewise.api.compare) and callable(sizewise.evaluate); "
            "import sizewise.evaluate; assert callable(sizewise.evaluate)")
    subprocess.run([sys.executable, "-c", code], check=True)
