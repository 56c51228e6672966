"""2-D plane maps: the exact partition of a plane slice of input space into linear regions.

The slice is ``{x0 + a u + b v : (a, b) in extent}``. Inside one region every gate row
restricted to the plane is a half-plane (:func:`openbox.constraints.rows_in_plane`), so
the region's polygon is the extent clipped by those half-planes: exact 2-D half-plane
intersection, no LP. The walk is breadth-first over polygons: every edge that is a gate
facet is crossed at a point of it not yet covered by a known neighbour, the neighbour's
configuration taken with a lexicographic tie-break (the edge's outward normal, then the
edge direction, then the OpenBox's u: the region on the other side), until every facet
edge is covered by neighbours; then the polygons tile the extent. Frontier points are
configured in batches (one pass for many regions).

Coordinates: (a, b) in the plane's own basis (u, v need not be orthogonal or unit);
vertices are counter-clockwise in (a, b).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from openbox.configuration import RegionKey, configure
from openbox.constraints import rows_in_plane
from openbox.linear_maps import FixedForward

DEFAULT_BATCH = 64
"""Frontier points configured per pass."""

EDGE_FRACTION = 1e-9
"""Uncovered parts of an edge shorter than this fraction of the extent's diagonal are not
crossed (a sliver that thin is reported through :attr:`PlaneMap.coverage`)."""

VERTEX_MERGE = 1e-12
"""Consecutive polygon vertices closer than this times the polygon's coordinate size are
one vertex (clipping by many lines through one point, e.g. the facets of a tied x0, leaves
edges of rounding length whose direction is noise)."""

BOUNDARY = -1
"""Edge label of the extent's (or the domain's) boundary: nothing to cross."""


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

    @property
    def centroid(self) -> np.ndarray:
        return _centroid(self.vertices)

    def logits(self, ab: np.ndarray) -> np.ndarray:
        """(N, C) the region's affine logits at points ab (N, 2)."""
        return np.atleast_2d(ab) @ self.weight.T + self.bias

    def contains(self, ab: np.ndarray, tol: float = 1e-9) -> np.ndarray:
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
            boundary segment, with attributes ``segment`` ((2, 2) (a, b) end points) and
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


def _area(v: np.ndarray) -> float:
    x, y = v[:, 0], v[:, 1]
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _centroid(v: np.ndarray) -> np.ndarray:
    a = _area(v)
    if a <= 0:
        return v.mean(axis=0)
    x, y = v[:, 0], v[:, 1]
    cr = x * np.roll(y, -1) - np.roll(x, -1) * y
    return np.array([np.dot(x + np.roll(x, -1), cr), np.dot(y + np.roll(y, -1), cr)]) / (6 * a)


def _clip(verts: np.ndarray, labels: np.ndarray, g: np.ndarray, h: float, label: int):
    """Sutherland-Hodgman: the convex polygon (verts CCW, per-edge labels) intersected
    with ``g . q <= h``; the new edge along the line gets ``label``."""
    s = verts @ g - h
    inside = s <= 0
    if inside.all():
        return verts, labels
    if not inside.any():
        return verts[:0], labels[:0]
    out_v, out_l = [], []
    k = len(verts)
    for i in range(k):
        j = (i + 1) % k
        if inside[i]:
            out_v.append(verts[i])
            out_l.append(labels[i] if inside[j] else labels[i])
        if inside[i] != inside[j]:
            t = s[i] / (s[i] - s[j])
            out_v.append(verts[i] + t * (verts[j] - verts[i]))
            out_l.append(labels[i] if inside[j] else label)
    v, lab = np.array(out_v), np.array(out_l)
    # a vertex (within rounding) equal to the next one starts an edge of rounding length,
    # whose direction is noise: drop it, so the edge that follows keeps its own label
    size = float(np.abs(v).max()) + float(np.ptp(v, axis=0).max())
    gap = np.linalg.norm(v - np.roll(v, -1, axis=0), axis=1)
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
    a, c = verts, np.roll(verts, -1, axis=0)
    e = c - a
    length = np.maximum(np.linalg.norm(e, axis=1), 1e-300)
    cross = e[None, :, 0] * (pts[:, None, 1] - a[None, :, 1]) - e[None, :, 1] * (
        pts[:, None, 0] - a[None, :, 0])
    return cross / length[None]


