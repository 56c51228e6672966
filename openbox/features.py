"""Decision features: what the network's own linear classifier at x weighs, per pixel.

Inside the region of x the network *is* ``f(x') = W_x x' + b_x`` (:class:`~openbox.Explanation`).
Following OpenBox (Chu et al., KDD 2018), the decision features of a class c are the
weights ``W_x[c]`` (shaped like the input) and their contrast against other classes:

* ``versus="rest"`` (default): ``contrast = W_x[c] - mean_{c' != c} W_x[c']``, what raises
  the score of c relative to the average of the others;
* ``versus=c'`` (a class index): ``contrast = W_x[c] - W_x[c']``, what separates c from c'.

Positive features are the pixels whose increase favours c (``contrast > 0``), negative
features those whose increase favours the others (``contrast < 0``); both are stored
as non-negative magnitudes, so ``contrast == positive - negative``.

The contrast explains the logit gap *exactly* (no approximation, unlike a gradient
attribution's completeness gap): ``(contrast * x).sum() + bias_gap`` equals
``logits[c] - mean_{c' != c} logits[c']`` (or ``logits[c] - logits[c']``), up to the
rounding of the working dtype. :attr:`DecisionFeatures.delta` reports the difference.

>>> e = ob.explain(x)
>>> feats = openbox.features.decision_features(e, index=0)          # predicted class vs rest
>>> feats.positive.shape == x.shape[1:], feats.logit_gap, feats.delta
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch import Tensor

from openbox.engine import Explanation

__all__ = ["DecisionFeatures", "decision_features"]

REST = "rest"


@dataclass(frozen=True, eq=False)
class DecisionFeatures:
    """Decision features of one input for one class (see the module docstring).

    Tensors are in the explanation's dtype and device, each shaped like one input
    ``(*input_shape)``, e.g. (1, 28, 28).

    Attributes:
        target: the explained class c.
        versus: ``"rest"`` (mean of the other classes) or the class index c'.
        weight: ``W_x[c]``, the class's own weights.
        contrast: ``W_x[c] - mean_{c' != c} W_x[c']`` (or ``W_x[c] - W_x[c']``).
        positive: ``max(contrast, 0)``: pixels whose increase favours c.
        negative: ``max(-contrast, 0)``: pixels whose increase favours the others.
        input: the explained input x.
        bias_gap: ``b_x[c]`` minus the matching combination of the other biases.
        logit_gap: ``(contrast * x).sum() + bias_gap``, the gap computed by the LLC.
        model_gap: the same gap from the network's logits at x.
        prediction: the class the network predicts at x.
    """

    target: int
    versus: str | int
    weight: Tensor
    contrast: Tensor
    positive: Tensor
    negative: Tensor
    input: Tensor
    bias_gap: float
    logit_gap: float
    model_gap: float
    prediction: int

    @property
    def delta(self) -> float:
        """``logit_gap - model_gap``: how far the LLC's account is from the network (~1e-14
        in float64, i.e. rounding; it is exact in exact arithmetic)."""
        return self.logit_gap - self.model_gap

    def __repr__(self) -> str:
        return (
            f"DecisionFeatures(target={self.target}, versus={self.versus!r}, "
            f"input_shape={tuple(self.weight.shape)}, logit_gap={self.logit_gap:.6g}, "
            f"delta={self.delta:.2e})"
        )


def _index(value, size: int, name: str, what: str) -> int:
    """``value`` as an int in 0..size-1 (ints, numpy ints, 0-d integer tensors)."""
    try:
        if isinstance(value, bool):
            raise TypeError
        index = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an integer 0..{size - 1}, got {value!r}") from None
    if not 0 <= index < size:
        raise ValueError(f"{name} {index} out of range: {what} (0..{size - 1})")
    return index


def decision_features(
    explanation: Explanation,
    index: int = 0,
    target: int | None = None,
    versus: str | int = REST,
) -> DecisionFeatures:
    """Decision features of input ``index`` of an explanation, for class ``target``.

    Args:
        explanation: from :meth:`openbox.OpenBox.explain`; weight (B, C, *input_shape).
        index: which input of the batch, 0..B-1.
        target: the class c; default the class the network predicts at that input.
        versus: ``"rest"`` (the mean of the other C - 1 classes) or a class index c' != c.

    Returns:
        :class:`DecisionFeatures`; its tensors are (*input_shape).

    Raises:
        ValueError: index or a class out of range, ``versus == target``, or fewer than
            two classes.
    """
    batch, num_classes = explanation.weight.shape[:2]
    index = _index(index, batch, "index", f"the explanation holds {batch} inputs")
    if num_classes < 2:
        raise ValueError("decision features contrast classes; this model has one output")
    logits = explanation.logits[index]
    prediction = int(logits.argmax())
    classes = f"{num_classes} classes"
    c = prediction if target is None else _index(target, num_classes, "target", classes)
    w = explanation.weight[index]  # (C, *input_shape)
    b = explanation.bias[index]  # (C,)

    if isinstance(versus, str):
        if versus != REST:
            raise ValueError(f"versus must be {REST!r} or a class index, got {versus!r}")
        # combination of the classes: +1 for c, -1/(C-1) for every other class
        mix = torch.full((num_classes,), -1.0 / (num_classes - 1), dtype=w.dtype,
                         device=w.device)
        mix[c] = 1.0
    else:
        other = _index(versus, num_classes, "versus", classes)
        if other == c:
            raise ValueError(f"versus must differ from target; both are class {c}")
        versus = other
        mix = torch.zeros(num_classes, dtype=w.dtype, device=w.device)
        mix[c], mix[other] = 1.0, -1.0

    contrast = torch.tensordot(mix, w, dims=1)  # (*input_shape)
    x = explanation.inputs[index]
    bias_gap = float(mix @ b)
    return DecisionFeatures(
        target=c,
        versus=versus,
        weight=w[c],
        contrast=contrast,
        positive=contrast.clamp_min(0),
        negative=(-contrast).clamp_min(0),
        input=x,
        bias_gap=bias_gap,
        logit_gap=float((contrast * x).sum()) + bias_gap,
        model_gap=float(mix @ logits),
        prediction=prediction,
    )
