"""Do two networks compute the same function on a box, a segment or a plane slice?

:func:`equivalent` walks the common refinement of both networks' partitions inside the
L-inf box around x0 (:func:`openbox.regions.box.refinement`): every cell is a pair
(region of a, region of b) whose intersection meets the box, a polytope given by both sets
of rows. On a cell both networks are affine, so their difference ``D(x) = f_b(x) - f_a(x)``
is affine too and the question "does ``f_b`` match ``f_a`` everywhere on the cell, to the
working dtype's verify tolerance" (:meth:`Tolerances.matches` with ``f_a`` as the reference,
``|D_c| <= max(atol + rtol |f_a,c|, scale_rtol max_k |f_a,k|)``) is decided exactly by
linear programs: for each class c and sign s, ``max t`` subject to ``t <= s D_c(x) - atol -
rtol sigma f_a,c(x)`` for sigma = +-1 (and, in float32, ``t <= s D_c(x) - scale_rtol sigma
f_a,k(x)`` for every k and sigma) over x in the cell; ``t* > 0`` iff the outputs differ beyond
tolerance somewhere in the cell, and the maximiser is a witness. Rows are scaled by 1/atol so
the solver's feasibility tolerance is far below the tolerance tested. A cell whose interval
bound over the box already keeps ``|D_c| <= atol`` needs no LP (the common case for
equivalent networks, whose LLCs agree to rounding).

A witness the LLCs call different is checked by both models' own forward
(``ob_a.reference(x)`` vs ``ob_b.reference(x)``, :attr:`OpenBox.reference`); only a point
that those two disagree on, beyond tolerance, is returned as a counterexample, and the walk
stops there. A point where the LLCs differ by a hair beyond tolerance but the forwards do
not is counted in ``borderline`` and the walk goes on.

For inputs too large for a full box, :func:`equivalent_on_segment` compares the networks
along a segment (both walks' breakpoints merged: on each common piece both are affine in t,
so the values at the piece's ends, and where a reference logit crosses 0, decide it) and
:func:`equivalent_on_plane` on a 2-D slice (both plane maps' polygons intersected: on each
intersection both are affine in (a, b), so its vertices, and where a reference logit's zero
line cuts it, decide it). Both are exact in float64; in float32 the part of the tolerance
relative to the output's magnitude (``scale_rtol``) is checked at the same points only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from openbox.geometry import solve_lp
from openbox.regions.box import DEFAULT_MAX_REGIONS, Cell, check_box, refinement
from openbox.regions.plane import plane
from openbox.regions.segment import segment

__all__ = ["Equivalence", "equivalent", "equivalent_on_plane", "equivalent_on_segment"]

DEFAULT_MAX_CELLS = 10 * DEFAULT_MAX_REGIONS
"""Cells of the common refinement :func:`equivalent` walks before it gives up undecided."""

PULL_TOWARD_WITNESS = (0.0, 1e-6, 1e-3)
"""Fractions of the way from an LP maximiser (a vertex of the cell, on its boundary) toward
the cell's witness (inside it) at which a counterexample is checked by the forwards."""

MIN_AREA_FRACTION = 1e-12
"""Intersections of two plane polygons smaller than this fraction of the slice's area are
rounding, not cells."""


@dataclass(frozen=True, eq=False)
class Equivalence:
    """The verdict of :func:`equivalent` and its segment / plane variants.

    ``bool(result)`` is True exactly when the two networks were shown to compute the same
    function on the whole set (every cell examined, none differing beyond tolerance):
    ``result.equivalent``. It is False with a ``counterexample`` when they differ, and False
    with ``complete=False`` and no counterexample when the search stopped undecided
    (``max_cells`` reached).

    Attributes:
        equivalent: see above.
        where: "box", "segment" or "plane".
        cells: cells (common pieces, common polygons) examined.
        complete: the search was not cut short by ``max_cells`` / ``max_regions`` (a
            counterexample ends it early, and it is still complete).
        counterexample: (*input_shape) a point of the set where ``ob_a.reference`` and
            ``ob_b.reference`` differ beyond ``ob_a.tol.matches``, else None.
        outputs: (f_a, f_b), (C,) each, both models' own outputs at the counterexample.
        difference: max |f_b - f_a| at the counterexample (0.0 without one).
        borderline: points where the LLCs differed beyond tolerance but the forwards did not.
        n_lps: LPs solved to compare cells (box only; the walk's own are not counted).
    """

    equivalent: bool
    where: str
    cells: int
    complete: bool
    counterexample: Tensor | None = None
    outputs: tuple[Tensor, Tensor] | None = None
    difference: float = 0.0
    borderline: int = 0
    n_lps: int = 0

    def __bool__(self) -> bool:
        return self.equivalent

    @property
    def decided(self) -> bool:
        """Equivalent, or a verified counterexample found (False only when undecided)."""
        return self.equivalent or self.counterexample is not None

    def __str__(self) -> str:
        if self.equivalent:
            return f"equivalent on the {self.where} ({_cells(self.cells)} compared)"
        if self.counterexample is not None:
            return (f"not equivalent on the {self.where}: the outputs differ by "
                    f"{self.difference:.3e} at a verified counterexample (after "
                    f"{_cells(self.cells)})")
        return (f"undecided on the {self.where}: stopped after {_cells(self.cells)} without "
                "a counterexample (raise max_cells)")


