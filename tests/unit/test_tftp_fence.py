"""The TFTP service sees the daemon only through narrow views (docs/architecture.md,
netbootd/interfaces.py): no module of the service imports the App, the inventory, the
store or the planner, and no constructor takes an App. ``create(app)`` in server.py is
the one place that reads the App; ``testkit`` stands in for the daemon in tests and
the bench, so it may build one."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

import netbootd.tftp
from netbootd.tftp.server import TftpService
from netbootd.tftp.vfs import VirtualTree

TFTP = Path(netbootd.tftp.__file__).parent
FORBIDDEN = ("netbootd.app", "netbootd.inventory", "netbootd.store", "netbootd.planner")
SERVICE_MODULES = sorted(p for p in TFTP.glob("*.py") if p.name != "testkit.py")


def _runtime_imports(tree: ast.Module) -> list[tuple[str, str]]:
    """(module, enclosing function) of every import that runs (not under TYPE_CHECKING)."""
    out: list[tuple[str, str]] = []

    def visit(node: ast.AST, func: str) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, func)
            return
        if isinstance(node, ast.ImportFrom):
            base = "netbootd.tftp" if node.level == 1 else (
                "netbootd" if node.level == 2 else "")
            mod = ".".join(x for x in (base, node.module or "") if x)
            out.extend((f"{mod}.{a.name}" if node.module is None else mod, func)
                       for a in node.names)
        elif isinstance(node, ast.Import):
            out.extend((a.name, func) for a in node.names)
        name = node.name if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) else func
        for child in ast.iter_child_nodes(node):
            visit(child, name)

    visit(tree, "")
    return out


@pytest.mark.parametrize("path", SERVICE_MODULES, ids=lambda p: p.name)
def test_no_service_module_imports_past_the_views(path: Path):
    imports = _runtime_imports(ast.parse(path.read_text()))
    bad = [(m, f) for m, f in imports if m.startswith(FORBIDDEN)]
    assert not bad, f"{path.name} imports {bad}"
    if path.name == "server.py":  # the factory builds the views, lazily
        assert {m for m, f in imports if f == "create"} == {"netbootd.views"}


@pytest.mark.parametrize("cls", [TftpService, VirtualTree])
def test_no_constructor_takes_the_app(cls):
    params = inspect.signature(cls.__init__).parameters
    assert "app" not in params
    assert all(str(p.annotation) not in ("App", "netbootd.app.App") for p in params.values())
