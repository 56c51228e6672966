"""Model-parameter randomisation test (Adebayo et al. 2018, "Sanity checks for saliency
maps"), cascading from the logits down."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from openbox.explainers.base import Explainer
from openbox.explainers.surgery import module_calls
from openbox.metrics._common import generator
from openbox.metrics.similarity import spearman

Init = Callable[[str, nn.Module, torch.Generator], None]


@dataclass(frozen=True, eq=False)
class Randomisation:
    """What :func:`randomisation` returns (B inputs, L layers with parameters).

    Attributes:
        layers: the L module paths, top-down (the last layer the forward pass runs first);
            column k is the model with layers[0..k] re-initialised.
        spearman: (B, L) Spearman rank correlation of each map with the original map.
        spearman_abs: (B, L) the same on absolute values |Phi|.
        original: (B, *input_shape) the original maps.
    """

    layers: tuple[str, ...]
    spearman: Tensor
    spearman_abs: Tensor
    original: Tensor


def layers_in_forward_order(model: nn.Module, input_shape, dtype: torch.dtype,
                            device: torch.device) -> list[str]:
    """Paths of the modules that own parameters, in the order a forward pass of a zero input
    (1, *input_shape) first calls them. Modules the forward pass never calls are left out.
    Hooks go on a deep copy, so ``model`` is untouched."""
    calls = module_calls(copy.deepcopy(model), input_shape,
                         lambda m: next(m.parameters(recurse=False), None) is not None,
                         dtype=dtype, device=device)
    return list(dict.fromkeys(calls))


def normal_init(path: str, module: nn.Module, g: torch.Generator) -> None:
    """The default re-initialisation: every parameter p the module owns (not its
    sub-modules') is redrawn, p ~ N(0, 1 / fan_in) for p.dim() >= 2 (fan_in = p[0].numel(),
    e.g. in_channels x kh x kw) and p ~ N(0, 1) for 1-D parameters (biases, norm scales and
    shifts). Buffers (batch-norm running statistics) are kept."""
    with torch.no_grad():
        for p in module.parameters(recurse=False):
            std = 1.0 / math.sqrt(p[0].numel()) if p.dim() >= 2 else 1.0
            p.copy_(std * torch.randn(p.shape, generator=g, dtype=p.dtype, device="cpu")
                    .to(p.device))


def randomisation(explainer: Explainer, x: Tensor, target, *, seed: int = 0,
                  init: Init | None = None, constant: float | None = None) -> Randomisation:
    """Cascading model-parameter randomisation: how much does the map depend on the weights?

    The layers with parameters are ordered by forward execution
    (:func:`layers_in_forward_order`) and reversed, l_1 = the logits layer. For k = 1..L,
    model_k is a deep copy of ``explainer.model`` with l_1..l_k re-initialised (cascading:
    model_k = model_{k-1} with l_k re-drawn; one torch.Generator seeded with ``seed`` draws
    every layer in turn, see :func:`normal_init`), and the same method is rebuilt on it,
    ``type(explainer)(model_k, explainer.input_shape, device=explainer.device,
    dtype=explainer.dtype, seed=explainer.seed, progress=explainer.progress,
    **explainer.config)``. Then

        spearman[b, k] = rho(Phi_k(x_b), Phi(x_b)),
        spearman_abs[b, k] = rho(|Phi_k(x_b)|, |Phi(x_b)|),

    rho = :func:`~openbox.metrics.similarity.spearman`, for the same target. A method that
    explains the model keeps rho ~ 1 only for layers the output does not depend on.
    ``explainer.model`` (the explainer's private copy) is not modified.

    Args:
        explainer: the method.
        x: (B, *input_shape); target: an int or (B,) classes.
        seed: seed of the re-initialisation.
        init: ``init(path, module, generator)`` re-initialises one module in place (default
            :func:`normal_init`); e.g. to reproduce Quantus's MPRT, which calls
            ``torch.manual_seed(seed + 1); module.reset_parameters()``.
        constant: passed to :func:`spearman` (value for a constant map; default: raise).

    Returns:
        a :class:`Randomisation`.
    """
    if not isinstance(explainer, Explainer):
        raise TypeError(f"explainer must be an openbox.explainers.Explainer, got "
                        f"{type(explainer).__name__}")
    x = explainer.check_input(x)
    target = explainer.check_target(target, x.shape[0])
    init = normal_init if init is None else init
    g = generator(seed)
    original = explainer.explain(x, target).attribution
    model = copy.deepcopy(explainer.model)
    layers = layers_in_forward_order(model, explainer.input_shape, explainer.dtype,
                                     explainer.device)[::-1]
    if not layers:
        raise ValueError(f"{explainer.name}: the model has no layer with parameters")
    modules = dict(model.named_modules())
    rho, rho_abs = [], []
    for path in layers:
        init(path, modules[path], g)
        rebuilt = type(explainer)(model, explainer.input_shape, device=explainer.device,
                                  dtype=explainer.dtype, seed=explainer.seed,
                                  progress=explainer.progress, **explainer.config)
        phi = rebuilt.explain(x, target).attribution
        rho.append(spearman(phi, original, constant=constant))
        rho_abs.append(spearman(phi.abs(), original.abs(), constant=constant))
    return Randomisation(tuple(layers), torch.stack(rho, 1), torch.stack(rho_abs, 1), original)
