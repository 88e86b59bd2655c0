"""The layout rules of docs/architecture.md, checked on the source: short modules, imports at the top
(a deferred one says why), no private name imported across packages, dependencies pointing down the
layers only, no test machinery in the product, and a command line that starts without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "depthcut"
MAX_LINES = 450
# From the bottom up; a module may import from its own layer or any below it. Top-level modules and
# packages not named here are not layered (errors, registry, lazy: imported by everything).
LAYERS = [
    {"io"},
    {"model"},
    {"metrics", "analysis", "strategies"},
    {"repair", "healing", "evaluation"},
    {"sweep"},
    {"pipeline", "selection", "lm_eval"},
    {"cli"},
]
UNLAYERED = {"errors", "registry", "lazy", "__init__", "__main__"}


def modules():
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        yield path, ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """`depthcut.model.surgery` -> `model`; `depthcut.lm_eval` -> `lm_eval`; `depthcut` -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer_of(package: str) -> int | None:
    return next((i for i, names in enumerate(LAYERS) if package in names), None)


def imports(tree: ast.AST):
    """(node, imported module, names) for every `import`/`from ... import` of a depthcut module."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "depthcut":
            yield node, node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "depthcut":
                    yield node, alias.name, []


def test_package_of_and_layer_of_read_module_names_as_the_rules_mean():
    assert package_of("depthcut.model.surgery") == "model" and package_of("depthcut") == "__init__"
    assert layer_of("io") < layer_of("model") < layer_of("analysis") < layer_of("pipeline") < layer_of("cli")


def test_no_module_is_longer_than_the_limit():
    long = {module: n for path, module in modules() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {long}"


def test_no_private_name_is_imported_from_another_package():
    found = []
    for path, module in modules():
        for node, imported, names in imports(ast.parse(path.read_text())):
            if package_of(imported) == package_of(module):
                continue
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            private += [p for p in imported.split(".") if p.startswith("_") and not p.startswith("__")]
            if private:
                found.append(f"{module}:{node.lineno} imports {private} from {imported}")
    assert not found, found


def test_dependencies_point_down_the_layers():
    upward = []
    for path, module in modules():
        own = layer_of(package_of(module))
        if own is None:
            continue
        for node, imported, _ in imports(ast.parse(path.read_text())):
            target = layer_of(package_of(imported))
            if target is not None and target > own:
                upward.append(f"{module}:{node.lineno} imports {imported}")
    assert not upward, upward


def test_imports_inside_functions_say_why_they_are_deferred():
    """An import inside a function is a hidden dependency: allowed where start-up time or an optional
    dependency needs it, with a `# deferred: ...` comment on the import or above its group of imports."""
    silent = []
    for path, module in modules():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for inner in ast.walk(node):
                if isinstance(inner, (ast.Import, ast.ImportFrom)):
                    first = inner.lineno - 1
                    while first > 0 and lines[first - 1].strip().startswith(("import ", "from ")):
                        first -= 1  # the group of imports this one belongs to
                    nearby = " ".join(lines[max(first - 1, 0): inner.end_lineno])
                    if "deferred" not in nearby:
                        silent.append(f"{module}:{inner.lineno}")
    assert not silent, f"function-level imports without a '# deferred: why' comment: {sorted(set(silent))}"


def test_the_product_holds_no_test_machinery():
    for path, module in modules():
        text = path.read_text()
        assert "unittest" not in text and "pytest" not in text, module


@pytest.mark.parametrize("argv", [["--help"], ["prune", "--help"], ["prune", "model", "--no-such-option"],
                                  ["sweep", "--help"]])
def test_the_command_line_parses_without_importing_torch(argv):
    """`depthcut --help` and an argument mistake answer at once: nothing before parsing imports torch
    (benchmarks/bench_startup.py times it)."""
    code = ("import sys\nfrom depthcut.cli import main\ncode = main(sys.argv[1:])\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules)\n"
            "print('HEAVY', heavy)\n")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, check=False)
    assert "HEAVY []" in done.stdout, done.stdout[-500:] + done.stderr[-500:]
