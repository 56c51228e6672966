"""The lowering registries and the context every lowering receives.

``LoweringContext`` is the whole interface a lowering may use: the compiler's walk
implements each of its members with the same parameters, and the lowerings in
``linearize/ops`` use nothing else and say so in their signatures.
"""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest

import linearize
from linearize.compiler import _Lowering
from linearize.registry import (
    FUNCTION_LOWERINGS,
    METHOD_LOWERINGS,
    MODULE_LOWERINGS,
    LoweringContext,
)

OPS = pathlib.Path(linearize.__file__).parent / "ops"
MEMBERS = sorted(n for n in vars(LoweringContext) if not n.startswith("_"))


def _parameters(f) -> list[str]:
    return [p.name for p in inspect.signature(f).parameters.values() if p.name != "self"]


@pytest.mark.parametrize("name", MEMBERS)
def test_compiler_implements_the_context(name):
    want = inspect.getattr_static(LoweringContext, name)
    got = inspect.getattr_static(_Lowering, name, None)
    assert got is not None, f"_Lowering has no {name}"
    if isinstance(want, property):
        assert isinstance(got, property)
        return
    got = got.__func__ if isinstance(got, staticmethod) else got
    assert _parameters(got) == _parameters(want)


def test_lowerings_use_only_the_context():
    used = set()
    for path in OPS.glob("*.py"):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name) \
                    and n.value.id == "ctx":
                used.add((path.name, n.attr))
    assert used, "no ctx use found: the scan is broken"
    assert {attr for _, attr in used} <= set(MEMBERS), sorted(
        (f, a) for f, a in used if a not in MEMBERS)


def test_every_registered_lowering_declares_its_context():
    regs = [*MODULE_LOWERINGS.values(), *FUNCTION_LOWERINGS.values(), *METHOD_LOWERINGS.values()]
    untyped = set()
    for reg in regs:
        first = next(iter(inspect.signature(reg.lowering).parameters.values()))
        if first.annotation not in (LoweringContext, "LoweringContext"):
            untyped.add(reg.lowering.__qualname__)
    assert not untyped
