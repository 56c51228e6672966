"""The polytope of a configuration: one linear constraint per gate input.

For an input x with configuration c, the region ``P = {x' : config(x') = c}`` is

* ReLU input z (on):   ``z(x') >= 0``;   (off): ``z(x') <= 0``
* max-pool window with selected entry j, for every other valid entry i:
  ``z_i(x') <= z_j(x')``

where every z is an affine function of x' once the gates are fixed. Each
constraint becomes a row ``a . x' <= d`` of ``A x' <= d``. The linear parts come
from pushing the identity basis through the fixed network (n vectors, in chunks
so memory stays bounded), the offsets from pushing x' = 0 with the biases on.
Rows whose linear part is identically zero are dropped: they are the same
function on both sides (e.g. two ReLUs that are both off) or a constant gate
input, never a facet.

Rows whose linear part comes out *exactly* zero after the push are dropped as well (with
their offset: a zero row with offset >= 0 says 0 <= d and constrains nothing): they arise
when two max-pool entries are the same linear function reached by the same arithmetic
(overlapping pools, adaptive pooling that duplicates entries). A zero row with a negative
offset would mean the input violates its own configuration: an error, never a skip.

Slack ``d - a . x`` is taken from the forward pass's own gate values (no
cancellation); tied rows (x on the facet) get slack exactly 0.

This module is the one owner of "a gate row": which rows a configuration has, their
orientation, their slack, the rows restricted to a line (:func:`rows_along`,
:func:`step_along`) or a plane (:func:`rows_in_plane`), the full rows
(:func:`build_constraints`) and the radii they give (:func:`certified_radius_pair`).
Region walks use these; none re-derives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from math import prod
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from linearize import MaxPool, Program, ReLU
from openbox.configuration import (Configuration, GateValues, affine_prefix, any_true,
                                   flat_nonzero, pool_grid)
from openbox.linear_maps import FixedForward, gate_support
from openbox.tolerances import Tolerances

ROW_SOURCE_DTYPE = np.dtype([("node", np.int32), ("unit", np.int64), ("partner", np.int64)])
"""Per-row provenance: program node index of the gate; ``unit`` the flat gate-input
index the row constrains (ReLU: the rectified unit; max-pool: the losing entry
i); ``partner`` the selected entry j of a max-pool row, -1 for a ReLU row."""


@dataclass(frozen=True, eq=False)
class _GateRows:
    """Constraint rows contributed by one gate node, for each of B inputs.

    Rows ``start:stop`` of the layout. ReLU: ``sign`` (B, m) = +1 (on) / -1 (off),
    row = -sign * a_unit for the units ``unit`` (m,) (all of them unless filtered).
    MaxPool: row = a_unit - a_partner, ``unit`` and ``partner`` (B, m) flat gate-input
    indices; ``window_of`` (B, m) the window (output) of each row, and ``per_window``
    the number of rows of every window when that number is the same for all (then rows
    are grouped by window, in window order), else None.
    """

    k: int
    start: int
    stop: int
    unit: Tensor
    partner: Tensor | None
    sign: Tensor | None
    slack: Tensor
    window_of: Tensor | None = None
    per_window: int | None = None

    def rows(self, z: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
        """Rows for pushed vectors, from the gate's input z (B, K, n_in) and output
        y (B, K, n_out): (B, K, stop - start). With ``out`` (K, stop - start), a batch of
        one is written there directly.
        """
        if out is not None:
            z0 = z[0]
            if self.sign is not None:
                if self.unit.numel() != z0.shape[1]:
                    z0 = z0.index_select(1, self.unit)
                return torch.mul(z0, -self.sign[0], out=out)
            losing = z0.index_select(1, self.unit[0])
            if self.per_window is not None:  # a_partner is the window's output: broadcast it
                k, q = out.shape[0], self.per_window
                return torch.sub(losing.view(k, -1, q), y[0].unsqueeze(2),
                                 out=out.view(k, -1, q))
            return torch.sub(losing, y[0].index_select(1, self.window_of[0]), out=out)
        if self.sign is not None:
            if self.unit.numel() != z.shape[2]:  # only the units with a non-zero linear part
                z = z.index_select(2, self.unit)
            return z * -self.sign.unsqueeze(1)
        k = z.shape[1]
        gather = lambda v, idx: v.gather(2, idx.unsqueeze(1).expand(-1, k, -1))  # noqa: E731
        return gather(z, self.unit) - gather(y, self.window_of)


def _relu_sign(config: Configuration, k: int, z: Tensor) -> Tensor:
    """(B, n) +1 where ReLU node k is on, -1 where off: the row of unit i is
    ``-sign_i a_i . x' <= sign_i c_i`` (on: z >= 0; off: z <= 0), its slack ``sign_i z_i``."""
    return torch.where(config.on[k].reshape(z.shape), 1.0, -1.0).to(z.dtype)


def _relu_slack(sign: Tensor, z: Tensor, tol: Tolerances) -> Tensor:
    """Slack ``sign z`` of ReLU rows, exactly 0 where z is tied at the kink."""
    return torch.where(tol.relu_tied(z), torch.zeros_like(z), sign * z)


def _pool_slack(zi: Tensor, zj: Tensor, tol: Tolerances) -> Tensor:
    """Slack ``z_j - z_i`` of the max-pool row "entry i <= selected entry j", exactly 0
    where the two tie."""
    return torch.where(tol.pool_tied(zi, zj), torch.zeros_like(zj), zj - zi)


