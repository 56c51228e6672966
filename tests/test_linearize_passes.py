"""Program transforms (``linearize.passes``) and the operator-family hooks they use.

BatchNorm folding asks each operator family whether it can absorb a per-channel
output scale (``LinearOperator.scale_output``) and whether it is one
(``LinearOperator.channel_scale``); the pass itself knows no family.
"""

from __future__ import annotations

import ast
import inspect

import numpy as np
import pytest
import torch
from _models import generator
from torch import nn

import linearize
from linearize import Affine, ChannelScale, Conv, Dense, Program, ReLU, passes
from linearize.ops import OPERATOR_FAMILIES

F64 = torch.float64
EXACT = {"rtol": 1e-12, "atol": 1e-12}


def _randn(*shape, seed=0):
    return torch.randn(shape, generator=generator(seed), dtype=F64)


def _ops():
    """One operator of every family, output channels first."""
    prog = linearize.compile(
        nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.AvgPool2d(2),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 4)).eval(),
        (2, 6, 6), fold_batchnorm=False, check=False)
    ops = {type(n.op): n.op for n in prog.nodes if isinstance(n, Affine)}
    assert set(ops) == set(OPERATOR_FAMILIES)
    return ops


@pytest.mark.parametrize("family", [Conv, Dense], ids=lambda f: f.__name__)
def test_scale_output_is_diag_scale_times_the_matrix(family):
    op = _ops()[family]
    before = op.matrix().toarray()
    scale = _randn(op.out_shape[0], seed=1)
    scaled = op.scale_output(scale)
    assert type(scaled) is family and scaled.in_shape == op.in_shape
    per_row = scale.repeat_interleave(int(np.prod(op.out_shape[1:]))).numpy()
    np.testing.assert_allclose(scaled.matrix().toarray(), per_row[:, None] * op.matrix().toarray(),
                               **EXACT)
    np.testing.assert_array_equal(op.matrix().toarray(), before)  # a new operator


def test_families_that_cannot_absorb_a_scale_say_so():
    for family, op in _ops().items():
        if family not in (Conv, Dense):
            assert op.scale_output(torch.ones(op.out_shape[0], dtype=F64)) is None, family
    # a Linear acting on the last dimension of (L, F): the channel is L, which one shared
    # weight matrix cannot scale row by row
    dense = Dense((3, 5), (3, 2), _randn(2, 5))
    assert dense.scale_output(torch.ones(3, dtype=F64)) is None


def test_channel_scale_only_for_channel_scales():
    for family, op in _ops().items():
        s = op.channel_scale()
        if family is ChannelScale:
            assert s is op.scale and s.shape == (op.in_shape[0], 1, 1)
        else:
            assert s is None, family


def test_fold_names_no_operator_family():
    """passes.py dispatches on node kinds only; families answer for themselves."""
    tree = ast.parse(inspect.getsource(passes))
    names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
    assert not names & {f.__name__ for f in OPERATOR_FAMILIES}


def _program(nodes, input_shape, output=None) -> Program:
    prog = Program(input_shape, tuple(nodes), len(nodes) if output is None else output, "test")
    prog.lint()
    return prog


@pytest.mark.parametrize("conv_bias, bn_bias", [(True, True), (True, False), (False, True),
                                                (False, False)])
def test_fold_with_and_without_either_bias(conv_bias, bn_bias):
    conv = Conv((2, 5, 5), (3, 5, 5), _randn(3, 2, 3, 3, seed=2), (1, 1), ((1, 1), (1, 1)),
                (1, 1), 1)
    scale = ChannelScale((3, 5, 5), (3, 5, 5), _randn(3, 1, 1, seed=3))
    b1 = _randn(3, 1, 1, seed=4) if conv_bias else None
    b2 = _randn(3, 1, 1, seed=5) if bn_bias else None
    prog = _program([Affine("conv", (0,), conv.in_shape, conv.out_shape, conv, b1),
                     Affine("bn", (1,), scale.in_shape, scale.out_shape, scale, b2),
                     ReLU("relu", (2,), (3, 5, 5), (3, 5, 5))], (2, 5, 5))
    folded = passes.fold_batchnorm(prog)
    folded.lint()
    assert [type(n) for n in folded.nodes] == [Affine, ReLU]
    assert type(folded.nodes[0].op) is Conv and folded.nodes[0].name == "conv+bn"
    assert (folded.nodes[0].bias is None) == (not conv_bias and not bn_bias)
    x = _randn(4, 2, 5, 5, seed=6)
    torch.testing.assert_close(folded(x), prog(x), **EXACT)


def test_fold_leaves_a_scale_after_a_family_that_cannot_absorb_it():
    dense = Dense((3, 5), (3, 2), _randn(2, 5, seed=7))
    scale = ChannelScale((3, 2), (3, 2), _randn(3, 1, seed=8))
    prog = _program([Affine("fc", (0,), (3, 5), (3, 2), dense, None),
                     Affine("bn", (1,), (3, 2), (3, 2), scale, _randn(3, 1, seed=9))], (3, 5))
    assert passes.fold_batchnorm(prog) is prog
