"""Class-activation-map methods behind the explainer interface.

``gradcam`` and ``guided-gradcam`` (Captum) work on the last ``nn.Conv2d`` module in forward
execution order; ``cam`` (Zhou et al., computed here: Captum has no CAM) needs a
global-average-pool head. All attribute the target **logit** and are batched. The coarse
maps are upsampled bilinearly to the input's H, W and repeated over its channels, so every
attribution is (B, *input_shape) with input_shape = (C, H, W).
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from openbox.explainers import surgery
from openbox.explainers.base import Explainer, Output, UnsupportedModelError, register, require


def _image_shape(ex: Explainer) -> None:
    if len(ex.input_shape) != 3:
        raise UnsupportedModelError(
            f"{ex.name}: needs image inputs of shape (C, H, W), got input_shape "
            f"{ex.input_shape}")


class _LastConv(Explainer):
    def _layer(self, model) -> tuple[str, torch.nn.Module]:
        _image_shape(self)
        path, layer = surgery.last_conv_layer(model, self.input_shape, method=self.name)
        calls = surgery.conv_calls(model, self.input_shape).count(path)
        if calls > 1:
            raise UnsupportedModelError(
                f"{self.name}: the last convolution {path!r} (Conv2d) is called {calls} times "
                "in forward; Grad-CAM reads one feature map per layer, so it needs a conv "
                "module used once")
        return path, layer


@register
class GradCAM(_LastConv):
    """``gradcam``: ReLU(sum_k alpha_k A_k), alpha_k = mean over h, w of d f_c / d A_k, with A
    (B, K, h, w) the output of the last ``nn.Conv2d`` in execution order (Captum
    ``LayerGradCam``, ``relu_attributions=True``), upsampled bilinearly to (H, W).

    No options. Shapes: x (B, C, H, W) -> (B, C, H, W) (the map repeated over C). The logit
    is attributed. A is the convolution's own output (before any batch-norm / ReLU after
    it). ``info["layer"]``: the layer's path. The (h, w) map of a 28x28 input after two
    2x2 pools is 7x7, so the upsampled map is blurry at the pixel level by design.
    """

    name = "gradcam"
    summary = "Grad-CAM of the target logit on the last conv layer (Captum LayerGradCam)"

    def setup(self) -> None:
        self.layer_path, self.layer = self._layer(self.model)

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        captum = require("captum.attr", self.name)
        method = captum.LayerGradCam(self.model, self.layer)
        maps = method.attribute(x, target=target, relu_attributions=True)
        maps = captum.LayerAttribution.interpolate(maps, tuple(x.shape[2:]),
                                                   interpolate_mode="bilinear")
        return Output(maps.expand_as(x), info={"layer": self.layer_path})


@register
class GuidedGradCAM(_LastConv):
    """``guided-gradcam``: guided backprop times the upsampled Grad-CAM map (Captum
    ``GuidedGradCam``, bilinear upsampling), on the last ``nn.Conv2d``.

    No options. Shapes: x (B, C, H, W) -> (B, C, H, W). Runs on
    :func:`~openbox.explainers.surgery.unique_relus` of the model (guided backprop needs one
    ``nn.ReLU`` module per use); the logit is attributed; non-linear layers other than ReLU
    and max-pool are refused as for ``guided-backprop``.
    """

    name = "guided-gradcam"
    summary = "guided backprop times Grad-CAM of the target logit (Captum GuidedGradCam)"

    def setup(self) -> None:
        self.net = surgery.unique_relus(self.model, method=self.name)
        surgery.require_supported(
            self.net, self.name, (torch.nn.ReLU, *surgery.MAX_POOLS),
            tuple(surgery.MAX_POOL_FUNCTIONS),
            " (max-pools pass the gradient of the selected input)")
        self.layer_path, self.layer = self._layer(self.net)

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        captum = require("captum.attr", self.name)
        method = captum.GuidedGradCam(self.net, self.layer)
        x = x.detach().clone().requires_grad_(True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Setting backward hooks")
            attr = method.attribute(x, target=target, interpolate_mode="bilinear")
        return Output(attr, info={"layer": self.layer_path})


@register
class CAM(Explainer):
    """``cam``: the class activation map sum_k w[c, k] A_k (Zhou et al. 2016), upsampled
    bilinearly to (H, W).

    The model must end, in execution order, with feature maps A (B, K, h, w) ->
    ``AdaptiveAvgPool2d(1)`` (or a mean over H, W) -> Flatten -> one ``nn.Linear`` (weight
    w (C, K)); otherwise construction raises UnsupportedModelError saying so and what the
    model ends with. Then logit_c = mean_hw(CAM_c) + b_c: the map is the logit's spatial
    decomposition (bias excluded), not clipped at 0.

    No options. Shapes: x (B, C_in, H, W) -> (B, C_in, H, W) (the map repeated over C_in).
    """

    name = "cam"
    summary = "class activation map of a global-average-pool head (w_c . feature maps)"

    def setup(self) -> None:
        _image_shape(self)
        self.features, self.linear = surgery.gap_head(self.model, self.name)

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        with torch.no_grad():
            a = self.features(x)                                 # (B, K, h, w)
            w = self.linear.weight[target]                       # (B, K)
            if a.dim() != 4 or a.shape[1] != w.shape[1]:
                raise UnsupportedModelError(
                    f"{self.name}: the pooled features must be (B, K, h, w) with K = "
                    f"{w.shape[1]} (the Linear's inputs), got {tuple(a.shape)}")
            maps = torch.einsum("bk,bkhw->bhw", w, a).unsqueeze(1)
            maps = surgery.upsample(maps, x.shape[2:])
        return Output(maps.expand_as(x))
