"""openbox.regions.counterfactual against independent references: the exact global
L-inf minimum of small ReLU MLPs from a mixed-integer LP (big-M ReLU encoding, HiGHS
through scipy.optimize.milp), closed-form projections onto one hyperplane (LLC from
torch autograd), and the model's own forward on random CNNs."""

from __future__ import annotations

import copy
import importlib

import numpy as np
import pytest
import torch
from _models import random_cnn, random_input, random_mlp
from scipy.optimize import LinearConstraint, milp
from torch import nn

import openbox
from openbox.regions.counterfactual import counterfactual

INF = float("inf")
# the module (openbox.regions.counterfactual is the function once the package exports it)
cf = importlib.import_module("openbox.regions.counterfactual")


# --------------------------------------------------------------------------- references


def _layers(model: nn.Sequential) -> list[tuple[np.ndarray, np.ndarray]]:
    """(W, b) float64 of every Linear of a Linear-ReLU-...-Linear stack."""
    out = []
    for m in model:
        if isinstance(m, nn.Linear):
            out.append((m.weight.detach().double().numpy(), m.bias.detach().double().numpy()))
        else:
            assert isinstance(m, nn.ReLU), type(m)
    return out


def milp_linf(model: nn.Sequential, x: np.ndarray, target: int, radius: float,
              domain: tuple[float, float] | None = None) -> float:
    """Exact min ||x' - x||_inf s.t. logit_target(x') >= every other logit, over the box
    ||x' - x||_inf <= radius (and the domain): big-M ReLU encoding with interval bounds.
    Returns inf when no such x' exists in the box."""
    layers = _layers(model)
    n = x.size
    lo, hi = x - radius, x + radius
    if domain is not None:
        lo, hi = np.maximum(lo, domain[0]), np.minimum(hi, domain[1])
    # variables: x' (n), s, then per hidden layer: z (pre), a (post), delta (binary)
    names_lo, names_hi, integ = list(lo) + [0.0], list(hi) + [radius], [0] * (n + 1)
    rows, row_lo, row_hi = [], [], []

    def new(count, lb, ub, integer=0):
        start = len(names_lo)
        names_lo.extend(lb)
        names_hi.extend(ub)
        integ.extend([integer] * count)
        return np.arange(start, start + count)

    def add(coefs: dict[int, float], lb: float, ub: float):
        rows.append(coefs)
        row_lo.append(lb)
        row_hi.append(ub)

    for j in range(n):  # |x'_j - x_j| <= s
        add({j: 1.0, n: -1.0}, -np.inf, x[j])
        add({j: -1.0, n: -1.0}, -np.inf, -x[j])
    prev, plo, phi = np.arange(n), lo, hi
    for W, b in layers[:-1]:
        zlo = np.clip(W, 0, None) @ plo + np.clip(W, None, 0) @ phi + b
        zhi = np.clip(W, 0, None) @ phi + np.clip(W, None, 0) @ plo + b
        z = new(len(b), zlo, zhi)
        a = new(len(b), np.maximum(zlo, 0), np.maximum(zhi, 0))
        delta = new(len(b), [0.0] * len(b), [1.0] * len(b), integer=1)
        for i in range(len(b)):
            coefs = {int(z[i]): 1.0}
            for k, p in enumerate(prev):
                coefs[int(p)] = coefs.get(int(p), 0.0) - W[i, k]
            add(coefs, b[i], b[i])  # z = W a_prev + b
            zi, ai, di = int(z[i]), int(a[i]), int(delta[i])
            if zhi[i] <= 0:
                add({ai: 1.0}, 0.0, 0.0)
            elif zlo[i] >= 0:
                add({ai: 1.0, zi: -1.0}, 0.0, 0.0)
            else:
                add({ai: 1.0, zi: -1.0}, 0.0, np.inf)  # a >= z (a >= 0 by its bound)
                add({ai: 1.0, zi: -1.0, di: -zlo[i]}, -np.inf, -zlo[i])  # a <= z - l (1 - d)
                add({ai: 1.0, di: -zhi[i]}, -np.inf, 0.0)  # a <= u d
        prev, plo, phi = a, np.maximum(zlo, 0), np.maximum(zhi, 0)
    W, b = layers[-1]
    for c in range(len(b)):
        if c == target:
            continue
        g = W[target] - W[c]
        add({int(p): g[k] for k, p in enumerate(prev)}, b[c] - b[target], np.inf)
    A = np.zeros((len(rows), len(names_lo)))
    for r, coefs in enumerate(rows):
        for j, v in coefs.items():
            A[r, j] += v
    cost = np.zeros(len(names_lo))
    cost[n] = 1.0
    res = milp(cost, integrality=np.array(integ),
               bounds=(np.array(names_lo), np.array(names_hi)),
               constraints=LinearConstraint(A, np.array(row_lo), np.array(row_hi)),
               options={"mip_rel_gap": 1e-9, "presolve": True})
    if res.status == 2:  # infeasible
        return INF
    assert res.status == 0, res.message
    return float(res.fun)