def _cells(n: int) -> str:
    return f"{n} cell" if n == 1 else f"{n} cells"


# ------------------------------------------------------------------------------- checks


def _check_pair(ob_a, ob_b) -> None:
    """ValueError unless the two OpenBoxes take the same inputs and give the same outputs."""
    problems = []
    if tuple(ob_a.input_shape) != tuple(ob_b.input_shape):
        problems.append(f"input shapes {tuple(ob_a.input_shape)} and {tuple(ob_b.input_shape)}")
    if ob_a.num_classes != ob_b.num_classes:
        problems.append(f"{ob_a.num_classes} and {ob_b.num_classes} classes")
    if ob_a.dtype != ob_b.dtype:
        problems.append(f"working dtypes {ob_a.dtype} and {ob_b.dtype}")
    if ob_a.device != ob_b.device:
        problems.append(f"devices {ob_a.device} and {ob_b.device}")
    if problems:
        raise ValueError("equivalence needs two OpenBoxes with the same input shape, number "
                         f"of classes, dtype and device; got {', '.join(problems)}")


def _forwards(ob_a, ob_b, x: Tensor) -> tuple[Tensor, Tensor]:
    """Both models' own outputs at x (B, *input_shape) (clones: a model may work in place)."""
    with torch.no_grad():
        return ob_a.reference(x.clone()), ob_b.reference(x.clone())


def _confirm(ob_a, ob_b, x: Tensor):
    """(f_a, f_b) at the point x (*input_shape) if the forwards differ there beyond
    ``ob_a.tol.matches``, else None."""
    fa, fb = _forwards(ob_a, ob_b, x.unsqueeze(0))
    if bool(ob_a.tol.matches(fb, fa).all()):
        return None
    return fa[0], fb[0]


def _differs(tol, fa: np.ndarray, fb: np.ndarray) -> np.ndarray:
    """(N,) bool: rows of fb (N, C) that do not match the reference rows of fa."""
    return ~np.all(tol.matches(fb, fa), axis=-1)


def _result(where, cells, complete, found=None, borderline=0, n_lps=0) -> Equivalence:
    if found is None:
        return Equivalence(complete, where, cells, complete, borderline=borderline,
                           n_lps=n_lps)
    x, (fa, fb) = found
    return Equivalence(False, where, cells, complete, x, (fa, fb),
                       float((fb - fa).abs().max()), borderline, n_lps)


# ------------------------------------------------------------------------------- the box