def _plan(
    program: Program,
    config: Configuration,
    gates: GateValues,
    tol: Tolerances,
    support: dict[int, Tensor] | None = None,
) -> list[_GateRows]:
    """Row layout, orientation and slack of every gate, for every input of ``config``.

    ``gates.values[k]`` is (B, *in_shape). Without ``support`` the layout (row
    counts) is the same for every input: a window contributes one row per valid
    entry except the selected one. With ``support`` (B = 1 only; from
    :func:`gate_support`) rows whose linear part is identically zero are left out.
    """
    if support is not None and config.batch_size != 1:
        raise ValueError("row filtering by support needs a batch of one")
    plans, start = [], 0
    for k in program.gates:
        node = program.nodes[k]
        z = gates.values[k].reshape(config.batch_size, -1)
        if isinstance(node, ReLU):
            sign = _relu_sign(config, k, z)
            slack = _relu_slack(sign, z, tol)
            unit = torch.arange(z.shape[1], device=z.device)
            if support is not None:
                unit = support[k][0].nonzero().flatten()
                sign, slack = sign[:, unit], slack[:, unit]
            plans.append(_GateRows(k, start, start + unit.numel(), unit, None, sign, slack))
        elif isinstance(node, MaxPool):
            sel = config.select[k]  # (B, n_out)
            window = node.window.to(z.device).expand(sel.shape[0], -1, -1)  # (B, n_out, K)
            cols = torch.arange(window.shape[2], device=z.device)
            other = (window >= 0) & (cols != sel.unsqueeze(2))
            j = config.index[k]  # (B, n_out)
            if support is not None:
                live = support[k][0]
                other &= live[window.clamp_min(0)] | live[j].unsqueeze(2)
            unit = window[other].reshape(sel.shape[0], -1)
            partner = j.unsqueeze(2).expand_as(window)[other].reshape(unit.shape)
            outputs = torch.arange(window.shape[1], device=z.device)[None, :, None]
            window_of = outputs.expand_as(window)[other].reshape(unit.shape)
            counts = other[0].sum(1)
            uniform = sel.shape[0] == 1 and bool((counts == counts[0]).all())
            per_window = int(counts[0]) if uniform and counts.numel() and counts[0] > 0 else None
            zj = z.gather(1, partner)
            zi = z.gather(1, unit)
            slack = _pool_slack(zi, zj, tol)
            plans.append(_GateRows(k, start, start + unit.shape[1], unit, partner, None, slack,
                                   window_of, per_window))
        start = plans[-1].stop
    return plans


def _plan_size(program: Program, k: int) -> int:
    """Rows gate node k has before zero rows are dropped."""
    node = program.nodes[k]
    if isinstance(node, ReLU):
        return prod(node.in_shape)
    return int((node.window >= 0).sum()) - node.window.shape[0]


def _push(
    program: Program,
    forward: FixedForward,
    plans: list[_GateRows],
    v: Tensor,
    sink,
) -> None:
    """Push v (B * K, *input_shape) through the fixed network up to its last gate and
    hand each gate's input and output, (B, K, n_in) and (B, K, n_out), to
    ``sink(plan, z, y)`` as soon as they exist."""
    by_node = {p.k: p for p in plans}

    def hook(k, node, z, y):
        sink(by_node[k], z, y)

    forward.on_gate = hook
    if plans:
        forward.run(program, v, until=plans[-1].k)


def _basis(program: Program, c0: int, c1: int, copies: int) -> Tensor:
    """Unit vectors e_c0 .. e_(c1-1), repeated for ``copies`` inputs: (copies * K, *input_shape)."""
    n = prod(program.input_shape)
    eye = torch.zeros((c1 - c0, n), dtype=program.dtype, device=program.device)
    eye[torch.arange(c1 - c0), torch.arange(c0, c1)] = 1
    eye = eye.reshape(1, c1 - c0, *program.input_shape)
    return eye.expand(copies, -1, *program.input_shape).reshape(-1, *program.input_shape)


@dataclass(frozen=True, eq=False)
class Constraints:
    """The network's own constraints at one input: ``A x' <= d``.

    Attributes:
        A: (m, n) float array (a transposed C-ordered (n, m) buffer, so Fortran order).
        d: (m,). slack: (m,) ``d - A x`` from the forward pass, 0 on tied rows.
        source: (m,) structured array of ROW_SOURCE_DTYPE.
        n_dropped: rows dropped as identically zero.
    """

    A: np.ndarray
    d: np.ndarray
    slack: np.ndarray
    source: np.ndarray
    n_dropped: int


def build_constraints(
    program: Program,
    config: Configuration,
    gates: GateValues,
    tol: Tolerances,
    *,
    chunk: int = 1024,
) -> Constraints:
    """All constraints of the single input of ``config`` (B = 1).

    Args:
        program: compiled network in the working dtype/device.
        config: configuration of one input.
        gates: its gate values, (1, *in_shape) each.
        chunk: basis vectors pushed at once (memory ~ chunk x largest activation).

    Raises:
        RuntimeError: a row is exactly zero with a negative offset (the input would
            violate its own configuration), or a row or offset is not finite.
    """
    if config.batch_size != 1:
        raise ValueError(f"build_constraints takes one input, got {config.batch_size}")
    support = gate_support(program, config)
    plans = _plan(program, config, gates, tol, support)
    m = plans[-1].stop if plans else 0
    n_planned = sum(_plan_size(program, k) for k in program.gates)
    n = prod(program.input_shape)
    np_dtype = np.float64 if program.dtype == torch.float64 else np.float32

    # A transposed, C order: a chunk of basis vectors fills a contiguous block of rows.
    # Allocated by numpy: glibc then reuses a freed A's pages for the next one, where
    # torch's allocator maps fresh ones, and page faults cost ~4x the writes themselves.
    at = torch.from_numpy(np.empty((n, m), dtype=np_dtype))
    on_cpu = program.device.type == "cpu"
    linear = FixedForward(config, with_bias=False)
    for c0 in range(0, n, chunk):
        c1 = min(n, c0 + chunk)

        def write(p, z, y, c0=c0, c1=c1):
            block = at[c0:c1, p.start : p.stop]
            if on_cpu:
                p.rows(z, y, out=block)
            else:  # rows are made on the device, A is kept in host memory
                block.copy_(p.rows(z, y)[0])

        _push(program, linear, plans, _basis(program, c0, c1, 1), write)
    d = np.empty(m, dtype=np_dtype)

    def write_offset(p, z, y):  # a.x' + c <= 0  <=>  a.x' <= -c
        d[p.start : p.stop] = -p.rows(z, y)[0, 0].cpu().numpy()

    zero = torch.zeros((1, *program.input_shape), dtype=program.dtype, device=program.device)
    _push(program, FixedForward(config, with_bias=True), plans, zero, write_offset)
    source = np.empty(m, dtype=ROW_SOURCE_DTYPE)
    slack = np.empty(m, dtype=np_dtype)
    for p in plans:
        rows = slice(p.start, p.stop)
        source["node"][rows] = p.k
        source["unit"][rows] = p.unit.reshape(-1).cpu().numpy()
        source["partner"][rows] = -1 if p.partner is None else p.partner[0].cpu().numpy()
        slack[rows] = p.slack[0].cpu().numpy()

    A = at.numpy().T
    if not (np.isfinite(d).all() and np.isfinite(A).all()):
        raise RuntimeError("polytope rows are not finite; the network overflows at this input")
    live = _nonzero_rows(at)
    if not live.all():
        _check_zero_rows(d[~live], slack[~live], source[~live])
        keep = np.flatnonzero(live)
        A, d, slack, source = A[keep], d[keep], slack[keep], source[keep]
    return Constraints(A, d, slack, source, n_planned - A.shape[0])


