"""Explainers: openbox's exact methods and the approximate ones, behind one call.

>>> from openbox import explainers
>>> explainers.names()
>>> r = explainers.get("lime", model, input_shape=(1, 28, 28)).explain(x, target)
>>> r.attribution, r.probability, r.seconds

See :mod:`openbox.explainers.base` for the interface and what it guarantees. Importing this
package imports no optional library: Captum and lime load when a method that needs them
is first used.
"""

import importlib

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

METHOD_MODULES = (
    "exact",                    # openbox, openbox-ig
    "lime_image",               # lime
    "captum_perturbation",      # lime-patches, kernelshap, occlusion
    "captum_gradients",         # saliency, input-x-gradient, integrated-gradients, smoothgrad,
                                # guided-backprop, deconvolution, deeplift
    "captum_lrp",               # lrp
    "captum_cam",               # gradcam, guided-gradcam, cam
    "meaningful_perturbation",  # meaningful-perturbation
)
"""The modules whose classes register on import; :func:`names` lists methods in this order."""

for _module in METHOD_MODULES:
    importlib.import_module(f"openbox.explainers.{_module}")

__all__ = [
    "Attribution", "Explainer", "ExplainerError", "Output", "Surrogate", "SurrogateSamples",
    "UnsupportedModelError", "explainer_class", "get", "names", "register",
]
