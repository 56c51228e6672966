"""Side-by-side comparison of explainers on one model and one set of images.

>>> c = compare(model, x, input_shape=(1, 28, 28), methods=["openbox", "lime", "saliency"],
...             reference=train_images)
>>> print(c.to_markdown());  c.to_csv("table.csv");  c.plot().savefig("grid.png")

For every method: the attributions of every image, the seconds per explanation, and each
measure of :mod:`openbox.metrics`, per image, summarised over images by the median:

=====================  ======================================================================
column                 measure (``openbox.metrics`` function; for which methods)
=====================  ======================================================================
seconds                wall time of one ``explain`` call / images (all)
exactness              |P_method(c|x) - P_model(c|x)| (``exactness``; methods with a local
                       model); also its max
fidelity@s             mean |surrogate(x') - P_model(c|x')| over Gaussian neighbours of
                       standard deviation s, clipped to [0, 1] (``local_fidelity``)
left_region@s          fraction of those neighbours outside x's region (openbox)
own_samples            the surrogate's error on its own fitted samples (LIME)
seed_stability         cosine of two runs with seeds 0 and 1 (stochastic methods)
consistency_nn         cosine with the map of the nearest reference image (``consistency``)
consistency_noise      cosine with the map of x + 1e-3 N(0, I), clipped to [0, 1]
same_region_nn/noise   fraction of those that lie in x's closed region (openbox methods)
deletion_auc           area under P(c) as pixels are removed in attribution order (lower
                       is better; ``faithfulness``)
insertion_auc          area as they are restored from a black image (higher is better)
randomisation_top      Spearman rho of the map after re-initialising the logits layer
randomisation_all      ... after re-initialising every layer (``randomisation``; low = the
                       map depends on the weights, as it should)
max_sensitivity        max ||Phi(y) - Phi(x)|| / ||Phi(x)|| over 10 points of the L-inf ball
                       of radius 0.02 (``sensitivity``)
=====================  ======================================================================

A value that is undefined for an image (the cosine of an all-zero map) is left out of the
median and counted in the ``undefined`` column; a measure that does not apply to a method is
empty. Nothing here modifies the model.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from openbox import explainers, metrics

MEASURES = ("exactness", "local_fidelity", "seed_stability", "consistency", "faithfulness",
            "randomisation", "sensitivity")
"""Every measure :func:`compare` can compute, in table order."""

FIDELITY_SCALES = (1e-3, 1e-2, 1e-1)
FIDELITY_NEIGHBOURS = 16
CONSISTENCY_NOISE = 1e-3
SENSITIVITY_RADIUS = 0.02
SENSITIVITY_SAMPLES = 10
FAITHFULNESS_STEPS = 20
PIXEL_RANGE = (0.0, 1.0)
STABILITY_SEEDS = (0, 1)


@dataclass(frozen=True, eq=False)
class MethodReport:
    """One method's results on the compared images.

    Attributes:
        name: the method.
        attribution: (B, *input_shape) its maps.
        probability: (B,) its own P(target | x), or None.
        seconds: wall time per explanation (one batched call / B, or the loop / B).
        values: measure column -> (B,) float64 per-image values (NaN where undefined).
        errors: measure -> the message of a measure that could not be computed for this
            method (e.g. CAM on a model without a GAP head), shown in the table's notes.
    """

    name: str
    attribution: Tensor
    probability: Tensor | None
    seconds: float
    values: dict[str, Tensor] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True, eq=False)
class Comparison:
    """What :func:`compare` returns: the images, their targets and one report per method."""

    images: Tensor
    targets: Tensor
    predictions: Tensor
    reports: tuple[MethodReport, ...]
    reference_size: int | None
    measures: tuple[str, ...]
    index: Sequence[int] | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def columns(self) -> list[str]:
        """The table's value columns, in order (only those some method has)."""
        seen: dict[str, None] = {}
        for r in self.reports:
            for k in r.values:
                seen.setdefault(k, None)
        return ["seconds", *seen]

    def rows(self) -> list[dict[str, object]]:
        """One dict per method: ``method``, ``n``, each column's median (None where the
        measure does not apply), ``undefined`` (count of per-image NaNs) and ``notes``."""
        out = []
        cols = self.columns()
        for r in self.reports:
            row: dict[str, object] = {"method": r.name, "n": int(self.images.shape[0])}
            undefined = 0
            for c in cols:
                if c == "seconds":
                    row[c] = r.seconds
                    continue
                v = r.values.get(c)
                if v is None:
                    row[c] = None
                    continue
                ok = v[~torch.isnan(v)]
                undefined += int(v.numel() - ok.numel())
                row[c] = float(ok.median()) if ok.numel() else None
            row["undefined"] = undefined
            row["notes"] = "; ".join(f"{k}: {m}" for k, m in r.errors.items())
            out.append(row)
        return out

    def to_markdown(self) -> str:
        """The table as GitHub Markdown (medians over images; 3 significant digits)."""
        cols = self.columns()
        head = ["method", *cols, "undefined"]
        lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
        notes = []
        for row in self.rows():
            cells = [str(row["method"])] + [_fmt(row[c]) for c in cols] + [str(row["undefined"])]
            lines.append("| " + " | ".join(cells) + " |")
            if row["notes"]:
                notes.append(f"- {row['method']}: {row['notes']}")
        n = int(self.images.shape[0])
        ref = f", nearest neighbours among {self.reference_size:,} reference images" \
            if self.reference_size else ""
        lines.append("")
        lines.append(f"Medians over {n} image{'s' * (n != 1)}{ref}; seconds per explanation.")
        notes += [f"- {name}: not applicable: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines + notes)

    def to_csv(self, path: str | Path) -> Path:
        """Write the table (one row per method, full precision) to ``path``."""
        path = Path(path)
        cols = self.columns()
        with path.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["method", "n", *cols, "undefined", "notes"])
            for row in self.rows():
                w.writerow([row["method"], row["n"],
                            *("" if row[c] is None else repr(float(row[c])) for c in cols),
                            row["undefined"], row["notes"]])
        return path

    def plot(self, *, class_names: Sequence[str] | None = None, normalise: bool = True,
             title: str | None = None):
        """The grid figure (rows = images, columns = methods), see
        :func:`openbox.plotting.plot_attribution_grid`."""
        from openbox.plotting import plot_attribution_grid

        rows = None if self.index is None else [f"image {i}" for i in self.index]
        return plot_attribution_grid(
            self.images, {r.name: r.attribution for r in self.reports},
            targets=self.targets.tolist(), predictions=self.predictions.tolist(),
            class_names=class_names, row_titles=rows, normalise=normalise, title=title,
        )


