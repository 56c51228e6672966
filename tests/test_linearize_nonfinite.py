"""Non-finite parameters, buffers and derived batch-norm scales are refused up front.

A NaN weight or a batch-norm whose running_var + eps is 0 makes the model itself
non-finite; compile names every such tensor (by its state-dict path) or module in
one NonFiniteParameterError (a ValueError) instead of failing its exactness check.
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import pytest
import torch
from _models import randomize_
from torch import nn

import linearize

INF, NAN = float("inf"), float("nan")


def refused(model, input_shape) -> linearize.NonFiniteParameterError:
    with pytest.raises(linearize.NonFiniteParameterError) as info:
        linearize.compile(model, input_shape)
    assert isinstance(info.value, ValueError)
    return info.value


def mlp(eps=1e-5) -> nn.Sequential:
    return randomize_(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, eps=eps), nn.ReLU(),
                                    nn.Linear(4, 2)), 0).eval()


def set_(t: torch.Tensor, index, value) -> None:
    with torch.no_grad():
        t[index] = value


def test_nan_weight():
    model = mlp()
    set_(model[0].weight, (1, 2), NAN)
    err = refused(model, (4,))
    assert str(err) == (
        "Cannot linearize Sequential: 1 parameter or buffer is not finite: '0.weight' holds "
        "NaN (1 of 16 entries). A network with NaN or infinite parameters is not a finite "
        "piecewise-linear function."
    )
    assert [(o.path, o.kind) for o in err.offenders] == [("0.weight", "")]


def test_batchnorm_with_zero_variance_and_zero_eps():
    model = mlp(eps=0.0)
    set_(model[1].running_var, 1, 0.0)
    err = refused(model, (4,))
    assert "1 parameter or buffer is not finite: '1' (BatchNorm1d): running_var + eps is 0, " \
           "its scale is infinite (channel 1)." in str(err)
    assert [(o.path, o.kind) for o in err.offenders] == [("1", "BatchNorm1d")]


def test_every_offender_in_one_message_in_model_order():
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, eps=0.0), nn.ReLU()),
        head=nn.Sequential(nn.Flatten(), nn.Linear(2 * 4 * 4, 3)),
    ))
    model = randomize_(model, 1).eval()
    set_(model.features[0].bias, 0, INF)
    set_(model.features[0].weight, (1, 0, 0, 0), NAN)
    set_(model.features[0].weight, (1, 0, 1, 1), -INF)
    set_(model.features[1].running_var, slice(None), 0.0)
    set_(model.head[1].weight, (0, 0), NAN)
    err = refused(model, (1, 6, 6))
    assert [o.path for o in err.offenders] == [
        "features.0.weight", "features.0.bias", "features.1", "head.1.weight"]
    assert str(err).startswith(
        "Cannot linearize Sequential: 4 parameters or buffers are not finite: "
        "'features.0.weight' holds NaN and inf (2 of 18 entries); "
        "'features.0.bias' holds inf (1 of 2 entries); "
        "'features.1' (BatchNorm2d): running_var + eps is 0, its scale is infinite "
        "(channels 0, 1); 'head.1.weight' holds NaN (1 of 96 entries).")


def test_negative_variance_and_an_overflowing_scale():
    model = mlp()
    set_(model[1].running_var, 0, -1.0)
    err = refused(model, (4,))
    assert "'1' (BatchNorm1d): running_var + eps is negative, its scale is NaN (channel 0)" \
           in str(err)
    model = mlp(eps=0.0).double()  # finite in float64, the compiler's working dtype
    set_(model[1].weight, 3, 1e300)
    set_(model[1].running_var, 3, 1e-300)
    err = refused(model, (4,))
    assert "'1' (BatchNorm1d): weight / sqrt(running_var + eps) overflows float64, its scale " \
           "is infinite (channel 3)" in str(err)


def test_overflowing_shift():
    model = mlp().double()
    set_(model[1].weight, 2, 1e300)  # scale 1e300 / sqrt(var) is finite, mean * scale is not
    set_(model[1].running_var, 2, 1.0)
    set_(model[1].running_mean, 2, 1e300)
    err = refused(model, (4,))
    assert "'1' (BatchNorm1d): bias - running_mean * scale overflows float64, its shift is " \
           "infinite (channel 2)" in str(err)


def test_a_non_finite_buffer_is_named_once():
    model = mlp()
    set_(model[1].running_mean, 0, NAN)
    set_(model[1].running_var, 2, INF)
    err = refused(model, (4,))
    assert [o.path for o in err.offenders] == ["1.running_mean", "1.running_var"]
    assert "'1.running_var' holds inf (1 of 4 entries)" in str(err)


def test_model_is_not_changed_and_finite_models_compile():
    model = mlp(eps=0.0)  # eps 0 with positive variances is fine
    before = copy.deepcopy(model.state_dict())
    linearize.compile(model, (4,))
    set_(model[0].weight, (0, 0), NAN)
    refused(model, (4,))
    after = model.state_dict()
    assert after["0.weight"].isnan().sum() == 1
    for k, v in before.items():
        if k != "0.weight":
            assert torch.equal(after[k], v)


def test_many_channels_are_summarised():
    model = nn.Sequential(nn.Linear(3, 10), nn.BatchNorm1d(10, eps=0.0)).eval()
    set_(model[1].running_var, slice(None), 0.0)
    assert "its scale is infinite (channels 0, 1, 2, 3, 4, 5, ... (10 of 10))." \
        in str(refused(model, (3,)))


def test_a_parameter_of_the_model_itself():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)
            self.register_buffer("offset", torch.tensor([0.0, INF, 0.0]))

        def forward(self, x):
            return self.fc(x)

    err = refused(Scale().eval(), (3,))
    assert "1 parameter or buffer is not finite: 'offset' holds inf (1 of 3 entries)." in str(err)
