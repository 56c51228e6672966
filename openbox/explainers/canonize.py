"""Canonizers: rewrite a copy of a model into an equivalent form a propagation method accepts.

In Zennit's spirit, each canonizer is a separate pass that returns a *new* module computing
the same function and never modifies its argument. Structure comes from a ``torch.fx``
trace (data flow), never from the order in which children were registered.

- :func:`fold_batch_norm`: every eval-mode BatchNorm that directly follows a Linear / Conv
  is merged into that layer's weight and bias and replaced by ``nn.Identity``;
  ``s * (W x + b) + t = (s W) x + (s b + t)`` with ``s = gamma / sqrt(var + eps)``,
  ``t = beta - mean * s`` per channel.
- :func:`lrp_graph`: :func:`fold_batch_norm`, then an ``fx.GraphModule`` in the form Captum's
  LRP needs (one module per call of a layer, ReLU and pooling as modules, reshapes as
  functions, no Identity / Dropout / Flatten leaves), or :class:`UnsupportedModelError`
  naming every layer it cannot propagate relevance through.
"""

from __future__ import annotations

import copy
import operator
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn

import linearize
from linearize.errors import Offender
from openbox.explainers.base import UnsupportedModelError

_BatchNorm = nn.modules.batchnorm._BatchNorm
# Layers whose output channel c is row block c of the weight (dim 0) and bias[c].
_AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

# Layer types on which LRP applies a rule (Captum's EpsilonRule; see captum_lrp): each maps
# its single input linearly (max-pool: piecewise, a selection), so
# R_in = x * J^T (R_out / (z + eps sign z)) with z the layer's output. Captum's own default
# table lacks Conv1d/Conv3d, 1d/3d pools and BatchNorm1d/3d; the explainer attaches the rule
# to each of these explicitly, so the whole tuple is supported.
RULE_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d,
    nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
)
# Kept only when fold_batch_norm may leave a batch-norm unfolded (a per-channel affine map).
BN_RULE_LAYERS: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
# Captum passes the relevance through these unchanged (SUPPORTED_NON_LINEAR_LAYERS).
PASS_LAYERS: tuple[type[nn.Module], ...] = (nn.ReLU,)
# Removed from the graph: the identity in eval mode (the explainer base rejects training mode).
_IDENTITY_LAYERS = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                    nn.AlphaDropout)

_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU_METHODS = {"relu", "relu_"}
# Functional pools -> (module type, names of the functional's arguments after the input).
_MAX = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG1 = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad")
_AVG = (*_AVG1, "divisor_override")
_POOL_FUNCTIONS: dict[Callable, tuple[type[nn.Module], tuple[str, ...]]] = {
    F.max_pool1d: (nn.MaxPool1d, _MAX), F.max_pool2d: (nn.MaxPool2d, _MAX),
    F.max_pool3d: (nn.MaxPool3d, _MAX),
    F.avg_pool1d: (nn.AvgPool1d, _AVG1), F.avg_pool2d: (nn.AvgPool2d, _AVG),
    F.avg_pool3d: (nn.AvgPool3d, _AVG),
    F.adaptive_avg_pool1d: (nn.AdaptiveAvgPool1d, ("output_size",)),
    F.adaptive_avg_pool2d: (nn.AdaptiveAvgPool2d, ("output_size",)),
    F.adaptive_avg_pool3d: (nn.AdaptiveAvgPool3d, ("output_size",)),
}
# Reshapes: relevance is carried as a gradient, which a reshape passes through unchanged.
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"view", "reshape", "flatten", "contiguous"}
# Non-tensor (shape) arithmetic feeding a reshape, e.g. x.view(x.size(0), -1).
_SHAPE_METHODS = {"size", "dim"}
_SHAPE_FUNCTIONS = {getattr, operator.getitem, operator.mul, operator.floordiv,
                    operator.add, operator.sub}


def trace(model: nn.Module, method: str) -> fx.GraphModule:
    """``torch.fx.symbolic_trace(model)``; UnsupportedModelError naming ``method`` if it fails
    (e.g. data-dependent control flow). A bare leaf layer is traced inside a Sequential."""
    if not list(model.children()):
        model = nn.Sequential(model)
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...)
        raise UnsupportedModelError(
            f"{method}: cannot trace the model with torch.fx ({type(err).__name__}: {err}); "
            "the method needs a model whose forward is a fixed graph of layers"
        ) from err


