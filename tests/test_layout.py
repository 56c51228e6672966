"""The package layout and its import directions (ARCHITECTURE.md), read from the source
with ``ast``: a module that imports against them fails here, whether or not it runs."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# group -> the groups it may import (besides itself). Order = the arrows of ARCHITECTURE.md.
ALLOWED: dict[str, set[str]] = {
    "linearize": set(),
    "tolerances": {"linearize"},
    "geometry": {"tolerances"},
    "core": {"linearize", "tolerances", "geometry"},
    "regions": {"linearize", "tolerances", "geometry", "core"},
    "explainers": {"linearize", "tolerances", "geometry", "core", "regions"},
    "metrics": {"linearize", "tolerances", "geometry", "core", "regions", "explainers"},
    "fmnist": set(),
    "faces": {"linearize", "tolerances", "geometry", "core", "regions", "explainers", "metrics",
              "fmnist", "package"},
    "package": {"linearize", "tolerances", "geometry", "core", "regions", "explainers",
                "metrics", "fmnist", "faces"},
}
CORE = {"engine", "configuration", "linear_maps", "constraints", "features", "parallel"}
FACES = {"cli", "plotting", "record", "loading", "comparison"}
# third-party imports confined to some groups
CONFINED = {
    "torch": {"linearize", "tolerances", "core", "regions", "explainers", "metrics", "fmnist",
              "faces", "package"},
    "captum": {"explainers"},
    "lime": {"explainers"},
}


def group_of(module: str) -> str | None:
    """'openbox.geometry.lp' -> 'geometry'; None for modules outside the two packages."""
    parts = module.split(".")
    if parts[0] == "linearize":
        return "linearize"
    if parts[0] != "openbox":
        return None
    if len(parts) == 1:
        return "package"
    head = parts[1]
    if head in CORE:
        return "core"
    if head in FACES:
        return "faces"
    if head in ALLOWED:
        return head
    raise AssertionError(f"{module}: not placed in a group of ARCHITECTURE.md; add it there")


def _is_module(name: str) -> bool:
    path = ROOT.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def modules() -> list[tuple[str, Path]]:
    out = []
    for pkg in ("linearize", "openbox"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out.append((".".join(parts), path))
    return out


def imports(module: str, path: Path) -> list[tuple[str, int]]:
    """Every module imported by the file (absolute names; relative ones resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                base = base if is_pkg else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            subs = [f"{name}.{a.name}" for a in node.names if _is_module(f"{name}.{a.name}")]
            # "from openbox import fmnist" imports openbox.fmnist, not the package's names
            found += [(sub, node.lineno) for sub in subs]
            if len(subs) < len(node.names):
                found.append((name, node.lineno))
    return found


def violations() -> list[str]:
    bad = []
    for module, path in modules():
        g = group_of(module)
        for name, line in imports(module, path):
            top = name.split(".")[0]
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}"
            if top == "experiments":
                bad.append(f"{where}: imports experiments (nothing imports experiments)")
            if top in CONFINED and g not in CONFINED[top]:
                bad.append(f"{where}: {g} may not import {top}")
            target = group_of(name) if top in ("openbox", "linearize") else None
            if target is None or target == g:
                continue
            if target not in ALLOWED[g]:
                bad.append(f"{where}: {module} ({g}) imports {name} ({target})")
    return bad


def test_imports_follow_the_architecture():
    assert violations() == []


def test_every_module_has_a_group_and_the_checker_sees_imports():
    mods = dict(modules())
    assert "openbox.geometry.polytope" in mods and "openbox.fmnist.data" in mods
    engine = [n for n, _ in imports("openbox.engine", mods["openbox.engine"])]
    assert "linearize" in engine and "openbox.geometry" in engine
    for module, _ in modules():
        group_of(module)


@pytest.mark.parametrize(
    "module, source, expected",
    [
        ("openbox.engine", "from openbox.fmnist import data\n", "core"),
        ("openbox.geometry.lp", "import torch\n", "geometry may not import torch"),
        ("openbox.fmnist.data", "from openbox import engine\n", "fmnist"),
        ("linearize.ir", "import openbox.tolerances\n", "linearize"),
        ("openbox.regions.segment", "from openbox import cli\n", "regions"),
        ("openbox.constraints", "import captum\n", "core may not import captum"),
    ],
)
def test_the_checker_catches_a_wrong_import(tmp_path, monkeypatch, module, source, expected):
    fake = tmp_path / "fake.py"
    fake.write_text(source)
    real = modules()
    monkeypatch.setattr(__import__(__name__), "modules", lambda: [(module, fake)])
    found = violations()
    monkeypatch.setattr(__import__(__name__), "modules", lambda: real)
    assert found and expected in found[0]
