"""Exceptions raised by the compiler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from linearize.registry import supported


@dataclass(frozen=True)
class Offender:
    """One thing the compiler could not lower.

    Attributes:
        path: dotted module path in the user's model ('' for the model itself).
        kind: the module's type name, or the function / method called.
        reason: optional detail (e.g. "padding_mode='reflect'").
    """

    path: str
    kind: str
    reason: str = ""

    def __str__(self) -> str:
        where = repr(self.path) if self.path else "'<model>'"
        detail = f": {self.reason}" if self.reason else ""
        return f"{where} ({self.kind}{detail})"


class UnsupportedLayerError(TypeError):
    """The model uses something that is not a piecewise-linear layer this compiler knows.

    ``offenders`` lists every offending module or call, in graph order; the message
    names each by its module path and type and says what is supported (generated from
    the lowering registries by :func:`linearize.registry.supported`).
    """

    noun = ("module", "modules")
    summary = "Only piecewise-linear layers are supported."

    def __init__(self, offenders: Sequence[Offender], detail: str = ""):
        self.offenders = tuple(offenders)
        n = len(self.offenders)
        listed = ", ".join(str(o) for o in self.offenders)
        noun = self.noun[0] if n == 1 else self.noun[1]
        msg = f"Cannot linearize {n} {noun}: {listed}. {self.summary}"
        if detail:
            msg += f" {detail}"
        super().__init__(f"{msg} {supported()}" if type(self) is UnsupportedLayerError else msg)


class TrainingModeError(UnsupportedLayerError):
    """A layer whose eval-mode map is affine is in training mode (BatchNorm, Dropout).

    In training mode batch-norm normalises with the statistics of the batch and
    dropout zeroes random units: neither is a fixed piecewise-linear map.
    """

    noun = ("module in training mode", "modules in training mode")
    summary = (
        "In training mode batch-norm uses batch statistics and dropout is random, so the "
        "network is not a fixed piecewise-linear function; call model.eval() first."
    )


class NonFiniteParameterError(ValueError):
    """A parameter, buffer or derived batch-norm scale / shift of the model is NaN or infinite.

    ``offenders`` lists every one, in module order: for a tensor, ``path`` is its
    state-dict name (``'0.weight'``) and ``kind`` is empty; for a derived value,
    ``path`` and ``kind`` name the module (``'1'``, ``'BatchNorm1d'``).
    """

    def __init__(self, model: str, offenders: Sequence[Offender]):
        self.offenders = tuple(offenders)
        n = len(self.offenders)
        noun = "parameter or buffer is" if n == 1 else "parameters or buffers are"
        listed = "; ".join(_nonfinite_item(o) for o in self.offenders)
        super().__init__(
            f"Cannot linearize {model}: {n} {noun} not finite: {listed}. A network with NaN "
            f"or infinite parameters is not a finite piecewise-linear function."
        )


def _nonfinite_item(o: Offender) -> str:
    where = repr(o.path) if o.path else "'<model>'"
    return f"{where} ({o.kind}): {o.reason}" if o.kind else f"{where} {o.reason}"


class CompileError(RuntimeError):
    """The compiled program disagreed with the model on the check input (a compiler bug)."""


class LintError(ValueError):
    """A program is malformed (shapes do not chain, nodes out of order, mixed dtypes)."""
