"""openbox.regions.census: region counts, purity, per-layer structure and merging, against
references computed directly from ``ob.region_key`` / ``ob.configuration`` (keys compared
as keys, patterns as Python tuples, nearest neighbours by an explicit double loop)."""

from __future__ import annotations

import csv
import io
import pickle
import re
from collections import Counter

import numpy as np
import pytest
import torch
from _models import random_cnn, random_input, random_mlp
from torch.utils.data import DataLoader, TensorDataset

import openbox
from openbox.regions.census import Census, census

SHAPE = (1, 12, 12)


@pytest.fixture(scope="module")
def cnn():
    return openbox.OpenBox(random_cnn(3, channels=(3, 4), input_shape=SHAPE), SHAPE)


@pytest.fixture(scope="module")
def mlp():
    return openbox.OpenBox(random_mlp(1, sizes=(4, 6, 5, 3)), (4,))


def _cnn_data(n_base: int = 24, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images, some repeated, some slightly perturbed (a few gates flip, mostly
    in some layers only), a zero and a constant image (on facets); labels 0..2."""
    base = random_input(SHAPE, n_base, seed)
    g = torch.Generator().manual_seed(seed + 1)
    near = base[:8] + 0.05 * torch.randn((8, *SHAPE), generator=g, dtype=torch.float64)
    x = torch.cat([base, base[:6], near, torch.zeros(2, *SHAPE), torch.full((1, *SHAPE), 0.3)])
    perm = torch.randperm(x.shape[0], generator=g)
    y = torch.randint(0, 3, (x.shape[0],), generator=g)
    return x[perm], y


@pytest.fixture(scope="module")
def cnn_data():
    return _cnn_data()


@pytest.fixture(scope="module")
def cnn_census(cnn, cnn_data):
    x, y = cnn_data
    return census(cnn, x, y, batch_size=16, progress=False)


# --------------------------------------------------------------------------- counts


def test_counts_match_the_region_keys_on_known_repeats(mlp):
    x = random_input((4,), 20, seed=5)
    radius = mlp.certified_radius(x[:5])
    assert bool((radius > 0).all())
    g = torch.Generator().manual_seed(9)
    u = torch.randn(5, 4, generator=g, dtype=torch.float64)
    inside = x[:5] + 0.5 * radius[:, None] * u / u.norm(dim=1, keepdim=True)
    data = torch.cat([x, x[:5], inside])  # each of x[:5]: itself, a copy, a point inside
    c = census(mlp, data, progress=False)

    keys = mlp.region_key(data)
    want = Counter(keys)
    assert c.n_inputs == 30
    assert c.n_regions == len(want)
    for key, n in want.items():
        assert c.count(key) == n
        assert c.counts[key.digest16.hex()] == n
    assert sum(c.counts.values()) == 30
    for i in range(5):  # the constructed repeats
        assert keys[i] == keys[20 + i] == keys[25 + i]
        assert c.count(keys[i]) >= 3
    assert list(c.counts.values()) == sorted(c.counts.values(), reverse=True)
    assert c.digests.shape == (30, 16) and c.digests.dtype == np.uint8
    assert [bytes(d) for d in c.digests] == [k.digest16 for k in keys]


def test_on_facet_and_predictions_against_the_configuration(cnn, cnn_data, cnn_census):
    x, _ = cnn_data
    config = cnn.configuration(x)
    assert cnn_census.on_facet == int((config.n_tight > 0).sum()) > 0  # the flat images
    np.testing.assert_array_equal(cnn_census.n_tight, config.n_tight.numpy())
    with torch.no_grad():
        want = cnn.reference(x).argmax(dim=1).numpy()
    np.testing.assert_array_equal(cnn_census.predictions, want)


def test_counts_of_a_cnn_against_the_keys(cnn, cnn_data, cnn_census):
    x, _ = cnn_data
    want = Counter(k.digest16.hex() for k in cnn.region_key(x))
    assert cnn_census.counts == dict(want)
    assert cnn_census.n_regions == len(want) < cnn_census.n_inputs
    sizes, n = cnn_census.region_sizes()
    assert int((sizes * n).sum()) == cnn_census.n_inputs
    assert cnn_census.singletons == sum(v == 1 for v in want.values())


def test_count_refuses_a_key_of_another_context(cnn, mlp, cnn_census):
    key = mlp.region_key(random_input((4,), 1, 0))[0]
    with pytest.raises(ValueError, match="another key context"):
        cnn_census.count(key)


# --------------------------------------------------------------------------- labels


def test_purity_on_a_constructed_case(mlp):
    pts = random_input((4,), 4, seed=11)
    keys = mlp.region_key(pts)
    assert len(set(keys)) == 4  # four different regions: a, b, c, d
    a, b, c_, d = pts
    x = torch.stack([a, a, a, b, b, c_, d, d])
    y = torch.tensor([0, 0, 1, 2, 2, 1, 3, 1])
    c = census(mlp, x, y, progress=False)
    rows = {r.region: r for r in c.regions()}
    ra, rb, rc, rd = (rows[k.digest16.hex()] for k in keys)
    assert (ra.count, ra.majority, ra.purity) == (3, 0, pytest.approx(2 / 3))
    assert (rb.count, rb.majority, rb.purity) == (2, 2, 1.0)
    assert (rc.count, rc.majority, rc.purity) == (1, 1, 1.0)
    assert (rd.count, rd.majority, rd.purity) == (2, 1, 0.5)  # a tie: the smaller label
    assert c.purity == pytest.approx((2 + 2 + 1 + 1) / 8)
    assert c.class_counts(ra.region) == {0: 2, 1: 1}
    assert c.class_counts(rd.region) == {1: 1, 3: 1}
    assert [r.rank for r in c.regions()] == [1, 2, 3, 4] and c.regions()[0] == ra
    unlabelled = census(mlp, x, progress=False)
    assert unlabelled.purity is None and unlabelled.regions()[0].majority is None
    assert unlabelled.prediction_purity == 1.0  # duplicates share their prediction


def test_a_dataloader_of_pairs_gives_the_census_of_the_tensor(cnn, cnn_data, cnn_census):
    x, y = cnn_data
    loader = DataLoader(TensorDataset(x.float(), y), batch_size=7, shuffle=False)
    c = census(cnn, loader, progress=False)
    for name in ("digests", "layer_digests", "n_tight", "predictions", "labels"):
        np.testing.assert_array_equal(getattr(c, name), getattr(cnn_census, name))
    assert c.purity == cnn_census.purity
    np.testing.assert_array_equal(c.neighbours.hamming, cnn_census.neighbours.hamming)
    # batches larger than the census's own are split; the result does not change
    big = census(cnn, DataLoader(TensorDataset(x, y), batch_size=20), batch_size=8,
                 progress=False)
    np.testing.assert_array_equal(big.layer_digests, cnn_census.layer_digests)
    np.testing.assert_array_equal(big.labels, cnn_census.labels)
    # a plain list of x batches: an unlabelled census of the same regions
    plain = census(cnn, [x[:10], x[10:]], progress=False)
    assert plain.labels is None and plain.counts == cnn_census.counts


# --------------------------------------------------------------------------- per layer


def _patterns(ob, x):
    """node -> list of per-input patterns as tuples, straight from the configuration."""
    config = ob.configuration(x)
    out = {}
    for k in ob.program.gates:
        t = config.on[k] if k in config.on else config.select[k]
        out[k] = [tuple(row.reshape(-1).tolist()) for row in t]
    return out


def test_distinct_patterns_per_layer_brute_force(cnn, cnn_data, cnn_census):
    x, _ = cnn_data
    pats = _patterns(cnn, x)
    want = {k: len(set(p)) for k, p in pats.items()}
    assert cnn_census.distinct_patterns == want
    assert [layer.node for layer in cnn_census.layers] == list(cnn.program.gates)
    assert [layer.kind for layer in cnn_census.layers] == ["relu", "maxpool"] * 2
    assert [layer.name for layer in cnn_census.layers] == ["relu1", "pool1", "relu2", "pool2"]
    # the perturbed copies make the layers differ: not every count is the region count
    assert min(want.values()) < cnn_census.n_regions
    assert max(want.values()) <= cnn_census.n_regions


def _nearest_reference(x: np.ndarray) -> np.ndarray:
    n = x.shape[0]
    nn = np.empty(n, dtype=np.int64)
    for i in range(n):
        best, arg = np.inf, -1
        for j in range(n):
            if j != i:
                d = float(((x[i] - x[j]) ** 2).sum())
                if d < best:
                    best, arg = d, j
        nn[i] = arg
    return nn


def test_nearest_neighbour_hamming_per_layer_against_a_direct_computation(
        cnn, cnn_data, cnn_census):
    x, _ = cnn_data
    flat = x.reshape(x.shape[0], -1).numpy()
    nn = _nearest_reference(flat)
    pats = _patterns(cnn, x)
    nb = cnn_census.neighbours
    np.testing.assert_array_equal(nb.index, np.arange(x.shape[0]))
    np.testing.assert_array_equal(nb.neighbour, nn)
    np.testing.assert_allclose(nb.distance, np.linalg.norm(flat - flat[nn], axis=1),
                               rtol=1e-12, atol=1e-12)
    for j, k in enumerate(cnn.program.gates):
        want = np.array([sum(a != b for a, b in zip(pats[k][i], pats[k][nn[i]]))
                         for i in range(len(nn))])
        np.testing.assert_array_equal(nb.hamming[:, j], want)
        stats = cnn_census.layer_stats()[j]
        assert stats.hamming_median == float(np.median(want))
        assert stats.hamming_mean == pytest.approx(want.mean(), rel=1e-12)
    keys = cnn.region_key(x)
    np.testing.assert_array_equal(nb.same_region, [keys[i] == keys[nn[i]] for i in range(len(nn))])
    assert nb.same_region.any() and not nb.same_region.all()  # the copies, and the rest


def test_a_capped_sample_is_uniform_in_size_and_independent_of_batching(cnn, cnn_data):
    x, _ = cnn_data
    a = census(cnn, x, neighbours_n=10, batch_size=3, progress=False, seed=4)
    b = census(cnn, x, neighbours_n=10, batch_size=64, progress=False, seed=4)
    na, nb = a.neighbours, b.neighbours
    assert na.n == 10 and na.n_inputs == x.shape[0]
    assert len(set(na.index.tolist())) == 10 and list(na.index) == sorted(na.index)
    for name in ("index", "neighbour", "hamming", "distance"):
        np.testing.assert_array_equal(getattr(na, name), getattr(nb, name))
    # the neighbours are the nearest within the sample
    sub = x[torch.as_tensor(na.index)]
    nn = _nearest_reference(sub.reshape(10, -1).numpy())
    np.testing.assert_array_equal(na.neighbour, na.index[nn])
    other = census(cnn, x, neighbours_n=10, progress=False, seed=5)
    assert list(other.neighbours.index) != list(na.index)
    assert census(cnn, x, neighbours_n=0, progress=False).neighbours is None


@pytest.mark.parametrize("rows", [3, 7, 256])
def test_nearest_is_the_direct_one_with_exact_ties_and_many_copies(rows, monkeypatch):
    """The blockwise Gram-matrix search with its certification against the double loop:
    small integers (every distance exact, so many exact ties, which go to the earliest),
    more copies of an input than candidates, near ties of 1e-12, and pixel-like data; in
    blocks of 3, 7 and 256 rows."""
    import importlib

    module = importlib.import_module("openbox.regions.census")
    monkeypatch.setattr(module, "DISTANCE_ROWS", rows)
    rng = np.random.default_rng(rows)
    ints = rng.integers(0, 3, (40, 5)).astype(np.float64)
    copies = rng.random((30, 6))
    copies[5:13] = copies[3]  # 9 equal rows: more than NEIGHBOUR_CANDIDATES
    copies[20] = copies[1] + 1e-12
    copies[21] = copies[1] - 1e-12
    pixels = rng.integers(0, 256, (50, 64)) / 255.0
    pixels[10:20] = pixels[0]
    cases = [ints, copies, pixels, ints[:2], ints[:3], ints[:5], copies[:6]]
    for x in cases:
        np.testing.assert_array_equal(module._nearest(np.ascontiguousarray(x)),
                                      _nearest_reference(x))


def test_the_default_batch_size_and_its_fallback(cnn, cnn_data, monkeypatch):
    """census.CENSUS_BATCH sets the passes' size (None: ob.batch_size); the census does
    not depend on it."""
    import importlib

    module = importlib.import_module("openbox.regions.census")
    x, y = cnn_data
    seen, real = [], cnn.configure

    def spy(xb, **kw):
        seen.append(xb.shape[0])
        return real(xb, **kw)

    monkeypatch.setattr(cnn, "configure", spy)
    monkeypatch.setattr(module, "CENSUS_BATCH", 10)
    a = census(cnn, x, y, progress=False)
    # (passes side by side may start out of order)
    assert sorted(seen) == sorted([10] * (x.shape[0] // 10) + [x.shape[0] % 10])
    seen.clear()
    monkeypatch.setattr(module, "CENSUS_BATCH", None)
    b = census(cnn, x, y, progress=False)
    assert seen == [min(cnn.batch_size, x.shape[0])] * 1
    for name in ("digests", "layer_digests", "n_tight", "predictions", "labels"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in ("index", "neighbour", "distance", "hamming", "same_region"):
        np.testing.assert_array_equal(getattr(a.neighbours, name), getattr(b.neighbours, name))


def test_growing_columns_of_an_iterable_give_the_census_of_the_tensor(cnn, cnn_data,
                                                                     cnn_census, monkeypatch):
    """A tensor's columns are allocated once at N; an iterable's grow by doubling (here
    from 3 rows): the same census either way."""
    import importlib

    module = importlib.import_module("openbox.regions.census")
    monkeypatch.setattr(module._Rows, "FIRST", 3)
    x, y = cnn_data
    c = census(cnn, DataLoader(TensorDataset(x, y), batch_size=5), batch_size=16,
               progress=False)
    for name in ("digests", "layer_digests", "n_tight", "predictions", "labels"):
        np.testing.assert_array_equal(getattr(c, name), getattr(cnn_census, name))
        assert getattr(c, name).shape[0] == x.shape[0]


# --------------------------------------------------------------------------- merging


def test_two_halves_merged_equal_the_whole(cnn, cnn_data, cnn_census):
    x, y = cnn_data
    h = x.shape[0] // 2
    a = census(cnn, x[:h], y[:h], progress=False)
    b = census(cnn, x[h:], y[h:], progress=False)
    for merged in (a.merge(b), a + b, sum([a, b]), pickle.loads(pickle.dumps(a)) + b):
        assert merged.counts == cnn_census.counts
        assert merged.n_regions == cnn_census.n_regions < a.n_regions + b.n_regions
        assert merged.distinct_patterns == cnn_census.distinct_patterns
        assert merged.on_facet == cnn_census.on_facet
        assert merged.purity == cnn_census.purity
        np.testing.assert_array_equal(merged.digests, cnn_census.digests)
        assert merged.neighbours is None  # dropped, never combined
    assert "not computed" in (a + b).layer_table()
    assert a.neighbours is not None  # the operands are left alone
    thirds = census(cnn, x[:10], y[:10], progress=False).merge(
        census(cnn, x[10:20], y[10:20], progress=False), census(cnn, x[20:], y[20:],
                                                                progress=False))
    assert thirds.counts == cnn_census.counts


def test_merging_censuses_of_different_models_dtypes_or_directions_raises(cnn, cnn_data,
                                                                         cnn_census):
    x, y = cnn_data
    other_model = openbox.OpenBox(random_cnn(4, channels=(3, 4), input_shape=SHAPE), SHAPE)
    other_dtype = openbox.OpenBox(random_cnn(3, channels=(3, 4), input_shape=SHAPE), SHAPE,
                                  dtype=torch.float32)
    other_direction = openbox.OpenBox(random_cnn(3, channels=(3, 4), input_shape=SHAPE), SHAPE,
                                      direction=torch.ones(SHAPE))
    same = openbox.OpenBox(random_cnn(3, channels=(3, 4), input_shape=SHAPE), SHAPE)
    assert (cnn_census + census(same, x[:5], y[:5], progress=False)).n_inputs == len(x) + 5
    for ob in (other_model, other_dtype, other_direction):
        c = census(ob, x[:5], y[:5], progress=False)
        with pytest.raises(ValueError, match="different key contexts"):
            cnn_census.merge(c)
        with pytest.raises(ValueError, match="different key contexts"):
            c + cnn_census
    with pytest.raises(ValueError, match="labelled census with an unlabelled"):
        cnn_census.merge(census(cnn, x[:5], progress=False))
    with pytest.raises(TypeError):
        cnn_census.merge("not a census")


# --------------------------------------------------------------------------- tables


def test_to_csv_holds_every_region(cnn_census, tmp_path):
    buf = io.StringIO()
    cnn_census.to_csv(buf, classes=["zero", "one", "two"])
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert len(rows) == cnn_census.n_regions
    assert sum(int(r["inputs"]) for r in rows) == cnn_census.n_inputs
    for r, want in zip(rows, cnn_census.regions()):
        assert int(r["inputs"]) == cnn_census.counts[r["region"]] == want.count
        assert int(r["majority"]) == want.majority
        assert r["majority_class"] == ["zero", "one", "two"][want.majority]
        assert float(r["purity"]) == want.purity
        assert float(r["share"]) == want.count / cnn_census.n_inputs
        assert int(r["on_facet"]) == want.on_facet
    assert sum(int(r["on_facet"]) for r in rows) == cnn_census.on_facet
    path = tmp_path / "census.csv"
    cnn_census.to_csv(path, top=3)
    assert len(path.read_text().splitlines()) == 4


def test_to_markdown_holds_the_top_regions_and_the_rest(cnn_census):
    text = cnn_census.to_markdown(top=3, classes=["zero", "one", "two"])
    rows = re.findall(r"^\| (\d+) \| `([0-9a-f]{32})` \| (\d+) \| ([\d.]+)% \| (\d) \((\w+)\) "
                      r"\| ([\d.]+) \| (\d+) \|$", text, flags=re.M)
    assert len(rows) == 3
    for (rank, region, n, share, major, name, purity, facet), want in zip(
            rows, cnn_census.regions(3)):
        assert (int(rank), region, int(n)) == (want.rank, want.region, want.count)
        assert int(major) == want.majority and name == ["zero", "one", "two"][want.majority]
        assert float(purity) == pytest.approx(want.purity, abs=5e-5)
        assert float(share) == pytest.approx(100 * want.share, abs=5e-3)
        assert int(facet) == want.on_facet
    rest = re.search(r"^\| \| (\d+) other regions \| (\d+) \|", text, flags=re.M)
    assert int(rest[1]) == cnn_census.n_regions - 3
    assert int(rest[2]) + sum(int(r[2]) for r in rows) == cnn_census.n_inputs
    assert f"{cnn_census.n_inputs:,} inputs in {cnn_census.n_regions:,} regions" in text
    assert f"{cnn_census.on_facet:,} on a facet" in text


def test_layer_table_holds_the_per_layer_numbers(cnn_census):
    text = cnn_census.layer_table()
    rows = [line.split("|")[1:-1] for line in text.splitlines()
            if re.match(r"^\| \d+ \|", line)]
    assert len(rows) == len(cnn_census.layers)
    for cells, layer, stats in zip(rows, cnn_census.layers, cnn_census.layer_stats()):
        cells = [c.strip() for c in cells]
        assert int(cells[0]) == layer.node and cells[1] == layer.name
        assert int(cells[3]) == layer.units and int(cells[4]) == stats.distinct
        assert float(cells[5]) == pytest.approx(stats.hamming_median, rel=1e-3)
        assert float(cells[6]) == pytest.approx(stats.hamming_mean, rel=1e-3)
    total = re.search(r"^\|  \| all gates \|  \| (\d+) \| (\d+) \|", text, flags=re.M)
    assert int(total[1]) == sum(layer.units for layer in cnn_census.layers)
    assert int(total[2]) == cnn_census.n_regions
    assert f"sample of {cnn_census.n_inputs:,} of the {cnn_census.n_inputs:,}" in text


def test_plot_draws_the_region_size_histogram(cnn_census, tmp_path):
    ax = cnn_census.plot()
    heights = [p.get_height() for p in ax.patches]
    sizes, n = cnn_census.region_sizes()
    assert heights == n.tolist()
    ax.figure.savefig(tmp_path / "census.png")
    assert (tmp_path / "census.png").stat().st_size > 0


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("data, labels, message", [
    (torch.zeros(3, 1, 10, 10), None, r"must have shape \(B, 1, 12, 12\)"),
    (torch.zeros(3, 144), None, r"must have shape \(B, 1, 12, 12\)"),
    (torch.zeros(0, 1, 12, 12), None, "no inputs"),
    ([], None, "no inputs"),
    (iter([]), None, "no inputs"),
    (torch.zeros(3, 1, 12, 12), torch.zeros(2, dtype=torch.int64), r"labels must have shape"),
    (torch.zeros(3, 1, 12, 12), torch.zeros(3), "integer class labels"),
    ([torch.zeros(3, 1, 12, 12)], torch.zeros(3, dtype=torch.int64), "carry their own labels"),
    ([{"x": torch.zeros(3, 1, 12, 12)}], None, "data batch 0 must be a tensor x or a pair"),
    ([(torch.zeros(2, *SHAPE), torch.zeros(2, dtype=torch.int64)), torch.zeros(2, *SHAPE)],
     None, "some batches of data carry labels"),
    ([torch.zeros(2, *SHAPE), torch.zeros(2, 1, 11, 12)], None, "data batch 1 must have shape"),
    ([torch.full((2, *SHAPE), float("nan"))], None, "NaN"),
    ("images/", None, "data must be a tensor"),
    (torch.zeros(3, 1, 12, 12, dtype=torch.int64), None, "floating tensor"),
])
def test_bad_input_gives_a_clear_error(cnn, data, labels, message):
    with pytest.raises(ValueError, match=message):
        census(cnn, data, labels, progress=False)


def test_progress_bar_goes_to_stderr(cnn, capsys):
    census(cnn, [torch.zeros(2, *SHAPE)] * 3, progress=True)
    captured = capsys.readouterr()
    assert "census:" in captured.err and "/3 " in captured.err and captured.out == ""
    census(cnn, [torch.zeros(2, *SHAPE)] * 3, progress=False)
    assert capsys.readouterr().err == ""


def test_bad_options(cnn):
    x = torch.zeros(2, *SHAPE)
    with pytest.raises(ValueError, match="batch_size"):
        census(cnn, x, batch_size=0)
    with pytest.raises(ValueError, match="neighbours_n"):
        census(cnn, x, neighbours_n=-1)
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="workers"):
            census(cnn, x, workers=bad)


@pytest.fixture
def two_threads():
    """torch on 2 intra-op threads for one test (the suite runs on 1: conftest)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield 2
    torch.set_num_threads(before)


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_batches_side_by_side_give_the_same_census(workers, cnn, cnn_data, cnn_census,
                                                    two_threads):
    """Any number of passes at once (threads, torch's 2 threads split among them) gives
    the census one pass at a time gives, in the data's order, and torch's thread count is
    restored."""
    x, y = cnn_data
    c = census(cnn, x, y, batch_size=4, progress=False, workers=workers)
    assert torch.get_num_threads() == two_threads
    one = census(cnn, x, y, batch_size=4, progress=False, workers=1)
    for name in ("digests", "layer_digests", "n_tight", "predictions", "labels"):
        np.testing.assert_array_equal(getattr(c, name), getattr(one, name))
        np.testing.assert_array_equal(getattr(c, name), getattr(cnn_census, name))
    np.testing.assert_array_equal(c.neighbours.hamming, one.neighbours.hamming)
    np.testing.assert_array_equal(c.neighbours.distance, one.neighbours.distance)


def test_an_error_in_a_later_batch_restores_torch_threads(cnn, cnn_data, two_threads):
    x, _ = cnn_data
    bad = [x[:4], x[4:8], torch.full((2, *SHAPE), float("nan")), x[8:12]]
    with pytest.raises(ValueError, match="batch 2"):
        census(cnn, bad, progress=False, workers=2)
    assert torch.get_num_threads() == two_threads


def test_censuses_at_once_in_threads_restore_torch_threads(cnn, cnn_data, cnn_census,
                                                          two_threads):
    """Two censuses in two threads of one process, each splitting torch's threads: both
    results are the census, and the thread count before them is restored."""
    from concurrent.futures import ThreadPoolExecutor

    x, y = cnn_data
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda _: census(cnn, x, y, batch_size=4, progress=False,
                                             workers=2), range(2)))
    assert torch.get_num_threads() == two_threads
    for c in got:
        np.testing.assert_array_equal(c.digests, cnn_census.digests)
        np.testing.assert_array_equal(c.layer_digests, cnn_census.layer_digests)


