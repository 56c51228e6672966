"""Study 2: every explainer and every measure on the reference CNN, and what only exact
methods can show.

Model: the reference layout (conv3x3-BN-ReLU-maxpool x2 + linear, ``cnn`` of the model zoo)
at the width in the settings, trained seeded on 10-class Fashion-MNIST.

Writes:
- ``cnn-accuracy``: the model and its test accuracy;
- ``cnn-metrics``: every method x every measure of :mod:`openbox.metrics` (medians over a
  seeded subset of test images; the methods that cost seconds per call, ``EXPENSIVE``, on
  a smaller subset, and openbox-ig without randomisation and sensitivity, which would need
  15 more exact IG walks per image: the ``n`` column says how many images each row used);
- ``cnn-grid.png``: attributions of every method on the first images;
- ``cnn-exact``: what only an exact method can show: the fraction of test images on facets,
  tight facets per image, certified L2 / L-inf radii (0 on a facet), the region's own
  inscribed radius, regions crossed on the segment to the nearest test neighbour;
- ``cnn-ig``: exact IG against Captum's IG (float64, Gauss-Legendre) at several step counts:
  relative L2 error and completeness error;
- ``cnn-timing``: seconds per explanation of every method and its cost relative to openbox;
  exact and Captum IG times; polytope and radius times.
"""

from __future__ import annotations

import torch

from experiments.common import SEED, Context, Timer, median, seeded_subset
from openbox import OpenBox, explainers, metrics
from openbox.comparison import MEASURES, compare
from openbox.fmnist.data import CLASSES, INPUT_SHAPE
from openbox.regions.integrated_gradients import integrated_gradients
from openbox.regions.segment import segment

EXPENSIVE = ("openbox-ig", "lime", "lime-patches", "kernelshap", "meaningful-perturbation")
DOMAIN = (0.0, 1.0)


def run(ctx: Context) -> None:
    s = ctx.settings
    train_set, test_set = ctx.dataset("train"), ctx.dataset("test")
    kwargs = {"channels": list(s.cnn_channels)}
    model, meta = ctx.trained("cnn", kwargs, train_set, test_set, epochs=s.cnn_epochs,
                              batch_size=128, tag="cnn", limit=s.cnn_train_limit)
    ctx.table("cnn-accuracy", [{
        "model": f"cnn, channels {s.cnn_channels[0]}/{s.cnn_channels[1]}",
        "test_accuracy": float(meta["test_accuracy"]), "n_train": int(meta["n_train"]),
        "n_test": len(test_set), "epochs": int(meta["epochs"])}])
    timing: list[dict] = []
    for part in (_comparison, _exact, _ig):
        with Timer() as t:
            part(ctx, model, test_set, timing)
        ctx.log(f"cnn: {part.__name__[1:]} in {t.seconds:.0f} s")
    ctx.table("cnn-timing", timing)


def _comparison(ctx: Context, model, test_set, timing) -> None:
    s = ctx.settings
    index = seeded_subset(len(test_set), s.compare_images)
    x = test_set.images[index]
    reference = test_set.images
    cheap = [m for m in explainers.names() if m not in EXPENSIVE]
    ctx.log(f"comparison: {len(cheap)} methods on {len(index)} images")
    opts = s.method_options
    runs = [compare(model, x, input_shape=INPUT_SHAPE, methods=cheap, reference=reference,
                    index=index, seed=SEED, progress=ctx.progress, skip_unsupported=True,
                    options=opts)]
    k = min(s.compare_expensive_images, len(index))
    expensive = [m for m in EXPENSIVE if m != "openbox-ig"]
    ctx.log(f"comparison: {len(expensive) + 1} costly methods on {k} images")
    runs.append(compare(model, x[:k], input_shape=INPUT_SHAPE, methods=expensive,
                        measures=s.expensive_measures or MEASURES, reference=reference,
                        index=index[:k], seed=SEED, progress=ctx.progress, options=opts))
    runs.append(compare(model, x[:k], input_shape=INPUT_SHAPE, methods=["openbox-ig"],
                        measures=s.ig_measures, reference=reference, index=index[:k],
                        seed=SEED, progress=ctx.progress, options=opts))
    columns: dict[str, None] = {}
    for c in runs:
        for col in c.columns():
            columns.setdefault(col, None)
    cols = [c for c in columns if c != "seconds"]
    rows, unit = [], None
    for c in runs:
        for row in c.rows():
            rows.append({"method": row["method"], "n": row["n"],
                         **{col: row.get(col) for col in cols},
                         "undefined": row["undefined"], "notes": row["notes"]})
            if row["method"] == "openbox":
                unit = row["seconds"]
            timing.append({"what": f"explain: {row['method']}", "n": row["n"],
                           "seconds_per_explanation": row["seconds"]})
    for t in timing:
        t["relative_to_openbox"] = t["seconds_per_explanation"] / unit
    for c in runs:
        for name, why in c.skipped.items():
            rows.append({"method": name, "n": 0, "notes": f"not applicable: {why}"})
    for row in rows:
        skipped = [m for m in MEASURES if m not in (
            s.ig_measures if row["method"] == "openbox-ig" else
            (s.expensive_measures or MEASURES) if row["method"] in EXPENSIVE else MEASURES)]
        if skipped:
            row["notes"] = ((row.get("notes") or "") + f"not computed (cost): "
                            f"{', '.join(skipped)}").strip()
    ctx.table("cnn-metrics", rows, columns=["method", "n", *cols, "undefined", "notes"],
              caption=(f"Every method and measure on the reference CNN; medians over seeded test "
                       f"images (n per row); measures: {', '.join(MEASURES)}."))
    # the grid: the first k images, every method that ran on them
    attributions = {}
    for c in runs:
        for r in c.reports:
            attributions[r.name] = r.attribution[:k]
    from openbox.plotting import plot_attribution_grid

    with torch.no_grad():
        pred = model(x[:k]).argmax(1)
    fig = plot_attribution_grid(x[:k], attributions, targets=pred.tolist(),
                                predictions=pred.tolist(), class_names=CLASSES,
                                row_titles=[f"test image {i}" for i in index[:k]],
                                title="Attributions of the predicted class (each map scaled by "
                                      "its max |value|)")
    ctx.figure("cnn-grid", fig)


