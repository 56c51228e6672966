"""Explainers: openbox's exact methods and the approximate ones, behind one call.

>>> from openbox import explainers
>>> explainers.names()
>>> r = explainers.get("lime", model, input_shape=(1, 28, 28)).explain(x, target)
>>> r.attribution, r.probability, r.seconds

See :mod:`openbox.explainers.base` for the interface and what it guarantees. Importing this
package imports no optional library: Captum and lime load when a method that needs them
is first used.
"""

from openbox.explainers import exact  # noqa: F401  (registers openbox, openbox-ig)
from openbox.explainers.base import (
    Attribution,
    Explainer,
    ExplainerError,
    Output,
    Surrogate,
    SurrogateSamples,
    UnsupportedModelError,
    explainer_class,
    get,
    names,
    register,
)

__all__ = [
    "Attribution", "Explainer", "ExplainerError", "Output", "Surrogate", "SurrogateSamples",
    "UnsupportedModelError", "explainer_class", "get", "names", "register",
]
