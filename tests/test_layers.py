"""The package's layering: the command line sits on top; nothing below it imports it."""

import ast
from pathlib import Path

import ditscope

PACKAGE = Path(ditscope.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the ditscope modules a file imports (relative imports resolved)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = list(package[: len(package) - node.level + 1]) if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return {n for n in names if n.startswith("ditscope")}


def test_nothing_below_the_cli_imports_the_cli():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        bad = sorted(
            m for m in imported_modules(path) if m == "ditscope.cli" or m.startswith("ditscope.cli.")
        )
        if bad:
            offenders[str(rel)] = bad
    assert not offenders, offenders


def test_the_import_reader_sees_relative_imports():
    """The check above is only as good as its reader: it must resolve `from ..cli.main import x`."""
    names = imported_modules(PACKAGE / "cli" / "bench.py")
    assert "ditscope.cli.common" in names and "ditscope.runtime" in names


def test_a_plain_import_gives_the_zoo():
    """`import ditscope` is enough for `ditscope.zoo.load(...)` (a fresh interpreter: no test imported it first)."""
    import subprocess
    import sys

    code = "import ditscope; assert callable(ditscope.zoo.load) and 'tiny-pixart' in ditscope.zoo.ZOO"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_profile_function_and_the_profiling_package_do_not_collide():
    import ditscope
    import ditscope.profiling.artifact as artifact

    assert callable(ditscope.profile) and artifact.Profile is ditscope.Profile
