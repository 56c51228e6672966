"""Model preparation shared by the Captum adapters, on the explainer's private model copy.

Captum's rule-based methods (GuidedBackprop, Deconvolution, DeepLift, GuidedGradCam) act
through hooks on ``nn.ReLU`` / ``nn.MaxPool2d`` *modules*: a functional ``F.relu`` in
``forward`` is silently treated as a plain gradient, and a module called twice breaks
DeepLift (its hooks keep one input per module). The functions here rewrite a model, traced
with :mod:`torch.fx`, so that every such use is its own module, find the layer Grad-CAM
hooks, read a global-average-pool head for CAM, and check which layers a method cannot
handle (collecting every offender before raising).

None of them modifies its argument: :func:`unique_relus` and :func:`gap_head` work on a deep
copy, :func:`last_conv_layer` removes its hooks before it returns.
"""

from __future__ import annotations

import contextlib
import copy
import operator
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from openbox.explainers.base import UnsupportedModelError

# ----------------------------------------------------------------------------- layer tables

RELU_FUNCTIONS = (F.relu, torch.relu, F.relu_, torch.relu_)
"""call_function targets of a ReLU (``F.relu(x)``, ``torch.relu(x)``, the in-place ones)."""
RELU_METHODS = ("relu", "relu_")
"""call_method targets of a ReLU (``x.relu()``, ``x.relu_()``)."""
MAX_POOL_FUNCTIONS = {F.max_pool1d: nn.MaxPool1d, F.max_pool2d: nn.MaxPool2d,
                      F.max_pool3d: nn.MaxPool3d, torch.max_pool1d: nn.MaxPool1d,
                      torch.max_pool2d: nn.MaxPool2d, torch.max_pool3d: nn.MaxPool3d}
"""call_function max-pools and the module each becomes."""
_POOL_ARGS = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
MAX_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)

NEUTRAL_MODULES = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
    nn.ConvTranspose3d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d,
    nn.Flatten, nn.Unflatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
    nn.Dropout3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.ZeroPad2d, nn.ConstantPad1d,
    nn.ConstantPad2d, nn.ConstantPad3d,
)
"""Leaf modules that are affine in eval mode: every gradient rule passes them unchanged."""

NONLINEAR_FUNCTIONS = {
    F.relu6: "relu6", F.leaky_relu: "leaky_relu", F.hardtanh: "hardtanh", F.elu: "elu",
    F.gelu: "gelu", F.silu: "silu", F.softplus: "softplus", torch.sigmoid: "sigmoid",
    torch.tanh: "tanh", F.softmax: "softmax", F.log_softmax: "log_softmax",
    torch.softmax: "softmax", torch.clamp: "clamp", torch.clip: "clip", torch.abs: "abs",
    torch.max: "max", torch.min: "min", torch.amax: "amax", torch.amin: "amin",
    torch.maximum: "maximum", torch.minimum: "minimum", F.adaptive_max_pool1d:
    "adaptive_max_pool1d", F.adaptive_max_pool2d: "adaptive_max_pool2d",
    **{f: f.__name__ for f in MAX_POOL_FUNCTIONS}, **{f: f.__name__ for f in RELU_FUNCTIONS},
}
"""call_function targets that are not affine (known ones; others count as affine)."""
NONLINEAR_METHODS = frozenset({
    "relu", "relu_", "clamp", "clamp_", "clip", "abs", "max", "min", "amax", "amin",
    "sigmoid", "tanh", "softmax", "log_softmax", "maximum", "minimum",
})


# ----------------------------------------------------------------------------- tracing


def trace(model: nn.Module, method: str, why: str) -> fx.GraphModule:
    """torch.fx symbolic trace of ``model`` (shares its submodules); UnsupportedModelError
    naming ``method`` and ``why`` it needs the trace if tracing fails."""
    try:
        return fx.symbolic_trace(model)
    except Exception as err:  # tracing raises many kinds (TraceError, TypeError, ...)
        raise UnsupportedModelError(
            f"{method}: {why}, which needs a torch.fx symbolic trace of the model's forward; "
            f"tracing {type(model).__name__} failed ({type(err).__name__}: {err}). Write the "
            "forward without data-dependent control flow, or use another method."
        ) from err


def _fresh(gm: nn.Module, base: str) -> str:
    base = base.replace(".", "_")
    name, k = base, 1
    while hasattr(gm, name):
        k += 1
        name = f"{base}_{k}"
    return name


