"""Study 1: the OpenBox paper's setting (Chu et al., KDD 2018) reproduced.

FMNIST-1 (Ankle boot vs Bag) and FMNIST-2 (Coat vs Pullover); PLNN 784-256-128-100-2 (ReLU),
Adam, batch 1000, seeded; PLNN-NS, the same network with the paper's non-negative and sparse
constraints (non-negative weights after the first layer by projection, L1 penalty on them).

Writes:
- ``plnn-accuracy``: test accuracy, and the constrained weights' min and zero fraction;
- ``plnn-exactness`` (+ ``plnn-exactness.png``, CDFs): |P_method(c|x) - P_model(c|x)| for
  LIME (the paper's setting) and openbox on a seeded subset of each task's test set;
- ``plnn-consistency`` (+ png): cosine of each instance's explanation with its nearest
  test neighbour's, for openbox, LIME, Saliency, Input x Gradient, Integrated Gradients;
- ``plnn-features.png``: decision features W_x[c] of both classes, PLNN vs PLNN-NS;
- ``plnn-timing``: seconds per explanation.
"""

from __future__ import annotations

import numpy as np
import torch
from matplotlib.figure import Figure

from experiments.common import SEED, Context, Timer, median, seeded_subset
from openbox import explainers, metrics
from openbox.fmnist.data import BINARY_TASKS, CLASSES, INPUT_SHAPE, binary_subset

TASKS = tuple(BINARY_TASKS)
BATCH = 1000
NS_L1 = 1e-4
"""L1 weight of PLNN-NS (times sum |w| over the constrained layers' weights)."""
NS_LAYERS = ("fc2", "fc3", "fc")
"""PLNN-NS: weights kept >= 0 after every step (all Linear layers but the first)."""
CONSISTENCY_METHODS = ("openbox", "lime", "saliency", "input-x-gradient",
                       "integrated-gradients")
ZERO_TOL = 1e-6
"""A weight counts as zero (sparsity) below this magnitude."""


def _task_models(ctx: Context, task: str):
    s = ctx.settings
    train_set = binary_subset(ctx.dataset("train"), task)
    test_set = binary_subset(ctx.dataset("test"), task)
    common = dict(epochs=s.plnn_epochs, batch_size=BATCH, limit=s.plnn_train_limit)
    plnn, meta = ctx.trained("plnn", {}, train_set, test_set, tag=f"plnn-{task}", **common)
    ns, meta_ns = ctx.trained("plnn", {}, train_set, test_set, tag=f"plnn-ns-{task}",
                              train_options={"l1": NS_L1, "nonnegative": NS_LAYERS}, **common)
    return train_set, test_set, {"PLNN": (plnn, meta), "PLNN-NS": (ns, meta_ns)}


def _weight_stats(model) -> tuple[float, float]:
    ws = [dict(model.named_modules())[n].weight.detach().flatten() for n in NS_LAYERS]
    w = torch.cat(ws)
    return float(w.min()), float((w.abs() < ZERO_TOL).double().mean())


