"""The layering docs/architecture.md describes, held by the code: the pure modules take bytes
and values and return values. They import no event loop, no HTTP library, no clock and nothing
that reaches the file system or the network, and none of them imports the modules that do I/O."""

from __future__ import annotations

import ast

import pytest

from conftest import ROOT

PACKAGE = ROOT / "src" / "tallygate"

# Pure: framing, coding, dialects, estimates, counting arithmetic, prices, policies.
PURE = [
    "checks", "compression", "cors", "dialects", "errors", "framing", "headers", "metering",
    "prompt", "routing", "tenants", "usage",
]  # fmt: skip
# What a pure module must not import (at run time: type-checking imports are not imports).
IMPURE_LIBRARIES = {
    "asyncio", "aiohttp", "socket", "ssl", "time", "os", "pathlib", "tempfile", "shutil",
    "subprocess", "threading", "signal", "uvloop", "urllib.request", "http",
}  # fmt: skip
# tallygate's own modules that do I/O or hold the event loop.
SHELL = {"relay", "server", "workers", "connection", "accesslog", "cli", "demo", "simulator"}


def runtime_imports(module: str) -> set[str]:
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    found: set[str] = set()
    for node in tree.body:  # module level only: that is where the imports are
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for inner in ast.walk(node):
            if isinstance(inner, ast.Import):
                found.update(alias.name for alias in inner.names)
            elif isinstance(inner, ast.ImportFrom):
                prefix = "." * inner.level
                found.add(prefix + (inner.module or ""))
    return found


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_does_no_io(module: str) -> None:
    imports = runtime_imports(module)
    libraries = {name for name in imports if not name.startswith(".")}
    bad = {name for name in libraries if name in IMPURE_LIBRARIES or name.split(".")[0] in
           IMPURE_LIBRARIES}  # fmt: skip
    assert not bad, f"{module} imports {sorted(bad)}"
    own = {name.lstrip(".") for name in imports if name.startswith(".")}
    assert not own & SHELL, f"{module} imports the shell: {sorted(own & SHELL)}"


def test_the_pure_list_is_every_module_but_the_shell_and_its_helpers() -> None:
    modules = {path.stem for path in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    # config (reads the file), pricing (reads its table), tokens (tiktoken's cache files) and
    # metrics (Prometheus' registry) are helpers with one edge of I/O each, kept at their edge.
    helpers = {"config", "pricing", "tokens", "metrics"}
    assert modules == set(PURE) | SHELL | helpers


def test_no_import_circle_between_the_server_and_its_workers() -> None:
    """workers.py runs above server.py (`run` chooses one process or several): server.py never
    imports it back, at module level or inside a function."""
    tree = ast.parse((PACKAGE / "server.py").read_text())
    imported = {
        node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level
    }
    assert "workers" not in imported
