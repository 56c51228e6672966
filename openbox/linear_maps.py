"""The network with its gates fixed: one affine map, pushed forward or composed backward.

With a configuration fixed, every node is affine, so the network is
``W x + b``. Two passes use that:

* :class:`FixedForward` pushes K vectors per input through it (the identity basis
  gives the linear form of every gate input: the rows of the polytope).
* :func:`compose_backward` composes the transposed maps from the output side,
  R rows at a time (R = C for the local linear classifier), and accumulates the
  bias ``b = sum_k g_k . bias_k`` exactly instead of recovering it as ``f(x) - W x``.

Shapes: B inputs (each with its own configuration), K pushed vectors or R rows
per input; values travel as (B * K, *shape) so affine operators see one batch.
"""

from __future__ import annotations

from collections.abc import Callable
from math import prod

import torch
from torch import Tensor

from linearize import Add, Affine, Interpreter, MaxPool, Node, Program, ReLU
from openbox.configuration import Configuration


def relu_gain(node: ReLU, on: Tensor, dtype: torch.dtype) -> Tensor:
    """Slope of each ReLU input under the configuration: 1 where on, else negative_slope."""
    one = torch.ones((), dtype=dtype, device=on.device)
    return torch.where(on, one, one * node.negative_slope)


GateHook = Callable[[int, Node, Tensor, Tensor], None]


