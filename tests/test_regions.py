"""openbox.regions: the batched segment walk and exact integrated gradients.

References: the sequential walk, dense sampling of region keys along the segment, the
model's own forward (completeness), Captum's Riemann IG, and a linear network's
closed form.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _models import random_cnn, random_mlp, resnet_like
from torch import nn

import openbox
from openbox.regions import ExactIntegratedGradients, integrated_gradients, segment

F64 = torch.float64


def small_cnn(seed, pool="max"):
    return random_cnn(seed, channels=(3, 4), input_shape=(1, 12, 12), pool=pool)


CASES = [
    ("cnn-max", lambda s: small_cnn(s), (1, 12, 12)),
    ("cnn-avg", lambda s: small_cnn(s, "avg"), (1, 12, 12)),
    ("resnet", lambda s: resnet_like(s), (2, 10, 10)),
    ("mlp", lambda s: random_mlp(s, (6, 10, 8, 4)), (6,)),
]


def _images(shape, seed, n=2, zeros=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((n, *shape), generator=g, dtype=F64)
    if zeros and len(shape) == 3:  # a shared zero background: ties along the whole segment
        x[:, :, :3, :] = 0.0
    return x


@pytest.mark.parametrize("name, build, shape", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_batched_walk_equals_sequential_walk(name, build, shape, seed):
    """Walkers side by side give the sequential walk's pieces bit for bit (the same chain
    of points), for any number of walkers; the walk before the line pass (pointwise:
    the points' own values, steps from step_along) agrees to 1e-12."""
    ob = openbox.OpenBox(build(seed), shape)
    x = _images(shape, seed)
    seq = segment(ob, x[0], x[1], method="sequential", progress=False)
    for walkers in (2, 3, 16, 64):
        bat = segment(ob, x[0], x[1], walkers=walkers, progress=False)
        assert [(p.t_start, p.t_end, p.region_key, p.prediction) for p in bat] == \
            [(p.t_start, p.t_end, p.region_key, p.prediction) for p in seq]
    old = segment(ob, x[0], x[1], method="pointwise", progress=False)
    assert [p.region_key for p in old] == [p.region_key for p in seq]
    np.testing.assert_allclose([p.t_end for p in old], [p.t_end for p in seq],
                               rtol=0, atol=1e-12)
    assert len(seq) >= 3


def test_walkers_join_exactly_at_seams_inside_facet_clusters():
    """Walkers started inside a cluster of facets far closer than the tie tolerance
    (a ReLU layer whose units have kinks 1e-15 apart along the line) still give the
    sequential chain: a walker is joined only on a point of its own chain."""
    torch.manual_seed(0)
    n = 40
    lin = nn.Linear(1, n).double()
    with torch.no_grad():
        lin.weight.fill_(1.0)
        lin.bias.copy_(-(0.5 + 1e-15 * torch.arange(n, dtype=F64)))  # kinks at t ~ 0.5
    model = nn.Sequential(lin, nn.ReLU(), nn.Linear(n, 3).double())
    ob = openbox.OpenBox(model, (1,))
    x0, x1 = torch.zeros(1, dtype=F64), torch.ones(1, dtype=F64)
    seq = segment(ob, x0, x1, method="sequential", progress=False)
    for walkers in (2, 5, 16):
        bat = segment(ob, x0, x1, walkers=walkers, progress=False)
        assert [(p.t_start, p.t_end, p.region_key) for p in bat] == \
            [(p.t_start, p.t_end, p.region_key) for p in seq]
    assert 2 <= len(seq) <= n + 1


@pytest.mark.parametrize("name, build, shape", CASES[:3], ids=[c[0] for c in CASES[:3]])
def test_dense_sampling_finds_exactly_the_reported_pieces(name, build, shape):
    ob = openbox.OpenBox(build(3), shape)
    x = _images(shape, 3, zeros=False)
    pieces = segment(ob, x[0], x[1], progress=False)
    ts = torch.linspace(0, 1, 3001, dtype=F64)
    keys = ob.region_key(x[0] + ts.reshape(-1, *[1] * len(shape)) * (x[1] - x[0]))
    starts = np.array([p.t_start for p in pieces])
    seen = set()
    for t, k in zip(ts.tolist(), keys):
        p = pieces[int(np.searchsorted(starts, t, side="right")) - 1]
        if p.t_start + 1e-9 < t < p.t_end - 1e-9:
            assert k == p.region_key, f"t={t}: sampled key differs from its piece's"
            seen.add(k)
    # every piece long enough to hold a sample was seen, and no sample found another key
    long = {p.region_key for p in pieces if p.t_end - p.t_start > 2 / 3000}
    assert long <= seen


def test_with_llc_attaches_each_pieces_exact_classifier():
    model = small_cnn(4)
    ob = openbox.OpenBox(model, (1, 12, 12))
    x = _images((1, 12, 12), 4, zeros=False)
    pieces = segment(ob, x[0], x[1], with_llc=True, progress=False)
    ref = copy.deepcopy(model).double()
    for p in pieces[:: max(1, len(pieces) // 10)]:
        t = 0.5 * (p.t_start + p.t_end)
        xt = x[0] + t * (x[1] - x[0])
        with torch.no_grad():
            want = ref(xt[None])[0]
        got = (p.weight.flatten(1) @ xt.flatten()) + p.bias
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_segment_bad_input():
    ob = openbox.OpenBox(random_mlp(1, (4, 6, 3)), (4,))
    z = torch.zeros(4, dtype=F64)
    with pytest.raises(ValueError, match="same point"):
        segment(ob, z, z, progress=False)
    with pytest.raises(ValueError, match="method must be"):
        segment(ob, z, z + 1, method="fast", progress=False)
    with pytest.raises(ValueError, match="walkers must be"):
        segment(ob, z, z + 1, walkers=0, progress=False)


# --------------------------------------------------------------------------- exact IG


@pytest.mark.parametrize("name, build, shape", CASES, ids=[c[0] for c in CASES])
def test_exact_ig_is_complete(name, build, shape):
    model = build(5)
    ob = openbox.OpenBox(model, shape)
    x = _images(shape, 5, n=3)
    base = _images(shape, 6, n=3) * 0.1
    target = torch.tensor([0, 1, 2])
    attr, pieces = integrated_gradients(ob, x, base, target, return_pieces=True,
                                        progress=False)
    assert attr.shape == x.shape and bool((pieces > 1).all())
    ref = copy.deepcopy(model).double()
    with torch.no_grad():
        gap = ref(x)[torch.arange(3), target] - ref(base)[torch.arange(3), target]
    torch.testing.assert_close(attr.flatten(1).sum(1), gap, rtol=0, atol=1e-10)


def test_exact_ig_on_a_network_linear_along_the_path_is_saliency_times_difference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)).double().eval()
    with torch.no_grad():
        model[0].bias.fill_(10.0)  # every ReLU on for inputs in [0, 1]: linear on the path
    ob = openbox.OpenBox(model, (5,))
    x = torch.rand((2, 5), generator=torch.Generator().manual_seed(1), dtype=F64)
    attr = integrated_gradients(ob, x, None, 1, progress=False)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(model(xg)[:, 1].sum(), xg)
    torch.testing.assert_close(attr, grad * x, rtol=1e-12, atol=1e-14)


def test_captum_ig_approaches_exact_ig_as_steps_grow():
    captum = pytest.importorskip("captum.attr")
    model = random_mlp(7, (6, 12, 10, 3), batch_norm=False)
    ob = openbox.OpenBox(model, (6,))
    x = torch.rand((2, 6), generator=torch.Generator().manual_seed(2), dtype=F64) * 3
    exact = integrated_gradients(ob, x, None, 2, progress=False)
    ig = captum.IntegratedGradients(copy.deepcopy(model).double())
    errors = []
    for steps in (50, 1000, 20000):
        approx = ig.attribute(x, target=2, n_steps=steps, method="riemann_trapezoid",
                              internal_batch_size=5000)
        errors.append(float((approx - exact).abs().max() / exact.abs().max()))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-4


def test_captum_style_interface_and_convergence_delta():
    model = small_cnn(8)
    x = _images((1, 12, 12), 8, n=2)
    ig = ExactIntegratedGradients(model, input_shape=(1, 12, 12))
    attr, delta = ig.attribute(x, baselines=0.0, target=torch.tensor([1, 3]),
                               return_convergence_delta=True)
    assert attr.shape == x.shape and delta.shape == (2,)
    assert float(delta.abs().max()) <= 1e-10
    again = ig.attribute(x, target=torch.tensor([1, 3]))
    torch.testing.assert_close(again, attr, rtol=0, atol=0)
    with pytest.raises(ValueError, match="target must lie"):
        ig.attribute(x, target=99)
    with pytest.raises(TypeError, match="nn.Module or an OpenBox"):
        ExactIntegratedGradients("model")


@pytest.mark.parametrize("name, build, shape", [CASES[0], CASES[3]], ids=["cnn-max", "mlp"])
def test_backward_split_composes_to_the_whole_backward(name, build, shape):
    """backward_to (output -> the tail's split) then backward_from (split -> input) is
    compose_backward's weight, and the whole equals torch autograd of the fixed network
    at the point (float64)."""
    from openbox.configuration import line_split
    from openbox.linear_maps import backward_from, backward_to, compose_backward

    model = build(6)
    ob = openbox.OpenBox(model, shape)
    x = _images(shape, 6, n=3, zeros=False)
    split = line_split(ob.program)
    assert split is not None
    config = ob.configuration(x)
    rows = torch.randn((3, 2, ob.num_classes), generator=torch.Generator().manual_seed(0),
                       dtype=F64)
    whole, _ = compose_backward(ob.program, config, rows)
    mid = backward_to(ob.program, config, rows, split + 1)
    assert mid.shape == (3, 2, *ob.program.shape_of(split + 1))
    torch.testing.assert_close(backward_from(ob.program, config, mid, split + 1), whole,
                               rtol=1e-12, atol=1e-12)
    ref = copy.deepcopy(model).double()
    for i in range(3):
        xi = x[i : i + 1].clone().requires_grad_(True)
        out = ref(xi)
        (g,) = torch.autograd.grad((out * rows[i, 0]).sum(), xi)
        torch.testing.assert_close(whole[i, 0], g[0], rtol=1e-10, atol=1e-10)


def _tail_cnn(seed, act, pool2):
    """conv-ReLU-maxpool-conv-act-pool2-linear on (1, 12, 12): the tail (after the second
    conv) has the gate ``act`` and the pool ``pool2``."""
    from _models import randomize_

    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                          nn.Conv2d(3, 4, 3, padding=1), act, pool2, nn.Flatten(),
                          nn.Linear(4 * 9 if isinstance(pool2, nn.MaxPool2d)
                                    and pool2.padding else 4 * 9, 3))
    return randomize_(model, seed).eval()


