"""The Captum adapters (gradients, CAM, perturbation) and the fx surgery they share.

Table-driven over every method on the shared small models, plus independent references:
closed forms on a linear model, Grad-CAM / CAM computed directly with torch, unique_relus
against the original model, DeepLift on a reused ReLU against separate ReLUs.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import openbox.explainers.captum_cam  # noqa: F401  (registers the methods)
import openbox.explainers.captum_gradients  # noqa: F401
import openbox.explainers.captum_perturbation  # noqa: F401
from openbox.explainers import base, surgery
from openbox.explainers.base import UnsupportedModelError
from tests._explainer_models import (
    SHAPE,
    assert_unchanged,
    functional_cnn,
    inputs,
    linear_model,
    reused_relu,
    snapshot,
    tiny_cnn,
    tiny_gap,
)

F64 = torch.float64
CNNS = {"tiny_cnn": tiny_cnn, "reused_relu": reused_relu, "functional_cnn": functional_cnn,
        "tiny_gap": tiny_gap}
ALL = {**CNNS, "linear_model": linear_model}
GRADIENT = ["saliency", "input-x-gradient", "integrated-gradients", "smoothgrad",
            "guided-backprop", "deconvolution", "deeplift"]
FAST = {"lime-patches": {"n_samples": 200}, "kernelshap": {"n_samples": 200},
        "smoothgrad": {"nt_samples": 6, "nt_samples_batch_size": 3},
        "integrated-gradients": {"n_steps": 20}}
"""Smaller sample counts than the defaults, to keep the file fast."""

CASES = (
    [(n, m) for n in GRADIENT for m in ALL]
    + [(n, m) for n in ("gradcam", "guided-gradcam") for m in CNNS]
    + [("cam", "tiny_gap")]
    + [(n, m) for n in ("lime-patches", "kernelshap", "occlusion")
       for m in ("tiny_cnn", "functional_cnn", "linear_model")]
)
NAMES = sorted({n for n, _ in CASES})


def make(name: str, model: nn.Module, **options):
    return base.get(name, model, SHAPE, dtype=F64, **{**FAST.get(name, {}), **options})


def test_every_method_is_registered_and_documented():
    for name in NAMES:
        cls = base.explainer_class(name)
        assert cls.summary and cls.__doc__
        for option, default in cls.options.items():
            assert option in cls.__doc__, (name, option)
            assert f"default {default!r}" in cls.__doc__ or f"default {default}" in \
                cls.__doc__, (name, option, default)


@pytest.mark.parametrize("name,model_name", CASES)
def test_shape_finite_batch_and_model_unchanged(name, model_name):
    model = ALL[model_name]()
    before = snapshot(model)
    ex = make(name, model)
    x = inputs(3, seed=1).to(F64)
    target = torch.tensor([0, 2, 1])
    r = ex.explain(x, target, seed=5)
    assert r.attribution.shape == x.shape and r.attribution.dtype == F64
    assert torch.isfinite(r.attribution).all()
    assert r.attribution.abs().sum() > 0
    if ex.local_model:
        assert r.probability.shape == (3,) and len(r.surrogates) == 3
    if not ex.stochastic or not ex.batched:
        # the base seeds input b of an unbatched method with seed + b
        ones = [ex.explain(x[b : b + 1], target[b : b + 1], seed=5 + (0 if ex.batched else b))
                for b in range(3)]
        torch.testing.assert_close(r.attribution, torch.cat([o.attribution for o in ones]),
                                   rtol=1e-7, atol=1e-10)
    assert_unchanged(model, before)


@pytest.mark.parametrize("name", [n for n in NAMES if base.explainer_class(n).stochastic])
def test_seeds(name):
    ex = make(name, tiny_cnn())
    x = inputs(2, seed=2).to(F64)
    state = torch.get_rng_state()
    a = ex.explain(x, 1, seed=3).attribution
    assert torch.equal(torch.get_rng_state(), state)          # global RNG left alone
    assert torch.equal(a, ex.explain(x, 1, seed=3).attribution)
    assert not torch.allclose(a, ex.explain(x, 1, seed=4).attribution)


# ----------------------------------------------------------------------------- references


@pytest.mark.parametrize("name,closed_form,rtol", [
    ("saliency", lambda x, w: w.expand_as(x), 1e-10),
    ("input-x-gradient", lambda x, w: x * w, 1e-10),
    # Captum casts its quadrature weights to float32 (integrated_gradients.py:
    # torch.tensor(step_sizes).float()), so they sum to 1 only to float32 rounding
    ("integrated-gradients", lambda x, w: x * w, 1e-7),
    ("deeplift", lambda x, w: x * w, 1e-10),
])
def test_linear_model_closed_forms(name, closed_form, rtol):
    model = linear_model().to(F64)
    x = inputs(3, seed=3).to(F64)
    target = torch.tensor([2, 0, 1])
    w = model.fc.weight.detach()[target].reshape(3, *SHAPE)
    got = make(name, model).explain(x, target).attribution
    torch.testing.assert_close(got, closed_form(x, w), rtol=rtol, atol=1e-12)


def test_gradcam_matches_direct_computation():
    model = tiny_gap().to(F64)
    x = inputs(3, seed=4).to(F64)
    target = torch.tensor([1, 0, 2])
    a = model[:5](x).detach().requires_grad_(True)           # conv2's output (B, 4, 6, 6)
    logits = model[5:](a)
    logits[torch.arange(3), target].sum().backward()
    alpha = a.grad.mean((2, 3), keepdim=True)
    cam = F.relu((alpha * a).sum(1, keepdim=True))
    expected = F.interpolate(cam, size=SHAPE[1:], mode="bilinear", align_corners=False)
    r = make("gradcam", model).explain(x, target)
    assert r.info["layer"] == "conv2"
    torch.testing.assert_close(r.attribution, expected.detach(), rtol=1e-10, atol=1e-12)


def test_cam_matches_direct_computation():
    model = tiny_gap().to(F64)
    x = inputs(3, seed=5).to(F64)
    target = torch.tensor([0, 2, 1])
    with torch.no_grad():
        a = model[:7](x)                                      # relu2's output, into the GAP
        w = model.fc.weight[target]
        cam = (w[:, :, None, None] * a).sum(1, keepdim=True)
        # the reference itself: the map's mean plus the bias is the logit
        logits = model(x)[torch.arange(3), target]
        torch.testing.assert_close(cam.mean((1, 2, 3)) + model.fc.bias[target], logits)
        expected = F.interpolate(cam, size=SHAPE[1:], mode="bilinear", align_corners=False)
    got = make("cam", model).explain(x, target).attribution
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


class InplaceMethods(nn.Module):
    """ReLU as an in-place module reused, ``x.relu()`` and ``F.relu(inplace=True)``."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(3 * 12 * 12, 3)

    def forward(self, x):
        y = self.conv(x)
        self.act(y)                      # in place: later readers of y see the ReLU
        z = self.act(y - 0.2).relu()
        F.relu(z, inplace=True)
        return self.fc((z + y).flatten(1))


