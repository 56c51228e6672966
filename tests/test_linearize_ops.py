"""Per-layer lowerings against torch, in float64.

Each layer is compiled alone (``nn.Sequential(layer)`` through ``linearize.compile``,
the real lowering path). For a linear layer the operator's explicit matrix must be
the Jacobian of the torch layer (torch.func.jacrev), the bias ``layer(x) - J x``,
``apply`` the layer, ``apply_transpose`` the adjoint ``g @ M``, and ``nnz`` the
matrix's structural non-zeros. For max-pooling the window table must hold exactly
the positions torch's own max-pool reads.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _models import generator, randomize_
from torch import nn
from torch.func import jacrev

import linearize

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")

F64 = torch.float64
EXACT = {"rtol": 1e-12, "atol": 1e-12}  # operator vs Jacobian: same sums, a few roundings


def compile_layer(layer: nn.Module, in_shape, **kw) -> linearize.Program:
    prog = linearize.compile(nn.Sequential(layer), in_shape, check=False,
                             fold_batchnorm=False, **kw)
    prog.lint()
    return prog


def jacobian(layer: nn.Module, in_shape, x: torch.Tensor) -> np.ndarray:
    """Jacobian of one example's output w.r.t. its input, (out_numel, in_numel), float64."""
    j = jacrev(lambda v: layer(v.unsqueeze(0)).squeeze(0))(x)
    out_numel = j.numel() // x.numel()
    return j.detach().reshape(out_numel, x.numel()).numpy()


def check_affine_layer(layer: nn.Module, in_shape, seed: int = 0, family=None):
    """Compile one affine layer and hold every face of its node against torch."""
    layer = randomize_(layer.double(), seed).eval()
    prog = compile_layer(layer, in_shape)
    assert len(prog.nodes) == 1, prog.summary()
    node = prog.nodes[0]
    assert isinstance(node, linearize.Affine)
    op = node.op
    if family is not None:
        assert type(op) is family
    assert op.in_shape == tuple(in_shape) == node.in_shape
    g = generator(seed + 1)
    x = torch.randn((5, *in_shape), generator=g, dtype=F64)
    with torch.no_grad():
        want = layer(x)
    assert node.out_shape == op.out_shape == tuple(want.shape[1:])

    m = op.matrix()
    n_out, n_in = int(np.prod(op.out_shape)), int(np.prod(in_shape))
    assert m.shape == (n_out, n_in)
    assert m.dtype == np.float64
    dense = m.toarray()
    jac = jacobian(layer, in_shape, x[0])
    np.testing.assert_allclose(dense, jac, **EXACT)

    bias = node.bias_full()
    assert bias.shape == op.out_shape
    flat_x = x.reshape(5, -1).numpy()
    affine = flat_x @ dense.T + bias.reshape(-1).numpy()
    np.testing.assert_allclose(affine, want.reshape(5, -1).numpy(), **EXACT)
    torch.testing.assert_close(bias.reshape(-1), (want[0].reshape(-1) - torch.from_numpy(
        jac @ flat_x[0])), **EXACT)

    torch.testing.assert_close(node.forward(x), want, **EXACT)
    torch.testing.assert_close(op.apply(x).reshape(5, -1),
                               torch.from_numpy(flat_x @ dense.T), **EXACT)
    torch.testing.assert_close(prog(x), want, **EXACT)

    gy = torch.randn((3, *op.out_shape), generator=g, dtype=F64)
    gx = op.apply_transpose(gy)
    assert gx.shape == (3, *in_shape)
    torch.testing.assert_close(gx.reshape(3, -1),
                               torch.from_numpy(gy.reshape(3, -1).numpy() @ dense), **EXACT)

    assert op.nnz == m.nnz == node.nnz
    # with random weights no entry of the map is an accidental zero
    assert op.nnz == np.count_nonzero(jac)
    assert isinstance(op.describe(), str) and op.describe()
    return node


# --------------------------------------------------------------------------- Linear


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("in_shape", [(7,), (3, 7), (2, 3, 7)], ids=str)
def test_linear(in_shape, bias):
    node = check_affine_layer(nn.Linear(7, 4, bias=bias), in_shape, family=linearize.Dense)
    assert node.out_shape == (*in_shape[:-1], 4)
    assert (node.bias is None) == (not bias)


# --------------------------------------------------------------------------- Conv