def _segment_inside(p: np.ndarray, q: np.ndarray, verts: np.ndarray,
                    rel: float = 1e-9) -> tuple[float, float]:
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
        for g, h in zip(G[finite], H[finite]):
            verts, labels = _clip(verts, labels, g, h, BOUNDARY)
            if len(verts) < 3:
                raise ValueError("the extent does not meet the OpenBox's domain")
    return verts


def _half_planes(ob, config, gates, p: np.ndarray, n: np.ndarray, e: np.ndarray, j: int):
    """(G (m, 2), h (m,), row ids (m,)) with ``G q <= h`` for the region of input j,
    from its rows restricted to the plane around p along (n, e) (orthonormal in (a, b))."""
    Gs, hs = [], []
    for _, slack, r1, r2 in rows_in_plane(ob.program, config[j], gates[j], ob.tol):
        s = slack[0].double().cpu().numpy()
        w = np.outer(r1[0].double().cpu().numpy(), n) + np.outer(r2[0].double().cpu().numpy(), e)
        # slack + (q - p) . w >= 0  <=>  -w . q <= slack - w . p
        Gs.append(-w)
        hs.append(s - w @ p)
    if not Gs:  # no gates: one region, the whole plane
        return np.zeros((0, 2)), np.zeros(0), np.zeros(0, dtype=np.int64)
    G, h = np.vstack(Gs), np.concatenate(hs)
    keep = np.isfinite(h) & np.any(G != 0, axis=1)
    return G[keep], h[keep], np.flatnonzero(keep)


def _polygon(ob, G, h, rows, start: np.ndarray, p: np.ndarray):
    """The extent polygon ``start`` clipped by ``G q <= h`` (only rows that cut it)."""
    verts, labels = start.copy(), np.full(len(start), BOUNDARY)
    gn = np.abs(G).sum(axis=1)
    # a row can only cut the polygon if its line passes within the polygon's size of p
    dist = (h - G @ p) / np.maximum(gn, 1e-300)
    while len(verts) >= 3:
        size = float(np.abs(verts - p).sum(axis=1).max())
        near = np.flatnonzero(dist <= size)
        if near.size == 0:
            break
        excess = G[near] @ verts.T - h[near, None]  # (r, V)
        # rounding-level threshold: after a clip the new vertices lie on the row's line
        thr = ob.tol.tie * (1.0 + np.abs(h[near]) + gn[near] * float(np.abs(verts).max()))
        worst = (excess - thr[:, None]).max(axis=1)
        i = int(np.argmax(worst))
        if worst[i] <= 0:
            break
        r = near[i]
        verts, labels = _clip(verts, labels, G[r], h[r], int(rows[r]))
    return verts, labels


