"""Random architectures through every exactness check of DESIGN.md (tests/fuzz_models.py),
and pinned minimal reproducers of the bugs the fuzzer found.

CI runs cases 0..499 of seed 0 in shards of 25 (so ``-n 2`` spreads them); a failure names
its check and prints ``python experiments/fuzz.py --seed 0 --case I``, which shows the
model, the inputs and every failing check. Longer runs: ``experiments/fuzz.py --n 5000``.
"""

from __future__ import annotations

import collections
import copy
import math

import fuzz_models as fm
import numpy as np
import pytest
import torch
from torch import nn

import linearize
import openbox

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

F64 = torch.float64
SEED = 0
N_CASES = 500
SHARD = 25


def _report(outcomes) -> str:
    lines = []
    for o in outcomes:
        for f in o.failures:
            lines.append(f"({fm.known_bug(f, o.failures)}) {f}")
    shown = lines[:40]
    more = f"\n... and {len(lines) - len(shown)} more" if len(lines) > len(shown) else ""
    return f"{len(lines)} failed checks:\n" + "\n".join(shown) + more


@pytest.mark.parametrize("shard", range(N_CASES // SHARD))
def test_random_architectures(shard):
    outcomes = [fm.run_case(SEED, i) for i in range(shard * SHARD, (shard + 1) * SHARD)]
    status = collections.Counter(o.status for o in outcomes)
    checked = status["ok"] + status["failed"] + status["declined"]
    assert checked >= SHARD // 2, f"the generator made too few checkable models: {status}"
    failed = [o for o in outcomes if o.failures]
    assert not failed, _report(failed)


# --------------------------------------------------------------------------- the generator


def _layer_features(case: fm.Case) -> set[str]:
    """What a case exercises: module types with their notable keywords, functional ops,
    and adaptive pools that up- or down-sample (from the shapes seen in a forward pass)."""
    feats = set()
    shapes = {}

    def record(mod, inp, out):  # returns None: the output is left alone
        shapes.setdefault(id(mod), (inp[0].shape, out.shape))

    hooks = [m.register_forward_hook(record) for m in case.model.modules()]
    with torch.no_grad():
        case.model(case.x.clone())
    for h in hooks:
        h.remove()
    for m in case.model.modules():
        t = type(m).__name__
        feats.add(t)
        if isinstance(m, (nn.Conv1d, nn.Conv2d)):
            feats |= {f"{t}:stride" for s in m.stride if s > 1}
            feats |= {f"{t}:dilation" for d in m.dilation if d > 1}
            feats |= {f"{t}:groups"} if m.groups > 1 else set()
            feats |= {f"{t}:same"} if m.padding == "same" else set()
            feats |= {f"{t}:nobias"} if m.bias is None else set()
            padded = not isinstance(m.padding, str) and max(m.padding) > 0
            feats |= {f"{t}:padding"} if padded else set()
        if isinstance(m, nn.LeakyReLU):
            feats |= {"LeakyReLU:negative"} if m.negative_slope < 0 else set()
            feats |= {"LeakyReLU:>1"} if m.negative_slope > 1 else set()
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d)):
            k = max(np.atleast_1d(m.kernel_size))
            s = max(np.atleast_1d(m.stride))
            feats |= {f"{t}:overlap"} if s < k else set()
            feats |= {f"{t}:dilation"} if max(np.atleast_1d(m.dilation)) > 1 else set()
            feats |= {f"{t}:padding"} if max(np.atleast_1d(m.padding)) > 0 else set()
            feats |= {f"{t}:ceil"} if m.ceil_mode else set()
            feats |= {f"{t}:>256"} if np.prod(np.broadcast_to(m.kernel_size, (
                len(shapes[id(m)][0]) - 2,))) > 256 else set()
        if isinstance(m, (nn.AvgPool1d, nn.AvgPool2d)):
            feats |= {f"{t}:ceil"} if m.ceil_mode else set()
            feats |= {f"{t}:exclude_pad"} if not m.count_include_pad else set()
            feats |= {f"{t}:divisor"} if getattr(m, "divisor_override", None) else set()
        if isinstance(m, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)) and id(m) in shapes:
            i, o = shapes[id(m)]
            feats |= {f"{t}:up"} if any(b > a for a, b in zip(i[2:], o[2:])) else set()
            feats |= {f"{t}:down"} if any(b < a for a, b in zip(i[2:], o[2:])) else set()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.affine:
            feats.add(f"{t}:noaffine")
        if isinstance(m, fm.Residual):
            feats.add(f"Residual:{m.style}")
        if isinstance(m, fm.Functional):
            feats |= {f"F.{name}" for name, _ in m.ops}
    if case.padding_window:
        feats.add("all-padding-window")
    return feats


