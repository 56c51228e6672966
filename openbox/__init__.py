"""openbox: exact local linear classifiers, polytopes and region maps for piecewise-linear CNNs.

>>> ob = openbox.OpenBox(model, input_shape=(1, 28, 28), dtype=torch.float64)
>>> e = ob.explain(x)              # e.weight (B, C, 1, 28, 28), e.bias (B, C), e.region_key
>>> ob.polytope(x[0]).radius(2)    # largest L2 ball around x[0] on which W x + b is the network
>>> ob.verify(x).ok
"""

from openbox import features, regions, tolerances
from openbox.configuration import Configuration, RegionKey, tie_break_direction
from openbox.engine import Explanation, OpenBox, VerificationReport
from openbox.geometry import Polytope

__all__ = [
    "Configuration",
    "Explanation",
    "features",
    "OpenBox",
    "Polytope",
    "RegionKey",
    "VerificationReport",
    "regions",
    "tie_break_direction",
    "tolerances",
]
