"""What the compiler refuses, and what it says when it does.

Every unsupported module or call is named by its module path and type; all of them
are reported in one error; training-mode layers get their own error; bad shapes and
bad inputs raise ValueError with the shape in the message.
"""

from __future__ import annotations

import re
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import random_cnn, random_input, randomize_
from torch import nn

import linearize
from linearize.registry import (
    FUNCTION_LOWERINGS,
    METHOD_LOWERINGS,
    MODULE_LOWERINGS,
    callable_name,
    register_module,
    supported,
)

SUMMARY = "Only piecewise-linear layers are supported."


def unsupported(model, input_shape) -> linearize.UnsupportedLayerError:
    with pytest.raises(linearize.UnsupportedLayerError) as info:
        linearize.compile(model, input_shape)
    return info.value


def test_two_unsupported_modules_full_message():
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
                               nn.Conv2d(4, 4, 3), nn.GELU(), nn.MaxPool2d(2)),
        head=nn.Sequential(nn.Flatten(), nn.Softmax(dim=1)),
    )).eval()
    err = unsupported(model, (1, 8, 8))
    assert str(err) == (
        "Cannot linearize 2 modules: 'features.4' (GELU), 'head.1' (Softmax). "
        "Only piecewise-linear layers are supported. Supported modules: "
        "AdaptiveAvgPool1d/AdaptiveAvgPool2d; "
        "AlphaDropout/Dropout/Dropout1d/Dropout2d/Dropout3d (in eval mode, or p=0); "
        "AvgPool1d/AvgPool2d; BatchNorm1d/BatchNorm2d (in eval mode, with running statistics); "
        "Conv1d/Conv2d (padding_mode='zeros'); Flatten/Unflatten (keeping the batch dimension); "
        "Identity; LeakyReLU; Linear; "
        "MaxPool1d/MaxPool2d (return_indices=False, every window reading the input); ReLU. "
        "Supported calls: F.adaptive_avg_pool1d/F.adaptive_avg_pool2d; F.avg_pool1d/F.avg_pool2d; "
        "F.dropout/F.dropout1d/F.dropout2d (training=False, or p=0); F.leaky_relu; "
        "F.max_pool1d/F.max_pool2d (return_indices=False, every window reading the input); "
        "F.relu/F.relu_/Tensor.relu/Tensor.relu_/torch.relu; "
        "operator.add/operator.iadd/Tensor.__add__/Tensor.__iadd__/Tensor.add/Tensor.add_/"
        "torch.add (the sum of two tensors of the same shape); Tensor.contiguous; "
        "Tensor.flatten/Tensor.reshape/Tensor.view/torch.flatten/torch.reshape (keeping the "
        "batch dimension); torch.max_pool1d/torch.max_pool2d (every window reading the input)."
    )
    assert [(o.path, o.kind) for o in err.offenders] == [("features.4", "GELU"),
                                                        ("head.1", "Softmax")]
    assert type(err) is linearize.UnsupportedLayerError and isinstance(err, TypeError)


def test_every_offender_is_reported_even_after_one_another():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1, padding_mode="circular")
            self.act = nn.ELU()
            self.fc = nn.Linear(2 * 5 * 5, 3)

        def forward(self, x):
            h = torch.tanh(self.act(self.conv(x)))
            return torch.sigmoid(self.fc(h.flatten(1))) + 1

    err = unsupported(Net().eval(), (1, 5, 5))
    assert [(o.path, o.kind) for o in err.offenders] == [
        ("conv", "Conv2d"), ("act", "ELU"), ("", "torch.tanh"), ("", "torch.sigmoid"),
        ("", "operator.add"),
    ]
    assert str(err).startswith(
        "Cannot linearize 5 modules: 'conv' (Conv2d: padding_mode='circular'; only 'zeros' is "
        "supported), 'act' (ELU), '<model>' (torch.tanh), '<model>' (torch.sigmoid), "
        "'<model>' (operator.add: adding a constant; only the sum of two tensors is "
        "supported). Only piecewise-linear layers are supported."
    )