def unique_relus(model: nn.Module, *, max_pools: bool = False,
                 method: str = "unique_relus") -> fx.GraphModule:
    """A copy of ``model`` in which every ReLU use is its own ``nn.ReLU`` module.

    Rewrites the traced graph: ``F.relu`` / ``torch.relu`` / ``Tensor.relu`` (and their
    in-place forms) become fresh ``nn.ReLU()`` submodules; a ReLU module called more than
    once keeps its first call and gets a fresh module for each further call; in-place ReLUs
    become out-of-place (later readers of the input read the ReLU's output, as in-place
    semantics had it). With ``max_pools``, max-pools are treated the same way (functional
    ``F.max_pool2d`` with constant arguments -> ``nn.MaxPool2d``; a reused pool module is
    copied per call), as DeepLift needs.

    Args:
        model: (B, *in) -> (B, C); not modified (the result holds deep copies).
        max_pools: also give every max-pool use its own module.
        method: the explainer's name, for the error message.

    Returns:
        a GraphModule in eval mode with the same outputs and the same module paths for
        every module the forward calls.

    Raises:
        UnsupportedModelError: torch.fx cannot trace the model.
    """
    model = copy.deepcopy(model)
    gm = trace(model, method, "it needs one nn.ReLU module per ReLU use")
    graph = gm.graph
    modules = dict(gm.named_modules())
    order = {n: i for i, n in enumerate(graph.nodes)}
    seen: set[str] = set()
    for node in list(graph.nodes):
        new_module, inplace, source = None, False, None
        if node.op == "call_module":
            mod = modules[node.target]
            kinds = (nn.ReLU, *MAX_POOLS) if max_pools else (nn.ReLU,)
            if not isinstance(mod, kinds):
                continue
            if isinstance(mod, nn.ReLU) and mod.inplace:
                inplace, mod.inplace = True, False
            if node.target not in seen:
                seen.add(node.target)
                if inplace:
                    _redirect_inplace(node, node.args[0], order)
                continue
            new_module = nn.ReLU() if isinstance(mod, nn.ReLU) else copy.deepcopy(mod)
            source = f"{node.target}_use"
        elif node.op == "call_function" and node.target in RELU_FUNCTIONS:
            inplace = node.target in (F.relu_, torch.relu_) or _arg(node, 1, "inplace", False)
            new_module, source = nn.ReLU(), f"relu_{node.name}"
        elif node.op == "call_method" and node.target in RELU_METHODS:
            inplace = node.target == "relu_"
            new_module, source = nn.ReLU(), f"relu_{node.name}"
        elif max_pools and node.op == "call_function" and node.target in MAX_POOL_FUNCTIONS:
            new_module = _pool_module(node)
            if new_module is None:
                continue
            source = f"pool_{node.name}"
        else:
            continue
        name = _fresh(gm, source)
        gm.add_submodule(name, new_module.eval())
        with graph.inserting_after(node):
            replacement = graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(replacement)
        if inplace:
            _redirect_inplace(node, node.args[0], order, replacement)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return gm.eval()


def _arg(node: fx.Node, index: int, name: str, default):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _redirect_inplace(node: fx.Node, source, order: dict, replacement: fx.Node | None = None):
    """After an in-place op ``node`` on ``source``, later readers of ``source`` read the
    op's output (``replacement``, default ``node``)."""
    if not isinstance(source, fx.Node):
        return
    new = node if replacement is None else replacement
    pos = order[node]
    source.replace_all_uses_with(
        new, delete_user_cb=lambda user: user is not new and order.get(user, -1) > pos)


def _pool_module(node: fx.Node) -> nn.Module | None:
    """nn.MaxPoolNd for a functional max-pool node with constant arguments, else None."""
    values = dict(zip(_POOL_ARGS, node.args[1:]))
    values.update(node.kwargs)
    if any(isinstance(v, fx.Node) for v in values.values()) or values.get("return_indices"):
        return None
    if "kernel_size" not in values:
        return None
    values.pop("return_indices", None)
    return MAX_POOL_FUNCTIONS[node.target](**values)


# ----------------------------------------------------------------------------- checks


