"""openbox.features: decision features of the LLC (their figures: test_plotting.py).

References are independent of openbox.features: the contrast is recomputed from
``e.weight`` with an explicit loop over the other classes, and the logit gap from the
float64 model's own forward pass.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _models import random_cnn

import openbox
from openbox.features import decision_features
from openbox.fmnist.checkpoints import load_checkpoint
from openbox.fmnist.data import load_sample
from openbox.fmnist.demo import demo_checkpoint

F64 = torch.float64
GAP_ATOL = 1e-10  # DESIGN.md's float64 bound; the LLC's account of the gap is exact
N_IMAGES = 3


@pytest.fixture(scope="module")
def demo():
    """(model, explanation) of the packaged demo CNN on three packaged test images."""
    model, _ = load_checkpoint(demo_checkpoint())
    images = load_sample().images[[0, 150, 420]].double()
    ob = openbox.OpenBox(model, (1, 28, 28), dtype=F64, domain=(0.0, 1.0))
    return model, ob.explain(images)


def model_logits(model, x):
    with torch.no_grad():
        return copy.deepcopy(model).double()(x)


def reference_contrast(weight, c, versus):
    """W[c] minus the mean of the other rows (versus 'rest') or minus W[versus], by loop."""
    if versus == "rest":
        others = [weight[k] for k in range(weight.shape[0]) if k != c]
        return weight[c] - torch.stack(others).mean(dim=0)
    return weight[c] - weight[versus]


CASES = [(None, "rest"), (3, "rest"), (None, 7), (9, 0)]


@pytest.mark.parametrize(("target", "versus"), CASES)
def test_contrast_is_the_class_weight_minus_the_others(demo, target, versus):
    model, e = demo
    for i in range(N_IMAGES):
        f = decision_features(e, i, target=target, versus=versus)
        want_target = int(model_logits(model, e.inputs[i : i + 1])[0].argmax())
        c = want_target if target is None else target
        assert f.target == c and f.prediction == want_target and f.versus == versus
        torch.testing.assert_close(f.weight, e.weight[i, c], rtol=0, atol=0)
        torch.testing.assert_close(
            f.contrast, reference_contrast(e.weight[i], c, versus), rtol=0, atol=1e-13
        )
        torch.testing.assert_close(f.input, e.inputs[i], rtol=0, atol=0)


@pytest.mark.parametrize(("target", "versus"), CASES)
def test_positive_and_negative_split_the_contrast(demo, target, versus):
    _, e = demo
    f = decision_features(e, 1, target=target, versus=versus)
    for t in (f.weight, f.contrast, f.positive, f.negative, f.input):
        assert t.shape == (1, 28, 28) and t.dtype == F64
    assert bool((f.positive >= 0).all()) and bool((f.negative >= 0).all())
    assert torch.equal(f.positive - f.negative, f.contrast)
    assert not bool(((f.positive > 0) & (f.negative > 0)).any())
    assert bool((f.positive > 0).any()) and bool((f.negative > 0).any())


@pytest.mark.parametrize(("target", "versus"), CASES)
def test_llc_explains_the_logit_gap_exactly(demo, target, versus):
    """(contrast . x) + bias gap == logits[c] - mean(others) of the model itself."""
    model, e = demo
    for i in range(N_IMAGES):
        x = e.inputs[i : i + 1]
        f = decision_features(e, i, target=target, versus=versus)
        logits = model_logits(model, x)[0]
        c = f.target
        if versus == "rest":
            want = logits[c] - torch.cat([logits[:c], logits[c + 1 :]]).mean()
            bias_gap = e.bias[i, c] - torch.cat([e.bias[i, :c], e.bias[i, c + 1 :]]).mean()
        else:
            want = logits[c] - logits[versus]
            bias_gap = e.bias[i, c] - e.bias[i, versus]
        got = float((f.contrast * x[0]).sum() + bias_gap)
        assert got == pytest.approx(float(want), abs=GAP_ATOL)
        assert f.logit_gap == pytest.approx(float(want), abs=GAP_ATOL)
        assert f.bias_gap == pytest.approx(float(bias_gap), abs=1e-12)
        assert f.model_gap == pytest.approx(float(want), abs=GAP_ATOL)
        assert abs(f.delta) <= GAP_ATOL


def test_batch_gives_the_features_of_each_input_alone():
    model = random_cnn(11, channels=(3, 4), input_shape=(1, 12, 12)).eval()
    ob = openbox.OpenBox(model, (1, 12, 12))
    x = torch.rand((4, 1, 12, 12), generator=torch.Generator().manual_seed(3), dtype=F64)
    batch = ob.explain(x)
    for i in range(4):
        versus = "rest" if i == 0 else (2 if int(batch.prediction[i]) != 2 else 3)
        alone = decision_features(ob.explain(x[i : i + 1]), 0, versus=versus)
        together = decision_features(batch, i, versus=versus)
        assert together.target == alone.target
        torch.testing.assert_close(together.contrast, alone.contrast, rtol=0, atol=1e-14)
        assert together.logit_gap == pytest.approx(alone.logit_gap, abs=1e-12)


def test_bad_arguments_are_refused(demo):
    _, e = demo
    c = int(e.prediction[0])
    with pytest.raises(ValueError, match="versus must differ from target"):
        decision_features(e, 0, versus=c)
    with pytest.raises(ValueError, match="versus must be 'rest' or a class index"):
        decision_features(e, 0, versus="others")
    with pytest.raises(ValueError, match="index 3 out of range"):
        decision_features(e, 3)
    with pytest.raises(ValueError, match="target 10 out of range"):
        decision_features(e, 0, target=10)
    with pytest.raises(ValueError, match="target must be an integer"):
        decision_features(e, 0, target=2.5)
    assert decision_features(e, np.int64(1), target=torch.tensor(4)).target == 4