def _one(err, path, kind, reason=""):
    assert len(err.offenders) == 1, str(err)
    o = err.offenders[0]
    assert (o.path, o.kind) == (path, kind), str(err)
    assert reason in o.reason
    where = repr(path) if path else "'<model>'"
    detail = f": {o.reason}" if o.reason else ""
    assert str(err).startswith(f"Cannot linearize 1 module: {where} ({kind}{detail}). {SUMMARY}")
    assert str(err).endswith(supported())


def _names(message: str, name: str) -> bool:
    """Is ``name`` in ``message`` as a whole name (Dropout, not the end of AlphaDropout)?"""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?![\w])", message) is not None


def test_supported_names_every_registered_lowering():
    message = supported()
    missing = [t.__name__ for t in MODULE_LOWERINGS if not _names(message, t.__name__)]
    missing += [callable_name(f) for f in FUNCTION_LOWERINGS
                if not _names(message, callable_name(f))]
    missing += [f"Tensor.{n}" for n in METHOD_LOWERINGS if not _names(message, f"Tensor.{n}")]
    assert not missing, message
    for t, reg in MODULE_LOWERINGS.items():  # each condition is said next to its types
        if reg.condition:
            assert re.search(rf"{t.__name__}[\w/]* \({re.escape(reg.condition)}\)", message)


def test_supported_follows_a_new_registration():
    class Double(nn.Module):
        def forward(self, x):
            return 2 * x

    assert not _names(supported(), "Double")

    @register_module(Double, condition="a doubling, for this test")
    def lower(ctx, module, x):
        return x

    try:
        assert "; Double (a doubling, for this test); " in supported()
        err = unsupported(nn.Sequential(nn.Linear(4, 4), nn.GELU()).eval(), (4,))
        assert "Double (a doubling, for this test)" in str(err)
    finally:
        MODULE_LOWERINGS.pop(Double)
    assert not _names(supported(), "Double")


@pytest.mark.parametrize("layer", [nn.Sigmoid(), nn.Tanh(), nn.GELU(), nn.Softplus(),
                                   nn.Hardtanh(), nn.ReLU6(), nn.Softmax(dim=1)], ids=str)
def test_unsupported_activation_module(layer):
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), act=layer, out=nn.Linear(4, 2)))
    _one(unsupported(model.eval(), (4,)), "act", type(layer).__name__)


def test_lstm():
    class Seq(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 5, batch_first=True)
            self.fc = nn.Linear(5, 2)

        def forward(self, x):
            y, _ = self.lstm(x)
            return self.fc(y[:, -1])

    _one(unsupported(Seq().eval(), (6, 4)), "lstm", "LSTM")


def test_unsupported_function_named_by_custom_module_path():
    class Gate(nn.Module):
        def forward(self, x):
            return x * torch.sigmoid(x)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.blocks = nn.Sequential(nn.ReLU(), Gate())

        def forward(self, x):
            return self.blocks(self.fc(x))

    err = unsupported(Net().eval(), (4,))
    assert [(o.path, o.kind) for o in err.offenders] == [
        ("blocks.1", "torch.sigmoid"), ("blocks.1", "operator.mul")]
    assert str(err).startswith("Cannot linearize 2 modules: 'blocks.1' (torch.sigmoid), "
                               "'blocks.1' (operator.mul")


def test_data_dependent_branch():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            if y.sum() > 0:
                return y
            return -y

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = Branchy()

        def forward(self, x):
            return self.head(x)

    err = unsupported(Net().eval(), (4,))
    assert [(o.path, o.kind, o.reason) for o in err.offenders] == [
        ("head", "Branchy", "data-dependent control flow")]
    assert "Cannot linearize 1 module: 'head' (Branchy: data-dependent control flow)" in str(err)
    err = unsupported(Branchy().eval(), (4,))
    assert str(err).startswith("Cannot linearize 1 module: '<model>' (Branchy: data-dependent")


@pytest.mark.parametrize("fn", [
    lambda x: x * len(x),
    lambda x: x * int(x.sum()),
    lambda x: x * float(x[0, 0]),
    lambda x: torch.from_numpy(x.numpy()),
], ids=["len(x)", "int(x)", "float(x)", "x.numpy()"])
def test_python_value_of_a_tensor(fn):
    _one(unsupported(ViewAs(fn), (4,)), "", "ViewAs",
         "uses the value of a tensor as a Python object")