REQUIRED_FEATURES = {
    "Conv1d", "Conv2d", "Conv1d:stride", "Conv2d:stride", "Conv1d:dilation", "Conv2d:dilation",
    "Conv1d:groups", "Conv2d:groups", "Conv1d:same", "Conv2d:same", "Conv1d:nobias",
    "Conv2d:nobias", "Conv1d:padding", "Conv2d:padding", "Linear", "BatchNorm1d",
    "BatchNorm2d", "BatchNorm1d:noaffine", "BatchNorm2d:noaffine", "ReLU", "LeakyReLU",
    "LeakyReLU:negative", "LeakyReLU:>1", "MaxPool1d", "MaxPool2d", "MaxPool1d:overlap",
    "MaxPool2d:overlap", "MaxPool1d:dilation", "MaxPool2d:dilation", "MaxPool1d:padding",
    "MaxPool2d:padding", "MaxPool1d:ceil", "MaxPool2d:ceil", "MaxPool1d:>256", "MaxPool2d:>256",
    "AvgPool1d", "AvgPool2d", "AvgPool1d:ceil", "AvgPool2d:ceil", "AvgPool1d:exclude_pad",
    "AvgPool2d:exclude_pad", "AvgPool2d:divisor", "AdaptiveAvgPool1d:up",
    "AdaptiveAvgPool1d:down", "AdaptiveAvgPool2d:up", "AdaptiveAvgPool2d:down", "Flatten",
    "Identity", "Dropout", "Residual:plus", "Residual:torch.add", "Residual:iadd",
    "Residual:method", "F.relu", "F.leaky_relu", "F.max_pool1d", "F.max_pool2d",
    "F.avg_pool1d", "F.avg_pool2d", "F.adaptive_avg_pool1d", "F.adaptive_avg_pool2d",
    "F.flatten", "F.view", "F.reshape", "all-padding-window",
}


def test_generator_exercises_every_layer_and_keyword():
    """The CI cases together use every supported layer kind and keyword (STYLE.md: a test
    asserts that every node kind is exercised), on 1-D, 2-D and vector inputs."""
    seen, dims, status = set(), set(), collections.Counter()
    for i in range(N_CASES):
        case = fm.build_case(SEED, i)
        status[case.status] += 1
        if case.status == "ok":
            seen |= _layer_features(case)
            dims.add(len(case.input_shape))
    assert not REQUIRED_FEATURES - seen, sorted(REQUIRED_FEATURES - seen)
    assert dims == {1, 2, 3}
    assert status["ok"] > 0.8 * N_CASES, status


def test_generator_is_deterministic():
    for i in (0, 7, 8, 13):
        a, b = fm.build_case(SEED, i), fm.build_case(SEED, i)
        assert repr(a.model) == repr(b.model) and a.status == b.status
        if a.x is not None:
            assert torch.equal(a.x, b.x) and torch.equal(a.extra, b.extra)
            for p, q in zip(a.model.state_dict().values(), b.model.state_dict().values()):
                assert torch.equal(p, q)


def test_models_are_float64_eval_with_random_statistics():
    for i in range(60):
        case = fm.build_case(SEED, i)
        if case.model is None:
            continue
        assert not case.model.training
        values = case.model.state_dict().values()
        assert all(p.dtype == F64 for p in values if p.is_floating_point())
        for m in case.model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                assert not torch.all(m.running_mean == 0) and not torch.all(m.running_var == 1)


# --------------------------------------------------------------------------- pinned bugs


def _assert_case_passes(case: fm.Case):
    outcome = fm.check_case(case)
    assert not outcome.failures, "\n".join(str(f) for f in outcome.failures)


