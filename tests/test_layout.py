"""The layers stay where the README says: a Prefect-free core, glue that never imports a flow, no cycles."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("usage_pipeline", "orchestration", "flows", "blocks")


def project_imports() -> dict[str, set[str]]:
    """module -> the project modules it imports (at any depth in the file)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            module = f"{package}.{path.stem}" if path.stem != "__init__" else package
            imported = set()
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
                if isinstance(node, ast.ImportFrom) and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                imported |= {n for n in names if n.split(".")[0] in PACKAGES or n.split(".")[0] == "prefect"}
            graph[module] = imported
    return graph


def test_the_core_imports_no_prefect_and_no_other_layer():
    for module, imported in project_imports().items():
        if module.startswith("usage_pipeline"):
            outside = {n for n in imported if not n.startswith("usage_pipeline")}
            assert not outside, f"{module} imports {sorted(outside)}"


def test_importing_the_whole_core_loads_no_prefect():
    core = [m for m in project_imports() if m.startswith("usage_pipeline")]
    code = f"import sys; import {', '.join(core)}; print(sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_the_glue_never_imports_a_flow_and_blocks_only_hold_block_types():
    for module, imported in project_imports().items():
        if module.startswith("orchestration"):
            assert not {n for n in imported if n.startswith("flows")}, module
        if module.startswith("blocks"):
            assert not {n for n in imported if n.split(".")[0] in ("flows", "orchestration")}, module


def test_no_import_cycle_between_project_modules():
    graph = project_imports()
    modules = set(graph)
    edges = {m: {i for i in imported if i in modules and i != m} for m, imported in graph.items()}

    def visit(module: str, path: list[str]) -> None:
        for nxt in edges[module]:
            assert nxt not in path, " -> ".join([*path, nxt])
            visit(nxt, [*path, nxt])

    for module in modules:
        visit(module, [module])
