"""openbox.comparison (methods x measures on a set of images) and the ``openbox compare`` CLI.

The table is glue over openbox.metrics: each checked cell is recomputed here from the
metric functions directly (the reference), and the CSV must hold the same numbers.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch

from openbox import explainers, metrics
from openbox.comparison import MEASURES, compare
from tests._explainer_models import SHAPE, assert_unchanged, inputs, snapshot, tiny_gap

METHODS = ["openbox", "saliency", "lime", "gradcam"]


@pytest.fixture(scope="module")
def run():
    model = tiny_gap(seed=4)
    before = snapshot(model)
    x = inputs(3, seed=11)
    reference = inputs(12, seed=12)
    c = compare(model, x, input_shape=SHAPE, methods=METHODS, reference=reference,
                index=[5, 6, 7], progress=False)
    return model, before, x, reference, c


def test_the_model_is_unchanged_and_every_method_reported(run):
    model, before, x, _, c = run
    assert_unchanged(model, before)
    assert [r.name for r in c.reports] == METHODS
    assert c.measures == MEASURES
    for r in c.reports:
        assert r.attribution.shape == x.shape and r.seconds > 0
        for v in r.values.values():
            assert v.shape == (3,)


def test_cells_are_the_metric_functions(run):
    model, _, x, reference, c = run
    rows = {row["method"]: row for row in c.rows()}
    # openbox: exact at x, in float64
    assert rows["openbox"]["exactness"] <= 1e-12
    # saliency has no local model: no exactness, no fidelity, no seed stability (deterministic)
    assert rows["saliency"]["exactness"] is None
    assert "seed_stability" not in c.reports[1].values
    # lime: the median of |P_lime - P_model| recomputed from its own probability
    lime = next(r for r in c.reports if r.name == "lime")
    p = torch.softmax(tiny_gap(seed=4).double()(x.double()), 1)[torch.arange(3), c.targets]
    want = (lime.probability.double() - p).abs().median().item()
    assert rows["lime"]["exactness"] == pytest.approx(want, rel=1e-6)
    # faithfulness of gradcam's maps recomputed directly
    gc = next(r for r in c.reports if r.name == "gradcam")
    f = metrics.faithfulness(model, x, gc.attribution, c.targets, steps=20)
    assert rows["gradcam"]["deletion_auc"] == pytest.approx(f.deletion_auc.median().item())
    # consistency of saliency recomputed directly
    sal = explainers.get("saliency", model, input_shape=SHAPE)
    cons = metrics.consistency(sal, x, c.targets, reference, noise=1e-3, seed=0, clip=(0, 1),
                               zero=float("nan"))
    assert rows["saliency"]["consistency_nn"] == pytest.approx(
        cons.neighbour_cosine.median().item(), rel=1e-6)
    # the openbox-only columns are openbox's
    assert rows["openbox"]["same_region_nn"] is not None
    assert rows["saliency"].get("same_region_nn") is None
    assert rows["lime"]["seed_stability"] is not None and rows["lime"]["own_samples"] is not None


def test_markdown_csv_and_figure(run, tmp_path):
    *_, c = run
    md = c.to_markdown()
    assert md.splitlines()[0].startswith("| method | seconds | exactness")
    for name in METHODS:
        assert f"| {name} |" in md
    assert "Medians over 3 images, nearest neighbours among 12 reference images" in md
    path = c.to_csv(tmp_path / "t.csv")
    with path.open() as f:
        table = list(csv.DictReader(f))
    assert [r["method"] for r in table] == METHODS
    for got, row in zip(table, c.rows()):
        for col in c.columns():
            want = row[col]
            if want is None:
                assert got[col] == ""
            else:
                assert float(got[col]) == want or (math.isnan(want) and got[col] == "nan")
    fig = c.plot(title="t")
    images = [ax for ax in fig.axes if ax.images]
    assert len(images) == 3 * (1 + len(METHODS))


def test_bad_requests_are_refused():
    model = tiny_gap()
    with pytest.raises(ValueError, match="unknown measure"):
        compare(model, inputs(1), input_shape=SHAPE, methods=["saliency"], measures=["speed"])
    with pytest.raises(ValueError, match="needs reference images"):
        compare(model, inputs(1), input_shape=SHAPE, methods=["saliency"])
    with pytest.raises(ValueError, match="unknown explainer"):
        compare(model, inputs(1), input_shape=SHAPE, methods=["salincy"], measures=["exactness"])


def test_a_method_that_cannot_handle_the_model_is_an_error_or_a_note():
    """cam on a model without a GAP head: an error when asked for by name; with
    skip_unsupported (``--methods all``) a note with the reason, the others still run."""
    from tests._explainer_models import tiny_cnn

    with pytest.raises(explainers.UnsupportedModelError, match="cam"):
        compare(tiny_cnn(), inputs(1), input_shape=SHAPE, methods=["cam"],
                measures=["exactness"], progress=False)
    c = compare(tiny_cnn(), inputs(1), input_shape=SHAPE, methods=["cam", "saliency"],
                measures=["faithfulness"], progress=False, skip_unsupported=True)
    assert [r.name for r in c.reports] == ["saliency"]
    assert "global-average-pool" in c.skipped["cam"]
    assert "- cam: not applicable: cam: needs a global-average-pool head" in c.to_markdown()


# ----------------------------------------------------------------------------- CLI


@pytest.fixture
def mlp_checkpoint(tmp_path):
    from openbox.fmnist.checkpoints import save_checkpoint
    from openbox.fmnist.models import build_model

    model = build_model("plnn", 10, hidden=[12, 8], seed=0).eval()
    path = tmp_path / "mlp.pt"
    save_checkpoint(path, model, arch="plnn", arch_kwargs={"hidden": [12, 8]}, num_classes=10)
    return path


def test_cli_compare_writes_the_grid_and_the_tables(mlp_checkpoint, tmp_path, capsys):
    from openbox import cli
    from openbox.fmnist.data import load_sample
    from tests.test_cli import assert_png

    out = tmp_path / "cmp"
    code = cli.main(["compare", str(mlp_checkpoint), "--methods", "openbox,saliency", "--n", "2",
                     "--seed", "3", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("compare.png", "compare.md", "compare.csv"):
        assert (out / name).is_file()
    assert_png(out / "compare.png")
    md = (out / "compare.md").read_text()
    assert md.strip() in printed
    with (out / "compare.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["openbox", "saliency"]
    assert float(rows[0]["exactness"]) <= 1e-12 and rows[1]["exactness"] == ""
    # the images are the seeded draw the command announced
    g = torch.Generator().manual_seed(3)
    index = sorted(torch.randperm(len(load_sample()), generator=g)[:2].tolist())
    assert f"indices {index}" in printed
    # one image and a method with its own samples, two measures
    code = cli.main(["compare", str(mlp_checkpoint), "--methods", "lime", "--index", "7",
                     "--measures", "exactness,faithfulness", "--out", str(out)])
    assert code == 0
    rows = list(csv.DictReader((out / "compare.csv").open()))
    assert rows[0]["method"] == "lime" and 0 < float(rows[0]["exactness"]) < 0.5


@pytest.mark.parametrize("argv, needle", [
    (["--methods", "lime,limes"], "unknown method(s) limes"),
    (["--measures", "speed"], "unknown measure(s) speed"),
    (["--n", "0"], "--n must be >= 1"),
    (["--index", "5000"], "index"),
])
def test_cli_compare_refuses_bad_arguments(mlp_checkpoint, tmp_path, capsys, argv, needle):
    from openbox import cli

    code = cli.main(["compare", str(mlp_checkpoint), *argv, "--out", str(tmp_path / "o")])
    assert code == 2
    assert needle in capsys.readouterr().err
