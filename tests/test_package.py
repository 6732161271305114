"""The package's shape: no import circle, no deferred internal imports, short modules,
the math cited from docs/math.md, and a registry that every method file is in."""

from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Set

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "lora_da"
MAX_LINES = 450
# the design document kept outside the repository (its name split, so this file does not cite it)
OUTSIDE_SPEC = "SPEC" + ".md"

# Imports inside functions that are not there to dodge a circle: the compiled core is
# imported only after its BLAS library is preloaded (lora_da._native.core).
ALLOWED_DEFERRED = {("lora_da._native", "lora_da._core")}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def package_files() -> List[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "kernels" not in p.relative_to(PACKAGE).parts)


def _resolve(current: str, is_package: bool, node: ast.ImportFrom) -> List[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = current.split(".")
        if not is_package:
            parts = parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    # `from . import x` may name submodules
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imports_of(path: Path, known: Set[str], packages: Set[str]):
    """(module-level imports, imports inside functions) of lora_da modules, TYPE_CHECKING blocks left out."""
    current = module_name(path)
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text())
    top: Set[str] = set()
    deferred: Set[str] = set()

    def visit(nodes, inside_function: bool) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and _is_type_checking(node):
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(node.body, True)
                continue
            if isinstance(node, ast.ClassDef):
                visit(node.body, inside_function)
                continue
            names: List[str] = []
            if isinstance(node, ast.ImportFrom):
                names = _resolve(current, is_package, node)
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            # the packages around this module are already being imported: no edge to them
            targets = {n for n in names if n in known and n != current and not current.startswith(n + ".")}
            # importing lora_da.x.y runs the package lora_da.x first (unless we are inside it)
            targets |= {
                parent
                for n in targets
                for parent in [n.rsplit(".", 1)[0]]
                if parent in packages and parent != "lora_da" and not current.startswith(parent + ".") and parent != current
            }
            (deferred if inside_function else top).update(targets)
            for field in ("body", "orelse", "finalbody", "handlers"):
                inner = getattr(node, field, None)
                if isinstance(inner, list):
                    visit(inner, inside_function)

    visit(tree.body, False)
    return top, deferred


def import_graph():
    files = package_files()
    known = {module_name(p) for p in files} | {"lora_da._core"}
    packages = {module_name(p) for p in files if p.name == "__init__.py"}
    graph: Dict[str, Set[str]] = {}
    deferred: Dict[str, Set[str]] = {}
    for path in files:
        graph[module_name(path)], deferred[module_name(path)] = imports_of(path, known, packages)
    return graph, deferred


def find_cycle(graph: Dict[str, Set[str]]):
    """A list of modules forming an import cycle, or None."""
    state: Dict[str, int] = {}  # 1: on the stack, 2: done
    stack: List[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target) :] + [target]
            if state.get(target) is None:
                found = visit(target)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_no_import_circle():
    graph, _ = import_graph()
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_internal_import_deferred_into_a_function():
    _, deferred = import_graph()
    found = {(module, target) for module, targets in deferred.items() for target in targets}
    assert found <= ALLOWED_DEFERRED, sorted(found - ALLOWED_DEFERRED)


def test_no_module_over_the_line_limit():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, long


def test_nothing_cites_a_file_outside_the_repository():
    tracked = [
        p
        for p in ROOT.rglob("*")
        if p.is_file()
        and ".git" not in p.parts
        and "build" not in p.parts
        and p.suffix in {".py", ".md", ".hpp", ".h", ".cpp", ".cu", ".txt", ".toml", ".sh"}
    ]
    citing = [str(p.relative_to(ROOT)) for p in tracked if OUTSIDE_SPEC in p.read_text(errors="ignore")]
    assert not citing, citing


def test_docs_math_exists_and_readme_links_it():
    assert (ROOT / "docs" / "math.md").is_file()
    assert "docs/math.md" in (ROOT / "README.md").read_text()


def test_every_method_file_is_registered_once():
    from lora_da import methods
    from lora_da.methods import METHODS

    helpers = {"__init__", "base", "linalg", "lora_da_reference", "lora_da_batched"}
    files = {p.stem for p in (PACKAGE / "methods").glob("*.py")} - helpers
    modules = {getattr(methods, stem) for stem in files}
    registered = {method.name for method in METHODS.values()}
    assert {m.METHOD.name for m in modules} == registered
    assert len(METHODS) == len(files)


@pytest.mark.parametrize("name", ["lora-da", "lora", "pissa", "milora", "lora-ga", "lora-one", "cntlora", "fisher-subspace"])
def test_method_options_are_frozen_dataclasses_of_numbers(name):
    from lora_da.methods import get_method

    method = get_method(name)
    options = method.resolve_options(None)
    assert dataclasses.is_dataclass(options)
    with pytest.raises(dataclasses.FrozenInstanceError):
        for field in dataclasses.fields(options):
            setattr(options, field.name, 1.0)
        raise dataclasses.FrozenInstanceError("no fields")
    assert all(isinstance(value, float) for value in dataclasses.asdict(options).values())


def readme_module_levels() -> Dict[str, int]:
    """The README's table of modules "from the entry point down": module -> row."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("The modules of `python/lora_da/`") :]
    levels: Dict[str, int] = {}
    for row, line in enumerate(line for line in section.splitlines()[4:] if line.startswith("|")):
        for cell in line.split("|")[1].split(","):
            levels["lora_da." + cell.strip().strip("`").rstrip("/")] = row
        if not line.startswith("|"):
            break
    return levels


def _top(module: str, levels: Dict[str, int]) -> str:
    return module if module in levels else ".".join(module.split(".")[:2])


def test_imports_follow_the_readme_module_table():
    """Each module imports only modules of its own row or below in README's table."""
    levels = readme_module_levels()
    graph, _ = import_graph()
    upward = [
        (module, target)
        for module, targets in graph.items()
        for target in targets
        if _top(module, levels) in levels
        and _top(target, levels) in levels
        and levels[_top(target, levels)] < levels[_top(module, levels)]
    ]
    assert not upward, upward
    unlisted = {_top(m, levels) for m in graph} - set(levels) - {"lora_da", "lora_da.__main__"}
    assert not unlisted, f"modules missing from README's table: {sorted(unlisted)}"


def test_the_kernels_folder_does_not_hide_a_top_level_kernels_package():
    """``kernels/`` has no ``__init__.py`` (kernels/README.md): from the repository root, the
    PyPI package ``kernels`` (which transformers imports) must win over our folder."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    code = "import importlib.util; spec = importlib.util.find_spec('kernels'); print(spec.origin if spec else None)"
    found = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    if found == "None":  # a namespace package has no origin: then nothing else named kernels is installed
        pytest.skip("no package named kernels is installed")
    assert not found.startswith(str(ROOT / "kernels")), found
    import lora_da.kernels.kfac_stats  # noqa: F401  (the namespace subpackage still imports)