@pytest.mark.parametrize("build", [tiny_cnn, reused_relu, functional_cnn,
                                   lambda: InplaceMethods().eval()])
def test_unique_relus_same_outputs_one_module_per_use(build):
    model = build().to(F64)
    before = snapshot(model)
    gm = surgery.unique_relus(model, max_pools=True)
    x = torch.randn(5, *SHAPE, dtype=F64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=0, atol=0)
    mods = dict(gm.named_modules())
    relu_calls = [n.target for n in gm.graph.nodes
                  if n.op == "call_module" and isinstance(mods[n.target], nn.ReLU)]
    pool_calls = [n.target for n in gm.graph.nodes
                  if n.op == "call_module" and isinstance(mods[n.target], nn.MaxPool2d)]
    leftover = [n for n in gm.graph.nodes
                if (n.op == "call_function" and n.target in surgery.RELU_FUNCTIONS + tuple(
                    surgery.MAX_POOL_FUNCTIONS)) or (n.op == "call_method" and n.target in
                                                     surgery.RELU_METHODS)]
    expected_relus = {"InplaceMethods": 4}.get(type(model).__name__, 2)
    assert len(relu_calls) == len(set(relu_calls)) == expected_relus
    assert len(pool_calls) == len(set(pool_calls))
    assert not leftover
    assert not any(m.inplace for m in mods.values() if isinstance(m, nn.ReLU))
    assert_unchanged(model, before)


