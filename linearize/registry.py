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
from typing import TYPE_CHECKING, NoReturn, Protocol

import torch
from torch import Tensor, nn

if TYPE_CHECKING:  # ir imports errors, which imports this module
    from linearize.ir import LinearOperator


class LoweringContext(Protocol):
    """What a lowering may ask of the compiler while it lowers one traced call.

    Values are ints naming program values: 0 is the input, ``k`` the output of IR
    node ``k - 1``. Shapes are per example (no batch dimension). The compiler's
    walk over the traced graph (``linearize.compiler._Lowering``) implements it.
    """

    @property
    def out_shape(self) -> tuple[int, ...]:
        """Per-example shape of the call's result, as torch computed it when tracing."""
        ...

    def shape(self, value: int) -> tuple[int, ...]:
        """Per-example shape of a program value."""
        ...

    def is_value(self, arg: object) -> bool:
        """Is this call argument a tensor computed from the input (a program value)?"""
        ...

    def value(self, arg: object) -> int:
        """The program value of a call argument; :meth:`unsupported` if it is none."""
        ...

    def param(self, t: Tensor) -> Tensor:
        """A parameter or buffer as a detached float64 CPU copy for the program."""
        ...

    def unsupported(self, reason: str) -> NoReturn:
        """Reject this call; the compiler reports it, with ``reason``, among all offenders."""
        ...

    def require_batch_preserved(self) -> None:
        """Reject this reshape unless it keeps the batch dimension (mixes no examples)."""
        ...

    def affine(self, x: int, op: LinearOperator, bias: Tensor | None) -> int:
        """Emit ``y = op(x) + bias``; bias broadcastable to ``op.out_shape``, or None."""
        ...

    def relu(self, x: int, negative_slope: float) -> int:
        """Emit a (leaky) ReLU gate on x."""
        ...

    def maxpool(self, x: int, window: Tensor) -> int:
        """Emit a max-pool gate; window int64 (prod(out_shape), K) of flat input indices,
        -1 for padding, with a real input position in every row."""
        ...

    def add(self, a: int, b: int) -> int:
        """Emit ``a + b`` for two values of the same shape."""
        ...


ModuleLowering = Callable[[LoweringContext, nn.Module, int], int]
"""``fn(ctx, module, x) -> value``."""
FunctionLowering = Callable[..., int]
"""``fn(ctx, *args, **kwargs) -> value``, the traced call's own arguments."""


@dataclass(frozen=True)
class Registration:
    """One registered lowering.

    Attributes:
        lowering: the function that lowers the call.
        condition: when the lowering applies, for the "Supported: ..." sentence, e.g.
            ``"padding_mode='zeros'"``; empty if it always does.
    """

    lowering: ModuleLowering | FunctionLowering
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
