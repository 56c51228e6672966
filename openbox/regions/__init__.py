"""Walks of the partition of input space into linear regions.

:func:`segment` follows a straight line and returns its exact linear pieces. Every walk
builds on the engine's public API and on the row primitives of :mod:`openbox.constraints`
(the one owner of "a gate row": orientation, slack, rows along a direction).
"""

from openbox.regions.segment import Piece, segment

__all__ = ["Piece", "segment"]
