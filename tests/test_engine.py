"""openbox core: local linear classifiers, configurations, polytopes, radii, verification.

References are independent of the engine: torch.func.jacrev of the float64 model
for W_x, the model's own forward for f, brute-force sampling for regions.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from _models import generator, random_cnn, random_mlp, randomize_
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import jacrev, vmap

import openbox

F64 = torch.float64
SETTINGS = settings(
    max_examples=25, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


def jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(B, C, *input_shape) Jacobian of the float64 model at each input."""
    m = copy.deepcopy(model).double()
    return vmap(jacrev(lambda z: m(z[None])[0]))(x)


def model_out(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return copy.deepcopy(model).to(x.dtype)(x)


def interior_input(shape, seed, batch=1):
    """Inputs in (0.05, 0.95): no zero pixels, so no exact ties on random weights."""
    return 0.05 + 0.9 * torch.rand((batch, *shape), generator=generator(seed), dtype=F64)


def small_cnn(seed, **kw):
    return random_cnn(seed, channels=(3, 4), input_shape=(1, 12, 12), **kw)


# --------------------------------------------------------------------------- LLC


@SETTINGS
@given(
    seed=st.integers(0, 10_000),
    arch=st.sampled_from(["mlp", "leaky", "cnn", "cnn-avg", "resnet"]),
    batch=st.integers(1, 4),
)
def test_llc_equals_jacobian_and_model(seed, arch, batch):
    from _models import resnet_like

    if arch == "mlp":
        model, shape = random_mlp(seed, (6, 9, 7, 4)), (6,)
    elif arch == "leaky":
        model, shape = random_mlp(seed, (5, 8, 8, 3), negative_slope=0.1 + 0.3 * (seed % 3)), (5,)
    elif arch == "resnet":
        model = resnet_like(seed)
        shape = _resnet_shape(model)
    else:
        model = small_cnn(seed, pool="avg" if arch == "cnn-avg" else "max")
        shape = (1, 12, 12)
    ob = openbox.OpenBox(model, shape)
    x = interior_input(shape, seed, batch)
    e = ob.explain(x)
    assert e.weight.shape == (batch, e.logits.shape[1], *shape)
    assert e.bias.shape == e.logits.shape == (batch, e.logits.shape[1])
    assert not bool(e.on_boundary.any()), "random interior inputs should not sit on a facet"
    torch.testing.assert_close(e.weight, jacobian(model, x), rtol=1e-9, atol=1e-12)
    want = model_out(model, x)
    torch.testing.assert_close(e.logits, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(e.predict(x), want, rtol=1e-10, atol=1e-10)


def _resnet_shape(model):
    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return (conv.in_channels, 8, 8)


def test_batch_equals_one_by_one():
    model = small_cnn(3)
    ob = openbox.OpenBox(model, (1, 12, 12), batch_size=2)
    x = interior_input((1, 12, 12), 3, batch=5)
    x[1, :, :4] = 0.0  # one input with background (ties)
    e = ob.explain(x)
    for i in range(5):
        ei = ob.explain(x[i : i + 1])
        assert e[i].region_key == ei.region_key and torch.equal(e[i].weight, e.weight[i : i + 1])
        torch.testing.assert_close(ei.weight[0], e.weight[i], rtol=0, atol=1e-14)
        torch.testing.assert_close(ei.bias[0], e.bias[i], rtol=0, atol=1e-14)
        assert ei.region_key[0] == e.region_key[i]
        assert int(ei.n_tight[0]) == int(e.n_tight[i])


def test_float32_matches_float64():
    model = small_cnn(4)
    x64 = interior_input((1, 12, 12), 4, batch=3)
    e64 = openbox.OpenBox(model, (1, 12, 12)).explain(x64)
    ob32 = openbox.OpenBox(model, (1, 12, 12), dtype=torch.float32)
    e32 = ob32.explain(x64.float())
    assert e32.weight.dtype == torch.float32
    torch.testing.assert_close(e32.weight.double(), e64.weight, rtol=0, atol=1e-4)
    report = ob32.verify(x64.float())
    assert report.ok and report.atol == 1e-4 and report.dtype == torch.float32


def test_model_is_not_modified():
    model = small_cnn(5)
    before = copy.deepcopy(model.state_dict())
    ob = openbox.OpenBox(model, (1, 12, 12))
    x = interior_input((1, 12, 12), 5, batch=2)
    ob.verify(x)
    ob.polytope(x[0])
    assert all(p.dtype == torch.float32 for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert not model.training


# --------------------------------------------------------------------------- verification


def test_verify_passes_and_reports_tolerances():
    model = small_cnn(6)
    ob = openbox.OpenBox(model, (1, 12, 12))
    x = interior_input((1, 12, 12), 6, batch=4)
    report = ob.verify(x)
    assert report.ok and report.passed.shape == (4,)
    assert report.max_abs_error < 1e-12
    assert (report.rtol, report.atol) == (1e-10, 1e-10)
    assert "4/4 inputs pass" in str(report)


def test_verify_detects_a_wrong_program():
    """verify compares against the model itself: a corrupted program must fail."""
    model = small_cnn(7)
    ob = openbox.OpenBox(model, (1, 12, 12))
    last = ob.program.nodes[-1]
    with torch.no_grad():
        last.bias.add_(1e-6)  # the program's own copy; the model is untouched
    report = ob.verify(interior_input((1, 12, 12), 7, batch=2))
    assert not report.ok
    assert report.max_abs_error == pytest.approx(1e-6, rel=1e-3)


# --------------------------------------------------------------------------- polytopes


def _cnn_and_interior_point(seed=8):
    model = small_cnn(seed)
    ob = openbox.OpenBox(model, (1, 12, 12))
    x = interior_input((1, 12, 12), seed)
    assert int(ob.explain(x).n_tight[0]) == 0
    return model, ob, x


def test_polytope_contains_x_and_matches_radius():
    model, ob, x = _cnn_and_interior_point()
    poly = ob.polytope(x[0])
    A, d = np.asarray(poly.A), np.asarray(poly.d)
    assert A.shape[1] == 144 and A.dtype == np.float64
    assert poly.contains(x[0])
    assert np.all(A @ x[0].flatten().numpy() <= d + 1e-12)
    assert not np.any(np.all(A == 0, axis=1)), "identically zero rows are dropped"
    both = ob.radius_pair(x)
    for norm, r_both in zip((2, float("inf")), both):
        r = ob.certified_radius(x, norm=norm)
        assert r.shape == (1,) and float(r[0]) > 0
        assert torch.equal(r, r_both)
        assert poly.radius(norm=norm) == pytest.approx(float(r[0]), rel=1e-9)
    assert float(both[1][0]) <= float(both[0][0])  # the L-inf ball sits inside the L2 one


def test_every_row_is_a_gate_constraint_of_the_model():
    """Independent check of the rows: a_i is the gradient of the gate input (or of the
    difference of two max-pool entries) of the float64 model, by autograd."""
    model, ob, x = _cnn_and_interior_point(9)
    poly = ob.polytope(x[0])
    src = poly.row_source
    m = copy.deepcopy(model).double()
    feats = {}
    hooks = [
        getattr(m, name).register_forward_hook(
            lambda mod, inp, out, name=name: feats.__setitem__(name, inp[0])
        )
        for name in ("relu1", "pool1", "relu2", "pool2")
    ]
    xr = x.clone().requires_grad_(True)
    m(xr)
    for h in hooks:
        h.remove()
    node_to_name = {k: n for k, n in zip(ob.program.gates, ("relu1", "pool1", "relu2", "pool2"))}
    rng = np.random.default_rng(0)
    for i in rng.choice(len(poly.d), size=20, replace=False):
        z = feats[node_to_name[int(src["node"][i])]].flatten()
        unit, partner = int(src["unit"][i]), int(src["partner"][i])
        form = z[unit] if partner < 0 else z[unit] - z[partner]
        (grad,) = torch.autograd.grad(form, xr, retain_graph=True)
        a = grad.flatten().numpy()
        row = np.asarray(poly.A[i])
        # ReLU rows are oriented (sign); max-pool rows are z_unit - z_partner <= 0
        scale = row @ a / (a @ a)
        assert abs(abs(scale) - 1) < 1e-9
        np.testing.assert_allclose(row, scale * a, rtol=0, atol=1e-12)
        value = float(form.detach())
        np.testing.assert_allclose(poly.d[i] - row @ x[0].flatten().numpy(), -scale * value,
                                   rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("norm", [2, float("inf")])
def test_points_inside_certified_ball_share_region_and_llc(norm):
    model, ob, x = _cnn_and_interior_point(10)
    e = ob.explain(x)
    r = float(ob.certified_radius(x, norm=norm)[0])
    g = generator(11)
    n = x[0].numel()
    if norm == 2:
        v = torch.randn(64, n, generator=g, dtype=F64)
        v = v / v.norm(dim=1, keepdim=True) * (torch.rand(64, 1, generator=g, dtype=F64) ** (1 / n))
    else:
        v = 2 * torch.rand(64, n, generator=g, dtype=F64) - 1
    v[0] = v[0] / v[0].norm(p=norm)  # one point on the sphere itself
    xs = x + 0.999 * r * v.reshape(64, *x.shape[1:])
    es = ob.explain(xs)
    assert all(k == e.region_key[0] for k in es.region_key)
    want = model_out(model, xs)
    got = torch.einsum("cn,bn->bc", e.weight[0].flatten(1), xs.flatten(1)) + e.bias[0]
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_point_past_the_nearest_facet_changes_region():
    model, ob, x = _cnn_and_interior_point(12)
    poly = ob.polytope(x[0])
    A, d = np.asarray(poly.A), np.asarray(poly.d)
    x0 = x[0].flatten().numpy()
    dist = (d - A @ x0) / np.linalg.norm(A, axis=1)
    i = int(np.argmin(dist))
    assert dist[i] == pytest.approx(poly.radius(norm=2), rel=1e-9)
    normal = A[i] / np.linalg.norm(A[i])
    key = ob.explain(x).region_key[0]
    inside = torch.from_numpy(x0 + 0.999 * dist[i] * normal).reshape(x.shape)
    past = torch.from_numpy(x0 + 1.001 * dist[i] * normal).reshape(x.shape)
    assert ob.explain(inside).region_key[0] == key
    assert ob.explain(past).region_key[0] != key


# --------------------------------------------------------------------------- boundaries


def _relu_facet_point(ob, model, x):
    """x moved onto the facet of the ReLU input with the smallest |z| / ||a||."""
    poly = ob.polytope(x[0])
    src = poly.row_source
    relu_rows = np.flatnonzero(src["partner"] < 0)
    A = np.asarray(poly.A)[relu_rows]
    slack = np.asarray(poly.d)[relu_rows] - A @ x[0].flatten().numpy()
    j = int(np.argmin(slack / np.linalg.norm(A, axis=1)))
    a = A[j]
    on_facet = x[0].flatten().numpy() + slack[j] / (a @ a) * a
    return torch.from_numpy(on_facet).reshape(x.shape)


def test_input_on_a_relu_facet_is_flagged_and_its_llc_is_exact():
    model, ob, x = _cnn_and_interior_point(13)
    xf = _relu_facet_point(ob, model, x)
    e = ob.explain(xf)
    assert int(e.n_tight[0]) >= 1 and bool(e.on_boundary[0])
    assert float(ob.certified_radius(xf, norm=2)[0]) == 0.0
    assert float(ob.certified_radius(xf, norm=float("inf"))[0]) == 0.0
    assert ob.polytope(xf[0]).radius(norm=2) == 0.0
    # exact at x (continuity), and the LLC of the region entered along u
    torch.testing.assert_close(e.predict(xf), model_out(model, xf), rtol=1e-10, atol=1e-10)
    for t in (1e-7, 1e-9):
        xt = xf + t * ob.direction
        et = ob.explain(xt)
        assert int(et.n_tight[0]) == 0
        assert et.region_key[0] == e.region_key[0]
        torch.testing.assert_close(et.weight, e.weight, rtol=0, atol=1e-13)
        torch.testing.assert_close(e.weight, jacobian(model, xt), rtol=1e-9, atol=1e-12)


def test_zero_background_sits_on_max_pool_ties():
    """Units over an all-zero background output the same constant: max-pool windows tie
    between different linear functions. Flagged, radius 0, LLC still exact."""
    model = small_cnn(14)
    with torch.no_grad():  # make layer-1 units active on the background
        model.bn1.bias.fill_(2.0)
    ob = openbox.OpenBox(model, (1, 12, 12))
    x = interior_input((1, 12, 12), 14)
    x[0, 0, :6] = 0.0
    e = ob.explain(x)
    assert int(e.configuration.n_tight_pool[0]) > 0
    assert float(ob.certified_radius(x)[0]) == 0.0
    assert ob.verify(x).ok
    xt = x + 1e-8 * ob.direction
    assert ob.explain(xt).region_key[0] == e.region_key[0]
    torch.testing.assert_close(e.weight, jacobian(model, xt), rtol=1e-9, atol=1e-12)
    poly = ob.polytope(x[0])
    assert poly.radius(norm=2) == 0.0
    assert len(poly.tight_rows()) == int(e.n_tight[0])
    assert poly.inscribed_radius() > 0, "the tie-broken region itself is full-dimensional"


def test_ties_between_identical_functions_are_not_facets():
    """All-off ReLUs feed max-pool windows of identical zeros: not a facet, not flagged,
    and the key does not depend on which zero won."""
    model = small_cnn(15)
    with torch.no_grad():
        model.bn1.bias.fill_(-50.0)  # every layer-1 unit off on [0, 1] inputs
    ob = openbox.OpenBox(model, (1, 12, 12))
    x = interior_input((1, 12, 12), 15, batch=3)
    e = ob.explain(x)
    assert int(e.configuration.n_tight_pool.sum()) == 0
    assert e.n_tight.tolist() == [0, 0, 0]
    assert len(set(e.region_key)) == 1
    # the all-zero rows are dropped, not reported as constraints
    poly = ob.polytope(x[0])
    assert poly.contains(x[0]) and not np.any(np.all(np.asarray(poly.A) == 0, axis=1))


def test_tie_break_direction_is_fixed_and_documented():
    u = openbox.tie_break_direction((1, 28, 28))
    assert u.shape == (1, 28, 28) and u.dtype == F64
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-15)
    torch.testing.assert_close(u, openbox.tie_break_direction((1, 28, 28)), rtol=0, atol=0)


def test_domain_box_is_kept_apart_from_network_facets():
    """A pixel at exactly 0 lies on the domain box, not on a network facet."""
    model = random_mlp(16, (9, 12, 8, 3))
    ob = openbox.OpenBox(model, (9,), domain=(0.0, 1.0))
    x = interior_input((9,), 16)
    x[0, 0] = 0.0
    assert int(ob.explain(x).n_tight[0]) == 0
    poly = ob.polytope(x[0])
    assert poly.radius(norm=2) > 0 and float(ob.certified_radius(x)[0]) > 0
    assert poly.contains(x[0])
    outside = x[0].clone()
    outside[0] = -1e-3
    if poly.contains(outside, include_domain=False):
        assert not poly.contains(outside, include_domain=True)


# --------------------------------------------------------------------------- segments


def test_segment_pieces_match_brute_force():
    model = random_mlp(17, (2, 12, 12, 3))
    ob = openbox.OpenBox(model, (2,))
    x0 = torch.tensor([-2.0, -1.5], dtype=F64)
    x1 = torch.tensor([2.5, 2.0], dtype=F64)
    pieces = openbox.regions.segment(ob, x0, x1)
    assert pieces[0].t_start == 0.0 and pieces[-1].t_end == 1.0
    assert all(a.t_end == b.t_start for a, b in zip(pieces, pieces[1:]))
    assert all(a.region_key != b.region_key for a, b in zip(pieces, pieces[1:]))
    ts = torch.linspace(0, 1, 4001, dtype=F64)
    keys = ob.region_key(x0 + ts[:, None] * (x1 - x0))
    starts = np.array([p.t_start for p in pieces])
    for t, k in zip(ts.tolist(), keys):
        i = int(np.searchsorted(starts, t, side="right")) - 1
        p = pieces[i]
        if p.t_start < t < p.t_end:
            assert k == p.region_key
    assert {p.region_key for p in pieces} >= set(keys) - {None}


# --------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def mlp_box():
    return openbox.OpenBox(random_mlp(18, (4, 6, 3)), (4,))


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.zeros(2, 5, dtype=F64), r"shape \(B, 4\)"),
        (torch.zeros(4, dtype=F64), r"shape \(B, 4\)"),
        (torch.zeros(2, 4, dtype=torch.int64), "must be a floating tensor"),
        (torch.zeros(0, 4, dtype=F64), "empty batch"),
        (torch.tensor([[0.0, float("nan"), 0, 0]], dtype=F64), "NaN or Inf"),
        (torch.tensor([[0.0, float("inf"), 0, 0]], dtype=F64), "NaN or Inf"),
        (torch.zeros(2, 4, dtype=F64, device="meta"), "device cpu"),
        ([[0.0, 0.0, 0.0, 0.0]], "torch.Tensor"),
    ],
)
def test_bad_inputs_raise_clear_errors(mlp_box, x, match):
    for call in (mlp_box.explain, mlp_box.verify, mlp_box.certified_radius):
        with pytest.raises(ValueError, match=match):
            call(x)


def test_bad_polytope_input_and_norm(mlp_box):
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        mlp_box.polytope(torch.zeros(2, 4, dtype=F64))
    with pytest.raises(ValueError, match="norm must be 2 or"):
        mlp_box.certified_radius(torch.zeros(1, 4, dtype=F64), norm=1)
    with pytest.raises(ValueError, match="float64 or torch.float32"):
        openbox.OpenBox(random_mlp(0, (4, 3)), (4,), dtype=torch.float16)


def test_non_classifier_output_is_rejected():
    model = randomize_(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()), 0).eval()
    with pytest.raises(ValueError, match=r"output \(N, C\)"):
        openbox.OpenBox(model, (1, 5, 5))
