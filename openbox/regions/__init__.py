"""Walks of the partition of input space into linear regions.

:func:`segment` follows a straight line and returns its exact linear pieces; :func:`plane`
maps a 2-D slice into exact polygons; :func:`census` counts the regions a dataset falls
into; :func:`counterfactual` finds the nearest point past the decision boundary region by region;
:func:`box` finds every region meeting a small box and :func:`equivalent` decides
whether two networks compute the same function there (or on a segment or plane);
:func:`integrated_gradients` sums the path integral over those pieces (exact IG), also
behind Captum's interface as :class:`ExactIntegratedGradients`. Every walk builds on
the engine's public API and on the row primitives of :mod:`openbox.constraints` (the one
owner of "a gate row": orientation, slack, rows along a direction).
"""

from openbox.regions.box import BoxRegion, BoxSearch, box
from openbox.regions.census import Census, census
from openbox.regions.counterfactual import Counterfactual, counterfactual
from openbox.regions.equivalence import (
    Equivalence,
    equivalent,
    equivalent_on_plane,
    equivalent_on_segment,
)
from openbox.regions.integrated_gradients import ExactIntegratedGradients, integrated_gradients
from openbox.regions.plane import PlaneMap, Polygon, plane
from openbox.regions.segment import Piece, segment

__all__ = [
    "BoxRegion", "BoxSearch", "Census", "Counterfactual", "Equivalence",
    "ExactIntegratedGradients", "Piece", "PlaneMap", "Polygon", "box", "census",
    "counterfactual", "equivalent", "equivalent_on_plane", "equivalent_on_segment",
    "integrated_gradients", "plane", "segment",
]
