"""``linearize.compile``: torch model -> :class:`~linearize.ir.Program`.

Structure comes from a torch.fx trace of a *copy* of the model (the user's module,
its parameters, buffers and train/eval flags are never touched). Shapes come from
running the traced copy once in float64 on a seeded example batch. Each traced
node is lowered by the registered lowering of its module type, function or
method (``linearize.ops``); every node that has none is collected, and one
:class:`UnsupportedLayerError` names them all.
"""

from __future__ import annotations

import copy
import inspect
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from math import prod
from typing import NoReturn

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn

import linearize.ops  # noqa: F401  (registers the lowerings)
from linearize import passes
from linearize.errors import (
    CompileError,
    NonFiniteParameterError,
    Offender,
    TrainingModeError,
    UnsupportedLayerError,
)
from linearize.ir import Add, Affine, LinearOperator, MaxPool, Node, Program, ReLU
from linearize.ops.batchnorm import batchnorm_problem
from linearize.registry import callable_name, function_lowering, method_lowering, module_lowering
from linearize.tolerances import within

TRACE_BATCH = 3
"""Batch size of the shape-finding run; a reshape that changes it mixed examples."""

ALT_BATCH = 2
"""Batch size of a second run: a reshape whose leading size equals the batch only by
coincidence (``x.view(x.size(1), -1)`` on 3 channels) does not keep both."""

_CHECK_SEED = 20180217

# Calls that only compute sizes for a later reshape; they yield no tensor.
_SIZE_METHODS = frozenset({"size", "dim", "numel"})
_DROPOUT_TYPES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


class _Unsupported(Exception):
    """Raised by a lowering (through ``ctx.unsupported``) to reject one call."""


_POISON = object()  # value of an fx node downstream of an unsupported one
_CONST = object()  # value of a get_attr node (a parameter used as data)