def _conv_cases(dims: int):
    kernels = [(3,), (2,), (4,)] if dims == 1 else [(3, 3), (2, 3), (4, 2), (1, 1)]
    paddings = [0, 1, 2, "same", "valid"] + ([(1, 2)] if dims == 2 else [(2,)])
    groups_channels = [(1, 3, 5), (2, 4, 6), (4, 4, 8), (4, 4, 4)]  # (groups, c_in, c_out)
    cases = []
    for k, s, p, d, (g, ci, co), b in itertools.product(
        kernels, [1, 2, 3], paddings, [1, 2], groups_channels, [True, False]
    ):
        if p == "same" and s != 1:
            continue  # torch: padding='same' needs stride 1
        cases.append((k, s, p, d, g, ci, co, b))
    return cases


def _trim(cases, every: int):
    """Every kernel / padding / dilation / groups value still occurs; fewer products."""
    return [c for i, c in enumerate(cases) if i % every == 0 or c[2] == "same"]


CONV2D_CASES = _trim(_conv_cases(2), 7)
CONV1D_CASES = _trim(_conv_cases(1), 7)


def _conv_id(case):
    k, s, p, d, g, ci, co, b = case
    return f"k{'x'.join(map(str, k))}-s{s}-p{p}-d{d}-g{g}-{ci}to{co}-{'b' if b else 'nob'}"


@pytest.mark.parametrize("case", CONV2D_CASES, ids=_conv_id)
def test_conv2d(case):
    k, s, p, d, g, ci, co, b = case
    layer = nn.Conv2d(ci, co, k, stride=s, padding=p, dilation=d, groups=g, bias=b)
    check_affine_layer(layer, (ci, 9, 7), seed=2, family=linearize.Conv)


@pytest.mark.parametrize("case", CONV1D_CASES, ids=_conv_id)
def test_conv1d(case):
    k, s, p, d, g, ci, co, b = case
    layer = nn.Conv1d(ci, co, k, stride=s, padding=p, dilation=d, groups=g, bias=b)
    check_affine_layer(layer, (ci, 11), seed=3, family=linearize.Conv)


@pytest.mark.parametrize("case", CONV2D_CASES[::3] + CONV1D_CASES[::3], ids=_conv_id)
def test_conv_in_row_chunks_is_the_one_call_result(case, monkeypatch):
    """On the CPU, Conv.apply / apply_transpose run in row chunks (CHUNK_BYTES): whatever
    the chunk size, the result is the dense matrix's to rounding (torch's kernels round a
    row differently in calls of different sizes on some of these shapes)."""
    from linearize.ops import conv as conv_mod

    k, s, p, d, g, ci, co, b = case
    cls = nn.Conv2d if len(k) == 2 else nn.Conv1d
    in_shape = (ci, 9, 7) if len(k) == 2 else (ci, 11)
    layer = randomize_(cls(ci, co, k, stride=s, padding=p, dilation=d, groups=g,
                           bias=b).double(), 4).eval()
    op = compile_layer(layer, in_shape).nodes[0].op
    gen = generator(5)
    x = torch.randn((37, *in_shape), generator=gen, dtype=F64)
    gy = torch.randn((37, *op.out_shape), generator=gen, dtype=F64)
    monkeypatch.setattr(conv_mod, "CHUNK_BYTES", 1 << 40)
    whole, whole_t = op.apply(x), op.apply_transpose(gy)
    dense = op.matrix().toarray()
    np.testing.assert_allclose(whole.reshape(37, -1).numpy(), x.reshape(37, -1).numpy()
                               @ dense.T, **EXACT)
    for rows in (1, 5, 36):
        per_row = (int(np.prod(in_shape)) + int(np.prod(op.out_shape))) * 8
        monkeypatch.setattr(conv_mod, "CHUNK_BYTES", rows * per_row)
        torch.testing.assert_close(op.apply(x), whole, **EXACT)
        torch.testing.assert_close(op.apply_transpose(gy), whole_t, **EXACT)


