"""The shape of the code: no import cycles, the library never draws, small modules and functions, and the
README's layout section names every room of the tree.

Imports are read from the source (every `import`, also those inside functions: a lazy import still ties two
modules together), so these tests need no model and run in well under a second.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES = 420
MAX_FUNCTION_LINES = 60
LONG_REASON = "Long:"
"""A function over MAX_FUNCTION_LINES says why in its docstring, in a sentence that starts with this."""


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "cli":
        parts = ["poet_mlx", "cli"] + parts[1:]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files() -> list[Path]:
    return sorted(list((ROOT / "poet_mlx").rglob("*.py")) + list((ROOT / "cli").glob("*.py")))


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The project modules `path` imports (relative imports resolved; `from pkg import mod` counts mod)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - (node.level - 1)]
                base = ".".join(parent + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name and not name.startswith(t + "."):  # a package's own __init__ is not an edge
                found.add(t)
    return found


def import_graph() -> dict[str, set[str]]:
    files = source_files()
    known = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, known) for p in files}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_library_never_imports_the_cli_or_rich():
    graph = import_graph()
    for mod, deps in graph.items():
        if not mod.startswith("poet_mlx.cli"):
            assert not [d for d in deps if d.startswith("poet_mlx.cli")], mod
    for path in (ROOT / "poet_mlx").rglob("*.py"):
        assert not re.search(r"^\s*(from|import) rich\b", path.read_text(), re.M), path


def test_modules_and_functions_are_small():
    too_long = []
    for path in source_files():
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_long.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and LONG_REASON not in (ast.get_docstring(node) or ""):
                    too_long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}: {n} lines")
    assert too_long == []


def test_readme_layout_names_every_room():
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout"):]
    layout = layout[: layout.index("\n## ", 4)] if "\n## " in layout[4:] else layout
    rooms = sorted(p.parent.name for p in (ROOT / "poet_mlx").glob("*/__init__.py"))
    modules = sorted(p.stem for p in (ROOT / "poet_mlx").glob("*.py") if p.stem != "__init__")
    missing = [f"{r}/" for r in rooms if f"{r}/" not in layout] + [m for m in modules if f"{m}" not in layout]
    assert missing == []
    named = set(re.findall(r"`([a-z_]+)/`", layout))
    assert named <= set(rooms) | {"cli", "tests", "examples", "benchmarks"}, named - set(rooms)


@pytest.mark.parametrize("command", [["--help"], ["train", "--help"]])
def test_help_does_not_load_mlx_or_build_the_blas_shim(command, tmp_path):
    """`poet-mlx --help` stays fast: no MLX, and so no BLAS shim compiled, until a command needs MLX."""
    import subprocess
    import sys

    code = ("import sys; from poet_mlx.cli.main import main\n"
            "try:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "from poet_mlx.backends import blas\n"
            "assert 'mlx.core' not in sys.modules, 'mlx.core loaded'\n"
            "assert blas.STATUS.reason == 'not attempted', blas.STATUS\n")
    env = {"POET_MLX_CACHE": str(tmp_path), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=60)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "blas").exists()


def test_mlx_loaded_after_poet_mlx_gets_openblas(tmp_path):
    """The import hook routes MLX to OpenBLAS the first time anything imports mlx.core after poet_mlx."""
    import subprocess
    import sys

    code = ("import poet_mlx\nimport mlx.core as mx\nfrom poet_mlx.backends import blas\n"
            "import sys; sys.exit(0 if blas.STATUS.active or not sys.platform.startswith('linux') else 1)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr


def test_pyproject_ships_every_package():
    """A wheel holds only the packages pyproject.toml lists: a new room must be added there."""
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {module_name(p) for p in (ROOT / "poet_mlx").rglob("__init__.py")} | {"poet_mlx.cli"}
    assert listed == found