def test_conv_reflect_padding():
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1, padding_mode="reflect"), nn.ReLU())
    _one(unsupported(model.eval(), (1, 5, 5)), "0", "Conv2d", "padding_mode='reflect'")


def test_batchnorm_without_running_stats():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2, track_running_stats=False))
    _one(unsupported(model.eval(), (1, 5, 5)), "1", "BatchNorm2d", "track_running_stats=False")


class ViewAs(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("fn, shape, kind", [
    (lambda x: x.view(-1, 7), (14,), "Tensor.view"),
    (lambda x: x.reshape(-1, 2), (2, 3), "Tensor.reshape"),
    (lambda x: torch.flatten(x), (2, 3), "torch.flatten"),
    (lambda x: x.flatten(0, 1), (2, 3), "Tensor.flatten"),
    # leading size equals the trace batch by coincidence: 3 channels
    (lambda x: x.view(x.size(1), -1), (3, 4, 4), "Tensor.view"),
    (lambda x: x.reshape(3, -1), (4, 4), "Tensor.reshape"),
], ids=["view(-1,7)", "reshape(-1,2)", "torch.flatten(x)", "flatten(0,1)",
        "view(size(1),-1)", "reshape(3,-1)"])
def test_reshape_that_mixes_examples(fn, shape, kind):
    _one(unsupported(ViewAs(fn), shape), "", kind, "mixes examples of the batch")


def test_adding_a_constant_or_a_parameter():
    class Shift(nn.Module):
        def __init__(self, by_param):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.by_param = by_param
            self.shift = nn.Parameter(torch.ones(4))

        def forward(self, x):
            return self.fc(x) + (self.shift if self.by_param else 1.0)

    for by_param in (False, True):
        _one(unsupported(Shift(by_param).eval(), (4,)), "", "operator.add", "adding a constant")


def test_broadcasting_add_and_alpha():
    class Broadcast(nn.Module):
        def forward(self, x):
            return x + x[:, :1]

    err = unsupported(Broadcast(), (4,))
    assert [(o.kind, o.reason) for o in err.offenders] == [
        ("operator.getitem", ""),
        ("operator.add", "broadcasting (4,) + (1,); both terms need the same shape"),
    ]

    class Alpha(nn.Module):
        def forward(self, x):
            return torch.add(x, x, alpha=2)

    _one(unsupported(Alpha(), (4,)), "", "torch.add", "alpha=2")


def test_returning_a_tuple():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            y = self.fc(x)
            return y, y.relu()

    _one(unsupported(Pair().eval(), (4,)), "", "return", "the model must return one tensor")


def test_in_place_alias_tracing_cannot_see_is_caught_by_the_check():
    class Alias(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            a = self.fc(x)
            b = a
            a += x  # also changes b; torch.fx records a fresh a + x
            return self.fc(a) + b

    with pytest.raises(linearize.CompileError,
                       match=r"^compiled program disagrees with Alias on the check batch \(max abs "
                             r"error .*\)\. Either the model updates a tensor in place"):
        linearize.compile(randomize_(Alias(), 0).eval(), (4,))


def test_two_inputs():
    class Two(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(ValueError, match=r"^input_shape \(4,\) does not fit Two: .*parameter y"):
        linearize.compile(Two(), (4,))


def test_forward_hooks_are_refused():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU()).eval()
    model[1].register_forward_hook(lambda m, i, o: o * 2)
    _one(unsupported(model, (4,)), "1", "ReLU", "forward hooks")


def test_functional_dropout_in_training():
    _one(unsupported(ViewAs(lambda x: F.dropout(x, 0.5)), (4,)), "", "F.dropout", "training")


# --------------------------------------------------------------------------- training mode


def test_batchnorm_in_training_mode():
    model = random_cnn(0).train()
    with pytest.raises(linearize.TrainingModeError) as info:
        linearize.compile(model, (1, 28, 28))
    err = info.value
    assert isinstance(err, linearize.UnsupportedLayerError)
    assert [(o.path, o.kind) for o in err.offenders] == [("bn1", "BatchNorm2d"),
                                                        ("bn2", "BatchNorm2d")]
    msg = str(err)
    assert msg.startswith("Cannot linearize 2 modules in training mode: 'bn1' (BatchNorm2d), "
                          "'bn2' (BatchNorm2d).")
    assert "training mode" in msg and "model.eval()" in msg
    assert model.training  # not switched to eval behind the user's back


def test_single_module_in_training_mode():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model.eval()
    model[1].train()
    with pytest.raises(linearize.TrainingModeError,
                       match=r"^Cannot linearize 1 module in training mode: '1' \(BatchNorm1d\)\."):
        linearize.compile(model, (4,))


def test_dropout_in_training_mode():
    model = nn.Sequential(OrderedDict(fc=nn.Linear(4, 4), drop=nn.Dropout(0.5)))
    with pytest.raises(linearize.TrainingModeError) as info:
        linearize.compile(model, (4,))
    assert [(o.path, o.kind) for o in info.value.offenders] == [("drop", "Dropout")]
    assert "model.eval()" in str(info.value)
    assert "dropout is random" in str(info.value)
    # the same model in eval mode compiles, and so does p=0 dropout in training mode
    linearize.compile(model.eval(), (4,))
    linearize.compile(nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.0)).train(), (4,))