def run(ctx: Context) -> None:
    s = ctx.settings
    acc_rows, exact_rows, cons_rows, timing = [], [], [], []
    curves: dict[tuple[str, str], np.ndarray] = {}
    cosines: dict[tuple[str, str], np.ndarray] = {}
    feature_sets = []
    for task in TASKS:
        _, test_set, models = _task_models(ctx, task)
        names = " vs ".join(test_set.classes)
        for label, (model, meta) in models.items():
            lo, zero = _weight_stats(model)
            acc_rows.append({"task": task, "classes": names, "model": label,
                             "test_accuracy": float(meta["test_accuracy"]),
                             "n_train": int(meta["n_train"]), "n_test": len(test_set),
                             "min_constrained_weight": lo, "zero_fraction": zero})
        model = models["PLNN"][0]
        # exactness: LIME (the paper's setting) against openbox
        index = seeded_subset(len(test_set), s.exactness_images)
        x = test_set.images[index]
        with torch.no_grad():
            target = model(x).argmax(1)
        for method in ("openbox", "lime"):
            opts = dict(s.method_options.get(method, {}))
            if method == "lime":
                opts["keep_samples"] = False     # ~10 MB per image, not needed here
            ex = explainers.get(method, model, input_shape=INPUT_SHAPE, seed=SEED,
                                progress=ctx.progress, **opts)
            with Timer() as t:
                r = ex.explain(x, target)
            err = metrics.exactness(r, model, x.double()).numpy()
            curves[(task, method)] = np.sort(err)
            exact_rows.append({"task": task, "method": method, "n": len(index),
                               "median": float(np.median(err)), "mean": float(err.mean()),
                               "p90": float(np.quantile(err, 0.9)), "max": float(err.max())})
            timing.append({"task": task, "method": method, "measure": "exactness",
                           "seconds_per_explanation": t.seconds / len(index)})
        # consistency with the nearest test neighbour (the paper's measure, L2 in pixels)
        index = seeded_subset(len(test_set), s.consistency_images, seed=SEED + 1)
        x = test_set.images[index]
        with torch.no_grad():
            target = model(x).argmax(1)
        for method in CONSISTENCY_METHODS:
            ex = explainers.get(method, model, input_shape=INPUT_SHAPE, seed=SEED,
                                progress=False, **s.method_options.get(method, {}))
            with Timer() as t:
                c = metrics.consistency(ex, x, target, test_set.images, seed=SEED,
                                        clip=(0.0, 1.0), zero=float("nan"))
            cos = c.neighbour_cosine.numpy()
            cosines[(task, method)] = cos
            row = {"task": task, "method": method, "n": len(index),
                   "median_cosine": median(cos), "mean_cosine": float(np.nanmean(cos)),
                   "median_noise_cosine": median(c.noise_cosine),
                   "same_region_neighbour": None if c.same_region_neighbour is None else
                   float(c.same_region_neighbour.double().mean())}
            cons_rows.append(row)
            timing.append({"task": task, "method": method, "measure": "consistency",
                           "seconds_per_explanation": t.seconds / (3 * len(index))})
        # decision features of both classes, PLNN vs PLNN-NS, for a few instances
        index = seeded_subset(len(test_set), s.feature_images, seed=SEED + 2)
        feature_sets.append((task, test_set, index, models))

    ctx.table("plnn-accuracy", acc_rows, caption=(
        "PLNN and PLNN-NS on the binary tasks: test accuracy; for the constrained layers "
        f"({', '.join(NS_LAYERS)}) the smallest weight and the fraction with |w| < {ZERO_TOL:g}."))
    ctx.table("plnn-exactness", exact_rows, caption=(
        "|P_method(c | x) - P_model(c | x)| of LIME (the paper's setting: one feature per pixel, "
        "d + 2 samples) and openbox on seeded test subsets, c = the predicted class."))
    ctx.table("plnn-consistency", cons_rows, caption=(
        "Cosine similarity of each instance's explanation with its nearest test neighbour's "
        "(L2 in pixel space), and with that of x + 1e-3 N(0, I) clipped to [0, 1]."))
    ctx.table("plnn-timing", timing)
    ctx.figure("plnn-exactness", _cdf_figure(curves))
    ctx.figure("plnn-consistency", _consistency_figure(cosines))
    ctx.figure("plnn-features", _features_figure(feature_sets))


def _cdf_figure(curves) -> Figure:
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    axes = fig.subplots(1, len(TASKS), squeeze=False)[0]
    for ax, task in zip(axes, TASKS):
        for method, style in (("openbox", "-"), ("lime", "--")):
            e = curves[(task, method)]
            y = np.arange(1, len(e) + 1) / len(e)
            ax.step(np.maximum(e, 1e-18), y, style, where="post", label=method)
        ax.set_xscale("log")
        ax.set_xlabel("|P_method(c|x) - P_model(c|x)|")
        ax.set_ylabel("fraction of test images")
        a, b = BINARY_TASKS[task]
        ax.set_title(f"{task}: {CLASSES[a]} vs {CLASSES[b]}", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle("Exactness: openbox's probability is the model's; LIME's surrogate misses it",
                 fontsize=10)
    return fig


def _consistency_figure(cosines) -> Figure:
    fig = Figure(figsize=(9, 3.4), layout="constrained")
    axes = fig.subplots(1, len(TASKS), squeeze=False)[0]
    for ax, task in zip(axes, TASKS):
        data = [cosines[(task, m)][~np.isnan(cosines[(task, m)])] for m in CONSISTENCY_METHODS]
        ax.boxplot(data, tick_labels=[m.replace("-", "-\n") for m in CONSISTENCY_METHODS])
        ax.set_ylabel("cosine with the nearest neighbour's map")
        ax.set_title(task, fontsize=10)
        ax.tick_params(axis="x", labelsize=7)
    fig.suptitle("Consistency of explanations of near instances", fontsize=10)
    return fig


def _features_figure(feature_sets) -> Figure:
    rows = sum(len(index) for _, _, index, _ in feature_sets)
    fig = Figure(figsize=(10, 2.0 * rows + 0.4), layout="constrained")
    grid = fig.subplots(rows, 5, squeeze=False)
    r = 0
    for task, test_set, index, models in feature_sets:
        for i in index:
            x = test_set.images[i : i + 1]
            grid[r, 0].imshow(x[0, 0], cmap="gray", vmin=0, vmax=1)
            grid[r, 0].set_title(f"{task} #{i}: {test_set.classes[int(test_set.labels[i])]}",
                                 fontsize=8)
            col = 1
            for label, (model, _) in models.items():
                e = explainers.get("openbox", model, input_shape=INPUT_SHAPE).explain(
                    x, torch.tensor([0]))
                w = e.info["explanation"].weight[0]          # (2, 1, 28, 28)
                for c in range(2):
                    m = w[c, 0].numpy()
                    lim = float(np.abs(m).max()) or 1.0
                    grid[r, col].imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
                    grid[r, col].set_title(f"{label}: W_x[{test_set.classes[c]}]", fontsize=8)
                    col += 1
            r += 1
    for ax in grid.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle("Decision features of both classes (red raises the class's logit)",
                 fontsize=10)
    return fig