def compile(  # noqa: A001  (the public name is fixed by the API contract)
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    fold_batchnorm: bool = True,
    check: bool = True,
) -> Program:
    """Compile a piecewise-linear network into an exact program of affine maps and gates.

    Args:
        model: the network; not modified (parameters, buffers and ``.training`` stay).
        input_shape: per-example input shape, e.g. (1, 28, 28) for (N, 1, 28, 28) batches:
            positive ints (Python or NumPy integers; not bool, and not floats, even 8.0).
        fold_batchnorm: merge each eval-mode batch-norm into the conv / linear before it.
        check: run the program and the (copied) model on a seeded float64 batch and
            raise :class:`CompileError` if they differ beyond the float64 tolerance.

    Returns:
        A :class:`Program` with float64 parameters on the CPU; ``program(x)`` runs in
        the dtype and on the device of ``x``.

    Raises:
        UnsupportedLayerError: naming every module / call that is not piecewise-linear.
        TrainingModeError: a BatchNorm or Dropout is in training mode.
        NonFiniteParameterError: a parameter or buffer holds NaN or inf, or an eval-mode
            batch-norm's scale or shift is not finite in float64 (e.g. running_var + eps
            is 0); all of them are named. Every parameter and buffer counts, used or not.
        ValueError: ``input_shape`` does not fit the model, or the model is not traceable
            with one tensor input and one tensor output.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    input_shape = _check_shape(input_shape)
    reject_training_mode(model)
    _reject_hooks(model)
    _reject_non_finite(model)

    work = copy.deepcopy(model).to(device="cpu", dtype=torch.float64)
    gm = _trace(work)
    example = torch.rand(
        (TRACE_BATCH, *input_shape),
        dtype=torch.float64,
        generator=torch.Generator().manual_seed(_CHECK_SEED),
    )
    try:
        shapes = _shapes(gm, example)
    except Exception as e:  # noqa: BLE001  (torch raises many types for a shape mismatch)
        raise ValueError(
            f"input_shape {input_shape} does not fit {type(model).__name__}: running it on a "
            f"batch of shape {tuple(example.shape)} failed with {type(e).__name__}: {e}"
        ) from e
    try:
        alt_batch = {n: s[0] for n, s in _shapes(gm, example[:ALT_BATCH].clone()).items() if s}
    except Exception:  # noqa: BLE001  (a model that runs at one batch size but not another)
        alt_batch = {}  # then every reshape is taken to mix examples

    lowering = _Lowering(gm, input_shape, shapes, alt_batch)
    program = lowering.run(source=type(model).__name__)
    program.lint()
    if fold_batchnorm:
        program = passes.fold_batchnorm(program)
        program.lint()
    if check:
        # against the model itself, not its trace: tracing does not see aliasing through
        # in-place updates (``b = a; a += x`` traces as ``a = a + x``)
        with torch.no_grad():
            want = work(example.clone())
            got = program(example.clone())
        if got.shape != want.shape or not bool(within(got, want).all()):
            err = (got - want).abs().max().item() if got.shape == want.shape else float("nan")
            raise CompileError(
                f"compiled program disagrees with {type(model).__name__} on the check batch "
                f"(max abs error {err:.3e}). Either the model updates a tensor in place that "
                f"it reads again through another name (e.g. b = a; a += x), which tracing "
                f"does not see, or this is a compiler bug: please report it with the model "
                f"definition.\n{program.summary()}"
            )
    return program


# --------------------------------------------------------------------------- checks


def _check_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """``input_shape`` as a tuple of Python ints; ValueError unless it is a non-empty
    sequence of positive integers (Python or NumPy, not bool; an integral float such as
    8.0 is refused too, since a float shape is more often a mistake than a size)."""
    expected = ("input_shape must be a non-empty sequence of positive ints (Python or NumPy "
                f"integers, not bool), got {input_shape!r}")
    if isinstance(input_shape, (str, bytes)):
        raise ValueError(expected)
    try:
        entries = list(input_shape)
    except TypeError as e:
        raise ValueError(expected) from e
    if not entries:
        raise ValueError(expected)
    for i, s in enumerate(entries):
        if not isinstance(s, numbers.Integral) or isinstance(s, (bool, np.bool_)):
            raise ValueError(f"{expected}: entry {i} is {s!r} ({type(s).__name__})")
        if s <= 0:
            raise ValueError(f"{expected}: entry {i} is {s!r}")
    return tuple(int(s) for s in entries)


def reject_training_mode(model: nn.Module) -> None:
    """Raise :class:`TrainingModeError` listing every BatchNorm (and Dropout with p > 0)
    of ``model`` in training mode: such a network is not a fixed piecewise-linear map."""
    offenders = [
        Offender(path, type(m).__name__)
        for path, m in model.named_modules()
        if m.training
        and (
            isinstance(m, nn.modules.batchnorm._BatchNorm)
            or (isinstance(m, _DROPOUT_TYPES) and m.p > 0)
        )
    ]
    if offenders:
        raise TrainingModeError(offenders)


def _reject_non_finite(model: nn.Module) -> None:
    offenders: list[Offender] = []
    seen: set[int] = set()
    for path, m in model.named_modules():
        own = [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]
        clean = True
        for name, t in own:
            if t is None or id(t) in seen:
                continue
            seen.add(id(t))
            problem = _non_finite(t)
            if problem:
                clean = False
                offenders.append(Offender(f"{path}.{name}" if path else name, "", problem))
        if (clean and isinstance(m, nn.modules.batchnorm._BatchNorm)
                and m.running_mean is not None and m.running_var is not None):
            problem = batchnorm_problem(m)
            if problem:
                offenders.append(Offender(path, type(m).__name__, problem))
    if offenders:
        raise NonFiniteParameterError(type(model).__name__, offenders)


def _non_finite(t: Tensor) -> str:
    """'' if every entry of t is finite, else e.g. 'holds NaN (1 of 16 entries)'."""
    if not (t.is_floating_point() or t.is_complex()):
        return ""
    t = t.detach()
    nan, inf = int(t.isnan().sum()), int(t.isinf().sum())
    if not nan and not inf:
        return ""
    what = " and ".join(w for w, n in (("NaN", nan), ("inf", inf)) if n)
    return f"holds {what} ({nan + inf} of {t.numel()} entries)"


def _reject_hooks(model: nn.Module) -> None:
    hooked = [
        Offender(path, type(m).__name__, "has forward hooks, which tracing would ignore")
        for path, m in model.named_modules()
        if m._forward_hooks or m._forward_pre_hooks
    ]
    if hooked:
        raise UnsupportedLayerError(hooked)


# --------------------------------------------------------------------------- tracing


class _Tracer(fx.Tracer):
    """Leaves: modules with a registered lowering and torch.nn's own modules (which then
    fail lowering if unsupported). Custom modules are traced through."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if module_lowering(m) is not None:
            return True
        return super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule:
    tracer = _Tracer()
    try:
        graph = tracer.trace(model)
    except (fx.proxy.TraceError, RuntimeError, TypeError) as e:
        # TraceError: a branch on tensor data; RuntimeError / TypeError: len(x), int(x),
        # x.numpy() and the like, which need a concrete tensor
        path, mtype = next(reversed(tracer.module_stack.values()), ("", type(model)))
        kind = getattr(mtype, "__name__", str(mtype))
        reason = ("data-dependent control flow" if isinstance(e, fx.proxy.TraceError)
                  else "uses the value of a tensor as a Python object")
        raise UnsupportedLayerError(
            [Offender(path, kind, reason)],
            detail=f"(torch.fx: {e})",
        ) from e
    return fx.GraphModule(model, graph)