def _nonzero_rows(at: Tensor) -> np.ndarray:
    """(m,) bool: row i of A (column i of ``at``, (n, m)) has a non-zero entry."""
    return (at != 0).any(dim=0).numpy() if at.shape[0] else np.zeros(at.shape[1], dtype=bool)


def _check_zero_rows(d: np.ndarray, slack: np.ndarray, source: np.ndarray) -> None:
    """Zero rows say ``0 <= d``: fine for d >= 0 (dropped), impossible for d < 0 at an
    input that has this configuration (its slack would be negative)."""
    bad = (d < 0) & (slack > 0)
    if np.any(bad):
        i = int(np.flatnonzero(bad)[0])
        raise RuntimeError(
            f"gate node {source['node'][i]}: a row with zero linear part has offset "
            f"{d[i]:.3e} < 0 but slack {slack[i]:.3e}; the configuration is inconsistent"
        )


class RadiusPair(NamedTuple):
    """Certified radii of a batch: ``l2`` and ``linf``, (B,) each (working dtype)."""

    l2: Tensor
    linf: Tensor


def certified_radius_pair(
    program: Program,
    config: Configuration,
    gates: GateValues,
    tol: Tolerances,
    *,
    chunk: int = 1024,
) -> RadiusPair:
    """Largest L2 and L-inf balls around each input inside its polytope, without A.

    For one input at a time, pushes the identity basis (``chunk`` vectors at once)
    and accumulates each row's ||a||_2^2 and ||a||_1; the radius is
    ``min_i slack_i / ||a_i||_*`` (dual norm: L2 for the L2 ball, L1 for the L-inf
    ball) over rows whose linear part is not zero (a zero row is the same linear function
    on both sides: no facet, as in :func:`build_constraints`). Memory ~ chunk x
    largest activation; A is never stored.

    Returns:
        (l2, linf): (B,) each, 0 where the input lies on a facet, inf where no row
        constrains the input.

    Raises:
        RuntimeError: a NaN or a negative slack in the computation (never skipped).
    """
    n = prod(program.input_shape)
    r2 = torch.full((config.batch_size,), float("inf"), dtype=program.dtype)
    rinf = r2.clone()
    for i in range(config.batch_size):
        if config.n_tight[i] > 0:  # on a facet: the honest radius is 0, no push needed
            r2[i] = rinf[i] = 0.0
            continue
        one = config[i]
        plans = _plan(program, one, gates[i], tol, gate_support(program, one))
        sq = {p.k: torch.zeros_like(p.slack[0]) for p in plans}
        l1 = {p.k: torch.zeros_like(p.slack[0]) for p in plans}

        def accumulate(p, z, y, sq=sq, l1=l1):
            rows = p.rows(z, y)
            sq[p.k] += torch.linalg.vector_norm(rows[0], 2, dim=0).square()
            l1[p.k] += torch.linalg.vector_norm(rows[0], 1, dim=0)

        linear = FixedForward(one, with_bias=False)
        for c0 in range(0, n, chunk):
            _push(program, linear, plans, _basis(program, c0, min(n, c0 + chunk), 1), accumulate)
        for p in plans:
            slack = p.slack[0]
            live = l1[p.k] > 0
            if bool((slack[live] < 0).any()) or bool(slack.isnan().any()):
                raise RuntimeError(
                    f"gate node {p.k}: negative or NaN slack in a radius computation "
                    f"(input {i}); the configuration is inconsistent"
                )
            if not bool(live.any()):
                continue
            a2 = slack[live] / sq[p.k][live].sqrt()
            a1 = slack[live] / l1[p.k][live]
            if bool(a2.isnan().any() or a1.isnan().any()):
                raise RuntimeError(f"gate node {p.k}: NaN in a radius computation (input {i})")
            r2[i] = torch.minimum(r2[i], a2.min())
            rinf[i] = torch.minimum(rinf[i], a1.min())
    return RadiusPair(r2, rinf)


