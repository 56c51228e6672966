"""The ``lrp`` explainer and its canonizer (batch-norm folding, the LRP graph form).

References are independent of Captum and of the canonizer: the folded model against the
original's forward; LRP-epsilon against a per-layer matrix form from the Jacobian
(``J = jacobian(layer, x)``, ``R_in = x * J^T (R_out / (z + eps sign z))``, conv and its
batch-norm taken together as one affine block, so no folding code is shared); relevance
conservation on bias-free networks; and the closed form ``x * w[target]`` of a linear model.
"""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import openbox.explainers.captum_lrp  # noqa: F401  (registers lrp)
from openbox import explainers
from openbox.explainers import UnsupportedModelError
from openbox.explainers.canonize import fold_batch_norm, lrp_graph
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
from tests._models import randomize_

pytest.importorskip("captum")

MODELS = {"tiny_cnn": tiny_cnn, "reused_relu": reused_relu, "functional_cnn": functional_cnn,
          "tiny_gap": tiny_gap}
TARGETS = torch.tensor([0, 2, 1])
EPS = 1e-9  # the explainer's default epsilon (Captum's EpsilonRule default)


def _no_bn(model: nn.Module) -> bool:
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


# ----------------------------------------------------------------------------- folding


class LinearBN(nn.Module):
    """Linear without bias -> BatchNorm1d -> functional relu -> Linear -> BatchNorm1d."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(144, 6, bias=False)
        self.bn1 = nn.BatchNorm1d(6)
        self.fc2 = nn.Linear(6, 3)
        self.bn2 = nn.BatchNorm1d(3)

    def forward(self, x):
        return self.bn2(self.fc2(F.relu(self.bn1(self.fc1(x.flatten(1))))))


class BNAfterReLU(nn.Module):
    """A batch-norm at the input and one after a ReLU: neither can be folded."""

    def __init__(self):
        super().__init__()
        self.bn_in = nn.BatchNorm2d(1)
        self.features = nn.Sequential(OrderedDict(
            conv=nn.Conv2d(1, 3, 3, padding=1), relu=nn.ReLU(), bn=nn.BatchNorm2d(3),
            pool=nn.MaxPool2d(4)))
        self.fc = nn.Linear(27, 3)

    def forward(self, x):
        return self.fc(self.features(self.bn_in(x)).flatten(1))


@pytest.mark.parametrize("build", [tiny_cnn, functional_cnn, tiny_gap, LinearBN],
                         ids=lambda b: b.__name__)
def test_fold_batch_norm_keeps_the_function(build):
    model = randomize_(build(), 3).eval().double()
    before = snapshot(model)
    folded = fold_batch_norm(model)
    x = inputs(4, seed=1).double()
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    assert _no_bn(folded)
    assert type(folded) is type(model)
    assert_unchanged(model, before)


def test_fold_batch_norm_names_every_unfoldable_bn():
    model = randomize_(BNAfterReLU(), 0).eval().double()
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError) as err:
        fold_batch_norm(model)
    msg = str(err.value)
    assert msg.startswith("lrp: cannot fold 2 batch-norms")
    assert "'bn_in' (BatchNorm2d: at the model input)" in msg
    assert "'features.bn' (BatchNorm2d: after 'features.relu' (ReLU), not a Linear or Conv)" in msg
    assert_unchanged(model, before)
    # non-strict: both left in place, the function unchanged
    kept = fold_batch_norm(model, strict=False)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in kept.modules()) == 2
    x = inputs(2).double()
    with torch.no_grad():
        torch.testing.assert_close(kept(x), model(x), rtol=1e-12, atol=1e-12)
    # the explainer raises the same error, or keeps them under the epsilon rule if asked
    with pytest.raises(UnsupportedModelError, match="'bn_in'.*'features.bn'"):
        explainers.get("lrp", model, input_shape=SHAPE)
    r = explainers.get("lrp", model, input_shape=SHAPE, keep_unfoldable_bn=True).explain(x, 1)
    assert r.attribution.shape == x.shape and bool(torch.isfinite(r.attribution).all())
    assert_unchanged(model, before)


def test_fold_batch_norm_refuses_a_layer_that_feeds_two_users():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.bn = nn.BatchNorm1d(4)

        def forward(self, x):
            y = self.fc(x)
            return self.bn(y) + y

    with pytest.raises(UnsupportedModelError, match=r"'bn' \(BatchNorm1d: after 'fc' "
                                                    r"\(Linear\), whose output also feeds add"):
        fold_batch_norm(randomize_(Branch(), 0).eval())


# ----------------------------------------------------------------------------- the explainer


@pytest.mark.parametrize("name", MODELS)
def test_lrp_shape_batch_and_model_untouched(name):
    model = MODELS[name]()
    before = snapshot(model)
    ex = explainers.get("lrp", model, input_shape=SHAPE, dtype=torch.float64)
    x = inputs(3)
    r = ex.explain(x, TARGETS)
    assert r.method == "lrp" and r.probability is None
    assert r.attribution.shape == x.shape and r.attribution.dtype == torch.float64
    assert bool(torch.isfinite(r.attribution).all())
    assert r.attribution.abs().sum() > 0
    one = torch.cat([ex.explain(x[b : b + 1], TARGETS[b : b + 1]).attribution for b in range(3)])
    torch.testing.assert_close(r.attribution, one, rtol=1e-12, atol=1e-14)
    # delta is the logit minus the relevance sum
    with torch.no_grad():
        logits = ex.model(x.double())
    torch.testing.assert_close(r.info["delta"],
                               logits[torch.arange(3), TARGETS] - r.attribution.sum((1, 2, 3)),
                               rtol=1e-12, atol=1e-12)
    assert_unchanged(model, before)
    assert not any(hasattr(m, "rule") or hasattr(m, "activations") for m in model.modules())


def _blocks(name: str, m: nn.Module):
    """The model as LRP layers: ("rule", affine-or-max map), ("pass", relu), ("reshape", f).
    A conv and its batch-norm form one affine block (what folding must reproduce)."""
    relu = ("pass", torch.relu)
    flat = ("reshape", lambda t: t.flatten(1))
    if name == "reused_relu":
        return [("rule", m.conv1), relu, ("rule", m.pool), ("rule", m.conv2), relu,
                ("rule", m.pool), flat, ("rule", m.fc)]
    if name == "functional_cnn":
        pool = ("rule", lambda t: F.max_pool2d(t, 2))
        return [("rule", lambda t: m.bn1(m.conv1(t))), relu, pool, ("rule", m.conv2), relu,
                pool, flat, ("rule", m.fc)]
    head = [("rule", m.pool2)] if name == "tiny_cnn" else [("rule", m.gap)]
    return [("rule", lambda t: m.bn1(m.conv1(t))), relu, ("rule", m.pool1),
            ("rule", lambda t: m.bn2(m.conv2(t))), relu, *head, flat, ("rule", m.fc)]


def lrp_reference(blocks, x: torch.Tensor, target: int, eps: float) -> torch.Tensor:
    """LRP-epsilon of one input x (1, *shape) from each block's Jacobian at its input."""
    acts = [x]
    with torch.no_grad():
        for _, f in blocks:
            acts.append(f(acts[-1]))
    out = acts[-1][0]
    relevance = torch.zeros_like(out)
    relevance[target] = out[target]
    relevance = relevance.reshape(acts[-1].shape)
    for (kind, f), a, z in zip(reversed(blocks), reversed(acts[:-1]), reversed(acts[1:])):
        if kind == "pass":
            continue
        if kind == "reshape":
            relevance = relevance.reshape(a.shape)
            continue
        jac = torch.autograd.functional.jacobian(f, a).reshape(z.numel(), a.numel())
        sign = torch.where(z >= 0, 1.0, -1.0).to(z.dtype)
        s = (relevance / (z + eps * sign)).reshape(-1)
        relevance = a * (jac.T @ s).reshape(a.shape)
    return relevance[0]


