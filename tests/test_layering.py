"""The layering the docs describe is checked here, from the source: run.py and tools/ -> jobs/ -> extensions/<arch>/
-> toolkit/, never upwards, no import cycles between project modules, and no file or function too long to read.

Imports are read with `ast` from every module, including those inside functions (a lazy import is still a
dependency). `from package import name` counts as importing `package.name` when that is a module, else `package`.
"""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAYERS = {"run": 0, "tools": 0, "jobs": 1, "extensions": 2, "toolkit": 3}  # a module imports only higher numbers
PACKAGES = ("tools", "jobs", "extensions", "toolkit")
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for run.py and every .py under the layered packages."""
    modules = {"run": root / "run.py"}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules that `name` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    layer = lambda module: LAYERS[module.split(".")[0]]  # noqa: E731
    return [f"{src} imports {dst} ({src.split('.')[0]} may not import {dst.split('.')[0]})"
            for src, targets in sorted(graph.items()) for dst in sorted(targets)
            if layer(dst) <= layer(src) and src.split(".")[0] != dst.split(".")[0]]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def long_code(root: Path) -> list[str]:
    """Files over MAX_FILE_LINES lines and functions over MAX_FUNCTION_LINES lines (tests included)."""
    problems = []
    files = list(project_modules(root).values()) + sorted((root / "tests").rglob("*.py"))
    for path in files:
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(root)
        if len(text.splitlines()) > MAX_FILE_LINES:
            problems.append(f"{rel}: {len(text.splitlines())} lines (at most {MAX_FILE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{rel}:{node.lineno} {node.name}: {length} lines (at most {MAX_FUNCTION_LINES})")
    return problems


def test_no_module_imports_a_layer_above_it():
    assert upward_imports(import_graph(REPO)) == []


def test_no_import_cycles_between_project_modules():
    assert cycles(import_graph(REPO)) == []


def test_files_and_functions_stay_short():
    assert long_code(REPO) == []


def test_toolkit_never_names_an_architecture():
    """toolkit/ is architecture-free: no module there is named after, or imports, a model family."""
    names = [p.name for p in (REPO / "extensions").iterdir() if (p / "__init__.py").is_file()]
    assert names, "no architecture packages found"
    for path in (REPO / "toolkit").rglob("*.py"):
        assert not any(n in path.stem for n in names), f"{path.relative_to(REPO)} is named after an architecture"


def _copy_tree(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in PACKAGES:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "run.py", root / "run.py")
    (root / "tests").mkdir()
    return root


def test_the_checks_catch_a_back_import_and_a_cycle(tmp_path):
    """The checker itself: a planted upward import, a planted cycle and a planted long function are all reported."""
    root = _copy_tree(tmp_path)
    errors = root / "toolkit" / "errors.py"
    errors.write_text(errors.read_text() + "\n\ndef _late():\n    from jobs.process import outputs  # noqa\n")
    upward = upward_imports(import_graph(root))
    assert upward == ["toolkit.errors imports jobs.process.outputs (toolkit may not import jobs)"]
    # jobs.process.outputs imports toolkit.errors (via its imports) and now toolkit.errors imports it back
    assert any("toolkit.errors" in c and "jobs.process.outputs" in c for c in cycles(import_graph(root)))

    dtypes = root / "toolkit" / "dtypes.py"
    dtypes.write_text(dtypes.read_text() + "\n\ndef _long():\n" + "    x = 1\n" * MAX_FUNCTION_LINES)
    assert any("_long" in p for p in long_code(root))


def test_extensions_importing_jobs_is_reported(tmp_path):
    root = _copy_tree(tmp_path)
    arch = next(p for p in (root / "extensions").iterdir() if (p / "__init__.py").is_file())
    module = arch / "planted.py"
    module.write_text("import jobs.push\n")
    assert upward_imports(import_graph(root)) == [f"extensions.{arch.name}.planted imports jobs.push "
                                                  "(extensions may not import jobs)"]