def llc_by_autograd(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (C, n), b (C,)) of the model at x (*shape), from torch autograd (float64)."""
    jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], x)
    W = jac.reshape(jac.shape[0], -1)
    b = model(x[None])[0] - W @ x.reshape(-1)
    return W.detach(), b.detach()


def projection(W: torch.Tensor, b: torch.Tensor, x: torch.Tensor, s: int, t: int, norm):
    """Closed-form nearest point of {f_t >= f_s} from x for the affine f = W x + b."""
    w, c = W[t] - W[s], b[t] - b[s]
    g = w @ x.reshape(-1) + c  # < 0: x is on the source side
    if norm == 2:
        p = x.reshape(-1) - g / (w @ w) * w
    else:
        p = x.reshape(-1) - g / w.abs().sum() * w.sign()
    return p.reshape(x.shape), float(-g / (w.norm() if norm == 2 else w.abs().sum()))


# --------------------------------------------------------------------------- tests


MLPS = [(2, 8, 3), (3, 6, 6, 3), (4, 10, 4), (3, 8, 8, 4)]


def test_linf_never_below_the_exact_milp_minimum():
    """Over small ReLU MLPs, points and targets: distance >= the MILP's global minimum,
    the point reaches the target by the model's forward, and (reported) how often the
    local search finds the global minimum."""
    matches, total, gaps, unreached = 0, 0, [], []
    for k, sizes in enumerate(MLPS):
        model = random_mlp(10 + k, sizes, batch_norm=False).double()
        domain = (-2.5, 2.5) if k % 2 else None
        ob = openbox.OpenBox(model, (sizes[0],), domain=domain)
        xs = random_input((sizes[0],), 4, seed=100 + k)
        if domain is not None:
            xs = xs.clamp(-2.0, 2.0)
        for x in xs:
            source = int(model(x[None]).argmax())
            for t in range(sizes[-1]):
                if t == source:
                    continue
                try:
                    r = counterfactual(ob, x, target=t, norm=INF, max_regions=40)
                except RuntimeError:  # unreachable (in the domain) or out of budget
                    unreached.append(milp_linf(model, x.numpy(), t, 6.0, domain))
                    continue
                assert r.verified and r.target == t
                with torch.no_grad():
                    f = model(r.point[None])[0]
                assert float(f[t] - f.max()) >= -1e-9
                assert r.distance == pytest.approx(float((r.point - x).abs().max()), abs=1e-12)
                exact = milp_linf(model, x.numpy(), t, r.distance * (1 + 1e-6) + 1e-6, domain)
                assert r.distance >= exact - 1e-6 * (1 + exact), (sizes, t, r.distance, exact)
                total += 1
                gaps.append(r.distance / exact - 1 if exact > 0 else 0.0)
                matches += r.distance <= exact + 1e-6 * (1 + exact)
    print(f"\nL-inf counterfactual = MILP global minimum in {matches}/{total} cases; "
          f"median excess {np.median(gaps):.2%}, max {np.max(gaps):.2%}; no point found in "
          f"{len(unreached)} cases, where the MILP's minimum within L-inf 6 is "
          f"{sorted(unreached)}")
    assert total >= 20
    assert matches >= total // 3


def test_target_none_is_the_nearest_change_over_classes():
    """target=None: a class other than the source at the point, and never farther than
    the best of the per-target searches; never below the MILP minimum over targets."""
    model = random_mlp(21, (3, 8, 8, 4), batch_norm=False).double()
    ob = openbox.OpenBox(model, (3,))
    for x in random_input((3,), 3, seed=7):
        source = int(model(x[None]).argmax())
        r = counterfactual(ob, x, norm=INF)
        with torch.no_grad():
            f = model(r.point[None])[0]
        assert r.verified and r.source == source and r.target != source
        assert float(f[r.target] - f[source]) >= -1e-9
        per = []
        for t in range(4):
            if t != source:
                try:
                    per.append(counterfactual(ob, x, target=t, norm=INF).distance)
                except RuntimeError:
                    pass
        assert r.distance <= min(per) * (1 + 1e-6) + 1e-9
        exact = min(milp_linf(model, x.numpy(), t, r.distance * (1 + 1e-6) + 1e-6)
                    for t in range(4) if t != source)
        assert r.distance >= exact - 1e-6 * (1 + exact)


@pytest.mark.parametrize("norm", [2, INF])
def test_linear_model_is_the_closed_form_projection(norm):
    """A linear two-class model (one region, no facet): x - (w.x + b)/||w||^2 w for L2,
    x - (w.x + b)/||w||_1 sign(w) for L-inf, to float precision."""
    torch.manual_seed(3)
    lin = nn.Linear(6, 2).double()
    model = nn.Sequential(lin)
    ob = openbox.OpenBox(model, (6,))
    for x in random_input((6,), 4, seed=5):
        s = int(model(x[None]).argmax())
        want, dist = projection(lin.weight.detach(), lin.bias.detach(), x, s, 1 - s, norm)
        for target in (None, 1 - s):
            r = counterfactual(ob, x, target=target, norm=norm)
            # the model's rounding can leave the projection a hair short of the boundary;
            # the nudge past it is the verification band, 1e-10 (1 + |f|) in the logits
            torch.testing.assert_close(r.point, want, rtol=0, atol=1e-9)
            assert r.distance == pytest.approx(dist, rel=1e-8)
            assert r.exact_in_region and r.verified and r.target == 1 - s
            assert len(r.regions) == 1


@pytest.mark.parametrize("norm", [2, INF])
def test_boundary_inside_the_region_is_the_closed_form_projection(norm):
    """x close to the decision boundary, well inside its region: the one-hyperplane
    projection of the autograd LLC, found in x's own region, exact_in_region."""
    found = 0
    for seed in range(40):
        model = random_mlp(seed, (4, 10, 10, 3), batch_norm=False).double()
        ob = openbox.OpenBox(model, (4,))
        x = random_input((4,), 1, seed=seed)[0]
        W, b = llc_by_autograd(model, x)
        f = W @ x + b
        s, t = [int(i) for i in f.argsort(descending=True)[:2]]
        p, dist = projection(W, b, x, s, t, norm)
        # move x most of the way to the boundary: then it is far nearer than any facet
        x = x + 0.9 * (p - x)
        W, b = llc_by_autograd(model, x)
        f = W @ x + b
        if [int(i) for i in f.argsort(descending=True)[:2]] != [s, t]:
            continue
        p, dist = projection(W, b, x, s, t, norm)
        radius = float(ob.certified_radius(x[None], norm=norm)[0])
        fp = W @ p.reshape(-1) + b
        others = [c for c in range(3) if c not in (s, t)]
        if not (dist < 0.5 * radius and all(fp[t] - fp[c] > 1e-3 for c in others)):
            continue
        found += 1
        for target in (t, None):
            r = counterfactual(ob, x, target=target, norm=norm)
            torch.testing.assert_close(r.point, p, rtol=0, atol=1e-8)
            assert r.distance == pytest.approx(dist, rel=1e-7)
            assert r.exact_in_region and r.verified and r.target == t
            assert r.regions == [ob.explain(x[None]).region_key[0]]
        if found == 3:
            break
    assert found == 3


