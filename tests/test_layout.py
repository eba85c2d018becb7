"""The package layout: every import runs down the layer order, and there are no cycles.

The order (``detect/__init__.py``, README "Code map"):

    common -> data -> proposals -> models -> training | evaluation -> predict | report
           -> commands | demo -> cli

A module may import from its own subpackage and from any lower layer, never from a higher
layer or a sibling on the same layer (training and evaluation do not import each other; nor do
predict and report). Imports inside functions count too: they are parsed, not run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "detect"

LAYERS = [
    ["detect", "detect.common"],  # detect: the face (``__version__`` only)
    ["detect.data"],
    ["detect.proposals"],
    ["detect.models", "detect.check_install"],  # check_install also compiles selective search's kernels
    ["detect.training", "detect.evaluation"],
    ["detect.predict", "detect.report"],
    ["detect.commands", "detect.demo"],
    ["detect.cli"],
    ["detect.__main__"],
]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def internal_imports(package: Path = PACKAGE) -> dict[str, set[str]]:
    """module -> the package's modules it imports anywhere in its source (ast, not run)."""
    modules = {module_name(p, package): p for p in package.rglob("*.py")}
    edges: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    anchor = name.split(".")[: len(name.split(".")) - node.level + is_package]
                    base = ".".join(anchor + ([base] if base else []))
                # ``from X import y``: y may be a submodule of X
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            for target in targets:
                while target and target not in modules:  # import detect.a.b -> the module detect.a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges[name].add(target)
    return edges


def layer_of(module: str) -> tuple[int, str]:
    """(layer index, group) of a module: its longest matching prefix in LAYERS."""
    best = None
    for index, groups in enumerate(LAYERS):
        for group in groups:
            if module == group or module.startswith(group + "."):
                if best is None or len(group) > len(best[1]):
                    best = (index, group)
    if best is None:
        raise AssertionError(f"{module} is in no layer of LAYERS: add it")
    return best


def layer_violations(edges: dict[str, set[str]]) -> list[str]:
    problems = []
    for source, targets in sorted(edges.items()):
        source_layer, source_group = layer_of(source)
        for target in sorted(targets):
            target_layer, target_group = layer_of(target)
            if target_layer > source_layer:
                problems.append(f"{source} imports {target}: up the layer order")
            elif target_layer == source_layer and target_group != source_group and target_group != "detect":
                problems.append(f"{source} imports {target}: a sibling on the same layer")
    return problems


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every cycle found by a depth-first search (one per back edge)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    return found


def test_imports_run_down_the_layers():
    edges = internal_imports()
    assert sum(len(t) for t in edges.values()) > 50  # the parser sees the package's imports
    assert layer_violations(edges) == []


def test_no_import_cycles():
    assert cycles(internal_imports()) == []


def test_function_level_imports_are_seen(tmp_path):
    package = tmp_path / "detect"
    (package / "common").mkdir(parents=True)
    (package / "models").mkdir()
    for init in ("__init__.py", "common/__init__.py", "models/__init__.py"):
        (package / init).write_text("")
    (package / "models" / "detector.py").write_text("from detect.common import boxes\n")
    (package / "common" / "boxes.py").write_text("def f():\n    from detect.models.detector import g\n")
    edges = internal_imports(package)
    assert edges["detect.common.boxes"] == {"detect.models.detector"}
    assert layer_violations(edges) == ["detect.common.boxes imports detect.models.detector: up the layer order"]
    assert cycles(edges) == [["detect.common.boxes", "detect.models.detector", "detect.common.boxes"]]


@pytest.mark.parametrize("source, target", [("detect.training.engine", "detect.evaluation.run"),
                                            ("detect.report.sections", "detect.predict.outputs")])
def test_siblings_may_not_import_each_other(source, target):
    assert layer_violations({source: {target}, target: set()}) == [
        f"{source} imports {target}: a sibling on the same layer"]


def test_only_the_wiring_reads_the_config_or_the_command_line():
    """STYLE.md: argparse lives in cli/commands, and the Config object is read only by commands.py
    and models/build.py (stage modules take plain values; they may check their settings with the
    config's own rule and raise its error)."""
    allowed = {"ConfigError", "check_proposal_settings"}
    readers = {"argparse": set(), "detect.common.config": set()}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                if name in readers and not (name == "detect.common.config" and isinstance(node, ast.ImportFrom)
                                            and {a.name for a in node.names} <= allowed):
                    readers[name].add(module_name(path))
    assert readers["argparse"] == {"detect.cli", "detect.commands"}
    assert readers["detect.common.config"] == {"detect.commands", "detect.models.build"}


def test_files_stay_small():
    """About 500 lines at most per file (STYLE.md): one job each."""
    sizes = {str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 520} == {}
