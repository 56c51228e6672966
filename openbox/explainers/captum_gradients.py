"""Captum's gradient methods behind the explainer interface.

``saliency``, ``input-x-gradient``, ``integrated-gradients``, ``smoothgrad``,
``guided-backprop``, ``deconvolution``, ``deeplift``. Every one attributes the model's
**logit** of the target class (not its probability), as openbox's ``W_x[target]`` does, so
on a piecewise-linear network saliency equals ``W_x[target]`` and input-x-gradient
``x * W_x[target]``. All are batched: one Captum call per :meth:`explain`.

The rule-based methods (guided-backprop, deconvolution, deeplift) act through hooks on
``nn.ReLU`` (and, for DeepLift, ``nn.MaxPool2d``) modules, so they run on
:func:`~openbox.explainers.surgery.unique_relus` of the model copy: one module per use, also
for functional ``F.relu`` and a module called twice. A layer whose non-linearity Captum's
rule does not cover raises :class:`~openbox.explainers.base.UnsupportedModelError` at
construction, naming every such layer.

Captum is imported inside the methods (``require("captum.attr", name)``).
"""

from __future__ import annotations

import warnings

from torch import Tensor, nn

from openbox.explainers import surgery
from openbox.explainers.base import Explainer, Output, register, require

# Captum warns on every call that it sets (and later removes) hooks; that is by design here.
_HOOK_WARNINGS = r"Setting (forward, )?backward hooks"


class _Gradient(Explainer):
    """Base of the gradient adapters: ``self.net`` is the module Captum runs on."""

    def setup(self) -> None:
        self.net: nn.Module = self.model

    def _captum(self):
        return require("captum.attr", self.name)

    def _attr(self, method, x: Tensor, target: Tensor, **kwargs) -> Tensor:
        # a leaf that requires grad, so Captum neither warns nor flags the caller's tensor
        x = x.detach().clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_HOOK_WARNINGS)
            return method.attribute(x, target=target, **kwargs)


@register
class Saliency(_Gradient):
    """``saliency``: the gradient of the target logit, d f_c / d x (Captum ``Saliency``).

    Options:
        abs: take |gradient| (default False: the signed gradient, which on a piecewise-linear
            network equals openbox's W_x[target] and keeps the sign a comparison needs;
            Captum's default is True).

    Shapes: x (B, *in) -> attribution (B, *in). The logit is attributed, not the softmax.
    Nothing in it depends on the input size or range.
    """

    name = "saliency"
    summary = "gradient of the target logit (Captum Saliency)"
    options = {"abs": False}

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        method = self._captum().Saliency(self.net)
        return Output(self._attr(method, x, target, abs=bool(self.config["abs"])))


@register
class InputXGradient(_Gradient):
    """``input-x-gradient``: x * d f_c / d x of the target logit (Captum ``InputXGradient``).

    No options. Shapes: x (B, *in) -> (B, *in). On a piecewise-linear network with zero
    bias this is exact DeepLift / IG from a zero baseline; otherwise it is their first-order
    proxy. Zero-valued pixels (the background of a [0, 1] image) always get 0.
    """

    name = "input-x-gradient"
    summary = "input times the gradient of the target logit (Captum InputXGradient)"

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        method = self._captum().InputXGradient(self.net)
        return Output(self._attr(method, x, target))


@register
class IntegratedGradients(_Gradient):
    """``integrated-gradients``: (x - x0) * mean of d f_c / d x along the straight path
    from the baseline x0 (Captum ``IntegratedGradients``, Gauss-Legendre rule).

    Options:
        baseline: a float, every pixel (default 0.0: a black image, the background of a
            [0, 1] image; Captum's default too).
        n_steps: quadrature points on the path (default 50, Captum's; the exact openbox-ig
            shows how far a 28x28 CNN's answer is from the integral).
        internal_batch_size: (input, step) pairs per forward pass (default 256: a few MB of
            activations for a 28x28 CNN; Captum's default runs all B * n_steps at once).

    Shapes: x (B, *in) -> (B, *in); the logit is attributed. ``info["delta"]`` (B,):
    Captum's completeness error sum(attribution) - (f_c(x) - f_c(x0)).
    """

    name = "integrated-gradients"
    summary = "integrated gradients of the target logit, Riemann/Gauss-Legendre (Captum)"
    options = {"baseline": 0.0, "n_steps": 50, "internal_batch_size": 256}

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        method = self._captum().IntegratedGradients(self.net)
        size = max(int(self.config["internal_batch_size"]), x.shape[0])
        attr, delta = self._attr(method, x, target, baselines=float(self.config["baseline"]),
                                 n_steps=int(self.config["n_steps"]),
                                 internal_batch_size=size, return_convergence_delta=True)
        return Output(attr, info={"delta": delta.detach().reshape(-1)})