CNN_CASES = [  # (seed, domain, input kind): random reference CNNs that predict several classes
    (5, (0.0, 1.0), "unit"),
    (7, None, "normal"),
]


@pytest.mark.parametrize("norm", [2, INF])
@pytest.mark.parametrize("case", CNN_CASES)
def test_cnn_point_has_the_target_by_the_models_forward(case, norm):
    """Random small CNNs: the point is in the domain, and the model's own forward (the
    user's model, float64) gives the target or ties it within tolerance; the target is
    a class the model predicts elsewhere (so it is reachable), or None."""
    seed, domain, kind = case
    model = random_cnn(seed, channels=(3, 4), input_shape=(1, 12, 12)).double()
    ob = openbox.OpenBox(model, (1, 12, 12), domain=domain)
    xs = random_input((1, 12, 12), 64, seed=seed, kind=kind)
    with torch.no_grad():
        pred = model(xs).argmax(1)
    x = xs[0]
    source = int(pred[0])
    elsewhere = int(pred[pred != source][0])
    for target in (None, elsewhere):
        r = counterfactual(ob, x, target=target, norm=norm, max_regions=20)
        with torch.no_grad():
            f = model(r.point[None])[0]
        band = 1e-10 * (1 + float(f.abs().max()))
        others = torch.cat([f[: r.target], f[r.target + 1 :]])
        assert float(f[r.target] - others.max()) >= -band
        assert r.verified and r.source == source and r.target != source
        if target is not None:
            assert r.target == target
        if domain is not None:
            assert float(r.point.min()) >= domain[0] and float(r.point.max()) <= domain[1]
        y = (r.point - x).reshape(-1)
        assert r.distance == pytest.approx(float(y.norm() if norm == 2 else y.abs().max()),
                                           rel=1e-12)
        assert r.margin <= 1e-6 * (1 + float(f.abs().max()))  # on the boundary, not past it
        assert r.regions[0] == ob.explain(x[None]).region_key[0]