def fold_batch_norm(model: nn.Module, *, strict: bool = True, method: str = "lrp") -> nn.Module:
    """A deep copy of ``model`` with each foldable BatchNorm merged into its producer.

    A BatchNorm{1,2,3}d is foldable when, in the traced data flow, its input is the output of
    a Linear or Conv{1,2,3}d module that is called once and feeds nothing else, and the BN
    is called once, has running statistics and ``num_features`` equal to the layer's output
    channels. Then the layer's weight (C_out, ...) is scaled by ``s`` per output channel,
    its bias becomes ``s * b + t`` (created if absent), and the BN is replaced by
    ``nn.Identity``. Folding is computed in float64 and cast back to the layer's dtype.
    A Linear is assumed to see (B, F) inputs (its output feature is BatchNorm1d's channel).

    Args:
        model: any module; never modified (batch-norms must be in eval mode).
        strict: raise when a batch-norm cannot be folded (after a ReLU, at the input, ...);
            with False such batch-norms are left in place.
        method: the method named in errors.

    Returns:
        the folded copy, of the same class as ``model``: same outputs to rounding.

    Raises:
        linearize.TrainingModeError: a batch-norm (or dropout) is in training mode.
        UnsupportedModelError: (strict) naming every unfoldable batch-norm by module path.
    """
    linearize.reject_training_mode(model)
    folded = copy.deepcopy(model)
    gm = trace(folded, method)
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1

    offenders: list[Offender] = []
    for node in gm.graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, _BatchNorm):
            continue
        path = node.target
        reason = _unfoldable(node, bn, modules, calls)
        if reason:
            offenders.append(Offender(path, type(bn).__name__, reason))
            continue
        layer = modules[node.args[0].target]
        _merge(layer, bn)
        _set_module(folded, path, nn.Identity())
    if offenders and strict:
        raise UnsupportedModelError(
            f"{method}: cannot fold {len(offenders)} batch-norm"
            f"{'s' if len(offenders) > 1 else ''} into a preceding Linear/Conv: "
            f"{', '.join(map(str, offenders))}. The method needs every BatchNorm directly "
            "after a Linear or Conv layer whose output feeds nothing else"
        )
    return folded


def _unfoldable(node: fx.Node, bn: nn.Module, modules: dict[str, nn.Module],
                calls: dict[str, int]) -> str:
    """Why the batch-norm called at ``node`` cannot be folded ('' when it can)."""
    if bn.running_mean is None or bn.running_var is None:
        return "no running statistics (track_running_stats=False)"
    if calls[node.target] > 1:
        return f"called {calls[node.target]} times"
    src = node.args[0] if node.args else None
    if not isinstance(src, fx.Node):
        return "input is not a traced tensor"
    if src.op == "placeholder":
        return "at the model input"
    where = _describe(src, modules)
    if src.op != "call_module" or not isinstance(modules[src.target], _AFFINE):
        return f"after {where}, not a Linear or Conv"
    layer = modules[src.target]
    if calls[src.target] > 1:
        return f"after {where}, which is called {calls[src.target]} times"
    if len(src.users) > 1:
        others = sorted(u.name for u in src.users if u is not node)
        return f"after {where}, whose output also feeds {', '.join(others)}"
    out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
    if out != bn.num_features:
        return f"after {where} with {out} output channels, not {bn.num_features}"
    return ""