TAIL_CASES = [
    ("relu-grid", lambda s: _tail_cnn(s, nn.ReLU(), nn.MaxPool2d(2, ceil_mode=True))),
    ("relu-padded", lambda s: _tail_cnn(s, nn.ReLU(), nn.MaxPool2d(3, 2, padding=1))),
    ("leaky-grid", lambda s: _tail_cnn(s, nn.LeakyReLU(0.1), nn.MaxPool2d(2, ceil_mode=True))),
    ("reference", lambda s: small_cnn(s)),
]


@pytest.mark.parametrize("name, build", TAIL_CASES, ids=[c[0] for c in TAIL_CASES])
def test_line_pass_tail_without_u_is_the_three_stream_pass(name, build, monkeypatch):
    """The line pass runs its tail on the intercept and d streams only and redoes with u
    the points whose tail has a tie only u decides: configurations, tied counts, logits,
    rates and exits equal those of the pass that carries u everywhere (split=None), bit
    for bit, and so do the tail steps (configure_line_tail) at new points. A constant
    patch both ends share makes u-decided ties in the tail (checked: the redo runs)."""
    from openbox import configuration as cf

    redone = []
    real = cf._tail_with_u

    def spy(program, tol, run, *args):
        if run.need_u is not None:
            redone.append(int(run.need_u.sum()))
        return real(program, tol, run, *args)

    monkeypatch.setattr(cf, "_tail_with_u", spy)
    for seed in (0, 1, 2):
        ob = openbox.OpenBox(build(seed), (1, 12, 12))
        x = _images((1, 12, 12), seed)
        x[:, :, 1:11, 1:11] = 0.25  # a shared patch, not zero: ReLUs on along the segment
        split = cf.line_split(ob.program)
        assert split is not None
        d = x[1] - x[0]
        ts = torch.cat([torch.linspace(0, 1, 23, dtype=F64), torch.tensor([0.5, 0.5])])
        args = (ob.program, x[:1], d, ob.direction, ts, ob.tol)
        lp = cf.configure_line(*args, split=split)
        ref = cf.configure_line(*args)
        assert np.array_equal(lp.configuration.packed(), ref.configuration.packed())
        for a, b in [(lp.logits, ref.logits), (lp.rates, ref.rates), (lp.exit, ref.exit),
                     (lp.configuration.n_tight_relu, ref.configuration.n_tight_relu),
                     (lp.configuration.n_tight_pool, ref.configuration.n_tight_pool)]:
            assert torch.equal(a, b)
        # tail steps: at points just past each tail exit still inside the head's region
        rows = torch.arange(ts.numel())
        t_new = torch.minimum(lp.tail.tail_exit, torch.ones(()))
        keep = t_new < lp.tail.head_guard
        rows, t_new = rows[keep], t_new[keep]
        if rows.numel() == 0:
            continue
        gates, logits, rates, tail_exit = cf.configure_line_tail(ob.program, lp.tail, rows,
                                                                 t_new, ob.tol)
        whole = cf.with_head(lp.configuration, gates, lp.tail, rows)
        there = cf.configure_line(ob.program, x[:1], d, ob.direction, t_new, ob.tol)
        assert np.array_equal(whole.packed(), there.configuration.packed())
        assert torch.equal(whole.n_tight, there.configuration.n_tight)
        assert torch.equal(logits, there.logits) and torch.equal(rates, there.rates)
        for i in range(rows.numel()):  # one point at a time (a walk's last tail steps)
            one, lg, _, _ = cf.configure_line_tail(ob.program, lp.tail, rows[i : i + 1],
                                                   t_new[i : i + 1], ob.tol)
            whole = cf.with_head(lp.configuration, one, lp.tail, rows[i : i + 1])
            assert np.array_equal(whole.packed(), there.configuration.packed()[i : i + 1])
            assert torch.equal(lg, there.logits[i : i + 1])
    assert any(n > 0 for n in redone), "no tail tie needed u: the redo went untested"