class _CellComparer:
    """The ``visit`` of the common-refinement walk: compares both LLCs on each cell."""

    def __init__(self, ob_a, ob_b, lo: np.ndarray, hi: np.ndarray):
        self.ob_a, self.ob_b = ob_a, ob_b
        self.tol = ob_a.tol
        self.lo, self.hi = lo, hi
        self.mid, self.half = 0.5 * (lo + hi), 0.5 * (hi - lo)
        self.found = None
        self.borderline = 0
        self.n_lps = 0
        self.n_cells = 0

    def __call__(self, cell: Cell, nets) -> bool:
        self.n_cells += 1
        ra, rb = nets[0].regions[cell.keys[0]], nets[1].regions[cell.keys[1]]
        wa, ba, wb, bb = (t.double().cpu().numpy() for t in (ra.weight, ra.bias, rb.weight,
                                                              rb.bias))
        wa, wb = wa.reshape(wa.shape[0], -1), wb.reshape(wb.shape[0], -1)
        g, h = wb - wa, bb - ba
        # |D_c| over the box (which holds the cell) is at most this: no LP needed below atol
        bound = np.abs(g @ self.mid + h) + np.abs(g) @ self.half
        for c in np.flatnonzero(bound > self.tol.verify_atol):
            for s in (1.0, -1.0):
                x = self._worst(cell, wa, ba, g, h, int(c), s)
                if x is not None and self._check(cell, x, wa, ba, wb, bb):
                    return True
        return False

    def _worst(self, cell, wa, ba, g, h, c: int, s: float) -> np.ndarray | None:
        """The maximiser over the cell of the excess of s D_c beyond tolerance (in units of
        atol), or None when the excess is <= 0 everywhere (to the solver's tolerance)."""
        tol = self.tol
        atol, rtol, srtol = tol.verify_atol, tol.verify_rtol, tol.verify_scale_rtol
        n = wa.shape[1]
        rows, rhs = [], []
        for sigma in (1.0, -1.0):  # t <= s D_c - atol - rtol sigma f_a,c
            rows.append(-s * g[c] + rtol * sigma * wa[c])
            rhs.append(s * h[c] - atol - rtol * sigma * ba[c])
            if srtol:  # t <= s D_c - srtol sigma f_a,k, every k
                for k in range(wa.shape[0]):
                    rows.append(-s * g[c] + srtol * sigma * wa[k])
                    rhs.append(s * h[c] - srtol * sigma * ba[k])
        T = np.hstack([np.array(rows) / atol, np.ones((len(rows), 1))])
        A_ub = np.vstack([T, np.hstack([cell.A, np.zeros((cell.A.shape[0], 1))])])
        b_ub = np.concatenate([np.array(rhs) / atol, cell.d])
        cost = np.zeros(n + 1)
        cost[n] = -1.0
        lo, hi = np.r_[self.lo, -np.inf], np.r_[self.hi, np.inf]
        res = solve_lp(cost, A_ub, b_ub, bounds=(lo, hi), tol=tol)
        self.n_lps += 1
        if res.status != "optimal" or not res.x[n] > 0:
            return None
        return np.clip(res.x[:n], self.lo, self.hi)

    def _check(self, cell, x, wa, ba, wb, bb) -> bool:
        """Record a counterexample near x if the LLCs and the forwards both say the outputs
        differ there; True when one was found."""
        ob = self.ob_a
        differed = False
        for f in PULL_TOWARD_WITNESS:
            p = x + f * (cell.witness - x)
            if not _differs(self.tol, wa @ p + ba, wb @ p + bb):
                continue  # (at f = 0: t* > 0 was the solver's rounding)
            differed = True
            pt = torch.as_tensor(p, dtype=ob.dtype, device=ob.device).reshape(ob.input_shape)
            outs = _confirm(self.ob_a, self.ob_b, pt)
            if outs is not None:
                self.found = (pt, outs)
                return True
        self.borderline += differed
        return False


def equivalent(
    ob_a,
    ob_b,
    x0: Tensor,
    eps: float,
    norm: float = float("inf"),
    *,
    max_cells: int = DEFAULT_MAX_CELLS,
    progress: bool | None = None,
) -> Equivalence:
    """Decide whether two networks compute the same function on the box
    ``||x - x0||_inf <= eps`` (intersected with both OpenBoxes' domains).

    Walks the common refinement of both partitions inside the box and compares the two
    LLCs on every cell exactly, by LPs (see the module docstring), to ``ob_a``'s verify
    tolerance with ``ob_a`` as the reference.

    Args:
        ob_a, ob_b: OpenBoxes with the same input shape, number of classes, dtype and
            device (e.g. a model and its BatchNorm-folded copy).
        x0: (*input_shape) the box's centre. eps: its half-width, > 0.
        norm: float("inf") only (2 raises NotImplementedError, anything else ValueError).
        max_cells: stop undecided after this many cells.
        progress: a tqdm bar over cells (default on).

    Returns:
        an :class:`Equivalence`: truthy when equivalent on the whole box (``.cells`` cells
        compared); falsy with ``.counterexample`` (*input_shape), a point of the box where
        ``ob_a.reference`` and ``ob_b.reference`` differ beyond tolerance, verified by both
        forwards; falsy with ``complete=False`` and no counterexample when undecided.

    Raises:
        ValueError: mismatched OpenBoxes, bad x0 or eps, a norm other than inf.
        NotImplementedError: norm=2.
    """
    _check_pair(ob_a, ob_b)
    x0, lo, hi = check_box([ob_a, ob_b], x0, eps, norm)
    compare = _CellComparer(ob_a, ob_b, lo, hi)
    ref = refinement([ob_a, ob_b], x0, lo, hi, max_cells=max_cells, progress=progress,
                     visit=compare, desc="equivalent")
    return _result("box", compare.n_cells, ref.complete or ref.stopped, compare.found,
                   compare.borderline, compare.n_lps)


