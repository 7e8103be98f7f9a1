"""The layering docs/architecture.md describes, held by the code.

- `core/` is pure: it takes bytes and values and returns values. It imports no event loop, no
  HTTP library, no clock and nothing that reaches the file system or the network, and nothing
  of tallygate outside `core/`.
- `policy/` decides, never awaits: the same libraries are off limits; it reads `core/` and the
  configuration's shape (`config.schema`), nothing else of tallygate.
- Nothing a finished request feeds (`observe/`, and the ledger when it lands) and no policy
  imports the proxy (`proxy/`), at module level or inside a function.
- `proxy/server.py` never imports the process supervisor (`runtime/workers.py`) back.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "src" / "tallygate"
PACKAGES = ("config", "core", "dev", "ledger", "observe", "policy", "proxy", "runtime")
PURE = ("core", "policy")
# What a pure module must not import (at run time: type-checking imports are not imports).
IMPURE_LIBRARIES = {
    "asyncio", "aiohttp", "socket", "ssl", "time", "os", "pathlib", "tempfile", "shutil", "io",
    "subprocess", "threading", "signal", "uvloop", "urllib.request", "http", "importlib",
    "yaml", "prometheus_client",
}  # fmt: skip
# Which of tallygate's own modules each pure package may import.
ALLOWED_OWN = {
    "core": ("tallygate.core", "tallygate.compat"),
    "policy": ("tallygate.core", "tallygate.policy", "tallygate.config.schema", "tallygate.compat"),
}
NEVER_IMPORT_THE_PROXY = ("observe", "policy", "ledger")


def modules(package: str) -> list[Path]:
    return sorted((PACKAGE / package).rglob("*.py"))


def module_name(path: Path) -> str:
    return "tallygate." + ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def imports(path: Path, *, runtime_only: bool = True, top_level_only: bool = True) -> set[str]:
    """Absolute names `path` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = module_name(path).rsplit(".", 1)[0] if path.is_relative_to(PACKAGE) else ""
    found: set[str] = set()
    functions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)

    def visit(node: ast.AST) -> None:
        if runtime_only and isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if top_level_only and isinstance(node, functions):
            return  # imported when called, not when the module loads
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0]
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


@pytest.mark.parametrize(
    "path", [p for pkg in PURE for p in modules(pkg)], ids=lambda p: module_name(p)
)
def test_a_pure_module_does_no_io_and_stays_in_its_layer(path: Path) -> None:
    package = path.relative_to(PACKAGE).parts[0]
    found = imports(path)
    bad = {n for n in found if n.split(".")[0] in IMPURE_LIBRARIES or n in IMPURE_LIBRARIES}
    assert not bad, f"{module_name(path)} imports {sorted(bad)}"
    own = {n for n in found if n.startswith("tallygate.") or n == "tallygate"}
    outside = {
        n for n in own
        if not any(n == a or n.startswith(a + ".") for a in ALLOWED_OWN[package])
        and not any(a.startswith(n + ".") for a in ALLOWED_OWN[package])  # `from pkg import mod`
    }  # fmt: skip
    assert not outside, f"{module_name(path)} imports {sorted(outside)} from outside its layer"


@pytest.mark.parametrize("package", NEVER_IMPORT_THE_PROXY)
def test_sinks_and_policies_never_import_the_proxy(package: str) -> None:
    for path in modules(package):
        found = imports(path, runtime_only=False, top_level_only=False)
        proxy = {n for n in found if n.startswith("tallygate.proxy")}
        assert not proxy, f"{module_name(path)} imports {sorted(proxy)}"


def test_every_module_lives_in_a_package_that_names_its_layer() -> None:
    loose = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__", "cli", "compat"}
    assert not loose, f"modules outside the layered packages: {sorted(loose)}"
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == set(PACKAGES)


def test_no_import_circle_between_the_server_and_its_workers() -> None:
    """runtime/workers.py runs above proxy/server.py (`run` chooses one process or several):
    the server never imports it back, at module level or inside a function."""
    found = imports(PACKAGE / "proxy" / "server.py", runtime_only=False, top_level_only=False)
    assert not {n for n in found if n.startswith("tallygate.runtime.workers")}


def test_the_layer_rules_catch_a_violation(tmp_path: Path) -> None:
    """The checks above are not vacuous: an impure import is seen, at any depth."""
    sample = tmp_path / "sample.py"
    sample.write_text("import os\ndef f():\n    from tallygate.proxy import relay\n")
    assert "os" in imports(sample)
    assert "tallygate.proxy.relay" in imports(sample, top_level_only=False)
    assert "tallygate.proxy.relay" not in imports(sample)


def test_the_compat_module_loads_no_library() -> None:
    """Pure modules use tallygate/compat.py for tiktoken's private parts: it may not bring
    aiohttp, asyncio or tiktoken in with it."""
    found = imports(PACKAGE / "compat.py")
    assert not {n for n in found if n.split(".")[0] in IMPURE_LIBRARIES | {"tiktoken"}}


def test_untested_library_versions_are_warned_about() -> None:
    from tallygate.compat import TESTED, untested_versions

    def at(versions: dict[str, str]) -> list[str]:
        return untested_versions(lambda name: versions[name])

    tested = {name: low + ".0" for name, (low, _) in TESTED.items()}
    assert at(tested) == []
    warnings = at({**tested, "aiohttp": "3.15.0"})
    assert len(warnings) == 1 and warnings[0].startswith("aiohttp 3.15.0 is installed")
    assert len(at({"aiohttp": "3.9.5", "tiktoken": "1.0.0rc1"})) == 2
    # The pins in pyproject.toml are the tested ranges.
    pyproject = (ROOT / "pyproject.toml").read_text()
    for name, (low, high) in TESTED.items():
        assert f'"{name}>={low},<{high}"' in pyproject, name


def test_the_installed_libraries_are_the_tested_ones() -> None:
    from tallygate.compat import untested_versions

    assert untested_versions() == []
