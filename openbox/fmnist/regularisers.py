r"""Region-enlarging regularisation in the spirit of MMR (maximum margin regularisation).

Croce, Andriushchenko & Hein, "Provable robustness of ReLU networks via maximization of
linear regions", AISTATS 2019. For an input x, every gate j of a piecewise-linear network
has a pre-activation :math:`z_j(x)` that is affine in x on x's region, so x lies at the
Euclidean distance

.. math::  d_j(x) = |z_j(x)| \,/\, \lVert \nabla_x z_j(x) \rVert_2

from the gate's hyperplane (the boundary of the region along that row). The penalty
pushes the ``k`` nearest hyperplanes beyond a target distance :math:`\gamma`:

.. math::  R(x) = \frac{1}{k} \sum_{j \in \text{k smallest } d_j(x)}
           \max\bigl(0,\ 1 - d_j(x) / \gamma\bigr)

plus, optionally, the same for the decision boundaries of the local linear classifier:
for the predicted class c, the margins :math:`l_c - l_i` (i != c) of the logits l, with
their own weight, :math:`\gamma_D` and :math:`k_D`. The batch mean is multiplied by a
weight ramped linearly from 0 (see :class:`MMRPenalty`).

Gates (the rows of ``openbox``'s polytope, one hyperplane each):

* ``nn.ReLU`` / ``nn.LeakyReLU`` modules: every input unit :math:`z_j`, on or off;
* ``nn.MaxPool2d`` modules (``padding=0``, ``dilation=1``, ``ceil_mode=False``): in every
  window with selected (largest) entry s, the differences :math:`z_s - z_i` for *every*
  other entry i (not only the runner-up), as in ``openbox/constraints.py``.

Gates whose gradient is exactly zero (two ReLU-off zeros entering a max-pool, a dead
constant unit) are not hyperplanes: their distance is ``inf`` (openbox drops those rows).
Functional calls (``F.relu`` inside ``forward``) are not seen: gates are found through
forward hooks on those module types.

Max-pool ties: on a constant input patch (Fashion-MNIST's zero background) the entries of
a max-pool window after conv (+ BN, + ReLU) are *equal*, so the input lies on those tie
hyperplanes (value exactly 0, gradient not 0): distance 0, whatever the weights, and the
hinge there is 1 with no gradient (``|z|`` has subgradient 0 at 0). Such gates make the
nearest distance 0 (openbox reports those rows as tight) and take places among the k
nearest; architectures without max-pool (``cnn-strided``, ``cnn-avg``) do not have them.

**The gradient norms.** Exact norms need one backward per gate, or pushing the ``n`` basis
vectors of the input space through the network with its gates fixed (``estimator="exact"``:
``n`` = 784 forward-mode passes per example; for tests, or a few examples per batch via
``exact_fraction``). The default ``estimator="gaussian"`` uses ``m`` random probes: with the
gates fixed the network is linear in x, so for :math:`v \sim N(0, I_n)` the forward-mode
directional derivative (``torch.func.jvp``) gives :math:`(Jv)_j = \nabla z_j \cdot v \sim
N(0, \lVert\nabla z_j\rVert^2)` *exactly*, for every gate at once. With m independent probes

.. math::  \hat s_j = \frac{1}{m} \sum_{p=1}^m (J v_p)_j^2,
           \qquad \hat s_j / \lVert\nabla z_j\rVert^2 \sim \chi^2_m / m,

an unbiased estimate of the squared norm with relative standard deviation
:math:`\sqrt{2/m}` (0.5 at m = 8), at the cost of m forward-mode passes. The plug-in
distance :math:`|z_j| / \sqrt{\hat s_j}` is biased upwards (Jensen: :math:`1/\sqrt{\cdot}`
is convex): :math:`E[(\chi^2_m/m)^{-1/2}] = \sqrt{m/2}\,\Gamma(\tfrac{m-1}{2}) /
\Gamma(\tfrac m2)` (1.108 at m = 8). Since the ratio's law is known exactly, the
estimator used here multiplies by its inverse :math:`c_m` (:func:`distance_debias`):

.. math::  \hat d_j = c_m \, |z_j| / \sqrt{\hat s_j}, \qquad E[\hat d_j] = d_j,

unbiased for every distance, with relative standard deviation
:math:`\sqrt{c_m^2\, m/(m-2) - 1}` (0.29 at m = 8; infinite at m = 2, so m >= 3).
The penalty is a convex, non-increasing function of the distances (a top-k mean of
hinges), so by Jensen's inequality its expectation under :math:`\hat d` is an **upper
bound** on the exact penalty: the estimate errs on the side of regularising more.

**BatchNorm.** The penalty runs the model in eval mode (running statistics), the network
``openbox`` explains; train-mode batch statistics would couple the examples of a batch,
so that no single input has a region of its own. The modes are restored afterwards.
Early in training the running statistics lag the batch ones: the ramp covers that.

Everything here is torch autograd on the model; nothing imports the rest of openbox.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import jvp

__all__ = [
    "ESTIMATORS",
    "GateDistances",
    "MMRPenalty",
    "distance_debias",
    "gate_distances",
    "hinge_top_k",
    "mmr_penalty",
]

ESTIMATORS = ("gaussian", "exact")
MIN_PROBES = 3  # the debiased distance has finite variance only for m >= 3
DEFAULT_PROBES = 8


def distance_debias(probes: int) -> float:
    r""":math:`c_m = \Gamma(m/2) / (\sqrt{m/2}\,\Gamma((m-1)/2))`, the factor that makes
    :math:`c_m |z| / \sqrt{\hat s}` unbiased for :math:`|z| / \lVert\nabla z\rVert` when
    :math:`\hat s` is the mean of m squared Gaussian probes (:math:`E[(\chi^2_m/m)^{-1/2}]
    = 1/c_m`). Needs m >= 2; tends to 1 as :math:`1 - 3/(4m)`."""
    if not _is_int(probes) or probes < 2:
        raise ValueError(f"probes must be an integer >= 2, got {probes!r}")
    m = probes
    return math.exp(math.lgamma(m / 2) - math.lgamma((m - 1) / 2)) / math.sqrt(m / 2)


@dataclass(frozen=True)
class GateDistances:
    """Distances from B inputs to their gate hyperplanes and decision boundaries.

    Attributes:
        value: (B, G) gate values :math:`z_j(x)` (ReLU inputs, then max-pool differences
            :math:`z_s - z_i`, in module call order; the selected entry's own 0 included).
        sq_norm: (B, G) :math:`\\lVert\\nabla_x z_j\\rVert^2`, exact or estimated.
        distance: (B, G) :math:`|z_j| / \\lVert\\nabla z_j\\rVert` (debiased when estimated);
            ``inf`` where the gradient is exactly zero.
        decision_value: (B, C) logit margins :math:`l_c - l_i` for the predicted class c
            (0 at i = c).
        decision_sq_norm: (B, C) their squared gradient norms (0 at i = c).
        decision_distance: (B, C) their distances (``inf`` at i = c).
        exact: (B,) bool, True where the norms are exact.
    """

    value: Tensor
    sq_norm: Tensor
    distance: Tensor
    decision_value: Tensor
    decision_sq_norm: Tensor
    decision_distance: Tensor
    exact: Tensor

    @property
    def nearest(self) -> Tensor:
        """(B,) distance to the nearest gate hyperplane (the region's inradius bound)."""
        return self.distance.min(dim=1).values


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def _pool_differences(module: nn.MaxPool2d, h: Tensor) -> Tensor:
    """(N, C * Ho * Wo * kh * kw): per window, selected entry minus each entry."""
    kernel = _pair(module.kernel_size)
    stride = _pair(module.stride if module.stride is not None else module.kernel_size)
    if (_pair(module.padding) != (0, 0) or _pair(module.dilation) != (1, 1)
            or module.ceil_mode or module.return_indices or h.dim() != 4):
        raise ValueError(
            f"max-pool gates need MaxPool2d with padding=0, dilation=1, ceil_mode=False on "
            f"(N, C, H, W) inputs; got {module} on an input of shape {tuple(h.shape)}")
    windows = h.unfold(2, kernel[0], stride[0]).unfold(3, kernel[1], stride[1])
    windows = windows.flatten(start_dim=4)  # (N, C, Ho, Wo, kh * kw)
    selected = windows.detach().argmax(dim=-1, keepdim=True)
    return (windows.gather(-1, selected) - windows).flatten(start_dim=1)


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _gate_function(model: nn.Module, pool_gates: bool) -> Callable[[Tensor], tuple[Any, Tensor]]:
    """``f(x) -> (gates, logits (N, C))`` through forward hooks on the gate modules; gates:
    one (N, G_l) tensor per gate-module call, in call order."""
    kinds = (nn.ReLU, nn.LeakyReLU) + ((nn.MaxPool2d,) if pool_gates else ())
    gated = [m for m in model.modules() if isinstance(m, kinds)]
    if not any(isinstance(m, (nn.ReLU, nn.LeakyReLU, nn.MaxPool2d)) for m in gated):
        raise ValueError(f"{type(model).__name__} has no nn.ReLU, nn.LeakyReLU or nn.MaxPool2d "
                         "module: no gates to regularise")

    def f(x: Tensor) -> tuple[Tensor, Tensor]:
        captured: list[Tensor] = []

        def hook(module, inputs, output):
            h = inputs[0]
            if isinstance(module, nn.MaxPool2d):
                captured.append(_pool_differences(module, h))
            else:
                captured.append(h.flatten(start_dim=1))

        handles = [m.register_forward_hook(hook) for m in gated]
        try:
            logits = model(x)
        finally:
            for handle in handles:
                handle.remove()
        if logits.dim() != 2:
            raise ValueError(f"the model must return logits (N, C), got {tuple(logits.shape)}")
        return tuple(captured), logits

    return f


def _push(f, x: Tensor, v: Tensor, reduce: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gate values and squared directional derivatives for P probes per input.

    x (B, *S), v (P, B, *S) -> gates (B, G), logits (B, C), ``reduce`` (``"mean"`` or
    ``"sum"``) over the P probes of the squared gate tangents :math:`(J v)_j^2` (B, G), and
    the logit tangents ``J v`` (P, B, C). The inputs are repeated P times along the batch
    (the model is in eval mode, so examples do not interact); each gate layer's tangents
    (P, B, G_l) are reduced as they come, so no (P, B, G) tensor is built.
    """
    p, b = v.shape[0], x.shape[0]
    x_rep = x.repeat(p, *([1] * (x.dim() - 1)))  # (P * B, *S), copies (jvp needs no aliasing)
    (gates, logits), (t_gates, t_logits) = jvp(f, (x_rep,), (v.reshape(p * b, *x.shape[1:]),))
    squares = [t.reshape(p, b, -1).square() for t in t_gates]
    sq = [t.mean(0) if reduce == "mean" else t.sum(0) for t in squares]
    return (torch.cat([g[:b] for g in gates], dim=1), logits[:b], torch.cat(sq, dim=1),
            t_logits.reshape(p, b, -1))


def _distance(value: Tensor, sq_norm: Tensor, scale: Tensor) -> Tensor:
    """``scale * |value| / sqrt(sq_norm)``, ``inf`` where ``sq_norm == 0`` (no NaN gradient)."""
    live = sq_norm > 0
    safe = torch.where(live, sq_norm, torch.ones_like(sq_norm))
    return torch.where(live, scale * value.abs() / safe.sqrt(),
                       torch.full_like(value, math.inf))


def gate_distances(model: nn.Module, x: Tensor, *, estimator: str = "gaussian",
                   probes: int = DEFAULT_PROBES, exact_fraction: float = 0.0,
                   pool_gates: bool = True, debias: bool = True,
                   generator: torch.Generator | None = None) -> GateDistances:
    """Distances of each input to its gates' hyperplanes and to the LLC's decision boundaries.

    Args:
        model: maps ``(B, *S)`` to logits ``(B, C)``; run as it is (call it in eval mode for
            BatchNorm running statistics: :class:`MMRPenalty` does). Gradients flow to its
            parameters through values and norms.
        x: ``(B, *S)`` inputs, the model's dtype.
        estimator: ``"gaussian"`` (``probes`` random probes per input, unbiased squared
            norms; see the module docstring) or ``"exact"`` (the identity basis: exact).
        probes: m >= 3 Gaussian probes per input.
        exact_fraction: with ``"gaussian"``, the first ``ceil(exact_fraction * B)`` inputs
            (a random subsample when batches are shuffled) get exact norms instead.
            Memory: n = prod(S) copies of one input's activations and their graph.
        pool_gates: include the max-pool differences (else ReLU / LeakyReLU gates only).
        debias: multiply estimated distances by :func:`distance_debias` (unbiased distances);
            False gives the plug-in ``|z| / sqrt(s_hat)``.
        generator: for the probes (default: the global RNG).

    Returns:
        :class:`GateDistances` for the B inputs.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not _is_int(probes) or probes < MIN_PROBES:
        raise ValueError(f"probes must be an integer >= {MIN_PROBES} (the debiased distance has "
                         f"infinite variance below), got {probes!r}")
    if not _is_real(exact_fraction) or not 0.0 <= exact_fraction <= 1.0:
        raise ValueError(f"exact_fraction must be a number in [0, 1], got {exact_fraction!r}")
    if not isinstance(x, Tensor) or x.dim() < 2 or x.shape[0] == 0 or not x.is_floating_point():
        raise ValueError("x must be a non-empty floating-point batch (B, *input_shape), got "
                         f"{type(x).__name__} {tuple(getattr(x, 'shape', ()))}")
    f = _gate_function(model, pool_gates)
    b = x.shape[0]
    n_exact = b if estimator == "exact" else math.ceil(exact_fraction * b)
    parts: list[tuple[Tensor, ...]] = []
    n_in = x[0].numel()
    if n_exact > 0:
        basis = torch.eye(n_in, dtype=x.dtype, device=x.device).reshape(n_in, 1, *x.shape[1:])
        # (n, 1, *S): the n basis vectors as n probes of one input
        for i in range(n_exact):
            gates, logits, sq, tl = _push(f, x[i:i + 1], basis, "sum")
            parts.append((gates, logits, sq, tl, True))
    if n_exact < b:
        rest = x[n_exact:]
        v = torch.randn((probes, *rest.shape), dtype=x.dtype, device=x.device,
                        generator=generator)
        gates, logits, sq, tl = _push(f, rest, v, "mean")
        parts.append((gates, logits, sq, tl, False))
    c_m = distance_debias(probes) if debias else 1.0
    values, sq_norms, distances = [], [], []
    d_values, d_sq_norms, d_distances, exact = [], [], [], []
    for gates, logits, sq, tl, is_exact in parts:
        scale = torch.tensor(1.0 if is_exact else c_m, dtype=x.dtype, device=x.device)
        top = logits.detach().argmax(dim=1, keepdim=True)  # (B', 1)
        margin = logits.gather(1, top) - logits  # (B', C)
        t_margin = tl.gather(2, top.unsqueeze(0).expand(tl.shape[0], -1, 1)) - tl
        d_sq = t_margin.square().sum(0) if is_exact else t_margin.square().mean(0)
        values.append(gates)
        sq_norms.append(sq)
        distances.append(_distance(gates, sq, scale))
        d_values.append(margin)
        d_sq_norms.append(d_sq)
        d_distances.append(_distance(margin, d_sq, scale))
        exact.append(torch.full((gates.shape[0],), is_exact, device=x.device))
    return GateDistances(torch.cat(values), torch.cat(sq_norms), torch.cat(distances),
                         torch.cat(d_values), torch.cat(d_sq_norms), torch.cat(d_distances),
                         torch.cat(exact))


def hinge_top_k(distance: Tensor, gamma: float, k: int) -> Tensor:
    """``(1/k) sum over the k smallest d_j of relu(1 - d_j / gamma)``, per row: (B, G) ->
    (B,). Rows with fewer than k entries use them all (still divided by k); ``inf``
    distances contribute 0."""
    k_eff = min(k, distance.shape[1])
    nearest = torch.topk(distance, k_eff, dim=1, largest=False).values
    return torch.relu(1.0 - nearest / gamma).sum(dim=1) / k


@dataclass(frozen=True)
class MMRPenalty:
    """The callable :func:`mmr_penalty` returns; see there for the arguments.

    ``penalty(model, images, logits, epoch) -> Tensor`` (a 0-dim tensor, differentiable in
    the model's parameters): :math:`w(epoch) \\cdot \\operatorname{mean}_x [R_B(x) +
    \\lambda_D R_D(x)]` with :math:`R_B` the hinge over the k nearest gate hyperplanes
    (target ``gamma``), :math:`R_D` over the ``decision_k`` nearest decision boundaries
    (target ``decision_gamma``, weight :math:`\\lambda_D` = ``decision_weight``) and the ramp
    :math:`w(e) = weight \\cdot \\min(1, \\max(0, (e - first\\_epoch) / ramp\\_epochs))`
    (``weight`` from the start when ``ramp_epochs == 0``). With ``train``'s 1-based epochs
    and ``first_epoch=1``: 0 during epoch 1, ``weight`` from epoch ``1 + ramp_epochs`` on;
    a fractional epoch (``e - 1 + step / steps``) ramps per step. ``logits`` is accepted
    for the hook's signature and not used: the penalty runs its own eval-mode forward.
    Probes come from the global RNG (``train`` seeds it).
    """

    weight: float
    gamma: float
    k: int
    ramp_epochs: float
    estimator: str = "gaussian"
    probes: int = DEFAULT_PROBES
    exact_fraction: float = 0.0
    decision_weight: float = 0.0
    decision_gamma: float | None = None
    decision_k: int = 1
    pool_gates: bool = True
    max_examples: int | None = None
    first_epoch: float = 1

    def ramp(self, epoch: float) -> float:
        """The weight at ``epoch``: linear from 0 at ``first_epoch`` to ``weight`` at
        ``first_epoch + ramp_epochs``, constant after."""
        if self.ramp_epochs == 0:
            return self.weight
        return self.weight * min(1.0, max(0.0, (epoch - self.first_epoch) / self.ramp_epochs))

    def terms(self, model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
        """(B,) region hinge :math:`R_B` and (B,) decision hinge :math:`R_D`, unweighted,
        with ``model`` in eval mode for the computation (its modes restored)."""
        if self.max_examples is not None:
            images = images[:self.max_examples]
        modes = [(m, m.training) for m in model.modules()]
        model.eval()
        try:
            dist = gate_distances(model, images, estimator=self.estimator, probes=self.probes,
                                  exact_fraction=self.exact_fraction,
                                  pool_gates=self.pool_gates)
        finally:
            for m, mode in modes:
                m.training = mode
        region = hinge_top_k(dist.distance, self.gamma, self.k)
        gamma_d = self.gamma if self.decision_gamma is None else self.decision_gamma
        decision = hinge_top_k(dist.decision_distance, gamma_d, self.decision_k)
        return region, decision

    def __call__(self, model: nn.Module, images: Tensor, logits: Tensor | None,
                 epoch: float) -> Tensor:
        w = self.ramp(epoch)
        if w == 0.0:
            return torch.zeros((), dtype=images.dtype, device=images.device)
        region, decision = self.terms(model, images)
        total = region.mean()
        if self.decision_weight > 0:
            total = total + self.decision_weight * decision.mean()
        return w * total


def mmr_penalty(weight: float, gamma: float, k: int, ramp_epochs: float, *,
                estimator: str = "gaussian", probes: int = DEFAULT_PROBES,
                exact_fraction: float = 0.0, decision_weight: float = 0.0,
                decision_gamma: float | None = None, decision_k: int = 1,
                pool_gates: bool = True, max_examples: int | None = None,
                first_epoch: float = 1) -> MMRPenalty:
    """A region-enlarging penalty for ``train(..., penalty=...)``.

    Args:
        weight: final multiplier, finite and >= 0.
        gamma: target distance (input units: pixels in [0, 1]) beyond which a gate
            hyperplane costs nothing, > 0.
        k: number of nearest gate hyperplanes per input in the hinge mean, >= 1.
        ramp_epochs: epochs over which the weight rises linearly from 0, >= 0.
        estimator: ``"gaussian"`` (m probes, unbiased debiased distances; cost ~m
            forward-mode passes per input) or ``"exact"`` (n = prod(input_shape) passes).
        probes: m >= 3.
        exact_fraction: fraction of each batch with exact norms (``"gaussian"`` only).
        decision_weight: weight of the decision-boundary hinge (0: off).
        decision_gamma: its target distance (default ``gamma``).
        decision_k: number of nearest decision boundaries (at most C - 1 are finite).
        pool_gates: include the max-pool differences as gates.
        max_examples: regularise only the first ``max_examples`` images of each batch
            (batches are shuffled, so a random subsample): the cost knob.
        first_epoch: the ``epoch`` value of the first step (``train`` passes 1-based
            epochs: 1).

    Returns:
        :class:`MMRPenalty`, called as ``penalty(model, images, logits, epoch)``.
    """
    for name, value in (("weight", weight), ("decision_weight", decision_weight),
                        ("ramp_epochs", ramp_epochs)):
        if not _is_real(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    for name, value in (("gamma", gamma), ("decision_gamma", decision_gamma)):
        if value is not None and (not _is_real(value) or value <= 0):
            raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    for name, value in (("k", k), ("decision_k", decision_k)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if max_examples is not None and (not _is_int(max_examples) or max_examples < 1):
        raise ValueError(f"max_examples must be an integer >= 1 or None, got {max_examples!r}")
    if not _is_real(first_epoch):
        raise ValueError(f"first_epoch must be a finite number, got {first_epoch!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not _is_int(probes) or probes < MIN_PROBES:
        raise ValueError(f"probes must be an integer >= {MIN_PROBES}, got {probes!r}")
    if not _is_real(exact_fraction) or not 0.0 <= exact_fraction <= 1.0:
        raise ValueError(f"exact_fraction must be a number in [0, 1], got {exact_fraction!r}")
    if not isinstance(pool_gates, bool):
        raise ValueError(f"pool_gates must be True or False, got {pool_gates!r}")
    return MMRPenalty(float(weight), float(gamma), int(k), float(ramp_epochs), estimator,
                      int(probes), float(exact_fraction), float(decision_weight),
                      None if decision_gamma is None else float(decision_gamma),
                      int(decision_k), pool_gates, max_examples, float(first_epoch))