@pytest.mark.parametrize("sparse", [1, 10**9], ids=["always-sparse", "always-dense"])
def test_relu_tie_break_on_the_tied_inputs_alone_is_the_dense_rule(sparse, monkeypatch):
    """The ReLU tie-break runs on the gathered tied inputs when few tie (SPARSE_TIES):
    forced either way, configure and the line pass give the same configurations,
    tied counts, logits and exits. Ties here: a zero input (ReLU inputs = biases, set
    to 0 on some channels: tied, moving along the directions) and a channel with zero
    weights and bias (tied and constant)."""
    from _models import randomize_

    from openbox import configuration as cf

    model = randomize_(nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 36, 3)), 3)
    with torch.no_grad():
        model[0].bias[:2] = 0.0
        model[3].weight[1] = 0.0
        model[3].bias[1] = 0.0
    ob = openbox.OpenBox(model.eval(), (1, 12, 12))
    x = _images((1, 12, 12), 4, n=5)
    x[0] = 0.0
    d = x[2] - x[0]
    ts = torch.linspace(0, 1, 9, dtype=F64)
    results = {}
    for mode in ("reference", "forced"):
        monkeypatch.setattr(cf, "SPARSE_TIES", 10**9 if mode == "reference" else sparse)
        pas = cf.configure(ob.program, x, ob.direction, ob.tol)
        line = cf.configure_line(ob.program, x[:1], d, ob.direction, ts, ob.tol,
                                 split=cf.line_split(ob.program))
        results[mode] = (pas.configuration.packed(), pas.configuration.n_tight, pas.logits,
                         line.configuration.packed(), line.configuration.n_tight,
                         line.logits, line.exit)
    ref, got = results["reference"], results["forced"]
    assert int(ref[1][0]) > 0 and int(ref[4][0]) > 0  # ties that moved were counted
    for a, b in zip(ref, got):
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else torch.equal(a, b)


