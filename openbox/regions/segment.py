"""Walking the partition of input space into linear regions.

:func:`segment` follows the straight line from x0 to x1 and returns the exact
pieces on which the network is one affine map, with the breakpoints where the
line crosses a facet.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor
from tqdm.auto import tqdm

from openbox.configuration import RegionKey, configure
from openbox.constraints import step_along


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


def segment(
    ob, x0: Tensor, x1: Tensor, *, max_pieces: int = 100_000, progress: bool | None = None
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

    Returns:
        Ordered pieces covering [0, 1]: ``pieces[0].t_start == 0``,
        ``pieces[i].t_end == pieces[i + 1].t_start``, ``pieces[-1].t_end == 1``.
        A piece's key is the configuration of the region the piece's interior lies in
        (as ``ob.explain(x).region_key`` for x inside the piece and off every facet).
    """
    x0 = ob.check_point(x0, "x0 (the segment's start)")
    x1 = ob.check_point(x1, "x1 (the segment's end)")
    direction = (x1 - x0)[0]
    if not bool(direction.abs().sum() > 0):
        raise ValueError("x0 and x1 are the same point; a segment needs two distinct ends")

    directions = torch.stack([direction, ob.direction])
    pieces: list[Piece] = []
    t = 0.0
    bar = tqdm(total=1.0, desc="segment", unit="t", leave=False,
               disable=not (True if progress is None else progress),
               bar_format="{l_bar}{bar}| t={n:.4f} [{elapsed}, {postfix}]")
    with bar:
        while t < 1.0:
            x = x0 + t * (x1 - x0)
            _, config, gates = configure(ob.program, x, directions, ob.tol, record=True,
                                         context=ob.key_context)
            key = config.region_keys()[0]
            dt = float(step_along(ob.program, config, gates, ob.tol)[0])
            t_next = min(1.0, t + dt)
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
            bar.update(t_next - t)
            bar.set_postfix_str(f"{len(pieces)} pieces", refresh=False)
            t = t_next
    return pieces
