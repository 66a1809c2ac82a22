"""The direction of imports between kizuna's packages (docs/architecture.md), checked on the source."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src" / "kizuna"

# package -> modules it must never import (prefix match)
FORBIDDEN: dict[str, tuple[str, ...]] = {
    "api": ("kizuna.proxy", "kizuna.controlplane", "kizuna.runtime", "kizuna.cli", "asyncio"),
    "protocols": ("asyncio", "uvloop", "kizuna.proxy", "kizuna.controlplane", "kizuna.api"),
    "proxyconfig": ("kizuna.api", "kizuna.proxy", "kizuna.controlplane", "kizuna.runtime", "kizuna.cli",
                    "pydantic", "yaml"),
    "proxy": ("kizuna.api", "kizuna.controlplane", "kizuna.runtime", "kizuna.cli", "pydantic", "yaml"),
    "controlplane": ("kizuna.proxy", "kizuna.runtime", "kizuna.cli"),
    "runtime": ("kizuna.cli",),
}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_only_downward(package: str) -> None:
    offenders = []
    for path in sorted((SRC / package).rglob("*.py")):
        for module in imported_modules(path):
            if any(module == bad or module.startswith(bad + ".") for bad in FORBIDDEN[package]):
                offenders.append(f"{path.relative_to(SRC)} imports {module}")
    assert offenders == []