def plane(
    ob,
    x0: Tensor,
    u: Tensor,
    v: Tensor,
    extent: tuple[float, float, float, float] = (-1.0, 1.0, -1.0, 1.0),
    *,
    max_regions: int = 20_000,
    batch: int = DEFAULT_BATCH,
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
        progress: a tqdm bar over polygons found (default on).

    Returns:
        a :class:`PlaneMap`. Exactness: the polygons' areas sum to the clipped extent's
        (``coverage`` 1 to ~1e-12), no two overlap, and every point's region key is its
        polygon's (tests check all three).
    """
    x0 = ob.check_point(x0, "x0")
    u, v = _check_directions(ob, u, v)
    start = _extent_polygon(ob, x0, u, v, extent)
    diag = float(np.linalg.norm(start.max(0) - start.min(0)))
    origin = np.zeros(2) if _inside(start, np.zeros(2)) else _centroid(start)
    polys: list[Polygon] = []
    index: dict[RegionKey, int] = {}
    graph = nx.Graph()
    covered: dict[tuple[int, int], list[tuple[float, float]]] = {}
    # frontier items: (point (2,), n (2,), e (2,), edge id (polygon, edge) or None)
    frontier = [(origin, np.array([1.0, 0.0]), np.array([0.0, 1.0]), None)]
    complete = True
    grid = _Grid(start, GRID_CELLS)
    bar = tqdm(desc="plane", unit="region", leave=False,
               disable=not (True if progress is None else progress))
    with bar, torch.no_grad():
        while frontier:
            if len(polys) >= max_regions:
                complete = False
                break
            todo, frontier = frontier[:batch], frontier[batch:]
            pts = np.array([t[0] for t in todo])
            ns = np.array([t[1] for t in todo])
            es = np.array([t[2] for t in todo])
            as_t = lambda a: torch.as_tensor(a, dtype=ob.dtype, device=ob.device)  # noqa: E731
            xs = x0 + as_t(pts[:, 0]).reshape(-1, *[1] * len(ob.input_shape)) * u \
                + as_t(pts[:, 1]).reshape(-1, *[1] * len(ob.input_shape)) * v
            dn = _combine(as_t(ns), u, v)
            de = _combine(as_t(es), u, v)
            dirs = torch.stack([dn, de, ob.direction.expand_as(dn)])
            logits, config, gates, _ = configure(ob.program, xs, dirs, ob.tol, record=True,
                                                 context=ob.key_context)
            keys = config.region_keys()
            fresh, seen = [], set()
            for j, key in enumerate(keys):
                if key not in index and key not in seen:
                    fresh.append(j)
                    seen.add(key)
            llc = _plane_llc(ob, config, logits, u, v, pts) if fresh else None
            for j in fresh:
                G, h, rows = _half_planes(ob, config, gates, pts[j], ns[j], es[j], j)
                verts, labels = _polygon(ob, G, h, rows, start, pts[j])
                if len(verts) < 3:
                    raise RuntimeError(
                        f"plane: the region at (a, b) = {tuple(pts[j])} clips to an empty "
                        "polygon; its own configuration excludes the point it was found at"
                    )
                w, b0 = llc[0][j], llc[1][j]
                pred = int(np.argmax(np.atleast_2d(_centroid(verts)) @ w.T + b0))
                index[keys[j]] = len(polys)
                graph.add_node(len(polys))
                polys.append(Polygon(verts, keys[j], pred, w, b0, labels))
                bar.update(1)
                me = len(polys) - 1
                near = grid.near(verts)
                grid.add(me, verts)
                lengths = np.linalg.norm(np.roll(verts, -1, axis=0) - verts, axis=1)
                for i, lab in enumerate(labels):
                    # edges of rounding size (many facets meet at a tied x0) are not crossed
                    if lab == BOUNDARY or lengths[i] <= EDGE_FRACTION * diag:
                        continue
                    covered[(me, i)] = []
                    # known neighbours already cover parts of it: cross only the rest
                    frontier += _cover_by_known(polys, covered, graph, me, i, near, diag)
            for j, item in enumerate(todo):
                if item[3] is None:
                    continue
                src, edge, at = item[3]
                dst = index[keys[j]]
                frontier += _cover(polys, covered, graph, src, edge, at, dst, diag)
    area = sum(p.area for p in polys)
    return PlaneMap(polys, graph, tuple(float(e) for e in extent), start, complete,
                    area / _area(start), tuple(origin))


def _inside(verts: np.ndarray, q: np.ndarray) -> bool:
    p, r = verts, np.roll(verts, -1, axis=0)
    cross = (r[:, 0] - p[:, 0]) * (q[1] - p[:, 1]) - (r[:, 1] - p[:, 1]) * (q[0] - p[:, 0])
    return bool(np.all(cross > 0))


def _combine(ab: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """(N, *input_shape) input-space vectors a u + b v for ab (N, 2)."""
    shape = (-1, *[1] * u.dim())
    return ab[:, 0].reshape(shape) * u + ab[:, 1].reshape(shape) * v


def _plane_llc(ob, config, logits, u, v, pts):
    """Per input j: (C, 2) d logits / d(a, b) and (C,) logits at (0, 0), by pushing u and v
    through the network with input j's gates fixed."""
    b = config.batch_size
    push = torch.stack([u, v]).unsqueeze(0).expand(b, -1, *u.shape).reshape(-1, *u.shape)
    out = FixedForward(config, with_bias=False).run(ob.program, push).reshape(b, 2, -1)
    w = out.transpose(1, 2).double().cpu().numpy()  # (B, C, 2)
    bias = logits.double().cpu().numpy() - np.einsum("bcd,bd->bc", w, pts)
    return w, bias


KNOWN_STRETCH = 1e-6
"""Shortest fraction of a new edge that a known polygon must share to count as covering it
without a crossing."""

GRID_CELLS = 64
"""Cells per side of the spatial index that finds the known polygons along a new edge."""


class _Grid:
    """Polygons by the cells of a uniform grid over the extent that their boxes meet."""

    def __init__(self, start: np.ndarray, cells: int):
        self.lo = start.min(0)
        self.size = np.maximum(start.max(0) - self.lo, 1e-300) / cells
        self.cells = cells
        self.members: dict[tuple[int, int], list[int]] = {}

    def _range(self, verts: np.ndarray):
        i0, j0 = np.clip(((verts.min(0) - self.lo) / self.size).astype(int) - 1, 0,
                         self.cells - 1)
        i1, j1 = np.clip(((verts.max(0) - self.lo) / self.size).astype(int) + 1, 0,
                         self.cells - 1)
        return [(i, j) for i in range(i0, i1 + 1) for j in range(j0, j1 + 1)]

    def add(self, k: int, verts: np.ndarray) -> None:
        for cell in self._range(verts):
            self.members.setdefault(cell, []).append(k)

    def near(self, verts: np.ndarray) -> list[int]:
        found = set()
        for cell in self._range(verts):
            found.update(self.members.get(cell, ()))
        return sorted(found)


def _cover_by_known(polys, covered, graph, me, edge, near, diag):
    """Cover edge ``edge`` of the new polygon ``me`` by the known polygons ``near`` that
    share a stretch of it (polygons tile without overlap, so such a polygon is the
    neighbour across it), then return a crossing of the first uncovered part, if any."""
    verts = polys[me].vertices
    p, q = verts[edge], verts[(edge + 1) % len(verts)]
    length = float(np.linalg.norm(q - p))
    for k in near:
        s0, s1 = _segment_inside(p, q, polys[k].vertices)
        # a polygon that only touches a vertex passes _segment_inside's tolerance over a
        # stretch of rounding length: take only stretches well above it (shorter shared
        # stretches are found by crossing, as any uncovered part is)
        if s1 - s0 <= KNOWN_STRETCH or (s1 - s0) * length <= EDGE_FRACTION * diag:
            continue
        covered[(me, edge)].append((s0, s1))
        if not graph.has_edge(me, k):
            seg = np.array([p + s0 * (q - p), p + s1 * (q - p)])
            graph.add_edge(me, k, segment=seg,
                           decision_boundary=_differs(polys[me], polys[k], seg))
    for g0, g1 in _subtract(covered[(me, edge)]):
        if (g1 - g0) * length > EDGE_FRACTION * diag:
            return [_crossing(verts, edge, 0.5 * (g0 + g1), me)]
    return []


def _differs(a: Polygon, b: Polygon, seg: np.ndarray) -> bool:
    """The predicted class differs on the two sides of the shared segment."""
    mid = 0.5 * (seg[0] + seg[1])
    pa = a.logits(mid + 1e-7 * (a.centroid - mid)).argmax()
    pb = b.logits(mid + 1e-7 * (b.centroid - mid)).argmax()
    return bool(pa != pb)


def _crossing(verts: np.ndarray, i: int, s: float, owner: int):
    """A frontier item crossing edge i of a polygon at parameter s."""
    p, q = verts[i], verts[(i + 1) % len(verts)]
    e = (q - p) / np.linalg.norm(q - p)
    n = np.array([e[1], -e[0]])  # outward for a counter-clockwise polygon
    return (p + s * (q - p), n, e, (owner, i, s))


def _cover(polys, covered, graph, src, edge, at, dst, diag):
    """Record that crossing ``edge`` of polygon ``src`` at parameter ``at`` landed in
    ``dst``: the part of the edge ``dst`` covers, a graph edge, and a new crossing of what
    stays uncovered."""
    verts = polys[src].vertices
    p, q = verts[edge], verts[(edge + 1) % len(verts)]
    s0, s1 = _segment_inside(p, q, polys[dst].vertices)
    if dst == src or not s0 <= at <= s1:
        raise RuntimeError(
            f"plane: crossing edge {edge} of region {src} at s = {at:.6g} landed in region "
            f"{dst}, which covers [{s0:.6g}, {s1:.6g}] of it; the walk is inconsistent")
    covered[(src, edge)].append((s0, s1))
    seg = np.array([p + s0 * (q - p), p + s1 * (q - p)])
    if not graph.has_edge(src, dst):
        graph.add_edge(src, dst, segment=seg,
                       decision_boundary=_differs(polys[src], polys[dst], seg))
    length = float(np.linalg.norm(q - p))
    out = []
    for g0, g1 in _subtract(covered[(src, edge)]):
        if (g1 - g0) * length > EDGE_FRACTION * diag:
            out.append(_crossing(verts, edge, 0.5 * (g0 + g1), src))
            break  # one crossing at a time: its result tells what it covers
    return out