def _exact(ctx: Context, model, test_set, timing) -> None:
    s = ctx.settings
    ob = OpenBox(model, INPUT_SHAPE, dtype=torch.float64, domain=DOMAIN)
    index = seeded_subset(len(test_set), s.exact_images, seed=SEED + 3)
    x = test_set.images[index].double()
    with Timer() as t:
        e = ob.explain(x)
    timing.append({"what": "explain (LLC) per image", "n": len(index),
                   "seconds_per_explanation": t.seconds / len(index)})
    with Timer() as t:
        radii = ob.radius_pair(x, progress=False)
    timing.append({"what": "certified L2 + L-inf radius per image", "n": len(index),
                   "seconds_per_explanation": t.seconds / len(index)})
    inscribed = []
    for i in ctx.bar(range(min(s.inscribed_images, len(index))), desc="inscribed radius"):
        with Timer() as tb:
            poly = ob.polytope(x[i])
        with Timer() as ti:
            inscribed.append(float(poly.inscribed_radius()))
        timing.append({"what": "polytope build", "n": 1, "seconds_per_explanation": tb.seconds})
        timing.append({"what": "inscribed radius (LP)", "n": 1,
                       "seconds_per_explanation": ti.seconds})
    crossed = []
    n_seg = min(s.segment_images, len(index))
    _, nearest = metrics.nearest_neighbours(x[:n_seg], test_set.images.double())
    for i in ctx.bar(range(n_seg), desc="segments"):
        j = int(nearest[i, 0])
        with Timer() as ts:
            pieces = segment(ob, x[i], test_set.images[j].double(), progress=False)
        crossed.append(len(pieces))
        timing.append({"what": "segment to nearest neighbour", "n": 1,
                       "seconds_per_explanation": ts.seconds})
    on = e.on_boundary.double()
    rows = [
        {"quantity": "images on a facet (fraction)", "n": len(index), "value": float(on.mean())},
        {"quantity": "tight facets per image (median)", "n": len(index),
         "value": median(e.n_tight)},
        {"quantity": "of which ReLU ties (median)", "n": len(index),
         "value": median(e.configuration.n_tight_relu)},
        {"quantity": "of which max-pool ties (median)", "n": len(index),
         "value": median(e.configuration.n_tight_pool)},
        {"quantity": "certified L2 radius (median)", "n": len(index),
         "value": median(radii.l2)},
        {"quantity": "certified L2 radius > 0 (fraction)", "n": len(index),
         "value": float((radii.l2 > 0).double().mean())},
        {"quantity": "certified L-inf radius (median)", "n": len(index),
         "value": median(radii.linf)},
        {"quantity": "region's inscribed L2 radius (median)", "n": len(inscribed),
         "value": median(inscribed) if inscribed else None},
        {"quantity": "regions crossed on the segment to the nearest test neighbour (median)",
         "n": len(crossed), "value": median(crossed) if crossed else None},
    ]
    ctx.table("cnn-exact", rows, caption=(
        "What only an exact method shows, on the reference CNN (float64, input domain [0, 1])."))


def _ig(ctx: Context, model, test_set, timing) -> None:
    s = ctx.settings
    ob = OpenBox(model, INPUT_SHAPE, dtype=torch.float64, domain=DOMAIN)
    index = seeded_subset(len(test_set), s.ig_images, seed=SEED + 4)
    x = test_set.images[index].double()
    with torch.no_grad():
        target = ob.program(x).argmax(1)
        gap = ob.program(x) - ob.program(torch.zeros_like(x))
    gap = gap[torch.arange(len(index)), target]
    with Timer() as t:
        exact = integrated_gradients(ob, x, torch.zeros_like(x), target, progress=False)
    timing.append({"what": "exact IG per image", "n": len(index),
                   "seconds_per_explanation": t.seconds / len(index)})
    rows = [{"method": "openbox-ig (exact)", "steps": None, "n": len(index),
             "relative_l2_error": 0.0,
             "completeness_error": float((exact.flatten(1).sum(1) - gap).abs().max())}]
    for steps in s.ig_steps:
        ex = explainers.get("integrated-gradients", model, input_shape=INPUT_SHAPE,
                            dtype=torch.float64, n_steps=steps)
        with Timer() as t:
            approx = ex.explain(x, target).attribution
        err = (approx - exact).flatten(1).norm(dim=1) / exact.flatten(1).norm(dim=1)
        rows.append({"method": "Captum IG (Gauss-Legendre, float64)", "steps": steps,
                     "n": len(index), "relative_l2_error": median(err),
                     "completeness_error": float((approx.flatten(1).sum(1) - gap).abs().max())})
        timing.append({"what": f"Captum IG, {steps} steps, per image", "n": len(index),
                       "seconds_per_explanation": t.seconds / len(index)})
    ctx.table("cnn-ig", rows, caption=(
        "Exact integrated gradients (black baseline, predicted class) against Captum's: "
        "median relative L2 error of the map and max completeness error "
        "|sum IG - (f(x) - f(0))|."))