@register
class SmoothGrad(_Gradient):
    """``smoothgrad``: the mean gradient of the target logit over noisy copies x + N(0, s^2)
    (Captum ``NoiseTunnel(Saliency)``, ``nt_type="smoothgrad"``).

    Options:
        stdev: noise standard deviation s in input units (default 0.15: 15% of the [0, 1]
            pixel range, in Smilkov et al.'s 10-20% band; Captum's default 1.0 is absolute
            and would drown a [0, 1] image).
        nt_samples: noisy copies per input (default 25: the gradient of a small CNN
            stabilises after a few tens; Captum's default is 5).
        nt_samples_batch_size: noisy copies per input per forward pass (default 5: 5 * B
            inputs a pass; Captum's default runs all nt_samples * B at once).
        abs: average |gradient| (default False: signed, as ``saliency``).

    Shapes: x (B, *in) -> (B, *in). Stochastic: the noise is drawn from torch's generator
    seeded with the call's seed (global RNG state is restored). The noise of a batch is one
    draw for the whole batch, so an input explained in a batch gets other noise than
    explained alone with the same seed.
    """

    name = "smoothgrad"
    summary = "mean gradient of the target logit under Gaussian noise (Captum NoiseTunnel)"
    stochastic = True
    options = {"stdev": 0.15, "nt_samples": 25, "nt_samples_batch_size": 5, "abs": False}

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        captum = self._captum()
        method = captum.NoiseTunnel(captum.Saliency(self.net))
        with surgery.seeded(seed, self.device):
            attr = self._attr(method, x, target, nt_type="smoothgrad",
                              nt_samples=int(self.config["nt_samples"]),
                              nt_samples_batch_size=int(self.config["nt_samples_batch_size"]),
                              stdevs=float(self.config["stdev"]),
                              abs=bool(self.config["abs"]))
        return Output(attr)


class _ReluRule(_Gradient):
    """Methods that act through hooks on ReLU modules: run on unique_relus(model)."""

    max_pools: bool = False
    handled: tuple[type[nn.Module], ...] = (nn.ReLU, *surgery.MAX_POOLS)
    handled_functions: tuple = tuple(surgery.MAX_POOL_FUNCTIONS)
    rule = " (max-pools pass the gradient of the selected input)"

    def setup(self) -> None:
        self.net = surgery.unique_relus(self.model, max_pools=self.max_pools, method=self.name)
        surgery.require_supported(self.net, self.name, self.handled, self.handled_functions,
                                  self.rule)


@register
class GuidedBackprop(_ReluRule):
    """``guided-backprop``: the gradient of the target logit with every ReLU's backward
    pass keeping only positive gradients where its input was positive (Springenberg et al.;
    Captum ``GuidedBackprop``).

    No options. Shapes: x (B, *in) -> (B, *in). Runs on one ``nn.ReLU`` module per ReLU use
    (functional ReLUs included). Max-pools pass the gradient to the selected input (the
    method's own rule). Other non-linear layers (LeakyReLU, clamp, ...) are refused.
    """

    name = "guided-backprop"
    summary = "guided backpropagation of the target logit (Captum GuidedBackprop)"

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        return Output(self._attr(self._captum().GuidedBackprop(self.net), x, target))


@register
class Deconvolution(_ReluRule):
    """``deconvolution``: the target logit's gradient passed backwards through ReLUs as
    ReLU(gradient), ignoring the forward mask (Zeiler & Fergus; Captum ``Deconvolution``).

    No options. Shapes: x (B, *in) -> (B, *in). Same model preparation and refusals as
    ``guided-backprop``.
    """

    name = "deconvolution"
    summary = "deconvnet backward pass of the target logit (Captum Deconvolution)"

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        return Output(self._attr(self._captum().Deconvolution(self.net), x, target))


@register
class DeepLift(_ReluRule):
    """``deeplift``: DeepLift (rescale rule for ReLU, Captum's max-pool rule) of the target
    logit against a baseline (Captum ``DeepLift``, multiplied by x - baseline).

    Options:
        baseline: a float, every pixel (default 0.0: a black image, the [0, 1] background).

    Shapes: x (B, *in) -> (B, *in); DeepLift aims at sum(attribution) = f_c(x) -
    f_c(baseline) (completeness); ``info["delta"]`` (B,) is Captum's error of it. Captum's
    max-pool rule does not conserve: the gap is ~1e-2 on the tests' tiny CNN and 0.1-0.4
    logits on the demo CNN, even in float64, against ~1e-16 with average pooling (a
    limitation of the library's rule, reported, not corrected here).

    Runs on one module per ReLU *and* per max-pool use (DeepLift's hooks keep one input per
    module; functional ``F.max_pool2d`` with constant arguments becomes an
    ``nn.MaxPool2d``). Other non-linear layers are refused, except the few Captum also has a
    rule for (LeakyReLU, ELU, Sigmoid, Tanh,
    Softplus, Softmax modules).
    """

    name = "deeplift"
    summary = "DeepLift rescale rule of the target logit from a baseline (Captum)"
    options = {"baseline": 0.0}
    max_pools = True
    handled = (nn.ReLU, *surgery.MAX_POOLS, nn.LeakyReLU, nn.ELU, nn.Sigmoid, nn.Tanh,
               nn.Softplus, nn.Softmax)
    handled_functions = ()
    rule = ""

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        method = self._captum().DeepLift(self.net)
        attr, delta = self._attr(method, x, target, baselines=float(self.config["baseline"]),
                                 return_convergence_delta=True)
        return Output(attr, info={"delta": delta.detach().reshape(-1)})
