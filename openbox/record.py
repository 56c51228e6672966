"""The explanation record ``openbox explain`` writes: ``explanation.json`` and ``--save FILE.npz``.

The JSON record is built from the engine's own dataclasses (:class:`~openbox.Explanation`,
:class:`~openbox.VerificationReport`, :class:`~openbox.features.DecisionFeatures`,
:class:`~openbox.tolerances.Tolerances`) by :func:`plain`, which walks their fields and
properties: a field the engine adds shows up in the record without a change here.
Tensors of at most :data:`JSON_MAX_ELEMENTS` entries become lists; larger ones (W_x, the
input, gate patterns) are summarised by shape, dtype and range (or the count of True),
and are kept in full in the ``.npz`` file. JSON has no inf or NaN: they become null.

The ``.npz`` file (:func:`save_npz`; read it with ``numpy.load(path)``, no pickle
needed) holds, for the explained input x and C classes:

============================  ===================  =========================================
key                           shape, dtype         meaning
============================  ===================  =========================================
weight                        (C, *input_shape)    W_x, one row per class
bias                          (C,)                 b_x
logits                        (C,)                 the network's output at x
input                         (*input_shape)       x
prediction, target            () int64             predicted class; the class explained
versus                        () str               ``"rest"`` or the contrasted class index
contrast                      (*input_shape)       W_x[target] - mean of the others (or W_x[c'])
bias_gap, logit_gap           () float64           b_x gap; (contrast . x) + bias_gap
region_key                    (K,) uint8           the packed configuration (the key's bytes)
region_key_digest             () str               str(region_key), as the JSON shows it
certified_radius_l2, _linf    () float64           largest ball around x in its region (inf
                                                   when unbounded, 0 on a facet)
n_tight                       () int64             facets x lies on
max_abs_error, verified       () float64, () bool  the verification of this LLC
label                         () int64             the true class (-1 if unknown)
class_names                   (C,) str             (only when known)
============================  ===================  =========================================

Arrays are in the working dtype (float64 unless ``--dtype float32``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from openbox.engine import Explanation, VerificationReport
from openbox.features import REST, DecisionFeatures

__all__ = ["FORMAT", "JSON_MAX_ELEMENTS", "explanation_record", "plain", "row", "save_npz"]

FORMAT = "openbox-explanation"
VERSION = 1
JSON_MAX_ELEMENTS = 64
"""Tensors with more entries than this are summarised in JSON (the .npz holds them)."""
TIE_BREAK = ("configuration at x + t u for small t > 0, u = "
             "openbox.configuration.tie_break_direction")
RADIUS_NOTE = ("largest ball around x inside its region (the network's own constraints; the "
               "input domain is not one); 0 when x lies on a facet")


def _version() -> str | None:
    try:
        return metadata.version("openbox")
    except metadata.PackageNotFoundError:
        return None


def _number(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def _summary(a: np.ndarray) -> dict[str, Any]:
    out: dict[str, Any] = {"shape": list(a.shape), "dtype": str(a.dtype)}
    if a.dtype == np.bool_:
        out["n_true"] = int(a.sum())
    elif a.size and a.dtype.kind in "iu":
        out["min"], out["max"] = int(a.min()), int(a.max())
    elif a.size:
        out["min"], out["max"] = _number(float(a.min())), _number(float(a.max()))
    return out


def _properties(obj) -> list[str]:
    """Public properties defined on obj's class (and bases), in definition order."""
    names: list[str] = []
    for klass in reversed(type(obj).__mro__):
        for name, value in vars(klass).items():
            if isinstance(value, property) and not name.startswith("_") and name not in names:
                names.append(name)
    return names


def _items(obj) -> list[tuple[str, Any]]:
    """(name, value) of a dataclass's fields, then of its public properties."""
    fields = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
    taken = {name for name, _ in fields}
    return fields + [(name, getattr(obj, name)) for name in _properties(obj) if name not in taken]