def test_default_workers_follow_torch_threads(cnn, monkeypatch):
    import importlib

    module = importlib.import_module("openbox.regions.census")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    assert module.default_workers(cnn) == 2
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    from openbox import parallel

    assert module.default_workers(cnn) == parallel.MAX_WORKERS
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert module.default_workers(cnn) == 1


def test_a_single_input_has_one_region_and_no_neighbours(cnn):
    c = census(cnn, torch.zeros(1, *SHAPE), progress=False)
    assert isinstance(c, Census) and (c.n_inputs, c.n_regions, c.singletons) == (1, 1, 1)
    assert c.neighbours is None and "not computed" in c.layer_table()


# --------------------------------------------------------------------------- fast paths


def _pool_models():
    """(model, input shape): max-pools whose windows are a regular grid (non-overlapping,
    overlapping, stride 1, 1-D) and one with padding (the gathered window table)."""
    from collections import OrderedDict

    from _models import conv1d_net, randomize_
    from torch import nn

    def net(seed, pool, shape=(2, 9, 9)):
        c, h, w = shape
        body = nn.Sequential(OrderedDict(conv=nn.Conv2d(c, 3, 3, padding=1), relu=nn.ReLU(),
                                         pool=pool, flatten=nn.Flatten()))
        n = body(torch.zeros(1, *shape)).shape[1]
        return randomize_(nn.Sequential(*body, nn.Linear(n, 4)), seed).eval(), shape

    return [
        (random_cnn(3, channels=(3, 4), input_shape=SHAPE), SHAPE),
        net(1, nn.MaxPool2d(3, stride=2)),
        net(2, nn.MaxPool2d(2, stride=1)),
        net(3, nn.MaxPool2d((2, 3), stride=(1, 2))),
        net(4, nn.MaxPool2d(3, stride=2, padding=1)),
        (conv1d_net(5), (3, 20)),
    ]


