"""openbox: exact local linear classifiers, polytopes and region maps for piecewise-linear CNNs.

>>> ob = openbox.OpenBox(model, input_shape=(1, 28, 28), dtype=torch.float64)
>>> e = ob.explain(x)              # e.weight (B, C, 1, 28, 28), e.bias (B, C), e.region_key
>>> ob.polytope(x[0]).radius(2)    # largest L2 ball around x[0] on which W x + b is the network
>>> ob.verify(x).ok
"""

from openbox import features, geometry, regions, tolerances
from openbox.configuration import Configuration, RegionKey, tie_break_direction
from openbox.constraints import RadiusPair
from openbox.engine import Explanation, OpenBox, VerificationReport
from openbox.geometry import Polytope

_LAZY = ("explainers", "metrics", "fmnist", "plotting", "record", "loading", "cli")
"""Submodules imported on first attribute access (``openbox.fmnist.load_sample()`` works
after a plain ``import openbox``) so that the engine does not pay for matplotlib or the
dataset kit unless they are used (``explainers`` and ``metrics`` are light, but their
adapters load Captum / lime on first use)."""


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return importlib.import_module(f"openbox.{name}")
    raise AttributeError(f"module 'openbox' has no attribute {name!r}")


__all__ = [
    "Configuration",
    "Explanation",
    "features",
    "geometry",
    "OpenBox",
    "Polytope",
    "RadiusPair",
    "RegionKey",
    "VerificationReport",
    "regions",
    "tie_break_direction",
    "tolerances",
]
