"""openbox.explainers: the interface, the registry, openbox's exact methods, lime and
meaningful-perturbation, each against an independent reference.

The Captum adapters have their own files (test_explainers_captum.py, test_explainers_lrp.py);
test_explainers_all.py runs every registered name through the same table.
"""

from __future__ import annotations

import copy
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

import linearize
from openbox import explainers
from openbox.explainers.base import Attribution, Explainer, ExplainerError, Output, register
from openbox.explainers.meaningful_perturbation import gaussian_blur, total_variation
from tests._explainer_models import (
    SHAPE,
    assert_unchanged,
    inputs,
    linear_model,
    snapshot,
    tiny_cnn,
)

# ----------------------------------------------------------------------------- registry


def test_import_loads_neither_captum_nor_lime():
    code = ("import sys, openbox.explainers as e; e.names(); "
            "bad = [m for m in ('captum', 'lime') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_names_and_unknown_name():
    names = explainers.names()
    assert names[:2] == ("openbox", "openbox-ig")
    assert {"lime", "meaningful-perturbation"} <= set(names)
    assert len(set(names)) == len(names)
    with pytest.raises(ValueError, match="unknown explainer 'limes'.*openbox, openbox-ig"):
        explainers.get("limes", tiny_cnn(), input_shape=SHAPE)


def test_unknown_option_names_the_method_and_its_options():
    with pytest.raises(TypeError, match=r"lime: unknown option\(s\) 'samples'.*num_samples"):
        explainers.get("lime", tiny_cnn(), input_shape=SHAPE, samples=5)


def test_training_mode_batch_norm_is_rejected_and_model_untouched():
    model = tiny_cnn().train()
    before = snapshot(model)
    with pytest.raises(linearize.TrainingModeError, match="bn1.*bn2|eval"):
        explainers.get("saliency" if "saliency" in explainers.names() else "lime", model,
                       input_shape=SHAPE)
    assert_unchanged(model, before)


def test_a_second_class_under_a_taken_name_is_refused():
    class Clash(Explainer):
        name = "lime"

    with pytest.raises(ValueError, match="already registered"):
        register(Clash)


@pytest.mark.parametrize("bad, match", [
    (torch.zeros(2, 1, 12, 11), r"shape \(B, 1, 12, 12\)"),
    (torch.zeros(0, 1, 12, 12), "empty batch"),
    (torch.zeros(2, 1, 12, 12, dtype=torch.int64), "floating"),
    (torch.full((2, 1, 12, 12), float("nan")), "NaN or Inf"),
    ([[0.0]], "torch.Tensor"),
])
def test_bad_inputs_are_refused(bad, match):
    ex = explainers.get("openbox", tiny_cnn(), input_shape=SHAPE)
    with pytest.raises(ValueError, match=match):
        ex.explain(bad, 0)


@pytest.mark.parametrize("target, match", [
    (3, r"\[0, 3\)"), (-1, r"\[0, 3\)"), (torch.tensor([0.0, 1.0]), "integers"),
    (torch.tensor([0, 1, 2]), r"\(2,\) tensor"), (True, "int"),
])
def test_bad_targets_are_refused(target, match):
    ex = explainers.get("openbox", tiny_cnn(), input_shape=SHAPE)
    with pytest.raises(ValueError, match=match):
        ex.explain(inputs(2), target)


def test_a_nan_attribution_is_an_error_not_a_result():
    @register
    class Broken(Explainer):
        name = "test-broken"

        def _attribute(self, x, target, seed):
            a = torch.zeros_like(x)
            a[1, 0, 0, 0] = float("nan")
            return Output(a)

    try:
        with pytest.raises(ExplainerError, match="test-broken: attribution is NaN or Inf "
                                                 r"for inputs \[1\]"):
            explainers.get("test-broken", tiny_cnn(), input_shape=SHAPE).explain(inputs(2), 0)
    finally:
        explainers.base._REGISTRY.pop("test-broken")


# ----------------------------------------------------------------------------- openbox


def _autograd_rows(model: nn.Module, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """d logit_target / dx per input, by autograd on the float64 model (the reference)."""
    model = model.double()
    x = x.double().requires_grad_(True)
    out = model(x)
    out[torch.arange(x.shape[0]), target].sum().backward()
    return x.grad


def test_openbox_method_is_the_autograd_gradient_and_the_model_probability():
    model = tiny_cnn(seed=3)
    x, target = inputs(4, seed=1), torch.tensor([0, 1, 2, 1])
    before = snapshot(model)
    ex = explainers.get("openbox", model, input_shape=SHAPE)
    r = ex.explain(x, target)
    assert_unchanged(model, before)
    assert isinstance(r, Attribution) and r.method == "openbox"
    assert r.attribution.dtype == torch.float64 and r.attribution.shape == x.shape
    want = _autograd_rows(tiny_cnn(seed=3), x, target)
    torch.testing.assert_close(r.attribution, want, rtol=1e-10, atol=1e-12)
    p = torch.softmax(tiny_cnn(seed=3).double()(x.double()), 1)[torch.arange(4), target]
    torch.testing.assert_close(r.probability, p, rtol=0, atol=1e-12)
    for b in range(4):
        torch.testing.assert_close(r.surrogates[b].predict(x[b : b + 1].double()),
                                   p[b : b + 1], rtol=0, atol=1e-12)
    assert len(r.info["region_key"]) == 4 and r.info["n_tight"].shape == (4,)
    torch.testing.assert_close(r.target, target)


def test_openbox_ig_completeness_and_batch_equals_one_by_one():
    model = tiny_cnn(seed=4)
    x = inputs(3, seed=2)
    ex = explainers.get("openbox-ig", model, input_shape=SHAPE, progress=False)
    r = ex.explain(x, 1)
    f = model.double()(x.double())[:, 1] - model.double()(torch.zeros(1, *SHAPE).double())[:, 1]
    torch.testing.assert_close(r.attribution.flatten(1).sum(1), f.detach(), rtol=0, atol=1e-10)
    assert float(r.info["delta"].abs().max()) <= 1e-10
    for b in range(3):
        one = ex.explain(x[b : b + 1], 1).attribution
        torch.testing.assert_close(one, r.attribution[b : b + 1], rtol=0, atol=1e-12)


def test_openbox_ig_rejects_a_mis_shaped_baseline():
    ex = explainers.get("openbox-ig", tiny_cnn(), input_shape=SHAPE,
                        baseline=torch.zeros(2, 2))
    with pytest.raises(ValueError, match=r"baseline must be a float or a tensor of shape"):
        ex.explain(inputs(1), 0)


# ----------------------------------------------------------------------------- lime

SMALL = (1, 6, 6)


def _weighted_ridge(z: np.ndarray, y: np.ndarray, w: np.ndarray, alpha: float = 1.0):
    """Ridge with an unpenalised intercept, weighted: the closed form of sklearn's
    Ridge(alpha).fit(z, y, sample_weight=w) (centring by the weighted means)."""
    zm = (w[:, None] * z).sum(0) / w.sum()
    ym = (w * y).sum() / w.sum()
    zc, yc = z - zm, y - ym
    coef = np.linalg.solve(zc.T @ (w[:, None] * zc) + alpha * np.eye(z.shape[1]),
                           zc.T @ (w * yc))
    return coef, ym - zm @ coef


def test_lime_is_the_weighted_ridge_on_its_own_samples():
    model = linear_model(seed=1, shape=SMALL)
    x = inputs(2, seed=5, shape=SMALL)
    before = snapshot(model)
    ex = explainers.get("lime", model, input_shape=SMALL, dtype=torch.float64)
    r = ex.explain(x, torch.tensor([0, 2]))
    assert_unchanged(model, before)
    d = 36
    for b, c in enumerate((0, 2)):
        s = r.surrogates[b].samples
        z = s.features.numpy()
        assert z.shape == (d + 2, d) and set(np.unique(z)) <= {0.0, 1.0}
        assert (z[0] == 1).all()                      # lime's first sample is x itself
        # the samples in pixel space are x * z, and lime fitted the model's probabilities there
        torch.testing.assert_close(s.inputs, x[b].double() * s.features.reshape(-1, *SMALL))
        p = torch.softmax(model.double()(s.inputs), 1)[:, c]
        torch.testing.assert_close(s.model, p.detach(), rtol=0, atol=1e-12)
        # the kernel weights: sqrt(exp(-D^2 / 0.25^2)) of the cosine distance to all-ones
        dist = 1 - z.sum(1) / (np.linalg.norm(z, axis=1) * np.sqrt(d))
        np.testing.assert_allclose(s.weights.numpy(), np.sqrt(np.exp(-dist**2 / 0.25**2)),
                                   rtol=1e-12, atol=1e-12)
        coef, intercept = _weighted_ridge(z, s.model.numpy(), s.weights.numpy())
        np.testing.assert_allclose(r.attribution[b].reshape(-1).numpy(), coef, rtol=1e-7,
                                   atol=1e-9)
        assert r.probability[b].item() == pytest.approx(intercept + coef.sum(), abs=1e-9)
        np.testing.assert_allclose(s.surrogate.numpy(), intercept + z @ coef, atol=1e-9)
        # read through z_i = x'_i / x_i, x itself is z = 1
        assert r.surrogates[b].predict(x[b : b + 1]).item() == pytest.approx(
            r.probability[b].item(), abs=1e-12)
    assert r.info["score"].shape == (2,)


def test_lime_seeds():
    model, x = tiny_cnn(seed=2), inputs(1, seed=3)
    ex = explainers.get("lime", model, input_shape=SHAPE)
    a, b, c = (ex.explain(x, 1, seed=s).attribution for s in (4, 4, 5))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # a batch uses seed + b for input b: its second row is the one-input call with seed + 1
    two = ex.explain(inputs(2, seed=3), 1, seed=4).attribution
    torch.testing.assert_close(two[:1], a)
    torch.testing.assert_close(two[1:], ex.explain(inputs(2, seed=3)[1:], 1, seed=5).attribution)


def test_lime_default_sample_count_is_d_plus_2():
    ex = explainers.get("lime", tiny_cnn(), input_shape=SHAPE)
    assert ex.num_samples == 12 * 12 + 2
    r = ex.explain(inputs(1), 0)
    assert r.surrogates[0].samples.features.shape == (146, 144)


def test_lime_can_drop_its_samples():
    model, x = tiny_cnn(seed=2), inputs(1, seed=3)
    kept = explainers.get("lime", model, input_shape=SHAPE).explain(x, 1)
    dropped = explainers.get("lime", model, input_shape=SHAPE, keep_samples=False).explain(x, 1)
    assert kept.surrogates[0].samples is not None and dropped.surrogates[0].samples is None
    torch.testing.assert_close(dropped.attribution, kept.attribution, rtol=0, atol=0)
    assert dropped.probability.item() == kept.probability.item()


def test_lime_needs_an_image_shape():
    with pytest.raises(explainers.UnsupportedModelError, match=r"lime explains images.*\(5,\)"):
        explainers.get("lime", nn.Linear(5, 2), input_shape=(5,))


# ------------------------------------------------------------ meaningful perturbation


def test_meaningful_perturbation_batch_equals_one_by_one_and_deletes_the_score():
    model = tiny_cnn(seed=5)
    x = inputs(3, seed=4).double()
    before = snapshot(model)
    ex = explainers.get("meaningful-perturbation", model, input_shape=SHAPE,
                        dtype=torch.float64, steps=40, mask_size=6)
    ref = copy.deepcopy(model).double()
    target = torch.softmax(ref(x), 1).argmin(1)   # a score the game can move
    r = ex.explain(x, target)
    assert_unchanged(model, before)
    a = r.attribution
    assert a.shape == x.shape and float(a.min()) >= 0 and float(a.max()) <= 1
    for b in range(3):
        one = ex.explain(x[b : b + 1], target[b : b + 1])
        torch.testing.assert_close(one.attribution, a[b : b + 1], rtol=0, atol=1e-10)
    p = torch.softmax(ref(x), 1)[torch.arange(3), target]
    assert bool((r.info["deleted_probability"] <= p + 1e-12).all())
    assert bool((r.info["deleted_probability"] < p).any())


def test_total_variation_and_blur_known_values():
    m = torch.zeros(1, 1, 3, 3, dtype=torch.float64)
    m[0, 0, 1, 1] = 1.0
    # differences: the centre is 1 against 4 neighbours; per cell ((di)^2 + (dj)^2)^(3/2)
    # cells (0,1) and (1,0): one unit difference each -> 1; cell (1,1): di = dj = -1 -> 2^1.5
    want = (1 + 1 + 2 ** 1.5) / 9
    assert total_variation(m, 3.0).item() == pytest.approx(want, rel=1e-12)
    const = torch.full((2, 1, 8, 8), 0.3, dtype=torch.float64)
    torch.testing.assert_close(gaussian_blur(const, 1.5), const)
    spike = torch.zeros(1, 1, 21, 21, dtype=torch.float64)
    spike[0, 0, 10, 10] = 1.0
    blurred = gaussian_blur(spike, 1.5)
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert blurred[0, 0, 10, 10] == blurred.max()


def test_meaningful_perturbation_checks_its_options():
    with pytest.raises(ValueError, match="perturbation must be one of"):
        explainers.get("meaningful-perturbation", tiny_cnn(), input_shape=SHAPE,
                       perturbation="noise")
    with pytest.raises(ValueError, match="steps must be a positive int"):
        explainers.get("meaningful-perturbation", tiny_cnn(), input_shape=SHAPE, steps=0)
