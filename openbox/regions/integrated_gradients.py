"""Exact integrated gradients: the path integral summed over the path's linear pieces.

Integrated gradients (Sundararajan et al., 2017) attributes
``IG_i = (x - x')_i * integral_0^1 d f_c(x' + t (x - x')) / d x_i dt`` to input i. On a
piecewise-linear network the gradient is constant on every piece of the straight path
(the row W[c] of the piece's region), so the integral is the finite sum
``sum_pieces (t_end - t_start) * W_piece[c]``: no Riemann error, and completeness
``sum_i IG_i = f_c(x) - f_c(x')`` holds to rounding (~1e-15 in float64).

:func:`integrated_gradients` walks each path with :func:`openbox.regions.segment.walk`
and composes only the target row of each piece's LLC (one backward row per walker and
step), summed over the walk's chain of steps (a walker's first point, which the walker
before it covers, is not counted). :class:`ExactIntegratedGradients` wraps it in
Captum's ``IntegratedGradients`` interface so Captum users can drop it in.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from openbox.configuration import Configuration, line_split
from openbox.linear_maps import backward_from, backward_to, compose_backward
from openbox.regions.segment import DEFAULT_WALKERS, walk


class _TargetRowIG:
    """The walk's accumulator of exact IG (:class:`openbox.regions.segment.SplitAccumulate`):
    per step ``(t_next - t) * W[c]``, the target row of the step's region; with a tail,
    the row pushed back to the tail's split per step and through the head's gates once
    per pass (the head's Jacobian is the same for all steps of a pass, and the sum is
    linear)."""

    def __init__(self, ob, target: int):
        self.ob = ob
        self.row = torch.zeros((1, 1, ob.num_classes), dtype=ob.dtype, device=ob.device)
        self.row[0, 0, target] = 1
        split = line_split(ob.program)
        self.value = None if split is None else split + 1  # the program value at the split

    def _dt(self, t: Tensor, t_next: Tensor, dims: int) -> Tensor:
        return (t_next - t).to(self.ob.dtype).to(self.ob.device).reshape(-1, *[1] * dims)

    def whole(self, config: Configuration, logits, t: Tensor, t_next: Tensor) -> Tensor:
        w, _ = compose_backward(self.ob.program, config,
                                self.row.expand(config.batch_size, -1, -1))
        return w[:, 0] * self._dt(t, t_next, w.dim() - 2)

    def tail(self, config: Configuration, t: Tensor, t_next: Tensor) -> Tensor:
        g = backward_to(self.ob.program, config, self.row.expand(config.batch_size, -1, -1),
                        self.value)
        return g[:, 0] * self._dt(t, t_next, g.dim() - 2)

    def head(self, config: Configuration, value: Tensor) -> Tensor:
        return backward_from(self.ob.program, config, value.unsqueeze(1), self.value)[:, 0]


def _targets(target, logits: Tensor) -> Tensor:
    """(B,) int64 targets from None (the predicted class), an int, or a (B,) tensor."""
    b, c = logits.shape
    if target is None:
        return logits.argmax(dim=1)
    t = torch.as_tensor(target).to(torch.int64).reshape(-1).cpu()
    if t.numel() == 1:
        t = t.expand(b)
    if t.shape != (b,):
        raise ValueError(f"target must be an int or a ({b},) tensor, got shape {tuple(t.shape)}")
    if bool(((t < 0) | (t >= c)).any()):
        raise ValueError(f"target must lie in [0, {c}), got {t.tolist()[:10]}")
    return t.to(logits.device)


def integrated_gradients(
    ob,
    x: Tensor,
    baseline: Tensor | None = None,
    target=None,
    *,
    walkers: int = DEFAULT_WALKERS,
    progress: bool | None = None,
    return_pieces: bool = False,
):
    """Exact integrated gradients of x (B, *input_shape) from ``baseline`` for ``target``.

    Args:
        ob: an :class:`~openbox.OpenBox`.
        x: (B, *input_shape) inputs (converted to the OpenBox's dtype).
        baseline: (B, *input_shape) or (*input_shape) baselines; default zeros.
        target: int, (B,) tensor, or None for the predicted class at x.
        walkers: sub-segments walked side by side per path (see :func:`segment`).
        progress: tqdm bars on stderr (default on).
        return_pieces: also return the number of linear pieces of each path.

    Returns:
        (B, *input_shape) attributions in the OpenBox's dtype; with ``return_pieces`` a
        pair (attributions, pieces (B,) int64). Completeness: ``attr[b].sum() ==
        f(x[b])[c] - f(baseline[b])[c]`` to rounding.
    """
    x = ob.check_input(x)
    if baseline is None:
        baseline = torch.zeros_like(x)
    else:
        baseline = torch.as_tensor(baseline)
        if tuple(baseline.shape) == ob.input_shape:
            baseline = baseline.expand_as(x)
        baseline = ob.check_input(baseline, "baseline")
        if baseline.shape != x.shape:
            raise ValueError(f"baseline must have shape {tuple(x.shape)} or "
                             f"{ob.input_shape}, got {tuple(baseline.shape)}")
    with torch.no_grad():
        logits = ob.program(x)
    targets = _targets(target, logits)
    out = torch.zeros_like(x)
    counts = torch.zeros(x.shape[0], dtype=torch.int64)
    for b in range(x.shape[0]):
        if bool((x[b] == baseline[b]).all()):
            continue  # a zero-length path: every attribution is 0
        step_value = _TargetRowIG(ob, int(targets[b]))
        pieces, _, total = walk(ob, baseline[b], x[b], walkers=walkers, progress=progress,
                                accumulate=step_value)
        out[b] = total * (x[b] - baseline[b])
        counts[b] = len(pieces)
    return (out, counts) if return_pieces else out


class ExactIntegratedGradients:
    """Captum's ``IntegratedGradients`` interface over exact integrated gradients.

    >>> ig = ExactIntegratedGradients(model, input_shape=(1, 28, 28))
    >>> attr, delta = ig.attribute(x, baselines=None, target=3, return_convergence_delta=True)

    Args:
        model: the network (an ``nn.Module`` openbox compiles), or an existing
            :class:`~openbox.OpenBox`.
        input_shape: per-example input shape (needed with an ``nn.Module``).
        dtype: working dtype (float64 by default: completeness to ~1e-15).
        **options: passed to :class:`~openbox.OpenBox` (device, domain, ...).
    """

    def __init__(self, model, input_shape: Sequence[int] | None = None,
                 dtype: torch.dtype = torch.float64, **options):
        from openbox.engine import OpenBox

        if isinstance(model, OpenBox):
            self.openbox = model
        elif isinstance(model, nn.Module):
            if input_shape is None:
                raise ValueError("input_shape is needed to compile an nn.Module")
            self.openbox = OpenBox(model, input_shape, dtype=dtype, **options)
        else:
            raise TypeError(f"model must be an nn.Module or an OpenBox, got {type(model)}")

    def attribute(self, inputs: Tensor, baselines=None, target=None,
                  return_convergence_delta: bool = False, *, progress: bool | None = False):
        """Attributions shaped like ``inputs`` (B, *input_shape), in the working dtype.

        ``baselines``: None (zeros), a scalar, or a tensor broadcastable to ``inputs``, as
        in Captum. ``target``: int, (B,) tensor or None (Captum requires it for multi-class
        outputs; here None means the predicted class). With ``return_convergence_delta``
        also returns (B,) ``sum(attr) - (f(x)[c] - f(baseline)[c])``, the completeness
        error (Captum's convergence delta; ~1e-15 in float64).
        """
        ob = self.openbox
        x = ob.check_input(inputs, "inputs")
        if baselines is None:
            base = torch.zeros_like(x)
        else:
            base = torch.as_tensor(baselines, dtype=x.dtype, device=x.device)
            base = base.expand_as(x).clone()
        attr = integrated_gradients(ob, x, base, target, progress=progress)
        if not return_convergence_delta:
            return attr
        with torch.no_grad():
            fx, fb = ob.program(x), ob.program(base)
        c = _targets(target, fx)
        rows = torch.arange(x.shape[0], device=x.device)
        delta = attr.flatten(1).sum(1) - (fx[rows, c] - fb[rows, c])
        return attr, delta
