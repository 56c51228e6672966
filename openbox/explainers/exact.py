"""openbox's own exact methods behind the explainer interface.

- ``openbox``: the row ``W_x[target]`` of the exact local linear classifier, and the exact
  ``probability = softmax(W_x x + b_x)[target]`` (equal to the model's own to rounding, since
  ``W_x x + b_x = f(x)``). Its surrogate is the LLC itself: ``softmax(W_x x' + b_x)[target]``,
  which is the network on the region of x and nothing outside it.
- ``openbox-ig``: exact integrated gradients (:func:`openbox.regions.integrated_gradients`),
  the path integral summed over the straight path's linear pieces; no local model.
"""

from __future__ import annotations

import torch
from torch import Tensor

from openbox.engine import OpenBox
from openbox.explainers.base import Explainer, Output, Surrogate, register
from openbox.regions.integrated_gradients import integrated_gradients


class _Exact(Explainer):
    default_dtype = torch.float64

    def setup(self) -> None:
        self.openbox = OpenBox(self.model, self.input_shape, dtype=self.dtype,
                               device=self.device, domain=self.config["domain"],
                               batch_size=self.config["batch_size"])


@register
class OpenBoxLLC(_Exact):
    """``openbox``: W_x[target] of the exact local linear classifier.

    Options:
        domain: input box declared to the :class:`~openbox.OpenBox` (default None: none).
        batch_size: inputs per internal batch (default 64).

    ``probability`` is softmax(W_x x + b_x)[target], exact. ``surrogates[b].predict(x')`` is
    softmax(W_x x' + b_x)[target]: the network wherever x' lies in x's region.
    ``info``: ``region_key`` (B RegionKeys), ``n_tight`` (B,) facets x lies on, and
    ``explanation`` (the engine's :class:`~openbox.Explanation`).
    """

    name = "openbox"
    summary = "exact local linear classifier W_x[target] (openbox)"
    local_model = True
    options = {"domain": None, "batch_size": 64}

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        e = self.openbox.explain(x, progress=self._show(x))
        rows = torch.arange(x.shape[0], device=x.device)
        weight = e.weight[rows, target]                       # (B, *input_shape)
        prob = torch.softmax(e.predict(x), dim=1)[rows, target]
        surrogates = [
            Surrogate(_llc_predict(e.weight[b], e.bias[b], int(target[b])))
            for b in range(x.shape[0])
        ]
        return Output(weight, prob, surrogates,
                      {"region_key": e.region_key, "n_tight": e.n_tight, "explanation": e})


def _llc_predict(weight: Tensor, bias: Tensor, c: int):
    """x' (N, *input_shape) -> (N,) softmax(W x' + b)[c] for one LLC weight (C, *in), bias (C,)."""
    w = weight.flatten(1)

    def predict(xs: Tensor) -> Tensor:
        xs = torch.as_tensor(xs).to(dtype=w.dtype, device=w.device)
        return torch.softmax(xs.flatten(1) @ w.T + bias, dim=1)[:, c]

    return predict


@register
class OpenBoxIG(_Exact):
    """``openbox-ig``: exact integrated gradients from a baseline.

    Options:
        baseline: a float (every pixel; default 0.0, a black image) or a tensor of shape
            (*input_shape).
        walkers: sub-segments walked side by side per path (default 64).
        domain, batch_size: as for ``openbox``.

    ``info["delta"]``: (B,) completeness error sum(attribution) - (f_c(x) - f_c(baseline)),
    ~1e-15 in float64 (no Riemann error).
    """

    name = "openbox-ig"
    summary = "exact integrated gradients, summed over the path's linear pieces (openbox)"
    options = {"baseline": 0.0, "walkers": 64, "domain": None, "batch_size": 64}

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        base = torch.as_tensor(self.config["baseline"], dtype=x.dtype, device=x.device)
        if base.dim() and tuple(base.shape) != self.input_shape:
            raise ValueError(f"{self.name}: baseline must be a float or a tensor of shape "
                             f"{self.input_shape}, got {tuple(base.shape)}")
        base = base.expand_as(x).clone()
        attr = integrated_gradients(self.openbox, x, base, target,
                                    walkers=self.config["walkers"], progress=self._show(x))
        with torch.no_grad():
            fx, fb = self.openbox.program(x), self.openbox.program(base)
        rows = torch.arange(x.shape[0], device=x.device)
        delta = attr.flatten(1).sum(1) - (fx[rows, target] - fb[rows, target])
        return Output(attr, info={"delta": delta})