# ------------------------------------------------------------------------------- segment


def _crossings(ma: np.ndarray) -> list[float]:
    """Parameters s in (0, 1) where some column of ma (2, C), linear between its two rows,
    changes sign: the kinks of the tolerance ``atol + rtol |m|`` along a common piece."""
    out = []
    m0, m1 = ma
    for c in np.flatnonzero((m0 * m1) < 0):
        out.append(float(m0[c] / (m0[c] - m1[c])))
    return out


def equivalent_on_segment(
    ob_a,
    ob_b,
    x0: Tensor,
    x1: Tensor,
    *,
    max_pieces: int = 100_000,
    progress: bool | None = None,
) -> Equivalence:
    """Decide whether two networks compute the same function on the segment from x0 to x1.

    Both segments' pieces (:func:`openbox.regions.segment`) are walked and their
    breakpoints merged; on each common piece both networks are affine in t, so both models'
    own outputs at the piece's ends, and at the points where a logit of ``ob_a`` crosses 0
    (the kinks of the tolerance), decide it (module docstring).

    Args:
        ob_a, ob_b: OpenBoxes as for :func:`equivalent`.
        x0, x1: (*input_shape) the segment's ends (distinct; inside both domains).
        max_pieces: passed to each walk.
        progress: tqdm bars of the walks (default off).

    Returns:
        an :class:`Equivalence` (``where="segment"``, ``cells`` = common pieces).
    """
    _check_pair(ob_a, ob_b)
    show = bool(progress)
    pa = segment(ob_a, x0, x1, max_pieces=max_pieces, progress=show)
    pb = segment(ob_b, x0, x1, max_pieces=max_pieces, progress=show)
    ts = np.unique(np.array([0.0, 1.0] + [p.t_end for p in pa] + [p.t_end for p in pb]))
    x0 = ob_a.check_point(x0, "x0")[0]
    x1 = ob_a.check_point(x1, "x1")[0]
    tol = ob_a.tol

    def at(t: np.ndarray) -> Tensor:
        tt = torch.as_tensor(t, dtype=ob_a.dtype, device=ob_a.device)
        return x0 + tt.reshape(-1, *[1] * x0.dim()) * (x1 - x0)

    fa, fb = (f.double().cpu().numpy() for f in _batched_forwards(ob_a, ob_b, at(ts)))
    bad = _differs(tol, fa, fb)
    candidates = list(ts[bad])
    for i in range(len(ts) - 1):  # kinks of the tolerance inside the common piece
        for s in _crossings(fa[i : i + 2]):
            ya = fa[i] + s * (fa[i + 1] - fa[i])
            yb = fb[i] + s * (fb[i + 1] - fb[i])
            if _differs(tol, ya[None], yb[None])[0]:
                candidates.append(ts[i] + s * (ts[i + 1] - ts[i]))
    borderline = 0
    for t in candidates:
        pt = at(np.array([t]))[0]
        outs = _confirm(ob_a, ob_b, pt)
        if outs is not None:
            return _result("segment", len(ts) - 1, True, (pt, outs), borderline)
        borderline += 1
    return _result("segment", len(ts) - 1, True, None, borderline)