@pytest.mark.parametrize("channels", [(1, 8), (8, 16), (16, 32), (3, 4)], ids=str)
def test_conv_chunks_change_no_bit_on_the_cnns_shapes(channels, monkeypatch):
    """3x3 convolutions with padding 1, the layers of the CNNs here: row chunks of any
    size give the one-call result bit for bit (what the walks' exact seams rely on:
    a region's exit is the same in a batch of any size)."""
    from linearize.ops import conv as conv_mod

    ci, co = channels
    layer = randomize_(nn.Conv2d(ci, co, 3, padding=1).double(), 6).eval()
    op = compile_layer(layer, (ci, 14, 14)).nodes[0].op
    gen = generator(7)
    x = torch.randn((37, ci, 14, 14), generator=gen, dtype=F64)
    gy = torch.randn((37, co, 14, 14), generator=gen, dtype=F64)
    monkeypatch.setattr(conv_mod, "CHUNK_BYTES", 1 << 40)
    whole, whole_t = op.apply(x), op.apply_transpose(gy)
    for rows in (1, 2, 5, 16):
        monkeypatch.setattr(conv_mod, "CHUNK_BYTES", rows * (ci + co) * 196 * 8)
        assert torch.equal(op.apply(x), whole)
        assert torch.equal(op.apply_transpose(gy), whole_t)


def test_conv_matrix_covers_every_keyword():
    for cases in (CONV2D_CASES, CONV1D_CASES):
        for position, values in enumerate(zip(*cases)):
            full = set(map(repr, (c[position] for c in _conv_cases(len(cases[0][0])))))
            assert set(map(repr, values)) == full


@pytest.mark.parametrize("dilation", [1, 2])
@pytest.mark.parametrize("kernel", [(2, 4), (4, 3), (3, 2)], ids=str)
def test_conv2d_same_padding_even_kernels_is_asymmetric(kernel, dilation):
    layer = nn.Conv2d(2, 3, kernel, padding="same", dilation=dilation)
    node = check_affine_layer(layer, (2, 6, 5), seed=7)
    assert node.out_shape == (3, 6, 5)
    pads = node.op.padding
    for (before, after), k in zip(pads, kernel):
        assert before + after == dilation * (k - 1)
        assert after - before in (0, 1)


# --------------------------------------------------------------------------- BatchNorm


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(
    "bn, in_shape",
    [(nn.BatchNorm1d, (6,)), (nn.BatchNorm1d, (6, 5)), (nn.BatchNorm2d, (6, 4, 3))],
    ids=["bn1d-C", "bn1d-CL", "bn2d"],
)
def test_batchnorm_eval(bn, in_shape, affine):
    layer = bn(6, affine=affine, eps=1e-3)
    node = check_affine_layer(layer, in_shape, seed=11, family=linearize.ChannelScale)
    # random running statistics, so the map is far from the identity
    assert not np.allclose(node.op.matrix().diagonal(), 1.0)


# --------------------------------------------------------------------------- average pooling

AVG2D_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=1),
    dict(kernel_size=(3, 2), stride=(2, 1)),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
    dict(kernel_size=(4, 3), stride=(3, 2), padding=(2, 1)),
    dict(kernel_size=(4, 3), stride=(3, 2), padding=(2, 1), count_include_pad=False),
    dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, count_include_pad=False),
    dict(kernel_size=2, stride=3, ceil_mode=True),
    dict(kernel_size=3, divisor_override=5),
    dict(kernel_size=3, stride=2, padding=1, divisor_override=2),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True, divisor_override=7),
]
AVG1D_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=2, padding=1, count_include_pad=False),
    dict(kernel_size=4, stride=3, padding=2, ceil_mode=True),
    dict(kernel_size=4, stride=3, padding=2, ceil_mode=True, count_include_pad=False),
    dict(kernel_size=2, stride=3, ceil_mode=True),
]


@pytest.mark.parametrize("kw", AVG2D_CASES, ids=str)
def test_avg_pool2d(kw):
    check_affine_layer(nn.AvgPool2d(**kw), (2, 9, 8), family=linearize.AvgPool)


@pytest.mark.parametrize("kw", AVG1D_CASES, ids=str)
def test_avg_pool1d(kw):
    check_affine_layer(nn.AvgPool1d(**kw), (3, 11), family=linearize.AvgPool)


# --------------------------------------------------------------------------- adaptive


@pytest.mark.parametrize(
    "out, in_shape",
    [(3, (2, 7, 7)), (2, (2, 5, 5)), ((3, 2), (2, 7, 5)), ((None, 2), (2, 6, 5)),
     ((4, None), (1, 7, 3)), (1, (3, 4, 5)), ((5, 4), (1, 3, 2))],
    ids=str,
)
def test_adaptive_avg_pool2d(out, in_shape):
    check_affine_layer(nn.AdaptiveAvgPool2d(out), in_shape, family=linearize.AdaptiveAvgPool)


