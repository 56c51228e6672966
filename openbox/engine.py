"""``OpenBox``: exact local linear classifiers, polytopes and certified radii of a network.

>>> ob = openbox.OpenBox(model, input_shape=(1, 28, 28), dtype=torch.float64)
>>> e = ob.explain(x)                 # x: (B, 1, 28, 28)
>>> e.weight, e.bias                  # (B, C, 1, 28, 28), (B, C): f(x') = W x' + b on P_x
>>> ob.polytope(x[0]).radius(norm=2)  # largest L2 ball around x[0] inside P_x
>>> ob.verify(x).ok                   # W x + b and the compiled program match the model

Everything is computed from the compiled program (:mod:`linearize`), never by
autograd on the user's model; the model itself is used only as the reference
that :meth:`OpenBox.verify` checks against.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

import linearize
from openbox import tolerances
from openbox.configuration import (
    Configuration,
    PassResult,
    RegionKey,
    batch_index,
    configure,
    key_context,
    tie_break_direction,
)
from openbox.constraints import RadiusPair, build_constraints, certified_radius_pair
from openbox.geometry import Polytope
from openbox.linear_maps import compose_backward

BACKWARD_ROWS = 128
"""Rows (inputs x classes) composed per backward call. On the reference CNN (2 cores),
2,560-row calls ran its transposed convolutions 2-2.5x slower per row than 256-row calls;
64 to 256 rows were within the machine's noise of each other."""


@dataclass(frozen=True, eq=False)
class Explanation:
    """Local linear classifiers of a batch: ``f(x') = weight[b] x' + bias[b]`` on P_b.

    Attributes:
        inputs: (B, *input_shape) the explained inputs.
        weight: (B, C, *input_shape) W_x, one row per class.
        bias: (B, C) b_x.
        logits: (B, C) the network's output at x.
        region_key: length-B tuple of :class:`RegionKey`; equal <=> same configuration.
        configuration: the gate states (after the tie-break, see
            :mod:`openbox.configuration`).
    """

    inputs: Tensor
    weight: Tensor
    bias: Tensor
    logits: Tensor
    region_key: tuple[RegionKey, ...]
    configuration: Configuration

    def __len__(self) -> int:
        return self.weight.shape[0]

    def __getitem__(self, index) -> Explanation:
        """The explanations of a sub-batch: ``e[i]`` (kept as a batch of one; IndexError
        when out of range), ``e[i:j]``, ``e[[i, k]]``, ``e[mask]`` with a (B,) bool mask."""
        index = batch_index(index, len(self))
        keys = self.region_key[index] if isinstance(index, slice) else tuple(
            self.region_key[i] for i in index.tolist()
        )
        return Explanation(
            self.inputs[index], self.weight[index], self.bias[index], self.logits[index],
            keys, self.configuration[index],
        )

    @property
    def n_tight(self) -> Tensor:
        """(B,) int64: facets each input lies on (0 for an input inside its region)."""
        return self.configuration.n_tight

    @property
    def on_boundary(self) -> Tensor:
        """(B,) bool: the input lies on at least one facet (its certified radius is 0)."""
        return self.n_tight > 0

    @property
    def prediction(self) -> Tensor:
        """(B,) int64 predicted class."""
        return self.logits.argmax(dim=1)

    def predict(self, x: Tensor) -> Tensor:
        """The local linear classifiers applied to x (B, *input_shape) -> (B, C).

        Equals the network at x[b] whenever x[b] lies in the region of input b.
        """
        return torch.einsum("bcn,bn->bc", self.weight.flatten(2), x.flatten(1)) + self.bias


@dataclass(frozen=True)
class VerificationReport:
    """Outcome of :meth:`OpenBox.verify`, in the working dtype.

    Attributes:
        max_abs_error: largest |difference| of both checks below.
        logits: (B, C) the model's own output, the reference.
        llc_error: (B,) max |W_x x + b_x - model(x)| per input.
        program_error: (B,) max |program(x) - model(x)| per input.
        passed: (B,) bool, both within ``max(atol + rtol |model(x)|, scale_rtol
            max_c |model(x)_c|)`` elementwise (:meth:`Tolerances.matches`).
        rtol, atol, scale_rtol: the tolerances used. dtype: the working dtype.
        n_tight: (B,) facets each input lies on (the tie-broken LLC is still exact).
    """

    max_abs_error: float
    logits: Tensor
    llc_error: Tensor
    program_error: Tensor
    passed: Tensor
    rtol: float
    atol: float
    dtype: torch.dtype
    n_tight: Tensor
    scale_rtol: float = 0.0

    @property
    def ok(self) -> bool:
        return bool(self.passed.all())

    @property
    def _scale_part(self) -> str:
        return f", or {self.scale_rtol:g} max|f(x)|" if self.scale_rtol else ""

    def __str__(self) -> str:
        n = len(self.passed)
        return (
            f"verify: {int(self.passed.sum())}/{n} inputs pass in {self.dtype} "
            f"(max abs error {self.max_abs_error:.3e}; tolerance {self.atol:g} + "
            f"{self.rtol:g} |f(x)|{self._scale_part}; {int((self.n_tight > 0).sum())} inputs "
            "on a facet)"
        )