class FixedForward(Interpreter):
    """Push vectors through the network with every gate fixed by ``config``.

    ``run(program, v)`` takes v (B * K, *input_shape): K vectors for each of the B
    inputs of ``config``, grouped by input. ``with_bias=False`` pushes the linear
    part only. ``on_gate(k, node, z, y)`` sees every gate's input z as (B, K, n_in) and
    output y as (B, K, n_out), flattened per vector.
    """

    def __init__(
        self, config: Configuration, *, with_bias: bool, on_gate: GateHook | None = None
    ):
        self.config = config
        self.with_bias = with_bias
        self.on_gate = on_gate

    def _grouped(self, x: Tensor) -> Tensor:
        b = self.config.batch_size
        return x.reshape(b, x.shape[0] // b, *x.shape[1:])

    def affine(self, k, node: Affine, x):
        y = node.op.apply(x)
        if self.with_bias and node.bias is not None:
            y = y + node.bias
        return y

    def relu(self, k, node: ReLU, x):
        z = self._grouped(x)
        gain = relu_gain(node, self.config.on[k], x.dtype).unsqueeze(1)
        y = z * gain
        if self.on_gate:
            self.on_gate(k, node, z.flatten(2), y.flatten(2))
        return y.reshape(x.shape)

    def maxpool(self, k, node: MaxPool, x):
        z = self._grouped(x).flatten(2)  # (B, K, n_in)
        idx = self.config.index[k]  # (B, n_out)
        if z.shape[0] == 1:
            y = z.index_select(2, idx[0])
        else:
            y = z.gather(2, idx.unsqueeze(1).expand(-1, z.shape[1], -1))
        if self.on_gate:
            self.on_gate(k, node, z, y)
        return y.reshape(x.shape[0], *node.out_shape)


def compose_backward(
    program: Program, config: Configuration, rows: Tensor
) -> tuple[Tensor, Tensor]:
    """Compose the fixed-configuration network from the output side.

    Args:
        program: the compiled network (parameters in the working dtype/device).
        config: configuration of B inputs.
        rows: (B, R, *output_shape): R output-space row vectors per input (the
            identity rows for a local linear classifier).

    Returns:
        (weight, bias): weight (B, R, *input_shape) with ``weight[b, r] =
        rows[b, r] @ W_b``, bias (B, R) with ``bias[b, r] = rows[b, r] . b_b``, where
        ``W_b x + b_b`` is the network on input b's region.
    """
    b, r = rows.shape[:2]
    bias = torch.zeros((b, r), dtype=rows.dtype, device=rows.device)
    grads = {program.output: rows.reshape(b * r, *program.output_shape).clone()}
    weight = _push_back(program, config, grads, b, r, 0, bias)
    return weight.reshape(b, r, *program.input_shape), bias


def backward_to(program: Program, config: Configuration, rows: Tensor, value: int) -> Tensor:
    """:func:`compose_backward` from the output down to the program value ``value`` only
    (the output of node ``value - 1``), no biases: (B, R, *shape of that value), the rows
    times the fixed network's Jacobian from that value to the output. Only the gates of
    nodes at or after ``value`` are read. The program must be a chain from there on (each
    node reads the value before it)."""
    b, r = rows.shape[:2]
    grads = {program.output: rows.reshape(b * r, *program.output_shape).clone()}
    g = _push_back(program, config, grads, b, r, value, None)
    return g.reshape(b, r, *program.shape_of(value))


def backward_from(program: Program, config: Configuration, g: Tensor, value: int) -> Tensor:
    """The rest of :func:`compose_backward` after :func:`backward_to`: g (B, R, *shape of
    value ``value``) pushed down to the input through the nodes before ``value``, with
    their gates from ``config``; (B, R, *input_shape)."""
    b, r = g.shape[:2]
    grads = {value: g.reshape(b * r, *g.shape[2:]).clone()}
    weight = _push_back(program, config, grads, b, r, 0, None, top=value - 1)
    return weight.reshape(b, r, *program.input_shape)


def _push_back(program: Program, config: Configuration, grads: dict[int, Tensor], b: int,
               r: int, stop: int, bias: Tensor | None, top: int | None = None) -> Tensor:
    """Push the row vectors ``grads`` (value index -> (B R, *shape)) back through nodes
    ``top`` (default: the last) down to ``stop``, adding ``rows . biases`` into ``bias``
    when given; the vectors at value ``stop`` (zeros if nothing reaches it)."""
    dtype = next(iter(grads.values())).dtype
    device = next(iter(grads.values())).device

    def accumulate(value: int, g: Tensor) -> None:
        grads[value] = g if value not in grads else grads[value].add_(g)

    for k in range(len(program.nodes) - 1 if top is None else top, stop - 1, -1):
        g = grads.pop(k + 1, None)  # owned: no other entry of `grads` holds this tensor
        if g is None:  # value does not reach the output
            continue
        node = program.nodes[k]
        if isinstance(node, Affine):
            if bias is not None and node.bias is not None:
                bias += (g.reshape(b * r, -1) @ node.bias_flat).reshape(b, r)
            accumulate(node.inputs[0], node.op.apply_transpose(g))
        elif isinstance(node, ReLU):
            gain = relu_gain(node, config.on[k], dtype).unsqueeze(1)
            accumulate(node.inputs[0], g.reshape(b, r, *node.out_shape).mul_(gain).reshape(g.shape))
        elif isinstance(node, MaxPool):
            idx = config.index[k].unsqueeze(1).expand(-1, r, -1)
            gin = torch.zeros((b, r, prod(node.in_shape)), dtype=dtype, device=g.device)
            gin.scatter_add_(2, idx, g.reshape(b, r, -1))
            accumulate(node.inputs[0], gin.reshape(b * r, *node.in_shape))
        elif isinstance(node, Add):
            accumulate(node.inputs[0], g)
            accumulate(node.inputs[1], g.clone())
        else:
            raise TypeError(f"unknown node kind {type(node).__name__}")
    out = grads.get(stop)
    if out is None:  # nothing reaches it
        out = torch.zeros((b * r, *program.shape_of(stop)), dtype=dtype, device=device)
    return out


class SupportPass(Interpreter):
    """Which gate inputs have a linear part that is not identically zero.

    Pushes the all-ones indicator through the entrywise-absolute network with the
    gates fixed (ReLU off with slope 0 blocks; max-pool passes its selected entry).
    An element is 0 exactly when its value does not depend on the input at all in
    this region: a constraint on it, or between two such entries, is constant.

    ``run(program, ones)`` with ones (B, *input_shape); ``support[k]`` is a bool
    (B, *in_shape) tensor per gate node k.
    """

    def __init__(self, config: Configuration):
        self.config = config
        self.support: dict[int, Tensor] = {}

    def affine(self, k, node: Affine, x):
        return node.op.abs().apply(x)

    def relu(self, k, node: ReLU, x):
        self.support[k] = x > 0
        return x if node.negative_slope else x * self.config.on[k]

    def maxpool(self, k, node: MaxPool, x):
        self.support[k] = x > 0
        idx = self.config.index[k]
        return x.reshape(x.shape[0], -1).gather(1, idx).reshape(x.shape[0], *node.out_shape)


def gate_support(program: Program, config: Configuration) -> dict[int, Tensor]:
    """Gate node -> bool (B, n_k): the gate input's linear part is not identically zero."""
    ones = torch.ones(
        (config.batch_size, *program.input_shape), dtype=program.dtype, device=program.device
    )
    sp = SupportPass(config)
    sp.run(program, ones)
    return {k: v.reshape(config.batch_size, -1) for k, v in sp.support.items()}