def compare(
    model: nn.Module,
    images: Tensor,
    *,
    input_shape: Sequence[int],
    methods: Sequence[str] | None = None,
    measures: Sequence[str] = MEASURES,
    targets: Tensor | None = None,
    reference: Tensor | None = None,
    options: dict[str, dict] | None = None,
    index: Sequence[int] | None = None,
    seed: int = 0,
    progress: bool = True,
    on_method: Callable[[MethodReport], None] | None = None,
    skip_unsupported: bool = False,
) -> Comparison:
    """Explain ``images`` with every method and compute every measure.

    Args:
        model: the classifier (not modified).
        images: (B, *input_shape) inputs in [0, 1].
        input_shape: per-example shape.
        methods: names (default: every registered method).
        measures: a subset of :data:`MEASURES`.
        targets: (B,) classes to explain (default: the model's predictions).
        reference: (N, *input_shape) candidate nearest neighbours for ``consistency``
            (needed when it is among the measures).
        options: method name -> extra options for :func:`openbox.explainers.get`.
        index: the images' indices in their data set (row titles of the figure).
        seed: the seed of every method and measure.
        progress: tqdm bars on stderr.
        on_method: called with each method's report as soon as it is complete.
        skip_unsupported: a method that cannot handle the model (CAM without a global-
            average-pool head, ...) is listed in ``Comparison.skipped`` with the reason
            instead of raising :class:`~openbox.explainers.UnsupportedModelError`.

    Raises:
        ValueError: an unknown method or measure, or consistency without a reference.
    """
    methods = list(explainers.names() if methods is None else methods)
    for m in methods:
        explainers.explainer_class(m)
    unknown = sorted(set(measures) - set(MEASURES))
    if unknown:
        raise ValueError(f"unknown measure(s) {unknown}; the measures are: {', '.join(MEASURES)}")
    if "consistency" in measures and reference is None:
        raise ValueError("the consistency measure needs reference images (nearest neighbours)")
    options = dict(options or {})
    x = images.detach()
    with torch.no_grad():
        predictions = model(x.to(next(model.parameters()).dtype)).argmax(1)
    t = predictions.clone() if targets is None else torch.as_tensor(targets).to(torch.int64)
    reports, skipped = [], {}
    bar = tqdm(methods, desc="methods", unit="method", disable=not progress, leave=False)
    for name in bar:
        bar.set_postfix_str(name)
        try:
            ex = explainers.get(name, model, input_shape=input_shape, seed=seed,
                                progress=False, **options.get(name, {}))
        except explainers.UnsupportedModelError as err:
            if not skip_unsupported:
                raise
            skipped[name] = str(err)
            continue
        start = time.perf_counter()
        r = ex.explain(x, t)
        seconds = (time.perf_counter() - start) / x.shape[0]
        values: dict[str, Tensor] = {}
        errors: dict[str, str] = {}
        for measure in measures:
            try:
                values.update(_measure(measure, ex, r, model, x, t, reference, seed))
            except explainers.UnsupportedModelError as err:
                errors[measure] = str(err).split("\n")[0]
        report = MethodReport(name, r.attribution, r.probability, seconds, values, errors)
        reports.append(report)
        if on_method is not None:
            on_method(report)
    return Comparison(x, t, predictions, tuple(reports),
                      None if reference is None else int(reference.shape[0]), tuple(measures),
                      None if index is None else list(index), skipped)


