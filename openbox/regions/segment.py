"""Walking the partition of input space into linear regions along a segment.

:func:`segment` follows the straight line from x0 to x1 and returns the exact
pieces on which the network is one affine map, with the breakpoints where the
line crosses a facet.

The walk is a chain of points. At a point t one pass of :func:`configure_line` gives the
region the line enters there (tie-break along the segment, then along the OpenBox's u)
and the region's exit along the line, where its first falling gate row reaches zero
(:func:`openbox.constraints.relu_line_exit`, :func:`~openbox.constraints.pool_line_exit`);
the exit is the next point. The exit is computed from the region's own affine gate
inputs, not from the point, so the chain from any point of a region continues the same:
the default walk (``method="batched"``) starts ``walkers`` points spread over [0, 1],
configures them side by side in one pass per step, and joins a walker to the next one
where it lands exactly on a point of that walker's chain. The result is the sequential
walk's chain (``method="sequential"``), bit for bit. Facets of the program's tail (the
gates after its last affine map) are crossed by running the tail alone
(:func:`~openbox.configuration.configure_line_tail`) while no head gate comes near a tie,
which gives what a pass would, bit for bit. ``method="pointwise"`` is the walk before the
line pass (one full configuration pass of the point itself per step), kept as the
benchmark's baseline.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from openbox.configuration import (
    Configuration,
    RegionKey,
    configure,
    configure_line,
    configure_line_tail,
    keys_of,
    line_split,
    with_head,
)
from openbox.constraints import step_along
from openbox.linear_maps import compose_backward

DEFAULT_WALKERS = 64
"""Sub-segments walked side by side by ``method="batched"``. On the demo CNN (2 cores)
one pass over 64 points costs about as much as 5-8 passes over one."""

MIDPOINT_BATCH = 256
"""Piece midpoints evaluated per forward pass for the predicted class."""

METHODS = ("batched", "sequential", "pointwise")
"""Walks :func:`segment` offers: walkers side by side, one walker, and the walk before
the line pass (one full configuration pass per point)."""

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


SYNC_STEPS = 16
"""A walker is joined by the walker before it only at one of its first SYNC_STEPS pass
points (see :func:`walk`); past them it is paused when that walker overtakes it."""

REFILL_PIECES = 8
"""A new walker is started in a stretch of the segment only when the walker before it
expects at least this many pieces there (at its mean piece length so far)."""


class _Walker:
    """One walker of :func:`walk`: the chain of points it configured from ``start``."""

    __slots__ = ("start", "t", "ts", "keys", "maps", "confs", "early", "marks", "passes",
                 "link", "done", "entered", "slot")

    def __init__(self, start: float, slot: int):
        self.start = start
        self.t = start
        self.ts: list[float] = []  # the points of its steps, in order
        self.keys: list[RegionKey] = []  # their regions
        self.maps: list[np.ndarray] = []  # (2, C): logits and their rates there
        self.confs: list[Configuration] = []
        self.early: list[tuple[int, Tensor]] = []  # (first step, value) of its first passes
        self.marks: list[float] = []  # its pass points that others may join at
        self.passes = 0
        self.link: tuple[_Walker, int] | None = None  # joined that walker at that step
        self.done = False  # reached t = 1, joined another walker, or paused
        self.entered = False  # another walker joined this one
        self.slot = slot  # row of the accumulator


Accumulate = Callable[[Configuration, Tensor, Tensor, Tensor], Tensor]
"""``accumulate(configuration (K inputs), logits (K, C), t (K,), t_next (K,)) -> (K, *S)``:
a value per step (e.g. ``(t_next - t) * W[c]`` for exact IG); :func:`walk` returns its sum
over the steps of the final chain."""


class SplitAccumulate(Protocol):
    """An :data:`Accumulate` that is linear in a value at the program's tail split
    (:func:`line_split`), so :func:`walk` can sum the tail steps of one pass before the
    head part is applied once: the value of a step is ``head(config, tail(config, t,
    t_next))`` with ``head`` linear in its second argument and depending on the head
    gates only (exact IG: the target row's gradient, pushed back to the split per step
    and through the layers before it once per pass)."""

    def whole(self, config: Configuration, logits: Tensor, t: Tensor,
              t_next: Tensor) -> Tensor:
        """(K, *S) the value of a step, for programs without a tail."""

    def tail(self, config: Configuration, t: Tensor, t_next: Tensor) -> Tensor:
        """(K, *V) the step's value at the split (reads the tail gates only)."""

    def head(self, config: Configuration, value: Tensor) -> Tensor:
        """(K, *S) summed split values (K, *V) carried through the head's gates."""