class _ShapeRecorder(fx.Interpreter):
    """Runs the traced model and keeps the shape of every tensor-valued node.

    Used instead of torch.fx's ShapeProp, which prints a traceback to stderr before
    re-raising any error (a wrong ``input_shape`` is an ordinary user error here) and
    keeps its results as ad-hoc node metadata.
    """

    def __init__(self, gm: fx.GraphModule):
        super().__init__(gm)
        self.extra_traceback = False  # the error is the model's, not the interpreter's
        self.shapes: dict[fx.Node, torch.Size] = {}

    def run_node(self, n: fx.Node):
        result = super().run_node(n)
        if isinstance(result, Tensor):
            self.shapes[n] = result.shape
        return result


def _shapes(gm: fx.GraphModule, example: Tensor) -> dict[fx.Node, torch.Size]:
    """Shape (N, ...) of every tensor the traced model computes on ``example``; nodes that
    yield no tensor (sizes, tuples) are absent. Raises what the model raises."""
    run = _ShapeRecorder(gm)
    with torch.no_grad():
        run.run(example)
    return run.shapes


def _writes_first_argument(n: fx.Node, gm: fx.GraphModule) -> bool:
    """Is this an in-place call that overwrites its first argument (``x.relu_()``,
    ``F.relu(x, inplace=True)``, ``nn.ReLU(inplace=True)``)?"""
    if not n.args or not isinstance(n.args[0], fx.Node):
        return False
    if n.op == "call_module":
        return getattr(gm.get_submodule(n.target), "inplace", False) is True
    name = n.target if n.op == "call_method" else getattr(n.target, "__name__", "")
    if name in ("iadd", "__iadd__") or (name.endswith("_") and not name.endswith("__")):
        return True
    try:
        bound = inspect.signature(n.target).bind(*n.args, **n.kwargs)
    except (TypeError, ValueError):  # a method name, or a builtin without a signature
        return False
    return bound.arguments.get("inplace") is True


# --------------------------------------------------------------------------- lowering


@dataclass(frozen=True, eq=False)
class _Unlowered(Node):
    """Stands in for a traced tensor that could not be lowered, so that the nodes after it
    are still lowered and every offender is reported. Never part of a returned program."""

    kind = "unlowered"