class _TwoReaders(nn.Module):
    """conv -> ReLU, whose output a max-pool and an average pool both read (no table)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.pool, self.avg = nn.MaxPool2d(2), nn.AvgPool2d(2)
        self.fc = nn.Linear(4 * 36, 3)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.fc((self.pool(h) + self.avg(h)).flatten(1))


def _table_net(pool, act=None, seed=0):
    from _models import randomize_

    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), act or nn.ReLU(), pool, nn.Conv2d(4, 4, 3, padding=1),
        nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 12, 12))  # shapes the lazy layer
    randomize_(model, seed)
    with torch.no_grad():  # flat ties: channel 0 on over a zero patch, channel 1 off
        model[0].bias[0], model[0].bias[1] = 0.3, -0.3
        model[0].weight[2] = torch.round(model[0].weight[2] * 4) / 4  # coarse: exact ties
    return model.eval()


TABLE_CASES = [
    ("2x2", lambda: _table_net(nn.MaxPool2d(2)), True),
    ("1x2", lambda: _table_net(nn.MaxPool2d((1, 2))), True),
    ("2x2-overlapping", lambda: _table_net(nn.MaxPool2d(2, stride=1)), True),
    ("3x3 (9 entries)", lambda: _table_net(nn.MaxPool2d(3, stride=2)), False),
    ("leaky", lambda: _table_net(nn.MaxPool2d(2), nn.LeakyReLU(0.1)), False),
    ("two readers", lambda: _TwoReaders().eval(), False),
]


@pytest.mark.parametrize("name, build, tabled", TABLE_CASES, ids=[c[0] for c in TABLE_CASES])
def test_pool_table_is_the_rule(name, build, tabled, monkeypatch):
    """The first max-pool after a ReLU fed by shared direction rows decides by table
    (_PoolTable, built the second time the same rows come) and forms its rates from the
    rows: configurations, tied counts, selections, indices, logits and rates equal the
    rule's on every window, bit for bit, under one direction and two (lexicographic),
    with flat ties (zero patches over on and off channels) and coarse exact ties. Other
    layouts (more than 4 entries, a negative slope, a second reader) build no table."""
    from openbox import configuration as cf

    torch.manual_seed(0)
    model = build()
    ob = openbox.OpenBox(model, (1, 12, 12))
    x = torch.round(_images((1, 12, 12), 5, n=6) * 2) / 2  # values 0, 0.5, 1: exact ties
    x[:, :, 4:8, :] = 0.0
    x[0] = 0.0
    two = torch.stack([ob.direction, torch.randn((1, 12, 12), dtype=F64)])
    pool = next(k for k in ob.program.gates if isinstance(ob.program.nodes[k], cf.MaxPool))
    for direction in (ob.direction, two):
        monkeypatch.setattr(cf, "POOL_TABLE", False)
        ref = cf.configure(ob.program, x, direction, ob.tol, all_rates=True)
        monkeypatch.setattr(cf, "POOL_TABLE", True)
        cf._POOL_TABLES.pop(ob.program.nodes[pool], None)
        for _ in range(3):  # remembered, built, used
            got = cf.configure(ob.program, x, direction, ob.tol, all_rates=True)
        table = cf._POOL_TABLES.get(ob.program.nodes[pool], (None, None))[1]
        assert (table is not None) == tabled
        a, b = ref.configuration, got.configuration
        assert np.array_equal(a.packed(), b.packed())
        assert int(a.n_tight_pool.sum()) > 0  # ties between different functions
        for t, u in [(a.n_tight_relu, b.n_tight_relu), (a.n_tight_pool, b.n_tight_pool),
                     (ref.logits, got.logits), (ref.rates, got.rates),
                     *((a.select[k], b.select[k]) for k in a.select),
                     *((a.index[k], b.index[k]) for k in a.index)]:
            assert torch.equal(t, u)


def test_pool_table_is_capped_in_size(monkeypatch):
    """A pool whose table would exceed POOL_TABLE_BYTES decides by the rule."""
    from openbox import configuration as cf

    ob = openbox.OpenBox(_table_net(nn.MaxPool2d(2)), (1, 12, 12))
    pool = ob.program.nodes[ob.program.gates[1]]
    monkeypatch.setattr(cf, "POOL_TABLE_BYTES", pool.window.shape[0] * 256 - 1)
    x = _images((1, 12, 12), 1, n=3)
    for _ in range(3):
        cf.configure(ob.program, x, ob.direction, ob.tol)
    assert cf._POOL_TABLES.get(pool, (None, None))[1] is None
    monkeypatch.setattr(cf, "POOL_TABLE_BYTES", pool.window.shape[0] * 256)
    for _ in range(2):
        cf.configure(ob.program, x, ob.direction, ob.tol)
    assert cf._POOL_TABLES[pool][1] is not None


def test_pool_table_refuses_non_finite_rows(monkeypatch):
    """Rows that overflow (a direction of entries 1.5e308: the first layer's rates are
    inf and NaN) get no table: the pass runs the rule, as without tables."""
    from openbox import configuration as cf

    ob = openbox.OpenBox(_table_net(nn.MaxPool2d(2)), (1, 12, 12))
    x = _images((1, 12, 12), 1, n=3)
    huge = torch.full((1, 12, 12), 1.5e308, dtype=F64)
    huge[..., ::2] *= -1
    monkeypatch.setattr(cf, "POOL_TABLE", False)
    ref = cf.configure(ob.program, x, huge, ob.tol)
    monkeypatch.setattr(cf, "POOL_TABLE", True)
    for _ in range(3):
        got = cf.configure(ob.program, x, huge, ob.tol)
    pool = ob.program.nodes[ob.program.gates[1]]
    assert cf._POOL_TABLES[pool][1] is None
    assert np.array_equal(ref.configuration.packed(), got.configuration.packed())
    torch.testing.assert_close(ref.logits, got.logits, rtol=0, atol=0, equal_nan=True)


def _skip_net(seed):
    """A residual block whose skip reads the input itself (an Add of a value from before
    the first gate and one after it), then a padded max-pool (window table, no grid)."""
    from _models import randomize_

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1 = nn.Conv2d(1, 1, 3, padding=1)
            self.c2 = nn.Conv2d(1, 1, 3, padding=1)
            self.pool = nn.MaxPool2d(3, 2, padding=1)
            self.fc = nn.Linear(36, 3)

        def forward(self, x):
            y = self.c2(torch.relu(self.c1(x))) + x
            return self.fc(self.pool(torch.relu(y)).flatten(1))

    return randomize_(Net(), seed).eval()


SHARED_CASES = TAIL_CASES + [("input-skip", _skip_net), ("pool-first", lambda s: __import__(
    "_models").randomize_(nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(1, 2, 3, padding=1),
                                        nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)), s).eval())]


@pytest.mark.parametrize("name, build", SHARED_CASES, ids=[c[0] for c in SHARED_CASES])
def test_shared_directions_run_one_row_each_until_the_first_gate(name, build):
    """configure with directions shared by the batch carries one row per direction
    before the first gate: the configurations, tied counts, logits, rates and recorded
    gate values equal those of the same directions given per input (D, B, ...), which
    run B rows each all the way."""
    from openbox import configuration as cf

    ob = openbox.OpenBox(build(1), (1, 12, 12))
    x = _images((1, 12, 12), 5, n=4)
    x[3] = 0.0
    g = torch.Generator().manual_seed(2)
    pair = torch.stack([ob.direction, torch.randn(ob.direction.shape, generator=g, dtype=F64)])
    for dirs in (ob.direction, pair):
        shared = cf.configure(ob.program, x, dirs, ob.tol, record=True, all_rates=True)
        own_dirs = dirs.reshape(-1, 1, *x.shape[1:]).expand(-1, x.shape[0], *x.shape[1:])
        own = cf.configure(ob.program, x, own_dirs, ob.tol, record=True, all_rates=True)
        assert np.array_equal(shared.configuration.packed(), own.configuration.packed())
        assert torch.equal(shared.configuration.n_tight, own.configuration.n_tight)
        assert torch.equal(shared.logits, own.logits)
        torch.testing.assert_close(shared.rates, own.rates, rtol=0, atol=1e-12)
        for name_ in ("values", "derivatives"):
            a, b = getattr(shared.gate_values, name_), getattr(own.gate_values, name_)
            assert a.keys() == b.keys()
            for k in a:
                assert a[k].shape == b[k].shape
                torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-12)