@pytest.mark.parametrize("norm", [2, INF])
def test_float32_point_is_nudged_past_the_boundary(norm):
    """In float32 the optimum rounds to either side of the boundary: the returned point is
    past it by the user's own float32 model (margin > 0, at most ~the float32 band), and
    as near as the float64 search's to float32 precision."""
    model = random_mlp(3, (4, 10, 10, 3), batch_norm=False)
    ob32 = openbox.OpenBox(model, (4,), dtype=torch.float32)
    ob64 = openbox.OpenBox(copy.deepcopy(model).double(), (4,))
    for x in random_input((4,), 4, seed=1, dtype=torch.float32):
        r = counterfactual(ob32, x, norm=norm)
        assert r.point.dtype == torch.float32
        with torch.no_grad():
            f = model(r.point[None])[0]
        others = torch.cat([f[: r.target], f[r.target + 1 :]])
        assert r.verified and float(f[r.target] - others.max()) > 0
        assert r.margin <= 1e-3
        r64 = counterfactual(ob64, x.double(), norm=norm)
        assert r.target == r64.target
        assert r.distance == pytest.approx(r64.distance, rel=1e-3, abs=1e-4)


@pytest.mark.parametrize("norm", [2, INF])
def test_working_set_gives_the_optimum_over_all_rows(norm, monkeypatch):
    """Rows entering a few at a time (the working set) give the same optimum in x's region
    as the solver seeing every row from the start, and it satisfies every row."""
    model = random_cnn(5, channels=(3, 4), input_shape=(1, 12, 12)).double()
    ob = openbox.OpenBox(model, (1, 12, 12), domain=(0.0, 1.0))
    x = random_input((1, 12, 12), 1, seed=5, kind="unit")[0]
    poly = ob.polytope(x)
    results = {}
    for rows in (poly.A.shape[0], 3):
        monkeypatch.setattr(cf, "WORKING_SET_ROWS", rows)
        results[rows] = counterfactual(ob, x, norm=norm, max_regions=1)
    full, grown = results.values()
    assert grown.distance == pytest.approx(full.distance, rel=1e-7)
    assert grown.target == full.target and grown.region == full.region
    # the returned point lies in the closure of x's region (before the tiny nudge)
    slack = poly.d - poly.A @ grown.point.reshape(-1).numpy()
    assert slack.min() >= -1e-7


def test_bad_inputs_raise_clear_errors():
    model = random_mlp(1, (3, 6, 3), batch_norm=False).double()
    ob = openbox.OpenBox(model, (3,))
    x = random_input((3,), 1, seed=0)[0]
    source = int(model(x[None]).argmax())
    with pytest.raises(ValueError, match=r"target must lie in \[0, 3\), got 3"):
        counterfactual(ob, x, target=3)
    with pytest.raises(ValueError, match=r"target must lie in \[0, 3\), got -1"):
        counterfactual(ob, x, target=-1)
    with pytest.raises(ValueError, match=f"target {source} is already the prediction"):
        counterfactual(ob, x, target=source)
    with pytest.raises(ValueError, match="target must be an int"):
        counterfactual(ob, x, target=1.5)
    for norm in (1, 3, "inf"):
        with pytest.raises(ValueError, match="norm must be 2 or float"):
            counterfactual(ob, x, norm=norm)
    with pytest.raises(ValueError, match="max_regions must be a positive integer"):
        counterfactual(ob, x, max_regions=0)
    with pytest.raises(ValueError, match="must have shape"):
        counterfactual(ob, torch.zeros(4, dtype=torch.float64))
    # one input given as a batch of one is fine
    assert counterfactual(ob, x[None]).verified
