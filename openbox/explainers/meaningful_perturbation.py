"""``meaningful-perturbation``: the deletion game of Fong & Vedaldi (ICCV 2017), compactly.

No well-kept library implements it, so this module does, following the paper: find the
smallest, smoothest region whose deletion destroys the target's score,

    m* = argmin_{m in [0,1]^{k x k}}  l1 * mean|1 - m|  +  tv * TV_beta(m)  +  P(c | phi(x; M))
    M = upsample_bilinear(m) to H x W,      phi(x; M) = M * x + (1 - M) * p(x)

where p(x) is a Gaussian blur of x (``perturbation="blur"``) or a constant image
(``"constant"``), ``TV_beta(m) = mean((d_i m)^2 + (d_j m)^2)^(beta / 2)`` (forward
differences), and P is the model's softmax probability. Optimisation: Adam, a fixed number of
steps from m = 1 (nothing deleted), m clipped to [0, 1] after every step; no randomness (so
the method is deterministic, and a batch gives its inputs' one-by-one results: Adam's update
is element-wise and the masks of a batch are independent). The attribution is 1 - M: how
much of each pixel the game deletes; ``info["deleted_probability"]`` is P(c | phi(x; M)) at
the end (small when the deletion succeeded).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from openbox.explainers.base import Explainer, Output, UnsupportedModelError, register

PERTURBATIONS = ("blur", "constant")


@register
class MeaningfulPerturbation(Explainer):
    """``meaningful-perturbation``: Fong & Vedaldi's deletion mask (see the module docstring).

    Options (defaults for 28 x 28 inputs in [0, 1]):
        mask_size: side k of the optimised mask (default 7: 4 x 4 pixel cells at 28 x 28,
            the paper's 28 x 28 mask at 224 x 224 scaled to the image).
        steps: Adam steps (default 300, the paper's).
        lr: Adam learning rate (default 0.1, the paper's).
        l1: weight of mean|1 - m| (default 0.05).
        tv: weight of the total variation (default 0.2), with exponent tv_beta (default 3,
            the paper's).
        perturbation: ``"blur"`` (default) or ``"constant"``.
        blur_sigma: Gaussian blur sigma in pixels (default 1.5: the paper's 10 px at 224 x 224
            scaled to 28 x 28 is 1.25; 1.5 removes stroke-level detail of Fashion-MNIST).
        value: the constant image's value (default 0.0, black background).
    """

    name = "meaningful-perturbation"
    summary = "Fong & Vedaldi 2017 deletion mask (L1 + TV, Adam, blur perturbation)"
    options = {"mask_size": 7, "steps": 300, "lr": 0.1, "l1": 0.05, "tv": 0.2,
               "tv_beta": 3.0, "perturbation": "blur", "blur_sigma": 1.5, "value": 0.0}

    def setup(self) -> None:
        if len(self.input_shape) != 3:
            raise UnsupportedModelError(
                f"meaningful-perturbation masks images (C, H, W); this input shape is "
                f"{self.input_shape}"
            )
        cfg = self.config
        if cfg["perturbation"] not in PERTURBATIONS:
            raise ValueError(f"meaningful-perturbation: perturbation must be one of "
                             f"{PERTURBATIONS}, got {cfg['perturbation']!r}")
        for key in ("mask_size", "steps"):
            if not isinstance(cfg[key], int) or cfg[key] < 1:
                raise ValueError(f"meaningful-perturbation: {key} must be a positive int, got "
                                 f"{cfg[key]!r}")
        for key in ("lr", "l1", "tv", "tv_beta", "blur_sigma"):
            if not (isinstance(cfg[key], (int, float)) and math.isfinite(cfg[key])
                    and cfg[key] >= 0):
                raise ValueError(f"meaningful-perturbation: {key} must be a finite number >= 0, "
                                 f"got {cfg[key]!r}")

    def perturbed_image(self, x: Tensor) -> Tensor:
        """p(x) (B, C, H, W): the blurred image or the constant one."""
        cfg = self.config
        if cfg["perturbation"] == "constant" or cfg["blur_sigma"] == 0:
            return torch.full_like(x, float(cfg["value"])) if cfg["perturbation"] == "constant" \
                else x.clone()
        return gaussian_blur(x, float(cfg["blur_sigma"]))

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        cfg = self.config
        b, c, h, w = x.shape
        k = cfg["mask_size"]
        rows = torch.arange(b, device=x.device)
        background = self.perturbed_image(x)
        mask = torch.ones(b, 1, k, k, dtype=x.dtype, device=x.device, requires_grad=True)
        opt = torch.optim.Adam([mask], lr=cfg["lr"])

        def upsample(m: Tensor) -> Tensor:
            return F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)

        for _ in range(cfg["steps"]):
            opt.zero_grad()
            big = upsample(mask)
            prob = torch.softmax(self.model(big * x + (1 - big) * background), dim=1)
            per_input = (cfg["l1"] * (1 - mask).abs().flatten(1).mean(1)
                         + cfg["tv"] * total_variation(mask, cfg["tv_beta"])
                         + prob[rows, target])
            per_input.sum().backward()
            opt.step()
            with torch.no_grad():
                mask.clamp_(0.0, 1.0)
        with torch.no_grad():
            big = upsample(mask)
            final = torch.softmax(self.model(big * x + (1 - big) * background), dim=1)
        return Output((1 - big).expand(b, c, h, w).detach().clone(),
                      info={"deleted_probability": final[rows, target].detach()})


def total_variation(m: Tensor, beta: float) -> Tensor:
    """(B, 1, k, k) -> (B,): mean over cells of ((d_i m)^2 + (d_j m)^2)^(beta / 2), with forward
    differences (the last row / column's missing difference counted as 0)."""
    di = F.pad(m[:, :, 1:, :] - m[:, :, :-1, :], (0, 0, 0, 1))
    dj = F.pad(m[:, :, :, 1:] - m[:, :, :, :-1], (0, 1, 0, 0))
    return (di.pow(2) + dj.pow(2)).pow(beta / 2).flatten(1).mean(1)


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """(B, C, H, W) blurred per channel by a separable Gaussian of ``sigma`` pixels (kernel
    2 * ceil(3 sigma) + 1 wide, replicate padding)."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    c = x.shape[1]
    out = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(out, g.reshape(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(out, g.reshape(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)