def _describe(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        return f"{node.target!r} ({type(modules[node.target]).__name__})"
    if node.op == "call_function":
        return f"{getattr(node.target, '__name__', str(node.target))}()"
    if node.op == "call_method":
        return f".{node.target}()"
    return node.name


def _merge(layer: nn.Module, bn: nn.Module) -> None:
    """layer <- bn o layer, in place (``layer`` belongs to the private copy)."""
    w = layer.weight
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    s = gamma / torch.sqrt(var + bn.eps)
    t = beta - mean * s
    b = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
    with torch.no_grad():
        new_w = (w.double() * s.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
        layer.weight.copy_(new_w)
        new_b = (s * b + t).to(dtype=w.dtype, device=w.device)
        if layer.bias is None:
            layer.bias = nn.Parameter(new_b, requires_grad=w.requires_grad)
        else:
            layer.bias.copy_(new_b)


def _set_module(root: nn.Module, path: str, module: nn.Module) -> None:
    if not path:
        raise UnsupportedModelError("the model itself is a batch-norm")
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, module)


# ----------------------------------------------------------------------------- LRP form


def lrp_graph(model: nn.Module, *, keep_unfoldable_bn: bool = False,
              method: str = "lrp") -> fx.GraphModule:
    """The model, BN-folded, as a GraphModule Captum's LRP propagates relevance through.

    Rewrites (the function is unchanged): batch-norms folded (:func:`fold_batch_norm`);
    Identity / Dropout modules removed; ``nn.Flatten`` becomes ``torch.flatten`` (Captum
    hooks every leaf module and has no rule for Flatten, while a function's gradient, which
    carries the relevance, passes a reshape unchanged); functional ``relu`` and pools
    become modules; a module called k > 1 times gets its own copy per call (Captum stores one
    activation per module and rejects reuse of rule layers). Module paths of the first call
    are kept; later calls are named ``<path>_call<k>`` (dots as underscores).

    Raises:
        UnsupportedModelError: naming every module (path, type) and function call that LRP
            cannot propagate through (anything but :data:`RULE_LAYERS`, ReLU, reshapes, and
            with ``keep_unfoldable_bn`` the unfolded batch-norms), and unfoldable batch-norms
            unless ``keep_unfoldable_bn``.
    """
    folded = fold_batch_norm(model, strict=not keep_unfoldable_bn, method=method)
    gm = trace(folded, method)
    graph = gm.graph
    modules = dict(gm.named_modules())
    calls: dict[str, int] = {}
    offenders: list[Offender] = []
    shape_nodes: set[fx.Node] = set()
    supported = RULE_LAYERS + PASS_LAYERS + (BN_RULE_LAYERS if keep_unfoldable_bn else ())

    def add(name: str, module: nn.Module) -> str:
        """Register ``module`` under a new top-level name derived from ``name``."""
        name = name.replace(".", "_")
        while name in modules:
            name += "_"
        gm.add_submodule(name, module)
        modules[name] = module
        return name

    for node in list(graph.nodes):
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, _IDENTITY_LAYERS):
                node.replace_all_uses_with(node.args[0])
                graph.erase_node(node)
            elif type(module) is nn.Flatten:
                with graph.inserting_after(node):
                    new = graph.call_function(torch.flatten, (node.args[0],),
                                              {"start_dim": module.start_dim,
                                               "end_dim": module.end_dim})
                node.replace_all_uses_with(new)
                graph.erase_node(node)
            elif type(module) not in supported:
                offenders.append(Offender(node.target, type(module).__name__))
            else:
                k = calls.get(node.target, 0) + 1
                calls[node.target] = k
                if k > 1:  # reused: this call gets its own copy (shared weights copied)
                    module = copy.deepcopy(module)
                    node.target = add(f"{node.target}_call{k}", module)
                if isinstance(module, nn.ReLU):
                    module.inplace = False  # Captum hooks the ReLU's input and output
        elif node.op == "call_function" and node.target in _RELU_FUNCTIONS or (
                node.op == "call_method" and node.target in _RELU_METHODS):
            _to_module(gm, node, add(node.name, nn.ReLU()))
        elif node.op == "call_function" and node.target in _POOL_FUNCTIONS:
            kind, names = _POOL_FUNCTIONS[node.target]
            kwargs = _bind(node, names)
            if kwargs is None or kwargs.pop("return_indices", False):
                offenders.append(Offender(node.name, node.target.__name__,
                                          "arguments must be constants, without indices"))
                continue
            _to_module(gm, node, add(node.name, kind(**kwargs)))
        elif node.op == "call_function" and node.target in _RESHAPE_FUNCTIONS or (
                node.op == "call_method" and node.target in _RESHAPE_METHODS):
            pass
        elif node.op == "call_method" and node.target in _SHAPE_METHODS:
            shape_nodes.add(node)
        elif node.op == "call_function" and node.target is getattr:
            if node.args[1] != "shape":
                offenders.append(Offender(node.name, f"getattr {node.args[1]!r}"))
            shape_nodes.add(node)
        elif node.op == "call_function" and node.target in _SHAPE_FUNCTIONS and all(
                a in shape_nodes for a in node.all_input_nodes):
            shape_nodes.add(node)
        elif node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target))
            kind = name if node.op == "call_function" else f"Tensor.{name}"
            offenders.append(Offender(node.name, kind))
        elif node.op == "get_attr":
            offenders.append(Offender(node.target, "tensor constant",
                                      "used directly in forward, not through a layer"))
    if offenders:
        raise UnsupportedModelError(
            f"{method}: cannot propagate relevance through {len(offenders)} "
            f"layer{'s' if len(offenders) > 1 else ''}: {', '.join(map(str, offenders))}. "
            f"Supported: {', '.join(t.__name__ for t in supported)}, functional relu / "
            "pools, Flatten / view / reshape, Identity, Dropout"
            + ("" if keep_unfoldable_bn else
               ", and BatchNorm directly after a Linear / Conv (folded)")
        )
    graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return gm.eval()


def _to_module(gm: fx.GraphModule, node: fx.Node, target: str) -> None:
    """Replace a function call node by a call of module ``target`` on its first argument."""
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module(target, (node.args[0],))
    node.replace_all_uses_with(new)
    gm.graph.erase_node(node)


def _bind(node: fx.Node, names: tuple[str, ...]) -> dict | None:
    """The call's arguments after the input, by name; None when one is a traced value."""
    kwargs = dict(zip(names, node.args[1:]))
    kwargs.update({k: v for k, v in node.kwargs.items() if k in names})
    extra = set(node.kwargs) - set(names) - {"input"}
    if extra or len(node.args) - 1 > len(names):
        return None
    values = list(kwargs.values())
    flat = [v for val in values for v in (val if isinstance(val, (tuple, list)) else (val,))]
    if any(isinstance(v, fx.Node) for v in flat):
        return None
    return kwargs
