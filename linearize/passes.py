"""Program-to-program transforms. Each returns a new Program; none mutates its input."""

from __future__ import annotations

import dataclasses

from linearize.ir import Affine, Node, Program


def rebuild(program: Program, replace: dict[int, Node | None]) -> Program:
    """Copy ``program`` with node k replaced by ``replace[k]``.

    ``replace[k] = None`` removes node k; its value becomes an alias of its (single)
    input. Value indices are renumbered and every reference updated.
    """
    new_index = {0: 0}
    nodes: list[Node] = []
    for k, node in enumerate(program.nodes):
        node = replace.get(k, node)
        if node is None:
            new_index[k + 1] = new_index[program.nodes[k].inputs[0]]
            continue
        nodes.append(dataclasses.replace(node, inputs=tuple(new_index[i] for i in node.inputs)))
        new_index[k + 1] = len(nodes)
    return Program(program.input_shape, tuple(nodes), new_index[program.output], program.source)


def fold_batchnorm(program: Program) -> Program:
    """Merge each per-channel scale (an eval-mode BatchNorm) into the affine map that
    feeds it, when that map feeds nothing else and its operator family can absorb the
    scale (:meth:`LinearOperator.scale_output`; Conv and Dense can).

    ``s * (W x + b) + t = (s W) x + (s b + t)``. The unfolded program stays valid;
    this pass only saves one elementwise pass per batch-norm.
    """
    replace: dict[int, Node | None] = {}
    for k, node in enumerate(program.nodes):
        if not isinstance(node, Affine):
            continue
        s = node.op.channel_scale()  # (C, 1, ..., 1) or None
        if s is None:
            continue
        src = node.inputs[0]
        if src == 0 or program.users[src] != (k,) or src == program.output:
            continue
        j = src - 1
        prev = program.nodes[j]
        if not isinstance(prev, Affine) or j in replace:
            continue
        op = prev.op.scale_output(s.reshape(-1))
        if op is None:
            continue
        terms = [b for b in (None if prev.bias is None else prev.bias * s, node.bias)
                 if b is not None]
        bias = None if not terms else terms[0] if len(terms) == 1 else terms[0] + terms[1]
        replace[j] = dataclasses.replace(prev, op=op, bias=bias, name=f"{prev.name}+{node.name}")
        replace[k] = None
    return rebuild(program, replace) if replace else program
