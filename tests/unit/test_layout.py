"""The package layout is the architecture: which code may import which.

- ``kubetrain.core``: what every process shares (the API model, the stage contract, the
  typed records, accounting, the store). It imports nothing else of kubetrain, and no
  Kubernetes or torch library, so the trainer image and a laptop can carry it.
- ``kubetrain_trainer``: runs in the trainer pod; it sees only ``kubetrain.core``.
- ``kubetrain.operator``: runs in the operator pod; core and itself.
- ``kubetrain.local``: runs on a laptop; core and itself (the trainer is a subprocess).
- ``kubetrain.cli`` and ``kubetrain.docgen``: the command line and the README generators,
  free to reach everything.

Imports inside functions count too: a lazy import still ties the layers together. No
module may take part in an import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "kubetrain": ROOT / "operator" / "kubetrain",
    "kubetrain_trainer": ROOT / "trainer_image" / "kubetrain_trainer",
}
# layer -> the kubetrain layers it may import (besides itself)
ALLOWED = {
    "kubetrain.core": set(),
    "kubetrain_trainer": {"kubetrain.core"},
    "kubetrain.operator": {"kubetrain.core"},
    "kubetrain.local": {"kubetrain.core"},
    "kubetrain.cli": {
        "kubetrain.core",
        "kubetrain.operator",
        "kubetrain.local",
        "kubetrain.docgen",
    },
    "kubetrain.docgen": {
        "kubetrain.core",
        "kubetrain.operator",
        "kubetrain.local",
        "kubetrain_trainer",
    },
}
# Third-party libraries that would drag a heavy or cluster-only dependency into a layer.
FORBIDDEN_LIBRARIES = {
    "kubetrain.core": {"kopf", "kubernetes", "torch", "prometheus_client"},
    "kubetrain_trainer": {"kopf", "kubernetes"},
    "kubetrain.operator": {"torch", "kubetrain_trainer"},
    "kubetrain.local": {"kopf", "kubernetes", "kubetrain_trainer", "torch"},
}
# Top-level names that are the packages' own and not third-party libraries.
OWN = {"kubetrain", "kubetrain_trainer"}


def _module_name(package: str, root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([package, *parts])


def _modules() -> dict[str, Path]:
    return {
        _module_name(pkg, root, path): path
        for pkg, root in PACKAGES.items()
        for path in sorted(root.rglob("*.py"))
    }


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """Every module ``module`` imports, at any depth of its code, resolved to the
    longest known module name (``from kubetrain.core import api`` names
    ``kubetrain.core.api``); third-party imports keep their top-level name."""
    out: set[str] = set()
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        for name in names:
            top = name.split(".")[0]
            if top not in OWN:
                out.add(top)
                continue
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                out.add(name)
    return out


def _layer(module: str) -> str | None:
    return next(
        (layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")), None
    )


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {m: _imports(m, p, known) for m, p in modules.items()}


def test_every_module_belongs_to_a_layer() -> None:
    strays = [m for m in _modules() if _layer(m) is None and m != "kubetrain"]
    assert not strays, (
        f"modules outside the layers (core, operator, local, cli, docgen, trainer): {strays}"
    )


@pytest.mark.parametrize("layer", sorted(ALLOWED))
def test_layers_import_only_what_they_may(layer: str) -> None:
    bad: list[str] = []
    for module, imports in _graph().items():
        if _layer(module) != layer:
            continue
        for target in sorted(imports):
            target_layer = _layer(target)
            if (
                target_layer is not None
                and target_layer != layer
                and target_layer not in ALLOWED[layer]
            ):
                bad.append(f"{module} imports {target}")
            if (
                target.split(".")[0] in FORBIDDEN_LIBRARIES.get(layer, set())
                and target_layer is None
            ):
                bad.append(f"{module} imports the library {target}")
            if target in FORBIDDEN_LIBRARIES.get(layer, set()):
                bad.append(f"{module} imports {target}")
    assert not bad, f"{layer} may import only {sorted(ALLOWED[layer]) or 'itself'}:\n" + "\n".join(
        sorted(set(bad))
    )


def test_no_import_cycles() -> None:
    graph = {m: {t for t in targets if t in _modules()} for m, targets in _graph().items()}
    # Tarjan's strongly connected components: any component of two or more modules is
    # a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


MAX_FUNCTION_LINES = 120


def test_no_function_is_longer_than_a_screenful_or_two() -> None:
    long: list[str] = []
    for module, path in _modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = (node.end_lineno or node.lineno) - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    long.append(f"{module}.{node.name}: {lines} lines")
    assert not long, (
        f"functions over {MAX_FUNCTION_LINES} lines (split them into named steps): {long}"
    )