@pytest.mark.parametrize("name", MODELS)
def test_lrp_matches_the_jacobian_reference(name):
    model = MODELS[name]().double()
    x = inputs(2, seed=4).double()
    target = torch.tensor([1, 0])
    r = explainers.get("lrp", model, input_shape=SHAPE).explain(x, target)
    blocks = _blocks(name, model)
    for b in range(2):
        ref = lrp_reference(blocks, x[b : b + 1], int(target[b]), EPS)
        torch.testing.assert_close(r.attribution[b], ref, rtol=1e-9, atol=1e-12)


class BiasFree(nn.Module):
    """conv-relu-maxpool-conv-relu-GAP-linear, functional relu and GAP, no biases anywhere."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 5, 3, padding=1, bias=False)
        self.fc = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        x = self.pool(F.relu(self.conv1(x)))
        x = F.adaptive_avg_pool2d(torch.relu(self.conv2(x)), 1)
        return self.fc(x.view(x.shape[0], -1))


def test_lrp_conserves_relevance_without_biases():
    model = randomize_(BiasFree(), 2).eval().double()
    x = inputs(4, seed=2).double()
    target = torch.tensor([0, 1, 2, 0])
    r = explainers.get("lrp", model, input_shape=SHAPE).explain(x, target)
    with torch.no_grad():
        logit = model(x)[torch.arange(4), target]
    torch.testing.assert_close(r.attribution.sum((1, 2, 3)), logit, rtol=1e-6, atol=0.0)
    torch.testing.assert_close(r.info["delta"], torch.zeros_like(logit), rtol=0,
                               atol=1e-6 * float(logit.abs().max()))


def test_lrp_on_a_linear_model_is_x_times_w():
    model = linear_model().double()
    with torch.no_grad():
        model.fc.bias.zero_()
    x = inputs(3, seed=5).double()
    r = explainers.get("lrp", model, input_shape=SHAPE).explain(x, TARGETS)
    w = model.fc.weight[TARGETS].reshape(x.shape)
    torch.testing.assert_close(r.attribution, x * w, rtol=1e-6, atol=0.0)
    # exactly the epsilon rule's z / (z + eps) shrinkage of it
    z = (x * w).sum((1, 2, 3), keepdim=True)
    torch.testing.assert_close(r.attribution, x * w * z / (z + EPS * z.sign()), rtol=1e-12,
                               atol=1e-15)


def test_epsilon_option_absorbs_relevance():
    model = linear_model().double()
    with torch.no_grad():
        model.fc.bias.zero_()
    x = inputs(2).double()
    r = explainers.get("lrp", model, input_shape=SHAPE, epsilon=0.5).explain(x, 1)
    w = model.fc.weight[1].reshape(SHAPE)
    z = (x * w).sum((1, 2, 3), keepdim=True)
    torch.testing.assert_close(r.attribution, x * w * z / (z + 0.5 * z.sign()), rtol=1e-12,
                               atol=1e-15)
    with pytest.raises(ValueError, match="lrp: epsilon must be a positive float"):
        explainers.get("lrp", model, input_shape=SHAPE, epsilon=0.0)


# ----------------------------------------------------------------------------- unsupported


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)
        self.act = nn.ELU()
        self.fc = nn.Linear(288, 3)

    def forward(self, x):
        y = self.act(self.conv(x))
        y = torch.sigmoid(y) + y
        return self.fc(y.flatten(1))


def test_unsupported_layers_are_all_named():
    model = randomize_(Unsupported(), 0).eval()
    before = snapshot(model)
    with pytest.raises(UnsupportedModelError) as err:
        explainers.get("lrp", model, input_shape=SHAPE)
    msg = str(err.value)
    assert msg.startswith("lrp: cannot propagate relevance through 3 layers: 'act' (ELU), "
                          "'sigmoid' (sigmoid), 'add' (add)")
    assert "Supported: Linear, Conv1d, Conv2d" in msg and "AdaptiveAvgPool2d" in msg
    assert_unchanged(model, before)


def test_lrp_graph_form():
    """Each call of a layer is its own module; no Flatten / Identity leaf is left for Captum."""
    gm = lrp_graph(reused_relu())
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert len(calls) == len(set(calls)) == 7
    leaves = {type(m) for m in gm.modules() if not list(m.children())}
    assert leaves == {nn.Conv2d, nn.ReLU, nn.MaxPool2d, nn.Linear}
    gm = lrp_graph(tiny_cnn())
    assert {type(m) for m in gm.modules() if not list(m.children())} == leaves


def test_a_fold_that_changes_the_function_is_caught():
    """BatchNorm1d after a Linear on (B, L, F) inputs normalises L, not the Linear's features:
    fold_batch_norm cannot see shapes, and the explainer's check on random inputs refuses it."""
    model = randomize_(nn.Sequential(OrderedDict(
        fc=nn.Linear(4, 4), bn=nn.BatchNorm1d(4), flatten=nn.Flatten(), head=nn.Linear(16, 3),
    )), 0).eval()
    with pytest.raises(explainers.ExplainerError, match="lrp: the canonized model .* differs"):
        explainers.get("lrp", model, input_shape=(4, 4))
