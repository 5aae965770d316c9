"""The import graph of ditscope: no module imports a layer above its own, and no import cycle.

Every `import` and `from ... import` of every module is read from its source (ast), the ones inside functions
too: an import deferred to run time is still a dependency."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "ditscope"

# Layers, lowest first: a module may import its own layer's modules and those of the layers below. Each entry
# is a top-level module or subpackage of ditscope; `ditscope` is the package's own __init__ (the public API).
LAYERS = [
    {"errors", "files", "version", "holds"},
    {"versioned", "patching", "families", "runtime", "stats", "parallel"},  # parallel: torch.distributed only
    {"artifact", "plots", "zoo"},  # the profile file format and figures; the model zoo
    {"capture"},
    {"cache"},
    {"profiling"},
    {"planning"},
    {"bench", "study"},
    {"ditscope"},
    {"cli"},
    {"__main__"},
]


def module_name(path: Path) -> str:
    parts = ["ditscope", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def imports(name: str, path: Path, known: dict) -> set[str]:
    """The ditscope modules `name` imports (a `from package import name` that names a module: that module)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def unit(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "ditscope"


def level(name: str) -> int:
    u = unit(name)
    found = [i for i, layer in enumerate(LAYERS) if u in layer]
    assert found, f"{name}: its package {u!r} is in no layer of tests/test_imports.py's LAYERS; add it"
    return found[0]


def test_every_package_has_a_layer():
    for name in modules():
        level(name)


def test_no_module_imports_a_layer_above_its_own():
    upward = sorted(f"{a} imports {b}" for a, deps in graph().items() for b in deps if level(b) > level(a))
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_nothing_below_the_cli_imports_it():
    into_cli = sorted(
        f"{a} imports {b}"
        for a, deps in graph().items()
        for b in deps
        if unit(b) == "cli" and unit(a) not in ("cli", "__main__")
    )
    assert not into_cli, "\n".join(into_cli)


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each a cycle or several."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle():
    found = cycles(graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert (
        level("ditscope.capture.recorder") < level("ditscope.profiling.runner") < level("ditscope.cli.main")
    )