@pytest.mark.parametrize("out, length", [(3, 7), (2, 5), (4, 9), (1, 6), (5, 3)], ids=str)
def test_adaptive_avg_pool1d(out, length):
    check_affine_layer(nn.AdaptiveAvgPool1d(out), (2, length), family=linearize.AdaptiveAvgPool)


@pytest.mark.parametrize("layer, in_shape", [
    (nn.AdaptiveAvgPool2d((None, None)), (2, 4, 3)),
    (nn.AdaptiveAvgPool2d((4, 3)), (2, 4, 3)),
    (nn.AdaptiveAvgPool1d(5), (2, 5)),
], ids=str)
def test_adaptive_avg_pool_to_same_size_is_no_node(layer, in_shape):
    prog = compile_layer(layer, in_shape)
    assert prog.nodes == ()
    x = torch.randn((4, *in_shape), generator=generator(0), dtype=F64)
    torch.testing.assert_close(prog(x), layer(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- shape layers


@pytest.mark.parametrize("layer, in_shape", [
    (nn.Flatten(), (2, 3, 4)),
    (nn.Flatten(2), (2, 3, 4)),
    (nn.Flatten(1, 2), (2, 3, 4)),
    (nn.Unflatten(1, (3, 4)), (12,)),
], ids=str)
def test_flatten_is_identity_matrix(layer, in_shape):
    node = check_affine_layer(layer, in_shape, family=linearize.Reshape)
    np.testing.assert_array_equal(node.op.matrix().toarray(), np.eye(np.prod(in_shape)))


@pytest.mark.parametrize("layer", [nn.Identity(), nn.Dropout(0.5), nn.Dropout2d(0.3),
                                   nn.Dropout1d(0.2), nn.Flatten(-1)], ids=str)
def test_identity_layers_in_eval_emit_nothing(layer):
    in_shape = (3, 4, 5) if not isinstance(layer, (nn.Flatten, nn.Dropout1d)) else (3, 5)
    prog = compile_layer(layer.eval(), in_shape)
    assert prog.nodes == () and prog.output == 0
    x = torch.randn((4, *in_shape), generator=generator(0), dtype=F64)
    torch.testing.assert_close(prog(x), layer(x), rtol=0, atol=0)


# --------------------------------------------------------------------------- ReLU


@pytest.mark.parametrize("layer, slope", [(nn.ReLU(), 0.0), (nn.LeakyReLU(), 0.01),
                                          (nn.LeakyReLU(0.37), 0.37), (nn.LeakyReLU(-0.5), -0.5),
                                          (nn.LeakyReLU(2.0), 2.0)], ids=str)
def test_relu_gate(layer, slope):
    prog = compile_layer(layer, (3, 4))
    (node,) = prog.nodes
    assert isinstance(node, linearize.ReLU)
    assert node.negative_slope == slope
    x = torch.randn((6, 3, 4), generator=generator(0), dtype=F64)
    x[0, 0, 0] = 0.0  # the gate's boundary
    torch.testing.assert_close(node.forward(x), layer(x), rtol=0, atol=0)
    torch.testing.assert_close(prog(x.float()), layer(x.float()), rtol=0, atol=0)


# --------------------------------------------------------------------------- max pooling


MAX2D_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=1),
    dict(kernel_size=(3, 2), stride=(2, 1)),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=(4, 3), stride=(3, 2), padding=(2, 1)),
    dict(kernel_size=3, stride=2, ceil_mode=True),
    dict(kernel_size=3, stride=2, padding=1, ceil_mode=True),
    dict(kernel_size=2, stride=3, ceil_mode=True),
    dict(kernel_size=2, dilation=2),
    dict(kernel_size=3, stride=2, padding=1, dilation=2),
    dict(kernel_size=(2, 3), stride=2, padding=1, dilation=(3, 1), ceil_mode=True),
]
MAX1D_CASES = [
    dict(kernel_size=2),
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=4, stride=3, padding=2, ceil_mode=True),
    dict(kernel_size=2, stride=2, dilation=3),
    dict(kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=True),
]


def torch_windows(pool_fn, in_shape) -> np.ndarray:
    """Membership (n_out, n_in) from torch alone: input i is in window o iff raising x[i]
    far above everything else makes output o equal to it."""
    n_in = int(np.prod(in_shape))
    x = torch.rand((n_in, n_in), generator=generator(5), dtype=F64)
    big = 1e3 + torch.arange(n_in, dtype=F64)
    x[torch.arange(n_in), torch.arange(n_in)] = big
    y = pool_fn(x.reshape(n_in, *in_shape)).reshape(n_in, -1)  # (n_in, n_out)
    return (y == big[:, None]).numpy().T