def walk(
    ob,
    x0: Tensor,
    x1: Tensor,
    *,
    walkers: int = DEFAULT_WALKERS,
    max_pieces: int = 100_000,
    progress: bool | None = None,
    accumulate: Accumulate | SplitAccumulate | None = None,
    keep_configurations: bool = False,
) -> tuple[list[Piece], list[Configuration] | None, Tensor | None]:
    """The walk behind :func:`segment`, with ``walkers`` points configured side by side
    (1 = the sequential walk).

    The walk is a chain of steps. A *pass point* t gets one full pass
    (:func:`configure_line`): the region at t and its exit along the line. When the
    program has a tail (:func:`line_split`: the gates after its last affine map) and the
    region's first falling row is a tail row, the walk crosses it with the tail alone
    (:func:`configure_line_tail`, no pass through the layers before), step after step,
    while no head gate comes near a tie (``head_guard``: there a pass would choose the
    same head gates, so a tail step gives what a pass would, bit for bit); the next point
    past that is a pass point. Points are exits (or t nudged by 16 ulps when rounding puts
    an exit at or before t), capped at 1. Exits depend on the region only,
    so **the chain from a pass point is a function of that point alone**. Walker 0 starts
    at 0 (it is the sequential walk); the others start inside [0, 1], and each walker runs
    until it reaches 1 or lands exactly (bit for bit) on one of the first
    :data:`SYNC_STEPS` pass points of a later walker, where it joins that walker's
    chain. Following the joins from walker 0 gives exactly the sequential chain; a
    walker's first steps before its first joinable point are never part of it. A walker
    overtaken without a join is paused (and resumed if someone joins it later). When
    fewer than ``walkers`` remain, new ones start in the middle of the longest stretches
    still ahead of a walker.

    Returns the pieces, with ``keep_configurations`` the configuration of each piece (one
    input each), and with ``accumulate`` its sum over the chain's steps.
    """
    x0, x1, direction = _ends(ob, x0, x1)
    if walkers < 1:
        raise ValueError(f"walkers must be >= 1, got {walkers}")
    split = line_split(ob.program)
    grouped = accumulate is not None and hasattr(accumulate, "tail") and split is not None
    per_step = None if accumulate is None or grouped else getattr(accumulate, "whole",
                                                                   accumulate)
    eps = float(torch.finfo(x0.dtype).eps)
    order: list[_Walker] = [_Walker(i / walkers, i) for i in range(walkers)]
    slots = walkers
    marks: dict[float, tuple[_Walker, int]] = {}  # a pass point -> (walker, step index)
    acc = None
    steps = 0
    one = torch.ones((), dtype=torch.float64)
    bar = _bar(progress)
    with bar, torch.no_grad():
        while True:
            active = [w for w in order if not w.done]
            if not active:
                break
            if len(active) < walkers and len(order) < 64 * walkers:
                slots = _refill(order, walkers - len(active), slots)
                active = [w for w in order if not w.done]
            ts = torch.tensor([w.t for w in active], dtype=torch.float64)
            lp = configure_line(ob.program, x0, direction, ob.direction, ts, ob.tol,
                                context=ob.key_context, split=split)
            for w in active:
                w.passes += 1
                if 2 <= w.passes <= SYNC_STEPS + 1:  # not its start: a point of a chain
                    marks.setdefault(w.t, (w, len(w.ts)))
                    w.marks.append(w.t)
            rows = torch.arange(len(active))
            t, config, logits, rates, ex = ts, lp.configuration, lp.logits, lp.rates, lp.exit
            first = [len(w.ts) for w in active]  # step index of each walker's pass point
            pending = None  # grouped: the pass's summed split values per row
            packed = config.packed()
            if lp.tail is not None:
                guard = lp.tail.head_guard
                head_bytes = packed[:, : config.packed_width(lp.tail.split)]
            while True:  # the pass's step, then the tail's steps inside the head's region
                nudge = torch.minimum(t + t.abs().clamp_min(1.0) * (16 * eps), one)
                t_next = torch.where(ex > t, torch.minimum(ex, one), nudge)
                if grouped:
                    part = accumulate.tail(config, t, t_next)
                    if pending is None:
                        pending = part.new_zeros((len(active), *part.shape[1:]))
                    pending.index_add_(0, rows.to(part.device), part)
                elif per_step is not None:
                    val = per_step(config, logits, t, t_next)
                    acc = _grow(acc, val, slots)
                    acc.index_add_(0, torch.tensor([active[j].slot for j in rows.tolist()],
                                                   device=val.device), val)
                keys = keys_of(packed, ob.key_context)
                nxt = t_next.tolist()
                lr = torch.stack([logits, rates], 1).double().cpu().numpy()  # (b, 2, C)
                for i, j in enumerate(rows.tolist()):
                    w = active[j]
                    w.ts.append(w.t)
                    w.keys.append(keys[i])
                    w.maps.append(lr[i])
                    if keep_configurations:
                        w.confs.append(config[i])
                    if per_step is not None and w.passes <= SYNC_STEPS + 1:
                        w.early.append((len(w.ts) - 1, val[i].clone()))
                    w.t = nxt[i]
                steps += rows.numel()
                if steps > max_pieces + len(order) * (SYNC_STEPS + 1):
                    raise RuntimeError(
                        f"segment has more than {max_pieces} pieces; raise max_pieces")
                if lp.tail is None:
                    break
                inner = (t_next < guard[rows]) & (t_next < 1.0)
                if not bool(inner.any()):
                    break
                sub = inner.nonzero().flatten()
                rows, t = rows[sub], t_next[sub]
                gates, logits, rates, tail_exit = configure_line_tail(
                    ob.program, lp.tail, rows, t, ob.tol)
                packed = np.concatenate([head_bytes[rows.numpy()], gates.packed()], axis=1)
                if per_step is not None or keep_configurations:
                    config = with_head(lp.configuration, gates, lp.tail, rows)
                else:
                    config = gates  # the tail's gates: all a grouped accumulate reads
                ex = torch.minimum(lp.tail.head_exit[rows], tail_exit)
            if grouped:  # the pass's tail sums through the head gates, once per walker
                val = accumulate.head(lp.configuration, pending)
                acc = _grow(acc, val, slots)
                acc.index_add_(0, torch.tensor([w.slot for w in active], device=val.device),
                               val)
                for j, w in enumerate(active):
                    if w.passes <= SYNC_STEPS + 1:
                        w.early.append((first[j], val[j].clone()))
            for w in active:
                _advance(w, order, marks)
            bar.n = _covered(order)
            bar.set_postfix_str(f"{steps} steps, {len(order)} walkers", refresh=False)
            bar.refresh()
    chain: list[tuple[_Walker, int]] = []
    w, m = order[0], 0
    while True:
        chain.append((w, m))
        if w.link is None:
            break
        w, m = w.link
    if chain[-1][0].t != 1.0:
        raise RuntimeError("segment: the walk's chain does not reach t = 1 (a bug)")
    pieces: list[Piece] = []
    maps: list[tuple[float, np.ndarray]] = []  # (t, (logits, rates) there) per piece
    kept: list[Configuration] = []
    for w, m in chain:
        for j in range(m, len(w.ts)):
            t_end = w.ts[j + 1] if j + 1 < len(w.ts) else w.t
            if pieces and pieces[-1].region_key == w.keys[j]:
                pieces[-1] = pieces[-1]._replace(t_end=t_end)
                continue
            pieces.append(Piece(w.ts[j], t_end, w.keys[j], -1))
            maps.append((w.ts[j], w.maps[j]))
            if keep_configurations:
                kept.append(w.confs[j])
    if len(pieces) > max_pieces:
        raise RuntimeError(f"segment has more than {max_pieces} pieces; raise max_pieces")
    total = None
    if accumulate is not None:
        total = torch.zeros_like(acc[0])
        for w, m in chain:  # each walker from its joined step on
            total += acc[w.slot]
            for step, v in w.early:
                if step < m:
                    total -= v
    # the predicted class at each piece's midpoint, from its region's affine logits
    pieces = [p._replace(prediction=int(np.argmax(lr[0] + (0.5 * (p.t_start + p.t_end) - t)
                                                   * lr[1])))
              for p, (t, lr) in zip(pieces, maps)]
    return pieces, (kept if keep_configurations else None), total