def test_pinned_a_two_overlapping_maxpools_radius():
    """(a) Pool 2 sees pool-1 entries that are the same input (same function, not a facet)
    next to different ones. By hand, the nearest facet is x3 >= x5 (pool 2, window 3):
    radius (0.92 - 0.79) / sqrt(2) = 0.0919; the certified radius was 0.0990 (x5 >= x4)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.MaxPool1d(2, stride=1), nn.MaxPool1d(2, stride=1), nn.Flatten(),
                      nn.Linear(6, 2)).double().eval()
    x = torch.tensor([[[0.97, 0.71, 0.46, 0.92, 0.65, 0.79, 0.18, 0.35]]], dtype=F64)
    ob = openbox.OpenBox(m, input_shape=(1, 8), dtype=F64)
    poly = ob.polytope(x[0])
    want = 0.13 / math.sqrt(2)
    assert poly.radius(2) == pytest.approx(want, rel=1e-9)
    assert float(ob.certified_radius(x, norm=2)[0]) == pytest.approx(want, rel=1e-9)
    assert float(ob.certified_radius(x, norm=float("inf"))[0]) == pytest.approx(
        poly.radius(float("inf")), rel=1e-9)
    _assert_case_passes(fm.case_from_model(m, (1, 8), x, name="pinned-a"))


def test_pinned_b_upsampled_maxpool_radius_and_zero_rows():
    """(b) AdaptiveAvgPool1d(10) on 5 inputs duplicates each entry, so every MaxPool1d(4)
    window is [x0, x0, x1, x1] / [x2, x2, x3, x3]: ties between copies of one function are
    not facets (their rows are zero and must be dropped), the pairs x0/x1 and x2/x3 are.
    The certified radius was inf, the polytope's 0.0404, and the polytope kept zero rows."""
    torch.manual_seed(1)
    m = nn.Sequential(nn.AdaptiveAvgPool1d(10), nn.MaxPool1d(4), nn.Flatten(),
                      nn.Linear(2, 2)).double().eval()
    x = torch.rand(1, 1, 5, dtype=F64)
    ob = openbox.OpenBox(m, input_shape=(1, 5), dtype=F64)
    poly = ob.polytope(x[0])
    A = np.asarray(poly.A)
    assert not np.any(np.all(A == 0, axis=1)), f"all-zero rows kept:\n{A}"
    v = x.flatten()
    want = min(abs(float(v[0] - v[1])), abs(float(v[2] - v[3]))) / math.sqrt(2)
    assert poly.radius(2) == pytest.approx(want, rel=1e-9)
    r2 = float(ob.certified_radius(x, norm=2)[0])
    assert math.isfinite(r2) and r2 == pytest.approx(want, rel=1e-9)
    assert float(ob.certified_radius(x, norm=float("inf"))[0]) == pytest.approx(
        poly.radius(float("inf")), rel=1e-9)
    _assert_case_passes(fm.case_from_model(m, (1, 5), x, name="pinned-b"))


def test_pinned_c_keys_of_windows_over_256_positions_do_not_depend_on_the_batch():
    """(c) MaxPool2d(17) has 289 window positions: the key of an input whose maximum sits
    at position 0 must not change when a batch-mate's maximum sits at position 288."""
    torch.manual_seed(2)
    m = nn.Sequential(nn.MaxPool2d(17), nn.Flatten(), nn.Linear(1, 2)).double().eval()
    ob = openbox.OpenBox(m, input_shape=(1, 17, 17), dtype=F64)
    g = torch.Generator().manual_seed(2)
    low = torch.rand(1, 1, 17, 17, generator=g, dtype=F64)
    low[0, 0, 0, 0] = 2.0
    high = torch.rand(1, 1, 17, 17, generator=g, dtype=F64)
    high[0, 0, 16, 16] = 2.0
    alone_low, alone_high = ob.explain(low).region_key[0], ob.explain(high).region_key[0]
    assert alone_low != alone_high
    both = ob.explain(torch.cat([low, high])).region_key
    assert both[0] == alone_low and both[1] == alone_high
    swapped = ob.explain(torch.cat([high, low])).region_key
    assert swapped[1] == alone_low and swapped[0] == alone_high
    _assert_case_passes(fm.case_from_model(m, (1, 17, 17), torch.cat([low, high]),
                                           name="pinned-c"))


