"""openbox.fmnist.regularisers: gate distances (exact and Gaussian-probe estimates) and the
MMR-style penalty.

The exact reference is openbox's own polytope: its rows are the gate hyperplanes, so their
norms are the gate gradient norms and ``slack / norm`` the distances, computed by pushing
the identity basis through the compiled program (independent of the hooks and
``torch.func.jvp`` used here).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import openbox
from openbox.fmnist.data import load_sample
from openbox.fmnist.models import build_model
from openbox.fmnist.regularisers import (
    MMRPenalty,
    distance_debias,
    gate_distances,
    hinge_top_k,
    mmr_penalty,
)
from openbox.fmnist.training import train

SHAPE = (1, 12, 12)
PROBES = 8
REPEATS = 200  # independent m-probe estimates per gate
Z = 5.0  # standard errors allowed per gate: ~3,600 gates, P(|N(0,1)| > 5) = 6e-7 each


def small_cnn(seed: int = 0) -> nn.Sequential:
    """conv-BN-ReLU-maxpool-conv-LeakyReLU-maxpool-linear on 1x12x12, float64, eval mode,
    BatchNorm statistics moved off the identity."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(4, 6, 3, padding=1), nn.LeakyReLU(0.1), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(6 * 3 * 3, 5)).double()
    with torch.no_grad():
        model(torch.rand(16, *SHAPE, dtype=torch.float64))
    return model.eval()


@pytest.fixture(scope="module")
def model():
    return small_cnn()


