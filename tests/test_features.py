"""openbox.features and openbox.plotting: decision features of the LLC, and their figures.

References are independent of openbox.features: the contrast is recomputed from
``e.weight`` with an explicit loop over the other classes, and the logit gap from the
float64 model's own forward pass.
"""

from __future__ import annotations

import copy

import matplotlib.image
import numpy as np
import pytest
import torch
from _models import random_cnn, random_mlp
from matplotlib.figure import Figure

import openbox
from openbox.features import DecisionFeatures, decision_features
from openbox.fmnist.checkpoints import load_checkpoint
from openbox.fmnist.data import CLASSES, load_sample
from openbox.fmnist.demo import demo_checkpoint
from openbox.plotting import plot_decision_features, plot_grid

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


# --------------------------------------------------------------------------- figures


def image_axes(fig: Figure):
    return [ax for ax in fig.axes if ax.images]


def test_plot_decision_features_draws_four_panels_and_writes_a_png(demo, tmp_path):
    _, e = demo
    f = decision_features(e, 0)
    fig = plot_decision_features(f, class_names=CLASSES, label=4)
    assert isinstance(fig, Figure)
    panels = image_axes(fig)
    assert len(panels) == 4 and len(fig.axes) == 8  # four panels, four colourbars
    titles = [ax.get_title() for ax in panels]
    name = CLASSES[f.target]
    assert "label Coat" in titles[0] and f"predicted {CLASSES[f.prediction]}" in titles[0]
    assert titles[1] == f"W_x[{name}]"
    assert titles[2] == f"positive: {name} > rest" and titles[3] == f"negative: rest > {name}"
    # weights: diverging colormap centred at 0; the two feature panels share one scale
    lo, hi = panels[1].images[0].get_clim()
    assert lo == -hi and hi == pytest.approx(float(f.weight.abs().max()))
    assert panels[2].images[0].get_clim() == panels[3].images[0].get_clim()
    np.testing.assert_allclose(panels[3].images[0].get_array(), -f.negative[0].numpy())
    path = tmp_path / "features.png"
    fig.savefig(path, dpi=60)
    assert path.stat().st_size > 0
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 50 and image.shape[1] > 4 * 50


def test_plot_into_given_axes(demo):
    _, e = demo
    fig = Figure()
    axes = fig.subplots(2, 4)
    assert plot_decision_features(decision_features(e, 2, versus=1), axes[1]) is fig
    assert [bool(ax.images) for ax in axes.flat] == [False] * 4 + [True] * 4
    assert axes[1, 2].get_title().endswith("> class 1")  # no class names given
    with pytest.raises(ValueError, match="4 Axes"):
        plot_decision_features(decision_features(e, 2), axes[0, :3])


def test_plot_grid_has_one_row_per_input(demo, tmp_path):
    _, e = demo
    feats = [decision_features(e, i) for i in range(N_IMAGES)]
    fig = plot_grid(feats, class_names=CLASSES, labels=[4, 1, 7],
                    row_titles=[f"image {i}" for i in range(N_IMAGES)])
    panels = image_axes(fig)
    assert len(panels) == 4 * N_IMAGES
    assert [panels[4 * i].get_ylabel() for i in range(N_IMAGES)] == ["image 0", "image 1",
                                                                     "image 2"]
    fig.savefig(tmp_path / "grid.png", dpi=40)
    assert matplotlib.image.imread(tmp_path / "grid.png").shape[0] > 100
    with pytest.raises(ValueError, match="labels has 2 entries for 3 rows"):
        plot_grid(feats, labels=[1, 2])
    with pytest.raises(ValueError, match="at least one"):
        plot_grid([])


@pytest.mark.parametrize("kind", ["rgb", "flat"])
def test_plots_of_other_input_shapes(kind, tmp_path):
    """RGB inputs are drawn as colour images, maps summed over channels; flat inputs
    with a square number of features as squares."""
    if kind == "rgb":
        model, shape = random_cnn(5, channels=(2, 3), input_shape=(3, 8, 8)).eval(), (3, 8, 8)
    else:
        model, shape = random_mlp(5, sizes=(16, 8, 4)).eval(), (16,)
    ob = openbox.OpenBox(model, shape)
    x = torch.rand((1, *shape), generator=torch.Generator().manual_seed(1), dtype=F64)
    f = decision_features(ob.explain(x), 0)
    assert isinstance(f, DecisionFeatures) and f.weight.shape == shape
    fig = plot_decision_features(f)
    panels = image_axes(fig)
    assert panels[0].images[0].get_array().shape == ((8, 8, 3) if kind == "rgb" else (4, 4))
    assert panels[1].images[0].get_array().shape == ((8, 8) if kind == "rgb" else (4, 4))
    fig.savefig(tmp_path / "x.png", dpi=30)
