"""The explainer interface, its result type and the name -> class registry.

>>> from openbox import explainers
>>> explainers.names()                     # ("openbox", "openbox-ig", "lime", ...)
>>> ex = explainers.get("saliency", model, input_shape=(1, 28, 28))
>>> r = ex.explain(x, target)              # x (B, 1, 28, 28), target (B,) int64
>>> r.attribution, r.probability, r.seconds

Every method is a subclass of :class:`Explainer` registered under its name with
:func:`register`. A subclass implements :meth:`Explainer._attribute` on an input batch
that the base has already validated; the base times the call, checks that the result is
input-shaped and finite, and wraps it in an :class:`Attribution`.

What the base guarantees for every method:

- the user's model is never modified: each explainer works on its own deep copy, taken at
  construction (so hooks, parameter edits or wrapped activations of an adapter never reach
  the user's module, and editing the user's model afterwards does not change the explainer);
- a model with batch-norm or dropout in training mode is rejected
  (:class:`linearize.TrainingModeError`), as by the compiler: the network is then not a fixed
  function and no explanation of it is meaningful;
- inputs are checked (a tensor of shape (B, *input_shape), floating, finite) and converted
  to the explainer's dtype and device; targets are (B,) int64 in [0, C);
- an attribution that comes back NaN / Inf or mis-shaped raises
  :class:`ExplainerError` naming the method, never a silent result.

Captum and lime are imported inside their adapter modules' methods only, so
``import openbox.explainers`` works without them; using such a method without the library
raises ImportError naming the extra to install (``pip install -e ".[compare]"``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import linearize

INSTALL_HINT = 'pip install -e ".[compare]"  (or: pip install captum lime)'


class ExplainerError(RuntimeError):
    """A method failed or returned an unusable attribution (NaN / Inf, wrong shape)."""


class UnsupportedModelError(ValueError):
    """A method cannot handle a layer (or the architecture) of this model.

    The message names the method and every offending layer by its module path.
    """


def require(module: str, method: str):
    """Import an optional library for ``method``; ImportError with the install hint if absent."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(
            f"the {method!r} explainer needs the {module.split('.')[0]!r} package: "
            f"{INSTALL_HINT}"
        ) from err


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class SurrogateSamples:
    """The samples a surrogate was fitted on, for one explained input.

    Attributes:
        inputs: (N, *input_shape) the perturbed inputs in pixel space.
        model: (N,) the model's probability of the target at each.
        surrogate: (N,) the surrogate's prediction at each.
        features: (N, F) the samples in the method's interpretable features (LIME's binary
            "segment kept" vectors), or None.
        weights: (N,) the sample weights the surrogate was fitted with, or None.
    """

    inputs: Tensor
    model: Tensor
    surrogate: Tensor
    features: Tensor | None = None
    weights: Tensor | None = None


@dataclass(frozen=True, eq=False)
class Surrogate:
    """A method's local model of P(target | x') around one explained input x.

    Attributes:
        predict: maps (N, *input_shape) inputs near x to (N,) estimates of P(target | x').
            How a pixel-space input is read by the method's own model (e.g. LIME's binary
            "pixel kept" features) is said in the method's docstring.
        samples: the method's own fitted samples, or None.
    """

    predict: Callable[[Tensor], Tensor]
    samples: SurrogateSamples | None = None


