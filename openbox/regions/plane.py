"""2-D plane maps: the exact partition of a plane slice of input space into linear regions.

The slice is ``{x0 + a u + b v : (a, b) in extent}``. Inside one region every gate row
restricted to the plane is a half-plane (:func:`openbox.constraints.rows_in_plane`), so
the region's polygon is the extent clipped by those half-planes: exact 2-D half-plane
intersection, no LP. The walk is breadth-first over polygons: every edge that is a gate
facet is crossed at a point of it not yet covered by a known neighbour, the neighbour's
configuration taken with a lexicographic tie-break (the edge's outward normal, then the
edge direction, then the OpenBox's u: the region on the other side), until every facet
edge is covered by neighbours; then the polygons tile the extent.

A known polygon that shares a stretch of an edge (along one of its own edges: a touch at
a vertex is not sharing) covers it without a crossing; every open edge is tested against
the polygons found after it as well as before. Frontier points are configured in batches
(one pass, one :func:`~openbox.constraints.rows_in_plane` call and one lockstep clipping
of all the polygons for many regions); a guess of the region across each edge (its row's
gate flipped) keeps two crossings aimed at one region out of a batch, so nearly every
configured point finds a new region. The guess only orders the work.

The walk grows from x0 and a grid of starts over the extent; a batch that the open edges
leave short (a long, thin run of regions crossed one per pass) is filled with probes:
sample points that no known polygon contains. Each point's polygon is first clipped in a
box around it, by the few rows whose lines meet the box, and clipped again by more rows
only if it reaches the box's boundary. None of this changes the map: every point found
is configured, and every polygon is its region's whole slice.

The network's affine prefix (the nodes before the first gates) is affine on the whole
plane: a pass takes its values combined from the plane's own rows
(:class:`~openbox.configuration.PlanePrefix`), and the first gates' units and windows
whose rows stay away from the extent, or whose order never changes over it, are left out
of the row test and decided once per pass (:class:`~openbox.constraints.PlaneScreen`:
bounds with a margin over rounding; the same rows and choices, bit for bit).

Coordinates: (a, b) in the plane's own basis (u, v need not be orthogonal or unit);
vertices are counter-clockwise in (a, b).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import networkx as nx
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from openbox.configuration import PlaneBlock, PlanePrefix, RegionKey, configure
from openbox.constraints import PlaneScreen, rows_in_plane

DEFAULT_BATCH = 64
"""Frontier points configured per pass."""

DEFAULT_STARTS = 6
"""The walk starts from x0 and a 6 x 6 grid over the extent: 37 points in the first pass.
On the demo CNN's benchmark planes (141 and 565 regions) this took the walk from 12 and
34 passes to 4 and 20."""

EDGE_FRACTION = 1e-9
"""Uncovered parts of an edge shorter than this fraction of the extent's diagonal are not
crossed (a sliver that thin is reported through :attr:`PlaneMap.coverage`)."""

VERTEX_MERGE = 1e-12
"""Consecutive polygon vertices closer than this times the polygon's coordinate size are
one vertex (clipping by many lines through one point, e.g. the facets of a tied x0, leaves
edges of rounding length whose direction is noise)."""

INSIDE_REL = 1e-9
"""Relative tolerance of "a segment's part inside a polygon" (:func:`_segment_inside`)."""

CONTAINS_REL = 1e-9
"""Default tolerance of :meth:`Polygon.contains` (a fraction of the polygon's diameter plus
its coordinates' size); the probes' coverage test uses the same."""

DOMAIN_MARGIN = 1e-9
"""The extent is clipped to the domain only by the rows within this fraction of its
corners' size (times the row's L1 norm) of cutting its rectangle (the others cannot cut
it: the clipped polygon lies in the rectangle to rounding ~1e-16 relative)."""

BOUNDARY = -1
"""Edge label of the extent's (or the domain's) boundary: nothing to cross."""

BOX = -2
"""Edge label of a side of the box a polygon is first clipped in (never in a result)."""

_BOX_G = np.array([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
_BOX_LABELS = np.full(4, BOX, dtype=np.int64)

RADIUS_FACTOR = 3.0
"""A crossing's polygon is first clipped in the box of L-infinity radius RADIUS_FACTOR
times the largest side of the box of the polygon it crosses from (a probe's: times the
median side of the polygons found last): only the rows whose lines meet that box are
gathered and clipped by, not every row whose line crosses the extent."""

RADIUS_GROWTH = 8.0
"""A polygon that reaches its box's boundary is clipped again in a box this many times
larger (up to the whole extent)."""

BOX_MARGIN = 1e-6
"""A vertex within this fraction of the radius of the box's boundary counts as on it (far
above the rounding of the clipping, so that a polygon that reaches beyond its box is
never taken for the whole one)."""


@dataclass(eq=False)
class Polygon:
    """One region's piece of the plane.

    Attributes:
        vertices: (K, 2) float64 counter-clockwise vertices in (a, b) coordinates.
        region_key: the region's key (as ``ob.explain(x).region_key`` inside it).
        prediction: predicted class at the polygon's centroid.
        weight: (C, 2) the region's LLC restricted to the plane, ``d logits / d(a, b)``.
        bias: (C,) logits at (a, b) = (0, 0) of the region's affine map.
        edge_labels: (K,) for edge i (vertex i to i+1), the gate row that made it, or
            BOUNDARY.
    """

    vertices: np.ndarray
    region_key: RegionKey
    prediction: int
    weight: np.ndarray
    bias: np.ndarray
    edge_labels: np.ndarray = field(repr=False)

    @property
    def area(self) -> float:
        return _area(self.vertices)

    @cached_property
    def centroid(self) -> np.ndarray:
        return _centroid(self.vertices)

    def logits(self, ab: np.ndarray) -> np.ndarray:
        """(N, C) the region's affine logits at points ab (N, 2)."""
        return np.atleast_2d(ab) @ self.weight.T + self.bias

    def contains(self, ab: np.ndarray, tol: float = CONTAINS_REL) -> np.ndarray:
        """(N,) bool: points inside the closed polygon, to ``tol`` times its diameter plus
        its coordinates' size."""
        ab = np.atleast_2d(np.asarray(ab, dtype=np.float64))
        size = float(np.linalg.norm(self.vertices.max(0) - self.vertices.min(0))) + float(
            np.abs(self.vertices).max())
        return np.all(_signed_distances(self.vertices, ab) >= -tol * size, axis=1)


@dataclass(eq=False)
class PlaneMap:
    """The result of :func:`plane`.

    Attributes:
        polygons: every region's polygon, in discovery order.
        graph: networkx.Graph, node i = polygons[i]; an edge for every pair sharing a
            boundary segment (not a mere vertex), with attributes ``segment`` ((2, 2)
            (a, b) end points of the shared boundary, the longest stretch found) and
            ``decision_boundary`` (the predicted class differs on the two sides).
        extent: (a_min, a_max, b_min, b_max). domain_polygon: (K, 2) the extent clipped to
            the OpenBox's domain (the extent itself without one).
        complete: False when ``max_regions`` stopped the walk.
        coverage: sum of polygon areas / area of ``domain_polygon`` (1 up to rounding
            when complete).
        seed: the (a, b) where the walk started: x0 = (0, 0) when it lies inside the
            extent and the domain, else the centroid of ``domain_polygon``.
    """

    polygons: list[Polygon]
    graph: nx.Graph
    extent: tuple[float, float, float, float]
    domain_polygon: np.ndarray
    complete: bool
    coverage: float
    seed: tuple[float, float] = (0.0, 0.0)

    def __len__(self) -> int:
        return len(self.polygons)

    def locate(self, ab: np.ndarray) -> np.ndarray:
        """(N,) index of the polygon containing each point (N, 2), -1 if none."""
        ab = np.atleast_2d(np.asarray(ab, dtype=np.float64))
        out = np.full(len(ab), -1)
        for i, poly in enumerate(self.polygons):
            free = out < 0
            if not free.any():
                break
            hit = np.flatnonzero(free)[poly.contains(ab[free])]
            out[hit] = i
        return out

    def plot(self, ax=None, *, class_names=None, cmap: str = "tab10"):
        """Regions filled by predicted class, region edges thin, decision boundaries thick
        (between regions and inside them), the origin x0 marked. Returns the Axes."""
        import matplotlib.pyplot as plt
        from matplotlib.collections import LineCollection, PolyCollection

        if ax is None:
            _, ax = plt.subplots(figsize=(6, 6))
        colours = plt.get_cmap(cmap)
        cells, cell_colour, splits = [], [], []
        for poly in self.polygons:
            for c, cell, cut in _class_cells(poly):
                cells.append(cell)
                cell_colour.append(colours(c % colours.N))
                splits += cut
        ax.add_collection(PolyCollection(cells, facecolors=cell_colour, edgecolors="none"))
        thin = [d["segment"] for _, _, d in self.graph.edges(data=True)
                if not d["decision_boundary"]]
        thick = [d["segment"] for _, _, d in self.graph.edges(data=True)
                 if d["decision_boundary"]] + splits
        ax.add_collection(LineCollection(thin, colors="k", linewidths=0.2, alpha=0.5))
        ax.add_collection(LineCollection(thick, colors="k", linewidths=1.6))
        a0, a1, b0, b1 = self.extent
        ax.set_facecolor("0.85")  # outside the domain (when one is declared): grey
        ax.plot(*self.domain_polygon[np.r_[0:len(self.domain_polygon), 0]].T, color="k",
                linewidth=0.8)
        ax.plot(0.0, 0.0, marker="*", color="white", markeredgecolor="k", markersize=12,
                clip_on=False, zorder=5)
        ax.set_xlim(a0, a1)
        ax.set_ylim(b0, b1)
        ax.set_xlabel("a (along u)")
        ax.set_ylabel("b (along v)")
        present = sorted({p.prediction for p in self.polygons})
        handles = [plt.Line2D([], [], marker="s", linestyle="", color=colours(c % colours.N),
                              label=class_names[c] if class_names else f"class {c}")
                   for c in present]
        ax.legend(handles=handles, fontsize=7, loc="upper right", framealpha=0.8)
        ax.set_title(f"{len(self.polygons)} linear regions"
                     + ("" if self.complete else " (incomplete)"), fontsize=9)
        return ax