def test_pinned_d_window_made_only_of_padding():
    """(d) After AdaptiveAvgPool1d(1), MaxPool1d(2, padding=1, dilation=2) reads positions
    -1 and 1 of a length-1 signal: padding only, so torch outputs -inf, which the ReLU makes
    0. Correct: an exact program, or UnsupportedLayerError naming module '1' (not an
    internal LintError)."""
    torch.manual_seed(3)
    m = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.MaxPool1d(2, padding=1, dilation=2),
                      nn.ReLU(), nn.Flatten(), nn.Linear(2, 2)).double().eval()
    x = torch.randn(5, 2, 18, dtype=F64)
    try:
        prog = linearize.compile(m, (2, 18))
    except linearize.UnsupportedLayerError as e:
        assert "'1'" in str(e) and any(o.path == "1" for o in e.offenders), str(e)
        return
    with torch.no_grad():
        torch.testing.assert_close(prog(x), m(x), rtol=1e-10, atol=1e-10)
    _assert_case_passes(fm.case_from_model(m, (2, 18), x, name="pinned-d"))


# --------------------------------------------------------------- region walks on random models

N_WALK_CASES = 120
WALK_SHARD = 30


def _walk_checks(case) -> list[str]:
    """segment keys at sampled t, exact-IG completeness and plane coverage on one case."""
    problems = []
    model, shape = case.model, case.input_shape
    try:
        ob = openbox.OpenBox(model, shape)
    except Exception as exc:  # declined (padding-only windows) is the only accepted refusal
        if isinstance(exc, linearize.UnsupportedLayerError):
            return []
        return [f"OpenBox: {type(exc).__name__}: {exc}"]
    x = case.x
    x0, x1 = x[0], x[-1]
    if bool((x0 == x1).all()):
        return []
    pieces = openbox.regions.segment(ob, x0, x1, progress=False, max_pieces=20_000)
    ts = torch.linspace(0, 1, 201, dtype=torch.float64)
    pts = x0 + ts.reshape(-1, *[1] * len(shape)) * (x1 - x0)
    conf = ob.configuration(pts)
    starts = np.array([p.t_start for p in pieces])
    for t, k, tight in zip(ts.tolist(), conf.region_keys(), conf.n_tight.tolist()):
        p = pieces[int(np.searchsorted(starts, t, side="right")) - 1]
        # off every facet, a sampled point inside a piece has the piece's key
        if p.t_start + 1e-9 < t < p.t_end - 1e-9 and tight == 0 and k != p.region_key:
            problems.append(f"segment: key at t={t:.4f} differs from its piece's")
            break
    problems += _line_pass_checks(ob, x0, x1)
    problems += _pool_table_checks(ob, x)
    c = int(ob.program(x1.unsqueeze(0)).argmax())
    ig = openbox.regions.integrated_gradients(ob, x1.unsqueeze(0), x0.unsqueeze(0), c,
                                              progress=False)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()
        gap = float(ref(x1[None].clone())[0, c] - ref(x0[None].clone())[0, c])  # in-place models
    scale = 1 + abs(gap)
    if abs(float(ig.sum()) - gap) > 1e-9 * scale:
        problems.append(f"exact IG: completeness error {abs(float(ig.sum()) - gap):.2e}")
    u = x1 - x0
    v = torch.randn(shape, generator=torch.Generator().manual_seed(case.index),
                    dtype=torch.float64)
    v = v - (v * u).sum() / (u * u).sum() * u
    if float(v.norm()) > 1e-9:
        pm = openbox.regions.plane(ob, x0, u, v * (u.norm() / v.norm()),
                                   (-0.05, 0.05, -0.05, 0.05), max_regions=400, progress=False)
        if pm.complete and abs(pm.coverage - 1) > 1e-9:
            problems.append(f"plane: coverage {pm.coverage!r}")
        if pm.complete:  # off every facet, a point has its polygon's key
            ab = np.random.default_rng(case.index).uniform(-0.05, 0.05, (16, 2))
            ab = ab[pm.locate(ab) >= 0]
            at = torch.as_tensor(ab)
            pts = x0 + at[:, :1].reshape(-1, *[1] * len(shape)) * u \
                + at[:, 1:].reshape(-1, *[1] * len(shape)) * (v * (u.norm() / v.norm()))
            conf = ob.configuration(pts)
            for i, k, tight in zip(pm.locate(ab).tolist(), conf.region_keys(),
                                   conf.n_tight.tolist()):
                if tight == 0 and k != pm.polygons[i].region_key:
                    problems.append("plane: a point's key differs from its polygon's")
                    break
    return problems