@pytest.mark.parametrize("case", range(6))
def test_grid_maxpool_gives_the_window_tables_configuration(case, monkeypatch):
    """The strided-view max-pool of the configuration pass against the gathered window
    table (kept as the reference path): same logits, rates, gates, selections, indices,
    facet counts and gate values, on inputs with ties (zeros, constants, repeats) and
    under a lexicographic and a per-input tie-break."""
    from openbox import configuration as cfg

    model, shape = _pool_models()[case]
    ob = openbox.OpenBox(model, shape)
    pools = [n for n in ob.program.nodes if type(n).__name__ == "MaxPool"]
    assert pools and [cfg._pool_grid(n) is None for n in pools] == [case == 4] * len(pools)
    base = random_input(shape, 10, case)
    x = torch.cat([base, base[:3], torch.zeros(2, *shape), torch.full((2, *shape), 0.3),
                   base[:2].round(decimals=1)])
    x = ob.check_input(x)
    g = torch.Generator().manual_seed(case)
    directions = [ob.direction,
                  torch.randn((2, *shape), generator=g, dtype=torch.float64),
                  torch.randn((2, x.shape[0], *shape), generator=g, dtype=torch.float64)]
    for d in directions:
        fast = cfg.configure(ob.program, x, d, ob.tol, record=True, context=ob.key_context)
        with monkeypatch.context() as m:
            m.setattr(cfg, "_pool_grid", lambda node: None)
            ref = cfg.configure(ob.program, x, d, ob.tol, record=True, context=ob.key_context)
        assert torch.equal(fast.logits, ref.logits) and torch.equal(fast.rates, ref.rates)
        a, b = fast.configuration, ref.configuration
        assert a.region_keys() == b.region_keys()
        for name in ("on", "select", "index"):
            da, db = getattr(a, name), getattr(b, name)
            assert da.keys() == db.keys()
            assert all(torch.equal(da[k], db[k]) and da[k].dtype == db[k].dtype for k in da)
        assert torch.equal(a.n_tight_relu, b.n_tight_relu)
        assert torch.equal(a.n_tight_pool, b.n_tight_pool)
        for name in ("values", "derivatives", "derivatives2"):
            da, db = getattr(fast.gate_values, name), getattr(ref.gate_values, name)
            assert (da is None) == (db is None)
            assert da is None or all(torch.equal(da[k], db[k]) for k in da)
    assert int(ref.configuration.n_tight.sum()) > 0  # the data does reach facets