def unsupported_layers(model: nn.Module, handled: Sequence[type[nn.Module]],
                       handled_functions: Sequence = (), method: str = "") -> list[str]:
    """Every use in ``model``'s traced forward of a non-affine layer outside ``handled``.

    Leaf modules must be affine (:data:`NEUTRAL_MODULES`) or an instance of ``handled``;
    functional calls must not be a known non-affine function (:data:`NONLINEAR_FUNCTIONS`,
    :data:`NONLINEAR_METHODS`) unless in ``handled_functions``.

    Returns:
        descriptions like ``"'act' (LeakyReLU)"`` or ``"'clamp' (torch.clamp in forward)"``,
        in execution order, each use once.
    """
    gm = trace(model, method, "it checks which layers the method handles")
    modules = dict(gm.named_modules())
    handled = tuple(handled)
    out: list[str] = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            mod = modules[node.target]
            if not isinstance(mod, NEUTRAL_MODULES + handled):
                out.append(f"{node.target!r} ({type(mod).__name__})")
        elif node.op == "call_function" and node.target in NONLINEAR_FUNCTIONS:
            if node.target not in handled_functions:
                out.append(f"{node.name!r} ({_qualname(node.target)} in forward)")
        elif node.op == "call_method" and node.target in NONLINEAR_METHODS:
            if node.target not in handled_functions:
                out.append(f"{node.name!r} (Tensor.{node.target} in forward)")
    return list(dict.fromkeys(out))


def require_supported(model: nn.Module, method: str, handled: Sequence[type[nn.Module]],
                      handled_functions: Sequence = (), rule: str = "") -> None:
    """UnsupportedModelError naming ``method`` and every layer of :func:`unsupported_layers`.

    ``rule`` says what the method does handle, for the message.
    """
    bad = unsupported_layers(model, handled, handled_functions, method)
    if bad:
        names = ", ".join(t.__name__ for t in handled)
        raise UnsupportedModelError(
            f"{method}: cannot handle {len(bad)} layer(s): {', '.join(bad)}. It applies its "
            f"rule only to {names} modules{rule}, plus affine layers (conv, linear, "
            "batch-norm, average-pool, flatten); any other non-linearity would silently get "
            "a plain gradient."
        )


def _qualname(fn) -> str:
    mod = getattr(fn, "__module__", None) or "torch"
    if mod.startswith("torch.nn.functional"):
        mod = "F"
    elif mod.startswith("torch"):
        mod = "torch"
    return f"{mod}.{getattr(fn, '__name__', fn)}"


# ----------------------------------------------------------------------------- layers


def module_calls(model: nn.Module, input_shape: Sequence[int], select, *,
                 dtype: torch.dtype | None = None,
                 device: torch.device | None = None) -> list[str]:
    """Paths of the modules ``m`` with ``select(m)`` that ``model`` calls on one zero input
    (1, *input_shape), in the order the calls start (a module called twice appears twice).
    dtype / device default to the first parameter's. Hooks are removed before returning."""
    param = next(iter(model.parameters()), None)
    if dtype is None:
        dtype = param.dtype if param is not None else torch.float32
    if device is None:
        device = param.device if param is not None else torch.device("cpu")
    calls: list[str] = []
    handles = [
        m.register_forward_pre_hook(lambda *_, path=path: calls.append(path))
        for path, m in model.named_modules() if select(m)
    ]
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_shape, dtype=dtype, device=device))
    finally:
        for h in handles:
            h.remove()
    return calls