# ------------------------------------------------------------------------------ 2-D helpers


def _next(v: np.ndarray) -> np.ndarray:
    """(K, ...) the array rotated by one: row i holds row i + 1 (``np.roll(v, -1, 0)``)."""
    return np.concatenate([v[1:], v[:1]])


def _area(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * float(np.dot(x, _next(y)) - np.dot(y, _next(x)))


def _centroid(v: np.ndarray) -> np.ndarray:
    a = _area(v)
    if a <= 0:
        return v.mean(axis=0)
    x, y = v[:, 0], v[:, 1]
    xn, yn = _next(x), _next(y)
    cr = x * yn - xn * y
    return np.array([np.dot(x + xn, cr), np.dot(y + yn, cr)]) / (6 * a)


def _clip(verts: np.ndarray, labels: np.ndarray, g: np.ndarray, h: float, label: int):
    """Sutherland-Hodgman: the convex polygon (verts (K, 2) CCW, per-edge labels (K,))
    intersected with ``g . q <= h``; the new edge along the line gets ``label``."""
    s = verts @ g - h
    inside = s <= 0
    if inside.all():
        return verts, labels
    if not inside.any():
        return verts[:0], labels[:0]
    # vertex i keeps its place (slot 2 i) if inside; an edge i -> j = i + 1 that crosses
    # the line adds the crossing point after it (slot 2 i + 1), starting the rest of edge
    # i (entering) or the new edge along the line (leaving)
    k = len(verts)
    nxt = np.arange(1, k + 1) % k
    kept = np.flatnonzero(inside)
    cut = np.flatnonzero(inside != inside[nxt])
    j = nxt[cut]
    t = s[cut] / (s[cut] - s[j])
    points = verts[cut] + t[:, None] * (verts[j] - verts[cut])
    order = np.argsort(np.concatenate([2 * kept, 2 * cut + 1]))
    v = np.concatenate([verts[kept], points])[order]
    lab = np.concatenate([labels[kept], np.where(inside[j], labels[cut], label)])[order]
    # a vertex (within rounding) equal to the next one starts an edge of rounding length,
    # whose direction is noise: drop it, so the edge that follows keeps its own label
    size = float(np.abs(v).max()) + float((v.max(axis=0) - v.min(axis=0)).max())
    gap = np.linalg.norm(v - _next(v), axis=1)
    keep = gap > VERTEX_MERGE * size
    return v[keep], lab[keep]


def _class_cells(poly: Polygon):
    """(class, cell vertices, [split segments]) of the polygon's argmax partition."""
    w, b = poly.weight, poly.bias
    c_n = w.shape[0]
    centre_logits = poly.logits(poly.centroid)[0]
    order = np.argsort(-centre_logits)
    out = []
    for c in order:
        v, lab = poly.vertices, np.full(len(poly.vertices), BOUNDARY)
        for k in range(c_n):
            if k != c:  # logit_k <= logit_c
                v, lab = _clip(v, lab, w[k] - w[c], float(b[c] - b[k]), k)
                if len(v) < 3:
                    break
        if len(v) >= 3 and _area(v) > 0:
            cuts = [np.array([v[i], v[(i + 1) % len(v)]]) for i in range(len(v))
                    if lab[i] != BOUNDARY]
            out.append((int(c), v, cuts))
    return out


def _signed_distances(verts: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """(N, K) signed distance of each point to the line of each edge of a convex CCW
    polygon, positive inside."""
    a, c = verts, _next(verts)
    e = c - a
    length = np.maximum(np.linalg.norm(e, axis=1), 1e-300)
    cross = e[None, :, 0] * (pts[:, None, 1] - a[None, :, 1]) - e[None, :, 1] * (
        pts[:, None, 0] - a[None, :, 0])
    return cross / length[None]


def _segment_inside(p: np.ndarray, q: np.ndarray, verts: np.ndarray,
                    rel: float = INSIDE_REL) -> tuple[float, float]:
    """Parameter interval [s0, s1] of the segment p + s (q - p) inside a convex CCW
    polygon, to ``rel`` times the segment's length plus its coordinates' size (vertices
    computed by two polygons' own clipping differ by rounding of the coordinates: ~1e-12
    relative was seen; empty when s0 > s1). Edges collinear with the segment (both ends
    within the tolerance of their line) do not cut it."""
    tol = rel * (float(np.linalg.norm(q - p)) + float(np.abs(np.r_[p, q]).max()))
    dp, dq = _signed_distances(verts, np.array([p, q]))
    s0, s1 = 0.0, 1.0
    for a, b in zip(dp, dq):
        if a >= -tol and b >= -tol:
            continue
        if a < -tol and b < -tol:
            return 1.0, 0.0
        s = (-tol - a) / (b - a)
        if b > a:
            s0 = max(s0, s)
        else:
            s1 = min(s1, s)
    return s0, s1


def _subtract(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Parts of [0, 1] not covered by the union of the intervals."""
    gaps, at = [], 0.0
    for s0, s1 in sorted(intervals):
        if s0 > at:
            gaps.append((at, s0))
        at = max(at, s1)
    if at < 1.0:
        gaps.append((at, 1.0))
    return gaps


# ------------------------------------------------------------------------------ the walk


def _check_directions(ob, u: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    out = []
    for name, d in (("u", u), ("v", v)):
        d = torch.as_tensor(d)
        if tuple(d.shape) != ob.input_shape:
            raise ValueError(f"{name} must have shape {ob.input_shape}, got {tuple(d.shape)}")
        d = d.to(dtype=ob.dtype, device=ob.device)
        if not bool(torch.isfinite(d).all()) or not bool(d.abs().sum() > 0):
            raise ValueError(f"{name} must be a finite, non-zero direction")
        out.append(d)
    u, v = out
    cos = float((u * v).sum() / (u.norm() * v.norm()))
    if abs(cos) > 1 - 1e-9:
        raise ValueError(f"u and v are parallel (cosine {cos:.12f}); a plane needs two "
                         "independent directions")
    return u, v


def _extent_polygon(ob, x0: Tensor, u: Tensor, v: Tensor, extent) -> np.ndarray:
    try:
        a0, a1, b0, b1 = (float(e) for e in extent)
    except (TypeError, ValueError):
        raise ValueError(f"extent must be (a_min, a_max, b_min, b_max), got {extent!r}") from None
    if not all(math.isfinite(e) for e in (a0, a1, b0, b1)) or not (a0 < a1 and b0 < b1):
        raise ValueError(f"extent must be finite with a_min < a_max and b_min < b_max, got "
                         f"{extent!r}")
    verts = np.array([[a0, b0], [a1, b0], [a1, b1], [a0, b1]])
    labels = np.full(4, BOUNDARY)
    if ob.domain is not None:  # stay inside the domain: lo <= x0 + a u + b v <= hi
        lo, hi = (torch.as_tensor(t, dtype=torch.float64).expand(ob.input_shape).reshape(-1)
                  .numpy() for t in ob.domain)
        x, uu, vv = (t.reshape(-1).double().cpu().numpy() for t in (x0[0], u, v))
        G = np.vstack([np.c_[uu, vv], -np.c_[uu, vv]])
        H = np.r_[hi - x, x - lo]
        finite = np.isfinite(H) & np.any(G != 0, axis=1)
        # only rows that cut the rectangle can cut the polygon clipped from it, whose
        # vertices lie in the rectangle up to rounding: a row whose every corner is
        # inside by more than DOMAIN_MARGIN of the corners' size (times |g|_1, far above
        # that rounding) leaves the polygon as it is (_clip returns it unchanged); the
        # rest are clipped by in order, as before
        size = float(np.abs(verts).max())
        cuts = (verts @ G.T - H).max(axis=0) > -DOMAIN_MARGIN * size * np.abs(G).sum(axis=1)
        finite &= cuts
        for g, h in zip(G[finite], H[finite]):
            verts, labels = _clip(verts, labels, g, h, BOUNDARY)
            if len(verts) < 3:
                raise ValueError("the extent does not meet the OpenBox's domain")
    return verts


def _half_planes(ob, config, gates, pts: np.ndarray, ns: np.ndarray, es: np.ndarray,
                 start: np.ndarray, radius: np.ndarray | None = None,
                 screen: PlaneScreen | None = None):
    """For each input f of the batch: (G (m, 2), h (m,), rows (m,), dist (m,)) with
    ``G q <= h`` the rows of its region restricted to the plane around pts[f] along
    (ns[f], es[f]) (orthonormal in (a, b)) whose lines come within the L1 size of the
    polygon ``start`` around pts[f] (no other row can cut it), and within L-infinity
    distance radius[f] of pts[f] when given (the lines that meet the box pts[f] +-
    radius[f]): ``rows`` their indices in :func:`rows_in_plane`'s layout (the edge
    labels), ``dist`` their lines' L-infinity distance from pts[f]. One rows_in_plane call
    for the whole batch, the first gates' rows screened by ``screen`` (the plane's
    :class:`~openbox.constraints.PlaneScreen`: the same rows, fewer tested). Also the
    layout: [(gate node k, rows of gate k)] in row order."""
    f = config.batch_size
    size0 = np.abs(start[None] - pts[:, None]).sum(axis=2).max(axis=1)  # (F,)
    if radius is not None:
        size0 = np.minimum(size0, radius)
    # a superset of the rows that can cut: slack <= |w|_1 reach, w = rate1 n + rate2 e the
    # row's gradient in (a, b) (slack / |w|_1 is its line's distance up to rounding, a
    # margin far above it keeps every one); the exact test follows on these few. No
    # separate test for infinite slack (padding) or w = 0 (a tied flat row has slack 0):
    # the first fails the comparison, the second the exact test
    reach = size0 + NEAR_SLACK * (size0 + np.abs(pts).sum(axis=1))  # (F,)
    # and a superset of that one, tested in torch on every row before any row is
    # gathered: with (n, e) orthonormal, |w|_1 <= sqrt(2) |w|_2 <= sqrt(2) (|rate1| +
    # |rate2|), so each of its rows has slack < 2 reach (|rate1| + |rate2|) (2 over
    # sqrt(2): far above rounding); rows_in_plane forms only those
    near = 2.0 * reach
    only = None if screen is None else screen.only(float(near.max()), pts)
    parts = rows_in_plane(ob.program, config, gates, ob.tol,
                          near=torch.as_tensor(near, dtype=ob.dtype, device=ob.device),
                          only=only)
    layout = [(k, m) for k, m, *_ in parts]
    none = (np.zeros((0, 2)), np.zeros(0), np.zeros(0, dtype=np.int64), np.zeros(0))
    if not parts:  # no gates: one region, the whole plane
        return [none] * f, layout
    offsets = np.cumsum([0] + [m for _, m in layout])
    flat = lambda i: torch.cat([t[i] for t in parts]).cpu().numpy()  # noqa: E731
    index = flat(2)
    widths = np.repeat([m for _, m in layout], [len(t[2]) for t in parts])
    input_of = index // widths
    row = index % widths + np.repeat(offsets[:-1], [len(t[2]) for t in parts])
    order = np.lexsort((row, input_of))  # by input, then row (the dense layout's order)
    input_of, row = input_of[order], row[order]
    s, r1, r2 = (torch.cat([t[i] for t in parts]).double().cpu().numpy()[order]
                 for i in (3, 4, 5))
    # the exact test as one batch over every input's near rows (sorted by input, then row);
    # each input's products with its own point go through the same matmul as one input's
    # rows alone (its rounding is part of the map)
    ni, ei, reach = ns[input_of], es[input_of], reach[input_of]
    wa = np.abs(r1 * ni[:, 0] + r2 * ei[:, 0]) + np.abs(r1 * ni[:, 1] + r2 * ei[:, 1])
    maybe = s <= wa * reach
    input_of, row, s, r1, r2 = input_of[maybe], row[maybe], s[maybe], r1[maybe], r2[maybe]
    w = r1[:, None] * ns[input_of] + r2[:, None] * es[input_of]  # (P, 2)

    def each_point(a: np.ndarray) -> np.ndarray:
        """(P,) row i of a (P, 2) times its input's point."""
        at = np.searchsorted(input_of, np.arange(f + 1))
        return np.concatenate([a[at[i]:at[i + 1]] @ pts[i] for i in range(f)])

    # slack + (q - p) . w >= 0  <=>  -w . q <= slack - w . p
    G, h = -w, s - each_point(w)
    keep = np.isfinite(h) & ((G[:, 0] != 0) | (G[:, 1] != 0))
    G, h, row, input_of = G[keep], h[keep], row[keep], input_of[keep]
    dist = (h - each_point(G)) / np.maximum(np.abs(G).sum(axis=1), 1e-300)
    near = dist <= size0[input_of]
    G, h, row, dist, input_of = G[near], h[near], row[near], dist[near], input_of[near]
    at = np.searchsorted(input_of, np.arange(f + 1))
    return [(G[at[i]:at[i + 1]], h[at[i]:at[i + 1]], row[at[i]:at[i + 1]],
             dist[at[i]:at[i + 1]]) for i in range(f)], layout


def _in_box(rows, p: np.ndarray, radius: float):
    """An item of :func:`_polygons`: the rows (G, h, labels, dist) whose lines meet the
    box p +- radius (L-infinity; all of them when radius is inf), and the box's four sides
    (labelled BOX)."""
    G, h, labels, dist = rows
    if not np.isfinite(radius):
        return G, h, labels, dist, p
    keep = dist <= radius
    (pa, pb), r = p, radius
    return (np.concatenate([G[keep], _BOX_G]),
            np.concatenate([h[keep], [pa + r, r - pa, pb + r, r - pb]]),
            np.concatenate([labels[keep], _BOX_LABELS]), np.concatenate([dist[keep], [r] * 4]),
            p)


def _polygons(ob, items, start: np.ndarray):
    """The extent polygon ``start`` clipped by each item's rows, all items in lockstep:
    [(vertices (K, 2), edge labels (K,))]. items: [(G (m, 2), h (m,), rows (m,), dist (m,),
    p (2,))], ``G q <= h`` the half-planes, rows their labels, dist their lines' L-infinity
    distance from p, p a point of the region (inside, or on its boundary).

    Each step clips every unfinished polygon by one row that cuts it by more than rounding
    (of those, the one whose line passes nearest p: the nearest of all lines is always an
    edge of the final polygon, as the disk around p up to it lies inside every
    half-plane); a polygon is done when no row within its size of p cuts it."""
    f = len(items)
    r = max([1] + [len(it[1]) for it in items])
    G, h = np.zeros((f, r, 2)), np.zeros((f, r))
    rows = np.full((f, r), BOUNDARY, dtype=np.int64)
    dist = np.full((f, r), np.inf)
    p = np.array([it[4] for it in items]).reshape(f, 2)
    for i, (g_i, h_i, rows_i, dist_i, _) in enumerate(items):
        m = len(h_i)
        G[i, :m], h[i, :m], rows[i, :m], dist[i, :m] = g_i, h_i, rows_i, dist_i
    gn = np.abs(G).sum(axis=2)
    with np.errstate(invalid="ignore"):
        reach = (h - (G[:, :, 0] * p[:, None, 0] + G[:, :, 1] * p[:, None, 1])) \
            / np.maximum(np.linalg.norm(G, axis=2), 1e-300)  # Euclidean distance from p
    reach[~np.isfinite(dist)] = np.inf
    k0 = len(start)
    # (F, K, 2) vertices; the slots past a polygon's count repeat its first vertex, so
    # maxima over the slots need no mask
    verts = np.repeat(start[None], f, axis=0)
    labels = np.full((f, k0), BOUNDARY, dtype=np.int64)
    count = np.full(f, k0)
    active = np.ones(f, dtype=bool)
    while True:
        a = np.flatnonzero(active & (count >= 3))
        if a.size == 0:
            break
        v = verts[a]
        # a row can only cut the polygon if its line passes within the polygon's size of p
        size = np.abs(v - p[a, None]).sum(axis=2).max(axis=1)
        near = dist[a] <= size[:, None]  # (A, R)
        # each row's largest excess over the vertices, (A, R): max_k (g . v_k) - h
        top = np.matmul(v, G[a].transpose(0, 2, 1)).max(axis=1) - h[a]
        # rounding-level threshold: after a clip the new vertices lie on the row's line
        big = np.abs(v).max(axis=(1, 2))
        thr = ob.tol.tie * (1.0 + np.abs(h[a]) + gn[a] * big[:, None])
        cutting = near & (top - thr > 0)
        go = cutting.any(axis=1)
        active[a[~go]] = False
        if not go.any():
            break
        b = a[go]
        pick = np.argmin(np.where(cutting[go], reach[b], np.inf), axis=1)
        nv, nl, nc = _clip_many(verts[b], labels[b], count[b], G[b, pick], h[b, pick],
                                rows[b, pick])
        width = max(verts.shape[1], nv.shape[1])
        if width > verts.shape[1]:
            grow = width - verts.shape[1]
            verts = np.concatenate([verts, np.repeat(verts[:, :1], grow, axis=1)], axis=1)
            labels = np.concatenate([labels, np.full((f, grow), BOUNDARY)], axis=1)
        nv = np.concatenate([nv, np.repeat(nv[:, :1], width - nv.shape[1], axis=1)], axis=1)
        verts[b], labels[b, :nl.shape[1]], count[b] = nv, nl, nc
    return [(verts[i, :count[i]].copy(), labels[i, :count[i]].copy()) for i in range(f)]


def _clip_many(verts: np.ndarray, labels: np.ndarray, count: np.ndarray, g: np.ndarray,
               h: np.ndarray, label: np.ndarray):
    """:func:`_clip` for B polygons at once: verts (B, K, 2) and labels (B, K) padded past
    count (B,), each intersected with ``g[i] . q <= h[i]`` (the new edge labelled
    label[i]); returns (verts (B, K', 2), labels (B, K'), count (B,)), the slots past a
    polygon's count repeating its first vertex. Every row must cut its polygon (some
    vertex outside)."""
    bsz, k = labels.shape
    idx = np.arange(k)[None]
    at = np.arange(bsz)[:, None]
    valid = idx < count[:, None]
    s = verts[:, :, 0] * g[:, None, 0] + verts[:, :, 1] * g[:, None, 1] - h[:, None]
    inside = (s <= 0) & valid
    nxt = (idx + 1) % np.maximum(count, 1)[:, None]
    s_n, inside_n, v_n = s[at, nxt], inside[at, nxt], verts[at, nxt]
    cut = (inside != inside_n) & valid
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(cut, s / (s - s_n), 0.0)
    points = verts + t[:, :, None] * (v_n - verts)
    # vertex i keeps slot 2 i if inside; a crossing edge i -> i + 1 adds its crossing point
    # in slot 2 i + 1, starting the rest of edge i (entering) or the new edge (leaving)
    slot = np.stack([inside, cut], axis=2).reshape(bsz, 2 * k)
    vals = np.stack([verts, points], axis=2).reshape(bsz, 2 * k, 2)
    labs = np.stack([labels, np.where(inside_n, labels, label[:, None])], axis=2) \
        .reshape(bsz, 2 * k)
    v, lab, cnt = _compact(vals, labs, slot)
    # a vertex (within rounding) equal to the next one starts an edge of rounding length,
    # whose direction is noise: drop it, so the edge that follows keeps its own label
    big = np.abs(v).max(axis=(1, 2))
    span = (v.max(axis=1) - v.min(axis=1)).max(axis=1)
    idx = np.arange(v.shape[1])[None]
    nxt = (idx + 1) % np.maximum(cnt, 1)[:, None]
    gap = np.linalg.norm(v - v[np.arange(bsz)[:, None], nxt], axis=2)
    keep = (idx < cnt[:, None]) & (gap > VERTEX_MERGE * (big + span)[:, None])
    return _compact(v, lab, keep)


def _compact(v: np.ndarray, lab: np.ndarray, keep: np.ndarray):
    """The kept entries of each row, in order, moved to its front: (v (B, K', 2),
    lab (B, K'), count (B,)), K' the most kept in a row; the slots past a row's count
    repeat its first kept entry (a row with none keeps its first entry there)."""
    cnt = keep.sum(axis=1)
    width = max(int(cnt.max(initial=0)), 1)
    # slot j of row i takes the row's (j mod count)-th kept entry: the kept entries in
    # order, then the first one again
    rank = np.cumsum(keep, axis=1) - 1
    src = np.zeros((len(keep), width), dtype=np.int64)
    rows, cols = np.nonzero(keep)
    src[rows, rank[rows, cols]] = cols
    src = np.where(np.arange(width)[None] < cnt[:, None], src, src[:, :1])
    at = np.arange(len(keep))[:, None]
    return v[at, src], lab[at, src], cnt


def _inside(verts: np.ndarray, q: np.ndarray) -> bool:
    """q (2,) lies strictly inside the convex CCW polygon verts (K, 2)."""
    return bool(_inside_all(verts, q[None])[0])


def _inside_all(verts: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """(N,) bool: each point qs (N, 2) lies strictly inside the convex CCW polygon verts
    (K, 2) (every edge's cross product positive)."""
    p, r = verts[None], _next(verts)[None]
    q = qs[:, None]
    cross = (r[..., 0] - p[..., 0]) * (q[..., 1] - p[..., 1]) - (r[..., 1] - p[..., 1]) * (
        q[..., 0] - p[..., 0])
    return np.all(cross > 0, axis=1)


def _cell_centres(start: np.ndarray, n: int) -> np.ndarray:
    """(n * n, 2) the centres of an n x n grid of cells over the polygon ``start``'s box,
    row-major (cell (i, j) at i * n + j)."""
    lo, hi = start.min(0), start.max(0)
    c = (np.arange(n) + 0.5) / n
    return lo + np.stack(np.meshgrid(c, c, indexing="ij"), axis=-1).reshape(-1, 2) * (hi - lo)


def _starts(start: np.ndarray, origin: np.ndarray, n: int, most: int) -> np.ndarray:
    """(<= most, 2) the walk's first points: the origin, then the centres of an n x n grid
    of cells over the polygon ``start``'s box that lie strictly inside it, nearest the
    origin first."""
    grid = _cell_centres(start, n)
    grid = grid[_inside_all(start, grid) & np.any(grid != origin, axis=1)]
    grid = grid[np.argsort(np.abs(grid - origin).sum(axis=1), kind="stable")]
    return np.vstack([origin[None], grid])[:max(most, 1)]


def _padded(polys: list[np.ndarray]) -> np.ndarray:
    """(F, K, 2) the polygons' vertices, each padded to K = the most vertices by repeating
    its first one (an edge of length 0: it adds a zero term to every sum over edges and
    passes every inside test)."""
    f, k = len(polys), max(len(v) for v in polys)
    v = np.empty((f, k, 2))
    for i, p in enumerate(polys):
        v[i, :len(p)], v[i, len(p):] = p, p[0]
    return v


def _centroids(polys: list[np.ndarray]) -> np.ndarray:
    """(F, 2) :func:`_centroid` of each convex polygon (K_i >= 3, 2), all at once."""
    v = _padded(polys)
    x, y = v[..., 0], v[..., 1]
    xn, yn = np.roll(x, -1, axis=1), np.roll(y, -1, axis=1)
    cr = x * yn - xn * y
    a = 0.5 * cr.sum(axis=1)
    c = np.stack([((x + xn) * cr).sum(axis=1), ((y + yn) * cr).sum(axis=1)], axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        c /= 6 * a[:, None]
    flat = a <= 0  # no area (rounding): the vertices' mean, as _centroid does
    if flat.any():
        c[flat] = [p.mean(axis=0) for p, z in zip(polys, flat) if z]
    return c


def _combine(ab: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """(N, *input_shape) input-space vectors a u + b v for ab (N, 2)."""
    shape = (-1, *[1] * u.dim())
    return ab[:, 0].reshape(shape) * u + ab[:, 1].reshape(shape) * v


def _plane_llc(logits: Tensor, rates: Tensor, pts: np.ndarray, ns: np.ndarray,
               es: np.ndarray):
    """Per input j: (C, 2) d logits / d(a, b) and (C,) logits at (0, 0) of its region's
    affine map, from the pass's logits (B, C) at the points pts (B, 2) and its rates
    (>= 2, B, C) along each point's n and e, orthonormal in (a, b) (ns, es (B, 2)): the
    gradient in (a, b) is ``rate_n n + rate_e e``."""
    rn, re = (r.double().cpu().numpy() for r in rates[:2])  # (B, C) each
    w = rn[:, :, None] * ns[:, None, :] + re[:, :, None] * es[:, None, :]  # (B, C, 2)
    bias = logits.double().cpu().numpy() - np.einsum("bcd,bd->bc", w, pts)
    return w, bias


KNOWN_STRETCH = 1e-6
"""Shortest fraction of an edge that a known polygon must share to count as covering it
without a crossing."""

TOUCH = 4.0
"""A known polygon is tested against an edge when its box comes within TOUCH times the
stretch tolerance (``INSIDE_REL`` times the extent's diagonal plus its coordinates' size)
of the edge's box. A stretch that :meth:`_Walk._cover_by_known` accepts lies on the edge
and between the ends of the polygon's edges along the edge's line, which are within the
stretch tolerance of that line (and of the edge): so inside both boxes up to that
tolerance. A pair the test leaves out would only cost a crossing, never a result."""

PROBE_GRID = 64
"""Side of the grid of sample points that fill short batches (:meth:`_Walk.probes`)."""

ROWS_CHUNK = 64
"""Fresh regions whose plane rows are gathered in one (F, M) array."""

NEAR_SLACK = 1e-6
"""Relative margin of the first, rounded test of which rows can cut a polygon (far above
the rounding of slack / |w|; the exact test follows)."""


class _States:
    """Hashes of gate states (Zobrist: the XOR of one random word per gate input and
    state), to guess the region across a facet edge without configuring it: the edge's
    row flipped (a ReLU row: its unit's state; a max-pool row: its window selects the
    row's entry). Only :meth:`_Walk.take` uses the guesses, to keep two crossings aimed at
    the same region out of one batch; a wrong guess (a collision, or a neighbour that
    differs in more than the edge's row) costs a wasted or a later crossing, never a
    result."""

    def __init__(self):
        self.rng = np.random.default_rng(0x0B0C5)
        self.words: dict[int, np.ndarray] = {}  # gate node -> (units, states) uint64

    def _words(self, k: int, units: int, states: int) -> np.ndarray:
        w = self.words.get(k)
        if w is None or w.shape != (units, states):
            w = self.rng.integers(0, np.iinfo(np.uint64).max, (units, states), dtype=np.uint64,
                                  endpoint=True)
            self.words[k] = w
        return w

    def hashes(self, config, layout):
        """(hash (F,) uint64, states {k: (F, units) int64}, words {k: (units, states)},
        row offsets of the gates, the ReLU gates) of each input of the configuration;
        ``layout`` as :func:`_half_planes` gives."""
        f = config.batch_size
        h = np.zeros(f, dtype=np.uint64)
        states, words = {}, {}
        for k, m in layout:
            if k in config.on:
                on = config.on[k].reshape(f, -1).cpu().numpy()
                w = self._words(k, on.shape[1], 2)
                st = on.astype(np.int64)
                # the off words of every unit, then each on unit's (off ^ on)
                h ^= np.bitwise_xor.reduce(w[:, 0]) ^ np.bitwise_xor.reduce(
                    np.where(on, w[:, 0] ^ w[:, 1], np.uint64(0)), axis=1)
            else:
                st = config.select[k].reshape(f, -1).cpu().numpy().astype(np.int64)
                w = self._words(k, st.shape[1], m // max(st.shape[1], 1))
                h ^= np.bitwise_xor.reduce(
                    w.reshape(-1)[np.arange(st.shape[1]) * w.shape[1] + st], axis=1)
            states[k], words[k] = st, w
        return h, states, words, np.cumsum([0] + [m for _, m in layout]), set(config.on)

    def across(self, hashes, f, labels: np.ndarray, layout) -> np.ndarray:
        """(L,) uint64: for each edge label labels[i] (a row of input f[i]'s layout, or
        BOUNDARY) the hash of input f[i]'s state with that row flipped (BOUNDARY: 0).
        f: (L,) int array, or one input for every label."""
        h, states, words, off, relu = hashes
        f = np.broadcast_to(np.asarray(f, dtype=np.int64), labels.shape)
        out = np.zeros(len(labels), dtype=np.uint64)
        real = labels != BOUNDARY
        gate = np.searchsorted(off, labels, side="right") - 1
        for g, (k, _) in enumerate(layout):
            at = np.flatnonzero(real & (gate == g))
            if at.size == 0:
                continue
            fi, local, st, w = f[at], labels[at] - off[g], states[k], words[k]
            if k in relu:
                unit, new = local, 1 - st[fi, local]  # a ReLU row: the unit flips
            else:
                unit, new = np.divmod(local, w.shape[1])  # a max-pool row: window, entry
            out[at] = h[fi] ^ w[unit, st[fi, unit]] ^ w[unit, new]
        return out


class _Edges:
    """Every polygon's edges in flat arrays, appended per batch.

    Polygon i owns rows ``off[i]:off[i + 1]``: ``p`` (T, 2) the edge's first vertex, ``q``
    (T, 2) the next one, ``d = q - p``, ``length`` (T,) = |d|, ``owner`` (T,), ``local``
    (T,) the edge's index in its polygon. ``lo``, ``hi`` (N, 2) the polygons' boxes.
    """

    def __init__(self):
        self.p = np.zeros((0, 2))
        self.q = np.zeros((0, 2))
        self.length = np.zeros(0)
        self.owner = np.zeros(0, dtype=np.int64)
        self.local = np.zeros(0, dtype=np.int64)
        self.off = np.zeros(1, dtype=np.int64)
        self.lo = np.zeros((0, 2))
        self.hi = np.zeros((0, 2))

    @property
    def d(self) -> np.ndarray:
        return self.q - self.p

    def add(self, first: int, vertex_lists: list[np.ndarray]) -> None:
        """Append polygons first, first + 1, ... with these (K_i, 2) vertices."""
        if not vertex_lists:
            return
        p = np.concatenate(vertex_lists)
        q = np.concatenate([_next(v) for v in vertex_lists])
        counts = np.array([len(v) for v in vertex_lists])
        self.p = np.concatenate([self.p, p])
        self.q = np.concatenate([self.q, q])
        self.length = np.concatenate([self.length, np.linalg.norm(q - p, axis=1)])
        self.owner = np.concatenate([self.owner, np.repeat(first + np.arange(len(counts)),
                                                           counts)])
        self.local = np.concatenate([self.local, np.concatenate([np.arange(c) for c in counts])])
        self.off = np.concatenate([self.off, self.off[-1] + np.cumsum(counts)])
        self.lo = np.concatenate([self.lo, np.array([v.min(0) for v in vertex_lists])])
        self.hi = np.concatenate([self.hi, np.array([v.max(0) for v in vertex_lists])])

    def stretches(self, edge: np.ndarray, poly: np.ndarray):
        """Parameter intervals (s0 (P,), s1 (P,)) of edge[i] (as p + s d) inside polygon
        poly[i], pair by pair: :func:`_segment_inside` for all pairs at once (empty when
        s0 > s1); and (P,) the parameter interval (lo, hi) spanned by the polygon's edges
        that lie along the edge's line (both of the edge's ends within the tolerance of
        theirs; lo > hi when none does): a stretch the two polygons share lies on the
        line of a facet of both, so it lies in [lo, hi]."""
        if edge.size == 0:
            z = np.zeros(0)
            return z, z, z, z
        p, q = self.p[edge], self.q[edge]
        tol = INSIDE_REL * (self.length[edge] + np.maximum(np.abs(p).max(1), np.abs(q).max(1)))
        counts = self.off[poly + 1] - self.off[poly]
        pair = np.repeat(np.arange(len(edge)), counts)
        first = np.repeat(np.cumsum(counts) - counts, counts)
        t = np.repeat(self.off[poly], counts) + np.arange(len(pair)) - first
        a, e = self.p[t], self.q[t] - self.p[t]
        length = np.maximum(self.length[t], 1e-300)
        pp, qq, tt = p[pair], q[pair], tol[pair]
        dp = (e[:, 0] * (pp[:, 1] - a[:, 1]) - e[:, 1] * (pp[:, 0] - a[:, 0])) / length
        dq = (e[:, 0] * (qq[:, 1] - a[:, 1]) - e[:, 1] * (qq[:, 0] - a[:, 0])) / length
        out_p, out_q = dp < -tt, dq < -tt
        empty = out_p & out_q
        cuts = out_p ^ out_q
        s = np.zeros(len(pair))
        np.divide(-tt - dp, dq - dp, out=s, where=cuts)
        lower = np.where(cuts & (dq > dp), s, 0.0)
        upper = np.where(cuts & ~(dq > dp), s, 1.0)
        starts = np.cumsum(counts) - counts
        s0 = np.maximum(np.maximum.reduceat(lower, starts), 0.0)
        s1 = np.minimum(np.minimum.reduceat(upper, starts), 1.0)
        dead = np.logical_or.reduceat(empty, starts)
        s0[dead], s1[dead] = 1.0, 0.0
        along = (np.abs(dp) <= tt) & (np.abs(dq) <= tt)
        dd = qq - pp
        norm2 = np.maximum(np.einsum("ij,ij->i", dd, dd), 1e-300)
        b0 = np.einsum("ij,ij->i", a - pp, dd) / norm2
        b1 = np.einsum("ij,ij->i", a + e - pp, dd) / norm2
        lo = np.minimum.reduceat(np.where(along, np.minimum(b0, b1), np.inf), starts)
        hi = np.maximum.reduceat(np.where(along, np.maximum(b0, b1), -np.inf), starts)
        return s0, s1, lo, hi


def plane(
    ob,
    x0: Tensor,
    u: Tensor,
    v: Tensor,
    extent: tuple[float, float, float, float] = (-1.0, 1.0, -1.0, 1.0),
    *,
    max_regions: int = 20_000,
    batch: int = DEFAULT_BATCH,
    starts: int = DEFAULT_STARTS,
    progress: bool | None = None,
) -> PlaneMap:
    """The exact linear regions of the slice ``{x0 + a u + b v}`` over ``extent``.

    Args:
        ob: an :class:`~openbox.OpenBox`.
        x0: (*input_shape) the plane's origin (a, b) = (0, 0).
        u, v: (*input_shape) independent directions.
        extent: (a_min, a_max, b_min, b_max); clipped to the OpenBox's domain if declared.
        max_regions: stop (``complete=False``) beyond this many polygons.
        batch: frontier points configured per pass.
        starts: the walk grows from x0 and from the centres of a ``starts`` x ``starts``
            grid of cells over the extent that lie inside it (nearest x0 first; at most
            ``batch`` points in all, configured in the first pass), and fills batches that
            the open edges leave short with probes (sample points no known polygon
            holds). Several waves meet sooner than one grows over the whole extent: fewer,
            fuller batches, the same map. 1: one breadth-first walk from x0, no probes (a
            walk stopped by ``max_regions`` then holds the regions nearest x0; with more
            starts, regions around all of them).
        progress: a tqdm bar over polygons found (default on).

    Returns:
        a :class:`PlaneMap`. Exactness: the polygons' areas sum to the clipped extent's
        (``coverage`` 1 to ~1e-12), no two overlap, and every point's region key is its
        polygon's (tests check all three). float64 only (a float32 OpenBox is refused:
        the walk's geometric tolerances sit above float64 rounding, below float32's).
    """
    if ob.dtype != torch.float64:
        # the walk's geometric tolerances (INSIDE_REL, EDGE_FRACTION, VERTEX_MERGE, ...) are
        # set above float64 rounding; float32 rows put polygon vertices ~1e-7 apart, past
        # them, and a crossing then lands where no polygon claims the edge
        raise ValueError(f"plane maps need an OpenBox in torch.float64 (this one works in "
                         f"{ob.dtype}): the walk's geometric tolerances hold only above "
                         "float64 rounding; build it with dtype=torch.float64")
    x0 = ob.check_point(x0, "x0")
    u, v = _check_directions(ob, u, v)
    if int(batch) < 1:
        raise ValueError(f"batch must be a positive number of points, got {batch!r}")
    if int(starts) < 1:
        raise ValueError(f"starts must be a positive grid size, got {starts!r}")
    start = _extent_polygon(ob, x0, u, v, extent)
    origin = np.zeros(2) if _inside(start, np.zeros(2)) else _centroid(start)
    walk = _Walk(ob, x0, u, v, start)
    complete = True
    bar = tqdm(desc="plane", unit="region", leave=False,
               disable=not (True if progress is None else progress))
    with bar, torch.no_grad():
        # the seeds: the origin, then the grid points, each tie-broken along a, then b
        edges = np.zeros(0, dtype=np.int64)
        pts = _starts(start, origin, int(starts), min(int(batch), int(max_regions)))
        ns, es = np.tile([[1.0, 0.0]], (len(pts), 1)), np.tile([[0.0, 1.0]], (len(pts), 1))
        radius = np.full(len(pts), np.inf)
        while True:
            if len(walk.polys) >= max_regions:
                complete = False
                break
            before = len(walk.polys)
            walk.step(edges, pts, ns, es, radius)
            bar.update(len(walk.polys) - before)
            edges = walk.take(int(batch))
            if edges.size == 0:
                break
            pts, ns, es = walk.crossings(edges)
            radius = walk.first_radius(edges)
            extra = walk.probes(int(batch) - len(edges) if int(starts) > 1 else 0, pts)
            if len(extra):
                pts = np.vstack([pts, extra])
                ns = np.vstack([ns, np.tile([1.0, 0.0], (len(extra), 1))])
                es = np.vstack([es, np.tile([0.0, 1.0], (len(extra), 1))])
                radius = np.r_[radius, np.full(len(extra), RADIUS_FACTOR * walk.last_size)]
    area = sum(p.area for p in walk.polys)
    return PlaneMap(walk.polys, walk.graph, tuple(float(e) for e in extent), start, complete,
                    area / _area(start), tuple(origin))


class _Walk:
    """State of one plane walk: the polygons, their edges, and the open edges (facet edges
    not yet covered by known neighbours), each with the parameter of its next crossing.

    Every open edge is tested against every polygon found after it (and it against every
    polygon found before it) for a shared stretch; what stays uncovered is crossed, one
    crossing per edge at a time, in the order the edges were opened (breadth first)."""

    def __init__(self, ob, x0: Tensor, u: Tensor, v: Tensor, start: np.ndarray):
        self.ob, self.x0, self.u, self.v, self.start = ob, x0, u, v, start
        self.diag = float(np.linalg.norm(start.max(0) - start.min(0)))
        self.touch = TOUCH * INSIDE_REL * (self.diag + float(np.abs(start).max()))
        self.polys: list[Polygon] = []
        self.index: dict[RegionKey, int] = {}
        self.graph = nx.Graph()
        self.lengths: dict[tuple[int, int], float] = {}  # graph edge -> its segment's length
        self.edges = _Edges()
        self.covered: dict[int, list[tuple[float, float]]] = {}  # open edge -> intervals
        self.at: dict[int, float] = {}  # open edge -> parameter of its next crossing
        self.queue: list[int] = []  # open edges in crossing order (closed ones skipped)
        self.states = _States()
        self.guess = np.zeros(0, dtype=np.uint64)  # per edge: the guessed neighbour's hash
        self.known_hashes: set[int] = set()
        # the probes: a PROBE_GRID x PROBE_GRID grid of cell centres over the extent's box,
        # drawn in a fixed shuffled order; a sample inside a known polygon is covered
        self.sample_lo = start.min(0)
        self.sample_step = (start.max(0) - self.sample_lo) / PROBE_GRID
        self.samples = _cell_centres(start, PROBE_GRID)
        self.uncovered = _inside_all(start, self.samples)
        self.sample_order = np.random.default_rng(0x9A7E).permutation(len(self.samples))
        self.last_size = 0.0  # the regions found last: median side (square root of area)
        # the affine prefix of every pass, combined from the plane's rows
        self.prefix = PlanePrefix(ob.program, x0, u, v, ob.direction)
        # the first gates' rows that can come near a point of the extent's box
        self.screen = PlaneScreen(ob.program, ob.tol, x0, u, v, start.min(0), start.max(0))
        # the first ReLU and max-pool, decided once where they cannot change
        self.block = PlaneBlock(ob.program, ob.tol, self.prefix, self.screen)

    # -- the frontier

    def take(self, n: int) -> np.ndarray:
        """(<= n,) the next open edges to cross, removed from the queue. An edge whose
        guessed neighbour (:class:`_States`) another edge of the batch is already crossing
        into waits for the next batch, where that neighbour is likely known and covers it
        (the guess only orders the work: what a crossing finds is configured)."""
        out, aimed, wait, seen = [], set(), [], 0
        while seen < len(self.queue) and len(out) < n:
            t = self.queue[seen]
            seen += 1
            if t not in self.at:  # closed since it was queued
                continue
            g = int(self.guess[t])
            if g in aimed:
                wait.append(t)
            else:
                out.append(t)
                if g not in self.known_hashes:  # a known guess is wrong for this part
                    aimed.add(g)
        self.queue = wait + self.queue[seen:]
        return np.array(out, dtype=np.int64)

    def first_radius(self, edges: np.ndarray) -> np.ndarray:
        """(N,) the first box's radius of the crossing of each edge: RADIUS_FACTOR times
        the largest side of the box of the edge's polygon (neighbours are of a size, most
        often; a larger one is redone)."""
        e = self.edges
        own = e.owner[edges]
        return RADIUS_FACTOR * (e.hi[own] - e.lo[own]).max(axis=1)

    def crossings(self, edges: np.ndarray):
        """(points (N, 2), outward normals (N, 2), edge directions (N, 2)) crossing the
        open edges at their parameters."""
        e = self.edges
        s = np.array([self.at[int(t)] for t in edges])
        d = e.d[edges]
        unit = d / e.length[edges, None]
        return e.p[edges] + s[:, None] * d, np.c_[unit[:, 1], -unit[:, 0]], unit

    def probes(self, n: int, near: np.ndarray) -> np.ndarray:
        """(<= n, 2) sample points not inside any known polygon and apart from the points
        ``near`` (N, 2) and from each other by the size of the regions found last, to
        fill a batch that the open edges leave short (a long, thin stretch of regions is
        otherwise crossed one region per pass). What a probe finds is configured, as a
        seed's is; a probe that finds a region a crossing of its batch finds too is only
        a wasted point."""
        if n <= 0 or self.last_size <= 0:
            return np.zeros((0, 2))
        cand = self.sample_order[self.uncovered[self.sample_order]]
        taken = list(near)
        out = []
        for i in cand.tolist():
            q = self.samples[i]
            if np.abs(np.asarray(taken) - q).max(axis=1).min() >= self.last_size:
                out.append(i)
                taken.append(q)
                if len(out) == n:
                    break
        self.uncovered[out] = False
        return self.samples[out]

    def _cover_samples(self, first: int) -> None:
        """Mark the samples inside polygons first, first + 1, ... covered (to
        :meth:`Polygon.contains`' tolerance: a sample on a boundary is covered), all of them
        at once; and note their size."""
        polys = self.polys[first:]
        if not polys:
            return
        v = _padded([p.vertices for p in polys])  # (F, K, 2)
        vn = np.roll(v, -1, axis=1)
        area = 0.5 * (v[..., 0] * vn[..., 1] - vn[..., 0] * v[..., 1]).sum(axis=1)
        self.last_size = float(np.median(np.sqrt(np.maximum(area, 0.0))))
        g = PROBE_GRID
        lo, hi = v.min(axis=1), v.max(axis=1)
        i0 = np.clip(np.floor((lo - self.sample_lo) / self.sample_step - 0.5), 0, g - 1)
        i1 = np.clip(np.ceil((hi - self.sample_lo) / self.sample_step - 0.5), 0, g - 1)
        i0, i1 = i0.astype(np.int64), i1.astype(np.int64)
        na, nb = i1[:, 0] - i0[:, 0] + 1, i1[:, 1] - i0[:, 1] + 1
        f = np.repeat(np.arange(len(polys)), na * nb)  # (P,) the pair's polygon
        r = np.arange(len(f)) - np.repeat(np.cumsum(na * nb) - na * nb, na * nb)
        idx = (i0[f, 0] + r // nb[f]) * g + i0[f, 1] + r % nb[f]  # the pair's sample
        free = self.uncovered[idx]
        f, idx = f[free], idx[free]
        if idx.size == 0:
            return
        a, e, q = v[f], (vn - v)[f], self.samples[idx][:, None]  # (P, K, 2), (P, 1, 2)
        length = np.maximum(np.linalg.norm(e, axis=2), 1e-300)
        dist = (e[..., 0] * (q[..., 1] - a[..., 1]) - e[..., 1] * (q[..., 0] - a[..., 0])) / length
        size = (np.linalg.norm(hi - lo, axis=1) + np.abs(v).max(axis=(1, 2)))[f]
        inside = np.all(dist >= -CONTAINS_REL * size[:, None], axis=1)
        self.uncovered[idx[inside]] = False

    # -- one batch

    def step(self, edges: np.ndarray, pts: np.ndarray, ns: np.ndarray, es: np.ndarray,
             radius: np.ndarray):
        """Configure the points (crossing ``edges``; the seed when edges is empty and one
        point), add the regions found, record what each crossing covers, test the new
        polygons' edges and the open ones for shared stretches, and queue what stays
        uncovered. radius (N,): each point's first box (:meth:`_clip_in_boxes`; inf: the
        extent)."""
        ob, u, v = self.ob, self.u, self.v
        as_t = lambda a: torch.as_tensor(a, dtype=ob.dtype, device=ob.device)  # noqa: E731
        p, n, e = as_t(pts), as_t(ns), as_t(es)
        xs = self.x0 + _combine(p, u, v)
        dn, de = _combine(n, u, v), _combine(e, u, v)
        dirs = torch.stack([dn, de, ob.direction.expand_as(dn)])
        varying = self.screen.varying(pts)
        if self.block.usable and varying:  # (varying is {} if a point left the box)
            kw = dict(block=self.block.bind(p, n, e))
        else:
            kw = dict(given=self.prefix.given(p, n, e), varying=varying)
        logits, config, gates, rates = configure(ob.program, xs, dirs, ob.tol, record=True,
                                                 context=ob.key_context, all_rates=True, **kw)
        keys = config.region_keys()
        fresh, seen = [], set()
        for j, key in enumerate(keys):
            if key not in self.index and key not in seen:
                fresh.append(j)
                seen.add(key)
        first = len(self.polys)
        self._add_regions(config, gates, logits, rates, pts, ns, es, fresh, keys, radius)
        self._cover_samples(first)
        touched = self._record_crossings(edges, [self.index[k] for k in keys[:len(edges)]])
        new_open = self._open_edges(first)
        touched |= self._cover_by_known(first, new_open)
        # queue: the new polygons' edges in order, then the crossed edges still open
        for t in new_open:
            self._next_crossing(t)
        opened = set(new_open)
        for t in touched:
            if t not in opened:
                self._next_crossing(t)
        self.queue += [t for t in new_open if t in self.at]
        self.queue += [int(t) for t in edges if int(t) in self.at]

    def _clip_in_boxes(self, config, gates, pts, ns, es, radius, which):
        """[(vertices, edge labels)] of the polygon of each input which[i], and the rows'
        layout (the rows are formed for every input of the batch).

        Each polygon is first clipped inside the box pts[f] +- radius[f] (L-infinity) by
        the rows whose lines meet that box: a polygon that keeps no vertex on the box's
        boundary is the whole one (it is convex: were it to reach beyond the box, its part
        inside would have an edge on the box). The rows are gathered once for a box
        RADIUS_GROWTH times larger, where the others are clipped again; what reaches that
        box too is clipped by every row that meets the extent."""
        size = np.abs(self.start[None] - pts[:, None]).sum(axis=2).max(axis=1)
        r = np.where(radius < size, radius, np.inf)
        wide = np.where(r * RADIUS_GROWTH < size, r * RADIUS_GROWTH, np.inf)
        rows_of, layout = _half_planes(self.ob, config, gates, pts, ns, es, self.start,
                                       np.minimum(wide, size), self.screen)
        out = [None] * len(pts)
        todo = np.asarray(which, dtype=np.int64)
        for box in (r, wide):
            if todo.size == 0:
                break
            clipped = _polygons(self.ob, [_in_box(rows_of[i], pts[i], box[i])
                                          for i in todo.tolist()], self.start)
            again = []
            for (verts, labels), i in zip(clipped, todo.tolist()):
                if np.isfinite(box[i]) and (
                        len(verts) < 3 or bool((labels == BOX).any())
                        or float(np.abs(verts - pts[i]).max()) >= box[i] * (1 - BOX_MARGIN)):
                    again.append(i)
                else:
                    out[i] = (verts, labels)
            todo = np.array(again, dtype=np.int64)  # (an infinite box is never reached)
        if todo.size:  # beyond the wide box: every row that meets the extent
            sub = torch.as_tensor(todo)
            rows_of, _ = _half_planes(self.ob, config[sub], gates[sub], pts[todo], ns[todo],
                                      es[todo], self.start, screen=self.screen)
            clipped = _polygons(self.ob, [(*rows_of[f], pts[i]) for f, i in
                                          enumerate(todo.tolist())], self.start)
            for f, i in enumerate(todo.tolist()):
                out[i] = clipped[f]
        return [out[i] for i in which], layout

    def _add_regions(self, config, gates, logits, rates, pts, ns, es, fresh, keys, radius):
        """Clip the polygon of every fresh region and append it (``rates`` (3, B, C): the
        logits' derivatives along each point's n, e and u). The batch goes in slices of
        ROWS_CHUNK inputs (views, no copies); a slice's rows are formed for all its inputs
        and used for its fresh ones."""
        verts_list, guess = [], []
        b = config.batch_size
        fresh = np.asarray(fresh, dtype=np.int64)
        for c0 in range(0, b, ROWS_CHUNK):
            c1 = min(b, c0 + ROWS_CHUNK)
            part = fresh[(fresh >= c0) & (fresh < c1)]
            if part.size == 0:
                continue
            if c1 - c0 == b:
                c_sub, g_sub, l_sub, r_sub = config, gates, logits, rates
            else:
                whole = slice(c0, c1)
                c_sub, g_sub, l_sub, r_sub = config[whole], gates[whole], logits[whole], \
                    rates[:, whole]
            local = part - c0
            at = slice(c0, c1)
            clipped, layout = self._clip_in_boxes(c_sub, g_sub, pts[at], ns[at], es[at],
                                                  radius[at], local)
            hashes = self.states.hashes(c_sub, layout)
            w_all, b_all = _plane_llc(l_sub, r_sub, pts[at], ns[at], es[at])
            w_all, b_all = w_all[local], b_all[local]
            for (verts, _), j in zip(clipped, part.tolist()):
                if len(verts) < 3:
                    raise RuntimeError(
                        f"plane: the region at (a, b) = {tuple(pts[j])} clips to an empty "
                        "polygon; its own configuration excludes the point it was found at"
                    )
            centres = _centroids([v for v, _ in clipped])
            predictions = np.argmax(np.einsum("fcd,fd->fc", w_all, centres) + b_all, axis=1)
            for f, j in enumerate(part.tolist()):
                verts, labels = clipped[f]
                poly = Polygon(verts, keys[j], int(predictions[f]), w_all[f], b_all[f], labels)
                poly.__dict__["centroid"] = centres[f]  # the cached property, computed here
                self.index[keys[j]] = len(self.polys)
                self.graph.add_node(len(self.polys))
                self.polys.append(poly)
                verts_list.append(verts)
            self.known_hashes.update(hashes[0][local].tolist())
            counts = [len(labels) for _, labels in clipped]
            guess.append(self.states.across(hashes, np.repeat(local, counts),
                                            np.concatenate([labels for _, labels in clipped]),
                                            layout))
        self.edges.add(len(self.polys) - len(verts_list), verts_list)
        self.guess = np.concatenate([self.guess, *guess])

    def _open_edges(self, first: int) -> list[int]:
        """Open the facet edges of polygons first, first + 1, ...: every edge made by a
        gate row and longer than rounding size (many facets meeting at a tied x0 leave
        edges of rounding length, which are not crossed)."""
        e = self.edges
        lo = int(e.off[first])
        t = np.arange(lo, len(e.owner))
        labels = np.concatenate([p.edge_labels for p in self.polys[first:]]) if t.size else t
        keep = t[(labels != BOUNDARY) & (e.length[lo:] > EDGE_FRACTION * self.diag)]
        out = [int(i) for i in keep]
        for i in out:
            self.covered[i] = []
        return out

    def _link(self, edge: np.ndarray, k: np.ndarray, s0: np.ndarray, s1: np.ndarray) -> None:
        """Edge edge[i] shares [s0[i], s1[i]] with polygon k[i]: record each, and the graph
        edges (as one pair at a time in this order would: an edge is added where its pair
        first appears, with the first of the longest stretches found, known ones included)."""
        if edge.size == 0:
            return
        e = self.edges
        me = e.owner[edge]
        p, d = e.p[edge], e.q[edge] - e.p[edge]
        ends = np.stack([p + s0[:, None] * d, p + s1[:, None] * d], axis=1)  # (P, 2, 2)
        gaps = ends[:, 1] - ends[:, 0]
        lengths = np.sqrt(np.einsum("ij,ij->i", gaps, gaps))
        best: dict[tuple[int, int], tuple] = {}  # pair -> (length, i; -1: the known one)
        for i, (t, a, b, src, dst, length) in enumerate(zip(
                edge.tolist(), s0.tolist(), s1.tolist(), me.tolist(), k.tolist(),
                lengths.tolist())):
            self.covered[t].append((a, b))
            pair = (src, dst) if src < dst else (dst, src)
            held = best.get(pair)
            if held is None:
                held = (self.lengths.get(pair), -1)
            # the longest stretch found is the shared boundary (a shorter one is a piece of
            # it or a touch at its end)
            best[pair] = (length, i) if held[0] is None or length > held[0] else held
        win = np.array([i for _, i in best.values() if i >= 0], dtype=np.int64)
        if win.size == 0:
            return
        src, dst = me[win], k[win]
        flips = _differs([self.polys[i] for i in src.tolist()],
                         [self.polys[i] for i in dst.tolist()], ends[win])
        for a, b, seg, flip, length in zip(src.tolist(), dst.tolist(), ends[win], flips.tolist(),
                                           lengths[win].tolist()):
            self.graph.add_edge(a, b, segment=seg, decision_boundary=flip)
            self.lengths[(a, b) if a < b else (b, a)] = length

    def _record_crossings(self, edges: np.ndarray, dst: list[int]) -> set[int]:
        """Crossing edges[i] landed in polygon dst[i]: the part of the edge dst covers."""
        if edges.size == 0:
            return set()
        dst = np.array(dst, dtype=np.int64)
        s0, s1, _, _ = self.edges.stretches(edges, dst)
        for t, k, a, b in zip(edges.tolist(), dst.tolist(), s0.tolist(), s1.tolist()):
            src, at = int(self.edges.owner[t]), self.at.pop(t)
            if k == src or not a <= at <= b:
                raise RuntimeError(
                    f"plane: crossing edge {int(self.edges.local[t])} of region {src} at "
                    f"s = {at:.6g} landed in region {k}, which covers [{a:.6g}, {b:.6g}] of "
                    "it; the walk is inconsistent")
        self._link(edges, dst, s0, s1)
        return set(edges.tolist())

    def _cover_by_known(self, first: int, new_open: list[int]) -> set[int]:
        """Test the new polygons' open edges against every other polygon, and the older
        open edges against the new polygons, for shared stretches (polygons tile without
        overlap, so a polygon sharing a stretch of an edge is the neighbour across it).
        Returns the edges whose coverage grew."""
        e = self.edges
        n = len(self.polys)
        if n == first:
            return set()
        old = np.array([t for t in self.covered if t < e.off[first]], dtype=np.int64)
        new = np.array(new_open, dtype=np.int64)
        pairs_e, pairs_k = [], []
        for ts, ks in ((new, np.arange(n)), (old, np.arange(first, n))):
            if ts.size == 0:
                continue
            # a stretch that counts lies on the edge and, to rounding, on an edge of the
            # polygon: the edge's box meets the polygon's box up to that rounding
            pt, qt = e.p[ts], e.q[ts]
            elo, ehi = np.minimum(pt, qt) - self.touch, np.maximum(pt, qt) + self.touch
            i, j = _boxes_meet(elo, ehi, e.lo[ks], e.hi[ks])
            keep = e.owner[ts][i] != ks[j]
            pairs_e.append(ts[i[keep]])
            pairs_k.append(ks[j[keep]])
        if not pairs_e:
            return set()
        edge, poly = np.concatenate(pairs_e), np.concatenate(pairs_k)
        s0, s1, lo, hi = e.stretches(edge, poly)
        # a polygon that only touches a vertex passes the tolerance over a stretch of
        # rounding length: take only the part along one of the polygon's own edges (a
        # shared stretch lies on the line of a facet of both), and only if well above
        # rounding (anything else is found by crossing, as any uncovered part is)
        s0, s1 = np.maximum(s0, lo), np.minimum(s1, hi)
        width = s1 - s0
        ok = (width > KNOWN_STRETCH) & (width * e.length[edge] > EDGE_FRACTION * self.diag)
        self._link(edge[ok], poly[ok], s0[ok], s1[ok])
        return set(edge[ok].tolist())

    def _next_crossing(self, t: int) -> None:
        """The open edge's next crossing: the middle of its first uncovered part longer
        than rounding; closed (no longer open) when none is left."""
        length = float(self.edges.length[t])
        for g0, g1 in _subtract(self.covered[t]):
            if (g1 - g0) * length > EDGE_FRACTION * self.diag:
                self.at[t] = 0.5 * (g0 + g1)
                return
        self.at.pop(t, None)
        del self.covered[t]


BOX_PAIRS_DENSE = 1 << 16
"""Edge-polygon pairs below which :func:`_boxes_meet` tests every pair at once."""


def _boxes_meet(elo: np.ndarray, ehi: np.ndarray, lo: np.ndarray, hi: np.ndarray):
    """(i, j) int64, row-major (i, then j ascending): the pairs of boxes [elo_i, ehi_i]
    (E, 2) and [lo_j, hi_j] (N, 2) that meet (closed: touching counts), as the dense test
    over all E x N pairs gives them. Past BOX_PAIRS_DENSE pairs, only the boxes j whose
    lower x lies in [elo_i x - the widest box, ehi_i x] are tested (those with lo_j x >
    ehi_i x, or hi_j x < elo_i x, cannot meet box i): sorted by lower x, a window each."""
    e, n = len(elo), len(lo)
    if e * n <= BOX_PAIRS_DENSE:
        hit = elo[:, None, 0] <= hi[None, :, 0]
        hit &= elo[:, None, 1] <= hi[None, :, 1]
        hit &= lo[None, :, 0] <= ehi[:, None, 0]
        hit &= lo[None, :, 1] <= ehi[:, None, 1]
        return np.nonzero(hit)
    order = np.argsort(lo[:, 0], kind="stable")
    lox = lo[order, 0]
    wide = float((hi[:, 0] - lo[:, 0]).max())
    a = np.searchsorted(lox, elo[:, 0] - wide, side="left")
    b = np.searchsorted(lox, ehi[:, 0], side="right")
    count = np.maximum(b - a, 0)
    i = np.repeat(np.arange(e), count)
    j = order[np.repeat(a, count) + _ranks(count)]  # each box's window, in sorted order
    hit = (elo[i, 0] <= hi[j, 0]) & (elo[i, 1] <= hi[j, 1]) & (lo[j, 0] <= ehi[i, 0]) \
        & (lo[j, 1] <= ehi[i, 1])
    i, j = i[hit], j[hit]
    at = np.lexsort((j, i))
    return i[at], j[at]


def _ranks(count: np.ndarray) -> np.ndarray:
    """(sum count,) 0, 1, ..., count_0 - 1, 0, 1, ..., count_1 - 1, ..."""
    total = int(count.sum())
    if total == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.repeat(np.cumsum(count) - count, count)
    return np.arange(total, dtype=np.int64) - starts


def _differs(a: list[Polygon], b: list[Polygon], seg: np.ndarray) -> np.ndarray:
    """(P,) bool: the predicted class differs on the two sides of each shared segment
    seg[i] (P, 2, 2) of polygons a[i] and b[i]."""
    mid = 0.5 * (seg[:, 0] + seg[:, 1])
    out = []
    for side in (a, b):
        w = np.stack([p.weight for p in side])  # (P, C, 2)
        bias = np.stack([p.bias for p in side])
        at = mid + 1e-7 * (np.stack([p.centroid for p in side]) - mid)
        out.append(np.argmax(np.einsum("pcd,pd->pc", w, at) + bias, axis=1))
    return out[0] != out[1]
