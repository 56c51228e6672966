"""Walking the partition of input space into linear regions along a segment.

:func:`segment` follows the straight line from x0 to x1 and returns the exact
pieces on which the network is one affine map, with the breakpoints where the
line crosses a facet.

The walk: at a point x(t) = x0 + t (x1 - x0) one configuration pass gives the region
the line enters (tie-break along the segment, then along the OpenBox's u), every gate
row restricted to the line (:func:`openbox.constraints.step_along`) and so the next
breakpoint, where the first row of that region reaches zero. The pieces are
independent once their starting points are known, so the default walk
(``method="batched"``) splits [0, 1] into ``walkers`` equal sub-segments walked side by
side, one batched pass per step, and joins them at the seams; ``method="sequential"``
walks one point at a time. Both give the same pieces: a seam is walked from exactly the
configuration the sequential walk has there, and pieces that meet at a seam with equal
keys are merged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from openbox.configuration import Configuration, RegionKey, configure
from openbox.constraints import step_along
from openbox.linear_maps import compose_backward

DEFAULT_WALKERS = 64
"""Sub-segments walked side by side by ``method="batched"``. On the demo CNN (2 cores)
one pass over 64 points costs about as much as 5-8 passes over one."""

MIDPOINT_BATCH = 256
"""Piece midpoints evaluated per forward pass for the predicted class."""

LLC_BATCH = 16
"""Pieces whose (W, b) are composed per backward call with ``with_llc=True``."""


class Piece(NamedTuple):
    """One piece of a segment: ``x0 + t (x1 - x0)`` for t in [t_start, t_end] lies in
    the closure of one region.

    Attributes:
        t_start, t_end: the piece's ends, 0 <= t_start < t_end <= 1.
        region_key: the region's key (as :attr:`Explanation.region_key`).
        prediction: the predicted class at the piece's midpoint.
        weight: (C, *input_shape) W of the region with ``with_llc=True``, else None.
        bias: (C,) b of the region with ``with_llc=True``, else None.
    """

    t_start: float
    t_end: float
    region_key: RegionKey
    prediction: int
    weight: Tensor | None = None
    bias: Tensor | None = None


StepHook = Callable[[Tensor, Configuration, Tensor, Tensor], None]
"""``hook(walker_index (K,), configuration (K inputs), t (K,), t_next (K,))``, called for
every step of every active walker (float64 t on the CPU)."""


def _ends(ob, x0: Tensor, x1: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    x0 = ob.check_point(x0, "x0 (the segment's start)")
    x1 = ob.check_point(x1, "x1 (the segment's end)")
    direction = (x1 - x0)[0]
    if not bool(direction.abs().sum() > 0):
        raise ValueError("x0 and x1 are the same point; a segment needs two distinct ends")
    return x0, x1, direction


def walk(
    ob,
    x0: Tensor,
    x1: Tensor,
    *,
    walkers: int = DEFAULT_WALKERS,
    max_pieces: int = 100_000,
    progress: bool | None = None,
    on_step: StepHook | None = None,
    keep_configurations: bool = False,
) -> tuple[list[Piece], list[Configuration] | None]:
    """The walk behind :func:`segment`: ``walkers`` sub-segments side by side (1 = the
    sequential walk). Returns the pieces and, with ``keep_configurations``, the
    configuration of each piece (one input each)."""
    x0, x1, direction = _ends(ob, x0, x1)
    if walkers < 1:
        raise ValueError(f"walkers must be >= 1, got {walkers}")
    directions = torch.stack([direction, ob.direction])
    bounds = torch.linspace(0.0, 1.0, walkers + 1, dtype=torch.float64)
    bounds[-1] = 1.0
    t = bounds[:-1].clone()
    end = bounds[1:].clone()
    runs: list[list[Piece]] = [[] for _ in range(walkers)]
    confs: list[list[Configuration]] = [[] for _ in range(walkers)]
    active = torch.arange(walkers)
    eps = torch.finfo(x0.dtype).eps
    total = 0
    bar = tqdm(total=1.0, desc="segment", unit="t", leave=False,
               disable=not (True if progress is None else progress),
               bar_format="{l_bar}{bar}| {n:.3f} of t [{elapsed}, {postfix}]")
    with bar, torch.no_grad():
        while active.numel():
            ta = t[active]
            x = x0 + ta.to(x0.dtype).reshape(-1, *[1] * direction.dim()) * (x1 - x0)
            _, config, gates, _ = configure(
                ob.program, x, directions, ob.tol, record=True, context=ob.key_context
            )
            dt = step_along(ob.program, config, gates, ob.tol)
            t_next = torch.minimum(end[active], ta + dt)
            stuck = t_next <= ta  # rounding left us just short of the facet: nudge past it
            if bool(stuck.any()):
                nudge = ta + ta.abs().clamp_min(1.0) * eps * 16
                t_next = torch.where(stuck, torch.minimum(end[active], nudge), t_next)
            keys = config.region_keys()
            if on_step is not None:
                on_step(active, config, ta, t_next)
            for j, w in enumerate(active.tolist()):
                run = runs[w]
                if run and run[-1].region_key == keys[j]:
                    run[-1] = run[-1]._replace(t_end=float(t_next[j]))
                else:
                    run.append(Piece(float(ta[j]), float(t_next[j]), keys[j], -1))
                    total += 1
                    if keep_configurations:
                        confs[w].append(config[j])
            if total > max_pieces:
                raise RuntimeError(f"segment has more than {max_pieces} pieces; raise max_pieces")
            bar.update(float((t_next - ta).sum()))
            bar.set_postfix_str(f"{total} pieces", refresh=False)
            t[active] = t_next
            active = active[t_next < end[active]]
    pieces: list[Piece] = []
    kept: list[Configuration] = []
    for w in range(walkers):
        for i, p in enumerate(runs[w]):
            if pieces and pieces[-1].region_key == p.region_key:  # a seam inside one region
                pieces[-1] = pieces[-1]._replace(t_end=p.t_end)
                continue
            pieces.append(p)
            if keep_configurations:
                kept.append(confs[w][i])
    return _predict_midpoints(ob, x0, x1, pieces), (kept if keep_configurations else None)


def _predict_midpoints(ob, x0: Tensor, x1: Tensor, pieces: list[Piece]) -> list[Piece]:
    """Each piece with the program's predicted class at its midpoint (batched forwards,
    after merging, so that every walk reports the same classes)."""
    mids = torch.tensor([0.5 * (p.t_start + p.t_end) for p in pieces], dtype=x0.dtype,
                        device=x0.device)
    preds: list[int] = []
    with torch.no_grad():
        for i in range(0, len(pieces), MIDPOINT_BATCH):
            t = mids[i : i + MIDPOINT_BATCH].reshape(-1, *[1] * (x0.dim() - 1))
            preds += ob.program(x0 + t * (x1 - x0)).argmax(dim=1).tolist()
    return [p._replace(prediction=c) for p, c in zip(pieces, preds)]


def segment(
    ob,
    x0: Tensor,
    x1: Tensor,
    *,
    max_pieces: int = 100_000,
    progress: bool | None = None,
    method: str = "batched",
    walkers: int = DEFAULT_WALKERS,
    with_llc: bool = False,
) -> list[Piece]:
    """The exact linear pieces of the network along the segment from x0 to x1.

    At each point the configuration is taken with a lexicographic tie-break
    (:func:`openbox.configuration.configure`): first the segment's own direction, then the
    OpenBox's direction u for ties that persist along the line (two max-pool entries over
    a background both images share), i.e. the full-dimensional region the line enters;
    the next breakpoint is where the first gate constraint of that region reaches
    zero (:func:`openbox.constraints.step_along`). Consecutive pieces with equal keys are
    merged.

    Args:
        ob: an :class:`~openbox.OpenBox`.
        x0, x1: (*input_shape) endpoints (converted to the OpenBox's dtype; inside its
            domain, if one is declared, so the whole segment is).
        max_pieces: stop with RuntimeError beyond this many pieces.
        progress: a tqdm bar over t on stderr (default on; the walk of two test images
            of a CNN crosses thousands of regions).
        method: "batched" (``walkers`` sub-segments side by side; see the module
            docstring) or "sequential" (one point at a time). Same pieces either way.
        walkers: sub-segments of the batched walk.
        with_llc: attach each piece's (W, b), composed in batches after the walk (memory:
            one configuration per piece during the walk, then C x input size per piece).

    Returns:
        Ordered pieces covering [0, 1]: ``pieces[0].t_start == 0``,
        ``pieces[i].t_end == pieces[i + 1].t_start``, ``pieces[-1].t_end == 1``.
        A piece's key is the configuration of the region the piece's interior lies in
        (as ``ob.explain(x).region_key`` for x inside the piece and off every facet).
    """
    if method not in ("batched", "sequential"):
        raise ValueError(f"method must be 'batched' or 'sequential', got {method!r}")
    pieces, confs = walk(
        ob, x0, x1, walkers=walkers if method == "batched" else 1, max_pieces=max_pieces,
        progress=progress, keep_configurations=with_llc,
    )
    if not with_llc:
        return pieces
    eye = torch.eye(ob.num_classes, dtype=ob.dtype, device=ob.device)
    out = []
    with torch.no_grad():
        for i in range(0, len(pieces), LLC_BATCH):
            part = Configuration.concat(confs[i : i + LLC_BATCH])
            w, b = compose_backward(ob.program, part, eye.expand(part.batch_size, -1, -1))
            out += [p._replace(weight=w[j], bias=b[j])
                    for j, p in enumerate(pieces[i : i + LLC_BATCH])]
    return out