def _reference_digests(ob, x, batch_size):
    """The census's digests as first written: per batch, the region keys' digest16 and a
    BLAKE2b of each layer's pattern, input by input."""
    import hashlib

    from openbox.regions.census import _layers, _patterns

    layers = _layers(ob.program)
    keys, per_layer = [], []
    for i in range(0, x.shape[0], batch_size):
        config = ob.configure(ob.check_input(x[i : i + batch_size])).configuration
        keys += [k.digest16 for k in config.region_keys()]
        pats = [np.ascontiguousarray(p) for p in _patterns(config, layers)]
        for i in range(config.batch_size):
            per_layer.append([hashlib.blake2b(p[i].tobytes(), digest_size=16).digest()
                              for p in pats])
    return keys, per_layer


@pytest.mark.parametrize("which", ["cnn", "mlp", "pool1", "pool3", "conv1d", "linear"])
def test_census_digests_match_the_reference(which, cnn, mlp, cnn_data):
    if which == "cnn":
        ob, x = cnn, cnn_data[0]
    elif which == "linear":  # no gates: one region, keys of the context alone
        ob = openbox.OpenBox(torch.nn.Sequential(torch.nn.Linear(4, 3)).double(), (4,))
        x = random_input((4,), 9, 3)
    elif which == "mlp":
        ob = mlp
        x = torch.cat([random_input((4,), 20, 1), torch.zeros(2, 4)])
    else:
        model, shape = _pool_models()[{"pool1": 1, "pool3": 3, "conv1d": 5}[which]]
        ob = openbox.OpenBox(model, shape)
        x = torch.cat([random_input(shape, 20, 2), torch.zeros(3, *shape)])
    c = census(ob, x, batch_size=7, progress=False)
    keys, per_layer = _reference_digests(ob, x, 7)
    assert [bytes(d) for d in c.digests] == keys
    assert [[bytes(d) for d in row] for row in c.layer_digests] == per_layer
    assert c.layer_digests.shape == (x.shape[0], len(c.layers), 16)
