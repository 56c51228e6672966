"""Lowering registries: module type -> lowering, function -> lowering, method name -> lowering.

A new layer kind is one function in one file under ``linearize/ops``, registered
here with a decorator that also says, in a few words, under which condition the
lowering applies; the "Supported: ..." sentence of :class:`UnsupportedLayerError`
is generated from these tables (:func:`supported`). Module lowerings are looked
up along the type's MRO, so a subclass of ``nn.Conv2d`` is lowered as a Conv2d --
unless it overrides ``forward``, in which case it is traced through like any
custom module.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

ModuleLowering = Callable  # (ctx, module, x: int) -> int
FunctionLowering = Callable  # (ctx, *args, **kwargs) -> int


@dataclass(frozen=True)
class Registration:
    """One registered lowering.

    Attributes:
        lowering: the function that lowers the call.
        condition: when the lowering applies, for the "Supported: ..." sentence, e.g.
            ``"padding_mode='zeros'"``; empty if it always does.
    """

    lowering: Callable
    condition: str = ""


MODULE_LOWERINGS: dict[type[nn.Module], Registration] = {}
FUNCTION_LOWERINGS: dict[Callable, Registration] = {}
METHOD_LOWERINGS: dict[str, Registration] = {}


def register_module(*types: type[nn.Module], condition: str = ""):
    """Register ``fn(ctx, module, x) -> value`` as the lowering of these module types."""

    def deco(fn):
        for t in types:
            MODULE_LOWERINGS[t] = Registration(fn, condition)
        return fn

    return deco


def register_function(*functions: Callable, condition: str = ""):
    """Register ``fn(ctx, *args, **kwargs) -> value`` for calls of these functions."""

    def deco(fn):
        for f in functions:
            FUNCTION_LOWERINGS[f] = Registration(fn, condition)
        return fn

    return deco


def register_method(*names: str, condition: str = ""):
    """Register ``fn(ctx, self, *args, **kwargs) -> value`` for ``tensor.<name>(...)``."""

    def deco(fn):
        for n in names:
            METHOD_LOWERINGS[n] = Registration(fn, condition)
        return fn

    return deco


def module_lowering(module: nn.Module) -> ModuleLowering | None:
    """The lowering for ``type(module)``, found along its MRO; None if there is none.

    A registered base type only applies when the subclass keeps its ``forward``.
    """
    for t in type(module).__mro__:
        reg = MODULE_LOWERINGS.get(t)
        if reg is not None:
            return reg.lowering if type(module).forward is t.forward else None
    return None


def function_lowering(f: Callable) -> FunctionLowering | None:
    """The lowering for calls of ``f``; None if there is none."""
    reg = FUNCTION_LOWERINGS.get(f)
    return None if reg is None else reg.lowering


def method_lowering(name: str) -> FunctionLowering | None:
    """The lowering for ``tensor.<name>(...)``; None if there is none."""
    reg = METHOD_LOWERINGS.get(name)
    return None if reg is None else reg.lowering


def callable_name(f: Callable) -> str:
    """How messages name a function: ``F.relu``, ``torch.flatten``, ``operator.add``."""
    name = getattr(f, "__name__", repr(f))
    for prefix, mod in (("F", nn.functional), ("torch", torch), ("operator", operator)):
        if getattr(mod, name, None) is f:
            return f"{prefix}.{name}"
    return getattr(f, "__module__", "") + "." + name if getattr(f, "__module__", None) else name


def supported() -> str:
    """The "Supported: ..." sentence, generated from the registries.

    Names registered together for one lowering under one condition form one entry
    (``Conv1d/Conv2d (padding_mode='zeros')``); entries and the names inside them are
    sorted. Calls (functions and ``Tensor`` methods) are named as in error messages.
    """
    import linearize.ops  # noqa: F401  (registers the lowerings; imported late: ops import us)

    def entries(named: list[tuple[str, Registration]]) -> str:
        groups: dict[tuple[Callable, str], list[str]] = {}
        for name, reg in named:
            groups.setdefault((reg.lowering, reg.condition), []).append(name)
        items = []
        for (_, condition), names in groups.items():
            names = sorted(names, key=str.casefold)
            items.append("/".join(names) + (f" ({condition})" if condition else ""))
        return "; ".join(sorted(items, key=str.casefold))

    modules = entries([(t.__name__, r) for t, r in MODULE_LOWERINGS.items()])
    calls = entries([(callable_name(f), r) for f, r in FUNCTION_LOWERINGS.items()]
                    + [(f"Tensor.{n}", r) for n, r in METHOD_LOWERINGS.items()])
    return f"Supported modules: {modules}. Supported calls: {calls}."