@pytest.fixture(scope="module")
def x():
    return torch.rand(3, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def exact(model, x):
    return gate_distances(model, x, estimator="exact")


def test_exact_norms_and_distances_are_openbox_polytope_rows(model, x, exact):
    box = openbox.OpenBox(model, SHAPE, dtype=torch.float64)
    relu_only = gate_distances(model, x, estimator="exact", pool_gates=False)
    assert exact.exact.all()
    for i in range(len(x)):
        poly = box.polytope(x[i])
        norms = np.linalg.norm(poly.A, axis=1)
        mine = exact.sq_norm[i].detach().sqrt().numpy()
        live = mine > 0  # zero-gradient gates: openbox drops those rows
        assert live.sum() == len(norms)
        np.testing.assert_allclose(np.sort(mine[live]), np.sort(norms), rtol=1e-12, atol=0)
        distance = exact.distance[i].detach().numpy()
        assert np.isinf(distance[~live]).all()
        np.testing.assert_allclose(np.sort(distance[live]), np.sort(poly.slack / norms),
                                   rtol=1e-9, atol=1e-15)
        assert float(exact.nearest[i].detach()) == pytest.approx(poly.radius(2), rel=1e-9)
        relu_rows = poly.row_source["partner"] < 0
        relu_norms = relu_only.sq_norm[i].detach().sqrt().numpy()
        np.testing.assert_allclose(np.sort(relu_norms[relu_norms > 0]),
                                   np.sort(norms[relu_rows]), rtol=1e-12, atol=0)


def test_decision_distances_are_the_llc_margins(model, x, exact):
    e = openbox.OpenBox(model, SHAPE, dtype=torch.float64).explain(x)
    W = e.weight.reshape(len(x), 5, -1)  # (B, C, n)
    logits = e.logits
    top = logits.argmax(1)
    for i in range(len(x)):
        grad = W[i, top[i]] - W[i]  # (C, n): gradients of l_c - l_i
        want = (logits[i, top[i]] - logits[i]) / grad.norm(dim=1)
        want[top[i]] = math.inf
        torch.testing.assert_close(exact.decision_distance[i].detach(), want, rtol=1e-9,
                                   atol=0)


def test_gaussian_squared_norms_are_unbiased_with_chi_square_spread(model, x, exact):
    """REPEATS independent m-probe estimates per gate (x repeated along the batch).

    s_hat / s ~ chi2_m / m: mean 1, variance 2 / m. The mean of R estimates is
    chi2_{Rm} / (Rm), standard error sqrt(2 / (R m)) per gate.
    """
    reps = x.repeat(REPEATS, 1, 1, 1)  # rows r * B + i
    est = gate_distances(model, reps, probes=PROBES, generator=torch.Generator().manual_seed(0))
    assert not est.exact.any()
    s = exact.sq_norm.detach()
    live = s > 0
    ratio = est.sq_norm.detach().reshape(REPEATS, *s.shape)[:, live] / s[live]  # (R, G_live)
    se = math.sqrt(2 / (REPEATS * PROBES))
    assert (ratio.mean(0) - 1).abs().max() <= Z * se
    # pooled over the gates, the variance of one estimate is 2 / m (the estimate of it has
    # relative standard error ~ sqrt(2 (1 + 6 / m) / R) / sqrt(effective gates) < 5 %)
    variance = ratio.var(dim=0).mean()
    assert abs(float(variance) / (2 / PROBES) - 1) < 0.1
    assert (est.sq_norm.reshape(REPEATS, *s.shape)[:, ~live] == 0).all()  # dead gates stay dead
    # the margins' squared norms too
    ds = exact.decision_sq_norm.detach()
    d_live = ds > 0
    d_ratio = est.decision_sq_norm.detach().reshape(REPEATS, *ds.shape)[:, d_live] / ds[d_live]
    assert (d_ratio.mean(0) - 1).abs().max() <= Z * se


def test_debiased_distances_are_unbiased_and_the_plug_in_is_not(model, x, exact):
    reps = x.repeat(REPEATS, 1, 1, 1)
    d = exact.distance.detach()
    live = torch.isfinite(d) & (d > 0)
    c_m = distance_debias(PROBES)
    # E[(chi2_m / m)^(-1/2)] = 1 / c_m; Var(c_m (chi2_m / m)^(-1/2)) = c_m^2 m / (m - 2) - 1
    assert 1 / c_m == pytest.approx(
        math.sqrt(PROBES / 2) * math.gamma((PROBES - 1) / 2) / math.gamma(PROBES / 2))
    sd = math.sqrt(c_m**2 * PROBES / (PROBES - 2) - 1)
    assert sd == pytest.approx(0.294, abs=1e-3)
    se = sd / math.sqrt(REPEATS)
    for debias, expected in ((True, 1.0), (False, 1 / c_m)):
        est = gate_distances(model, reps, probes=PROBES, debias=debias,
                             generator=torch.Generator().manual_seed(1))
        ratio = est.distance.detach().reshape(REPEATS, *d.shape)[:, live] / d[live]
        mean = ratio.mean(0)
        assert (mean - expected).abs().max() <= Z * se * expected, debias
        assert abs(float(mean.mean()) - expected) < 0.01 * expected, debias
    assert 1 / c_m > 1.1  # the plug-in's bias is far outside those bounds


def test_exact_fraction_mixes_exact_and_estimated_rows(model, x, exact):
    mixed = gate_distances(model, x, exact_fraction=0.5, generator=torch.Generator())
    assert mixed.exact.tolist() == [True, True, False]  # ceil(0.5 * 3)
    torch.testing.assert_close(mixed.sq_norm[:2], exact.sq_norm[:2], rtol=1e-12, atol=0)
    torch.testing.assert_close(mixed.value, exact.value, rtol=0, atol=0)
    assert not torch.equal(mixed.sq_norm[2], exact.sq_norm[2])


def test_hinge_and_gradients_flow_to_the_parameters(model, x):
    d = torch.tensor([[0.1, 0.5, math.inf, 2.0], [math.inf, math.inf, math.inf, 0.0]])
    torch.testing.assert_close(hinge_top_k(d, 1.0, 2), torch.tensor([(0.9 + 0.5) / 2, 0.5]))
    torch.testing.assert_close(hinge_top_k(d, 1.0, 9), torch.tensor([1.4 / 9, 1 / 9]))
    model = small_cnn()
    penalty = mmr_penalty(1.0, 0.1, 10, 0, decision_weight=1.0, probes=4)
    value = penalty(model, x, None, 1)
    assert value.shape == () and float(value) > 0
    value.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# --- the ramp ----------------------------------------------------------------------------


def test_ramp_is_zero_at_the_first_step_and_full_after_ramp_epochs(x):
    penalty = mmr_penalty(2.0, 0.1, 5, 4)  # train's hook passes epoch 1, 2, ...
    assert [penalty.ramp(e) for e in (1, 2, 3, 4, 5, 6, 50)] == [0.0, 0.5, 1.0, 1.5, 2.0, 2.0,
                                                                 2.0]
    assert penalty.ramp(1.5) == 0.25  # a fractional epoch ramps per step
    model = small_cnn()
    zero = penalty(model, x, None, 1)
    assert float(zero) == 0.0 and zero.shape == () and zero.dtype == x.dtype
    torch.manual_seed(3)
    half = penalty(model, x, None, 3)
    torch.manual_seed(3)
    full = penalty(model, x, None, 5)
    assert float(half) > 0 and float(full) == pytest.approx(2 * float(half), rel=1e-12)
    assert mmr_penalty(2.0, 0.1, 5, 0).ramp(1) == 2.0  # no ramp
    zero_based = mmr_penalty(1.0, 0.1, 5, 2, first_epoch=0)
    assert (zero_based.ramp(0), zero_based.ramp(1), zero_based.ramp(2)) == (0.0, 0.5, 1.0)


def test_penalty_uses_eval_mode_and_restores_modes(x):
    model = small_cnn().train()
    model[1].eval()  # a submodule in its own mode stays so
    modes = [m.training for m in model.modules()]
    penalty = mmr_penalty(1.0, 0.1, 5, 0, estimator="exact")
    running = model[1].running_mean.clone()
    region, _ = penalty.terms(model, x)
    assert [m.training for m in model.modules()] == modes
    assert torch.equal(model[1].running_mean, running)  # no train-mode statistics update
    reference, _ = penalty.terms(model.eval(), x)
    torch.testing.assert_close(region, reference, rtol=0, atol=0)


def test_argument_errors(model, x):
    assert isinstance(mmr_penalty(1, 1, 1, 1), MMRPenalty)
    cases = [
        (dict(weight=-1.0), "weight must be a finite number >= 0"),
        (dict(weight=float("nan")), "weight must be a finite number >= 0"),
        (dict(gamma=0.0), "gamma must be a finite number > 0"),
        (dict(k=0), "k must be an integer >= 1"),
        (dict(k=2.0), "k must be an integer >= 1"),
        (dict(ramp_epochs=-1), "ramp_epochs must be a finite number >= 0"),
        (dict(probes=2), "probes must be an integer >= 3"),
        (dict(estimator="hutch"), "estimator must be one of"),
        (dict(exact_fraction=1.5), r"exact_fraction must be a number in \[0, 1\]"),
        (dict(decision_gamma=-1.0), "decision_gamma must be a finite number > 0"),
        (dict(max_examples=0), "max_examples must be an integer >= 1 or None"),
        (dict(pool_gates=1), "pool_gates must be True or False"),
    ]
    base = dict(weight=1.0, gamma=0.1, k=5, ramp_epochs=1)
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            mmr_penalty(**{**base, **change})
    with pytest.raises(ValueError, match="no nn.ReLU, nn.LeakyReLU or nn.MaxPool2d"):
        gate_distances(nn.Sequential(nn.Flatten(), nn.Linear(144, 3)).double(), x)
    padded = nn.Sequential(nn.MaxPool2d(2, padding=1), nn.Flatten(), nn.Linear(49, 2)).double()
    with pytest.raises(ValueError, match="max-pool gates need MaxPool2d with padding=0"):
        gate_distances(padded, x)
    with pytest.raises(ValueError, match="x must be a non-empty floating-point batch"):
        gate_distances(model, x[:0])


# --- training ----------------------------------------------------------------------------

TRAIN_IMAGES = 256
BATCH = 32
EPOCHS = 25  # 200 steps
LR = 3e-3


def tiny_cnn(seed: int) -> nn.Sequential:
    """2 x [conv3x3 stride 2 - ReLU] - linear on 1x14x14 (Fashion-MNIST images
    average-pooled): a small ``cnn-strided``. No max-pool: on a constant patch (the images'
    zero background) the entries of a max-pool window are equal, so those inputs lie *on*
    the tie hyperplanes (distance exactly 0, whatever the weights) and the median nearest
    distance of a max-pool net is 0 with or without the penalty."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(4, 8, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * 4 * 4, 10))


def fit(penalty, images, labels) -> nn.Module:
    """Seeded minibatch Adam on the cross-entropy, calling ``penalty`` as train's hook does
    (``penalty(model, images, logits, epoch)``, epoch 1-based)."""
    model = tiny_cnn(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=LR)
    shuffle = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for epoch in range(1, EPOCHS + 1):
            model.train()
            order = torch.randperm(len(images), generator=shuffle)
            for start in range(0, len(images), BATCH):
                index = order[start:start + BATCH]
                optimizer.zero_grad(set_to_none=True)
                logits = model(images[index])
                loss = F.cross_entropy(logits, labels[index])
                if penalty is not None:
                    loss = loss + penalty(model, images[index], logits, epoch)
                loss.backward()
                optimizer.step()
    return model.eval()


def test_penalty_enlarges_the_regions_of_training_inputs():
    sample = load_sample()
    images = F.avg_pool2d(sample.images[:TRAIN_IMAGES], 2)  # (N, 1, 14, 14)
    labels = sample.labels[:TRAIN_IMAGES]
    penalty = mmr_penalty(weight=2.0, gamma=0.2, k=20, ramp_epochs=5, probes=4)
    plain, regularised = fit(None, images, labels), fit(penalty, images, labels)
    medians, accuracy = [], []
    for model in (plain, regularised):
        double = model.double()
        with torch.no_grad():
            accuracy.append(float((double(images.double()).argmax(1) == labels).float().mean()))
        nearest = gate_distances(double, images[:64].double(), estimator="exact").nearest
        medians.append(float(nearest.detach().median()))
    assert medians[1] > 5 * medians[0], medians  # seen: 6.8e-4 -> 3.2e-2
    assert medians[0] > 0
    assert accuracy[1] > 0.5, accuracy  # still a classifier (chance is 0.1)


def test_the_penalty_plugs_into_train():
    model = build_model("cnn-strided", seed=0, channels=(4, 8))
    penalty = mmr_penalty(1.0, 0.1, 10, 1, probes=3, max_examples=8)
    result = train(model, load_sample().subset(torch.arange(64)), epochs=2, batch_size=32,
                   seed=0, progress=False, penalty=penalty)
    assert result.penalty == "MMRPenalty"
    assert result.train_penalty[0] == 0.0 and result.train_penalty[1] > 0  # ramped from 0
