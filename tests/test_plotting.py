"""openbox.plotting: the figures say what they show, and show the numbers they say.

Each figure is checked through the matplotlib objects it holds: titles and colour-bar
labels (the texts a reader sees), colour limits, and the arrays handed to imshow,
compared with W_x, x and the logits recomputed here from the explanation and from the
model's own float64 forward pass.
"""

from __future__ import annotations

import copy

import matplotlib.image
import numpy as np
import pytest
import torch
from _models import random_cnn, random_mlp
from matplotlib.colors import same_color
from matplotlib.figure import Figure

import openbox
from openbox.features import decision_features
from openbox.fmnist.checkpoints import load_checkpoint
from openbox.fmnist.data import CLASSES, load_sample
from openbox.fmnist.demo import demo_checkpoint
from openbox.plotting import (
    CONTRIBUTION_UNITS,
    INPUT_UNITS,
    MISCLASSIFIED_COLOR,
    WEIGHT_UNITS,
    plot_decision_features,
    plot_grid,
    plot_input,
    verification_title,
)

F64 = torch.float64
PANEL_UNITS = [INPUT_UNITS, WEIGHT_UNITS, CONTRIBUTION_UNITS, WEIGHT_UNITS, WEIGHT_UNITS]


@pytest.fixture(scope="module")
def demo():
    """(model, labels, explanation) of the demo CNN on three packaged images and the first
    image it misclassifies (the last row)."""
    model, _ = load_checkpoint(demo_checkpoint())
    sample = load_sample()
    with torch.no_grad():
        predicted = model(sample.images).argmax(dim=1)
    wrong = int((predicted != sample.labels).nonzero()[0])
    rows = [0, 150, 420, wrong]
    ob = openbox.OpenBox(model, (1, 28, 28), dtype=F64, domain=(0.0, 1.0))
    return model, sample.labels[rows].tolist(), ob.explain(sample.images[rows].double())


def panels(fig: Figure):
    return [ax for ax in fig.axes if ax.images]


def colorbar_label(ax) -> str:
    return ax.images[-1].colorbar.ax.get_ylabel()


def test_panels_say_what_they_show(demo):
    _, labels, e = demo
    f = decision_features(e, 0)
    fig = plot_decision_features(f, class_names=CLASSES, label=labels[0], title="my title")
    axes = panels(fig)
    assert len(axes) == 5 and len(fig.axes) == 10  # five panels, five colour bars
    assert fig.get_suptitle() == "my title"
    name = CLASSES[f.target]
    titles = [ax.get_title() for ax in axes]
    assert titles[0] == f"{CLASSES[labels[0]]},\npredicted {CLASSES[f.prediction]}"
    assert titles[1] == f"weights W_x[{name}]"
    assert titles[2].startswith(f"contribution W_x[{name}]·x")
    assert titles[3] == f"contrast: {name} vs rest\n> 0: favours {name}"
    assert titles[4] == f"contrast: {name} vs rest\n< 0: favours rest"
    assert [colorbar_label(ax) for ax in axes] == PANEL_UNITS
    assert not same_color(axes[0].title.get_color(), MISCLASSIFIED_COLOR)


def test_contrast_with_one_class_names_both(demo):
    _, labels, e = demo
    f = decision_features(e, 1, target=3, versus=8)
    titles = [ax.get_title() for ax in panels(plot_decision_features(f, class_names=CLASSES))]
    assert titles[3] == "contrast: Dress vs Bag\n> 0: favours Dress"
    assert titles[4] == "contrast: Dress vs Bag\n< 0: favours Bag"
    # no class names: classes by index
    titles = [ax.get_title() for ax in panels(plot_decision_features(f))]
    assert titles[1] == "weights W_x[class 3]" and titles[4].endswith("favours class 8")


def test_misclassified_inputs_are_marked_in_red(demo):
    model, labels, e = demo
    i = len(labels) - 1
    f = decision_features(e, i)
    assert f.prediction != labels[i]
    ax = panels(plot_decision_features(f, class_names=CLASSES, label=labels[i]))[0]
    assert ax.get_title() == (f"predicted {CLASSES[f.prediction]},\n"
                              f"true {CLASSES[labels[i]]}")
    assert same_color(ax.title.get_color(), MISCLASSIFIED_COLOR)
    # without a label nothing can be wrong
    ax = panels(plot_decision_features(f, class_names=CLASSES))[0]
    assert ax.get_title() == f"predicted {CLASSES[f.prediction]}"
    assert not same_color(ax.title.get_color(), MISCLASSIFIED_COLOR)


@pytest.mark.parametrize(("i", "versus"), [(0, "rest"), (2, 1), (3, "rest")])
def test_colour_limits(demo, i, versus):
    """W_x: symmetric at max |W|; positive panel 0..its own max; negative -its own max..0."""
    _, _, e = demo
    f = decision_features(e, i, versus=versus)
    axes = panels(plot_decision_features(f))
    weight = e.weight[i, f.target, 0].numpy()
    assert axes[1].images[0].get_clim() == pytest.approx((-np.abs(weight).max(),
                                                          np.abs(weight).max()))
    contrast = f.contrast[0].numpy()
    pos_max, neg_max = contrast.max(), -contrast.min()
    assert pos_max > 0 and neg_max > 0 and pos_max != pytest.approx(neg_max)
    assert axes[3].images[0].get_clim() == pytest.approx((0.0, pos_max))
    assert axes[4].images[0].get_clim() == pytest.approx((-neg_max, 0.0))
    np.testing.assert_array_equal(axes[3].images[0].get_array(), np.maximum(contrast, 0))
    np.testing.assert_array_equal(axes[4].images[0].get_array(), np.minimum(contrast, 0))