class _Lowering:
    """Walks the traced graph and emits IR nodes; the ``ctx`` handed to every lowering,
    implementing :class:`~linearize.registry.LoweringContext` (its "ctx interface"
    section below)."""

    def __init__(self, gm: fx.GraphModule, input_shape: tuple[int, ...],
                 shapes: dict[fx.Node, torch.Size], alt_batch: dict[fx.Node, int]):
        self.gm = gm
        self.input_shape = input_shape
        self.shapes = shapes  # (TRACE_BATCH, ...) of each tensor-valued traced node
        self.alt_batch = alt_batch  # leading size of each at batch ALT_BATCH
        self.nodes: list[Node] = []
        self.env: dict[fx.Node, object] = {}
        self.offenders: list[Offender] = []
        self._fx: fx.Node | None = None
        self._path = ""

    # -- the ctx interface -------------------------------------------------------------

    def shape(self, value: int) -> tuple[int, ...]:
        return self.input_shape if value == 0 else self.nodes[value - 1].out_shape

    @property
    def out_shape(self) -> tuple[int, ...]:
        return tuple(self.shapes[self._fx][1:])

    def is_value(self, arg: object) -> bool:
        return isinstance(arg, fx.Node) and isinstance(self.env.get(arg), int)

    def value(self, arg: object) -> int:
        if not self.is_value(arg):
            self.unsupported("an argument that is not a tensor computed from the input")
        return self.env[arg]

    @staticmethod
    def param(t: Tensor) -> Tensor:
        return t.detach().to(device="cpu", dtype=torch.float64).clone()

    def unsupported(self, reason: str) -> NoReturn:
        raise _Unsupported(reason)

    def require_batch_preserved(self) -> None:
        meta = self.shapes[self._fx]
        n_in = prod(self.shape(self.value(self._fx.args[0])))
        kept = meta[0] == TRACE_BATCH and self.alt_batch.get(self._fx) == ALT_BATCH
        if not kept or prod(meta[1:]) != n_in:
            self.unsupported(f"reshape to {tuple(meta)} mixes examples of the batch")

    def _emit(self, node: Node) -> int:
        self.nodes.append(node)
        return len(self.nodes)

    def affine(self, x: int, op: LinearOperator, bias: Tensor | None) -> int:
        return self._emit(Affine(self._path, (x,), op.in_shape, op.out_shape, op, bias))

    def relu(self, x: int, negative_slope: float) -> int:
        s = self.shape(x)
        return self._emit(ReLU(self._path, (x,), s, s, negative_slope))

    def maxpool(self, x: int, window: Tensor) -> int:
        return self._emit(MaxPool(self._path, (x,), self.shape(x), self.out_shape, window))

    def add(self, a: int, b: int) -> int:
        s = self.shape(a)
        return self._emit(Add(self._path, (a, b), s, s))

    # -- the walk ----------------------------------------------------------------------

    def run(self, source: str) -> Program:
        output = None
        for n in self.gm.graph.nodes:
            self._fx = n
            self._path = self._module_path(n)
            if n.op == "placeholder":
                self.env[n] = 0 if not self.env else self._offend(n, "a second input")
            elif n.op == "get_attr":
                self.env[n] = _CONST
            elif n.op == "output":
                output = self._output(n)
            else:
                self.env[n] = self._lower(n)
                if self.is_value(n) and _writes_first_argument(n, self.gm):
                    self.env[n.args[0]] = self.env[n]  # later readers of x see the update
        if self.offenders:
            raise UnsupportedLayerError(self.offenders)
        return Program(self.input_shape, tuple(self.nodes), output, source)

    def _module_path(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return str(n.target)
        stack = n.meta.get("nn_module_stack") or {}
        return next(reversed(stack.values()))[0] if stack else ""

    def _kind(self, n: fx.Node) -> str:
        if n.op == "call_module":
            return type(self.gm.get_submodule(n.target)).__name__
        if n.op == "call_method":
            return f"Tensor.{n.target}"
        if n.op == "output":
            return "return"
        return callable_name(n.target)

    def _offend(self, n: fx.Node, reason: str = "") -> object:
        self.offenders.append(Offender(self._path, self._kind(n), reason))
        traced = self.shapes.get(n)
        if traced is not None and len(traced) > 1 and traced[0] == TRACE_BATCH:
            shape = tuple(traced[1:])
            return self._emit(_Unlowered(self._path, (), shape, shape))
        return _POISON

    def _output(self, n: fx.Node) -> int | None:
        (out,) = n.args
        if self.offenders:
            return None
        if not self.is_value(out):
            self._offend(n, "the model must return one tensor")
            return None
        return self.env[out]

    def _lower(self, n: fx.Node) -> object:
        deps = n.all_input_nodes
        if any(self.env.get(d) is _POISON for d in deps):
            return _POISON
        if n not in self.shapes:
            return self._size_computation(n)
        try:
            if n.op == "call_module":
                module = self.gm.get_submodule(n.target)
                fn = module_lowering(module)
                if fn is None:
                    return self._offend(n)
                if len(n.args) != 1 or n.kwargs:
                    self.unsupported("called with more than one argument")
                return fn(self, module, self.value(n.args[0]))
            if n.op == "call_function":
                fn = function_lowering(n.target)
            else:
                fn = method_lowering(n.target)
            if fn is None:
                return self._offend(n)
            return fn(self, *n.args, **n.kwargs)
        except _Unsupported as e:
            return self._offend(n, str(e))
        except TypeError as e:  # a call signature the lowering does not take
            return self._offend(n, f"unsupported arguments ({e})")

    def _size_computation(self, n: fx.Node) -> object:
        """A node yielding no tensor: fine if it only reads sizes for a reshape."""
        if n.op == "call_method" and n.target in _SIZE_METHODS:
            return None
        if n.op == "call_function" and n.target is getattr and n.args[1] == "shape":
            return None
        if all(not self.is_value(d) and self.env.get(d) is not _CONST for d in n.all_input_nodes):
            return None  # arithmetic on sizes
        return self._offend(n, "a non-tensor result computed from tensor data")
