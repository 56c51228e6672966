"""Walking the partition of input space into linear regions.

:func:`segment` follows the straight line from x0 to x1 and returns the exact
pieces on which the network is one affine map, with the breakpoints where the
line crosses a facet.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from linearize import ReLU
from openbox.configuration import ConfigurationPass, RegionKey


class Piece(NamedTuple):
    """One piece of a segment: ``x0 + t (x1 - x0)`` for t in [t_start, t_end] lies in
    the closure of one region.

    Attributes:
        t_start, t_end: the piece's ends, 0 <= t_start < t_end <= 1.
        region_key: the region's key (as :attr:`Explanation.region_key`).
        prediction: the predicted class at the piece's midpoint.
    """

    t_start: float
    t_end: float
    region_key: RegionKey
    prediction: int


def _step(gate_nodes, cp: ConfigurationPass, config) -> float:
    """Largest dt with every gate constraint still satisfied along the direction.

    Each constraint's slack is affine in t inside the region: s + dt * ds. Only
    constraints with ds < 0 can run out; the tie-break along the direction makes
    tied constraints have ds >= 0.
    """
    best = float("inf")
    for k, node in gate_nodes:
        z = cp.gate_inputs[k].reshape(-1)
        dz = cp.gate_derivatives[k].reshape(-1)
        if isinstance(node, ReLU):
            sign = torch.where(config.on[k].reshape(-1), 1.0, -1.0).to(z.dtype)
            slack, rate = sign * z, sign * dz
        else:
            window = node.window.to(z.device)
            j = config.index[k][0]  # (n_out,)
            valid = window >= 0
            idx = window.clamp_min(0)
            slack = (z[j][:, None] - z[idx])[valid]
            rate = (dz[j][:, None] - dz[idx])[valid]
        falling = rate < 0
        if bool(falling.any()):
            best = min(best, float((slack[falling].clamp_min(0) / -rate[falling]).min()))
    return best


def segment(ob, x0: Tensor, x1: Tensor, *, max_pieces: int = 100_000) -> list[Piece]:
    """The exact linear pieces of the network along the segment from x0 to x1.

    At each point the configuration is taken with the segment's own direction as
    the tie-break (:mod:`openbox.configuration`), i.e. the region the line enters;
    the next breakpoint is where the first gate constraint of that region reaches
    zero. Consecutive pieces with equal keys are merged.

    Args:
        ob: an :class:`~openbox.OpenBox`.
        x0, x1: (*input_shape) endpoints, in the OpenBox's dtype and device.
        max_pieces: stop with RuntimeError beyond this many pieces.

    Returns:
        Ordered pieces covering [0, 1]: ``pieces[0].t_start == 0``,
        ``pieces[i].t_end == pieces[i + 1].t_start``, ``pieces[-1].t_end == 1``.
    """
    x0 = ob._check_one(x0)
    x1 = ob._check_one(x1)
    direction = (x1 - x0)[0]
    if not bool(direction.abs().sum() > 0):
        raise ValueError("x0 and x1 are the same point; a segment needs two distinct ends")
    gate_nodes = [(k, ob.program.nodes[k]) for k in ob.program.gates]
    pieces: list[Piece] = []
    t = 0.0
    while t < 1.0:
        x = x0 + t * (x1 - x0)
        cp = ConfigurationPass(ob.program, ob.tol, record_gate_inputs=True)
        with torch.no_grad():
            _, config = cp.configure(x, direction)
        key = config.region_keys()[0]
        t_next = min(1.0, t + _step(gate_nodes, cp, config))
        if t_next <= t:  # rounding left us just short of the facet: nudge past it
            t_next = min(1.0, t + max(abs(t), 1.0) * torch.finfo(x.dtype).eps * 16)
        with torch.no_grad():
            mid = ob.program(x0 + 0.5 * (t + t_next) * (x1 - x0))
        pred = int(mid.argmax(dim=1)[0])
        if pieces and pieces[-1].region_key == key:
            pieces[-1] = pieces[-1]._replace(t_end=t_next)
        else:
            pieces.append(Piece(t, t_next, key, pred))
        if len(pieces) > max_pieces:
            raise RuntimeError(f"segment has more than {max_pieces} pieces; raise max_pieces")
        t = t_next
    return pieces
