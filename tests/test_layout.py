"""The package's structure: imports go one way, with no circle between modules or subpackages,
TensorFlow only behind the engine, and modules of a readable size."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pneumo_cli"
# The floors, bottom first: a subpackage may import only from floors below it (and itself).
FLOORS = ["core", "engine", "io", "model", "data", "training", "inference", "overlay",
          "evaluation", "export", "serve", "cli"]  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports() -> dict[str, set[str]]:
    """Module -> the pneumo_cli modules it imports (anywhere in it, function bodies too)."""
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = defaultdict(set)
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.level == 0
                and (node.module or "").startswith("pneumo_cli")
            ):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    graph[module_name(path)].add(full if full in modules else node.module)
    return graph


def floor_of(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FLOORS else None


def test_no_module_imports_one_above_its_floor() -> None:
    wrong = []
    for module, targets in imports().items():
        here = floor_of(module)
        for target in targets:
            there = floor_of(target)
            if here and there and FLOORS.index(there) > FLOORS.index(here):
                wrong.append(f"{module} -> {target}")
    assert wrong == []


def test_there_is_no_import_circle() -> None:
    graph = imports()
    state: dict[str, int] = {}
    circles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                circles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_only_the_engine_imports_tensorflow_at_module_level() -> None:
    """Other modules reach TensorFlow through engine.tf.import_tf(), inside functions, so that
    importing them (and `pneumo --help`) never starts TensorFlow."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in ("tensorflow", "tf_keras", "segmentation_models")
                   for n in names):  # fmt: skip
                offenders.append(str(path.relative_to(PACKAGE)))
    assert offenders == []


def test_only_engine_openvino_imports_openvino() -> None:
    """OpenVINO is reached through engine.openvino.import_openvino(), which switches its usage
    telemetry off before the first import; a direct import elsewhere could skip that."""
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n.split(".")[0] in ("openvino", "openvino_telemetry") for n in names):
                offenders.append(str(path.relative_to(PACKAGE)))
    assert set(offenders) == {"engine/openvino.py"}


def test_no_module_is_much_over_400_lines() -> None:
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")
    }
    assert {name: n for name, n in sizes.items() if n > 450} == {}


def _top_level_names(path: Path) -> set[str]:
    """What ``from module import name`` can find in a module file without running it."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def test_benchmarks_import_only_what_the_package_has() -> None:
    """Benchmarks import pneumo_cli inside their main (after argument parsing), so a rename in the
    package breaks them only when run: every name they import must still be there."""
    missing = []
    for script in sorted((PACKAGE.parent / "benchmarks").glob("*.py")):
        for node in ast.walk(ast.parse(script.read_text())):
            if not (
                isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pneumo_cli")
            ):
                continue
            base = PACKAGE.parent.joinpath(*node.module.split("."))
            module = (
                base.with_suffix(".py")
                if base.with_suffix(".py").is_file()
                else base / "__init__.py"
            )
            if not module.is_file():
                missing.append(f"{script.name}: no module {node.module}")
                continue
            names = _top_level_names(module)
            for alias in node.names:
                if alias.name not in names and not (base / f"{alias.name}.py").is_file():
                    missing.append(f"{script.name}: {node.module} has no {alias.name}")
    assert not missing, missing