def plain(value: Any, *, max_elements: int = JSON_MAX_ELEMENTS) -> Any:
    """``value`` as JSON data: dataclasses as dicts of their fields and properties,
    small tensors / arrays as lists, large ones as a summary, dtypes and region keys as
    strings, non-finite floats as None."""
    def go(v):
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return {name: go(x) for name, x in _items(v)}
        if isinstance(v, torch.Tensor):
            v = v.detach().to("cpu").numpy()
        if isinstance(v, np.ndarray):
            if v.size > max_elements:
                return _summary(v)
            return go(v.tolist())
        if isinstance(v, np.generic):
            return go(v.item())
        if isinstance(v, bool) or v is None or isinstance(v, (int, str)):
            return v
        if isinstance(v, float):
            return _number(v)
        if isinstance(v, torch.dtype):
            return str(v).removeprefix("torch.")
        if isinstance(v, (bytes, bytearray)):
            return bytes(v).hex()
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, Mapping):
            return {str(k): go(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [go(x) for x in v]
        return str(v)  # e.g. a RegionKey: its digest

    return go(value)


def row(batched, i: int = 0) -> dict[str, Any]:
    """Input i of a batched dataclass (fields and properties batch-first, as Explanation,
    VerificationReport and Configuration have them) as a dict of per-input values:
    tensors ``t[i]``, length-B tuples ``t[i]``, nested dataclasses and dicts likewise."""
    items = dict(_items(batched))
    batch = len(batched.region_key) if isinstance(batched, Explanation) else next(
        (int(v.shape[0]) for v in items.values() if isinstance(v, torch.Tensor) and v.dim()),
        None,
    )

    def pick(v):
        if isinstance(v, torch.Tensor):
            return v[i] if v.dim() and v.shape[0] == batch else v
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            return row(v, i)
        if isinstance(v, Mapping):
            return {k: pick(x) for k, x in v.items()}
        if isinstance(v, tuple) and len(v) == batch:
            return v[i]
        return v

    return {name: pick(v) for name, v in items.items()}


def _name(c, names: Sequence[str] | None) -> str:
    if c == REST:
        return REST
    return names[c] if names is not None and 0 <= c < len(names) else f"class {c}"


def explanation_record(
    *,
    model: Mapping[str, Any],
    input: Mapping[str, Any],
    label: int | None,
    class_names: Sequence[str] | None,
    explanation: Explanation,
    report: VerificationReport,
    features: DecisionFeatures,
    polytope,
    radii: tuple[float, float],
    inscribed: tuple[float | None, str],
    tolerances,
    dtype: torch.dtype,
) -> dict[str, Any]:
    """The JSON record of one explained input (a batch of one).

    Args:
        model: provenance of the model (e.g. :attr:`openbox.loading.LoadedModel.provenance`
            plus its description).
        input: where x came from (data set and index, or image file).
        label: the true class, or None when unknown.
        class_names: names indexed by class, or None.
        explanation, report: of the one input.
        features: its decision features.
        polytope: ``ob.polytope(x[0])`` (sizes only go in the record).
        radii: certified (L2, L-inf) radius.
        inscribed: (Chebyshev radius or None, a note saying how or why not).
        tolerances: the OpenBox's :class:`~openbox.tolerances.Tolerances`.
        dtype: the working dtype.
    """
    e = row(explanation, 0)
    predicted = int(e["prediction"])
    f = plain(features)
    f["target_name"] = _name(features.target, class_names)
    f["versus_name"] = _name(features.versus, class_names)
    return {
        "format": FORMAT,
        "version": VERSION,
        "openbox_version": _version(),
        "model": plain(model),
        "input": plain(input),
        "label": label,
        "label_name": None if label is None else _name(label, class_names),
        "predicted": predicted,
        "predicted_name": _name(predicted, class_names),
        "correct": None if label is None else predicted == label,
        "class_names": None if class_names is None else list(class_names),
        "dtype": plain(dtype),
        "region_key": str(e["region_key"]),
        "certified_radius": {"l2": _number(radii[0]), "linf": _number(radii[1]),
                             "note": RADIUS_NOTE},
        "inscribed_radius": {"value": None if inscribed[0] is None else _number(inscribed[0]),
                             "note": inscribed[1]},
        "explanation": plain(e),
        "verification": plain(row(report, 0)),
        "decision_features": f,
        "polytope": {
            "n_constraints": int(polytope.n_constraints),
            "n_zero_rows_dropped": int(polytope.n_dropped),
            "n_inputs": int(polytope.A.shape[1]),
            "domain": None if polytope.domain is None else [
                _number(float(np.min(polytope.domain[0]))),
                _number(float(np.max(polytope.domain[1])))],
            "nbytes": int(polytope.nbytes),
        },
        "tolerances": plain(tolerances),
        "tie_break": TIE_BREAK,
    }


def save_npz(
    path: str | Path,
    *,
    explanation: Explanation,
    features: DecisionFeatures,
    radii: tuple[float, float],
    report: VerificationReport,
    label: int | None = None,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write the arrays of one explained input (a batch of one) to ``path`` with
    :func:`numpy.savez` (keys in the module docstring). Returns the path."""
    def arr(t: torch.Tensor) -> np.ndarray:
        return t.detach().to("cpu").numpy()

    key = explanation.region_key[0]
    arrays: dict[str, np.ndarray] = {
        "weight": arr(explanation.weight[0]),
        "bias": arr(explanation.bias[0]),
        "logits": arr(explanation.logits[0]),
        "input": arr(explanation.inputs[0]),
        "prediction": np.int64(int(explanation.prediction[0])),
        "target": np.int64(features.target),
        "versus": np.str_(str(features.versus)),
        "contrast": arr(features.contrast),
        "bias_gap": np.float64(features.bias_gap),
        "logit_gap": np.float64(features.logit_gap),
        "region_key": np.frombuffer(bytes(key), dtype=np.uint8),
        "region_key_digest": np.str_(str(key)),
        "certified_radius_l2": np.float64(radii[0]),
        "certified_radius_linf": np.float64(radii[1]),
        "n_tight": np.int64(int(explanation.n_tight[0])),
        "max_abs_error": np.float64(float(torch.maximum(report.llc_error[0],
                                                        report.program_error[0]))),
        "verified": np.bool_(bool(report.passed[0])),
        "label": np.int64(-1 if label is None else label),
    }
    if class_names is not None:
        arrays["class_names"] = np.array([str(n) for n in class_names], dtype=np.str_)
    path = Path(path)
    with path.open("wb") as f:  # a file object: savez would append .npz to a bare name
        np.savez(f, **arrays)
    return path
