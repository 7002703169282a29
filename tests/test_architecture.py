"""The shape of the code: which way imports point, and the public surface.

Imports point one way: ``producer -> channels_core <- workers`` (STYLE.md).
Two independent checks hold it: import-linter's contracts in ``.importlinter``
and a walk over every import statement (module level or inside a function)
of ``channels_core`` and ``producer``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
CONFIG = REPO / ".importlinter"

FORBIDDEN: dict[str, frozenset[str]] = {
    "channels_core": frozenset(
        {
            "celery",
            "kombu",
            "fastapi",
            "starlette",
            "uvicorn",
            "click",
            "producer",
            "workers",
            "channels_cli",
        }
    ),
    "producer": frozenset({"workers", "channels_cli"}),
}
# (module, forbidden package) pairs allowed only inside a function, where the
# import runs when that code runs: kombu for the queue transport, loaded only
# when a channel delivers over ``queue``. Mirrors ``ignore_imports`` in
# .importlinter.
LAZY_ONLY: frozenset[tuple[str, str]] = frozenset({("channels_core.transports.queue", "kombu")})


def _lint_imports() -> str:
    found = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    assert Path(found).exists(), "import-linter is not installed (pip install -e '.[test]')"
    return found


def _run_lint_imports(config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_lint_imports(), "--no-cache", "--no-logo", str(config)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_import_linter_contracts_hold() -> None:
    result = _run_lint_imports(CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_import_linter_sees_external_imports(tmp_path: Path) -> None:
    """The contracts can fail: a forbidden package channels_core does use is caught."""
    config = tmp_path / "canary.ini"
    config.write_text(
        "[importlinter]\nroot_packages =\n    channels_core\ninclude_external_packages = True\n\n"
        "[importlinter:contract:canary]\nname = canary\ntype = forbidden\n"
        "source_modules =\n    channels_core\nforbidden_modules =\n    sqlalchemy\n"
    )
    result = _run_lint_imports(config)
    assert result.returncode != 0
    assert "channels_core is not allowed to import sqlalchemy" in result.stdout


# -- the AST walk ------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, dotted
    target: str  # what it imports, absolute and dotted
    line: int
    in_function: bool


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.module = module
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[Import] = []
        self.depth = 0

    def _nested(self, node: ast.AST) -> None:
        self.depth += 1
        self.generic_visit(node)
        self.depth -= 1

    visit_FunctionDef = visit_AsyncFunctionDef = visit_Lambda = _nested

    def _add(self, target: str, node: ast.stmt | ast.expr) -> None:
        self.found.append(Import(self.module, target, node.lineno, self.depth > 0))

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            self._add(alias.name, node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base)
            target = f"{prefix}.{node.module}" if node.module else prefix
        else:
            target = node.module or ""
        self._add(target, node)
        if not node.module:  # ``from . import x`` imports the submodule x
            for alias in node.names:
                self._add(f"{target}.{alias.name}", node)

    def visit_Call(self, node: ast.Call) -> None:
        # importlib.import_module("x") / __import__("x") with a literal name
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if (
            name in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            self._add(node.args[0].value, node)
        self.generic_visit(node)


def imports_of(source: str, module: str, *, is_package: bool = False) -> list[Import]:
    visitor = _Imports(module, is_package)
    visitor.visit(ast.parse(source))
    return visitor.found


def _package_files(package: str) -> list[tuple[str, Path]]:
    root = REPO / package
    files = []
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files.append((".".join(parts), path))
    return files


def violations(found: list[Import], forbidden: frozenset[str]) -> list[str]:
    bad = []
    for imp in found:
        top = imp.target.split(".")[0]
        if top not in forbidden:
            continue
        if imp.in_function and (imp.module, top) in LAZY_ONLY:
            continue
        where = "inside a function" if imp.in_function else "at module level"
        bad.append(f"{imp.module}:{imp.line} imports {imp.target} ({where})")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_no_forbidden_import_statements(package: str) -> None:
    files = _package_files(package)
    if package == "channels_core":
        assert len(files) > 10  # the walk found the package
    bad = []
    for module, path in files:
        found = imports_of(path.read_text(), module, is_package=path.name == "__init__.py")
        bad += violations(found, FORBIDDEN[package])
    assert bad == []


def test_the_walk_catches_what_it_should() -> None:
    """The checker can fail: nested, aliased, relative and dynamic imports are seen."""
    source = """
import os
import celery.app as c
from kombu import Connection
from .. import workers
from . import sibling

def later():
    import fastapi
    from producer.broker import BrokerDispatcher
    importlib.import_module("click")

async def deliver():
    import kombu
"""
    found = imports_of(source, "channels_core.transports.queue")
    assert {(i.target, i.in_function) for i in found} >= {
        ("os", False),
        ("celery.app", False),
        ("kombu", False),
        ("channels_core", False),
        ("channels_core.workers", False),
        ("channels_core.transports.sibling", False),
        ("fastapi", True),
        ("producer.broker", True),
        ("click", True),
        ("kombu", True),
    }
    bad = violations(found, FORBIDDEN["channels_core"])
    assert len(bad) == 5  # kombu inside deliver() is the one allowance
    assert any("kombu (at module level)" in b for b in bad)
    # The allowance is for that module only.
    other = imports_of("def f():\n    import kombu\n", "channels_core.delivery")
    assert violations(other, FORBIDDEN["channels_core"]) == [
        "channels_core.delivery:2 imports kombu (inside a function)"
    ]


def test_lazy_only_allowances_are_still_needed() -> None:
    """An allowance nobody uses any more should be deleted, here and in .importlinter."""
    used = set()
    for module, path in _package_files("channels_core"):
        for imp in imports_of(path.read_text(), module, is_package=path.name == "__init__.py"):
            if imp.in_function:
                used.add((imp.module, imp.target.split(".")[0]))
    assert used >= LAZY_ONLY
    assert "channels_core.transports.queue -> kombu" in CONFIG.read_text()


# -- the public surface ------------------------------------------------------------------

PUBLIC = {
    # module: names SPEC.md's "Python API" promises
    "channels_core.primitives": {
        "Channel",
        "Message",
        "Subscription",
        "Principal",
        "Role",
        "Permission",
        "Conversation",
        "Manifest",
    },
    "channels_core.registries": {
        "MessageRegistry",
        "ChannelRegistry",
        "SubscriptionRegistry",
        "PrincipalRegistry",
    },
    "channels_core.transports": {
        "EgressTransport",
        "IngressTransport",
        "TransportResult",
        "egress_transport",
        "ingress_transport",
    },
    "channels_core.errors": {
        "ChannelsError",
        "NotFoundError",
        "PermissionDeniedError",
        "ValidationError",
        "ContentTooLargeError",
        "ConflictError",
        "ConfigurationError",
        "TransportError",
        "TransientDeliveryError",
        "PermanentDeliveryError",
        "DispatchTimeout",
    },
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_exported_members(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{name} defines no __all__"
    assert len(exported) == len(set(exported)), f"{name}.__all__ has duplicates"
    assert [n for n in exported if not hasattr(module, n)] == []
    assert PUBLIC[name] <= set(exported)

    star: dict[str, object] = {}
    exec(f"from {name} import *", star)
    assert set(star) - {"__builtins__"} == set(exported)

    # Every public class or function defined here is exported.
    defined = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == name
    }
    assert sorted(defined - set(exported)) == []
