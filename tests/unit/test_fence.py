"""The fence: protocol services see narrow views, never the daemon's App, the
inventory or the store module. Cheap to check, and it keeps the shape from eroding.

Allowed: the service factory (``create``/``context_for``), which is the one place
that reads the App and builds the service from its parts, and imports under
``if TYPE_CHECKING:`` for that factory's annotation. Test/bench kits
(``testkit.py``, ``__main__.py``) assemble a whole daemon and are not services.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[2] / "netbootd"
SERVICES = ("dhcp", "tftp", "http", "nfs", "dns")
FORBIDDEN = ("inventory", "store", "app")
FACTORIES = {"create", "context_for"}
KITS = {"testkit.py", "__main__.py"}  # test and bench kits, the stand-alone DHCP runner


def service_modules() -> list[Path]:
    return sorted(p for d in SERVICES for p in (PKG / d).glob("*.py") if p.name not in KITS)


def _forbidden(module: str | None, level: int, names: list[str]) -> str | None:
    """The forbidden target of an import inside a service package, or None."""
    if level == 2 and module:  # from ..inventory import X / from ..store.x import Y
        head = module.split(".")[0]
        return head if head in FORBIDDEN else None
    if level == 2 and not module:  # from .. import store
        bad = [n for n in names if n in FORBIDDEN]
        return bad[0] if bad else None
    if level == 0 and module and module.startswith("netbootd."):
        head = module.split(".")[1]
        return head if head in FORBIDDEN else None
    return None


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    out: list[str] = []

    def visit(node: ast.AST, allowed: bool) -> None:
        for child in ast.iter_child_nodes(node):
            ok = allowed
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                ok = True
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                ok = allowed or child.name in FACTORIES
                if not ok:
                    for arg in (*child.args.args, *child.args.kwonlyargs):
                        ann = ast.unparse(arg.annotation) if arg.annotation else ""
                        if ann.strip("'\"") == "App":
                            out.append(f"{path.name}:{child.lineno} {child.name}() takes App")
            if isinstance(child, ast.ImportFrom) and not ok:
                bad = _forbidden(child.module, child.level, [a.name for a in child.names])
                if bad:
                    out.append(f"{path.name}:{child.lineno} imports {bad}")
            if isinstance(child, ast.Import) and not ok:
                for a in child.names:
                    if _forbidden(a.name, 0, []):
                        out.append(f"{path.name}:{child.lineno} imports {a.name}")
            visit(child, ok)

    visit(tree, False)
    return out


@pytest.mark.parametrize("path", service_modules(), ids=lambda p: f"{p.parent.name}/{p.name}")
def test_service_module_stays_behind_the_fence(path: Path) -> None:
    assert _violations(path) == []


def test_the_fence_test_sees_violations(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("from ..inventory import Inventory\nfrom ..store.layout import x\n"
                   "from ..app import App\n\ndef serve(app: App) -> None: ...\n")
    assert len(_violations(bad)) == 4