def _bar(progress: bool | None) -> tqdm:
    """The walks' progress bar over t on stderr (default on)."""
    return tqdm(total=1.0, desc="segment", unit="t", leave=False,
                disable=not (True if progress is None else progress),
                bar_format="{l_bar}{bar}| {n:.3f} of t [{elapsed}, {postfix}]")


def _grow(acc: Tensor | None, val: Tensor, slots: int) -> Tensor:
    """The accumulator (slots, *S), grown (doubling) to hold ``slots`` walkers."""
    if acc is not None and acc.shape[0] >= slots:
        return acc
    grown = val.new_zeros((max(slots, 2 * (0 if acc is None else acc.shape[0])),
                           *val.shape[1:]))
    if acc is not None:
        grown[: acc.shape[0]] = acc
    return grown


def _advance(w: _Walker, order: list[_Walker], marks) -> None:
    """After the steps of walker w up to its next pass point: stop it at t = 1, join it
    to a later walker whose chain it landed on, and pause the walker after it once it is
    overtaken without a join."""
    if w.t >= 1.0:
        w.done = True
        return
    hit = marks.get(w.t)
    if hit is not None and hit[0] is not w:
        v, m = hit
        if v.start > w.start:
            w.link, w.done = (v, m), True
            v.entered = True
            if v.done and v.link is None and v.t < 1.0:
                v.done = False  # paused earlier: resume it, it is on the chain now
            return
        w.done = True  # w landed on the chain of an earlier walker: it only repeats it
        return
    i = order.index(w)
    if i + 1 < len(order):
        v = order[i + 1]
        last = v.t if len(v.marks) < SYNC_STEPS else v.marks[-1]
        if not v.entered and w.t > last and (v.done or len(v.marks) == SYNC_STEPS):
            v.done = True  # overtaken: w can no longer join it


