"""openbox: exact local linear classifiers, polytopes and region maps for piecewise-linear CNNs."""

from openbox import tolerances

__all__ = ["tolerances"]
