"""The package's shape (docs/architecture.md): stages as folders, imports flowing one way.

Read from the source with `ast`, lazy imports inside functions included: a module may import its
own stage and the stages below it, never one above; no two modules import each other, however
indirectly; and no module takes another's private (underscore) names.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ping_llm"

# Bottom to top. The language, the errors and the options (config fields that are flags) are
# everyone's; the data side knows nothing of the model; the model side (flat, as in nanochat) reads
# data; queries run a model; evaluation asks queries; the CLI and the demo drive everything.
LAYERS = [
    {"__init__", "errors", "tokens", "options"},
    {"data"},
    {"config", "model", "optim", "runtime", "checkpoint", "knowledge", "train"},
    {"query"},
    {"eval"},
    {"cli", "verbs", "demo"},
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        out[".".join(parts).removesuffix(".__init__") or "__init__"] = path
    return out


def _imports(path: Path, modules) -> list[tuple[str, list[str]]]:
    """(imported module, names taken from it) for every ping_llm import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ping_llm"):
            base = node.module.removeprefix("ping_llm").lstrip(".")
            for a in node.names:
                sub = f"{base}.{a.name}" if base else a.name
                if sub in modules:  # `from ping_llm.data import ingest`: the module itself
                    out.append((sub, []))
                else:
                    out.append((base or "__init__", [a.name]))
        elif isinstance(node, ast.Import):
            out += [(a.name.removeprefix("ping_llm."), []) for a in node.names
                    if a.name.startswith("ping_llm.")]
    return out


def _layer(module: str) -> int:
    top = module.split(".")[0]
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def test_every_module_belongs_to_a_stage():
    unplaced = [m for m in _modules() if not any(m.split(".")[0] in lay for lay in LAYERS)]
    assert unplaced == []


def test_imports_flow_one_way_from_the_top_down():
    modules = _modules()
    upward = [f"{m} imports {dep}" for m, path in modules.items()
              for dep, _ in _imports(path, modules) if _layer(dep) > _layer(m)]
    assert upward == []


def test_no_module_imports_another_that_imports_it_back():
    modules = _modules()
    graph = {m: {d for d, _ in _imports(p, modules) if d in modules and d != m}
             for m, p in modules.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(m, path):
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join(path[path.index(d):] + [d]))
            elif d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_no_module_takes_another_modules_private_names():
    modules = _modules()
    private = [f"{m} takes {dep}.{n}" for m, path in modules.items()
               for dep, names in _imports(path, modules) for n in names
               if n.startswith("_") and n != "__version__"]
    assert private == []