def conv_calls(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
    """Paths of the ``nn.Conv2d`` modules ``model`` calls on one zero input, in call order
    (a module called twice appears twice)."""
    return module_calls(model, input_shape, lambda m: isinstance(m, nn.Conv2d))


def last_conv_layer(model: nn.Module, input_shape: Sequence[int], *,
                    method: str = "last_conv_layer") -> tuple[str, nn.Conv2d]:
    """The last ``nn.Conv2d`` module in forward execution order: (path, module).

    Found by forward hooks on one zero input of shape (1, *input_shape), so functional
    ``F.conv2d`` calls are not seen. UnsupportedModelError naming ``method`` if the forward
    calls no Conv2d module.
    """
    calls = conv_calls(model, input_shape)
    if not calls:
        kinds = sorted({type(m).__name__ for _, m in model.named_modules()
                        if not m._modules}) or ["none"]
        raise UnsupportedModelError(
            f"{method}: needs an nn.Conv2d layer (it attributes the last convolution's "
            f"feature maps), but the model's forward calls none; its layers are: "
            f"{', '.join(kinds)}"
        )
    path = calls[-1]
    return path, model.get_submodule(path)


_FLATTEN_FUNCTIONS = (torch.flatten,)
_FLATTEN_METHODS = ("flatten", "view", "reshape", "squeeze")
_SKIP_MODULES = (nn.Dropout, nn.Identity)


def gap_head(model: nn.Module, method: str = "cam") -> tuple[fx.GraphModule, nn.Linear]:
    """Split a model ending in a global-average-pool head into (features, linear).

    The forward must end, in execution order, with: feature maps A (B, K, h, w) ->
    ``AdaptiveAvgPool2d(1)`` / ``F.adaptive_avg_pool2d(., 1)`` / ``.mean((2, 3))`` ->
    (optional) flatten -> one ``nn.Linear`` (K -> C) whose output is the model's output
    (eval-mode dropout / identity may sit in between).

    Returns:
        features: a GraphModule (copies of the layers) mapping x (B, *in) to A (B, K, h, w);
        linear: (a copy of) the head's Linear.

    Raises:
        UnsupportedModelError: naming ``method`` and the model's last layers otherwise.
    """
    gm = trace(copy.deepcopy(model), method, "it reads the model's global-average-pool head")
    modules = dict(gm.named_modules())
    out = next(n for n in gm.graph.nodes if n.op == "output")

    def fail(reason: str):
        raise UnsupportedModelError(
            f"{method}: needs a global-average-pool head: the forward must end with conv "
            "feature maps -> AdaptiveAvgPool2d(1) (or a mean over H, W) -> Flatten -> one "
            f"Linear; {reason}. This model ends with: {_tail(gm, modules)}"
        )

    def skip(n):
        while (isinstance(n, fx.Node) and n.op == "call_module"
               and isinstance(modules[n.target], _SKIP_MODULES)):
            n = n.args[0]
        return n

    node = skip(out.args[0])
    if not (isinstance(node, fx.Node) and node.op == "call_module"
            and isinstance(modules[node.target], nn.Linear)):
        fail("its output is not computed by an nn.Linear module")
    linear = modules[node.target]
    node = skip(node.args[0])
    flattened = False
    if isinstance(node, fx.Node) and _is_flatten(node, modules):
        node, flattened = skip(node.args[0]), True
    if not (isinstance(node, fx.Node) and _is_gap(node, modules, keepdim_ok=flattened)):
        fail("the Linear's input is not a global average pool of feature maps"
             + ("" if flattened else " (flattened, or a mean over dims 2, 3)"))
    features = node.args[0]
    if not isinstance(features, fx.Node):
        fail("the pooled feature maps are not a tensor computed in forward")
    gm.graph.output(features)
    gm.graph.erase_node(out)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm.eval(), linear


def _is_flatten(node: fx.Node, modules) -> bool:
    if node.op == "call_module":
        return isinstance(modules[node.target], nn.Flatten)
    if node.op == "call_function":
        return node.target in _FLATTEN_FUNCTIONS
    return node.op == "call_method" and node.target in _FLATTEN_METHODS


def _is_gap(node: fx.Node, modules, keepdim_ok: bool) -> bool:
    one = (1, (1, 1), [1, 1])
    if node.op == "call_module":
        mod = modules[node.target]
        return isinstance(mod, nn.AdaptiveAvgPool2d) and mod.output_size in one and keepdim_ok
    if node.op == "call_function" and node.target is F.adaptive_avg_pool2d:
        return _arg(node, 1, "output_size", None) in one and keepdim_ok
    if (node.op == "call_method" and node.target == "mean") or (
            node.op == "call_function" and node.target is torch.mean):
        dim = _arg(node, 1, "dim", None)
        keepdim = _arg(node, 2, "keepdim", False)
        dims = tuple(dim) if isinstance(dim, (tuple, list)) else (dim,)
        return set(dims) in ({2, 3}, {-2, -1}) and (keepdim_ok or not keepdim)
    return False


def _tail(gm: fx.GraphModule, modules, n: int = 4) -> str:
    steps = []
    for node in gm.graph.nodes:
        if node.op == "call_module":
            steps.append(f"{node.target!r} ({type(modules[node.target]).__name__})")
        elif node.op == "call_function" and node.target is not operator.getitem:
            steps.append(f"{_qualname(node.target)}")
        elif node.op == "call_method":
            steps.append(f"Tensor.{node.target}")
    return " -> ".join(steps[-n:]) or "(no layers)"


# ----------------------------------------------------------------------------- randomness


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Run the block with torch's generators seeded by ``seed`` (CPU, and ``device`` if it
    is a CUDA device), restoring the global RNG state afterwards."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type
                               if device.type != "cpu" else "cuda"):
        torch.manual_seed(seed)
        yield


def upsample(maps: Tensor, size: Sequence[int]) -> Tensor:
    """(B, 1, h, w) -> (B, 1, *size), bilinear (align_corners=False, as Captum's
    ``LayerAttribution.interpolate``)."""
    return F.interpolate(maps, size=tuple(size), mode="bilinear", align_corners=False)