def _oriented_rows(program: Program, config: Configuration, gates: GateValues,
                   tol: Tolerances, derivatives: list[dict[int, Tensor]],
                   near: Tensor | None = None, only: dict[int, Tensor] | None = None):
    """Per gate: (k, slack (B, m_k), [rate (B, m_k) per derivative set], [flat (B, m_k) per
    set]) laid out as :func:`rows_along` says; ``flat`` marks rows whose two sides the
    pass would call equal along that direction (same-function tolerance).

    With ``near`` ((B,) tensor), only the rows of input b with
    ``slack < near[b] * sum_d |rate_d|`` are formed: per gate (k, m_k, index (P,) int64,
    slack (P,), [rate (P,)], [flat (P,)]), ``index`` the rows' flat positions
    ``b * m_k + row`` in the layout above, ascending; each value is the one the dense
    layout holds (the same elementwise arithmetic on the same entries). The test's slack
    and ``sum_d |rate_d|`` are computed for every row, the returned rates and flats only
    for these rows; with ``only`` ({gate k: (c,) int64 ascending}, see
    :class:`PlaneScreen`) only for the rows of those units (ReLU) or windows (a max-pool
    on a grid): the caller vouches that no other row of gate k passes the test."""
    b = config.batch_size
    if near is not None:
        near = near.reshape(b, 1)
    only = only or {}

    for k in program.gates:
        node = program.nodes[k]
        if k not in gates.values:  # formed only where asked for (a plane block)
            if near is None or k not in only:
                raise RuntimeError(f"gate node {k}: its values were formed only at some "
                                   "positions; its rows need near= and only=")
            z = ders = None
        else:
            z = gates.values[k].reshape(b, -1)
            ders = [der[k].reshape(b, -1) for der in derivatives]
        take = lambda idx, k=k: gates.columns(k, idx, derivatives)  # noqa: E731
        if isinstance(node, ReLU):
            if near is None:
                sign = _relu_sign(config, k, z)
                slack = _relu_slack(sign, z, tol)
                yield k, slack, [sign * dz for dz in ders], [~tol.relu_moving(dz) for dz in ders]
                continue
            on = config.on[k].reshape(b, -1)
            m = on.shape[1]
            cols = only.get(k)
            if cols is not None:  # the screened units' columns: the same values
                cols = cols.to(on.device)
                at = cols.expand(b, -1)  # a gather on it: ~3x index_select's speed on the CPU
                on = on.gather(1, at)
                z, ders = take(at)
            # _relu_slack's values, in place: sign z (sign exactly +-1), 0 where tied
            slack = on.to(z.dtype).mul_(2.0).sub_(1.0).mul_(z).masked_fill_(tol.relu_tied(z), 0.0)
            reach = ders[0].abs()  # |rate| = |sign dz| = |dz|
            for dz in ders[1:]:
                reach += dz.abs()
            index = flat_nonzero(slack < reach.mul_(near)).to(on.device)
            if cols is not None:
                c = max(cols.numel(), 1)  # (no column: no index)
                on, slack, ders = on.reshape(-1), slack.reshape(-1), [d.reshape(-1) for d in ders]
                sign = torch.where(on[index], 1.0, -1.0).to(z.dtype)
                dzs = [dz[index] for dz in ders]
                yield (k, m, index // c * m + cols[index % c], slack[index],
                       [sign * dz for dz in dzs], [~tol.relu_moving(dz) for dz in dzs])
                continue
            sign = torch.where(on.reshape(-1)[index], 1.0, -1.0).to(z.dtype)
            slack = slack.reshape(-1)[index]
            dzs = [dz.reshape(-1)[index] for dz in ders]
            yield (k, m, index, slack, [sign * dz for dz in dzs],
                   [~tol.relu_moving(dz) for dz in dzs])
        else:
            sel = config.select[k]
            if near is None:
                zi = node.gather(z)  # (B, n_out, K)
                sel = sel.unsqueeze(2)
                slack = _pool_slack(zi, zi.gather(2, sel), tol).flatten(1)  # padding: +inf
                dis = [node.gather(dz, fill=0.0) for dz in ders]
                djs = [di.gather(2, sel) for di in dis]
                yield k, slack, [(dj - di).flatten(1) for di, dj in zip(dis, djs)], \
                    [(tol.same_slope(di, dj) & tol.same_slope(dj, di)).flatten(1)
                     for di, dj in zip(dis, djs)]
                continue
            grid = pool_grid(node)
            if grid is not None and k in only:  # the screened windows of every input
                index = config.index[k].reshape(b, -1)
                yield (k, *_pool_rows_windows(node, only[k].to(index.device), index, take, b,
                                              tol, near))
                continue
            if grid is not None and z.is_contiguous() and all(d.stride(1) == 1 for d in ders):
                yield (k, *_pool_rows_near(node, grid, config.select[k].reshape(b, -1),
                                           config.index[k].reshape(b, -1), z, ders, tol,
                                           near))
                continue
            # the entries position by position, (B, K, n_out): the windows' selected entry
            # broadcasts along the last, contiguous axis (and gather on an expanded index
            # is ~4x index_select on CPU)
            n_out, kk = node.window.shape
            m = n_out * kk
            order = node.padded_window.t().reshape(1, -1).to(z.device).expand(b, -1)
            padded = bool((node.window < 0).any())
            sel = sel.reshape(b, 1, n_out)

            def entries(v, fill, order=order, padded=padded, kk=kk, n_out=n_out):
                if padded:
                    v = torch.cat([v, v.new_full((b, 1), fill)], dim=1)
                return v.gather(1, order).view(b, kk, n_out)

            zi = entries(z, float("-inf"))
            zj = zi.gather(1, sel)  # (B, 1, n_out)
            dis = [entries(dz, 0.0) for dz in ders]
            djs = [di.gather(1, sel) for di in dis]
            reach = (djs[0] - dis[0]).abs_()
            for di, dj in zip(dis[1:], djs[1:]):
                reach += (dj - di).abs_()
            # _pool_slack's values, in place: z_j - z_i, 0 where tied (padding: +inf)
            slack = (zj - zi).masked_fill_(tol.pool_tied(zi, zj), 0.0)
            at = flat_nonzero(slack < reach.mul_(near.view(b, 1, 1))).to(z.device)
            window = at // m * n_out + at % n_out  # b * n_out + o
            index, order_ = torch.sort(at // m * m + at % n_out * kk + at % m // n_out)
            at, window = at[order_], window[order_]
            dis = [di.reshape(-1)[at] for di in dis]
            djs = [dj.reshape(-1)[window] for dj in djs]
            yield (k, m, index, slack.reshape(-1)[at], [dj - di for di, dj in zip(dis, djs)],
                   [tol.same_slope(di, dj) & tol.same_slope(dj, di) for di, dj in zip(dis, djs)])


NEAR_WINDOW_MARGIN = 1e-9
"""Relative margin of :func:`_pool_rows_near`'s window test over the exact one (its sum of
four absolute rates is grouped otherwise than the exact reach: rounding either way is a
few ulps)."""


def _pool_rows_near(node: MaxPool, grid, sel: Tensor, index: Tensor, z: Tensor,
                    ders: list[Tensor], tol: Tolerances, near: Tensor):
    """:func:`_oriented_rows`' near rows of a max-pool whose windows are a regular grid:
    (m, index (P,), slack (P,), [rate (P,)], [flat (P,)]), the same values, bit for bit.

    A window's rows are formed only if one of its entries i passes a wider test than the
    exact ``slack_i < near * reach_i``: ``slack_i < near * (R_j + R_i) (1 + margin)``,
    R the sum of an entry's absolute rates and j the selected entry (``reach_i <= R_j +
    R_i``), over the entries other than the selected one (whose slack and reach are 0).
    It runs on strided views, one per window position (no gathered copies); on a walk's
    points a few windows in a hundred pass it.

    z (B, n_in) the gate input, ders [(B, n_in)] its derivatives (rows contiguous, a
    row stride of 0 for a shared one), sel (B, n_out) the selected window positions,
    index (B, n_out) the selected entries' flat positions, near (B, 1)."""
    b = z.shape[0]
    base, sizes, strides, offsets = grid
    n_out, kk = node.window.shape
    m = n_out * kk
    grid_shape = (b, *sizes)

    def views(t):
        """(B, *out_shape) strided views of t, one per window position."""
        step = t.stride(0)  # 0: one row shared by the batch
        flat = (t if step else t[:1]).reshape(-1)
        at = flat.storage_offset() + base
        return [flat.as_strided(grid_shape, (step, *strides), at + off) for off in offsets]

    zj = z.gather(1, index)  # (B, n_out)
    djs = [d.expand(b, -1).gather(1, index) for d in ders]
    rj = djs[0].abs()
    for dj in djs[1:]:
        rj += dj.abs()
    zj_g, rj_g, sel_g = zj.view(grid_shape), rj.view(grid_shape), sel.view(grid_shape)
    bound = (near * (1.0 + NEAR_WINDOW_MARGIN)).view(b, *[1] * len(sizes))
    dviews = [views(d) for d in ders]
    cand = torch.zeros(grid_shape, dtype=torch.bool, device=z.device)
    for o, zo in enumerate(views(z)):
        s = (zj_g - zo).masked_fill_(tol.pool_tied(zo, zj_g), 0.0)
        r = dviews[0][o].abs()
        for dv in dviews[1:]:
            r += dv[o].abs()
        cand |= (s < r.add_(rj_g).mul_(bound)) & (sel_g != o)
    return _pool_rows_at(node, flat_nonzero(cand).to(z.device), index, z, ders, tol, near)


def _pool_rows_at(node: MaxPool, win: Tensor, index: Tensor, z: Tensor, ders: list[Tensor],
                  tol: Tolerances, near: Tensor):
    """:func:`_pool_rows_near`'s exact test on the windows ``win`` ((W,) ``b * n_out +
    o``, ascending) only, on their gathered entries: the rows of those windows that pass
    it, as :func:`_oriented_rows` returns them (index (B, n_out) the selected entries)."""
    b = z.shape[0]
    n_out, kk = node.window.shape
    m = n_out * kk
    bi, oi = win // n_out, win % n_out
    rows, cols = bi.unsqueeze(1), node.window.to(z.device)[oi]  # (W, 1), (W, K)
    zi = z[rows, cols]
    at = index.reshape(-1)[win].unsqueeze(1)  # the selected entries' flat positions
    zjw = z[rows, at]
    dis = [d.expand(b, -1)[rows, cols] for d in ders]
    djw = [d.expand(b, -1)[rows, at] for d in ders]
    # the exact test, as the gathered path computes it
    slack, hit = _pool_near_test(zi, zjw, dis, djw, tol, near.reshape(-1)[bi].unsqueeze(1))
    w_at, pos = hit.nonzero(as_tuple=True)  # ascending: b, then o, then the position
    out = bi[w_at] * m + oi[w_at] * kk + pos  # the layout's b * m + o * K + pos
    dis = [di[w_at, pos] for di in dis]
    djs = [dj[w_at, 0] for dj in djw]
    return (m, out, slack[w_at, pos], [dj - di for di, dj in zip(dis, djs)],
            [tol.same_slope(di, dj) & tol.same_slope(dj, di) for di, dj in zip(dis, djs)])


def _pool_near_test(zi: Tensor, zj: Tensor, dis: list[Tensor], djs: list[Tensor],
                    tol: Tolerances, near: Tensor) -> tuple[Tensor, Tensor]:
    """The exact near test of max-pool rows "entry i <= selected entry j" on gathered
    entries (any broadcastable shapes): (slack ``z_j - z_i``, 0 where tied; the rows with
    ``slack < near * sum_d |dj_d - di_d|``)."""
    reach = (djs[0] - dis[0]).abs_()
    for di, dj in zip(dis[1:], djs[1:]):
        reach += (dj - di).abs_()
    slack = (zj - zi).masked_fill_(tol.pool_tied(zi, zj), 0.0)
    return slack, slack < reach.mul_(near)


def _pool_rows_windows(node: MaxPool, c: Tensor, index: Tensor, take, b: int,
                       tol: Tolerances, near: Tensor):
    """:func:`_pool_rows_at` on the windows c ((C,) ascending) of every input: the same
    rows, bit for bit (the same elementwise expressions), gathered by column: ``take(idx)``
    gives (z (B, c), [dz (B, c)]) at the gate-input positions idx (B or 1, c)
    (:meth:`~openbox.configuration.GateValues.columns`)."""
    n_out, kk = node.window.shape
    m, n_c = n_out * kk, c.numel()
    cols = node.window.to(c.device)[c].reshape(1, -1)  # (1, C K)
    at = index.gather(1, c.expand(b, -1))  # (B, C) the selected entries' flat positions
    zi, dis = take(cols)
    zj, djs = take(at)
    zi, zj = zi.view(b, n_c, kk), zj.unsqueeze(2)  # (B, C, K), (B, C, 1)
    dis = [d.view(b, n_c, kk) for d in dis]
    djs = [d.unsqueeze(2) for d in djs]
    slack, hit = _pool_near_test(zi, zj, dis, djs, tol, near.view(b, 1, 1))
    hit = flat_nonzero(hit).to(c.device)
    width = max(n_c * kk, 1)  # (no window: no hit)
    bi, rest = hit // width, hit % width  # ascending: b, then window, then position
    ci, pos = rest // kk, rest % kk
    out = bi * m + c[ci] * kk + pos  # the layout's b * m + o * K + pos
    dis = [di.reshape(-1)[hit] for di in dis]
    djs = [dj.reshape(-1)[bi * n_c + ci] for dj in djs]
    return (m, out, slack.reshape(-1)[hit], [dj - di for di, dj in zip(dis, djs)],
            [tol.same_slope(di, dj) & tol.same_slope(dj, di) for di, dj in zip(dis, djs)])


def rows_along(
    program: Program, config: Configuration, gates: GateValues, tol: Tolerances
) -> list[tuple[int, Tensor, Tensor]]:
    """Every gate row of each input's region restricted to the line ``x + t u``.

    ``u`` is the direction ``gates`` was computed along (the pass's first direction), so
    inside the region each row's slack is affine in t: ``slack + t * rate``. Rows are
    oriented as in :func:`build_constraints` (slack >= 0 inside). Laid out by window:
    a max-pool gate gives (B, n_out * K) rows, one per window position, the selected
    position itself and padding included (slack 0 and rate 0 there; padding +inf), so no
    row index is built; a ReLU gate one row per unit.

    A tied row (slack 0) whose two sides the configuration pass found equal along u (a
    constant ReLU input, or max-pool entries with the same derivative, to the
    ``same_function`` tolerance) stays tied along the whole line: its rate is set to
    exactly 0, so rounding in the derivatives cannot make it look like it falls.

    Returns:
        [(gate node k, slack (B, m_k), rate (B, m_k))] in gate order.
    """
    out = []
    for k, slack, (rate,), (flat,) in _oriented_rows(program, config, gates, tol,
                                                     [gates.derivatives]):
        out.append((k, slack, torch.where((slack == 0) & flat, torch.zeros_like(rate), rate)))
    return out


def rows_in_plane(
    program: Program, config: Configuration, gates: GateValues, tol: Tolerances,
    *, near: Tensor | None = None, only: dict[int, Tensor] | None = None,
) -> list[tuple]:
    """Every gate row of each input's region restricted to the plane ``x + s d1 + t d2``,
    d1 and d2 the first two directions of the pass that made ``gates`` (it must have been
    run with D >= 2): inside the region, ``slack + s * rate1 + t * rate2 >= 0``. Layout
    and orientation as :func:`rows_along`; a tied row flat along both directions (a tie
    that persists over the whole plane) gets both rates exactly 0.

    With ``near`` ((B,) tensor): only the rows of input b whose line
    ``slack + s rate1 + t rate2 = 0`` passes within L-infinity distance near[b] of
    (s, t) = (0, 0), ``slack < near[b] (|rate1| + |rate2|)``, are returned (a row with
    both rates 0 is constant over the plane: it has no line and is never returned), in a
    flat form; the full (B, m_k) rows are never formed. ``only`` (with ``near``):
    :meth:`PlaneScreen.only`, the units and windows of the first gates that can have
    such rows (the others are not formed at all; the result is the same).

    Returns:
        [(gate node k, slack (B, m_k), rate1 (B, m_k), rate2 (B, m_k))] in gate order;
        with ``near``, [(k, m_k, index (P,) int64, slack (P,), rate1 (P,), rate2 (P,))],
        ``index`` the returned rows' flat positions ``b * m_k + row`` in that layout,
        ascending.
    """
    if gates.derivatives2 is None:
        raise ValueError("rows_in_plane needs gate values of a pass with two directions")
    out = []
    dirs = [gates.derivatives, gates.derivatives2]
    if near is None:
        for k, slack, (r1, r2), (f1, f2) in _oriented_rows(program, config, gates, tol, dirs):
            both = (slack == 0) & f1 & f2
            zero = torch.zeros_like(r1)
            out.append((k, slack, torch.where(both, zero, r1), torch.where(both, zero, r2)))
        return out
    for k, m, index, slack, (r1, r2), (f1, f2) in _oriented_rows(program, config, gates, tol,
                                                                dirs, near, only):
        # the tied rows flat along both directions have rates 0 here: no line
        live = ((r1 != 0) | (r2 != 0)) & ~((slack == 0) & f1 & f2)
        out.append((k, m, index[live], slack[live], r1[live], r2[live]))
    return out


PLANE_SCREEN_MARGIN = 1e-9
""":class:`PlaneScreen`'s relative margin over the rounding of the pass's gate values: an
error bound of ``margin * S`` on a value whose terms have absolute sum S (one float64
pass rounds to ~1e-16 S per operation, a few hundred operations deep at most), and a
factor ``1 + margin`` on every product the near test rounds."""


SQRT2 = math.sqrt(2.0) * (1.0 + 1e-15)  # rounded up


class PlaneScreen:
    """Which rows of a program's first gates can come near the points of a plane box:
    the rows :func:`rows_in_plane` (``near=``) can return there, for ``only=``.

    On the plane ``{x0 + a u + b v : (a, b) in box}`` a gate input that only Affine and
    Add nodes compute from the network's input is the same affine function in every
    region, ``z = z0 + a zu + b zv``; so is each ReLU row of such an input, and the
    max-pool rows of a pool that reads such a value or the output of such a ReLU (its
    entries ``s z``, s 1 or the slope: constant over the box wherever the unit's sign
    is). A unit whose |z| stays above ``q (|dz_n| + |dz_e|)`` over the whole box, and a
    window whose every pair of entries stays apart by more than ``q`` times their
    relative rates and by more than the tie tolerance, has no row passing the near test
    of any point of the box at a distance ``near <= q``: :meth:`only` leaves it out.
    Everything else (other gates, windows with padding, units whose sign can change,
    windows holding one) is a candidate, and rows_in_plane tests those as it would
    have (the same rows, bit for bit; a test holds it to that).

    (n, e) are orthonormal in (a, b), so a row's two rates have ``r_n^2 + r_e^2 =
    |grad|^2`` and ``|r_n| + |r_e| <= sqrt(2) |grad|``: the test ``slack < near (|r_n| +
    |r_e|)`` fails wherever ``slack >= sqrt(2) near |grad|``.

    The bounds take the pass's rounding into account: the gate values computed at a
    point of the box differ from the exact ``z0 + a zu + b zv`` by at most
    ``PLANE_SCREEN_MARGIN`` times the absolute sum of their terms (the same prefix on
    |x0|, |u|, |v| with |weights| and |biases|), far above float64 rounding; (n, e) are
    unit vectors in (a, b), so ``|dz_n|, |dz_e| <= hypot(zu, zv)`` up to the same.

    Args:
        program: the OpenBox's program; tol its tolerances.
        x0 (1 or none, *input_shape), u, v (*input_shape): the plane.
        lo, hi: (2,) the box of (a, b) the points lie in.
    """

    def __init__(self, program: Program, tol: Tolerances, x0: Tensor, u: Tensor, v: Tensor,
                 lo, hi):
        m = PLANE_SCREEN_MARGIN
        if program.dtype != torch.float64:
            raise ValueError(f"PlaneScreen bounds the rounding of a float64 pass; the program "
                             f"works in {program.dtype}")
        (a0, b0), (a1, b1) = (float(t) for t in lo), (float(t) for t in hi)
        if not (a0 <= a1 and b0 <= b1):
            raise ValueError(f"PlaneScreen: the box must have lo <= hi, got {lo}, {hi}")
        self.lo, self.hi = np.array([a0, b0]), np.array([a1, b1])
        big_a, big_b = max(abs(a0), abs(a1)), max(abs(b0), abs(b1))
        # the affine prefix on rows [x0 (biases on), u, v] and its magnitudes [|x0|, |u|,
        # |v|] (|ops|, |biases| on the first)
        rows = torch.stack([x0.reshape(program.input_shape), u, v]).to(program.dtype)
        values = affine_prefix(program, rows, rows.abs())
        self.q: dict[int, Tensor] = {}
        self.pools: set[int] = set()
        lines = {}  # ReLU node -> (its units' constant scale s (n,), nan where it can change)
        for k in program.gates:
            node = program.nodes[k]
            if isinstance(node, ReLU) and node.inputs[0] in values:
                f = _PlaneAffine(*values[node.inputs[0]], a0, a1, b0, b1, big_a, big_b)
                on, off = f.lo > tol.tie, f.hi < -tol.tie
                slack = torch.where(on, f.lo, -f.hi)
                q = slack / (SQRT2 * f.g * (1.0 + m))  # g = 0: no line (inf)
                self.q[k] = torch.where(on | off, q, -torch.inf)
                scale = torch.full_like(f.lo, torch.nan)
                scale[on], scale[off] = 1.0, float(node.negative_slope)
                lines[k + 1] = (f, scale)
            elif isinstance(node, MaxPool):
                if node.inputs[0] in values:
                    f = _PlaneAffine(*values[node.inputs[0]], a0, a1, b0, b1, big_a, big_b)
                    scale = torch.ones_like(f.lo)
                elif node.inputs[0] in lines:
                    f, scale = lines[node.inputs[0]]
                else:
                    continue
                self.q[k] = _window_screen(node, f, scale, tol, m)
                self.pools.add(k)
        for k, q in self.q.items():
            if bool(q.isnan().any()):
                raise RuntimeError(f"PlaneScreen: NaN in the bounds of gate node {k} (a "
                                   "non-finite weight or input?)")

    def varying(self, pts: np.ndarray) -> dict[int, Tensor]:
        """{max-pool node k: (C,) int64 ascending}: the windows whose choice may differ
        between points of the box (for :func:`~openbox.configuration.configure`'s
        ``varying``); every other window keeps its order over the box (each pair of
        entries apart by more than the tie tolerance, or both flat: no term of u or v
        reaches them, or dead ReLUs), so the rule decides it alike at every point. {} if a
        point lies outside the box."""
        if not (np.all(pts >= self.lo) and np.all(pts <= self.hi)):
            return {}
        return {k: flat_nonzero(q == -torch.inf) for k, q in self.q.items()
                if k in self.pools}

    def only(self, near_max: float, pts: np.ndarray) -> dict[int, Tensor]:
        """{gate node k: (c,) int64 ascending}: the units (ReLU) or windows (max-pool)
        whose rows may pass the near test of the points pts (N, 2) at ``near <=
        near_max``; {} (nothing screened) if a point lies outside the box."""
        if not (np.all(pts >= self.lo) and np.all(pts <= self.hi)):
            return {}
        return {k: flat_nonzero(q <= near_max) for k, q in self.q.items()}


class _PlaneAffine:
    """A value affine on the plane box, elementwise: its range [lo, hi] over the box
    widened by its rounding bound, and g >= |rate| along any unit (a, b) direction."""

    def __init__(self, y: Tensor, s: Tensor, a0, a1, b0, b1, big_a, big_b):
        m = PLANE_SCREEN_MARGIN
        z0, zu, zv = (t.reshape(-1) for t in y)
        s0, su, sv = (t.reshape(-1) for t in s)
        self.z0, self.zu, self.zv, self.su, self.sv = z0, zu, zv, su, sv
        self.err = m * (s0 + big_a * su + big_b * sv)
        self.lo = z0 + torch.minimum(a0 * zu, a1 * zu) + torch.minimum(b0 * zv, b1 * zv) \
            - self.err
        self.hi = z0 + torch.maximum(a0 * zu, a1 * zu) + torch.maximum(b0 * zv, b1 * zv) \
            + self.err
        self.g = torch.hypot(zu, zv) + m * (su + sv)
        self.a = (a0, a1, b0, b1)


def _window_screen(node: MaxPool, f: _PlaneAffine, scale: Tensor, tol: Tolerances,
                   m: float) -> Tensor:
    """(n_out,) per window of a max-pool whose entries are ``scale * f`` (scale nan where
    an entry's sign can change): the largest near at which no row of the window can
    pass the near test anywhere on the box (-inf: a candidate at any distance)."""
    a0, a1, b0, b1 = f.a
    w = node.window.to(f.lo.device)
    n_out, kk = w.shape
    q = torch.full((n_out,), torch.inf, dtype=f.lo.dtype, device=f.lo.device)
    pad = (w < 0).any(dim=1)
    wi = w.clamp_min(0)
    s = scale[wi]  # (n_out, K)
    q[pad | s.isnan().any(dim=1)] = -torch.inf
    sa = s.abs()
    z0, zu, zv = (t[wi] * s for t in (f.z0, f.zu, f.zv))
    err = f.err[wi] * sa
    rate_err = m * (f.su[wi] + f.sv[wi]) * sa
    top = torch.maximum(f.lo[wi].abs(), f.hi[wi].abs()) * sa  # >= |entry| on the box
    flat = (sa == 0) | ((f.su[wi] == 0) & (f.sv[wi] == 0))
    for i in range(kk):
        for j in range(i + 1, kk):
            d0, du, dv = z0[:, j] - z0[:, i], zu[:, j] - zu[:, i], zv[:, j] - zv[:, i]
            e = err[:, i] + err[:, j] + m * (d0.abs() + max(abs(a0), abs(a1)) * du.abs()
                                             + max(abs(b0), abs(b1)) * dv.abs())
            lo = d0 + torch.minimum(a0 * du, a1 * du) + torch.minimum(b0 * dv, b1 * dv) - e
            hi = d0 + torch.maximum(a0 * du, a1 * du) + torch.maximum(b0 * dv, b1 * dv) + e
            apart = torch.maximum(lo, -hi)  # > 0: the pair keeps its order over the box
            g = torch.hypot(du, dv) + rate_err[:, i] + rate_err[:, j]
            # two entries that do not move on the plane (dead ReLUs, or no term of u or v
            # reaches them: their rates are exactly 0 at every point) have reach 0: no row
            both_flat = flat[:, i] & flat[:, j]
            tie = tol.tie * (1.0 + torch.maximum(top[:, i], top[:, j])) * (1.0 + m)
            pq = torch.where(apart > tie, apart / (SQRT2 * g * (1.0 + m)), -torch.inf)
            q = torch.minimum(q, torch.where(both_flat, torch.inf, pq))
    return q


def step_along(
    program: Program, config: Configuration, gates: GateValues, tol: Tolerances
) -> Tensor:
    """(B,) float64: the largest dt >= 0 with every row of each input's region still
    satisfied at ``x + dt u`` (``inf`` if no row falls). Only rows with ``rate < 0``
    can run out; the tie-break along u gives tied rows ``rate >= 0``.

    The rows are those of :func:`rows_along`; the same-function test that zeroes the rate
    of a tied flat row is evaluated only where it can matter (a tied row that falls)."""
    b = config.batch_size
    best = torch.full((b,), float("inf"), dtype=torch.float64)
    for k in program.gates:
        node = program.nodes[k]
        z = gates.values[k].reshape(b, -1)
        dz = gates.derivatives[k].reshape(b, -1)
        if isinstance(node, ReLU):
            sign = _relu_sign(config, k, z)
            slack = _relu_slack(sign, z, tol)
            rate = sign * dz
            falling = rate < 0
            if not bool(falling.any()):
                continue
            tied = falling & (slack == 0)
            if bool(tied.any()):
                falling = falling & ~(tied & ~tol.relu_moving(dz))
        else:
            zi = node.gather(z)  # (B, n_out, K)
            sel = config.select[k].unsqueeze(2)
            slack = _pool_slack(zi, zi.gather(2, sel), tol).flatten(1)  # padding: +inf
            di = node.gather(dz, fill=0.0)
            dj = di.gather(2, sel)
            rate = (dj - di).flatten(1)
            falling = rate < 0
            if not bool(falling.any()):
                continue
            tied = falling & (slack == 0)
            if bool(tied.any()):
                flat = (tol.same_slope(di, dj) & tol.same_slope(dj, di)).flatten(1)
                falling = falling & ~(tied & flat)
        if not bool(falling.any()):
            continue
        t = (slack.clamp_min(0) / -rate).masked_fill_(~falling, torch.inf)
        if bool(t.isnan().any()):
            raise RuntimeError(f"NaN in the step along a line (gate node {k})")
        best = torch.minimum(best, t.amin(dim=1).double().cpu())
    return best


GUARD_TIES = 2.0
""":func:`relu_line_exit` / :func:`pool_line_exit` guard: the line points where a falling
row comes within this many tie tolerances of zero (its own tie band, doubled)."""


def relu_line_exit(a: Tensor, d: Tensor, on: Tensor, tied: Tensor | None,
                   tol: Tolerances, guard: bool = False):
    """(B,) the t at which the first ReLU row of each region, restricted to the line
    ``x0 + t d``, reaches the kink (+inf if no row falls); with ``guard`` also (B,) the
    first t at which a falling row comes within :data:`GUARD_TIES` tie tolerances of it
    (before that t, every row's side is decided by its value, not by a tie-break).

    A region's ReLU input is ``a + t d`` along the line (``a`` its intercept at t = 0
    under the region's upstream gates, ``d`` its rate, both (B or 1, *shape)); the row
    of an on unit is ``a + t d >= 0``, of an off unit ``<= 0``. It falls when its slack
    shrinks (on and d < 0, off and d > 0) and reaches zero at ``t = -a / d``: a function
    of the region alone, not of the point the pass was at. A tied input (``tied``, the
    pass's mask of inputs at the kink) that does not move along d is constant over the
    line and never a facet; a tied input that moves was oriented by the tie-break so that
    it rises. ``on`` (B, *shape) is the pass's choice.
    """
    falling = (on & (d < 0)) | (~on & (d > 0))  # bool algebra: a where is ~10x slower
    if tied is not None:
        falling &= ~(tied & ~tol.relu_moving(d))
    cross = -a / d
    t = torch.where(falling, cross, torch.inf)
    out = t.reshape(t.shape[0], -1).amin(dim=1)
    if not guard:
        return out
    near = torch.where(falling, cross - (GUARD_TIES * tol.tie) / d.abs(), torch.inf)
    return out, near.reshape(t.shape[0], -1).amin(dim=1)


def pool_guard_band(a_s: Tensor, d_s: Tensor, tol: Tolerances) -> Tensor:
    """The tie band :func:`pool_line_exit`'s guard keeps from a selected entry
    ``a_s + t d_s``, at its widest over t in [0, 1]: ``GUARD_TIES tie (1 + |a_s| +
    |d_s|)`` (the same for every position of a window: computed once per window)."""
    return (GUARD_TIES * tol.tie) * (1 + a_s.abs() + d_s.abs())


def pool_line_exit(a_e: Tensor, d_e: Tensor, a_s: Tensor, d_s: Tensor, tied: Tensor,
                   tol: Tolerances, guard: bool = False, band: Tensor | None = None):
    """(B,) the t at which window entry e of each max-pool window first reaches the
    selected entry s along the line ``x0 + t d``, the first over all windows (+inf if
    none rises to it); with ``guard`` also the first t at which such an entry comes within
    :data:`GUARD_TIES` tie bands of s (the band taken at its widest over t in [0, 1]).

    The row "entry e <= selected entry s" is ``(a_s - a_e) + t (d_s - d_e) >= 0`` (a, d:
    intercepts and rates as in :func:`relu_line_exit`; a_e, d_e (B or 1, *out_shape) the
    entry at one window position, a_s, d_s (B, *out_shape) the selected ones, padding
    -inf). It falls when e rises faster than s and reaches zero at ``(a_s - a_e) / (d_e -
    d_s)``. An entry tied with the maximum (``tied``) that is the same function along d
    (the same-function tolerance both ways) stays tied over the line: never a facet.
    ``band``: :func:`pool_guard_band` of (a_s, d_s), if already computed.
    """
    gap = d_e - d_s
    falling = gap > 0
    both = falling & tied
    if any_true(both):  # rare: the tie-break made tied entries rise no faster than s
        # same function both ways; given gap > 0, tol.same_slope(d_e, d_s) holds already
        falling = falling & ~(both & tol.same_slope(d_s, d_e))
    cross = (a_s - a_e).div_(gap)
    t = torch.where(falling, cross, torch.inf)
    out = t.reshape(t.shape[0], -1).amin(dim=1)
    if not guard:
        return out
    if band is None:
        band = pool_guard_band(a_s, d_s, tol)
    near = torch.where(falling, cross - band / gap, torch.inf)
    return out, near.reshape(t.shape[0], -1).amin(dim=1)
