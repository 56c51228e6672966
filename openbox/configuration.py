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
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from linearize import Interpreter, MaxPool, Program, ReLU
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


class RegionKey:
    """Hashable, canonical encoding of one input's configuration.

    Equal keys <=> equal configurations: the key holds the packed configuration
    itself (ReLU signs as bits, max-pool selections as window positions), not a
    digest. ``str(key)`` shows a short digest for display.
    """

    __slots__ = ("_bytes", "_hash")

    def __init__(self, packed: bytes):
        self._bytes = packed
        self._hash = hash(packed)

    def __eq__(self, other) -> bool:
        return isinstance(other, RegionKey) and self._bytes == other._bytes

    def __hash__(self) -> int:
        return self._hash

    def __bytes__(self) -> bytes:
        return self._bytes

    @property
    def digest(self) -> str:
        """16 hex characters of a BLAKE2b digest: for display, not for equality."""
        return hashlib.blake2b(self._bytes, digest_size=8).hexdigest()

    def __repr__(self) -> str:
        return f"RegionKey({self.digest})"

    __str__ = digest.fget  # type: ignore[assignment]


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
    """

    on: dict[int, Tensor]
    select: dict[int, Tensor]
    index: dict[int, Tensor]
    n_tight_relu: Tensor
    n_tight_pool: Tensor

    @property
    def batch_size(self) -> int:
        return int(self.n_tight_relu.shape[0])

    @property
    def n_tight(self) -> Tensor:
        """(B,) int64: facets x lies on (tied gate inputs between different functions)."""
        return self.n_tight_relu + self.n_tight_pool

    def __getitem__(self, index) -> Configuration:
        """Sub-batch: ``config[i:j]`` or ``config[[i, k]]`` (keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Configuration(
            {k: v[index] for k, v in self.on.items()},
            {k: v[index] for k, v in self.select.items()},
            {k: v[index] for k, v in self.index.items()},
            self.n_tight_relu[index],
            self.n_tight_pool[index],
        )

    def region_keys(self) -> tuple[RegionKey, ...]:
        """One canonical key per input."""
        parts = []
        for k in sorted(set(self.on) | set(self.select)):
            if k in self.on:
                bits = self.on[k].reshape(self.batch_size, -1).cpu().numpy()
                parts.append(np.packbits(bits, axis=1))
            else:
                sel = self.select[k].cpu().numpy()
                dt = np.uint8 if sel.size == 0 or sel.max() < 256 else np.uint16
                parts.append(sel.astype(dt).view(np.uint8).reshape(self.batch_size, -1))
        packed = np.concatenate(parts, axis=1) if parts else np.zeros((self.batch_size, 0))
        return tuple(RegionKey(row.tobytes()) for row in packed)

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
        )


def _near_max(a: Tensor, amax: Tensor, tol: float) -> Tensor:
    """a within ``tol * (1 + |amax|)`` below its maximum amax (-inf entries never are)."""
    return (amax - a) <= tol * (1 + amax.abs())


class ConfigurationPass(Interpreter):
    """Forward pass of values and directional derivatives that fixes every gate.

    Runs on a stacked batch ``[x; u]`` of shape (2B, ...) where the second half
    carries the directional derivatives along u (no biases). Values follow the
    network itself (plain ReLU / max); derivatives follow the chosen gates.
    Optionally records every gate input's value and derivative, (B, *in_shape)
    each, in ``gate_inputs`` and ``gate_derivatives``.
    """

    def __init__(self, program: Program, tol: Tolerances, record_gate_inputs: bool = False):
        self.program = program
        self.tol = tol
        self.record = record_gate_inputs
        self.gate_inputs: dict[int, Tensor] = {}
        self.gate_derivatives: dict[int, Tensor] = {}
        self.on: dict[int, Tensor] = {}
        self.select: dict[int, Tensor] = {}
        self.index: dict[int, Tensor] = {}
        self.n_relu: Tensor | None = None
        self.n_pool: Tensor | None = None

    def configure(self, x: Tensor, direction: Tensor) -> tuple[Tensor, Configuration]:
        """x (B, *input_shape), direction (*input_shape) -> (logits (B, C), configuration)."""
        b = x.shape[0]
        self.n_relu = torch.zeros(b, dtype=torch.int64, device=x.device)
        self.n_pool = torch.zeros(b, dtype=torch.int64, device=x.device)
        stacked = torch.cat([x, direction.expand_as(x)])
        out = self.run(self.program, stacked)
        config = Configuration(self.on, self.select, self.index, self.n_relu, self.n_pool)
        return out[:b], config

    def affine(self, k, node, x):
        y = node.op.apply(x)
        if node.bias is not None:
            b = x.shape[0] // 2
            y[:b] += node.bias
        return y

    def relu(self, k, node: ReLU, x):
        b = x.shape[0] // 2
        z, dz = x[:b], x[b:]
        if self.record:
            self.gate_inputs[k], self.gate_derivatives[k] = z, dz
        on = z > 0
        tied = z.abs() <= self.tol.tie
        if bool(tied.any()):
            on = torch.where(tied, dz > self.tol.same_function, on)
            moving = dz.abs() > self.tol.same_function
            self.n_relu += (tied & moving).reshape(b, -1).sum(1)
        self.on[k] = on
        out = torch.empty_like(x)
        slope = node.negative_slope
        if slope:
            out[:b] = node.forward(z)
            torch.where(on, dz, dz * slope, out=out[b:])
        else:
            torch.clamp_min(z, 0, out=out[:b])
            torch.mul(dz, on, out=out[b:])
        return out

    def maxpool(self, k, node: MaxPool, x):
        b = x.shape[0] // 2
        if self.record:
            self.gate_inputs[k], self.gate_derivatives[k] = x[:b], x[b:]
        entries = node.gather(x)  # (2B, n_out, K), padding -inf
        v, dv = entries[:b], entries[b:]
        out = x.new_empty((2 * b, *node.out_shape))
        value = out[:b].view(b, -1, 1)
        torch.amax(v, dim=2, keepdim=True, out=value)
        tied = _near_max(v, value, self.tol.tie)
        dv_masked = torch.where(tied, dv, torch.full_like(dv, -torch.inf))
        dmax = dv_masked.amax(dim=2, keepdim=True)
        same = tied & _near_max(dv_masked, dmax, self.tol.same_function)
        sel = same.to(torch.uint8).argmax(dim=2)  # first True: lowest window position
        self.select[k] = sel
        window = node.window.to(sel.device)
        self.index[k] = window[torch.arange(window.shape[0], device=sel.device), sel]
        self.n_pool += (tied & ~same).reshape(b, -1).sum(1)
        torch.gather(dv, 2, sel.unsqueeze(2), out=out[b:].view(b, -1, 1))
        return out
