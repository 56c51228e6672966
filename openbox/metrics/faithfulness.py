"""Deletion and insertion curves (pixel flipping) of an attribution map, and their areas."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from openbox.metrics._common import ModelProbability, check_batch, check_target


@dataclass(frozen=True, eq=False)
class Faithfulness:
    """What :func:`faithfulness` returns (B inputs, S steps).

    Attributes:
        fractions: (S+1,) fraction of input elements removed (deletion) or restored
            (insertion) at each point, from 0 to 1.
        counts: (S+1,) int64 the same as numbers of elements, k_s = fractions[s] * D.
        deletion: (B, S+1) P(c_b | x_b with its top-k_s elements set to the baseline).
        insertion: (B, S+1) P(c_b | the baseline with x_b's top-k_s elements restored).
        deletion_auc: (B,) trapezoid area under ``deletion`` over ``fractions`` (lower:
            the map found what the decision needs).
        insertion_auc: (B,) likewise for ``insertion`` (higher is better).
    """

    fractions: Tensor
    counts: Tensor
    deletion: Tensor
    insertion: Tensor
    deletion_auc: Tensor
    insertion_auc: Tensor


def removal_order(attribution: Tensor) -> Tensor:
    """(B, *in) -> (B, D) int64: element indices of each flattened map by decreasing
    attribution, ties in increasing index order (a stable sort of -attribution)."""
    a = attribution.reshape(attribution.shape[0], -1)
    return torch.sort(-a, dim=1, stable=True).indices


def _counts(d: int, steps: int | None, fractions: Sequence[float] | None) -> Tensor:
    if fractions is None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        s = torch.arange(steps + 1, dtype=torch.int64)
        return (2 * d * s + steps) // (2 * steps)        # round(d * s / steps), halves up
    f = torch.as_tensor(list(fractions), dtype=torch.float64)
    if f.dim() != 1 or f.numel() < 2 or f[0] != 0 or f[-1] != 1 or bool((f[1:] < f[:-1]).any()):
        raise ValueError("fractions must be a non-decreasing sequence from 0 to 1, got "
                         f"{list(fractions)!r}")
    return torch.floor(f * d + 0.5).to(torch.int64)


def faithfulness(
    model: nn.Module,
    x: Tensor,
    attribution: Tensor,
    target,
    *,
    steps: int | None = 20,
    fractions: Sequence[float] | None = None,
    baseline: float | Tensor = 0.0,
    batch_size: int = 256,
) -> Faithfulness:
    """Deletion and insertion curves of an attribution (Petsiuk et al. 2018's RISE metrics).

    Order the D elements of each input by decreasing attribution (:func:`removal_order`:
    ties broken by increasing flat index, deterministically). With k_s elements taken at
    step s (mask m_s = 1 on the first k_s of that order),

        deletion[b, s]  = P(c_b | x_b * (1 - m_s) + baseline * m_s)
        insertion[b, s] = P(c_b | baseline * (1 - m_s) + x_b * m_s)
        *_auc[b] = trapezoid(curve[b], fractions)

    where P = softmax(model(.))[c] on a copy of the model in x's dtype. The curves start at
    0 elements taken (deletion[:, 0] = P(c | x), insertion[:, 0] = P(c | baseline)) and end
    at all D.

    Args:
        model: the classifier (not modified).
        x: (B, *input_shape) inputs; attribution: a map of the same shape.
        target: an int or (B,) classes.
        steps: S, with k_s = round(D s / S) (halves up) for s = 0..S; ignored when
            ``fractions`` is given.
        fractions: an explicit non-decreasing sequence from 0 to 1; k_s = round(f_s D) and
            the reported fractions are k_s / D.
        baseline: the value of a removed element: a float, or a tensor (*input_shape) or
            (B, *input_shape).
        batch_size: curve points evaluated per forward pass.

    Returns:
        a :class:`Faithfulness` (curves in x's dtype).
    """
    x = check_batch(x)
    a = check_batch(attribution, "attribution")
    if a.shape != x.shape:
        raise ValueError(f"attribution must have x's shape {tuple(x.shape)}, got "
                         f"{tuple(a.shape)}")
    batch, d = x.shape[0], x[0].numel()
    base = torch.as_tensor(baseline, dtype=x.dtype, device=x.device)
    if base.dim() == 0 or tuple(base.shape) == tuple(x.shape[1:]):
        base = base.expand_as(x)
    elif tuple(base.shape) != tuple(x.shape):
        raise ValueError(f"baseline must be a float or a tensor of shape {tuple(x.shape[1:])} "
                         f"or {tuple(x.shape)}, got {tuple(base.shape)}")
    if not bool(torch.isfinite(base).all()):
        raise ValueError("baseline contains NaN or Inf")
    counts = _counts(d, steps, fractions)
    prob = ModelProbability(model, x.dtype, x.device, batch_size)
    target = check_target(target, batch, prob.classes(x)).to(x.device)

    order = removal_order(a.to(x.device))                                  # (B, D)
    # rank of each element in the order: element e is taken at step s iff rank[e] < k_s
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(d, device=x.device).expand(batch, d))
    k = counts.to(x.device)
    n_points = len(k)
    p = torch.empty(batch, 2, n_points, dtype=x.dtype, device=x.device)
    for b in range(batch):                    # one input's curve points per forward batch
        mask = rank[b][None, :] < k[:, None]                              # (S+1, D)
        xb, bb = x[b].reshape(1, d), base[b].reshape(1, d)
        points = torch.cat([torch.where(mask, bb, xb), torch.where(mask, xb, bb)])
        p[b] = prob(points.reshape(-1, *x.shape[1:]),
                    target[b].expand(2 * n_points)).reshape(2, n_points)
    frac = counts.to(x.dtype) / d
    deletion, insertion = p[:, 0], p[:, 1]
    return Faithfulness(frac, counts, deletion, insertion,
                        torch.trapezoid(deletion, frac.to(x.device), dim=1),
                        torch.trapezoid(insertion, frac.to(x.device), dim=1))
