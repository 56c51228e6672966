"""openbox.metrics: every measure against a known answer (a closed form, a direct loop, scipy)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import scipy.stats
import torch
from torch import Tensor, nn

from openbox import explainers, metrics
from openbox.explainers import Explainer, Output, Surrogate, SurrogateSamples
from tests._explainer_models import (
    SHAPE,
    assert_unchanged,
    inputs,
    linear_model,
    snapshot,
    tiny_cnn,
)

D = SHAPE[0] * SHAPE[1] * SHAPE[2]


# ----------------------------------------------------------------------------- test methods


def _grad(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    x = x.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        out = model(x).gather(1, target[:, None]).sum()
        (g,) = torch.autograd.grad(out, x)
    return g


class GradSaliency(Explainer):
    """d logit_c / dx by autograd (deterministic); not registered."""

    name = "test-saliency"

    def _attribute(self, x, target, seed):
        return Output(_grad(self.model, x, target))


class NoisySaliency(Explainer):
    """Mean gradient over ``samples`` noisy copies x + sigma N(0, 1) drawn from ``seed``."""

    name = "test-noisy-saliency"
    stochastic = True
    options = {"sigma": 0.2, "samples": 3}

    def _attribute(self, x, target, seed):
        g = torch.Generator().manual_seed(seed)
        acc = torch.zeros_like(x)
        for _ in range(self.config["samples"]):
            eps = torch.randn(x.shape, generator=g, dtype=x.dtype)
            acc += _grad(self.model, x + self.config["sigma"] * eps, target)
        return Output(acc / self.config["samples"])


class ConstantSurrogate(Explainer):
    """A local model that says P(c | x') = 0.5 everywhere, with 5 samples near x whose
    ``samples.model`` is deliberately wrong (-1): local_fidelity must recompute it."""

    name = "test-constant-surrogate"
    local_model = True

    def _attribute(self, x, target, seed):
        g = torch.Generator().manual_seed(seed)
        surrogates = []
        for b in range(x.shape[0]):
            s = x[b] + 0.05 * torch.randn((5, *x.shape[1:]), generator=g, dtype=x.dtype)
            surrogates.append(Surrogate(
                lambda xs: torch.full((xs.shape[0],), 0.5, dtype=torch.float64),
                SurrogateSamples(s, torch.full((5,), -1.0), torch.full((5,), 0.5)),
            ))
        return Output(torch.ones_like(x), torch.full((x.shape[0],), 0.5), surrogates)


def _p(model: nn.Module, x: Tensor, c) -> Tensor:
    """softmax(model(x))[:, c] on a float64 copy (the reference, computed directly)."""
    import copy

    m = copy.deepcopy(model).double()
    with torch.no_grad():
        return torch.softmax(m(x.double()), 1)[:, c]


@pytest.fixture(scope="module")
def cnn():
    return tiny_cnn()


@pytest.fixture(scope="module")
def lin():
    return linear_model()


@pytest.fixture(scope="module")
def x():
    return inputs(3).double()


# ----------------------------------------------------------------------------- similarity


def test_cosine_of_identical_negated_orthogonal_and_zero_maps():
    a = torch.randn(4, *SHAPE, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(metrics.cosine(a, a), torch.ones(4, dtype=torch.float64), atol=1e-15)
    assert torch.allclose(metrics.cosine(a, -a), -torch.ones(4, dtype=torch.float64),
                          atol=1e-15)
    assert torch.allclose(metrics.cosine(3.0 * a, a), torch.ones(4, dtype=torch.float64),
                          atol=1e-15)
    e = torch.zeros(1, 2)
    f = torch.zeros(1, 2)
    e[0, 0], f[0, 1] = 1.0, 2.0
    assert metrics.cosine(e, f).item() == 0.0
    # tiny and huge maps: no underflow / overflow in the norms' product
    assert metrics.cosine(a.double() * 1e-200, a.double() * 1e200).sub(1).abs().max() < 1e-15
    z = a.clone()
    z[2] = 0
    with pytest.raises(ValueError, match=r"all-zero maps: inputs \[2\]"):
        metrics.cosine(z, a)
    out = metrics.cosine(z, a, zero=0.0)
    assert out[2].item() == 0.0 and torch.allclose(out[[0, 1, 3]], torch.ones(3).double())
    assert not torch.isnan(out).any()
    with pytest.raises(ValueError, match="same shape"):
        metrics.cosine(a, a[:2])


def test_spearman_matches_scipy_with_ties():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(5, 40, generator=g).double()
    b = a + 0.8 * torch.randn(5, 40, generator=g).double()
    a[:, :10] = torch.round(a[:, :10])            # ties inside a map
    b = torch.round(4 * b) / 4
    ours = metrics.spearman(a, b)
    for i in range(5):
        ref = scipy.stats.spearmanr(a[i].numpy(), b[i].numpy()).statistic
        assert abs(ours[i].item() - ref) <= 1e-12
        assert np.array_equal(metrics.rank(a[i : i + 1])[0].numpy(),
                              scipy.stats.rankdata(a[i].numpy()))
    assert torch.allclose(metrics.spearman(a, a), torch.ones(5).double(), atol=1e-15)
    assert torch.allclose(metrics.spearman(a, -a), -torch.ones(5).double(), atol=1e-15)
    const = a.clone()
    const[1] = 3.0
    with pytest.raises(ValueError, match=r"constant maps: inputs \[1\]"):
        metrics.spearman(const, b)
    assert metrics.spearman(const, b, constant=0.0)[1].item() == 0.0


# ----------------------------------------------------------------------------- exactness


def test_exactness_of_openbox_is_rounding_and_a_method_without_probability_is_named(lin, cnn,
                                                                                   x):
    for model in (lin, cnn):
        before = snapshot(model)
        r = explainers.get("openbox", model, input_shape=SHAPE).explain(x, [0, 1, 2])
        e = metrics.exactness(r, model, x)
        assert e.shape == (3,) and e.dtype == torch.float64
        assert float(e.max()) <= 1e-12
        assert_unchanged(model, before)
    # a wrong probability is caught: the constant surrogate says 0.5
    r = ConstantSurrogate(cnn, SHAPE, dtype=torch.float64).explain(x, 1)
    assert torch.allclose(metrics.exactness(r, cnn, x), (_p(cnn, x, 1) - 0.5).abs(),
                          atol=1e-15)
    r = explainers.get("openbox-ig", lin, input_shape=SHAPE).explain(x, 0)
    with pytest.raises(ValueError, match="'openbox-ig' method has no local model"):
        metrics.exactness(r, lin, x)
    r = explainers.get("openbox", lin, input_shape=SHAPE).explain(x, 0)
    with pytest.raises(ValueError, match="the batch 'openbox' explained"):
        metrics.exactness(r, lin, x[:2])


def test_local_fidelity_of_openbox_on_a_linear_model_is_exact_everywhere(lin, x):
    r = explainers.get("openbox", lin, input_shape=SHAPE).explain(x, [2, 0, 1])
    lf = metrics.local_fidelity(r, lin, x, n=8)
    assert lf.errors.shape == (3, 3, 8) and lf.mean.shape == (3, 3)
    assert torch.equal(lf.scales, torch.tensor([1e-3, 1e-2, 1e-1], dtype=torch.float64))
    assert float(lf.errors.max()) <= 1e-12
    assert lf.left_region is not None and not bool(lf.left_region.any())
    assert lf.sample_error is None
    assert torch.allclose(lf.mean, lf.errors.mean(2))


def test_local_fidelity_of_openbox_on_a_cnn_is_exact_inside_the_region_only(cnn, x):
    before = snapshot(cnn)
    r = explainers.get("openbox", cnn, input_shape=SHAPE).explain(x, 0)
    lf = metrics.local_fidelity(r, cnn, x)
    left = lf.left_region
    assert left.shape == (3, 3, 16)
    assert bool((~left).any())                        # some neighbours stay in the region
    assert float(lf.errors[~left].max()) <= 1e-12     # ... where the LLC is the network
    assert bool(left[:, 2].any())                     # at sigma = 0.1 some leave it
    assert float(lf.errors[left].max()) > 1e-8        # ... and there the LLC is not exact
    # the neighbours are those of metrics.neighbours: recompute the errors directly
    xs = metrics.neighbours(x, (1e-3, 1e-2, 1e-1), 16, 0)
    ob = explainers.get("openbox", cnn, input_shape=SHAPE).openbox
    for b in (0, 2):
        pts = xs[b].reshape(-1, *SHAPE)
        e = (r.surrogates[b].predict(pts) - _p(cnn, pts, 0)).abs().reshape(3, 16)
        assert torch.allclose(lf.errors[b], e, rtol=0, atol=1e-15)
        keys = ob.region_key(pts)
        assert [k != ob.region_key(x[b : b + 1])[0] for k in keys] == left[b].flatten().tolist()
    assert_unchanged(cnn, before)
    # an explicit OpenBox gives the same flags; clip keeps neighbours in the box
    lf2 = metrics.local_fidelity(r, cnn, x, openbox=ob, clip=(0.0, 1.0), n=4)
    assert lf2.left_region.shape == (3, 3, 4)
    assert bool((metrics.neighbours(x, (1e-3, 1e-2, 1e-1), 4, 0, (0.0, 1.0)) >= 0).all())


def test_local_fidelity_recomputes_the_model_side_of_the_methods_samples(cnn, x):
    r = ConstantSurrogate(cnn, SHAPE, dtype=torch.float64).explain(x, 2)
    lf = metrics.local_fidelity(r, cnn, x, scales=(0.01,), n=4)
    assert lf.left_region is None
    for b in range(3):
        s = r.surrogates[b].samples
        assert abs(lf.sample_error[b].item() - (_p(cnn, s.inputs, 2) - 0.5).abs().mean()) <= 1e-15
    xs = metrics.neighbours(x, (0.01,), 4, 0)
    assert torch.allclose(lf.errors[1, 0], (_p(cnn, xs[1, 0], 2) - 0.5).abs(), atol=1e-15)
    with pytest.raises(ValueError, match="'openbox-ig' method has no surrogate"):
        metrics.local_fidelity(
            explainers.get("openbox-ig", cnn, input_shape=SHAPE).explain(x, 0), cnn, x)
    with pytest.raises(ValueError, match="scales"):
        metrics.local_fidelity(r, cnn, x, scales=(0.0,))


# ----------------------------------------------------------------------------- stability


def test_seed_stability_is_one_for_a_deterministic_method_and_not_for_a_noisy_one(cnn, x):
    ob = explainers.get("openbox", cnn, input_shape=SHAPE)
    assert torch.allclose(metrics.seed_stability(ob, x, 0), torch.ones(3).double(), atol=1e-15)
    noisy = NoisySaliency(cnn, SHAPE, dtype=torch.float64)
    s = metrics.seed_stability(noisy, x, 0, seeds=(3, 4))
    assert bool((s < 1 - 1e-6).all())
    a, b = (noisy.explain(x, 0, seed=k).attribution for k in (3, 4))
    assert torch.allclose(s, metrics.cosine(a, b), atol=0)
    with pytest.raises(ValueError, match="two different"):
        metrics.seed_stability(noisy, x, 0, seeds=(1, 1))


@pytest.mark.skipif("smoothgrad" not in explainers.names(), reason="no smoothgrad explainer")
def test_seed_stability_of_smoothgrad_is_below_one(cnn, x):
    pytest.importorskip("captum")
    sg = explainers.get("smoothgrad", cnn, input_shape=SHAPE, dtype=torch.float64)
    assert bool((metrics.seed_stability(sg, x, 0) < 1 - 1e-6).all())


def test_consistency_finds_the_brute_force_neighbour_and_skips_copies(cnn, lin, x):
    ref = torch.cat([x[:1], inputs(12, seed=5).double(), x[2:]])    # copies of x[0] and x[2]
    sal = GradSaliency(cnn, SHAPE, dtype=torch.float64)
    c = metrics.consistency(sal, x, [0, 1, 2], ref, noise=1e-2, seed=3)
    for b in range(3):
        best, arg = float("inf"), -1
        for j in range(ref.shape[0]):
            if torch.equal(ref[j], x[b]):
                continue
            dist = float(((ref[j] - x[b]) ** 2).sum().sqrt())
            if dist < best:
                best, arg = dist, j
        assert c.neighbour_index[b].item() == arg
        assert abs(c.neighbour_distance[b].item() - best) <= 1e-12
    assert c.same_region_neighbour is None and c.same_region_noise is None
    t = torch.tensor([0, 1, 2])
    phi = sal.explain(x, t).attribution
    assert torch.allclose(c.neighbour_cosine,
                          metrics.cosine(phi, sal.explain(ref[c.neighbour_index], t).attribution))
    noisy = x + 1e-2 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3),
                                   dtype=torch.float64)
    assert torch.allclose(c.noise_cosine, metrics.cosine(phi, sal.explain(noisy, t).attribution))
    # openbox on a linear model: one region, one map
    ob = explainers.get("openbox", lin, input_shape=SHAPE)
    c = metrics.consistency(ob, x, 1, ref)
    assert bool(c.same_region_neighbour.all()) and bool(c.same_region_noise.all())
    assert torch.allclose(c.neighbour_cosine, torch.ones(3).double(), atol=1e-15)
    # on the CNN, neighbours far away are in other regions; a 1e-9 nudge mostly is not
    ob = explainers.get("openbox", cnn, input_shape=SHAPE)
    c = metrics.consistency(ob, x, 1, ref, noise=1e-9)
    assert not bool(c.same_region_neighbour.any())
    assert bool(c.same_region_noise.any())
    with pytest.raises(ValueError, match="nothing but copies"):
        metrics.consistency(ob, x[:1], 0, x[:1])


# ----------------------------------------------------------------------------- faithfulness


def _positive_linear(seed: int = 0) -> nn.Sequential:
    m = nn.Sequential(OrderedDict(flatten=nn.Flatten(), fc=nn.Linear(D, 2))).double()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.fc.weight[0] = torch.rand(D, generator=g, dtype=torch.float64) * 0.2
        m.fc.weight[1] = 0.0
        m.fc.bias.copy_(torch.tensor([-1.0, 0.0]))
    return m.eval()


def test_deletion_and_insertion_curves_match_a_direct_loop():
    model = _positive_linear()
    x = inputs(2, seed=3).double()
    w = model.fc.weight[0].detach().reshape(SHAPE)
    attr = w * x
    attr[1].view(-1)[:30] = attr[1].view(-1)[0].item()        # ties: taken in index order
    f = metrics.faithfulness(model, x, attr, 0, steps=12, baseline=0.1)
    assert f.fractions.shape == (13,) and f.deletion.shape == (2, 13)
    counts = [round(D * s / 12) for s in range(13)]
    assert f.counts.tolist() == counts
    for b in range(2):
        flat_a = attr[b].reshape(-1).tolist()
        order = sorted(range(D), key=lambda i: (-flat_a[i], i))
        dele, ins = [], []
        for k in counts:
            xd = x[b].reshape(-1).clone()
            xi = torch.full((D,), 0.1, dtype=torch.float64)
            for i in order[:k]:
                xd[i] = 0.1
                xi[i] = x[b].reshape(-1)[i]
            z = torch.stack([xd, xi]) @ model.fc.weight.detach().T + model.fc.bias.detach()
            p = torch.softmax(z, 1)[:, 0]
            dele.append(p[0].item())
            ins.append(p[1].item())
        assert np.allclose(f.deletion[b].numpy(), dele, rtol=0, atol=1e-15)
        assert np.allclose(f.insertion[b].numpy(), ins, rtol=0, atol=1e-15)
        frac = np.array(counts) / D
        assert abs(f.deletion_auc[b].item() - np.trapezoid(dele, frac)) <= 1e-14
        assert abs(f.insertion_auc[b].item() - np.trapezoid(ins, frac)) <= 1e-14
    # positive weights, baseline 0 and an order by w * x >= 0: every step lowers the logit
    z = metrics.faithfulness(model, x, attr, 0, steps=12).deletion
    assert bool((z[:, 1:] <= z[:, :-1]).all()) and float(z[:, -1].max()) < float(z[:, 0].min())
    # the endpoints: nothing taken, everything taken
    assert torch.allclose(f.deletion[:, 0], _p(model, x, 0), atol=1e-15)
    assert torch.allclose(f.deletion[:, -1], f.insertion[:, 0], atol=0)
    # explicit fractions
    g = metrics.faithfulness(model, x, attr, 0, fractions=(0.0, 0.5, 1.0))
    assert g.counts.tolist() == [0, D // 2, D]
    with pytest.raises(ValueError, match="fractions"):
        metrics.faithfulness(model, x, attr, 0, fractions=(0.1, 1.0))
    with pytest.raises(ValueError, match="shape"):
        metrics.faithfulness(model, x, attr[:1], 0)


# ----------------------------------------------------------------------------- randomisation


class ZeroSide(nn.Module):
    """out = head(x) + 0 * side(x): defined side first, called head first."""

    def __init__(self):
        super().__init__()
        self.side = nn.Linear(D, 3)
        self.head = nn.Linear(D, 3)

    def forward(self, x):
        f = x.flatten(1)
        return self.head(f) + 0.0 * self.side(f)


def test_randomising_a_layer_the_output_ignores_leaves_the_map_unchanged(x):
    torch.manual_seed(0)          # nn.Linear's own init; the test's model, not the metric's
    model = ZeroSide().eval()
    sal = GradSaliency(model, SHAPE, dtype=torch.float64)
    before = snapshot(sal.model)
    r = metrics.randomisation(sal, x, [0, 1, 2], seed=1)
    assert r.layers == ("side", "head")                  # forward order, reversed
    assert r.spearman.shape == (3, 2) and r.spearman_abs.shape == (3, 2)
    assert torch.equal(r.spearman[:, 0], torch.ones(3, dtype=torch.float64))
    assert torch.equal(r.spearman_abs[:, 0], torch.ones(3, dtype=torch.float64))
    assert bool((r.spearman[:, 1] < 0.5).all())
    assert_unchanged(sal.model, before)


def test_randomisation_of_a_linear_head_and_a_cnn_cascade(lin, cnn, x):
    sal = GradSaliency(lin, SHAPE, dtype=torch.float64)
    r = metrics.randomisation(sal, x, 0)
    assert r.layers == ("fc",)
    assert bool((r.spearman < 0.5).all())
    # the rebuilt method sees the re-initialised weights: its map is the new fc row 0
    g = torch.Generator().manual_seed(0)
    w = torch.randn((3, D), generator=g, dtype=torch.float64) / D ** 0.5
    expected = metrics.spearman(w[0].expand(3, D), sal.explain(x, 0).attribution.flatten(1))
    assert torch.allclose(r.spearman[:, 0], expected, atol=1e-15)
    ob = explainers.get("openbox", cnn, input_shape=SHAPE)
    before = snapshot(ob.model)
    r = metrics.randomisation(ob, x, 1)
    assert r.layers == ("fc", "bn2", "conv2", "bn1", "conv1")
    assert bool((r.spearman.abs() < 0.9).all())
    assert torch.equal(r.original, ob.explain(x, 1).attribution)
    assert_unchanged(ob.model, before)


# ----------------------------------------------------------------------------- sensitivity


def test_sensitivity_is_zero_for_a_constant_map_and_matches_a_direct_loop(lin, cnn, x):
    ob = explainers.get("openbox", lin, input_shape=SHAPE)
    assert torch.equal(metrics.sensitivity(ob, x, 0), torch.zeros(3, dtype=torch.float64))
    sal = GradSaliency(cnn, SHAPE, dtype=torch.float64)
    s = metrics.sensitivity(sal, x, 2, radius=0.05, n=4, seed=7)
    ys = metrics.uniform_ball(x, 0.05, 4, 7)
    assert ys.shape == (4, 3, *SHAPE)
    assert float((ys - x).abs().max()) <= 0.05 and float((ys - x).abs().max()) > 0.04
    phi = sal.explain(x, 2).attribution
    for b in range(3):
        ratios = [float((sal.explain(ys[i, b : b + 1], 2).attribution[0] - phi[b]).norm()
                        / phi[b].norm()) for i in range(4)]
        assert abs(s[b].item() - max(ratios)) <= 1e-12
    assert bool((s > 0).all())
    with pytest.raises(ValueError, match="radius"):
        metrics.sensitivity(sal, x, 2, radius=0.0)
    with pytest.raises(ValueError, match="target"):
        metrics.sensitivity(sal, x, 7)


class HalfZero(Explainer):
    """Zero map for input 0, the gradient for the others (deterministic); not registered."""

    name = "test-half-zero"

    def _attribute(self, x, target, seed):
        g = _grad(self.model, x, target)
        g[0] = 0
        return Output(g)


def test_sensitivity_of_an_all_zero_map_raises_or_takes_the_given_value(cnn, x):
    ex = HalfZero(cnn, SHAPE, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"undefined for an all-zero map \(inputs \[0\]\)"):
        metrics.sensitivity(ex, x, 1, n=2)
    s = metrics.sensitivity(ex, x, 1, n=2, zero=float("nan"))
    assert torch.isnan(s[0]) and bool(torch.isfinite(s[1:]).all())
    # the other inputs keep their ratio, against a direct loop over the same points
    ys = metrics.uniform_ball(x, 0.02, 2, 0)
    sal = GradSaliency(cnn, SHAPE, dtype=torch.float64)
    phi = sal.explain(x, 1).attribution
    for b in (1, 2):
        ratios = [float((sal.explain(ys[i, b : b + 1], 1).attribution[0] - phi[b]).norm()
                        / phi[b].norm()) for i in range(2)]
        assert abs(s[b].item() - max(ratios)) <= 1e-12


def test_randomisation_rebuilds_the_method_with_its_progress_setting(cnn, x, monkeypatch):
    seen = []
    real = Explainer.__init__

    def spy(self, *args, **kwargs):
        seen.append(kwargs.get("progress"))
        real(self, *args, **kwargs)

    ex = GradSaliency(cnn, SHAPE, dtype=torch.float64, progress=False)
    monkeypatch.setattr(Explainer, "__init__", spy)
    metrics.randomisation(ex, x, 0)
    assert seen and all(p is False for p in seen)
