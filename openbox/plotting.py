"""Figures of decision features (:mod:`openbox.features`).

Every function builds a :class:`matplotlib.figure.Figure` directly, without pyplot:
no display is needed or touched, the global pyplot state (and any interactive backend
a user has chosen) is left alone, and ``fig.savefig("x.png")`` renders with Agg.

Panels, for one input x and class c (contrasted with the rest, or with one class c'):

1. the input, titled with the prediction (in red, with the true class, when wrong);
2. ``W_x[c]``, the network's own weights for c (logit per unit intensity);
3. the contribution ``W_x[c] * x`` of each pixel to the logit of c, overlaid on the
   input (as Captum's blended heat map does); it sums to ``logit[c] - b_x[c]``;
4. the positive part of the contrast ``W_x[c] - mean_{c' != c} W_x[c']``: brighter
   pixels there raise c over the others;
5. its negative part (drawn with its sign): brighter pixels there favour the others.

Weights and contributions use a diverging colormap centred at 0 (red raises the
score of c, blue lowers it); the positive and negative panels each use their own
range, from 0 to their own largest magnitude. Colour bars say what the colour means.

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

__all__ = [
    "CONTRIBUTION_UNITS",
    "INPUT_UNITS",
    "WEIGHT_UNITS",
    "plot_attribution_grid",
    "plot_decision_features",
    "plot_grid",
    "plot_input",
    "verification_title",
]

DIVERGING_CMAP = "RdBu_r"  # red > 0 > blue
POSITIVE_CMAP = "Reds"  # 0 .. max, white to red
NEGATIVE_CMAP = "Blues_r"  # -max .. 0, blue to white
INPUT_CMAP = "gray"
WEIGHT_UNITS = "logit per unit intensity"
CONTRIBUTION_UNITS = "logit contribution"
INPUT_UNITS = "pixel intensity"
MISCLASSIFIED_COLOR = "tab:red"
PANELS = 5  # input | weight | contribution | positive | negative
PANEL_INCHES = 2.45  # width of one panel (with its colourbar) in a figure
ROW_INCHES = 2.55  # height of one row (two title lines, the image)
INPUT_FIG_INCHES = 2.8
COLORBAR_FRACTION = 0.046  # colourbar as tall as a square image (matplotlib's rule of thumb)
COLORBAR_PAD = 0.03
TITLE_SIZE = 9
SUPTITLE_SIZE = 11
LABEL_SIZE = 7
TICK_SIZE = 7
OVERLAY_DIM = 0.5
"""The input under a contribution map is drawn at this fraction of its brightness, so
that the colours stand out on it."""


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


def _grey(image: np.ndarray) -> np.ndarray:
    """An input drawn as the grey background of an overlay (RGB: mean over channels)."""
    return image.mean(axis=2) if image.ndim == 3 else image


def _limit(*arrays: np.ndarray) -> float:
    """The largest |value| (1 if all are zero, so that a colour range is never empty)."""
    m = max(float(np.abs(a).max()) if a.size else 0.0 for a in arrays)
    return m if m > 0 else 1.0


def _plain_axes(ax: Axes, title: str, *, color: str | None = None) -> None:
    style = {"color": color, "fontweight": "bold"} if color else {}
    ax.set_title(title, fontsize=TITLE_SIZE, **style)
    ax.set_xticks([])
    ax.set_yticks([])


def _colorbar(ax: Axes, im, label: str) -> None:
    cb = ax.figure.colorbar(im, ax=ax, fraction=COLORBAR_FRACTION, pad=COLORBAR_PAD)
    cb.ax.tick_params(labelsize=TICK_SIZE)
    cb.set_label(label, fontsize=LABEL_SIZE)


def _input_range(x: np.ndarray) -> tuple[float, float]:
    # pixels in [0, 1] keep their absolute grey levels; other ranges are shown in full
    return min(0.0, float(x.min())), max(1.0, float(x.max()))


def _input_title(prediction: int, label: int | None, class_names) -> tuple[str, str | None]:
    """(title, colour): the prediction, and the true class in red when it differs."""
    predicted = _class_name(prediction, class_names)
    if label is None:
        return f"predicted {predicted}", None
    true = _class_name(label, class_names)
    if int(label) != int(prediction):
        return f"predicted {predicted},\ntrue {true}", MISCLASSIFIED_COLOR
    return f"{true},\npredicted {predicted}", None


def _draw_input(ax: Axes, x: np.ndarray, title: str, color: str | None,
                colorbar: bool) -> None:
    lo, hi = _input_range(x)
    im = ax.imshow(x, cmap=INPUT_CMAP, vmin=lo, vmax=hi, interpolation="nearest")
    _plain_axes(ax, title, color=color)
    if colorbar:
        _colorbar(ax, im, INPUT_UNITS)


def _draw_map(ax: Axes, image: np.ndarray, title: str, *, cmap: str, vmin: float,
              vmax: float, units: str, colorbar: bool) -> None:
    im = ax.imshow(image, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    _plain_axes(ax, title)
    if colorbar:
        _colorbar(ax, im, units)


def _draw_overlay(ax: Axes, x: np.ndarray, contribution: np.ndarray, title: str,
                  colorbar: bool) -> None:
    """The input in dimmed grey under the contribution map (diverging, centred at 0).

    Captum's blended heat map lays the map over the image at a fixed opacity of 0.5; here
    each pixel's opacity is sqrt(|contribution| / max), so pixels that contribute nothing
    show the input alone and the largest contributions are opaque.
    """
    grey = _grey(x)
    lo, hi = _input_range(grey)
    ax.imshow(grey, cmap=INPUT_CMAP, vmin=lo, vmax=lo + (hi - lo) / OVERLAY_DIM,
              interpolation="nearest")
    lim = _limit(contribution)
    alpha = np.sqrt(np.abs(contribution) / lim)
    im = ax.imshow(contribution, cmap=DIVERGING_CMAP, vmin=-lim, vmax=lim, alpha=alpha,
                   interpolation="nearest")
    _plain_axes(ax, title)
    if colorbar:
        _colorbar(ax, im, CONTRIBUTION_UNITS)


def _draw_row(axes: Sequence[Axes], f: DecisionFeatures, class_names, *, label=None,
              colorbar: bool = True) -> None:
    target = _class_name(f.target, class_names)
    other = _class_name(f.versus, class_names)
    x = _as_image(f.input, rgb=True)
    title, color = _input_title(f.prediction, label, class_names)
    _draw_input(axes[0], x, title, color, colorbar)

    w = _as_image(f.weight)
    lim = _limit(w)
    _draw_map(axes[1], w, f"weights W_x[{target}]", cmap=DIVERGING_CMAP, vmin=-lim,
              vmax=lim, units=WEIGHT_UNITS, colorbar=colorbar)

    contribution = _as_image(f.weight * f.input)
    total = float((f.weight * f.input).sum())
    _draw_overlay(axes[2], x, contribution,
                  f"contribution W_x[{target}]·x\n(sum {total:.3g} = logit - bias)", colorbar)

    pos, neg = _as_image(f.positive), _as_image(f.negative)
    contrast = f"contrast: {target} vs {other}"
    _draw_map(axes[3], pos, f"{contrast}\n> 0: favours {target}", cmap=POSITIVE_CMAP,
              vmin=0.0, vmax=_limit(pos), units=WEIGHT_UNITS, colorbar=colorbar)
    _draw_map(axes[4], -neg, f"{contrast}\n< 0: favours {other}", cmap=NEGATIVE_CMAP,
              vmin=-_limit(neg), vmax=0.0, units=WEIGHT_UNITS, colorbar=colorbar)


def verification_title(model: str, dtype, max_abs_error: float, ok: bool) -> str:
    """A figure title: ``"cnn (channels 8/16), float64, verified: max error 2.1e-14"``.

    Args:
        model: a short description of the model.
        dtype: the working dtype (torch dtype or its name).
        max_abs_error: largest |LLC - model| / |program - model| over the figure's inputs.
        ok: whether every check passed.
    """
    dtype = str(dtype).removeprefix("torch.")
    verdict = "verified" if ok else "NOT verified"
    return f"{model}, {dtype}, {verdict}: max error {max_abs_error:.1e}"


def _new_figure(rows: int, title: str | None) -> tuple[Figure, np.ndarray]:
    height = rows * ROW_INCHES + (0.35 if title else 0.0)
    fig = Figure(figsize=(PANELS * PANEL_INCHES, height), layout="constrained")
    if title:
        fig.suptitle(title, fontsize=SUPTITLE_SIZE)
    return fig, np.asarray(fig.subplots(rows, PANELS, squeeze=False))


def plot_decision_features(
    features: DecisionFeatures,
    axes: Sequence[Axes] | None = None,
    *,
    class_names: Sequence[str] | None = None,
    label: int | None = None,
    title: str | None = None,
) -> Figure:
    """One row of panels: input | W_x[c] | W_x[c] * x | contrast > 0 | contrast < 0.

    Args:
        features: from :func:`openbox.features.decision_features`.
        axes: five Axes to draw into (e.g. a row of your own figure); default a new Figure.
        class_names: names indexed by class, e.g. :data:`openbox.fmnist.data.CLASSES`.
        label: the input's true class, shown in the input panel's title if given (in red
            when the network predicts another class).
        title: the figure's title (e.g. :func:`verification_title`); ignored with ``axes``.

    Returns:
        The Figure holding the panels.
    """
    if axes is None:
        fig, grid = _new_figure(1, title)
        axes = grid[0]
    elif len(axes) != PANELS:
        raise ValueError(f"axes must hold {PANELS} Axes (input, weight, contribution, "
                         f"positive, negative), got {len(axes)}")
    _draw_row(axes, features, class_names, label=label)
    return axes[0].figure


def plot_grid(
    features: Sequence[DecisionFeatures],
    *,
    class_names: Sequence[str] | None = None,
    labels: Sequence[int | None] | None = None,
    row_titles: Sequence[str] | None = None,
    title: str | None = None,
) -> Figure:
    """One row of :func:`plot_decision_features` panels per explained input.

    Args:
        features: one :class:`DecisionFeatures` per row.
        class_names: names indexed by class.
        labels: true class of each row's input (shown in its input panel), or None.
        row_titles: a line shown at the left of each row (e.g. the image index), or None.
        title: the figure's title (e.g. :func:`verification_title`).

    Returns:
        A Figure with ``5 * len(features)`` image panels (plus their colourbars).
    """
    n = len(features)
    if n == 0:
        raise ValueError("plot_grid needs at least one DecisionFeatures")
    for name, seq in (("labels", labels), ("row_titles", row_titles)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{name} has {len(seq)} entries for {n} rows")
    fig, grid = _new_figure(n, title)
    for i, f in enumerate(features):
        _draw_row(grid[i], f, class_names, label=None if labels is None else labels[i])
        if row_titles is not None:
            grid[i, 0].set_ylabel(row_titles[i], fontsize=TITLE_SIZE)
    return fig


def plot_input(
    x,
    *,
    prediction: int | None = None,
    label: int | None = None,
    class_names: Sequence[str] | None = None,
    name: str | None = None,
) -> Figure:
    """The input alone, with a colour bar of pixel intensity.

    Args:
        x: one input (*input_shape), e.g. (1, 28, 28).
        prediction: the class the network predicts (titled; None to leave it out).
        label: the true class (titled; the title turns red when it differs from the
            prediction).
        class_names: names indexed by class.
        name: a first title line, e.g. ``"test image 12"`` or a file name.
    """
    fig = Figure(figsize=(INPUT_FIG_INCHES, INPUT_FIG_INCHES), layout="constrained")
    ax = fig.subplots()
    if prediction is not None:
        title, color = _input_title(prediction, label, class_names)
    else:
        title = "" if label is None else f"true {_class_name(label, class_names)}"
        color = None
    title = "\n".join(t for t in (name, title) if t)
    _draw_input(ax, _as_image(x, rgb=True), title, color, colorbar=True)
    return fig


def plot_segment(pieces, t: np.ndarray, logits: np.ndarray, *, class_names=None,
                 title: str | None = None) -> Figure:
    """Logits along a segment with the exact breakpoints of its linear pieces.

    Args:
        pieces: the :func:`openbox.regions.segment` pieces.
        t: (T,) parameters where ``logits`` (T, C) were evaluated (the model's own forward).
        class_names: names indexed by class.
        title: figure title.

    The logits are piecewise linear in t, kinked only at the breakpoints, which are drawn
    as a rug along the bottom; the predicted class of each piece is the strip on top.
    """
    fig = Figure(figsize=(9, 4.2), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    c_n = logits.shape[1]
    for c in range(c_n):
        ax.plot(t, logits[:, c], linewidth=1.0, color=f"C{c % 10}",
                label=_class_name(c, class_names))
    breaks = np.array([p.t_start for p in pieces[1:]])
    lo, hi = float(logits.min()), float(logits.max())
    pad = 0.05 * (hi - lo or 1.0)
    ax.vlines(breaks, lo - pad, lo - pad + 0.04 * (hi - lo + 2 * pad), color="k", linewidth=0.3,
              alpha=0.6)
    for p in pieces:
        ax.axvspan(p.t_start, p.t_end, ymin=0.97, ymax=1.0, color=f"C{p.prediction % 10}",
                   linewidth=0)
    changes = [b.t_start for a, b in zip(pieces, pieces[1:]) if a.prediction != b.prediction]
    for tc in changes:
        ax.axvline(tc, color="k", linewidth=0.8, linestyle="--")
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(lo - pad, hi + 2 * pad)
    ax.set_xlabel("t  (x = x0 + t (x1 - x0))", fontsize=TICK_SIZE + 1)
    ax.set_ylabel("logit", fontsize=TICK_SIZE + 1)
    ax.tick_params(labelsize=TICK_SIZE)
    ax.legend(fontsize=TICK_SIZE, ncol=min(5, c_n), loc="lower right", framealpha=0.8)
    ax.set_title(title or f"{len(pieces)} linear pieces; rug: breakpoints; dashed: the "
                 "predicted class changes; top strip: class per piece", fontsize=TITLE_SIZE)
    return fig


ATTRIBUTION_INCHES = 1.55  # one panel of the method grid
ATTRIBUTION_NORMALISED_UNITS = "attribution / max |attribution|"


def plot_attribution_grid(
    images,
    attributions: dict[str, object],
    *,
    targets: Sequence[int] | None = None,
    predictions: Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    row_titles: Sequence[str] | None = None,
    normalise: bool = True,
    title: str | None = None,
) -> Figure:
    """Rows = images, columns = the input then one attribution map per method.

    Every map of a row shares one diverging colour scale centred at 0 (red: evidence for the
    target, blue: against). Methods differ in units (LIME's per-pixel probability
    coefficients, logit gradients, Grad-CAM's rectified activations), so with ``normalise``
    (the default) each map is first divided by its own largest |value|, and the row's
    scale is [-1, 1]; with ``normalise=False`` the raw values share the row's largest |value|
    (then a method of small magnitude shows pale). A map that is all zero is drawn white.
    The colour bar at the end of each row says which.

    Args:
        images: (B, C, H, W) inputs (C = 1 grey or 3 RGB) as a tensor or array.
        attributions: method name -> (B, C, H, W) attributions (channels are summed).
        targets: the class each row explains (in the input panel's title), or None.
        predictions: the model's predicted class per row, or None.
        class_names: names indexed by class.
        row_titles: a line at the left of each row, or None.
        normalise: divide each map by its own max |value| (see above).
        title: the figure's title.

    Returns:
        A Figure with B rows of 1 + len(attributions) panels.
    """
    x = _as_batch(images)
    maps = {name: _as_batch(a).sum(axis=1) for name, a in attributions.items()}
    n, methods = x.shape[0], list(maps)
    if n == 0 or not methods:
        raise ValueError("plot_attribution_grid needs at least one image and one method")
    for name, a in maps.items():
        if a.shape != (n, *x.shape[2:]):
            raise ValueError(f"attributions[{name!r}] has shape "
                             f"{_as_batch(attributions[name]).shape} for {n} images of shape "
                             f"{x.shape[1:]}")
        if not np.isfinite(a).all():
            raise ValueError(f"attributions[{name!r}] holds NaN or Inf")
    for label, seq in (("targets", targets), ("predictions", predictions),
                       ("row_titles", row_titles)):
        if seq is not None and len(seq) != n:
            raise ValueError(f"{label} has {len(seq)} entries for {n} images")
    cols = 1 + len(methods)
    fig = Figure(figsize=(cols * ATTRIBUTION_INCHES + 0.6,
                          n * ATTRIBUTION_INCHES + (0.45 if title else 0.2)),
                 layout="constrained")
    if title:
        fig.suptitle(title, fontsize=SUPTITLE_SIZE)
    grid = np.asarray(fig.subplots(n, cols, squeeze=False))
    for i in range(n):
        image = x[i].transpose(1, 2, 0)
        image = image[..., 0] if image.shape[2] == 1 else image
        lo, hi = _input_range(image)
        grid[i, 0].imshow(image, cmap=INPUT_CMAP, vmin=lo, vmax=hi, interpolation="nearest")
        head = []
        if targets is not None:
            head.append(f"target {_class_name(int(targets[i]), class_names)}")
        if predictions is not None:
            head.append(f"pred. {_class_name(int(predictions[i]), class_names)}")
        _plain_axes(grid[i, 0], "\n".join(head) if head else "input")
        if row_titles is not None:
            grid[i, 0].set_ylabel(row_titles[i], fontsize=TITLE_SIZE)
        row = [maps[m][i] for m in methods]
        if normalise:
            row = [a / np.abs(a).max() if np.abs(a).max() > 0 else a for a in row]
        limit = 1.0 if normalise else _limit(*row)
        for j, (name, a) in enumerate(zip(methods, row), start=1):
            im = grid[i, j].imshow(a, cmap=DIVERGING_CMAP, vmin=-limit, vmax=limit,
                                   interpolation="nearest")
            _plain_axes(grid[i, j], name if i == 0 else "")
        _colorbar(grid[i, -1], im, ATTRIBUTION_NORMALISED_UNITS if normalise else "attribution")
    return fig


def _as_batch(t) -> np.ndarray:
    """A (B, C, H, W) tensor or array as float64 numpy."""
    a = np.asarray(t.detach().cpu().double().numpy() if hasattr(t, "detach") else t,
                   dtype=np.float64)
    if a.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {a.shape}")
    return a
