"""``lrp``: layer-wise relevance propagation with the epsilon rule (Captum's ``LRP``).

The model copy is first canonized (:func:`openbox.explainers.canonize.lrp_graph`): each
batch-norm folded into the Linear / Conv before it, each call of a layer its own module,
functional relu / pools as modules, Flatten / view as functions. Captum then propagates the
target logit back through that graph.
"""

from __future__ import annotations

import torch
from torch import Tensor

from linearize.tolerances import within
from openbox.explainers.base import Explainer, ExplainerError, Output, register, require
from openbox.explainers.canonize import BN_RULE_LAYERS, RULE_LAYERS, lrp_graph


@register
class LRP(Explainer):
    """``lrp``: LRP-epsilon relevance of every input feature for the target logit (Captum).

    Rules, layer by layer from the output (z: the layer's output, x: its input, R: relevance,
    starting from R = f_target(x) at the logits):

    - Linear, Conv{1,2,3}d (batch-norms folded in), AvgPool / AdaptiveAvgPool{1,2,3}d:
      EpsilonRule, ``R_in = x * J^T (R_out / (z + epsilon * sign(z)))``
      (``sign(0) = 1``; J the layer's Jacobian, biases included in z, so a bias absorbs
      relevance). This is Captum's default rule for its supported types; the explainer sets it
      on every such layer with the one ``epsilon`` option (also on Conv1d/3d and 1d/3d pools,
      which Captum's default table lacks).
    - MaxPool{1,2,3}d: the same EpsilonRule (Captum's default): the relevance of a window goes
      to its maximum entry (winner takes all), scaled by ``x_max / (x_max + epsilon)``.
    - ReLU: relevance passes through unchanged (Captum's rule for its non-linear layers).
    - Flatten / view / reshape: relevance is reshaped.

    With zero biases and epsilon -> 0 the relevance is conserved:
    ``sum(attribution) = f_target(x)``.

    Options:
        epsilon: the stabiliser of every rule layer (default 1e-9, Captum's
            ``EpsilonRule`` default; larger values absorb more relevance and give sparser,
            less noisy maps).
        keep_unfoldable_bn: a batch-norm that does not directly follow a Linear / Conv (after a
            ReLU, at the input) cannot be folded; by default the explainer then raises
            :class:`~openbox.explainers.base.UnsupportedModelError` naming each such
            batch-norm. With True they are kept as per-channel affine layers under the same
            EpsilonRule (Captum's default for BatchNorm2d).

    ``attribution``: (B, *input_shape) relevances, summing to the target logit minus what the
    biases and epsilon absorbed. ``info["delta"]``: (B,) that difference,
    ``f_target(x) - sum(attribution)`` (Captum's convergence delta). No local model.
    Batched: the whole batch goes through Captum in one call.
    """

    name = "lrp"
    summary = "layer-wise relevance propagation, epsilon rule (Captum)"
    options = {"epsilon": 1e-9, "keep_unfoldable_bn": False}

    def setup(self) -> None:
        eps = self.config["epsilon"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ValueError(f"{self.name}: epsilon must be a positive float, got {eps!r}")
        attr = require("captum.attr", self.name)
        rules = require("captum.attr._utils.lrp_rules", self.name)
        self._epsilon_rule = rules.EpsilonRule
        self.lrp_model = lrp_graph(self.model, method=self.name,
                                   keep_unfoldable_bn=bool(self.config["keep_unfoldable_bn"]))
        for p in self.lrp_model.parameters():
            p.requires_grad_(False)
        self._check_canonized()
        self._rule_layers = [m for m in self.lrp_model.modules()
                             if isinstance(m, RULE_LAYERS + BN_RULE_LAYERS)]
        self._lrp = attr.LRP(self.lrp_model)

    def _check_canonized(self) -> None:
        """The canonized copy must compute the model's function (to the compiler's exactness
        bound of the dtype) on a seeded random batch of 2 inputs in [0, 1]."""
        g = torch.Generator().manual_seed(0)
        x = torch.rand(2, *self.input_shape, generator=g).to(dtype=self.dtype,
                                                              device=self.device)
        with torch.no_grad():
            want, got = self.model(x), self.lrp_model(x)
        if got.shape != want.shape or not bool(within(got, want).all()):
            err = (got - want).abs().max().item() if got.shape == want.shape else got.shape
            raise ExplainerError(
                f"{self.name}: the canonized model (batch-norms folded) differs from the model "
                f"by {err} on random inputs; expected the same outputs to rounding"
            )

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        # Captum deletes every layer's ``rule`` after each call: attach them again.
        for m in self._rule_layers:
            m.rule = self._epsilon_rule(epsilon=float(self.config["epsilon"]))
        try:
            with torch.enable_grad():
                relevance, delta = self._lrp.attribute(x.clone().requires_grad_(),
                                                       target=target,
                                                       return_convergence_delta=True)
        except (RuntimeError, TypeError) as err:
            raise ExplainerError(f"{self.name}: Captum's LRP failed: {err}") from err
        finally:
            for m in self._rule_layers:  # Captum keeps each layer's last input otherwise
                m.__dict__.pop("activations", None)
        return Output(relevance.detach(), info={"delta": delta.detach().reshape(-1)})