def _refill(order: list[_Walker], n: int, slots: int) -> int:
    """Start up to n walkers in the middle of the longest stretches (in expected pieces)
    between an active walker and the start of the walker after it."""
    gaps = []
    for i, w in enumerate(order):
        if w.done:
            continue
        end = order[i + 1].start if i + 1 < len(order) else 1.0
        span = end - w.t
        mean = (w.t - w.start) / max(len(w.ts) - 1, 1) if len(w.ts) > 1 else span / REFILL_PIECES
        if span > 0 and mean > 0 and span / mean >= REFILL_PIECES:
            gaps.append((span / mean, w.t + 0.5 * span))
    for _, start in sorted(gaps, reverse=True)[:n]:
        w = _Walker(start, slots)
        slots += 1
        order.append(w)
    order.sort(key=lambda w: w.start)
    return slots


def _covered(order: list[_Walker]) -> float:
    """Length of [0, 1] the walkers have covered (for the progress bar)."""
    total = 0.0
    for i, w in enumerate(order):
        end = order[i + 1].start if i + 1 < len(order) else 1.0
        total += max(0.0, min(w.t, end) - w.start)
    return min(total, 1.0)


def _walk_pointwise(ob, x0: Tensor, x1: Tensor, *, max_pieces: int, progress: bool | None,
                    keep_configurations: bool) -> tuple[list[Piece], list[Configuration] | None]:
    """The walk before :func:`configure_line` (``method="pointwise"``): one full
    configuration pass at each point ``x0 + t (x1 - x0)`` (the point's own values), the
    step to the next breakpoint from :func:`openbox.constraints.step_along`. Kept as the
    baseline the benchmark measures the walk against, and as an independent check: its
    pieces are the walk's (the tests compare them) up to rounding inside clusters of
    facets narrower than the tie tolerance, where a different rounding of the points can
    decide a sliver differently."""
    x0, x1, direction = _ends(ob, x0, x1)
    directions = torch.stack([direction, ob.direction])
    eps = torch.finfo(x0.dtype).eps
    t = torch.zeros(1, dtype=torch.float64)
    pieces: list[Piece] = []
    kept: list[Configuration] = []
    bar = _bar(progress)
    with bar, torch.no_grad():
        while float(t) < 1.0:
            x = x0 + t.to(x0.dtype).reshape(-1, *[1] * direction.dim()) * (x1 - x0)
            _, config, gates, _ = configure(ob.program, x, directions, ob.tol, record=True,
                                            context=ob.key_context)
            dt = step_along(ob.program, config, gates, ob.tol)
            t_next = torch.minimum(torch.ones(1, dtype=torch.float64), t + dt)
            if bool(t_next <= t):  # rounding left us just short of the facet: nudge past it
                t_next = torch.minimum(torch.ones(1, dtype=torch.float64),
                                       t + t.abs().clamp_min(1.0) * eps * 16)
            key = config.region_keys()[0]
            if pieces and pieces[-1].region_key == key:
                pieces[-1] = pieces[-1]._replace(t_end=float(t_next))
            else:
                pieces.append(Piece(float(t), float(t_next), key, -1))
                if keep_configurations:
                    kept.append(config)
                if len(pieces) > max_pieces:
                    raise RuntimeError(
                        f"segment has more than {max_pieces} pieces; raise max_pieces")
            bar.update(float(t_next - t))
            bar.set_postfix_str(f"{len(pieces)} pieces", refresh=False)
            t = t_next
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
        method: "batched" (``walkers`` points side by side; see the module
            docstring), "sequential" (one point at a time; the same pieces bit for bit)
            or "pointwise" (the walk before the line pass: one configuration pass of the
            point itself per step; the benchmark's baseline).
        walkers: points configured side by side by the batched walk (new ones start
            where walkers finish, so about that many stay busy).
        with_llc: attach each piece's (W, b), composed in batches after the walk (memory:
            one configuration per piece during the walk, then C x input size per piece).

    Returns:
        Ordered pieces covering [0, 1]: ``pieces[0].t_start == 0``,
        ``pieces[i].t_end == pieces[i + 1].t_start``, ``pieces[-1].t_end == 1``.
        A piece's key is the configuration of the region the piece's interior lies in
        (as ``ob.explain(x).region_key`` for x inside the piece and off every facet).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got "
                         f"{method!r}")
    if method == "pointwise":
        pieces, confs = _walk_pointwise(ob, x0, x1, max_pieces=max_pieces, progress=progress,
                                        keep_configurations=with_llc)
    else:
        pieces, confs, _ = walk(
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
