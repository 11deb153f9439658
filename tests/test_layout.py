"""The import layout docs/layout.md describes: no module of the project imports itself through others, and the
packages are layers, `lora` ← `tinyllama` ← `data` ← `training` ← `train.py` and `chat.py`.

Imports are read from the source with `ast`, every one of them: at the top, inside functions and under
`if TYPE_CHECKING:` (a circle a function-local import hides is still a circle for whoever reads the code).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Each package's layer: a module may import its own layer and those below, never one above.
LAYERS = {"lora": 0, "tinyllama": 1, "data": 2, "training": 3, "evaluation": 3, "train": 4, "chat": 4, "eval": 4,
          "bench": 5, "scripts": 5}
# The one documented exception: adapters are written whole by the rule every other file is (files.py imports
# nothing but the standard library).
ALLOWED_UPWARD = {("lora.adapter", "tinyllama.files")}


def project_modules() -> dict[str, Path]:
    """Dotted name -> file, for every module of the project outside the tests."""
    found = {}
    for top in LAYERS:
        paths = sorted((ROOT / top).rglob("*.py")) if (ROOT / top).is_dir() else [ROOT / f"{top}.py"]
        for path in paths:
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, modules) -> set[str]:
    """The project modules `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            levels = package.split(".")
            parent = ".".join(levels[:len(levels) - node.level + 1]) if node.level else ""
            base = ".".join(filter(None, [parent, node.module]))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a module a.b, say
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports(name, path, modules) for name, path in modules.items()}


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import one another, directly or through others (Tarjan's strongly connected
    components of more than one module)."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while not group or group[-1] != v:
                group.append(stack.pop())
                on_stack.discard(group[-1])
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return groups


def test_the_graph_sees_the_imports_it_must():
    graph = import_graph()
    assert {"lora.layer", "tinyllama.config"} <= graph["tinyllama.model"]  # absolute and relative
    assert "training" in graph["training.run_folder"]  # `from . import TrainingError`: the package itself
    assert "tinyllama.files" in graph["lora.adapter"]  # `from tinyllama import files`: the module


def test_no_module_imports_itself_through_others():
    graph = import_graph()
    found = [", ".join(f"{a} -> {b}" for a in group for b in sorted(graph[a]) if b in group)
             for group in circles(graph)]
    assert not found, "modules that import one another (a line per circle):\n" + "\n".join(found)


def test_no_package_imports_a_higher_one():
    graph = import_graph()
    layer = {name: LAYERS[name.partition(".")[0]] for name in graph}
    upward = [f"{a} imports {b}" for a, targets in graph.items() for b in sorted(targets)
              if layer[b] > layer[a] and (a, b) not in ALLOWED_UPWARD]
    assert not upward, ("imports against the layers lora <- tinyllama <- data <- training <- train.py, chat.py "
                        "(docs/layout.md):\n" + "\n".join(upward))
