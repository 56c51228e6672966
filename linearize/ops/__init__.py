"""One module per layer family: its linear operator (if any) and its lowerings.

Importing this package registers every lowering.
"""

from linearize.ops import activation, add, batchnorm, conv, linear, pool, shape  # noqa: F401
from linearize.ops.batchnorm import ChannelScale
from linearize.ops.conv import Conv
from linearize.ops.linear import Dense
from linearize.ops.pool import AdaptiveAvgPool, AvgPool
from linearize.ops.shape import Reshape

OPERATOR_FAMILIES = (Dense, Conv, ChannelScale, AvgPool, AdaptiveAvgPool, Reshape)

__all__ = [
    "OPERATOR_FAMILIES", "AdaptiveAvgPool", "AvgPool", "ChannelScale", "Conv", "Dense", "Reshape",
]
