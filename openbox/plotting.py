"""Figures of decision features (:mod:`openbox.features`).

Every function builds a :class:`matplotlib.figure.Figure` directly, without pyplot:
no display is needed or touched, the global pyplot state (and any interactive backend
a user has chosen) is left alone, and ``fig.savefig("x.png")`` renders with Agg.

Panels, for one input and class c: the input | ``W_x[c]`` | positive features |
negative features. Weights are drawn with a diverging colormap centred at 0 (red
raises the score of c, blue lowers it). Positive and negative features share one
symmetric scale, so the two panels add up to the contrast; negative features are
drawn with their sign (blue), as they lower the contrast.

>>> fig = openbox.plotting.plot_decision_features(feats, class_names=openbox.fmnist.data.CLASSES)
>>> fig.savefig("features.png")
"""

from __future__ import annotations

from collections.abc import Sequence
from math import isqrt

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from openbox.features import REST, DecisionFeatures

__all__ = ["plot_decision_features", "plot_grid"]

DIVERGING_CMAP = "RdBu_r"  # red > 0 > blue
INPUT_CMAP = "gray"
PANELS = 4  # input | weight | positive | negative
PANEL_INCHES = 2.3  # width of one panel (with its colourbar) in a figure
COLORBAR_FRACTION = 0.046  # colourbar as tall as a square image (matplotlib's rule of thumb)
COLORBAR_PAD = 0.03
TITLE_SIZE = 9
TICK_SIZE = 7


def _class_name(c: int | str, class_names: Sequence[str] | None) -> str:
    if c == REST:
        return "rest"
    if class_names is not None and 0 <= int(c) < len(class_names):
        return class_names[int(c)]
    return f"class {c}"


def _as_image(t, *, rgb: bool = False) -> np.ndarray:
    """(*input_shape) tensor -> 2-D array for imshow (or (H, W, 3) for an RGB input).

    (1, H, W): the one channel. (3, H, W) with ``rgb``: the image itself. Other (C, H, W):
    summed over channels (a location's total weight). 1-D inputs: a square if n is a
    perfect square, else a 1 x n strip.
    """
    a = t.detach().to("cpu").double().numpy()
    if a.ndim == 3:
        if rgb and a.shape[0] == 3:
            return np.clip(a.transpose(1, 2, 0), 0.0, 1.0)
        return a.sum(axis=0)
    if a.ndim == 2:
        return a
    flat = a.reshape(-1)
    side = isqrt(flat.size)
    return flat.reshape(side, side) if side * side == flat.size else flat.reshape(1, -1)


def _limit(*arrays: np.ndarray) -> float:
    """Symmetric colour limit: the largest |value| (1 if all are zero)."""
    m = max(float(np.abs(a).max()) if a.size else 0.0 for a in arrays)
    return m if m > 0 else 1.0


def _draw(ax: Axes, image: np.ndarray, title: str, *, cmap: str, vmin: float, vmax: float,
          colorbar: bool) -> None:
    im = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_title(title, fontsize=TITLE_SIZE)
    ax.set_xticks([])
    ax.set_yticks([])
    if colorbar:
        cb = ax.figure.colorbar(im, ax=ax, fraction=COLORBAR_FRACTION, pad=COLORBAR_PAD)
        cb.ax.tick_params(labelsize=TICK_SIZE)


def _draw_row(axes: Sequence[Axes], f: DecisionFeatures, class_names, *, label=None,
              colorbar: bool = True) -> None:
    target = _class_name(f.target, class_names)
    other = _class_name(f.versus, class_names)
    predicted = _class_name(f.prediction, class_names)
    x = _as_image(f.input, rgb=True)
    title = f"input, predicted {predicted}"
    if label is not None:
        title = f"label {_class_name(label, class_names)}\n{title}"
    # pixels in [0, 1] keep their absolute grey levels; other ranges are shown in full
    _draw(axes[0], x, title, cmap=INPUT_CMAP, vmin=min(0.0, float(x.min())),
          vmax=max(1.0, float(x.max())), colorbar=colorbar)
    w = _as_image(f.weight)
    lim = _limit(w)
    _draw(axes[1], w, f"W_x[{target}]", cmap=DIVERGING_CMAP, vmin=-lim, vmax=lim,
          colorbar=colorbar)
    pos, neg = _as_image(f.positive), _as_image(f.negative)
    lim = _limit(pos, neg)
    _draw(axes[2], pos, f"positive: {target} > {other}", cmap=DIVERGING_CMAP, vmin=-lim,
          vmax=lim, colorbar=colorbar)
    _draw(axes[3], -neg, f"negative: {other} > {target}", cmap=DIVERGING_CMAP, vmin=-lim,
          vmax=lim, colorbar=colorbar)


def plot_decision_features(
    features: DecisionFeatures,
    axes: Sequence[Axes] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    label: int | None = None,
) -> Figure:
    """One row of panels: input | W_x[c] | positive features | negative features.

    Args:
        features: from :func:`openbox.features.decision_features`.
        axes: four Axes to draw into (e.g. a row of your own figure); default a new Figure.
        class_names: names indexed by class, e.g. :data:`openbox.fmnist.data.CLASSES`.
        label: the input's true class, shown in the input panel's title if given.

    Returns:
        The Figure holding the panels.
    """
    if axes is None:
        fig = Figure(figsize=(PANELS * PANEL_INCHES, PANEL_INCHES * 1.05), layout="constrained")
        axes = fig.subplots(1, PANELS)
    elif len(axes) != PANELS:
        raise ValueError(f"axes must hold {PANELS} Axes (input, weight, positive, negative), "
                         f"got {len(axes)}")
    _draw_row(axes, features, class_names, label=label)
    return axes[0].figure


def plot_grid(
    features: Sequence[DecisionFeatures],
    *,
    class_names: Sequence[str] | None = None,
    labels: Sequence[int] | None = None,
    row_titles: Sequence[str] | None = None,
) -> Figure:
    """One row of :func:`plot_decision_features` panels per explained input.

    Args:
        features: one :class:`DecisionFeatures` per row.
        class_names: names indexed by class.
        labels: true class of each row's input (shown in its input panel), or None.
        row_titles: a line shown at the left of each row (e.g. the image index), or None.

    Returns:
        A Figure with ``4 * len(features)`` image panels (plus their colourbars).
    """
    n = len(features)
    if n == 0:
        raise ValueError("plot_grid needs at least one DecisionFeatures")
    for name, seq in (("labels", labels), ("row_titles", row_titles)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} rows")
    fig = Figure(figsize=(PANELS * PANEL_INCHES, n * PANEL_INCHES * 1.05), layout="constrained")
    grid = np.asarray(fig.subplots(n, PANELS, squeeze=False))
    for i, f in enumerate(features):
        _draw_row(grid[i], f, class_names, label=None if labels is None else labels[i])
        if row_titles is not None:
            grid[i, 0].set_ylabel(row_titles[i], fontsize=TITLE_SIZE)
    return fig
