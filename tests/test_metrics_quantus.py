"""Cross-checks of openbox.metrics against Quantus 0.6.0 where both implement the same
definition, on the same model, inputs and perturbations.

- MaxSensitivity (Yeh et al. 2019, Quantus's normalisation): Quantus draws its noise from
  numpy's global RNG; here its ``perturb_func`` hands it the points of
  :func:`openbox.metrics.uniform_ball`, so both score the same samples.
- MPRT (Adebayo et al. 2018, cascading top-down, Spearman): Quantus re-initialises each
  module with ``torch.manual_seed(seed + 1); module.reset_parameters()``; our
  ``randomisation`` takes that as its ``init``. Quantus orders layers by definition
  (``named_modules``), ours by forward execution; the test models are Sequentials, where
  the two agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from openbox import explainers, metrics
from tests._explainer_models import SHAPE, inputs, tiny_cnn
from tests.test_metrics import GradSaliency

quantus = pytest.importorskip("quantus")


def _explain_func(cls, **kw):
    """A Quantus explain_func running our explainer ``cls`` on whatever model Quantus gives."""

    def explain(model, inputs, targets, **_):
        ex = cls(model, SHAPE, dtype=torch.float64, **kw)
        x = torch.as_tensor(np.asarray(inputs), dtype=torch.float64)
        return ex.explain(x, torch.as_tensor(np.asarray(targets))).attribution.numpy()

    return explain


@pytest.mark.parametrize("method", ["saliency", "openbox"])
def test_max_sensitivity_agrees_with_quantus(method):
    model = tiny_cnn().double()
    x = inputs(3, seed=4).double()
    y = torch.tensor([0, 1, 2])
    cls = GradSaliency if method == "saliency" else explainers.explainer_class("openbox")
    ex = cls(model, SHAPE, dtype=torch.float64)
    ours = metrics.sensitivity(ex, x, y, radius=0.05, n=5, seed=11)
    points = metrics.uniform_ball(x, 0.05, 5, 11).numpy()
    step = iter(range(5))

    def perturb(arr, indices, **_):
        assert arr.shape == (3, int(np.prod(SHAPE)))
        return points[next(step)].reshape(arr.shape)

    q = quantus.MaxSensitivity(nr_samples=5, perturb_func=perturb, lower_bound=0.05,
                               disable_warnings=True, display_progressbar=False)
    theirs = q(model=ex.model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
               explain_func=_explain_func(cls), device="cpu")
    assert next(step, None) is None                  # Quantus used all five points
    assert float(ours.min()) > 1e-3                  # a case where sensitivity is not 0
    assert np.allclose(ours.numpy(), np.asarray(theirs), rtol=1e-12, atol=1e-14)


def _quantus_init(seed: int):
    def init(path, module, g):
        # Quantus's re-initialisation, on the global RNG (forked: the suite's state is kept)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 1)
            module.reset_parameters()

    return init


@pytest.mark.parametrize("abs_", [False, True])
def test_mprt_agrees_with_quantus(abs_):
    model = tiny_cnn().double()
    x = inputs(3, seed=6).double()
    y = torch.tensor([2, 0, 1])
    ex = GradSaliency(model, SHAPE, dtype=torch.float64)
    ours = metrics.randomisation(ex, x, y, init=_quantus_init(42))
    q = quantus.MPRT(layer_order="top_down", seed=42, abs=abs_, normalise=False,
                     disable_warnings=True, display_progressbar=False)
    with torch.random.fork_rng(devices=[]):
        theirs = q(model=ex.model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=None,
                   explain_func=_explain_func(GradSaliency), device="cpu")
    layers = [k for k in theirs if k != "original"]
    assert tuple(layers) == ours.layers == ("fc", "bn2", "conv2", "bn1", "conv1")
    rho = ours.spearman_abs if abs_ else ours.spearman
    for k, name in enumerate(layers):
        assert np.allclose(rho[:, k].numpy(), theirs[name], rtol=0, atol=1e-12), name
    assert float(rho.abs().max()) < 0.99             # the maps did change


def test_deletion_curve_agrees_with_quantus_pixel_flipping():
    # PixelFlipping's predictions after each step of ``features_in_step`` elements are our
    # deletion curve without its first point (no ties in the map: Quantus's argsort is not
    # stable, ours is); its AUC (unit spacing, no step 0) is not our deletion_auc
    model = tiny_cnn().double()
    x = inputs(3, seed=8).double()
    y = torch.tensor([1, 2, 0])
    ex = GradSaliency(model, SHAPE, dtype=torch.float64)
    a = ex.explain(x, y).attribution
    d = int(np.prod(SHAPE))
    ours = metrics.faithfulness(model, x, a, y, steps=d // 12, baseline=0.25)
    q = quantus.PixelFlipping(features_in_step=12, perturb_baseline=0.25, normalise=False,
                              abs=False, disable_warnings=True, display_progressbar=False)
    # Quantus's predict casts inputs to float32: a wrapper casts them back
    theirs = q(model=_Float64(ex.model).eval(), x_batch=x.numpy(), y_batch=y.numpy(),
               a_batch=a.numpy(), explain_func=_explain_func(GradSaliency), softmax=True,
               device="cpu")
    assert np.allclose(ours.deletion[:, 1:].numpy(), np.asarray(theirs), rtol=0, atol=1e-12)
    assert float((ours.deletion[:, 0] - ours.deletion[:, -1]).abs().min()) > 1e-3


class _Float64(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x.double())