# --------------------------------------------------------------------------- bad shapes


@pytest.mark.parametrize("model, shape", [
    (nn.Sequential(nn.Linear(4, 3)), (5,)),
    (nn.Sequential(nn.Conv2d(1, 2, 3)), (1, 2, 2)),
    (nn.Sequential(nn.Conv2d(1, 2, 3)), (2, 8, 8)),
], ids=["linear", "conv-too-small", "conv-channels"])
def test_input_shape_that_does_not_fit(model, shape):
    want = rf"^input_shape {re.escape(str(shape))} does not fit Sequential: running it on a batch"
    with pytest.raises(ValueError, match=want) as info:
        linearize.compile(model.eval(), shape)
    assert "failed with RuntimeError" in str(info.value)
    assert "ShapeProp" not in str(info.value)  # the cause, not torch.fx's wrapper


@pytest.mark.parametrize("model, shape", [
    (nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), (1, 27, 28)),
    (nn.Sequential(nn.Conv2d(1, 2, 3)), (2, 8, 8)),
], ids=["linear", "conv-channels"])
def test_input_shape_that_does_not_fit_prints_nothing(model, shape, capfd):
    """Only our ValueError reaches the user: torch.fx's ShapeProp printed a traceback."""
    capfd.readouterr()
    with pytest.raises(ValueError, match="does not fit Sequential") as info:
        linearize.compile(model.eval(), shape)
    out, err = capfd.readouterr()
    assert (out, err) == ("", "")
    assert "While executing" not in str(info.value)  # torch.fx's note on the cause
    assert "tlparse" not in str(info.value)


@pytest.mark.parametrize("shape", [(), (0, 4), (-1,), (3, "a"), None, 4], ids=str)
def test_malformed_input_shape(shape):
    with pytest.raises(ValueError, match="input_shape must be"):
        linearize.compile(nn.Sequential(nn.Identity()), shape)


@pytest.mark.parametrize("shape", [
    (1, 8.7, 8), (1, 8.0, 8), (True, 8, 8), (1, np.bool_(True), 8), (1, np.float64(8), 8),
    (1, torch.tensor(8), 8), "188", (1, 8, 0), (1, -8, 8),
], ids=["8.7", "8.0", "True", "np.bool_", "np.float64", "tensor", "str", "zero", "negative"])
def test_input_shape_entries_must_be_positive_ints(shape):
    """Regression: (1, 8.7, 8) was silently compiled as (1, 8, 8)."""
    with pytest.raises(ValueError, match=r"^input_shape must be a non-empty sequence of "
                                         r"positive ints \(Python or NumPy integers, not bool\), "
                                         r"got " + re.escape(repr(shape))):
        linearize.compile(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval(), shape)


@pytest.mark.parametrize("shape", [(1, 8, 8), [1, 8, 8], torch.Size([1, 8, 8]),
                                   (np.int64(1), np.int32(8), 8), np.array([1, 8, 8])],
                         ids=["tuple", "list", "torch.Size", "numpy ints", "numpy array"])
