"""The runtime's module structure: no import cycle among gfnet_edge.runtime's modules, and the
driver imports no place at module level (the places import the shared types, not the driver)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = ROOT / "gfnet_edge" / "runtime"


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _resolve(module: str, node: ast.ImportFrom, is_package: bool) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(path: Path, module_level_only: bool) -> set:
    """gfnet_edge.runtime modules imported by ``path`` (outside ``if TYPE_CHECKING:`` blocks;
    with ``module_level_only``, only the statements run when the module is imported)."""
    tree = ast.parse(path.read_text())
    out = set()
    is_package = path.name == "__init__.py"
    me = _module(path)

    def visit(node, top):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.dump(child.test):
                continue
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            counted = inner or not module_level_only
            if isinstance(child, ast.ImportFrom) and counted:
                target = _resolve(me, child, is_package)
                for alias in child.names:  # ``from . import x`` names a module when x.py exists
                    sub = f"{target}.{alias.name}"
                    out.add(sub if (ROOT / sub.replace(".", "/")).with_suffix(".py").exists() else target)
            elif isinstance(child, ast.Import) and counted:
                out.update(a.name for a in child.names)
            visit(child, inner)

    visit(tree, True)
    return {m for m in out if m.startswith("gfnet_edge.runtime") and m != me}


def _cycle(graph: dict):
    state = {}

    def dfs(n, stack):
        state[n] = 1
        for m in graph.get(n, ()):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = dfs(m, stack + [m])
                if found:
                    return found
        state[n] = 2
        return None

    for n in graph:
        if n not in state:
            found = dfs(n, [n])
            if found:
                return found
    return None


def test_runtime_modules_form_no_import_cycle():
    files = [p for p in RUNTIME.rglob("*.py")]
    graph = {_module(p): _imports(p, module_level_only=True) for p in files}
    assert "gfnet_edge.runtime.types" in graph and "gfnet_edge.runtime.driver" in graph
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
    places = {"gfnet_edge.runtime.host_place", "gfnet_edge.runtime.device_place", "gfnet_edge.runtime.graph_steps"}
    assert not graph["gfnet_edge.runtime.driver"] & places
    for p in places:
        assert "gfnet_edge.runtime.driver" not in _imports(RUNTIME / (p.rsplit(".", 1)[1] + ".py"), False), p


def test_importing_the_driver_loads_no_place():
    code = ("import sys, gfnet_edge.runtime.driver as d; "
            "print(sorted(m for m in sys.modules if m.endswith(('_place', 'graph_steps'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