@dataclass(frozen=True, eq=False)
class Attribution:
    """What one :meth:`Explainer.explain` call returns.

    Attributes:
        method: the registered name of the method.
        attribution: (B, *input_shape) finite tensor (float, on the explainer's device).
        target: (B,) int64 the explained classes.
        probability: (B,) the method's own estimate of P(target | x) from its local model
            (e.g. LIME's surrogate at x, openbox's softmax(W_x x + b_x)[target]), or None for
            methods without a local model.
        seconds: wall time of the whole call.
        surrogates: one :class:`Surrogate` per input for methods with a local model, else None.
        info: method-specific extras (e.g. LIME's surrogate R^2 ``score``), documented by the
            method.
    """

    method: str
    attribution: Tensor
    target: Tensor
    probability: Tensor | None
    seconds: float
    surrogates: tuple[Surrogate, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.attribution.shape[0]


@dataclass(frozen=True)
class Output:
    """What :meth:`Explainer._attribute` returns to the base (before timing and checks)."""

    attribution: Tensor
    probability: Tensor | None = None
    surrogates: Sequence[Surrogate] | None = None
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------- interface


class Explainer:
    """Base of every method. Subclasses set the class attributes and implement ``_attribute``.

    Args:
        model: the classifier, (B, *input_shape) -> (B, C) logits. Copied; never modified.
        input_shape: per-example input shape, e.g. (1, 28, 28).
        device: where the method runs (default: where the model's parameters are, else CPU).
        dtype: floating dtype inputs and the model copy are cast to (default: the model's
            parameter dtype, else float32; the exact methods default to float64).
        seed: seed of the method's randomness (sampling methods); :meth:`explain` may
            override it per call.
        progress: tqdm bar over inputs for methods that run one input at a time
            (None: only for batches of more than 4 inputs).
        **options: the method's own options (see the subclass docstring); an unknown one
            raises TypeError naming the method.

    Class attributes:
        name: registered name.
        stochastic: True when the result depends on ``seed``.
        batched: True when the library attributes a whole batch in one call; False when
            the base loops over inputs (with a progress bar).
        local_model: True when the method has its own estimate of P(target | x).
        default_dtype: dtype used when neither ``dtype`` nor a parameter says one.
    """

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    stochastic: ClassVar[bool] = False
    batched: ClassVar[bool] = True
    local_model: ClassVar[bool] = False
    default_dtype: ClassVar[torch.dtype | None] = None
    options: ClassVar[dict[str, Any]] = {}

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        *,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        seed: int = 0,
        progress: bool | None = None,
        **options,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{self.name}: model must be an nn.Module, got {type(model).__name__}")
        unknown = sorted(set(options) - set(self.options))
        if unknown:
            known = ", ".join(sorted(self.options)) or "none"
            raise TypeError(
                f"{self.name}: unknown option(s) {', '.join(map(repr, unknown))}; "
                f"its options are: {known} (and device, dtype, seed, progress)"
            )
        self.input_shape = _shape(input_shape)
        linearize.reject_training_mode(model)
        first = next(iter(model.parameters()), None)
        if dtype is None:
            dtype = self.default_dtype or (first.dtype if first is not None and
                                           first.dtype.is_floating_point else torch.float32)
        if not dtype.is_floating_point:
            raise ValueError(f"{self.name}: dtype must be floating, got {dtype}")
        if device is None:
            device = first.device if first is not None else torch.device("cpu")
        self.device = torch.device(device)
        self.dtype = dtype
        self.seed = _seed(seed)
        self.progress = progress
        self.config = {**self.options, **options}
        self.model = copy.deepcopy(model).to(dtype=dtype, device=self.device).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.setup()

    def setup(self) -> None:
        """Prepare the model copy (wrap layers, find the last conv, ...). Raise
        :class:`UnsupportedModelError` here for an architecture the method cannot handle."""

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({self.name!r}, input {self.input_shape}, {opts})"

    # -- the call ------------------------------------------------------------------------

    def explain(self, x: Tensor, target, *, seed: int | None = None) -> Attribution:
        """Attribute the target class of every input.

        Args:
            x: (B, *input_shape) floating inputs (converted to the explainer's dtype/device).
            target: (B,) int64 classes, or an int for all inputs.
            seed: overrides the explainer's seed for this call (sampling methods).

        Returns:
            an :class:`Attribution`; ``attribution`` is (B, *input_shape).
        """
        start = time.perf_counter()
        x = self.check_input(x)
        target = self.check_target(target, x.shape[0])
        seed = self.seed if seed is None else _seed(seed)
        if self.batched:
            out = self._attribute(x, target, seed)
        else:
            out = self._one_by_one(x, target, seed)
        attribution = self._check_output(out.attribution, x)
        probability = None
        if out.probability is not None:
            probability = torch.as_tensor(out.probability).detach().reshape(-1)
            if probability.shape != (x.shape[0],) or not bool(torch.isfinite(probability).all()):
                raise ExplainerError(
                    f"{self.name}: probability must be ({x.shape[0]},) and finite, got "
                    f"shape {tuple(probability.shape)}"
                )
        surrogates = tuple(out.surrogates) if out.surrogates is not None else None
        return Attribution(
            self.name, attribution, target, probability, time.perf_counter() - start,
            surrogates, dict(out.info),
        )

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        """Attributions of a checked batch x (B, *input_shape), target (B,) int64 on the
        explainer's device. Non-batched methods get B = 1."""
        raise NotImplementedError

    def _show(self, x: Tensor) -> bool:
        """Whether to show a progress bar for batch x (``progress``; None: B > 4)."""
        return x.shape[0] > 4 if self.progress is None else bool(self.progress)

    def _one_by_one(self, x: Tensor, target: Tensor, seed: int) -> Output:
        """Call ``_attribute`` per input (seed + b for input b) and stack the results."""
        show = self._show(x)
        outs = [
            self._attribute(x[b : b + 1], target[b : b + 1], seed + b)
            for b in tqdm(range(x.shape[0]), desc=self.name, unit="input", disable=not show,
                          leave=False)
        ]
        probs = [o.probability for o in outs]
        has_prob = [p is not None for p in probs]
        if any(has_prob) and not all(has_prob):
            raise ExplainerError(f"{self.name}: probability returned for some inputs only")
        surr = [o.surrogates for o in outs]
        info: dict[str, Any] = {}
        for key in outs[0].info:
            values = [o.info[key] for o in outs]
            info[key] = (torch.cat(values) if isinstance(values[0], Tensor) else values)
        return Output(
            torch.cat([o.attribution for o in outs]),
            torch.cat([torch.as_tensor(p).reshape(-1) for p in probs]) if all(has_prob) else None,
            [s for ss in surr for s in ss] if all(s is not None for s in surr) else None,
            info,
        )

    # -- checks --------------------------------------------------------------------------

    def check_input(self, x: Tensor, name: str = "x") -> Tensor:
        """x (B, *input_shape), floating and finite -> detached, in the explainer's dtype
        and device. ValueError otherwise, naming ``name``."""
        shape = f"(B, {', '.join(map(str, self.input_shape))})"
        if not isinstance(x, Tensor):
            raise ValueError(f"{self.name}: {name} must be a torch.Tensor of shape {shape}, got "
                             f"{type(x).__name__}")
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.name}: {name} must have shape {shape}, got "
                             f"{tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{self.name}: {name} is an empty batch; pass B >= 1")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{self.name}: {name} must be a floating tensor, got {x.dtype}; "
                             "scale integer images to floats first, e.g. x / 255")
        if not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero().flatten()
            raise ValueError(f"{self.name}: {name} contains NaN or Inf (inputs "
                             f"{bad.tolist()[:10]})")
        return x.detach().to(dtype=self.dtype, device=self.device)

    def check_target(self, target, batch: int) -> Tensor:
        """An int or a (B,) integer tensor -> (B,) int64 on the device, each in [0, C)
        (see :func:`check_targets`; a one-element tensor stands for every input)."""
        return check_targets(target, batch, self.num_classes, prefix=f"{self.name}: ",
                             broadcast=True).to(self.device)

    @property
    def num_classes(self) -> int:
        """C, from one forward pass of a zero input (cached)."""
        if not hasattr(self, "_num_classes"):
            with torch.no_grad():
                out = self.model(torch.zeros(1, *self.input_shape, dtype=self.dtype,
                                             device=self.device))
            if out.dim() != 2:
                raise UnsupportedModelError(
                    f"{self.name}: the model must map (B, *input_shape) to (B, C) logits; its "
                    f"output is {tuple(out.shape)}"
                )
            self._num_classes = int(out.shape[1])
        return self._num_classes

    def _check_output(self, attribution: Tensor, x: Tensor) -> Tensor:
        a = torch.as_tensor(attribution).detach()
        if tuple(a.shape) != tuple(x.shape):
            raise ExplainerError(f"{self.name}: attribution has shape {tuple(a.shape)}, "
                                 f"expected {tuple(x.shape)}")
        if not bool(torch.isfinite(a).all()):
            bad = (~torch.isfinite(a)).reshape(a.shape[0], -1).any(1).nonzero().flatten()
            raise ExplainerError(f"{self.name}: attribution is NaN or Inf for inputs "
                                 f"{bad.tolist()[:10]}")
        return a.to(x.dtype)

    # -- helpers for subclasses ----------------------------------------------------------

    def probabilities(self, x: Tensor) -> Tensor:
        """softmax(model(x)) (B, C), without gradients."""
        with torch.no_grad():
            return torch.softmax(self.model(x), dim=1)