def _measure(measure: str, ex, r, model, x, t, reference, seed) -> dict[str, Tensor]:
    """The per-image columns of one measure for one method ({} when it does not apply)."""
    nan = float("nan")
    if measure == "exactness":
        if r.probability is None:
            return {}
        e = metrics.exactness(r, model, x.double())      # P_model in float64
        return {"exactness": e, "exactness_max": e.max().expand(e.shape[0]).clone()}
    if measure == "local_fidelity":
        if r.surrogates is None:
            return {}
        f = metrics.local_fidelity(r, model, x.double(), scales=FIDELITY_SCALES,
                                   n=FIDELITY_NEIGHBOURS, seed=seed, clip=PIXEL_RANGE,
                                   openbox=getattr(ex, "openbox", None))
        out = {f"fidelity@{s:g}": f.mean[:, i].double() for i, s in enumerate(FIDELITY_SCALES)}
        if f.left_region is not None:
            out.update({f"left_region@{s:g}": f.left_region[:, i].double().mean(1)
                        for i, s in enumerate(FIDELITY_SCALES)})
        if f.sample_error is not None:
            out["own_samples"] = f.sample_error.double()
        return out
    if measure == "seed_stability":
        if not ex.stochastic:
            return {}
        return {"seed_stability": metrics.seed_stability(ex, x, t, seeds=STABILITY_SEEDS,
                                                         zero=nan).double()}
    if measure == "consistency":
        c = metrics.consistency(ex, x, t, reference, noise=CONSISTENCY_NOISE, seed=seed,
                                clip=PIXEL_RANGE, zero=nan)
        out = {"consistency_nn": c.neighbour_cosine.double(),
               "consistency_noise": c.noise_cosine.double()}
        if c.same_region_neighbour is not None:
            out["same_region_nn"] = c.same_region_neighbour.double()
            out["same_region_noise"] = c.same_region_noise.double()
        return out
    if measure == "faithfulness":
        f = metrics.faithfulness(model, x, r.attribution, t, steps=FAITHFULNESS_STEPS)
        return {"deletion_auc": f.deletion_auc.double(), "insertion_auc": f.insertion_auc.double()}
    if measure == "randomisation":
        rr = metrics.randomisation(ex, x, t, seed=seed, constant=nan)
        return {"randomisation_top": rr.spearman[:, 0].double(),
                "randomisation_all": rr.spearman[:, -1].double()}
    if measure == "sensitivity":
        s = metrics.sensitivity(ex, x, t, radius=SENSITIVITY_RADIUS, n=SENSITIVITY_SAMPLES,
                                seed=seed, zero=nan)
        return {"max_sensitivity": s.double()}
    raise AssertionError(measure)


def _fmt(v) -> str:
    if v is None:
        return ""
    v = float(v)
    if math.isnan(v):
        return "n/a"
    if v == 0:
        return "0"
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 else f"{v:.2e}"
