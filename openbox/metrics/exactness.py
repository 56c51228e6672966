"""How well a method's own local model matches the network: at x (exactness) and around x
(local fidelity).

P_model(c | x) is softmax(model(x))[c] computed on a private copy of the model cast to x's
dtype (pass float64 inputs for a reference that rounding does not blur); the model itself is
never modified.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from openbox.engine import OpenBox
from openbox.explainers.base import Attribution
from openbox.metrics._common import ModelProbability, check_batch, check_target, generator


def _check_result(result: Attribution, x: Tensor) -> Tensor:
    if not isinstance(result, Attribution):
        raise TypeError(f"result must be an openbox.explainers.Attribution, got "
                        f"{type(result).__name__}")
    x = check_batch(x)
    if tuple(x.shape) != tuple(result.attribution.shape):
        raise ValueError(f"x must be the batch {result.method!r} explained, shape "
                         f"{tuple(result.attribution.shape)}; got {tuple(x.shape)}")
    return x


def exactness(result: Attribution, model: nn.Module, x: Tensor) -> Tensor:
    """Error of a method's own probability at the explained inputs.

    e_b = |P_method(c_b | x_b) - P_model(c_b | x_b)|, c = ``result.target``,
    P_method = ``result.probability``, P_model = softmax(model(x))[c] in x's dtype.

    Args:
        result: what the method returned for x.
        model: the explained network (not modified).
        x: (B, *input_shape) the explained inputs.

    Returns:
        (B,) errors in x's dtype (~1e-16 for ``openbox`` in float64).

    Raises:
        ValueError: ``result.probability`` is None (the method has no local model; the
            message names it), or x does not match the result.
    """
    x = _check_result(result, x)
    if result.probability is None:
        raise ValueError(f"the {result.method!r} method has no local model (its probability is "
                         "None): exactness is defined only for methods that estimate P(c | x)")
    prob = ModelProbability(model, x.dtype, x.device)
    target = check_target(result.target, x.shape[0], prob.classes(x)).to(x.device)
    p_model = prob(x, target)
    return (result.probability.to(dtype=x.dtype, device=x.device) - p_model).abs()


@dataclass(frozen=True, eq=False)
class LocalFidelity:
    """What :func:`local_fidelity` returns (B inputs, S scales, n neighbours per scale).

    Attributes:
        scales: (S,) the noise standard deviations sigma.
        errors: (B, S, n) |surrogate_b(x') - P_model(c_b | x')| at each neighbour x'.
        mean: (B, S) errors averaged over the n neighbours.
        sample_error: (B,) mean |P_model(c_b | s) - surrogate_b(s)| over the method's own
            fitted samples s (``surrogates[b].samples``), or None when the method keeps none.
        left_region: (B, S, n) bool, True where x' lies in another linear region of the
            network than x_b (its region key differs), or None when no OpenBox is used.
    """

    scales: Tensor
    errors: Tensor
    mean: Tensor
    sample_error: Tensor | None
    left_region: Tensor | None


def neighbours(x: Tensor, scales: Sequence[float], n: int, seed: int,
               clip: tuple[float, float] | None = None) -> Tensor:
    """The Gaussian neighbours :func:`local_fidelity` uses: (B, S, n, *in).

    x'_{b,s,i} = x_b + sigma_s * eps_{b,s,i}, eps ~ N(0, I) drawn in one call
    ``torch.randn((B, S, n, *in), generator=Generator(x.device).manual_seed(seed))`` in x's
    dtype, then clamped to ``clip = (lo, hi)`` when given.
    """
    g = generator(seed, x.device)
    sig = torch.as_tensor(list(scales), dtype=x.dtype, device=x.device)
    eps = torch.randn((x.shape[0], len(sig), n, *x.shape[1:]), generator=g, dtype=x.dtype,
                      device=x.device)
    out = x[:, None, None] + sig.reshape(1, -1, 1, *([1] * (x.dim() - 1))) * eps
    if clip is not None:
        out = out.clamp(float(clip[0]), float(clip[1]))
    return out


def local_fidelity(
    result: Attribution,
    model: nn.Module,
    x: Tensor,
    *,
    scales: Sequence[float] = (1e-3, 1e-2, 1e-1),
    n: int = 16,
    seed: int = 0,
    clip: tuple[float, float] | None = None,
    openbox: OpenBox | None = None,
) -> LocalFidelity:
    """Error of each input's surrogate on Gaussian neighbours, and on its own samples.

    For input b, scale sigma_s and neighbour i (see :func:`neighbours`; no clipping unless
    ``clip`` is given):

        errors[b, s, i] = |surrogate_b.predict(x'_{b,s,i}) - P_model(c_b | x'_{b,s,i})|,
        mean[b, s] = (1/n) sum_i errors[b, s, i].

    ``sample_error[b]`` = (1/N_b) sum_j |P_model(c_b | s_j) - samples.surrogate_j| over the
    method's own samples s_j = ``samples.inputs``: the model side is *recomputed* from the
    inputs (in x's dtype) rather than read from ``samples.model``, so every method is scored
    against the same reference. None when no surrogate keeps samples.

    ``left_region`` (when ``openbox`` is given, or the result's method is ``"openbox"``, for
    which an OpenBox of ``model`` in the attribution's dtype is built): True where the region
    key of x' (its activation pattern and max-pool selections) differs from x_b's. The
    input-domain box is not part of the key: use ``clip`` to keep neighbours inside it. For
    ``openbox`` the error is ~1e-16 (float64) wherever left_region is False: the surrogate
    is the network on that region.

    Args:
        result: what the method returned for x; must have ``surrogates``.
        model: the explained network (not modified).
        x: (B, *input_shape) the explained inputs.
        scales: the S noise standard deviations (positive).
        n: neighbours per scale (>= 1).
        seed: seed of the neighbours (a private torch.Generator).
        clip: optional (lo, hi) box the neighbours are clamped to.
        openbox: an :class:`~openbox.OpenBox` of the same model, for ``left_region``.

    Returns:
        a :class:`LocalFidelity`; errors in x's dtype.

    Raises:
        ValueError: ``result.surrogates`` is None (naming the method), bad scales / n / clip,
            some surrogates keep samples and others do not.
    """
    x = _check_result(result, x)
    if result.surrogates is None:
        raise ValueError(f"the {result.method!r} method has no surrogate (its surrogates are "
                         "None): local fidelity needs the method's local model")
    if len(result.surrogates) != x.shape[0]:
        raise ValueError(f"result has {len(result.surrogates)} surrogates for {x.shape[0]} "
                         "inputs")
    scales = [float(s) for s in scales]
    if not scales or any(not (s > 0 and s < float("inf")) for s in scales):
        raise ValueError(f"scales must be a non-empty sequence of positive floats, got {scales}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if clip is not None and (len(clip) != 2 or not float(clip[0]) <= float(clip[1])):
        raise ValueError(f"clip must be None or (lo, hi) with lo <= hi, got {clip!r}")
    prob = ModelProbability(model, x.dtype, x.device)
    batch, n_scales = x.shape[0], len(scales)
    target = check_target(result.target, batch, prob.classes(x)).to(x.device)
    xs = neighbours(x, scales, n, seed, clip)                         # (B, S, n, *in)
    flat = xs.reshape(batch, n_scales * n, *x.shape[1:])
    errors = torch.empty(batch, n_scales * n, dtype=x.dtype, device=x.device)
    for b, surrogate in enumerate(result.surrogates):
        pred = torch.as_tensor(surrogate.predict(flat[b])).to(dtype=x.dtype, device=x.device)
        if pred.shape != (n_scales * n,):
            raise ValueError(f"{result.method!r}: surrogate {b} returned shape "
                             f"{tuple(pred.shape)} for {n_scales * n} inputs")
        errors[b] = (pred.reshape(-1) - prob(flat[b], target[b].expand(n_scales * n))).abs()
    errors = errors.reshape(batch, n_scales, n)

    has = [s.samples is not None for s in result.surrogates]
    sample_error = None
    if any(has):
        if not all(has):
            raise ValueError(f"{result.method!r}: surrogates of inputs "
                             f"{[b for b, h in enumerate(has) if not h][:10]} keep no samples "
                             "while others do")
        sample_error = torch.empty(batch, dtype=x.dtype, device=x.device)
        for b, surrogate in enumerate(result.surrogates):
            s = surrogate.samples
            inp = check_batch(torch.as_tensor(s.inputs), f"surrogates[{b}].samples.inputs",
                              x.shape[1:])
            sur = torch.as_tensor(s.surrogate).to(dtype=x.dtype, device=x.device).reshape(-1)
            if sur.shape[0] != inp.shape[0]:
                raise ValueError(f"{result.method!r}: surrogates[{b}].samples has "
                                 f"{inp.shape[0]} inputs and {sur.shape[0]} predictions")
            p = prob(inp.to(dtype=x.dtype, device=x.device), target[b].expand(inp.shape[0]))
            sample_error[b] = (p - sur).abs().mean()

    if openbox is None and result.method == "openbox":
        openbox = OpenBox(model, x.shape[1:], dtype=result.attribution.dtype, device=x.device)
    left = None
    if openbox is not None:
        if not isinstance(openbox, OpenBox):
            raise TypeError(f"openbox must be an openbox.OpenBox, got {type(openbox).__name__}")
        left = torch.empty(batch, n_scales * n, dtype=torch.bool)
        for b in range(batch):
            keys = region_keys(openbox, torch.cat([x[b : b + 1], flat[b]]))
            left[b] = torch.tensor([k != keys[0] for k in keys[1:]])
        left = left.reshape(batch, n_scales, n).to(x.device)
    return LocalFidelity(torch.tensor(scales, dtype=x.dtype), errors, errors.mean(2),
                         sample_error, left)


def region_keys(openbox: OpenBox, x: Tensor) -> list:
    """Region keys of x (N, *in) under ``openbox``, without its domain check (points a
    perturbation pushed out of the declared domain still have a configuration)."""
    x = x.to(dtype=openbox.dtype, device=openbox.device)
    keys: list = []
    for i in range(0, x.shape[0], openbox.batch_size):
        keys += list(openbox.configure(x[i : i + openbox.batch_size]).configuration
                     .region_keys())
    return keys