def _batched_forwards(ob_a, ob_b, x: Tensor, size: int = 256) -> tuple[Tensor, Tensor]:
    outs = [_forwards(ob_a, ob_b, x[i : i + size]) for i in range(0, x.shape[0], size)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


# ------------------------------------------------------------------------------- plane


def _clip(verts: np.ndarray, g: np.ndarray, h: float) -> np.ndarray:
    """The convex polygon verts (K, 2) clipped to the half-plane ``g . q <= h``."""
    if len(verts) == 0:
        return verts
    s = verts @ g - h
    inside = s <= 0
    if inside.all():
        return verts
    if not inside.any():
        return verts[:0]
    out = []
    for i in range(len(verts)):
        j = (i + 1) % len(verts)
        if inside[i]:
            out.append(verts[i])
        if inside[i] != inside[j]:
            out.append(verts[i] + s[i] / (s[i] - s[j]) * (verts[j] - verts[i]))
    return np.array(out)


def _intersect(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The intersection of two convex counter-clockwise polygons (K, 2), (L, 2)."""
    out = p
    for i in range(len(q)):
        a, b = q[i], q[(i + 1) % len(q)]
        e = b - a
        g = np.array([e[1], -e[0]])  # inside (left of a -> b): g . x <= g . a
        out = _clip(out, g, float(g @ a))
        if len(out) < 3:
            return out[:0]
    return out


def _area(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def equivalent_on_plane(
    ob_a,
    ob_b,
    x0: Tensor,
    u: Tensor,
    v: Tensor,
    extent: tuple[float, float, float, float] = (-1.0, 1.0, -1.0, 1.0),
    *,
    max_regions: int = 20_000,
    progress: bool | None = None,
) -> Equivalence:
    """Decide whether two networks compute the same function on the slice
    ``{x0 + a u + b v : (a, b) in extent}``.

    Both plane maps (:func:`openbox.regions.plane`) are computed; every pair of overlapping
    polygons is intersected, and on each intersection the two plane-restricted LLCs
    (``Polygon.weight`` (C, 2), ``.bias``) are compared at its vertices and where a logit of
    ``ob_a`` crosses 0 inside it (module docstring).

    Args:
        ob_a, ob_b: OpenBoxes as for :func:`equivalent`.
        x0, u, v, extent: the slice, as for :func:`openbox.regions.plane`.
        max_regions: passed to each plane map; a map stopped by it leaves the verdict
            undecided unless a counterexample is found.
        progress: tqdm bars of the maps (default off).

    Returns:
        an :class:`Equivalence` (``where="plane"``, ``cells`` = common polygons).
    """
    _check_pair(ob_a, ob_b)
    show = bool(progress)
    ma = plane(ob_a, x0, u, v, extent, max_regions=max_regions, progress=show)
    mb = plane(ob_b, x0, u, v, extent, max_regions=max_regions, progress=show)
    x0 = ob_a.check_point(x0, "x0")[0]
    u = torch.as_tensor(u).to(dtype=ob_a.dtype, device=ob_a.device)
    v = torch.as_tensor(v).to(dtype=ob_a.dtype, device=ob_a.device)
    tol = ob_a.tol
    box_a = np.array([np.r_[p.vertices.min(0), p.vertices.max(0)] for p in ma.polygons])
    box_b = np.array([np.r_[p.vertices.min(0), p.vertices.max(0)] for p in mb.polygons])
    ba, bb = box_a[:, None], box_b[None]  # (a_min, b_min, a_max, b_max) each
    overlap = ((ba[..., 0] <= bb[..., 2]) & (bb[..., 0] <= ba[..., 2])
               & (ba[..., 1] <= bb[..., 3]) & (bb[..., 1] <= ba[..., 3]))
    min_area = MIN_AREA_FRACTION * abs(_area(ma.domain_polygon))
    cells, borderline = 0, 0
    complete = ma.complete and mb.complete
    for i, j in zip(*np.nonzero(overlap)):
        pa, pb = ma.polygons[i], mb.polygons[j]
        q = _intersect(pa.vertices, pb.vertices)
        if len(q) < 3 or _area(q) <= min_area:
            continue
        cells += 1
        pts = [q]
        for c in range(pa.weight.shape[0]):  # where logit c of a crosses 0: the kinks
            s = q @ pa.weight[c] + pa.bias[c]
            k = (np.arange(len(q)) + 1) % len(q)
            cut = np.flatnonzero(s * s[k] < 0)
            pts.append(q[cut] + (s[cut] / (s[cut] - s[k[cut]]))[:, None] * (q[k[cut]] - q[cut]))
        pts = np.vstack(pts)
        fa, fb = pa.logits(pts), pb.logits(pts)
        bad = np.flatnonzero(_differs(tol, fa, fb))
        centre = q.mean(0)
        for r in bad[np.argsort(-np.abs(fb - fa)[bad].max(1))]:
            for f in PULL_TOWARD_WITNESS:
                ab = pts[r] + f * (centre - pts[r])
                pt = x0 + float(ab[0]) * u + float(ab[1]) * v
                outs = _confirm(ob_a, ob_b, pt)
                if outs is not None:
                    return _result("plane", cells, complete, (pt, outs), borderline)
            borderline += 1
    return _result("plane", cells, complete, None, borderline)