class SeparateReLU(nn.Module):
    """``ReusedReLU`` written with one module per use."""

    def __init__(self, reused):
        super().__init__()
        self.conv1, self.conv2, self.fc = reused.conv1, reused.conv2, reused.fc
        self.act1, self.act2 = nn.ReLU(), nn.ReLU()
        self.pool1, self.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2)

    def forward(self, x):
        x = self.pool1(self.act1(self.conv1(x)))
        x = self.pool2(self.act2(self.conv2(x)))
        return self.fc(x.flatten(1))


@pytest.mark.parametrize("name", ["deeplift", "guided-backprop", "deconvolution",
                                  "guided-gradcam"])
def test_reused_relu_equals_separate_relus(name):
    reused = reused_relu().to(F64)
    separate = SeparateReLU(reused).eval()
    x = inputs(3, seed=6).to(F64)
    target = torch.tensor([0, 1, 2])
    a = make(name, reused).explain(x, target).attribution
    b = make(name, separate).explain(x, target).attribution
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert a.abs().sum() > 0


def test_deeplift_is_complete_without_max_pool():
    # DeepLift's rescale rule is complete for ReLU nets: sum(attr) = f(x) - f(0). Captum's
    # max-pool rule is not (delta ~1e-2 on tiny_cnn), so the check uses average pooling
    model = tiny_gap().to(F64)
    model.pool1 = nn.AvgPool2d(2)
    r = make("deeplift", model).explain(inputs(3, seed=7).to(F64), 1)
    torch.testing.assert_close(r.info["delta"], torch.zeros(3, dtype=F64), rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- errors


def test_cam_needs_gap_head():
    with pytest.raises(UnsupportedModelError) as err:
        make("cam", tiny_cnn())
    msg = str(err.value)
    assert msg.startswith("cam: needs a global-average-pool head")
    assert "'pool2' (MaxPool2d) -> 'flatten' (Flatten) -> 'fc' (Linear)" in msg


@pytest.mark.parametrize("name", ["gradcam", "guided-gradcam"])
def test_gradcam_needs_conv(name):
    with pytest.raises(UnsupportedModelError, match=rf"^{name}: needs an nn.Conv2d layer.*"
                                                     r"Flatten, Linear"):
        make(name, linear_model())


class Leaky(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * 144, 8), nn.LeakyReLU(),
                                  nn.Linear(8, 3))

    def forward(self, x):
        return self.head(torch.clamp(self.conv(x), max=1.0))


@pytest.mark.parametrize("name", ["guided-backprop", "deconvolution", "guided-gradcam"])
def test_unsupported_layers_all_named(name):
    with pytest.raises(UnsupportedModelError) as err:
        make(name, Leaky().eval())
    msg = str(err.value)
    assert msg.startswith(f"{name}: cannot handle 2 layer(s): ")
    assert "'clamp' (torch.clamp in forward)" in msg and "'head.2' (LeakyReLU)" in msg


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(144, 3)

    def forward(self, x):
        if x.sum() > 0:                                        # data-dependent: untraceable
            x = x.relu()
        return self.fc(x.flatten(1))