# ----------------------------------------------------------------------------- registry

_REGISTRY: dict[str, type[Explainer]] = {}


def register(cls: type[Explainer]) -> type[Explainer]:
    """Class decorator: add an :class:`Explainer` subclass under ``cls.name``."""
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"an explainer named {cls.name!r} is already registered "
                         f"({_REGISTRY[cls.name].__name__})")
    _REGISTRY[cls.name] = cls
    return cls


def names() -> tuple[str, ...]:
    """Every registered method, in registration order (openbox's own first)."""
    return tuple(_REGISTRY)


def explainer_class(name: str) -> type[Explainer]:
    """The class registered under ``name``; ValueError listing the names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown explainer {name!r}; the methods are: {', '.join(_REGISTRY)}"
        ) from None


def get(name: str, model: nn.Module, input_shape: Sequence[int] = (1, 28, 28),
        **options) -> Explainer:
    """Build the method ``name`` on ``model`` (see :class:`Explainer` for the arguments)."""
    return explainer_class(name)(model, input_shape, **options)


# ----------------------------------------------------------------------------- small parts


def check_targets(target, batch: int, classes: int, *, name: str = "target",
                  prefix: str = "", broadcast: bool = False) -> Tensor:
    """An int or a (B,) integer tensor -> (B,) int64 (on the CPU), each in [0, classes).

    ``broadcast``: a one-element tensor stands for every input. ValueError, starting with
    ``prefix`` and naming ``name``, for a bool, a floating or bool tensor, a wrong length,
    or a class out of range.
    """
    if isinstance(target, bool):
        raise ValueError(f"{prefix}{name} must be an int or a ({batch},) int64 tensor, got a "
                         "bool")
    if isinstance(target, int):
        t = torch.full((batch,), target, dtype=torch.int64)
    else:
        t = torch.as_tensor(target)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError(f"{prefix}{name} must hold integers, got {t.dtype}")
        t = t.to(torch.int64).reshape(-1)
        if broadcast and t.numel() == 1 and batch > 1:
            t = t.expand(batch).clone()
        if t.shape != (batch,):
            raise ValueError(f"{prefix}{name} must be an int or a ({batch},) tensor, got shape "
                             f"{tuple(torch.as_tensor(target).shape)}")
    if bool(((t < 0) | (t >= classes)).any()):
        raise ValueError(f"{prefix}{name} must lie in [0, {classes}), got {t.tolist()[:10]}")
    return t


def _shape(input_shape) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in input_shape)
    except TypeError:
        raise ValueError(f"input_shape must be a sequence of positive ints, got "
                         f"{input_shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be a sequence of positive ints, got {input_shape!r}")
    return shape


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    return int(seed)
