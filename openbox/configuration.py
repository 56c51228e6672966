"""Configurations: which linear piece of the network an input is on.

The configuration of an input x is the state of every gate: the sign pattern of
each ReLU / LeakyReLU input and the selected entry of each max-pool window. With
the configuration fixed the network is one affine map, ``W_x x + b_x``, valid on
the polytope of inputs that have that configuration.

Ties and the tie-break
----------------------
Real inputs often sit *on* facets: a gate input exactly 0, or two max-pool
entries that are different linear functions with exactly equal values (on
Fashion-MNIST, active units over the all-zero background output the same
constant). There x belongs to several regions and the configuration is a choice.

The documented rule: **the configuration at x is the one at x + t u for all small
enough t > 0**, where u is a fixed direction (:func:`tie_break_direction`: a seeded
standard-normal vector scaled to unit L2 norm). Inside the region entered along u
every gate input is ``z(x + t u) = z(x) + t dz``, with ``dz`` the directional
derivative computed with that region's own gates, so the rule is a
lexicographic comparison of ``(z, dz)`` evaluated layer by layer:

* ReLU: tied input (``|z| <= tie``) is on iff ``dz > 0``.
* MaxPool: among entries whose value ties the maximum, the largest ``dz`` wins.
* Entries whose values *and* derivatives tie are the same linear function inside
  the region (e.g. several ReLUs that are all off, identically 0): that is not a
  facet; the lowest window position wins, so the choice is canonical. A tied ReLU
  input with zero derivative is constant 0 and counts as off.

For a direction u in general position this region is full-dimensional and its
closure contains x; since the network is continuous, its linear classifier is
exact at x. Ties between *different* linear functions are counted per input
(``n_tight``): they are the facets x lies on.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from math import prod
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from linearize import Add, Affine, Interpreter, MaxPool, Program, ReLU
from openbox.tolerances import Tolerances

TIE_BREAK_SEED = 20180819
"""Seed of the default tie-break direction u (a fixed standard-normal draw)."""


def tie_break_direction(
    input_shape: tuple[int, ...], dtype: torch.dtype = torch.float64, device=None
) -> Tensor:
    """The default tie-break direction u: (*input_shape), unit L2 norm, seeded.

    Drawn in float64 on the CPU from ``torch.Generator().manual_seed(TIE_BREAK_SEED)``
    so it is the same on every machine, then cast.
    """
    g = torch.Generator().manual_seed(TIE_BREAK_SEED)
    u = torch.randn(input_shape, generator=g, dtype=torch.float64)
    return (u / u.norm()).to(dtype=dtype, device=device)


KEY_FORMAT_VERSION = 1
"""Version of the packed region-key layout (bumped whenever the packing changes)."""


def key_context(program: Program, dtype: torch.dtype, direction: Tensor) -> bytes:
    """16-byte BLAKE2b digest of what a region key means: the key format version, the
    program (every node's kind, shapes and tensors), the working dtype and the tie-break
    direction. Keys made under different contexts compare unequal."""
    h = hashlib.blake2b(digest_size=16)
    h.update(f"openbox-region-key/{KEY_FORMAT_VERSION}/{dtype}/".encode())
    h.update(repr(tuple(program.input_shape)).encode())
    for node in program.nodes:
        h.update(f"{type(node).__name__}{node.inputs}{node.in_shape}{node.out_shape}".encode())
        for name, t in sorted(node.tensors().items()):
            h.update(name.encode())
            h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    h.update(direction.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.digest()


class RegionKey:
    """Hashable, canonical encoding of one input's configuration.

    Equal keys <=> equal configurations *of the same program, dtype and tie-break
    direction*: the key holds the packed configuration itself (ReLU signs as bits,
    max-pool selections as window positions, in a width fixed by each window's size, so
    a key never depends on the batch it was computed in), not a digest, together with
    the 16-byte :func:`key_context`. Keys of different contexts are never equal.
    ``str(key)`` shows a short digest for display; :attr:`digest16` is the fixed-size
    digest a census stores instead of the key.
    """

    __slots__ = ("_bytes", "_context", "_hash")

    def __init__(self, packed: bytes, context: bytes = b""):
        self._bytes = packed
        self._context = context
        self._hash = hash((context, packed))

    def __eq__(self, other) -> bool:
        return (
            isinstance(other, RegionKey)
            and self._bytes == other._bytes
            and self._context == other._context
        )

    def __hash__(self) -> int:
        return self._hash

    def __bytes__(self) -> bytes:
        return self._bytes

    @property
    def context(self) -> bytes:
        """The :func:`key_context` the key was made under (b"" if none was given)."""
        return self._context

    @property
    def digest16(self) -> bytes:
        """16-byte BLAKE2b digest of (context, packed configuration). Two different
        configurations share it with probability ~2^-128 per pair (birthday bound: below
        1e-20 for 10^9 keys)."""
        return hashlib.blake2b(self._context + self._bytes, digest_size=16).digest()

    @property
    def digest(self) -> str:
        """16 hex characters of a BLAKE2b digest: for display, not for equality."""
        return hashlib.blake2b(self._context + self._bytes, digest_size=8).hexdigest()

    def __repr__(self) -> str:
        return f"RegionKey({self.digest})"

    __str__ = digest.fget  # type: ignore[assignment]


def selection_dtype(positions: int) -> np.dtype:
    """Unsigned integer wide enough for a window of ``positions`` entries (fixed per node,
    never taken from the data, so that keys do not depend on the batch)."""
    if positions <= 1 << 8:
        return np.dtype(np.uint8)
    if positions <= 1 << 16:
        return np.dtype("<u2")
    return np.dtype("<u4")


@dataclass(frozen=True, eq=False)
class Configuration:
    """Gate states of a batch of B inputs, on one program.

    Attributes:
        on: node index -> bool tensor (B, *shape): ReLU input takes the identity
            branch (True) or the ``negative_slope`` branch (False).
        select: node index -> int64 tensor (B, prod(out_shape)): chosen window
            position (column of the node's window table) of each max-pool output.
        index: node index -> int64 tensor (B, prod(out_shape)): the flat input index
            that position reads, ``window[o, select[b, o]]``.
        n_tight_relu: (B,) int64, ReLU inputs tied at 0 that are not constant.
        n_tight_pool: (B,) int64, max-pool entries tied with the selected one that
            are a different linear function.
        window_sizes: max-pool node index -> positions per window (fixes the key width).
        context: the :func:`key_context` stamped on region keys.
    """

    on: dict[int, Tensor]
    select: dict[int, Tensor]
    index: dict[int, Tensor]
    n_tight_relu: Tensor
    n_tight_pool: Tensor
    window_sizes: dict[int, int]
    context: bytes = b""

    @property
    def batch_size(self) -> int:
        return int(self.n_tight_relu.shape[0])

    @property
    def n_tight(self) -> Tensor:
        """(B,) int64: facets x lies on (tied gate inputs between different functions)."""
        return self.n_tight_relu + self.n_tight_pool

    def __getitem__(self, index) -> Configuration:
        """Sub-batch: ``config[i:j]``, ``config[[i, k]]``, ``config[mask]`` (keeps the
        batch dimension); an int i gives a batch of one and raises IndexError when out of
        range."""
        index = batch_index(index, self.batch_size)
        return Configuration(
            {k: v[index] for k, v in self.on.items()},
            {k: v[index] for k, v in self.select.items()},
            {k: v[index] for k, v in self.index.items()},
            self.n_tight_relu[index],
            self.n_tight_pool[index],
            self.window_sizes,
            self.context,
        )

    def region_keys(self) -> tuple[RegionKey, ...]:
        """One canonical key per input (independent of the batch it is computed in)."""
        return keys_of(self.packed(), self.context)

    def packed(self) -> np.ndarray:
        """(B, n_bytes) uint8: the packed configuration behind :meth:`region_keys`, node
        by node in index order (ReLU signs as bits, max-pool selections in a width fixed
        per node), so the packing of a prefix of the nodes is a prefix of the row."""
        parts = []
        for k in sorted(set(self.on) | set(self.select)):
            if k in self.on:
                bits = self.on[k].reshape(self.batch_size, -1).cpu().numpy()
                parts.append(np.packbits(bits, axis=1))
            else:
                sel = self.select[k].cpu().numpy()
                dt = selection_dtype(self.window_sizes[k])
                parts.append(sel.astype(dt).view(np.uint8).reshape(self.batch_size, -1))
        return (
            np.concatenate(parts, axis=1) if parts
            else np.zeros((self.batch_size, 0), dtype=np.uint8)
        )

    def packed_width(self, before: int) -> int:
        """Bytes of a :meth:`packed` row that hold the gates of nodes before ``before``."""
        n = 0
        for k in sorted(set(self.on) | set(self.select)):
            if k >= before:
                break
            if k in self.on:
                n += (self.on[k][0].numel() + 7) // 8
            else:
                n += self.select[k].shape[1] * selection_dtype(self.window_sizes[k]).itemsize
        return n

    @staticmethod
    def concat(configs: list[Configuration]) -> Configuration:
        """Join configurations of consecutive sub-batches."""
        first = configs[0]
        return Configuration(
            {k: torch.cat([c.on[k] for c in configs]) for k in first.on},
            {k: torch.cat([c.select[k] for c in configs]) for k in first.select},
            {k: torch.cat([c.index[k] for c in configs]) for k in first.index},
            torch.cat([c.n_tight_relu for c in configs]),
            torch.cat([c.n_tight_pool for c in configs]),
            first.window_sizes,
            first.context,
        )


def keys_of(packed: np.ndarray, context: bytes) -> tuple[RegionKey, ...]:
    """Region keys of packed configurations (B, n_bytes) (:meth:`Configuration.packed`)."""
    return tuple(RegionKey(row.tobytes(), context) for row in packed)


SPARSE_TIES = 64
"""The ReLU tie-break runs on the tied inputs alone (gathered) when at most 1 in this
many inputs ties (at a walk's points, a few dozen of 800,000): on the reference CNN's
first ReLU at 64 points it took ~4 ms over every input."""


POOL_TABLE = True
"""Whether the first max-pool after a ReLU fed by shared direction rows may decide by
table (:class:`_PoolTable`); False: always by the rule on every window (tests compare)."""

POOL_TABLE_ENTRIES = 4
"""Largest window (entries) a :class:`_PoolTable` covers: 2^(2 K) cases per window."""

POOL_TABLE_BYTES = 1 << 24
"""Largest :class:`_PoolTable` (one byte per window and case): 16 MB, 65,536 windows of 4
entries (the demo CNN's first pool has 1,568); larger pools decide by the rule."""


def any_true(mask: Tensor) -> bool:
    """``bool(mask.any())`` for a bool tensor, as a max over its bytes: on the CPU a bool
    ``any`` scans 20-30x slower (0.09-0.14 ms against 0.004 ms on 200k entries)."""
    return mask.numel() > 0 and bool(mask.view(torch.uint8).max())


def flat_nonzero(mask: Tensor) -> Tensor:
    """(m,) int64 flat indices of the True entries of a bool tensor, in order; on the CPU
    through numpy (7x faster than torch's nonzero on 800,000 entries)."""
    if mask.device.type == "cpu" and mask.is_contiguous():
        return torch.from_numpy(np.flatnonzero(mask.numpy()))
    return mask.reshape(-1).nonzero().squeeze(1)


def any_rows(mask: Tensor) -> Tensor:
    """(B,) bool: ``mask.reshape(B, -1).any(dim=1)``, as a max over bytes (see
    :func:`any_true`)."""
    b = mask.shape[0]
    if mask.numel() == 0:
        return torch.zeros(b, dtype=torch.bool, device=mask.device)
    return mask.reshape(b, -1).view(torch.uint8).amax(dim=1).bool()


def batch_index(index, batch_size: int):
    """Normalise a batch index: an int becomes a slice of one (IndexError when out of
    range), a bool mask must have length B, anything else goes to torch as it is."""
    if isinstance(index, (int, np.integer)) and not isinstance(index, bool):
        i = int(index)
        if not -batch_size <= i < batch_size:
            raise IndexError(f"index {i} is out of range for a batch of {batch_size}")
        i %= batch_size
        return slice(i, i + 1)
    if isinstance(index, slice):
        return index
    t = torch.as_tensor(index)
    if t.dtype == torch.bool:
        if t.shape != (batch_size,):
            raise IndexError(
                f"a boolean index must have shape ({batch_size},), got {tuple(t.shape)}"
            )
        return t.nonzero().flatten()
    t = t.reshape(-1).to(torch.int64)
    if t.numel() and not bool(((t >= -batch_size) & (t < batch_size)).all()):
        raise IndexError(f"indices {t.tolist()[:10]} are out of range for a batch of {batch_size}")
    return t % max(batch_size, 1)


@dataclass(frozen=True, eq=False)
class GateValues:
    """Every gate input's value and directional derivative (along the tie-break
    direction, with the chosen gates) at a batch of B inputs.

    Attributes:
        values: gate node index -> (B, *in_shape) the gate input z at x.
        derivatives: gate node index -> (B, *in_shape) dz along the (first) direction.
        batch_size: B.
        derivatives2: the same along the second direction of a lexicographic pass, else
            None.
    """

    values: dict[int, Tensor]
    derivatives: dict[int, Tensor]
    batch_size: int
    derivatives2: dict[int, Tensor] | None = None
    lazy: object | None = None

    def __getitem__(self, index) -> GateValues:
        """Sub-batch, as :meth:`Configuration.__getitem__`."""
        index = batch_index(index, self.batch_size)
        n = len(range(self.batch_size)[index]) if isinstance(index, slice) else len(index)
        pick = lambda d: None if d is None else {k: v[index] for k, v in d.items()}  # noqa: E731
        return GateValues(pick(self.values), pick(self.derivatives), n, pick(self.derivatives2),
                          None if self.lazy is None else self.lazy[index])

    def columns(self, k: int, idx: Tensor, derivatives: list[dict[int, Tensor]]):
        """(z (B, c), [dz (B, c) per dict of ``derivatives``, this object's derivatives or
        derivatives2]) of gate k's input at the flat positions idx (B or 1, c). A gate
        a :class:`PlaneBlock` decided has its values formed here, at these positions only
        (``lazy``); the others are gathered."""
        b = self.batch_size
        if k not in self.values and self.lazy is not None:
            streams = [0 if d is self.derivatives else 1 if d is self.derivatives2 else -1
                       for d in derivatives]
            if -1 in streams:
                raise ValueError("columns: derivatives must be this object's own dicts")
            return self.lazy.take(k, idx, streams)
        at = idx.expand(b, -1)
        return (self.values[k].reshape(b, -1).gather(1, at),
                [d[k].reshape(b, -1).expand(b, -1).gather(1, at) for d in derivatives])


class PassResult(NamedTuple):
    """What one configuration pass returns: logits (B, C), the configuration, the gate
    values when asked for (else None), and ``rates`` (B, C): the logits' derivative along
    the first direction inside the configured region (``f(x + t d) = logits + t rates``
    there)."""

    logits: Tensor
    configuration: Configuration
    gate_values: GateValues | None
    rates: Tensor


def configure(
    program: Program,
    x: Tensor,
    direction: Tensor,
    tol: Tolerances,
    *,
    record: bool = False,
    context: bytes = b"",
    all_rates: bool = False,
    given: dict[int, Tensor] | None = None,
    varying: dict[int, Tensor] | None = None,
    block=None,
) -> PassResult:
    """The configuration of x (B, *input_shape) under the tie-break along ``direction``,
    with the logits, and the gate values if ``record``; with ``all_rates`` the result's
    ``rates`` are (D, B, C), the logits' derivatives along every direction.

    ``direction`` is (*input_shape), or (D, *input_shape) for a *lexicographic* tie-break:
    the configuration at ``x + t1 d1 + t2 d2 + ...`` for ``t1 >> t2 >> ... > 0`` (a walk
    along d1 that breaks ties it cannot decide along the generic d2), or (D, B,
    *input_shape) for directions of each input's own. One forward pass of (D + 1) B rows;
    ``gate_values.derivatives`` are those along the first direction, ``derivatives2``
    along the second (when D >= 2).

    ``given``: {value index: ((D + 1) B, *shape) stacked values} that the pass takes
    instead of computing them (:meth:`PlanePrefix.given`: the affine prefix of the
    points of a plane, combined from its rows); the nodes that only they need do not run.
    ``varying``: {max-pool node k: (C,) int64 ascending windows}: the caller vouches that
    every other window of gate k has the same values, derivatives and hence choice at
    every input of the batch up to ties the rule decides alike (:class:`PlaneScreen`'s
    steady windows of a plane box); the rule then runs on the first input for those and
    on the windows C of every input (on a window grid; the same choices and counts).
    ``block``: a :meth:`PlaneBlock.bind` (the plane's first ReLU and max-pool decided
    before the pass, which starts after them; their gate values are formed on demand,
    :meth:`GateValues.columns`).
    """
    shape = tuple(x.shape[1:])
    if tuple(direction.shape) == shape:
        dirs = direction.unsqueeze(0)
    elif direction.dim() == len(shape) + 1 and tuple(direction.shape[1:]) == shape:
        dirs = direction
    elif direction.dim() == len(shape) + 2 and tuple(direction.shape[1:]) == tuple(x.shape):
        dirs = direction  # (D, B, *input_shape): directions of their own per input
    else:
        raise ValueError(f"direction must be {shape}, (D, *{shape}) or (D, B, *{shape}); got "
                         f"{tuple(direction.shape)}")
    b, n_dir = x.shape[0], dirs.shape[0]
    run = _ConfigurationRun(program, tol, record, b, n_dir, x.device, varying)
    if dirs.dim() == len(shape) + 1:  # shared directions: one row each up to the first gate
        stacked = torch.cat([x, dirs.to(x.dtype)])
    else:
        stacked = torch.cat([x, *(d.expand_as(x) for d in dirs)])
    lazy = None
    with torch.no_grad():
        if block is not None:
            more, lazy = block(run)
            given = {**(given or {}), **more}
        out = run.full(run.run(program, stacked, given=given))
    config = Configuration(
        run.on, run.select, run.index, run.n_relu, run.n_pool,
        {k: int(program.nodes[k].window.shape[1]) for k in run.select}, context,
    )
    gates = GateValues(run.values, run.derivatives, b, run.derivatives2 if n_dir > 1 else None,
                       lazy) if record else None
    rates = out[b:].reshape(n_dir, b, *out.shape[1:]) if all_rates else out[b : 2 * b]
    return PassResult(out[:b], config, gates, rates)


def affine_prefix(program: Program, rows: Tensor, magnitudes: Tensor | None = None,
                  ) -> dict[int, tuple[Tensor, Tensor | None]]:
    """The values that only Affine and Add nodes compute from the input (the input, value
    0, included), on stacked rows (R, *input_shape) of which the first carries the biases
    and the others are directions (linear parts only): {value index: ((R, *shape), the
    same prefix of |op| and |bias| on ``magnitudes`` (R, *input_shape), or None)}."""
    values = {0: (rows, magnitudes)}
    for k, node in enumerate(program.nodes):
        if isinstance(node, Affine) and node.inputs[0] in values:
            y, s = values[node.inputs[0]]
            y = node.op.apply(y)
            s = None if s is None else node.op.abs().apply(s)
            if node.bias is not None:
                y[0] += node.bias
                if s is not None:
                    s[0] += node.bias.abs()
            values[k + 1] = (y, s)
        elif isinstance(node, Add) and all(i in values for i in node.inputs):
            (ya, sa), (yb, sb) = (values[i] for i in node.inputs)
            values[k + 1] = (ya + yb, None if sa is None else sa + sb)
    return values


class PlanePrefix:
    """The affine prefix of :func:`configure` on the points of a plane ``x0 + a u + b v``.

    A value that only Affine and Add nodes compute from the input is affine on the whole
    plane: ``y = y0 + a yu + b yv`` (y0 with the biases; yu, yv, and the OpenBox's tie-break
    direction's yd, linear parts only). Computed once for the plane, the values the rest
    of the program reads (the first gates' inputs) are combined per point in a few
    elementwise products, not a convolution per point and direction: the values of the
    network at the point up to rounding (~1e-16 of their terms; the pass's keys and rows
    agree with a pass on the points themselves wherever no gate input is within rounding
    of its kink or tie: tested on random points). The input itself is never combined.

    Args:
        program: the OpenBox's program; x0 (1, *input_shape); u, v, direction
            (*input_shape).
    """

    def __init__(self, program: Program, x0: Tensor, u: Tensor, v: Tensor, direction: Tensor):
        rows = torch.stack([x0.reshape(program.input_shape), u, v, direction.reshape(u.shape)])
        values = affine_prefix(program, rows.to(program.dtype))
        inside = set(values)
        read = {i for k, node in enumerate(program.nodes) if k + 1 not in inside
                for i in node.inputs} | {program.output}
        self.rows = {i: values[i][0] for i in sorted(read & inside) if i != 0}

    def given(self, pts: Tensor, ns: Tensor, es: Tensor) -> dict[int, Tensor]:
        """{value index: (4N, *shape)} the stacked values ``[y(p); dy along n; dy along e;
        dy along the direction]`` of :func:`configure` for the points p = pts (N, 2) with
        directions ns, es (N, 2), all in (a, b)."""
        out = {}
        n = pts.shape[0]
        for i, y in self.rows.items():
            z = y.new_empty((4 * n, *y.shape[1:]))
            _plane_streams(y, pts, ns, es, (n, *[1] * (y.dim() - 1)),
                           z.view(4, n, *y.shape[1:]))
            out[i] = z
        return out


def _plane_streams(y, pts: Tensor, ns: Tensor, es: Tensor, shape, out: Tensor) -> Tensor:
    """The prefix's rows y = (y0, yu, yv, yd) combined at points pts (N, 2) with
    directions ns, es (N, 2), into out (4, N, ...): ``y0 + a yu + b yv``, ``n_a yu + n_b
    yv``, ``e_a yu + e_b yv`` and ``yd``; each coordinate reshaped to ``shape`` to
    broadcast against the rows. The one place this sum is formed (:class:`PlanePrefix`
    and :class:`PlaneBlock` get the same bits)."""
    col = lambda t, j: t[:, j].reshape(shape)  # noqa: E731
    torch.mul(col(pts, 0), y[1], out=out[0]).add_(y[0])
    out[0].add_(col(pts, 1) * y[2])
    torch.mul(col(ns, 0), y[1], out=out[1]).add_(col(ns, 1) * y[2])
    torch.mul(col(es, 0), y[1], out=out[2]).add_(col(es, 1) * y[2])
    out[3] = y[3]
    return out


class PlaneBlock:
    """The first ReLU and max-pool of a program on a plane box, decided once where they
    cannot change, per point only where they can.

    For ``relu -> max-pool`` as the first two gates, the ReLU reading a value of the
    affine prefix (:class:`PlanePrefix`) and only the pool reading the ReLU: the units
    whose sign cannot change over the box and the windows whose order cannot
    (:class:`~openbox.constraints.PlaneScreen`'s steady ones: bounds with a margin over
    rounding; flat entries, which no term of u or v reaches, keep bitwise the same values
    and derivatives at every point) are decided by the pass's own rules once, at the
    box's centre; each pass applies the same rules to the few others at every point (the
    ReLU's varying units, the pool's varying windows, on their gathered entries) and
    forms the pool's output at every window from the selected entries. The pass then
    starts after the pool (:func:`configure`'s ``block``): the same signs, selections,
    tie counts and pool outputs, bit for bit, as the pass through the ReLU and the pool
    on the prefix's combined values (a test holds it to that).

    :attr:`usable` is False (nothing to do: the plain pass) for other layouts.

    Args:
        program, tol: the OpenBox's program and tolerances.
        prefix: the plane's :class:`PlanePrefix`; screen: its
            :class:`~openbox.constraints.PlaneScreen` (the box).
    """

    def __init__(self, program: Program, tol: Tolerances, prefix: PlanePrefix, screen):
        self.usable = False
        gates = program.gates
        if len(gates) < 2 or program.dtype != torch.float64:
            return
        k1, k2 = gates[0], gates[1]
        relu, pool = program.nodes[k1], program.nodes[k2]
        if not (isinstance(relu, ReLU) and isinstance(pool, MaxPool)):
            return
        vin = relu.inputs[0]
        if (vin not in prefix.rows or pool.inputs[0] != k1 + 1
                or program.users[k1 + 1] != (k2,) or _pool_grid(pool) is None
                or k1 not in screen.q or k2 not in screen.q):
            return
        self.usable = True
        self.k1, self.k2, self.vin, self.relu, self.pool = k1, k2, vin, relu, pool
        self.prefix = prefix
        self.y = prefix.rows[vin].reshape(4, -1)  # (4, n): y0, yu, yv, yd
        dev = self.y.device
        self.units = flat_nonzero(screen.q[k1] == -torch.inf).to(dev)  # varying units
        self.windows = flat_nonzero(screen.q[k2] == -torch.inf).to(dev)  # varying windows
        self.window = pool.window.to(dev)
        # the rules once, at the box's centre (steady units and windows: any point alike)
        c = torch.as_tensor((screen.lo + screen.hi) / 2, dtype=program.dtype,
                            device=dev).reshape(1, 2)
        nn_ = torch.tensor([[1.0, 0.0]], dtype=program.dtype, device=dev)
        ee = torch.tensor([[0.0, 1.0]], dtype=program.dtype, device=dev)
        run = _ConfigurationRun(program, tol, False, 1, 3, dev)
        every = torch.arange(self.y.shape[1], device=dev)
        z, dz = self._streams(every.reshape(1, -1), c, nn_, ee)
        on, _ = run._relu_on(z, dz)
        self.on_ref = on  # (1, n)
        r, dr = self._outputs(z, dz, on)
        n_out, kk = self.window.shape
        steady = torch.ones(n_out, dtype=torch.bool, device=dev)
        steady[self.windows] = False
        self.steady = flat_nonzero(steady).to(dev)
        ent = self.window[self.steady].reshape(1, -1)
        ns_ = self.steady.numel()
        vals = r.gather(1, ent).view(1, ns_, kk)
        top = vals.amax(dim=2, keepdim=True)
        sel_s, _, _ = run._pool_choose_dense(
            vals, top, [d.gather(1, ent).view(1, ns_, kk) for d in dr])
        self.n_pool_steady = run.n_pool.clone()  # (1,): ties at the steady windows
        self.sel_ref = torch.zeros((1, n_out), dtype=torch.int64, device=dev)
        self.sel_ref[:, self.steady] = sel_s
        # the steady windows whose choice is not the strict maximum (flat ties): their
        # value is the window maximum, the same at every point
        chosen = vals.gather(2, sel_s.unsqueeze(2))
        self.flat = self.steady[(chosen != top).reshape(-1)]
        self.flat_value = top.reshape(-1)[(chosen != top).reshape(-1)]

    def _streams(self, idx: Tensor, pts: Tensor, ns: Tensor, es: Tensor):
        """z (B, c) at the gate-input positions idx (B or 1, c), and [dz along n, e and the
        direction]: the prefix's values combined as :meth:`PlanePrefix.given` combines
        them (:func:`_plane_streams`, the same bits)."""
        b = pts.shape[0]
        at = idx.expand(b, -1)
        g = [t.expand(b, -1).gather(1, at) for t in self.y.unsqueeze(1)]  # 4 x (B, c)
        out = _plane_streams(g, pts, ns, es, (b, 1), g[0].new_empty((4, *at.shape)))
        return out[0], [out[1], out[2], out[3]]

    def _outputs(self, z: Tensor, dz: list[Tensor], on: Tensor):
        """The ReLU's outputs (value, [derivatives]) as :meth:`_ConfigurationRun.relu`
        forms them."""
        slope = self.relu.negative_slope
        if slope:
            return self.relu.forward(z), [torch.where(on, d, d * slope) for d in dz]
        return torch.clamp_min(z, 0), [torch.mul(d, on.view(torch.uint8)) for d in dz]

    def bind(self, pts: Tensor, ns: Tensor, es: Tensor):
        """:func:`configure`'s ``block`` for points pts (B, 2) with directions ns, es
        (B, 2) in (a, b): called with the pass's run, it writes the two gates' states and
        counts into it and returns (the given values, the gates' values on demand)."""
        def block(run):
            given, on = self.run(pts, ns, es, run)
            return given, _BlockColumns(self, pts, ns, es, on)
        return block

    def run(self, pts: Tensor, ns: Tensor, es: Tensor, run: _ConfigurationRun):
        """The block at points pts (B, 2) with directions ns, es (B, 2): the gates' states
        and counts written into ``run``; returns the pool's output as a given value {k2 +
        1: (4B, *out_shape)} (with the prefix's values that other nodes read), and the
        ReLU's signs (B, n)."""
        b = pts.shape[0]
        k1, k2 = self.k1, self.k2
        n_out, kk = self.window.shape
        # the ReLU: steady signs copied, the varying units by the rule at every point
        on = self.on_ref.expand(b, -1).clone()
        if self.units.numel():
            zu, dzu = self._streams(self.units.reshape(1, -1), pts, ns, es)
            on_u, _ = run._relu_on(zu, dzu)
            on[:, self.units] = on_u
        # the pool: steady choices copied, the varying windows by the rule on their
        # entries at every point
        sel = self.sel_ref.expand(b, -1).clone()
        run.n_pool += self.n_pool_steady
        value_v = None
        if self.windows.numel():
            ent = self.window[self.windows].reshape(1, -1)
            z, dz = self._streams(ent, pts, ns, es)
            r, dr = self._outputs(z, dz, on.gather(1, ent.expand(b, -1)))
            nv = self.windows.numel()
            vals = r.view(b, nv, kk)
            top = vals.amax(dim=2, keepdim=True)
            sel_v, _, _ = run._pool_choose_dense(vals, top, [d.view(b, nv, kk) for d in dr])
            sel[:, self.windows] = sel_v
            value_v = top.reshape(b, nv)
        index = _grid_index(self.pool, _pool_grid(self.pool), sel)
        # the pool's output: the selected entries' outputs; the window maximum where a
        # tie chose another entry
        z, dz = self._streams(index, pts, ns, es)
        r, dr = self._outputs(z, dz, on.gather(1, index))
        if self.flat.numel():
            r[:, self.flat] = self.flat_value
        if value_v is not None:
            r[:, self.windows] = value_v
        out = torch.cat([r, *dr]).view(4 * b, *self.pool.out_shape)
        run.on[k1] = on.view(b, *self.relu.in_shape)
        run.select[k2], run.index[k2] = sel, index
        given = {k2 + 1: out}
        if any(i != self.vin for i in self.prefix.rows):
            given.update((i, t) for i, t in self.prefix.given(pts, ns, es).items()
                         if i != self.vin)
        return given, on


class _BlockColumns:
    """The values of a :class:`PlaneBlock`'s two gates at a batch of points, formed at
    the positions asked for (:meth:`GateValues.columns`): the ReLU's input and the pool's
    input (the ReLU's output), each with its derivatives along n and e."""

    def __init__(self, block: PlaneBlock, pts: Tensor, ns: Tensor, es: Tensor, on: Tensor):
        self.block, self.pts, self.ns, self.es, self.on = block, pts, ns, es, on
        self.gates = (block.k1, block.k2)

    def __getitem__(self, index) -> _BlockColumns:
        return _BlockColumns(self.block, self.pts[index], self.ns[index], self.es[index],
                             self.on[index])

    def take(self, k: int, idx: Tensor, streams: list[int]):
        """(z (B, c), [dz (B, c) along n (0) or e (1) for each of ``streams``]) of gate
        k's input at the flat positions idx (B or 1, c)."""
        if k not in self.gates:
            raise KeyError(f"gate node {k} is not one of the block's gates {self.gates}")
        z, dz = self.block._streams(idx, self.pts, self.ns, self.es)
        if k == self.block.k2:
            b = self.pts.shape[0]
            z, dz = self.block._outputs(z, dz, self.on.gather(1, idx.expand(b, -1)))
        return z, [dz[i] for i in streams]


class _ConfigurationRun(Interpreter):
    """One run of :func:`configure`: a forward pass of values and directional derivatives
    that fixes every gate, on a stacked batch ``[x; d1; ...; dD]`` of shape ((D+1)B, ...)
    whose later blocks carry the derivatives along each direction (no biases). Values
    follow the network itself (plain ReLU / max); derivatives follow the chosen gates.
    Directions shared by all inputs take one row each (B + D rows) until a gate makes
    them the inputs' own (:meth:`dirs`). Lives for one call only."""

    def __init__(self, program: Program, tol: Tolerances, record: bool, b: int, n_dir: int,
                 device, varying: dict[int, Tensor] | None = None):
        self.program = program
        self.tol = tol
        self.record = record
        self.b = b
        self.n_dir = n_dir
        self.values: dict[int, Tensor] = {}
        self.derivatives: dict[int, Tensor] = {}
        self.derivatives2: dict[int, Tensor] = {}
        self.on: dict[int, Tensor] = {}
        self.select: dict[int, Tensor] = {}
        self.index: dict[int, Tensor] = {}
        self.n_relu = torch.zeros(b, dtype=torch.int64, device=device)
        self.n_pool = torch.zeros(b, dtype=torch.int64, device=device)
        self.varying = varying or {}
        # value index -> (on, _PoolTable): a ReLU's output whose only reader, a max-pool,
        # forms its rates from the table's rows (the ReLU returned its values alone)
        self.lazy: dict[int, tuple[Tensor, _PoolTable]] = {}

    def affine(self, k, node, x):
        y = node.op.apply(x)
        if node.bias is not None:
            y[: self.b] += node.bias
        return y

    def dirs(self, x: Tensor) -> Tensor:
        """(D, B or 1, ...): the direction blocks of x, one row each while shared."""
        b, n_dir = self.b, self.n_dir
        r = 1 if x.shape[0] == b + n_dir else b
        return x[b:].reshape(n_dir, r, *x.shape[1:])

    def full(self, x: Tensor) -> Tensor:
        """x in the layout ((D+1)B, ...), shared direction rows expanded."""
        b, n_dir = self.b, self.n_dir
        if x.shape[0] == b * (n_dir + 1):
            return x
        d = self.dirs(x).expand(n_dir, b, *x.shape[1:])
        return torch.cat([x[:b], d.reshape(n_dir * b, *x.shape[1:])])

    def add(self, k, node, a, b):
        if a.shape[0] != b.shape[0]:  # one side still has shared direction rows
            a, b = self.full(a), self.full(b)
        return node.forward(a, b)

    def _relu_on(self, z: Tensor, dzs, rest: bool = False):
        """The lexicographic ReLU rule: (on (B, *shape), tied or None when nothing ties)
        for gate inputs z (B, *shape) with derivatives ``dzs[i]`` (B or 1, *shape) along
        each direction in order; counts the tied moving inputs into ``n_relu``. With
        ``rest`` also the tied inputs no direction decided (None when nothing ties): a
        later direction would decide them (here they are taken as constant: off)."""
        on = z > 0
        tied = self.tol.relu_tied(z)
        if not any_true(tied):
            return (on, None, None) if rest else (on, None)
        flat = flat_nonzero(tied)
        if flat.numel() * SPARSE_TIES <= tied.numel() and on.is_contiguous():
            return self._relu_on_sparse(z, dzs, rest, on, tied, flat)
        # lexicographic: the first direction along which the input moves decides
        decided = ~tied
        moving_any = torch.zeros_like(tied)
        for dz in dzs:
            moving = self.tol.relu_moving(dz) & ~decided
            on = torch.where(moving, dz > 0, on)
            decided |= moving
            moving_any |= moving
        undecided = tied & ~moving_any
        on = torch.where(undecided, torch.zeros_like(on), on)  # constant: off
        self.n_relu += (tied & moving_any).reshape(z.shape[0], -1).sum(1)
        return (on, tied, undecided) if rest else (on, tied)

    def _relu_on_sparse(self, z, dzs, rest, on, tied, flat):
        """:meth:`_relu_on` on the few tied inputs only (flat indices ``flat`` into z):
        the same rule, elementwise on their values, written into ``on``."""
        b = z.shape[0]
        n = z[0].numel()
        row, pos = flat // n, flat % n
        decided = torch.zeros(flat.shape, dtype=torch.bool, device=z.device)
        value = torch.zeros_like(decided)  # undecided: constant, off
        for dz in dzs:
            v = dz.reshape(dz.shape[0], -1)[row if dz.shape[0] != 1 else 0, pos]
            moving = self.tol.relu_moving(v) & ~decided
            value = torch.where(moving, v > 0, value)
            decided |= moving
        on.view(-1)[flat] = value
        self.n_relu += torch.bincount(row[decided], minlength=b)
        if not rest:
            return on, tied
        undecided = torch.zeros_like(tied)
        undecided.view(-1)[flat[~decided]] = True
        return on, tied, undecided

    def relu(self, k, node: ReLU, x):
        b = self.b
        z = x[:b]
        dz = self.dirs(x)  # (D, B or 1, ...)
        if self.record:
            self.values[k], self.derivatives[k] = z, dz[0].expand_as(z)
            if self.n_dir > 1:
                self.derivatives2[k] = dz[1].expand_as(z)
        on, _ = self._relu_on(z, dz.unbind(0))
        self.on[k] = on
        slope = node.negative_slope
        if dz.shape[1] == 1 and not slope and not self.record:  # shared rows
            table = _PoolTable.after(self.program, k, dz.reshape(self.n_dir, -1), self.tol)
            if table is not None:
                self.lazy[k + 1] = (on, table)
                return torch.clamp_min(z, 0)  # the values; the pool forms its rates
        out = x.new_empty((b * (self.n_dir + 1), *x.shape[1:]))
        dout = out[b:].view(self.n_dir, b, *x.shape[1:])
        if slope:
            out[:b] = node.forward(z)
            torch.where(on, dz, dz * slope, out=dout)
        else:
            torch.clamp_min(z, 0, out=out[:b])
            torch.mul(dz, on.view(torch.uint8), out=dout)  # the bool mask's bits, faster
        return out

    def maxpool(self, k, node: MaxPool, x):
        b = self.b
        if node.inputs[0] in self.lazy:
            return self._maxpool_by_table(k, node, x, *self.lazy.pop(node.inputs[0]))
        if self.record:
            dz = self.dirs(x)
            self.values[k], self.derivatives[k] = x[:b], dz[0].expand(b, *x.shape[1:])
            if self.n_dir > 1:
                self.derivatives2[k] = dz[1].expand(b, *x.shape[1:])
        grid = _pool_grid(node)
        if grid is not None and x.is_contiguous():
            return self._maxpool_grid(k, node, x, grid)
        return self._maxpool_table(k, node, x)

    def _maxpool_grid(self, k, node: MaxPool, x, grid):
        """:meth:`_maxpool_table` on a window table that is a regular grid: each window
        position is a strided view of x (no gathered copy), and the same rule runs on the
        K views of shape (B, *out_shape), one position at a time. Gives the same selections,
        counts and outputs: elementwise the same expressions, on every window."""
        b, n_dir = self.b, self.n_dir
        r = 1 if x.shape[0] == b + n_dir else b  # rows per direction (1: shared)
        v = _grid_views(x, grid, 0, b)  # (B, *out_shape) strided views, no copies
        out = x.new_empty((b * (n_dir + 1), *node.out_shape))
        value = _window_max(v, out[:b])
        dviews = [_grid_views(x, grid, b + r * i, r) for i in range(n_dir)]
        if k in self.varying and b > 1:
            sel = self._pool_choose_varying(node, x, r, v, value, dviews,
                                            self.varying[k].to(x.device))
        else:
            sel, _, _ = self._pool_choose(v, value, dviews)
        index = _grid_index(node, grid, sel)
        dflat = x[b:].reshape(n_dir, r, -1).expand(n_dir, b, -1)
        torch.gather(dflat, 2, index.unsqueeze(0).expand(n_dir, -1, -1),
                     out=out[b:].view(n_dir, b, -1))
        self.select[k] = sel
        self.index[k] = index
        return out

    def _maxpool_by_table(self, k, node: MaxPool, x: Tensor, on: Tensor,
                          table: _PoolTable) -> Tensor:
        """:meth:`_maxpool_grid` on the values x (B, *shape) of a ReLU that chose ``on``
        (B, *shape) and whose input's rates are ``table.rows``: the choice by the table,
        the output's rates formed at the selected entries as the ReLU forms them (the
        row's entry times its on bit): the same selections, counts and outputs."""
        b, n_dir = self.b, self.n_dir
        grid = _pool_grid(node)
        v = _grid_views(x, grid, 0, b)
        out = x.new_empty((b * (n_dir + 1), *node.out_shape))
        value = _window_max(v, out[:b])
        sel = table.choose(self, grid, v, value, on)
        index = _grid_index(node, grid, sel)
        bits = on.reshape(b, -1).gather(1, index).view(torch.uint8)
        dout = out[b:].view(n_dir, b, -1)
        for i in range(n_dir):
            torch.mul(table.rows[i].take(index), bits, out=dout[i])
        self.select[k] = sel
        self.index[k] = index
        return out

    def _pool_choose_varying(self, node: MaxPool, x: Tensor, r: int, v, value, dviews,
                             c: Tensor) -> Tensor:
        """:meth:`_pool_choose`'s sel (B, n_out) when only the windows c ((C,) ascending)
        can differ between the inputs (``varying``): the rule on the first input's views
        for the others (their choice and count copied to every input), and on the
        gathered entries of the windows c of every input (:meth:`_pool_choose_dense`, the
        same rule). x: the stacked gate input (contiguous), r its rows per direction."""
        b = value.shape[0]
        first = self.n_pool.clone()
        sel0, tied0, same0 = self._pool_choose([e[:1] for e in v], value[:1],
                                               [[d[:1] for d in dv] for dv in dviews])
        apart = (tied0[0] ^ same0[0]).to(torch.int64)
        for t, s in zip(tied0[1:], same0[1:]):
            apart += (t ^ s).to(torch.int64)
        apart = apart.reshape(-1)
        steady = int(apart.sum()) - int(apart[c].sum())
        self.n_pool = first + steady  # the first input's count, outside c, for every input
        n_c, kk = c.numel(), node.window.shape[1]
        cols = node.window.to(x.device)[c].reshape(1, -1)  # (1, C K): the windows' entries
        rows = x.reshape(x.shape[0], -1)

        def entries(r0, n):  # (n, C, K) of rows r0 ..., a gather on an expanded index
            return rows[r0:r0 + n].gather(1, cols.expand(n, -1)).view(n, n_c, kk)

        vc = entries(0, b)
        dvc = [entries(b + r * i, r) for i in range(len(dviews))]  # (B or 1, C, K)
        top = value.reshape(b, -1).gather(1, c.expand(b, -1)).unsqueeze(2)  # (B, C, 1)
        sel_c, _, _ = self._pool_choose_dense(vc, top, dvc)
        sel = sel0.expand(b, -1).clone()
        sel[:, c] = sel_c
        return sel

    def _pool_choose(self, v, value, dviews) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """The lexicographic max-pool rule on a regular window grid: v is K views
        (B, *out_shape), one per window position, of the gate input's values; value their
        maximum; ``dviews[i]`` the K views (B or 1, *out_shape) of the derivatives along
        direction i. Returns (sel (B, n_out) int64, the window position chosen, the K
        tied masks, and the K masks of the entries still tied after the last direction,
        the chosen one among them); counts the ties between different functions into
        ``n_pool``."""
        b = value.shape[0]
        floor = self.tol.pool_floor(value)  # tol.pool_tied, its bound computed once
        tied = [e >= floor for e in v]
        same = tied
        low = value.new_full((), -torch.inf)
        for dv in dviews:  # keep the entries that rise fastest, direction by direction
            masked = [torch.where(s, e, low) for s, e in zip(same, dv)]
            top = masked[0] if len(masked) == 1 else torch.maximum(masked[0], masked[1])
            for m in masked[2:]:
                torch.maximum(top, m, out=top)
            floor = self.tol.slope_floor(top)  # tol.same_slope, its bound computed once
            same = [s & (m >= floor) for s, m in zip(same, masked)]
        # the first True (the lowest window position), 0 when none: the number of leading
        # positions before it, counted as the prefixes that hold no True
        none = ~same[0]
        lead = torch.zeros(value.shape, dtype=torch.uint8, device=value.device)
        for s in same[1:]:
            lead += none.view(torch.uint8)
            none = none & ~s
        lead *= (~none).view(torch.uint8)
        # tied but not the same function (same <= tied: t ^ s), counted per window in
        # uint8 (at most 256 positions per window on a grid), then summed per input
        apart = (tied[0] ^ same[0]).to(torch.uint8)
        for t, s in zip(tied[1:], same[1:]):
            apart += (t ^ s).view(torch.uint8)
        self.n_pool += apart.reshape(b, -1).sum(1, dtype=torch.int64)
        return lead.view(b, -1).to(torch.int64), tied, same

    def _maxpool_table(self, k, node: MaxPool, x):
        b = self.b
        entries = node.gather(x)  # ((D+1)B or B+D, n_out, K), padding -inf
        v = entries[:b]
        dv = self.dirs(entries)  # (D, B or 1, n_out, K)
        out = x.new_empty((b * (self.n_dir + 1), *node.out_shape))
        value = out[:b].view(b, -1, 1)
        torch.amax(v, dim=2, keepdim=True, out=value)
        sel, _, _ = self._pool_choose_dense(v, value, dv.unbind(0))
        self.select[k] = sel
        window = node.window.to(sel.device)
        self.index[k] = window[torch.arange(window.shape[0], device=sel.device), sel]
        idx = sel.unsqueeze(2).unsqueeze(0).expand(self.n_dir, -1, -1, -1)
        torch.gather(dv.expand(self.n_dir, b, *dv.shape[2:]), 3, idx,
                     out=out[b:].view(self.n_dir, b, -1, 1))
        return out

    def _pool_choose_dense(self, v, value, dvs) -> tuple[Tensor, Tensor, Tensor]:
        """:meth:`_pool_choose` on gathered windows: v (B, n_out, K) values (padding
        -inf), value (B, n_out, 1) their maximum, ``dvs[i]`` (B or 1, n_out, K) the
        derivatives along direction i. Returns (sel (B, n_out), tied (B, n_out, K), same
        (B, n_out, K): the entries still tied after the last direction)."""
        tied = v >= self.tol.pool_floor(value)
        same = tied
        for dv in dvs:  # keep the entries that rise fastest, direction by direction
            masked = torch.where(same, dv, torch.full_like(dv, -torch.inf))
            same = same & (masked >= self.tol.slope_floor(masked.amax(dim=2, keepdim=True)))
        sel = same.to(torch.uint8).argmax(dim=2)  # first True: lowest window position
        self.n_pool += (tied & ~same).reshape(v.shape[0], -1).sum(1)
        return sel, tied, same


def _grid_views(t: Tensor, grid, r0: int, n: int) -> list[Tensor]:
    """The K strided views (n, *out_shape) of rows r0 .. r0 + n of t (rows contiguous, in
    a gate input's layout), one per window position of the grid (:func:`_pool_grid`)."""
    base, sizes, strides, offsets = grid
    n_in = t[0].numel()
    flat = t.reshape(-1)
    start = flat.storage_offset() + base + r0 * n_in
    return [flat.as_strided((n, *sizes), (n_in, *strides), start + off) for off in offsets]


def _window_max(v: list[Tensor], value: Tensor) -> Tensor:
    """The elementwise maximum of the views v (NaN propagates) written into value."""
    if len(v) == 1:
        value.copy_(v[0])
    else:
        torch.maximum(v[0], v[1], out=value)
    for e in v[2:]:
        torch.maximum(value, e, out=value)
    return value


class _PoolTable:
    """The lexicographic max-pool rule of one node as a table, for a max-pool on a window
    grid (at most :data:`POOL_TABLE_ENTRIES` entries per window) that is the only reader
    of a ReLU without negative slope whose input's directional derivatives are rows
    shared by every input of the pass: ``rows`` (D, n), as after an affine prefix under
    a fixed tie-break direction (the OpenBox's own: the census, region keys, explain).

    There an entry's derivative along direction i is ``rows[i, entry]`` where the ReLU
    chose it on and exactly 0 (``dz * 0``) where off, so the rule's choice in a window and
    its count of tied entries that are other functions depend only on which entries tie
    the window's maximum (T, K bits, from the values) and which are on (O, K bits). The
    table holds both for each window and each of the 2^(2K) cases, computed once by the
    same elementwise expressions as :meth:`_ConfigurationRun._pool_choose` on those
    derivatives (a -0 where the pass has +0, or the reverse, changes no comparison and
    no floor). A pass forms each window's case ``T + 2^K O`` and looks both up: the same
    selections and counts bit for bit (tested against the rule), without the rule's
    floating-point work on the derivatives, and the ReLU need not form its derivative
    rows (the pool forms its own at the selected entries).

    Built the second time a node meets the same rows and tolerances (one-off directions,
    e.g. a walk's, never pay for it), and cached per node: the last rows met without a
    table, and one table of ``2^(2K) x n_out`` bytes (0.4 MB for the demo CNN's first
    pool, 0.8 MB for the reference CNN's). Non-finite rows get none."""

    def __init__(self, node: MaxPool, rows: Tensor, tol: Tolerances):
        self.rows, self.tol = rows, tol
        window = node.window.to(rows.device, torch.int64)
        n_out, kk = window.shape
        cases = 1 << (2 * kk)
        bits = (torch.arange(cases, device=rows.device).unsqueeze(1)
                >> torch.arange(2 * kk, device=rows.device)) & 1  # (cases, 2K)
        tied, on = bits[:, :kk].bool(), bits[:, kk:].bool()
        ent = rows[:, window]  # (D, n_out, K): each direction's rate at every entry
        # (cases, n_out): a pass's lookups of one case read neighbouring windows' entries;
        # each entry the choice (2 bits) and the count (3 bits) in one byte
        packed = torch.empty((cases, n_out), dtype=torch.uint8, device=rows.device)
        zero, low = rows.new_zeros(()), rows.new_full((), -torch.inf)
        step = max(1, (1 << 22) // (n_out * kk))  # cases per chunk: ~32 MB of float64
        for c0 in range(0, cases, step):
            t = tied[c0 : c0 + step, None, :].expand(-1, n_out, kk)  # (c, n_out, K)
            o = on[c0 : c0 + step, None, :]
            same = t
            for d in ent:  # _pool_choose's rule on each case's derivatives
                masked = torch.where(same, torch.where(o, d, zero), low)
                floor = tol.slope_floor(masked.amax(dim=2, keepdim=True))
                same = same & (masked >= floor)
            sel = same.to(torch.uint8).argmax(dim=2)  # first True
            apart = (t & ~same).sum(2, dtype=torch.uint8)
            packed[c0 : c0 + step] = sel.to(torch.uint8) | (apart << 2)
        self.packed = packed.reshape(-1)
        self.base = torch.arange(n_out, device=rows.device)

    @staticmethod
    def after(program: Program, k: int, rows: Tensor, tol: Tolerances) -> _PoolTable | None:
        """The table of the max-pool that alone reads ReLU node k's output, when k has no
        negative slope, the pool's layout allows one (see the class) and it has met these
        rows (D, n) of k's input before; None otherwise (the rows are remembered)."""
        users = program.users[k + 1]
        if not POOL_TABLE or len(users) != 1 or program.nodes[k].negative_slope:
            return None
        node = program.nodes[users[0]]
        if (not isinstance(node, MaxPool) or node.window.shape[1] > POOL_TABLE_ENTRIES
                or node.window.shape[0] << (2 * node.window.shape[1]) > POOL_TABLE_BYTES
                or _pool_grid(node) is None):
            return None
        last, table = _POOL_TABLES.get(node, (None, None))
        if table is not None and table.tol == tol and _same_rows(table.rows, rows):
            return table
        if last is not None and last[1] == tol and _same_rows(last[0], rows):
            if bool(torch.isfinite(rows).all()):
                table = _PoolTable(node, rows.clone(), tol)
                _POOL_TABLES[node] = (None, table)
                return table
        _POOL_TABLES[node] = ((rows.clone(), tol), table)
        return None

    def choose(self, run: _ConfigurationRun, grid, v, value: Tensor, on: Tensor) -> Tensor:
        """sel (B, n_out) int64, counting into ``run.n_pool``, from the K value views v
        (B, *out_shape) of the grid, their maximum ``value`` and the ReLU's choice ``on``
        (B, *shape)."""
        b, kk = value.shape[0], len(v)
        floor = run.tol.pool_floor(value)  # tol.pool_tied, its bound computed once
        code = (v[0] >= floor).view(torch.uint8)
        for j, e in enumerate(v[1:], 1):
            code.add_((e >= floor).view(torch.uint8), alpha=1 << j)
        for j, o in enumerate(_grid_views(on.contiguous(), grid, 0, b)):
            code.add_(o.view(torch.uint8), alpha=1 << (kk + j))
        at = code.reshape(b, -1).to(torch.int64)  # (B, n_out): every window's case
        at *= self.base.numel()
        at += self.base
        got = self.packed.take(at)
        run.n_pool += (got >> 2).sum(1, dtype=torch.int64)
        return (got & 3).to(torch.int64)


def _same_rows(a: Tensor, b: Tensor) -> bool:
    return (a.shape == b.shape and a.device == b.device and a.dtype == b.dtype
            and torch.equal(a, b))


_POOL_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""MaxPool node -> ((rows, tol) last met without a table, or None; its _PoolTable or
None)."""

_POOL_GRIDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""MaxPool node -> its :func:`_pool_grid` (nodes are immutable)."""


def _pool_grid(node: MaxPool):
    """(base, sizes, strides, offsets) when the window table reads a regular grid of x
    (``window[o, j] = base + sum_d o_d strides_d + offsets[j]``, o running row-major over
    ``out_shape``, no padding, at most 256 positions): each position j is then a strided
    view of x. None otherwise (the window table is gathered). Cached per node."""
    if node in _POOL_GRIDS:
        return _POOL_GRIDS[node]
    grid = None
    w = node.window
    sizes = tuple(int(s) for s in node.out_shape)
    if 0 < w.shape[1] <= 256 and bool((w >= 0).all()) and w.shape[0] == prod(sizes):
        w = w.to("cpu", torch.int64)
        first = w[:, 0]
        offsets = (w[0] - w[0, 0]).tolist()
        base = int(w[0, 0])
        strides = []
        for d in range(len(sizes)):
            step = prod(sizes[d + 1 :])
            strides.append(int(first[step] - first[0]) if sizes[d] > 1 else 0)
        if base >= 0 and all(s >= 0 for s in strides) and min(offsets) >= -base:
            want = torch.full((), base, dtype=torch.int64)
            for d, (size, stride) in enumerate(zip(sizes, strides)):
                shape = [1] * len(sizes)
                shape[d] = size
                want = want + (torch.arange(size) * stride).reshape(shape)
            want = want.reshape(-1, 1) + torch.tensor(offsets, dtype=torch.int64)
            if torch.equal(w, want):
                grid = (base, sizes, tuple(strides), tuple(offsets))
    _POOL_GRIDS[node] = grid
    return grid


def pool_grid(node: MaxPool):
    """:func:`_pool_grid` (the public name, for :mod:`openbox.constraints`)."""
    return _pool_grid(node)


_POOL_STARTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""MaxPool node with a grid (:func:`_pool_grid`) -> (start (n_out,), offsets (K,)) int64:
``window[o, j] = start[o] + offsets[j]``."""


def _grid_index(node: MaxPool, grid, sel: Tensor) -> Tensor:
    """``window[o, sel[b, o]]`` (B, n_out) for a max-pool node whose window table is a
    grid: each window's first entry plus the selected position's offset (no 2-D
    advanced indexing)."""
    got = _POOL_STARTS.get(node)
    if got is None or got[0].device != sel.device:
        offsets = torch.tensor(grid[3], dtype=torch.int64)
        start = node.window[:, 0].to(torch.int64) - offsets[0]
        got = (start.to(sel.device), offsets.to(sel.device))
        _POOL_STARTS[node] = got
    start, offsets = got
    return start + offsets.index_select(0, sel.reshape(-1)).view(sel.shape)


# ------------------------------------------------------------------ the pass along a line


class LinePass(NamedTuple):
    """What :func:`configure_line` returns for B points ``x0 + t d`` of one line.

    Attributes:
        configuration: the configuration of each point (B inputs), tie-break along d, then u.
        logits: (B, C) the network at each point (``intercepts + t * rates``).
        rates: (B, C) the logits' derivative along d inside each point's region.
        exit: (B,) float64 on the CPU: the t at which each point's region ends along the
            line (the first row that falls reaches zero; +inf when none falls). Computed
            from the region alone (its affine gate inputs at t = 0 and their rates), never
            from the point: two points of one region get the same exit, bit for bit.
    """

    configuration: Configuration
    logits: Tensor
    rates: Tensor
    exit: Tensor
    tail: LineTail | None = None


class LineTail(NamedTuple):
    """The part of a :class:`LinePass` a walk needs to go on in the program's tail
    (:func:`line_split`) without a new pass while the gates before it stay the same.

    Attributes:
        split: the tail starts after node ``split``.
        value: (2, R, ...) the intercept and d streams out of node ``split`` (R = 1 when
            they do not depend on the point, else B). The tail runs without the u stream
            (see :func:`configure_line`); ``u_input`` gives it where a tie needs it.
        head_exit: (B,) float64 CPU, the exit of the gates up to ``split`` alone; the
            pass's ``exit`` is the smaller of it and ``tail_exit``.
        head_guard: (B,) float64 CPU, <= head_exit: below it no head gate input comes
            near a tie (:data:`openbox.constraints.GUARD_TIES`), so a pass there would
            choose the same head gates (what makes :func:`configure_line_tail` give
            that pass's result).
        tail_exit: (B,) float64 CPU, the exit of the tail's gates.
        head_tight: ((B,) ReLU, (B,) max-pool) tied-input counts of the head's gates.
        u_input: (R, ...) the u stream into node ``split``.
    """

    split: int
    value: Tensor
    head_exit: Tensor
    head_guard: Tensor
    tail_exit: Tensor
    head_tight: tuple[Tensor, Tensor]
    u_input: Tensor


def line_split(program: Program) -> int | None:
    """Where a line walk's tail starts: the last affine node before the program's last
    gate, when every node after it reads only the node before it (gates and affine maps
    in a chain up to the output). Inside a region of the gates up to that node, the
    values out of it are one affine function of t, so the walk can cross the tail's
    facets (:func:`configure_line_tail`) without running the nodes before. None when the
    program has no such tail (no gate after an affine node, or branches in it)."""
    gates = list(program.gates)
    if not gates:
        return None
    affine = [k for k in range(max(gates)) if isinstance(program.nodes[k], Affine)]
    if not affine:
        return None
    m = affine[-1]
    if program.output != len(program.nodes):
        return None
    for k in range(m + 1, len(program.nodes)):
        if tuple(program.nodes[k].inputs) != (k,):
            return None
    return m


def configure_line(
    program: Program,
    x0: Tensor,
    direction: Tensor,
    tie_direction: Tensor,
    t: Tensor,
    tol: Tolerances,
    *,
    context: bytes = b"",
    split: int | None = None,
) -> LinePass:
    """The configurations of the points ``x0 + t_i d`` (B of them) of one line, with the
    exit of each point's region along the line, in one pass.

    The pass carries, instead of the points' values, each gate input's *intercept* (its
    affine function of t at t = 0, under the gates chosen upstream) and its rates along
    ``d`` and ``u``: three streams, ``[a; dz/dd; dz/du]``. A gate input's value at a point
    is ``a + t * rate`` (equal to the network's own value in exact arithmetic), and the
    gates are decided by the rule of :func:`configure` with the lexicographic tie-break
    (d, then u). The nodes before the first gate are run once on the three streams, not
    per point. Because the intercepts and rates of a region depend on its gates only, the
    region's exit (:func:`openbox.constraints.relu_line_exit`,
    :func:`~openbox.constraints.pool_line_exit`) does not depend on which point of the
    region was configured: a walk that steps from exit to exit visits the same points
    whatever point of a region it starts from (what lets :func:`openbox.regions.segment`
    walk sub-segments side by side and join them exactly).

    With ``split``, the tail (the nodes after it) runs on the intercept and d streams
    only: u decides a tail gate only where d leaves a tie (a tied ReLU input constant
    along d, max-pool entries that are the same function along d), and a max-pool entry
    that a ReLU before it (no negative slope) switched off has u rate exactly 0, so it
    is known without the stream. Points with any other such tie get their tail again
    with all three streams (:func:`_tail_with_u`): the result is the three-stream pass's,
    bit for bit, at about two thirds of the tail's cost.

    Args:
        x0: (1, *input_shape) or (*input_shape) the line's point at t = 0.
        direction: (*input_shape) d.
        tie_direction: (*input_shape) u, for ties that persist along d.
        t: (B,) parameters of the points (any float dtype; used in x0's dtype).
        split: with :func:`line_split`'s node, also return the :class:`LineTail`.
    """
    from openbox import constraints  # the row math lives there; it imports this module

    shape = tuple(program.input_shape)
    x0 = x0.reshape(1, *shape)
    if tuple(direction.shape) != shape or tuple(tie_direction.shape) != shape:
        raise ValueError(f"direction and tie_direction must be {shape}, got "
                         f"{tuple(direction.shape)} and {tuple(tie_direction.shape)}")
    t = torch.as_tensor(t).reshape(-1).to(dtype=x0.dtype, device=x0.device)
    if t.numel() == 0:
        raise ValueError("configure_line needs at least one t")
    run = _LineRun(program, tol, t, constraints, split)
    stacked = torch.cat([x0, direction.reshape(1, *shape), tie_direction.reshape(1, *shape)])
    with torch.no_grad():
        out = run.run(program, stacked)
    config = Configuration(
        run.on, run.select, run.index, run.n_relu, run.n_pool,
        {k: int(program.nodes[k].window.shape[1]) for k in run.select}, context,
    )
    if split is None:
        head, tail_exit = _exits(run)
        logits, rates = _line_logits(out, t, run.blocks)
        return LinePass(config, logits, rates, torch.minimum(head, tail_exit))
    value = run.tail_value.reshape(2, -1, *run.tail_value.shape[1:])
    out = _tail_with_u(program, tol, run, out, t, value, run.tail_u, run.head_tight,
                       constraints)
    head, tail_exit = _exits(run)
    logits, rates = _line_logits(out, t, run.blocks)
    guard = run.guard_head.double().cpu()
    if bool(guard.isnan().any()):
        raise RuntimeError("NaN in a region's guard along the line")
    return LinePass(config, logits, rates, torch.minimum(head, tail_exit),
                    LineTail(split, value, head, guard, tail_exit, run.head_tight,
                             run.tail_u))


def configure_line_tail(
    program: Program,
    tail: LineTail,
    rows: Tensor,
    t: Tensor,
    tol: Tolerances,
) -> tuple[Configuration, Tensor, Tensor, Tensor]:
    """:func:`configure_line` for points whose gates up to ``tail.split`` are known: only
    the tail's nodes run, from the streams ``tail.value`` of the points ``rows`` (of the
    pass that made ``tail``), at new parameters t (one per row).

    Valid below ``tail.head_guard``: a pass at t would choose the same head gates, so the
    streams out of ``tail.split`` are the pass's, and the result is that pass's, bit for
    bit (the same arithmetic on the same streams).

    Args:
        rows: (b,) int64 rows of the pass.
        t: (b,) the new parameters.

    Returns:
        (the tail's gates (b inputs; :func:`with_head` adds the head's), logits (b, C),
        rates (b, C), tail exit (b,) float64 CPU).
    """
    from openbox import constraints

    t = torch.as_tensor(t).reshape(-1).to(dtype=tail.value.dtype, device=tail.value.device)
    value, u_input = tail.value, tail.u_input
    if value.shape[1] != 1:
        value = value.index_select(1, rows.to(value.device))
        u_input = _LazyRows(u_input, rows.to(value.device))  # taken only for a redo
    with torch.no_grad():
        run = _LineRun(program, tol, t, constraints, tail.split, blocks=2)
        x = _run_tail(program, run, value.reshape(-1, *value.shape[2:]))
        zero = torch.zeros_like(run.n_relu)
        x = _tail_with_u(program, tol, run, x, t, value, u_input, (zero, zero), constraints)
    config = Configuration(
        run.on, run.select, run.index, run.n_relu, run.n_pool,
        {k: int(program.nodes[k].window.shape[1]) for k in run.select}, b"",
    )
    _, tail_exit = _exits(run)
    logits, rates = _line_logits(x, t, run.blocks)
    return config, logits, rates, tail_exit


class _LazyRows:
    """Rows ``rows`` of a tensor, taken when :meth:`index_select` asks for some of them."""

    def __init__(self, tensor: Tensor, rows: Tensor):
        self.tensor, self.rows = tensor, rows

    def index_select(self, dim: int, sub: Tensor) -> Tensor:
        return self.tensor.index_select(dim, self.rows.index_select(0, sub))


def _run_tail(program: Program, run: _LineRun, x: Tensor) -> Tensor:
    """Run the nodes after ``run.split`` on x (the streams out of the split node)."""
    for k in range(run.split + 1, len(program.nodes)):
        x = run.dispatch(k, program.nodes[k], [x])
    return x


def _tail_with_u(program: Program, tol: Tolerances, run: _LineRun, out: Tensor, t: Tensor,
                 value: Tensor, u_input: Tensor, base: tuple[Tensor, Tensor],
                 constraints) -> Tensor:
    """Redo, with the u stream, the tail of the points whose two-stream tail (``run``,
    output ``out`` (2B, ...)) met a tie only u decides (``run.need_u``), and write their
    gates, tied counts (``base``: the counts before the tail), tail exits and outputs into
    ``run`` and ``out``. ``value`` (2, R, ...) and ``u_input`` (R, ...; or a
    :class:`_LazyRows` of them): the streams out of and into the split node for the
    points of ``run`` (R = 1: shared by all)."""
    if run.need_u is None or not any_true(run.need_u):
        return out
    rows = flat_nonzero(run.need_u)
    node = program.nodes[run.split]
    if value.shape[1] == 1 and not isinstance(u_input, _LazyRows):  # shared by all points
        a, d = value.unbind(0)
        u = node.op.apply(u_input)
    else:
        a, d = value.index_select(1, rows).unbind(0)
        u = node.op.apply(u_input.index_select(0, rows))
    if a.shape[0] != rows.numel():
        a, d, u = (v.expand(rows.numel(), *v.shape[1:]) for v in (a, d, u))
    sub = _LineRun(program, tol, t.index_select(0, rows), constraints, run.split, blocks=3)
    res = _run_tail(program, sub, torch.cat([a, d, u]))
    for k in sub.on:
        run.on[k][rows] = sub.on[k]
    for k in sub.select:
        run.select[k][rows] = sub.select[k]
        run.index[k][rows] = sub.index[k]
    run.n_relu[rows] = base[0].index_select(0, rows) + sub.n_relu
    run.n_pool[rows] = base[1].index_select(0, rows) + sub.n_pool
    run.exit_tail[rows] = sub.exit_tail
    out = out.clone()
    out.view(2, -1, *out.shape[1:])[:, rows] = res.view(3, -1, *res.shape[1:])[:2]
    return out


def with_head(head: Configuration, gates: Configuration, tail: LineTail,
              rows: Tensor) -> Configuration:
    """The whole configuration of points of a tail walk: the head gates of the pass
    (``head``, all of the pass's rows) for ``rows``, with the tail's ``gates`` (one input
    per row) and the tied counts of both."""
    part = head[rows]
    keep = lambda d: {k: v for k, v in d.items() if k < tail.split}  # noqa: E731
    on, select, index = keep(part.on), keep(part.select), keep(part.index)
    on.update(gates.on)
    select.update(gates.select)
    index.update(gates.index)
    rows_cpu = rows.cpu()
    dev = gates.n_tight_relu.device
    return Configuration(
        on, select, index,
        tail.head_tight[0].cpu()[rows_cpu].to(dev) + gates.n_tight_relu,
        tail.head_tight[1].cpu()[rows_cpu].to(dev) + gates.n_tight_pool,
        head.window_sizes, head.context,
    )


def _exits(run) -> tuple[Tensor, Tensor]:
    """(head exit, tail exit) of a line run, float64 on the CPU; NaN is an error."""
    head, tail = run.exit_head.double().cpu(), run.exit_tail.double().cpu()
    if bool(head.isnan().any() or tail.isnan().any()):
        raise RuntimeError("NaN in a region's exit along the line")
    return head, tail


def _line_logits(out: Tensor, t: Tensor, blocks: int) -> tuple[Tensor, Tensor]:
    """(logits, rates) (B, C) from the output streams (blocks R, C) of a line run."""
    b = t.shape[0]
    out = out.reshape(blocks, -1, *out.shape[1:]).expand(blocks, b, *out.shape[1:])
    return torch.addcmul(out[0], out[1], t.reshape(-1, *[1] * (out.dim() - 2))), out[1]


class _LineRun(_ConfigurationRun):
    """One run of :func:`configure_line`: every value is three stacked blocks ``[a; d; u]``
    of R rows each, R = 1 before the first gate (shared by all points) and B after it. The
    first block is the affine intercept (biases on), the others rates (no biases); gates
    act on all three blocks alike, as chosen from the values ``a + t d``.

    With a ``split``, the split node drops the u block (``blocks`` becomes 2; it keeps
    its u input in ``tail_u``) and the tail's gates decide on ``[a; d]``, marking in
    ``need_u`` the points with a tie only u would decide (see :func:`configure_line`).
    A run of the tail alone starts with ``blocks`` 2 or 3."""

    def __init__(self, program: Program, tol: Tolerances, t: Tensor, rows,
                 split: int | None = None, blocks: int = 3):
        super().__init__(program, tol, False, t.shape[0], 2, t.device)
        self.t = t
        self.rows = rows  # openbox.constraints: the exits of the rows
        self.split = split
        self.blocks = blocks
        self.exit_head = torch.full((t.shape[0],), torch.inf, dtype=t.dtype, device=t.device)
        self.exit_tail = self.exit_head.clone()
        self.guard_head = self.exit_head.clone()
        self.tail_value: Tensor | None = None
        self.tail_u: Tensor | None = None
        self.need_u: Tensor | None = None  # (B,) bool, with blocks == 2
        self.head_tight = (self.n_relu, self.n_pool)

    def _need_u(self, mask: Tensor) -> None:
        """Mark the points with any True in mask (B, ...): their tail needs u."""
        rows = any_rows(mask)
        self.need_u = rows if self.need_u is None else self.need_u | rows

    def _u_open(self, k: int, views) -> list[Tensor] | None:
        """For max-pool node k of a two-block run: per window position, the entries whose
        u rate may be nonzero (``views(mask)`` lays a (B, n_in) mask out as the pool's
        entries); None when every entry may. An entry of a ReLU output without negative
        slope that the ReLU switched off has u rate exactly 0."""
        j = self.program.nodes[k].inputs[0] - 1  # the node whose value it reads
        node = self.program.nodes[j] if j >= 0 else None
        if not isinstance(node, ReLU) or node.negative_slope or j not in self.on:
            return None
        return views(self.on[j].reshape(self.b, -1).contiguous())

    def _guarded(self, k: int) -> bool:
        """Gate node k is in the head of a run that keeps a tail: track its guard too."""
        return self.split is not None and k < self.split

    def _exit(self, k: int, t) -> None:
        """Fold the exit t (B,) of gate node k into the head's or the tail's (for a head
        gate of a run with a tail, t is the pair (exit, guard))."""
        if self.split is not None and k > self.split:
            self.exit_tail = torch.minimum(self.exit_tail, t)
        elif self._guarded(k):
            self.exit_head = torch.minimum(self.exit_head, t[0])
            self.guard_head = torch.minimum(self.guard_head, t[1])
        else:
            self.exit_head = torch.minimum(self.exit_head, t)

    def _tcol(self, dim: int) -> Tensor:
        return self.t.reshape(-1, *[1] * (dim - 1))

    def affine(self, k, node, x):
        if k == self.split and self.blocks == 3:
            r = x.shape[0] // 3
            self.tail_u = x[2 * r :]  # the tail runs on [a; d] (see configure_line)
            x = x[: 2 * r]
            self.blocks = 2
        y = node.op.apply(x)
        if node.bias is not None:
            y[: x.shape[0] // self.blocks] += node.bias
        if k == self.split:
            self.tail_value = y
            self.head_tight = (self.n_relu.clone(), self.n_pool.clone())
        return y

    def add(self, k, node, a, b):
        if a.shape[0] != b.shape[0]:  # one side still shared by all points
            nb = self.blocks
            a, b = (v.reshape(nb, -1, *v.shape[1:]).expand(nb, self.b, *v.shape[1:])
                    .reshape(nb * self.b, *v.shape[1:]) for v in (a, b))
        return node.forward(a, b)

    def relu(self, k, node: ReLU, x):
        xs = x.reshape(self.blocks, -1, *x.shape[1:])
        a, d = xs[0], xs[1]
        z = torch.addcmul(a, d, self._tcol(x.dim()))  # (B, *shape): the values at t
        if self.blocks == 3:
            on, tied = self._relu_on(z, (d, xs[2]))
        else:  # u deferred: a tie constant along d needs it
            on, tied, undecided = self._relu_on(z, (d,), rest=True)
            if undecided is not None:
                self._need_u(undecided)
        self.on[k] = on
        self._exit(k, self.rows.relu_line_exit(a, d, on, tied, self.tol, self._guarded(k)))
        slope = node.negative_slope
        # x * 1 or x * 0 with the mask's bytes: the same bits as the bool mask, faster
        out = torch.where(on, xs, xs * slope) if slope else xs * on.view(torch.uint8)
        return out.reshape(-1, *x.shape[1:])

    def maxpool(self, k, node: MaxPool, x):
        grid = _pool_grid(node)
        nb = self.blocks
        r = x.shape[0] // nb
        b = self.b
        a3 = x.reshape(nb, r, -1)
        z = torch.addcmul(a3[0], a3[1], self._tcol(2)).contiguous()  # (B, n_in)
        if grid is None:
            return self._maxpool_line_table(k, node, x, z)
        base, sizes, strides, offsets = grid
        n_in = z.shape[1]
        xflat = x.reshape(-1)

        def view(flat, r0, n, off):
            st = flat.storage_offset() + base + r0 * n_in + off
            return flat.as_strided((n, *sizes), (n_in if n > 1 else 0, *strides), st)

        zflat = z.reshape(-1)
        v = [view(zflat, 0, b, o) for o in offsets]
        value = v[0].clone() if len(v) == 1 else torch.maximum(v[0], v[1])
        for e in v[2:]:
            torch.maximum(value, e, out=value)
        av = [view(xflat, 0, r, o) for o in offsets]
        dv = [view(xflat, r, r, o) for o in offsets]
        if nb == 3:
            uv = [view(xflat, 2 * r, r, o) for o in offsets]
            sel, tied, _ = self._pool_choose(v, value, [dv, uv])
        else:  # u deferred: windows that d leaves tied need it, unless its rates are 0
            sel, tied, same = self._pool_choose(v, value, [dv])
            opened = self._u_open(k, lambda m: [view(m.reshape(-1), 0, b, o)
                                                for o in offsets])
            self._pool_need_u(same, same if opened is None else
                              [s & o for s, o in zip(same, opened)])
        out = self._line_selected(k, node, sel, a3, grid)
        a_s, d_s = (o.view(b, *sizes) for o in out[:2])
        guarded = self._guarded(k)
        band = self.rows.pool_guard_band(a_s, d_s, self.tol) if guarded else None
        for a_e, d_e, t_e in zip(av, dv, tied):
            self._exit(k, self.rows.pool_line_exit(a_e, d_e, a_s, d_s, t_e, self.tol,
                                                   guarded, band))
        return out.reshape(nb * b, *node.out_shape)

    def _pool_need_u(self, same, opened) -> None:
        """Mark the points with a window that d leaves tied (two or more ``same`` entries,
        K masks) where an entry's u rate may be nonzero (``opened``, K masks)."""
        if len(same) < 2:
            return
        count = same[0].to(torch.uint8)
        for s in same[1:]:
            count += s.view(torch.uint8)
        any_open = opened[0]
        for o in opened[1:]:
            any_open = any_open | o
        self._need_u((count >= 2) & any_open)

    def _line_selected(self, k, node: MaxPool, sel: Tensor, a3: Tensor, grid=None) -> Tensor:
        """Record the selection sel (B, n_out) of max-pool node k (``grid``: its
        :func:`_pool_grid`, if any) and return the streams a3 (blocks, R, n_in) at the
        selected entries: (blocks, B, n_out)."""
        if grid is not None:
            index = _grid_index(node, grid, sel)
        else:
            window = node.window.to(sel.device)
            index = window[torch.arange(window.shape[0], device=sel.device), sel]
        self.select[k] = sel
        self.index[k] = index
        nb = a3.shape[0]
        return torch.gather(a3.expand(nb, self.b, -1), 2,
                            index.unsqueeze(0).expand(nb, -1, -1))

    def _maxpool_line_table(self, k, node: MaxPool, x, z):
        """:meth:`maxpool` on a window table that is not a regular grid (padding, wide or
        irregular windows): the window entries gathered, -inf padding."""
        b = self.b
        nb = self.blocks
        r = x.shape[0] // nb
        zi = node.gather(z)  # (B, n_out, K)
        ent = node.gather(x).reshape(nb, r, *zi.shape[1:])  # (blocks, R, n_out, K)
        amax = zi.amax(dim=2, keepdim=True)
        if nb == 3:
            sel, tied, _ = self._pool_choose_dense(zi, amax, (ent[1], ent[2]))
        else:
            sel, tied, same = self._pool_choose_dense(zi, amax, (ent[1],))
            opened = self._u_open(k, lambda m: [node.gather(m.to(zi.dtype), fill=0.0) != 0])
            many = same.sum(dim=2) >= 2
            self._need_u(many & (same if opened is None else same & opened[0]).any(dim=2))
        out = self._line_selected(k, node, sel, x.reshape(nb, r, -1))
        self._exit(k, self.rows.pool_line_exit(
            ent[0], ent[1], out[0].unsqueeze(2), out[1].unsqueeze(2), tied, self.tol,
            self._guarded(k)))
        return out.reshape(nb * b, *node.out_shape)