def test_untraceable_model_is_refused_with_reason():
    with pytest.raises(UnsupportedModelError, match=r"^deeplift: .*torch.fx symbolic trace.*"
                                                    r"Branchy failed"):
        make("deeplift", Branchy().eval())


# ----------------------------------------------------------------------------- surrogates


def test_kernelshap_efficiency_on_linear_model():
    model = linear_model().to(F64)
    x = inputs(3, seed=8).to(F64)
    target = torch.tensor([1, 2, 0])
    r = make("kernelshap", model).explain(x, target)
    with torch.no_grad():
        p_x = torch.softmax(model(x), 1)[torch.arange(3), target]
        p_0 = torch.softmax(model(torch.zeros_like(x)), 1)[torch.arange(3), target]
    # Captum weighs the all-kept / all-removed coalitions 1e6 against weight-1 samples, and
    # fits in float32: the surrogate meets both ends to ~1e-5
    torch.testing.assert_close(r.info["bias"], p_0, rtol=0, atol=1e-4)
    torch.testing.assert_close(r.probability, p_x, rtol=0, atol=1e-4)
    torch.testing.assert_close(r.info["coefficients"].sum(1) + r.info["bias"], r.probability)


@pytest.mark.parametrize("name", ["lime-patches", "kernelshap"])
def test_surrogate_reads_captum_samples(name):
    model = tiny_cnn().to(F64)
    x = inputs(2, seed=9).to(F64)
    x[0, :, :4, :4] = 0                                       # all-zero patches read as kept
    r = make(name, model, keep_samples=True).explain(x, torch.tensor([2, 1]))
    assert ((r.probability > -0.05) & (r.probability < 1.05)).all()
    for b, s in enumerate(r.surrogates):
        # at x every patch is kept: the surrogate there is the method's probability
        torch.testing.assert_close(s.predict(x[b : b + 1]), r.probability[b : b + 1])
        smp = s.samples
        n = FAST[name]["n_samples"]
        assert smp.inputs.shape == (n, *SHAPE) and smp.model.shape == smp.surrogate.shape == (n,)
        with torch.no_grad():
            p = torch.softmax(model(smp.inputs), 1)[:, int(r.target[b])]
        torch.testing.assert_close(smp.model, p)
        if b == 1:
            # no all-zero patch in x: reading Captum's own samples back in pixel space gives
            # the binary vectors, so the surrogate Captum fitted (an all-zero patch reads 1
            # whatever Captum drew, hence not for x[0])
            torch.testing.assert_close(s.predict(smp.inputs), smp.surrogate)
    if name == "lime-patches":
        assert ((r.info["score"] > 0) & (r.info["score"] <= 1)).all()


def test_patch_mask_covers_28x28_with_196_features():
    from openbox.explainers.captum_perturbation import patch_mask

    mask = patch_mask((1, 28, 28), 2)
    assert mask.shape == (1, 1, 28, 28) and int(mask.max()) == 195
    assert torch.equal(torch.bincount(mask.flatten()), torch.full((196,), 4))


def test_import_without_captum():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('captum', 'lime', 'sklearn'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import openbox.explainers.captum_gradients, openbox.explainers.captum_cam\n"
        "import openbox.explainers.captum_perturbation\n"
        "from openbox.explainers import base\n"
        "import torch\n"
        "ex = base.get('saliency', torch.nn.Sequential(torch.nn.Flatten(),"
        " torch.nn.Linear(4, 2)), (1, 2, 2))\n"
        "try:\n"
        "    ex.explain(torch.zeros(1, 1, 2, 2), 0)\n"
        "except ImportError as e:\n"
        "    print('OK', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "OK the 'saliency' explainer needs the 'captum' package" in out.stdout


def test_separate_relu_fixture_is_the_same_function():
    reused = reused_relu()
    x = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(SeparateReLU(reused).eval()(x), reused(x))