def test_input_shape_accepts_int_sequences(shape):
    prog = linearize.compile(nn.Sequential(nn.Flatten(), nn.Linear(64, 2)).eval(), shape)
    assert prog.input_shape == (1, 8, 8) and all(type(s) is int for s in prog.input_shape)


def test_not_a_module():
    with pytest.raises(TypeError, match="expected a torch.nn.Module"):
        linearize.compile(lambda x: x, (4,))


@pytest.fixture(scope="module")
def program():
    model = randomize_(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(),
                                     nn.Linear(2 * 4 * 4, 3)), 0).eval()
    return linearize.compile(model, (1, 6, 6))


@pytest.mark.parametrize("x, match", [
    (torch.zeros(2, 1, 6, 5), r"expected input of shape \(N, 1x6x6\), got \(2, 1, 6, 5\)"),
    (torch.zeros(1, 6, 6), r"expected input of shape \(N, 1x6x6\), got \(1, 6, 6\)"),
    (torch.zeros(2, 1, 1, 6, 6), r"got \(2, 1, 1, 6, 6\)"),
    (torch.zeros(2, 1, 6, 6, dtype=torch.int64), "expected a float32 or float64 input, got "
                                                 "torch.int64"),
    (torch.zeros(2, 1, 6, 6, dtype=torch.float16), "got torch.float16"),
    (torch.full((2, 1, 6, 6), float("nan")), "input contains NaN or Inf"),
    (torch.zeros(2, 1, 6, 6).index_fill_(0, torch.tensor([1]), float("inf")),
     "input contains NaN or Inf"),
    (torch.zeros(2, 1, 6, 6).numpy(), "expected a torch.Tensor"),
], ids=["wrong-spatial", "no-batch-dim", "extra-dim", "int", "half", "nan", "inf", "numpy"])
def test_program_rejects_bad_input(program, x, match):
    with pytest.raises(ValueError, match=match):
        program(x)


def test_program_accepts_good_input(program):
    x = random_input((1, 6, 6), 2, seed=1)
    assert program(x).shape == (2, 3)
    assert program(x.float()).dtype == torch.float32


# --------------------------------------------------------------------------- max-pool padding


PADDING_ONLY = "lie entirely in the padding, where torch's max-pool returns -inf"


def test_max_pool_window_entirely_in_padding_1d():
    """Regression: this compiled to a program that failed its own lint, naming no module."""
    model = nn.Sequential(nn.AdaptiveAvgPool1d(1), nn.MaxPool1d(2, padding=1, dilation=2),
                          nn.ReLU(), nn.Flatten(), nn.Linear(2, 2)).eval()
    with torch.no_grad():  # what torch does with such a window
        pooled = model[:2](random_input((2, 18), 3, seed=0))
    assert bool((pooled == float("-inf")).all())
    err = unsupported(model, (2, 18))
    _one(err, "1", "MaxPool1d", PADDING_ONLY)
    assert "1 of 1 windows" in err.offenders[0].reason


@pytest.mark.parametrize("functional", [False, True], ids=["module", "F.max_pool2d"])
def test_max_pool_window_entirely_in_padding_2d(functional):
    # height 1 with padding 1, dilation 2: every window reads rows -1 and 1 only
    pool = (ViewAs(lambda x: F.max_pool2d(x, 2, padding=1, dilation=2)) if functional
            else nn.MaxPool2d(2, padding=1, dilation=2))
    model = nn.Sequential(OrderedDict(avg=nn.AdaptiveAvgPool2d((1, 4)), pool=pool)).eval()
    with torch.no_grad():
        assert bool((model(random_input((2, 6, 6), 2, seed=1)) == float("-inf")).all())
    err = unsupported(model, (2, 6, 6))
    _one(err, "pool", "F.max_pool2d" if functional else "MaxPool2d", PADDING_ONLY)
    assert "2 of 2 windows" in err.offenders[0].reason


def test_max_pool_window_partly_in_padding_still_compiles():
    model = nn.Sequential(nn.MaxPool2d(2, padding=1, dilation=2), nn.Flatten()).eval()
    prog = linearize.compile(model, (1, 3, 3))
    x = random_input((1, 3, 3), 4, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(prog(x), model.double()(x), rtol=0, atol=0)