class OpenBox:
    """Exact interpretation of a piecewise-linear network.

    Args:
        model: the trained network (any module :func:`linearize.compile` accepts).
            It is never modified. A private copy, taken *here*, serves as the reference
            in :meth:`verify`: editing the model afterwards changes neither the program
            nor the reference (build a new OpenBox for the edited model).
        input_shape: per-example input shape, e.g. (1, 28, 28).
        dtype: working dtype, torch.float64 (exact to ~1e-10) or torch.float32.
        device: where the computation runs (default: CPU). Inputs must be on it.
        domain: optional input-domain box ``(lo, hi)`` (e.g. ``(0.0, 1.0)`` for pixels):
            inputs outside it are rejected with ValueError by explain / polytope / verify /
            certified_radius, and it is attached to polytopes *apart from* the network's own
            constraints. None (the default) declares no domain.
        direction: tie-break direction u (*input_shape); default
            :func:`~openbox.configuration.tie_break_direction`.
        batch_size: inputs per internal batch (memory ~ batch_size x C x largest
            activation for explain).
        chunk: basis vectors pushed at once when building polytopes and radii.
    """

    def __init__(
        self,
        model: nn.Module,
        input_shape: Sequence[int],
        dtype: torch.dtype = torch.float64,
        device: str | torch.device | None = None,
        *,
        domain: tuple[float, float] | None = None,
        direction: Tensor | None = None,
        batch_size: int = 64,
        chunk: int = 1024,
    ):
        self.tol = tolerances.for_dtype(dtype)
        self.dtype = dtype
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.model = model
        self.program = linearize.compile(model, input_shape).to(dtype, self.device)
        self.input_shape = self.program.input_shape
        if len(self.program.output_shape) != 1:
            raise ValueError(
                f"OpenBox explains classifiers with output (N, C); this model's output is "
                f"(N, {', '.join(map(str, self.program.output_shape))})"
            )
        self.num_classes = self.program.output_shape[0]
        if direction is None:
            direction = tie_break_direction(self.input_shape, dtype, self.device)
        else:
            direction = torch.as_tensor(direction).to(dtype=dtype, device=self.device)
            if tuple(direction.shape) != self.input_shape or not bool(
                torch.isfinite(direction).all() and direction.abs().sum() > 0
            ):
                raise ValueError(
                    f"direction must be a finite non-zero tensor of shape {self.input_shape}"
                )
        self.direction = direction
        self.domain = _domain(domain)
        if batch_size < 1 or chunk < 1:
            raise ValueError("batch_size and chunk must be positive")
        self.batch_size = batch_size
        self.chunk = chunk
        self.key_context = key_context(self.program, dtype, direction)
        self._reference = copy.deepcopy(model).to(dtype=dtype, device=self.device).eval()

    def __repr__(self) -> str:
        return (
            f"OpenBox({self.program.source}, input {self.input_shape}, {self.num_classes} "
            f"classes, {self.dtype}, {self.device})"
        )

    # -- input checks --------------------------------------------------------------------

    def check_input(self, x: Tensor, name: str = "x") -> Tensor:
        """Validate a batch x (B, *input_shape) and return it in the working dtype.

        A floating tensor of another dtype is converted (float32 -> float64 is exact; the
        other way rounds, and the explanation is then that of the rounded input). Raises
        ValueError, naming the argument ``name``, for: not a tensor, a non-floating dtype,
        a wrong shape, an empty batch, another device, NaN / Inf, or values outside the
        declared domain.
        """
        shape = f"(B, {', '.join(map(str, self.input_shape))})"
        if not isinstance(x, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got {type(x)}")
        if x.dim() != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (shape {tuple(x.shape)}); pass B >= 1")
        if not x.dtype.is_floating_point:
            raise ValueError(
                f"{name} must be a floating tensor (it is converted to {self.dtype}), got "
                f"{x.dtype}; scale integer images to floats first, e.g. x / 255"
            )
        if x.device != self.device and not (
            x.device.type == self.device.type and self.device.index is None
        ):
            raise ValueError(f"{name} must be on device {self.device}, got {x.device}")
        x = x.detach().to(self.dtype)
        if not bool(torch.isfinite(x).all()):
            bad = (~torch.isfinite(x)).reshape(x.shape[0], -1).any(1).nonzero().flatten()
            raise ValueError(f"{name} contains NaN or Inf (inputs {bad.tolist()[:10]})")
        if self.domain is not None:
            lo, hi = (b.to(x.device) for b in self._domain_tensors())
            out = ((x < lo) | (x > hi)).reshape(x.shape[0], -1).any(1)
            if bool(out.any()):
                bad = out.nonzero().flatten().tolist()
                raise ValueError(
                    f"{name} lies outside the declared domain [{_fmt_bound(self.domain[0])}, "
                    f"{_fmt_bound(self.domain[1])}] (inputs {bad[:10]}; min {float(x.min()):g},"
                    f" max {float(x.max()):g}); rescale the input, or build the OpenBox with "
                    "domain=None to declare no domain"
                )
        return x

    def check_point(self, x: Tensor, name: str = "x") -> Tensor:
        """Validate one input, (*input_shape) or (1, *input_shape); return it as
        (1, *input_shape) in the working dtype (see :meth:`check_input`)."""
        if isinstance(x, Tensor) and tuple(x.shape) == self.input_shape:
            x = x.unsqueeze(0)
        elif isinstance(x, Tensor) and tuple(x.shape) != (1, *self.input_shape):
            raise ValueError(
                f"{name} must have shape {self.input_shape} (one input), got {tuple(x.shape)}"
            )
        return self.check_input(x, name)

    def _domain_tensors(self) -> tuple[Tensor, Tensor]:
        lo, hi = self.domain
        return tuple(
            torch.as_tensor(b, dtype=self.dtype).reshape(self.input_shape)
            if torch.as_tensor(b).numel() > 1 else torch.as_tensor(b, dtype=self.dtype)
            for b in (lo, hi)
        )

    def _chunks(self, x: Tensor, size: int | None = None) -> Iterator[Tensor]:
        size = size or self.batch_size
        for i in range(0, x.shape[0], size):
            yield x[i : i + size]

    def _progress(self, x: Tensor, progress: bool | None, desc: str, size: int | None = None):
        """The chunks of x, with a tqdm bar on stderr when ``progress`` (None: only for
        batches of more than 4 chunks)."""
        size = size or self.batch_size
        n = -(-x.shape[0] // size)
        show = n > 4 if progress is None else progress
        return tqdm(self._chunks(x, size), total=n, desc=desc, unit="batch", disable=not show,
                    leave=False)

    # -- configurations and LLCs ---------------------------------------------------------

    def configure(self, x: Tensor, *, record: bool = False) -> PassResult:
        """One batch x (B, *input_shape), already checked, no chunking: logits (B, C), the
        configuration and, with ``record``, the gate values (:class:`PassResult`)."""
        return configure(self.program, x, self.direction, self.tol, record=record,
                         context=self.key_context)

    def configuration(self, x: Tensor) -> Configuration:
        """Gate states of x (B, *input_shape), with the documented tie-break."""
        x = self.check_input(x)
        return Configuration.concat([self.configure(c).configuration for c in self._chunks(x)])

    def region_key(self, x: Tensor) -> tuple[RegionKey, ...]:
        """Canonical region keys of x (B, *input_shape), without computing LLCs."""
        return self.configuration(x).region_keys()

    def explain(self, x: Tensor, *, progress: bool | None = None) -> Explanation:
        """Local linear classifiers of x (B, *input_shape); see :class:`Explanation`.

        x is converted to the working dtype (:meth:`check_input`). ``progress`` shows a bar
        on stderr (default: for more than 4 internal batches).
        """
        x = self.check_input(x)
        weights, biases, logits, configs = [], [], [], []
        eye = torch.eye(self.num_classes, dtype=self.dtype, device=self.device)
        # the backward pass runs on a few hundred rows at a time: CPU convolutions slow
        # down 2-3x per row on batches whose activations overflow the cache
        step = max(1, BACKWARD_ROWS // self.num_classes)
        for xc in self._progress(x, progress, "explain"):
            lg, config, _, _ = self.configure(xc)
            for i in range(0, xc.shape[0], step):
                sub = config[i : i + step]
                with torch.no_grad():
                    w, b = compose_backward(self.program, sub, eye.expand(sub.batch_size, -1, -1))
                weights.append(w)
                biases.append(b)
            logits.append(lg)
            configs.append(config)
        config = Configuration.concat(configs)
        return Explanation(
            x, torch.cat(weights), torch.cat(biases), torch.cat(logits), config.region_keys(),
            config,
        )

    # -- polytopes -----------------------------------------------------------------------

    def polytope(self, x: Tensor) -> Polytope:
        """The region of x (*input_shape) as ``{x' : A x'.flatten() <= d}``.

        One row per gate input (ReLU sign, max-pool selection); rows that are
        identically zero are dropped. The domain box, if any, is kept apart.
        """
        x = self.check_point(x)
        _, config, gates, _ = self.configure(x, record=True)
        with torch.no_grad():
            cons = build_constraints(self.program, config, gates, self.tol, chunk=self.chunk)
        return Polytope(
            cons.A,
            cons.d,
            x.reshape(-1).cpu().double().numpy(),
            slack=cons.slack,
            domain=self.domain,
            tol=self.tol,
            row_source=cons.source,
            n_dropped=cons.n_dropped,
        )

    def certified_radius(self, x: Tensor, norm: float = 2, *,
                         progress: bool | None = None) -> Tensor:
        """(B,) radius of the largest ``norm``-ball around each input inside its region.

        ``norm`` is 2 or ``float('inf')``. 0 for an input on a facet (``n_tight > 0``).
        Polytopes are not stored: memory stays ~ chunk x largest activation.
        """
        if norm not in (2, float("inf")):
            raise ValueError(f"norm must be 2 or float('inf'), got {norm!r}")
        both = self.radius_pair(x, progress=progress)
        return both.l2 if norm == 2 else both.linf

    def radius_pair(self, x: Tensor, *, progress: bool | None = None) -> RadiusPair:
        """Both certified radii of x (B, *input_shape): ``.l2`` and ``.linf``, (B,) each,
        from one basis push per input (none for inputs on a facet, whose radii are 0)."""
        x = self.check_input(x)
        r2, rinf = [], []
        for xc in self._progress(x, progress, "certified radius"):
            _, config, gates, _ = self.configure(xc, record=True)
            with torch.no_grad():
                a, b = certified_radius_pair(self.program, config, gates, self.tol,
                                             chunk=self.chunk)
            r2.append(a)
            rinf.append(b)
        return RadiusPair(torch.cat(r2), torch.cat(rinf))

    # -- verification --------------------------------------------------------------------

    @property
    def reference(self) -> nn.Module:
        """The private copy of the model taken at construction, in the working dtype and
        device, in eval mode (the user's model is untouched)."""
        return self._reference

    def verify(self, x: Tensor, *, progress: bool | None = None) -> VerificationReport:
        """Check ``W_x x + b_x`` and the compiled program against the model's own forward
        (the copy taken at construction).

        Both must match ``model(x)`` elementwise to ``atol + rtol * |model(x)|`` (the
        working dtype's tolerance, DESIGN.md). x is converted as in :meth:`check_input`.
        """
        x = self.check_input(x)
        e = self.explain(x, progress=progress)
        with torch.no_grad():
            # a clone: a model with an in-place first layer (ReLU(inplace=True)) would
            # otherwise overwrite the caller's input
            want = torch.cat([self.reference(c.clone()) for c in self._chunks(x)])
            prog = torch.cat([self.program(c) for c in self._chunks(x)])
        llc = e.predict(x)
        rtol, atol = self.tol.verify_rtol, self.tol.verify_atol
        llc_err = (llc - want).abs()
        prog_err = (prog - want).abs()
        passed = (self.tol.matches(llc, want) & self.tol.matches(prog, want)).all(dim=1)
        return VerificationReport(
            max_abs_error=float(torch.maximum(llc_err.max(), prog_err.max())),
            logits=want,
            llc_error=llc_err.amax(dim=1),
            program_error=prog_err.amax(dim=1),
            passed=passed,
            rtol=rtol,
            scale_rtol=self.tol.verify_scale_rtol,
            atol=atol,
            dtype=self.dtype,
            n_tight=e.n_tight,
        )


def _domain(domain):
    """Validate a domain ``(lo, hi)`` (scalars or arrays; None for no domain)."""
    if domain is None:
        return None
    if not isinstance(domain, (tuple, list)) or len(domain) != 2:
        raise ValueError(f"domain must be None or a pair (lo, hi), got {domain!r}")
    lo, hi = (torch.as_tensor(b, dtype=torch.float64) for b in domain)
    if bool(torch.isnan(lo).any() or torch.isnan(hi).any()) or bool((lo > hi).any()):
        raise ValueError(f"domain must be a pair (lo, hi) with lo <= hi, got {domain!r}")
    return tuple(domain)


def _fmt_bound(b) -> str:
    t = torch.as_tensor(b)
    return f"{float(t):g}" if t.numel() == 1 else f"array of {t.numel()}"