def check_max_pool(layer, in_shape, torch_fn):
    prog = compile_layer(layer, in_shape)
    (node,) = prog.nodes
    assert isinstance(node, linearize.MaxPool)
    n_in = int(np.prod(in_shape))
    x = torch.randn((4, *in_shape), generator=generator(1), dtype=F64)
    want, idx = torch_fn(x, return_indices=True)
    assert node.out_shape == tuple(want.shape[1:])
    got = node.forward(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(prog(x), want, rtol=0, atol=0)

    window = node.window.numpy()
    assert window.shape[0] == int(np.prod(node.out_shape))
    # the window table, as a membership matrix, is torch's own
    member = np.zeros((window.shape[0], n_in), dtype=bool)
    rows = np.repeat(np.arange(window.shape[0]), window.shape[1])
    valid = window.reshape(-1) >= 0
    member[rows[valid], window.reshape(-1)[valid]] = True
    assert (window >= 0).sum(axis=1).tolist() == member.sum(axis=1).tolist()  # no repeats
    np.testing.assert_array_equal(member, torch_windows(layer, in_shape))
    assert node.nnz == member.sum()

    # gathering x at the window holds torch's maximum; its argmax is torch's index
    entries = node.gather(x)  # (N, n_out, K)
    k = entries.argmax(dim=2)
    selected = torch.from_numpy(window)[None].expand(4, -1, -1).gather(2, k[..., None])[..., 0]
    n_spatial = n_in // in_shape[0]
    channel = torch.arange(in_shape[0]).repeat_interleave(int(np.prod(node.out_shape[1:])))
    torch.testing.assert_close(selected // n_spatial, channel[None].expand(4, -1), rtol=0, atol=0)
    torch.testing.assert_close(selected % n_spatial, idx.reshape(4, -1), rtol=0, atol=0)
    padding = entries == float("-inf")
    assert torch.equal(padding, torch.from_numpy(window < 0)[None].expand(4, -1, -1))


@pytest.mark.parametrize("kw", MAX2D_CASES, ids=str)
def test_max_pool2d_window_table(kw):
    check_max_pool(nn.MaxPool2d(**kw), (2, 9, 8), lambda x, **r: F.max_pool2d(x, **kw, **r))


@pytest.mark.parametrize("kw", MAX1D_CASES, ids=str)
def test_max_pool1d_window_table(kw):
    check_max_pool(nn.MaxPool1d(**kw), (3, 13), lambda x, **r: F.max_pool1d(x, **kw, **r))


def test_max_pool_to_dtype_keeps_window_integer():
    prog = compile_layer(nn.MaxPool2d(2), (1, 4, 4))
    p32 = prog.to(torch.float32)
    assert p32.nodes[0].window.dtype == torch.int64
    x = torch.randn((2, 1, 4, 4), generator=generator(0))
    torch.testing.assert_close(p32(x), F.max_pool2d(x, 2), rtol=0, atol=0)


# --------------------------------------------------------------------------- zero weights


@pytest.mark.parametrize("layer, in_shape", [
    (nn.Linear(6, 4), (6,)),
    (nn.Linear(6, 4), (3, 6)),
    (nn.Conv2d(2, 3, 3, padding=1), (2, 5, 4)),
    (nn.Conv1d(2, 4, 2, groups=2), (2, 7)),
    (nn.BatchNorm1d(4), (4,)),
    (nn.BatchNorm2d(4), (4, 3, 2)),
], ids=str)
def test_nnz_counts_structural_entries_of_pruned_layers(layer, in_shape):
    """A zero weight (a pruned network, a BN channel with gamma = 0) is still an entry of
    the operator's sparsity structure: nnz and matrix().nnz agree, the values are exact."""
    layer = randomize_(layer.double(), 9).eval()
    with torch.no_grad():
        w = layer.weight
        w.view(-1)[::2] = 0.0
    prog = compile_layer(layer, in_shape)
    op = prog.nodes[0].op
    m = op.matrix()
    assert op.nnz == m.nnz
    x = torch.randn(in_shape, generator=generator(10), dtype=F64)
    np.testing.assert_allclose(m.toarray(), jacobian(layer, in_shape, x), **EXACT)
    assert np.count_nonzero(m.toarray()) < m.nnz  # the zeros are there, and stored
