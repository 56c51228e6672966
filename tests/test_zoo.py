"""The model zoo's cnn variants: layers as documented, and exact under openbox.

Every registered architecture must compile with ``linearize.compile`` and its local linear
models must reproduce the network (``OpenBox.verify``) on real images, with BatchNorm
statistics that are not the identity (a few train-mode batches first).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import linearize
import openbox
from openbox.fmnist.data import load_sample
from openbox.fmnist.models import INPUT_SHAPE, MODEL_NAMES, MODELS, build_model, count_parameters

VARIANTS = ("cnn-poolfirst", "cnn-avg", "cnn-strided", "cnn-nobn", "cnn-leaky")
N_VERIFY = 3  # images checked per model


@pytest.fixture(scope="module")
def images():
    return load_sample().images[:N_VERIFY]


def warmed(name: str) -> nn.Module:
    """``name`` built with seed 0, BatchNorm running statistics moved by a few batches."""
    model = build_model(name, seed=0)
    model.train()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(3):
            model(torch.rand(16, *INPUT_SHAPE, generator=generator))
    return model.eval()


def test_variants_are_registered_next_to_the_old_names():
    assert set(VARIANTS) | {"plnn", "cnn", "lenet", "gap"} == set(MODEL_NAMES)
    assert MODEL_NAMES[:4] == ("plnn", "cnn", "lenet", "gap")  # old names and order kept
    for name in VARIANTS:
        assert MODELS[name].builder.__doc__ and "->" in MODELS[name].builder.__doc__, name


def test_variant_layers():
    layers = {name: [type(m).__name__ for m in build_model(name)] for name in VARIANTS}
    assert layers["cnn-poolfirst"] == [
        "Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU", "Conv2d", "BatchNorm2d", "MaxPool2d", "ReLU",
        "Flatten", "Linear"]
    assert layers["cnn-avg"] == [
        "Conv2d", "BatchNorm2d", "ReLU", "AvgPool2d", "Conv2d", "BatchNorm2d", "ReLU", "AvgPool2d",
        "Flatten", "Linear"]
    assert layers["cnn-strided"] == [
        "Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d", "ReLU", "Flatten", "Linear"]
    assert layers["cnn-nobn"] == [
        "Conv2d", "ReLU", "MaxPool2d", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear"]
    assert layers["cnn-leaky"] == [
        "Conv2d", "BatchNorm2d", "LeakyReLU", "MaxPool2d", "Conv2d", "BatchNorm2d", "LeakyReLU",
        "MaxPool2d", "Flatten", "Linear"]
    strided = build_model("cnn-strided")
    assert strided.conv1.stride == strided.conv2.stride == (2, 2)
    assert strided.fc.in_features == 32 * 7 * 7
    leaky = build_model("cnn-leaky")
    assert leaky.relu1.negative_slope == leaky.relu2.negative_slope == 0.1
    for name in VARIANTS:  # same size as the reference: 16, 32 channels, a 7x7 map
        model = build_model(name)
        assert (model.conv1.out_channels, model.conv2.out_channels) == (16, 32), name
        assert model.fc.in_features == 32 * 7 * 7, name
        assert abs(count_parameters(model) - MODELS["cnn"].default_parameters) <= 96, name


def test_same_weights_same_function_where_the_variant_says_so(images):
    """pool-then-ReLU equals ReLU-then-pool (max and ReLU commute); cnn-avg is
    cnn(pool="avg") and cnn-nobn is cnn(batch_norm=False)."""
    pairs = [("cnn-poolfirst", build_model("cnn", seed=0)),
             ("cnn-avg", build_model("cnn", seed=0, pool="avg")),
             ("cnn-nobn", build_model("cnn", seed=0, batch_norm=False))]
    for name, reference in pairs:
        variant = build_model(name)
        variant.load_state_dict(reference.state_dict())
        reference.eval(), variant.eval()
        with torch.no_grad():
            assert torch.equal(variant(images), reference(images)), name


@pytest.mark.parametrize("name", VARIANTS)
def test_variant_options_and_errors(name):
    narrow = build_model(name, channels=(4, 8))
    assert narrow.conv2.out_channels == 8 and narrow(torch.zeros(1, *INPUT_SHAPE)).shape == (1, 10)
    with pytest.raises(ValueError, match="channels must be 2 positive integers"):
        build_model(name, channels=(4,))
    with pytest.raises(ValueError, match="invalid options"):
        build_model(name, hidden=(3,))


def test_leaky_slope_is_checked():
    assert build_model("cnn-leaky", negative_slope=0.2).relu2.negative_slope == 0.2
    for bad in (0.0, 1.0, -0.1, True, "0.1"):
        with pytest.raises(ValueError, match=r"negative_slope must be a number in \(0, 1\)"):
            build_model("cnn-leaky", negative_slope=bad)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_zoo_model_compiles_and_is_exact(name, images):
    model = warmed(name)
    program = linearize.compile(model, INPUT_SHAPE)
    assert program.output_shape == (10,)
    report = openbox.OpenBox(model, INPUT_SHAPE, dtype=torch.float64).verify(images)
    assert report.ok, f"{name}: {report}"
    assert report.passed.shape == (N_VERIFY,)