def _pool_table_checks(ob, x) -> list[str]:
    """configure with max-pool tables (built on the second pass of the same direction,
    used on the third) against the rule on every window, bit for bit, on the case's
    inputs with a zero block (flat ties) added."""
    from openbox import configuration as cf

    x = torch.cat([x, x.clone()])
    n = x[0].numel()
    x[x.shape[0] // 2 :].reshape(x.shape[0] - x.shape[0] // 2, -1)[:, n // 4 : 3 * n // 4] = 0
    before = cf.POOL_TABLE
    try:
        cf.POOL_TABLE = False
        ref = cf.configure(ob.program, x, ob.direction, ob.tol)
        cf.POOL_TABLE = True
        for _ in range(3):
            got = cf.configure(ob.program, x, ob.direction, ob.tol)
    finally:
        cf.POOL_TABLE = before
    a, b = ref.configuration, got.configuration
    if not (np.array_equal(a.packed(), b.packed()) and torch.equal(a.n_tight, b.n_tight)
            and torch.equal(ref.logits, got.logits) and torch.equal(ref.rates, got.rates)):
        return ["configure: the max-pool table differs from the rule"]
    return []


def _line_pass_checks(ob, x0, x1) -> list[str]:
    """The line pass with a tail run without u (and its redo) against the pass carrying
    u everywhere, at 16 points and in one-point tail steps past their tail exits. The
    ends share a constant block (the middle half of the input), which makes ties that
    only u decides."""
    from openbox import configuration as cf

    split = cf.line_split(ob.program)
    if split is None:
        return []
    x0, x1 = x0.clone(), x1.clone()
    n = x0.numel()
    x0.view(-1)[n // 4 : 3 * n // 4] = 0.25
    x1.view(-1)[n // 4 : 3 * n // 4] = 0.25
    d = x1 - x0
    ts = torch.linspace(0, 1, 16, dtype=torch.float64)
    args = (ob.program, x0.unsqueeze(0), d, ob.direction)
    lp = cf.configure_line(*args, ts, ob.tol, split=split)
    ref = cf.configure_line(*args, ts, ob.tol)
    close = lambda a, b: torch.allclose(a, b, rtol=0, atol=1e-12)  # noqa: E731
    if not (np.array_equal(lp.configuration.packed(), ref.configuration.packed())
            and close(lp.logits, ref.logits) and torch.equal(lp.exit.isinf(), ref.exit.isinf())
            and close(lp.exit.nan_to_num(posinf=0.0), ref.exit.nan_to_num(posinf=0.0))):
        return ["line pass: the tail without u differs from the three-stream pass"]
    t_new = torch.minimum(lp.tail.tail_exit, torch.ones((), dtype=torch.float64))
    for i in torch.nonzero(t_new < lp.tail.head_guard).flatten()[:4].tolist():
        rows = torch.tensor([i])
        gates, logits, _, _ = cf.configure_line_tail(ob.program, lp.tail, rows, t_new[rows],
                                                     ob.tol)
        there = cf.configure_line(*args, t_new[rows], ob.tol)
        whole = cf.with_head(lp.configuration, gates, lp.tail, rows)
        if not (np.array_equal(whole.packed(), there.configuration.packed())
                and close(logits, there.logits)):
            return [f"line pass: a one-point tail step at t={float(t_new[i]):.6f} differs "
                    "from a pass there"]
    return []


@pytest.mark.parametrize("shard", range(N_WALK_CASES // WALK_SHARD))
def test_region_walks_on_random_architectures(shard):
    bad = []
    for i in range(shard * WALK_SHARD, (shard + 1) * WALK_SHARD):
        case = fm.build_case(SEED + 1, i)
        if case.status != "ok":
            continue
        bad += [f"seed={SEED + 1} case={i}: {p}" for p in _walk_checks(case)]
    assert not bad, "\n".join(bad)
