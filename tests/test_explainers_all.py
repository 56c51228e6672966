"""Every registered explainer through one table (a new method is covered by registering it).

On a small CNN with batch-norm, max-pool and a global-average-pool head (so every method,
CAM included, applies): input-shaped finite attributions; a batch gives the one-by-one
results (deterministic methods; sampling ones run input by input, with the per-input seed
the base uses); the
same seed repeats, another seed differs; probabilities lie in [0, 1] up to the surrogate's
own error; the user's model is unchanged (parameters, buffers, modes, hooks).
"""

from __future__ import annotations

import pytest
import torch

from openbox import explainers
from tests._explainer_models import SHAPE, assert_unchanged, inputs, snapshot, tiny_cnn, tiny_gap

# small settings so that the table runs in seconds; each method's defaults are for 28x28
FAST = {
    "openbox-ig": {"walkers": 8},
    "lime-patches": {"n_samples": 64},
    "kernelshap": {"n_samples": 64},
    "smoothgrad": {"nt_samples": 4},
    "integrated-gradients": {"n_steps": 8},
    "meaningful-perturbation": {"steps": 10, "mask_size": 4},
}
NAMES = explainers.names()


def _get(name, model, **kw):
    options = {k: v for k, v in FAST.get(name, {}).items()
               if k in explainers.explainer_class(name).options}
    return explainers.get(name, model, input_shape=SHAPE, progress=False, **options, **kw)


def test_every_method_of_the_issue_is_registered():
    want = {"openbox", "openbox-ig", "lime", "lime-patches", "kernelshap", "saliency",
            "input-x-gradient", "integrated-gradients", "smoothgrad", "guided-backprop",
            "deconvolution", "deeplift", "lrp", "occlusion", "gradcam", "guided-gradcam", "cam",
            "meaningful-perturbation"}
    assert want <= set(NAMES)
    for name in NAMES:
        cls = explainers.explainer_class(name)
        assert cls.name == name and cls.__doc__ and cls.summary


@pytest.mark.parametrize("name", NAMES)
def test_method_on_a_small_cnn(name):
    model = tiny_gap(seed=1)
    before = snapshot(model)
    x = inputs(3, seed=7)
    target = torch.tensor([0, 2, 1])
    ex = _get(name, model)
    r = ex.explain(x, target)
    assert_unchanged(model, before)
    assert r.method == name
    assert r.attribution.shape == x.shape
    assert bool(torch.isfinite(r.attribution).all())
    assert r.seconds > 0
    assert torch.equal(r.target, target)
    cls = type(ex)
    if cls.local_model:
        assert r.probability is not None and r.probability.shape == (3,)
        assert r.surrogates is not None and len(r.surrogates) == 3
        # a surrogate of a probability may overshoot [0, 1] by its own error, not by more
        assert bool(((r.probability > -0.5) & (r.probability < 1.5)).all())
    # batch == one-by-one: for deterministic methods, and for sampling methods that the base
    # runs one input at a time (input b gets seed + b). A batched sampling method (SmoothGrad)
    # draws one noise tensor for the whole batch, so it promises no such equality.
    for b in range(3 if not (cls.stochastic and cls.batched) else 0):
        one = ex.explain(x[b : b + 1], target[b : b + 1], seed=ex.seed + b)
        torch.testing.assert_close(one.attribution, r.attribution[b : b + 1],
                                   rtol=1e-4, atol=1e-6)
    again = ex.explain(x, target)
    torch.testing.assert_close(again.attribution, r.attribution, rtol=1e-5, atol=1e-7)
    if cls.stochastic:
        other = ex.explain(x, target, seed=ex.seed + 100)
        # (a sparse surrogate may zero every coefficient of a weak model: then its
        # intercept, and so its probability, still moves with the samples)
        moved = not torch.allclose(other.attribution, r.attribution)
        if r.probability is not None:
            moved |= not torch.allclose(other.probability, r.probability, rtol=0, atol=1e-12)
        assert moved
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", NAMES)
def test_method_on_the_reference_layout_without_a_gap_head(name):
    """conv-BN-ReLU-maxpool x2 + Flatten + Linear: every method but CAM applies; CAM says why."""
    model = tiny_cnn(seed=2)
    before = snapshot(model)
    if name == "cam":
        with pytest.raises(explainers.UnsupportedModelError, match="cam"):
            _get(name, model).explain(inputs(2), 0)
    else:
        r = _get(name, model).explain(inputs(2, seed=3), torch.tensor([1, 0]))
        assert r.attribution.shape == (2, *SHAPE)
        assert bool(torch.isfinite(r.attribution).all())
    assert_unchanged(model, before)
