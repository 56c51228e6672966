"""Lowering registries: module type -> lowering, function -> lowering, method name -> lowering.

A new layer kind is one function in one file under ``linearize/ops``, registered
here with a decorator. Module lowerings are looked up along the type's MRO, so a
subclass of ``nn.Conv2d`` is lowered as a Conv2d -- unless it overrides
``forward``, in which case it is traced through like any custom module.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

ModuleLowering = Callable  # (ctx, module, x: int) -> int
FunctionLowering = Callable  # (ctx, *args, **kwargs) -> int | None

MODULE_LOWERINGS: dict[type[nn.Module], ModuleLowering] = {}
FUNCTION_LOWERINGS: dict[Callable, FunctionLowering] = {}
METHOD_LOWERINGS: dict[str, FunctionLowering] = {}


def register_module(*types: type[nn.Module]):
    """Register ``fn(ctx, module, x) -> value`` as the lowering of these module types."""

    def deco(fn):
        for t in types:
            MODULE_LOWERINGS[t] = fn
        return fn

    return deco


def register_function(*functions: Callable):
    """Register ``fn(ctx, *args, **kwargs) -> value`` for calls of these functions."""

    def deco(fn):
        for f in functions:
            FUNCTION_LOWERINGS[f] = fn
        return fn

    return deco


def register_method(*names: str):
    """Register ``fn(ctx, self, *args, **kwargs) -> value`` for ``tensor.<name>(...)``."""

    def deco(fn):
        for n in names:
            METHOD_LOWERINGS[n] = fn
        return fn

    return deco


def module_lowering(module: nn.Module) -> ModuleLowering | None:
    """The lowering for ``type(module)``, found along its MRO; None if there is none.

    A registered base type only applies when the subclass keeps its ``forward``.
    """
    for t in type(module).__mro__:
        fn = MODULE_LOWERINGS.get(t)
        if fn is not None:
            return fn if type(module).forward is t.forward else None
    return None