def test_contribution_map_is_w_times_x_over_the_input(demo):
    model, _, e = demo
    for i in range(len(e)):
        f = decision_features(e, i)
        ax = panels(plot_decision_features(f))[2]
        background, heat = ax.images
        x = e.inputs[i, 0].numpy()
        want = e.weight[i, f.target, 0].numpy() * x
        np.testing.assert_allclose(heat.get_array(), want, rtol=0, atol=1e-15)
        np.testing.assert_array_equal(background.get_array(), x)
        lim = np.abs(want).max()
        assert heat.get_clim() == pytest.approx((-lim, lim))
        # the sum in the title is logit - bias, from the model's own forward pass
        with torch.no_grad():
            logit = copy.deepcopy(model).double()(e.inputs[i : i + 1])[0, f.target]
        total = float(logit - e.bias[i, f.target])
        assert f"(sum {total:.3g} = logit - bias)" in ax.get_title()


def test_verification_title():
    assert verification_title("cnn (channels 8/16)", torch.float64, 2.1e-14, True) == \
        "cnn (channels 8/16), float64, verified: max error 2.1e-14"
    assert verification_title("m:f", "float32", 0.5, False) == \
        "m:f, float32, NOT verified: max error 5.0e-01"


def test_plot_input(demo):
    _, labels, e = demo
    fig = plot_input(e.inputs[3], prediction=int(e.prediction[3]), label=labels[3],
                     class_names=CLASSES, name="test image 9")
    (ax,) = panels(fig)
    np.testing.assert_array_equal(ax.images[0].get_array(), e.inputs[3, 0].numpy())
    assert ax.images[0].get_clim() == (0.0, 1.0)
    assert ax.get_title().startswith("test image 9\npredicted ")
    assert same_color(ax.title.get_color(), MISCLASSIFIED_COLOR)
    assert colorbar_label(ax) == INPUT_UNITS
    (ax,) = panels(plot_input(e.inputs[0]))
    assert ax.get_title() == ""


def test_plot_into_given_axes(demo):
    _, _, e = demo
    fig = Figure()
    axes = fig.subplots(2, 5)
    assert plot_decision_features(decision_features(e, 2, versus=1), axes[1]) is fig
    assert [bool(ax.images) for ax in axes.flat] == [False] * 5 + [True] * 5
    with pytest.raises(ValueError, match="5 Axes"):
        plot_decision_features(decision_features(e, 2), axes[0, :4])


def test_plot_grid_has_one_row_per_input(demo, tmp_path):
    _, labels, e = demo
    n = len(e)
    feats = [decision_features(e, i) for i in range(n)]
    fig = plot_grid(feats, class_names=CLASSES, labels=labels,
                    row_titles=[f"image {i}" for i in range(n)], title="grid")
    axes = panels(fig)
    assert len(axes) == 5 * n and fig.get_suptitle() == "grid"
    assert [axes[5 * i].get_ylabel() for i in range(n)] == [f"image {i}" for i in range(n)]
    red = [same_color(axes[5 * i].title.get_color(), MISCLASSIFIED_COLOR) for i in range(n)]
    assert red == [int(e.prediction[i]) != labels[i] for i in range(n)] == \
        [False] * (n - 1) + [True]
    assert [colorbar_label(ax) for ax in axes] == PANEL_UNITS * n
    fig.savefig(tmp_path / "grid.png", dpi=40)
    assert matplotlib.image.imread(tmp_path / "grid.png").shape[0] > 100
    with pytest.raises(ValueError, match=f"labels has 2 entries for {n} rows"):
        plot_grid(feats, labels=[1, 2])
    with pytest.raises(ValueError, match="at least one"):
        plot_grid([])


def test_a_contrast_without_a_negative_part_still_draws(demo):
    """All-zero parts get a unit colour range instead of an empty one."""
    _, _, e = demo
    f = decision_features(e, 0)
    f = type(f)(**{**f.__dict__, "negative": torch.zeros_like(f.negative)})
    axes = panels(plot_decision_features(f))
    assert axes[4].images[0].get_clim() == (-1.0, 0.0)


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
    e = ob.explain(x)
    f = decision_features(e, 0)
    axes = panels(plot_decision_features(f))
    side = (8, 8) if kind == "rgb" else (4, 4)
    assert axes[0].images[0].get_array().shape == ((8, 8, 3) if kind == "rgb" else side)
    assert axes[1].images[0].get_array().shape == side
    want = (e.weight[0, f.target] * x[0]).reshape(-1, *side).sum(0) if kind == "rgb" else \
        (e.weight[0, f.target] * x[0]).reshape(side)
    np.testing.assert_allclose(axes[2].images[1].get_array(), want.numpy(), atol=1e-15)
    plot_decision_features(f).savefig(tmp_path / "x.png", dpi=30)
