"""Study 3: which CNNs are interpretable, in the sense that near inputs share one exact
linear classifier, and what it costs in accuracy.

Every architecture of the model zoo (and two trainings for interpretability: the OpenBox
paper's non-negative + sparse constraints applied to the reference CNN, and an MMR-style
region-enlarging penalty) is trained with the same budget, seeded, on 10-class
Fashion-MNIST, then measured exactly with openbox on the same seeded test images:

- test accuracy; fraction of images on facets and tight facets per image;
- certified L2 / L-inf radius (median; fraction > 0), the region's inscribed L2 radius;
- regions crossed per unit L2 length on the segment to the nearest test neighbour;
- fraction of nearest-neighbour pairs, and of x vs x + 1e-3 noise, that share x's region
  (``ob.polytope(x).contains(y)``), and the per-layer Hamming distance of their gate states;
- consistency of the exact explanation (cosine with the neighbour's), and LIME's exactness
  and consistency on the same model;
- explain time (in ``arch-timing``).

Writes ``arch-study`` (one row per model), ``arch-hamming`` (per layer), ``arch-timing``,
``arch-tradeoff.png`` (accuracy against consistency and region size, one point per model)
and ``arch-planes.png`` (2-D plane maps through one test image for several models).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from matplotlib.figure import Figure

from experiments.common import SEED, Context, Timer, median, seeded_subset
from openbox import OpenBox, explainers, metrics
from openbox.fmnist.data import CLASSES, INPUT_SHAPE
from openbox.fmnist.regularisers import mmr_penalty
from openbox.regions.plane import plane
from openbox.regions.segment import segment

DOMAIN = (0.0, 1.0)
NOISE = 1e-3
NS_L1 = 1e-5
MMR = {"weight": 1.0, "gamma": 0.05, "k": 20, "ramp_epochs": 1, "probes": 4,
       "max_examples": 16}
"""The region-enlarging penalty: hinge on the 20 nearest gate hyperplanes at a target
distance 0.05 (pixels in [0, 1]), 4 Gaussian probes, 16 images of each batch. ``train``
passes whole 1-based epochs, so with ramp_epochs = 1 the weight is 0 in epoch 1 (plain
training, as Croce et al. start) and full from epoch 2 on."""

# name, zoo architecture, options at full width, options at tiny width, train options
MODELS = (
    ("cnn", "cnn", {}, {"channels": [4, 8]}, {}),
    ("cnn-poolfirst", "cnn-poolfirst", {}, {"channels": [4, 8]}, {}),
    ("cnn-avg", "cnn-avg", {}, {"channels": [4, 8]}, {}),
    ("cnn-strided", "cnn-strided", {}, {"channels": [4, 8]}, {}),
    ("cnn-nobn", "cnn-nobn", {}, {"channels": [4, 8]}, {}),
    ("cnn-leaky", "cnn-leaky", {}, {"channels": [4, 8]}, {}),
    ("gap", "gap", {}, {"channels": [4, 8, 8]}, {}),
    ("lenet", "lenet", {}, {"channels": [2, 4], "hidden": [16, 8]}, {}),
    ("plnn", "plnn", {}, {"hidden": [32, 16]}, {}),
    ("cnn + NS constraints", "cnn", {}, {"channels": [4, 8]},
     {"nonnegative": ("conv2", "fc"), "l1": NS_L1}),
    ("cnn-strided + MMR", "cnn-strided", {}, {"channels": [4, 8]}, {"penalty": MMR}),
)
PLANE_MODELS = ("cnn", "cnn-avg", "cnn-strided", "cnn-strided + MMR")


def _train(ctx: Context, name, arch, full, tiny, options, train_set, test_set):
    s = ctx.settings
    kwargs = dict(tiny if s.study_width == "tiny" else full)
    train_options = dict(options)
    describe = {}
    if "penalty" in train_options:
        describe = {"mmr": dict(train_options["penalty"])}
        params = dict(train_options["penalty"])
        train_options["penalty"] = mmr_penalty(
            params.pop("weight"), params.pop("gamma"), params.pop("k"),
            params.pop("ramp_epochs"), **params)
    tag = "arch-" + name.replace(" + ", "-").replace(" ", "-").lower()
    return ctx.trained(arch, kwargs, train_set, test_set, epochs=s.study_epochs,
                       batch_size=128, tag=tag, limit=s.study_train_limit,
                       train_options=train_options, describe=describe)


def _nearest(x: torch.Tensor, pool: torch.Tensor) -> tuple[int, float]:
    distance, index = metrics.nearest_neighbours(x[None].double(), pool.double())
    return int(index[0, 0]), float(distance[0, 0])


def _hamming(ob: OpenBox, a: torch.Tensor, b: torch.Tensor) -> list[tuple[str, float]]:
    """Per gate layer: the fraction of gates whose state differs between a and b."""
    ca = ob.configure(ob.check_point(a)).configuration
    cb = ob.configure(ob.check_point(b)).configuration
    out = []
    for k in sorted(ca.on):
        out.append((f"relu@{k}", float((ca.on[k] != cb.on[k]).double().mean())))
    for k in sorted(ca.select):
        out.append((f"maxpool@{k}", float((ca.select[k] != cb.select[k]).double().mean())))
    return out


def _measure(ctx: Context, name: str, model, meta: dict, test_set, timing, hamming_rows):
    s = ctx.settings
    ob = OpenBox(model, INPUT_SHAPE, dtype=torch.float64, domain=DOMAIN)
    index = seeded_subset(len(test_set), s.study_images, seed=SEED + 5)
    x = test_set.images[index].double()
    with Timer() as t:
        e = ob.explain(x)
    timing.append({"model": name, "what": "explain per image",
                   "seconds": t.seconds / len(index)})
    radii = ob.radius_pair(x, progress=False)
    inscribed = []
    for i in range(min(s.study_inscribed, len(index))):
        with Timer() as t:
            inscribed.append(float(ob.polytope(x[i]).inscribed_radius()))
        timing.append({"model": name, "what": "inscribed radius", "seconds": t.seconds})
    per_length, share_nn, share_noise = [], [], []
    pairs = min(s.study_pairs, len(index))
    g = torch.Generator().manual_seed(SEED)
    layer_sums: dict[str, list[float]] = {}
    for i in ctx.bar(range(pairs), desc=f"{name}: pairs"):
        j, dist = _nearest(x[i], test_set.images)
        y = test_set.images[j].double()
        with Timer() as t:
            pieces = segment(ob, x[i], y, progress=False)
        timing.append({"model": name, "what": "segment to nearest neighbour",
                       "seconds": t.seconds})
        per_length.append(len(pieces) / dist)
        poly = ob.polytope(x[i])
        share_nn.append(bool(poly.contains(y)))
        noisy = (x[i] + NOISE * torch.randn(x[i].shape, generator=g,
                                            dtype=torch.float64)).clamp(*DOMAIN)
        share_noise.append(bool(poly.contains(noisy)))
        for layer, h in _hamming(ob, x[i], y):
            layer_sums.setdefault(layer, []).append(h)
    for layer, hs in layer_sums.items():
        hamming_rows.append({"model": name, "layer": layer, "pairs": len(hs),
                             "mean_hamming": float(np.mean(hs))})
    with torch.no_grad():
        target = model(x[:pairs].float()).argmax(1)
    exact = explainers.get("openbox", model, input_shape=INPUT_SHAPE, progress=False)
    c_exact = metrics.consistency(exact, x[:pairs], target, test_set.images, seed=SEED,
                                  clip=DOMAIN, zero=float("nan"))
    k = min(s.study_lime, len(index))
    lime = explainers.get("lime", model, input_shape=INPUT_SHAPE, seed=SEED, progress=False,
                          **s.method_options.get("lime", {}))
    with Timer() as t:
        r_lime = lime.explain(x[:k].float(), target[:k])
    timing.append({"model": name, "what": "LIME per image", "seconds": t.seconds / k})
    lime_err = metrics.exactness(r_lime, model, x[:k])
    c_lime = metrics.consistency(lime, x[:k].float(), target[:k], test_set.images, seed=SEED,
                                 clip=DOMAIN, zero=float("nan"))
    n_tight = e.n_tight.double()
    return {
        "model": name, "test_accuracy": float(meta["test_accuracy"]), "n_images": len(index),
        "on_facet": float(e.on_boundary.double().mean()), "tight_facets": median(n_tight),
        "certified_l2": median(radii.l2), "certified_l2_positive": float(
            (radii.l2 > 0).double().mean()),
        "certified_linf": median(radii.linf),
        "inscribed_l2": median(inscribed) if inscribed else None, "n_inscribed": len(inscribed),
        "regions_per_unit_length": median(per_length), "n_pairs": pairs,
        "share_region_nn": float(np.mean(share_nn)), "share_region_noise": float(
            np.mean(share_noise)),
        "exact_consistency_nn": median(c_exact.neighbour_cosine),
        "lime_exactness": median(lime_err), "lime_consistency_nn": median(
            c_lime.neighbour_cosine), "n_lime": k,
    }


def run(ctx: Context) -> None:
    train_set, test_set = ctx.dataset("train"), ctx.dataset("test")
    rows, timing, hamming_rows, trained = [], [], [], {}
    for name, arch, full, tiny, options in MODELS:
        with Timer() as t:
            model, meta = _train(ctx, name, arch, full, tiny, options, train_set, test_set)
        trained[name] = model
        ctx.log(f"arch: {name}: accuracy {meta['test_accuracy']:.3f}; measuring")
        rows.append(_measure(ctx, name, model, meta, test_set, timing, hamming_rows))
        timing.append({"model": name, "what": "training (or loading the cached checkpoint)",
                       "seconds": t.seconds})
    ctx.table("arch-study", rows, caption=(
        "Architectures and trainings for interpretability, measured exactly (float64, domain "
        "[0, 1]) on the same seeded test images: medians; share_region_* = fraction of pairs "
        "whose second point lies in the first's closed region."))
    ctx.table("arch-hamming", hamming_rows, caption=(
        "Per gate layer: mean fraction of gates whose state differs between a test image and "
        "its nearest test neighbour (node index in the compiled program)."))
    ctx.table("arch-timing", timing)
    ctx.figure("arch-tradeoff", _tradeoff(rows))
    ctx.figure("arch-planes", _planes(ctx, trained, test_set))


def _tradeoff(rows) -> Figure:
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    axes = fig.subplots(1, 2)
    acc = [r["test_accuracy"] for r in rows]
    for ax, key, label, log in (
            (axes[0], "exact_consistency_nn", "cosine of W_x[c] with the nearest neighbour's",
             False),
            (axes[1], "regions_per_unit_length",
             "regions crossed per unit L2 length (segment to the nearest neighbour)", True)):
        vals = [r[key] for r in rows]
        ax.scatter(vals, acc)
        for r, v, a in zip(rows, vals, acc):
            if v is not None and not (isinstance(v, float) and math.isnan(v)):
                ax.annotate(r["model"], (v, a), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(label, fontsize=8)
        ax.set_ylabel("test accuracy")
    fig.suptitle("Accuracy against consistency and region size, one point per model",
                 fontsize=10)
    return fig


def _planes(ctx: Context, trained, test_set) -> Figure:
    s = ctx.settings
    names = [n for n in PLANE_MODELS if n in trained]
    fig = Figure(figsize=(3.2 * len(names), 3.4), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    i = seeded_subset(len(test_set), 1, seed=SEED + 6)[0]
    x0 = test_set.images[i].double()
    _, index = metrics.nearest_neighbours(x0[None], test_set.images.double(), k=2)
    j, k = (int(t) for t in index[0])
    # towards the two nearest test images: x0 + a (y - x0) + b (z - x0) stays in [0, 1]
    # for a, b >= 0 with a + b <= 1, so the map's extent lies inside the domain
    u = test_set.images[j].double() - x0
    v = test_set.images[k].double() - x0
    e = s.plane_extent
    for ax, name in zip(axes, names):
        ob = OpenBox(trained[name], INPUT_SHAPE, dtype=torch.float64, domain=DOMAIN)
        # starts=1: one walk from x0, so that a map cut by max_regions is x0's surroundings
        pm = plane(ob, x0, u, v, (0.0, e, 0.0, e), max_regions=s.plane_max_regions,
                   starts=1, progress=False)
        pm.plot(ax=ax, class_names=CLASSES)
        done = "" if pm.complete else f" (first {len(pm.polygons)}, incomplete)"
        ax.set_title(f"{name}: {len(pm.polygons)} regions{done}", fontsize=8)
    fig.suptitle(f"Regions of the plane x0 + a (y - x0) + b (z - x0), x0 = test image {i}, y, z "
                 f"= its nearest test images {j}, {k}; a, b in [0, {e:g}]", fontsize=9)
    return fig
