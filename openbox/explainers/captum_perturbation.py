"""Captum's perturbation methods behind the explainer interface.

- ``lime-patches``: Captum ``Lime`` on square patches (2x2: 196 features for 28x28).
- ``kernelshap``: Captum ``KernelShap`` on the same patches.
- ``occlusion``: Captum ``Occlusion`` with a 4x4 window, stride 2.

The two surrogate methods model the target's softmax **probability** (the forward is wrapped
in a softmax), so their ``probability`` and ``surrogates`` estimate P(target | x'); they run
one input at a time (``batched = False``: Captum fits one linear model per input anyway).
Occlusion attributes the **logit**. Inputs must be images (C, H, W); a patch covers all
channels.

Interpretable features: feature f of an input x is patch f "kept" (1: its pixels as in x)
or "removed" (0: its pixels at the baseline 0). A pixel-space x' is read back into these
features, for ``Surrogate.predict``, as z_f(x') = mean over the patch's pixels with x != 0 of
x'/x (exactly Captum's binary vector on Captum's own samples), and z_f = 1 for a patch that
is all zero in x (removing it changes nothing).

Captum is imported inside the methods (``require("captum.attr", name)``).
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor

from openbox.explainers import surgery
from openbox.explainers.base import (
    Explainer,
    Output,
    Surrogate,
    SurrogateSamples,
    UnsupportedModelError,
    register,
    require,
)


def patch_mask(input_shape, patch: int) -> Tensor:
    """(1, 1, H, W) int64 feature index of each pixel for input_shape (C, H, W): row-major
    patch x patch squares (edge patches smaller when patch does not divide H, W)."""
    _, h, w = input_shape
    cols = math.ceil(w / patch)
    rows = torch.arange(h) // patch
    idx = rows[:, None] * cols + (torch.arange(w) // patch)[None, :]
    return idx[None, None]


def patch_features(xs: Tensor, x: Tensor, mask: Tensor, n_features: int) -> Tensor:
    """Read inputs xs (N, C, H, W) as patch features of x (1, C, H, W): (N, F), z_f = mean
    over patch f's pixels with x != 0 of xs / x; 1 where the patch is all zero in x."""
    full = mask.expand_as(x).reshape(-1)                                # (P,)
    onehot = torch.nn.functional.one_hot(full, n_features).to(xs.dtype)  # (P, F)
    nz = (x.reshape(-1) != 0).to(xs.dtype)                              # (P,)
    safe = torch.where(nz.bool(), x.reshape(-1), torch.ones_like(nz))
    ratio = xs.reshape(xs.shape[0], -1) / safe * nz                     # (N, P)
    count = nz @ onehot                                                 # (F,)
    mean = (ratio @ onehot) / count.clamp_min(1)
    return torch.where(count > 0, mean, torch.ones_like(mean))


class _Recorder:
    """Collects what Captum's LimeBase draws: the interpretable vectors, the similarity
    weights, and the forward's inputs / outputs, to rebuild Captum's own fitted samples."""

    def __init__(self, keep_inputs: bool):
        self.keep_inputs = keep_inputs
        self.features: list[Tensor] = []
        self.weights: list[float] = []
        self.inputs: list[Tensor] = []
        self.outputs: list[Tensor] = []

    def forward(self, fn):
        def wrapped(inp: Tensor) -> Tensor:
            out = fn(inp)
            self.outputs.append(out.detach())
            if self.keep_inputs:
                self.inputs.append(inp.detach())
            return out
        return wrapped

    def similarity(self, fn):
        def wrapped(*args, **kwargs):
            s = fn(*args, **kwargs)
            self.weights.append(float(s))
            return s
        return wrapped

    def generator(self, gen):
        def wrapped(*args, **kwargs):
            for z in gen(*args, **kwargs):
                self.features.append(z.detach())
                yield z
        return wrapped

    def function(self, fn):
        def wrapped(*args, **kwargs):
            z = fn(*args, **kwargs)
            self.features.append(z.detach())
            return z
        return wrapped


class _Patches(Explainer):
    """LIME / KernelSHAP on patch features of one input; subclasses build the Captum object."""

    batched = False
    stochastic = True
    local_model = True

    def setup(self) -> None:
        if len(self.input_shape) != 3:
            raise UnsupportedModelError(f"{self.name}: needs image inputs of shape (C, H, W), "
                                        f"got input_shape {self.input_shape}")
        patch = int(self.config["patch"])
        if patch < 1:
            raise ValueError(f"{self.name}: patch must be a positive int, got {patch}")
        self.mask = patch_mask(self.input_shape, patch).to(self.device)
        self.n_features = int(self.mask.max()) + 1

    def _probabilities(self, inp: Tensor) -> Tensor:
        return torch.softmax(self.model(inp), dim=1)

    def _method(self, captum, rec: _Recorder):
        raise NotImplementedError

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        captum = require("captum.attr", self.name)
        rec = _Recorder(bool(self.config["keep_samples"]))
        method = self._method(captum, rec)
        with surgery.seeded(seed, self.device), torch.no_grad():
            coefs = method.attribute(
                x, target=target, baselines=0.0, feature_mask=self.mask,
                n_samples=int(self.config["n_samples"]),
                perturbations_per_eval=int(self.config["perturbations_per_eval"]),
                return_input_shape=False)
        fitted = method.interpretable_model
        w = torch.as_tensor(coefs).detach().reshape(-1).to(x.dtype).to(x.device)   # (F,)
        bias = fitted.bias()
        b = (torch.zeros((), dtype=x.dtype, device=x.device) if bias is None
             else bias.detach().reshape(()).to(dtype=x.dtype, device=x.device))
        attribution = w[self.mask.expand_as(x)]                            # (1, C, H, W)
        probability = (b + w.sum()).reshape(1)
        c = int(target[0])
        feats = torch.cat(rec.features).to(dtype=x.dtype, device=x.device)   # (N, F)
        model_p = torch.cat(rec.outputs)[:, c].to(x.dtype)                 # (N,)
        weights = torch.tensor(rec.weights, dtype=x.dtype, device=x.device)
        fitted_p = b + feats @ w
        samples = None
        if rec.keep_inputs and len(feats) == len(model_p) == len(weights):
            samples = _samples(inputs=torch.cat(rec.inputs).to(x.dtype), model=model_p,
                               surrogate=fitted_p, features=feats, weights=weights)
        surrogate = Surrogate(_predict(x, self.mask, self.n_features, w, b), samples)
        info = {"coefficients": w[None], "bias": b.reshape(1)}
        info.update(self._info(model_p, fitted_p, weights))
        return Output(attribution, probability, [surrogate], info)

    def _info(self, model_p: Tensor, fitted_p: Tensor, weights: Tensor) -> dict:
        return {}


def _predict(x: Tensor, mask: Tensor, n_features: int, w: Tensor, b: Tensor):
    """x' (N, C, H, W) -> (N,) b + z(x') . w, z the patch features of x' (module docstring)."""

    def predict(xs: Tensor) -> Tensor:
        xs = torch.as_tensor(xs).to(dtype=x.dtype, device=x.device)
        return b + patch_features(xs, x, mask, n_features) @ w

    return predict


def _samples(**fields) -> SurrogateSamples:
    """SurrogateSamples with the fields this version of it has (features / weights are
    newer)."""
    known = {f.name for f in dataclasses.fields(SurrogateSamples)}
    return SurrogateSamples(**{k: v for k, v in fields.items() if k in known})


@register
class LimePatches(_Patches):
    """``lime-patches``: LIME (Captum ``Lime``) on patch features of the target probability.

    Options:
        patch: side of the square patches (default 2: 196 features for 28x28; a pixel per
            feature, Captum's default, would be 784 features for 1000 samples).
        n_samples: perturbed samples per input (default 1000: about 5 per feature; Captum's
            default 50 cannot fit 196 coefficients).
        perturbations_per_eval: samples per forward pass (default 64; Captum's default runs
            one sample per pass).
        alpha: L1 weight of Captum's ``SkLearnLasso`` surrogate (default 0.001: one 2x2
            patch moves a probability by ~1e-3 to 1e-2, and on the packaged 28x28 demo CNN
            Captum's default 0.01 keeps ~22 of 196 patches at weighted R^2 0.2-0.3, 1e-3
            keeps ~157 at R^2 ~0.5, and 1e-4 adds little).
        kernel_width: width of Captum's exponential kernel on the cosine distance between x
            and a sample (default 0.25, the lime package's image default; Captum's 1.0
            weights every sample of a [0, 1] image almost equally).
        keep_samples: keep Captum's samples in ``surrogates[b].samples`` (default False:
            n_samples images per input).

    Baseline 0 (a removed patch is black, the [0, 1] background). Shapes: x (B, C, H, W) ->
    attribution (B, C, H, W), each pixel holding its patch's coefficient. ``probability``
    (B,): the surrogate at x, bias + sum of the coefficients (may leave [0, 1] slightly).
    ``surrogates[b].predict(x')`` is bias + z(x') . coefficients (module docstring for
    z). ``info``: ``coefficients`` (B, F), ``bias`` (B,), ``score`` (B,) the surrogate's
    kernel-weighted R^2 on its samples. Stochastic: input b uses seed + b.
    """

    name = "lime-patches"
    summary = "LIME on 2x2 patches, surrogate of the target probability (Captum Lime)"
    options = {"patch": 2, "n_samples": 1000, "perturbations_per_eval": 64, "alpha": 1e-3,
               "kernel_width": 0.25, "keep_samples": False}

    def _method(self, captum, rec: _Recorder):
        lime = require("captum.attr._core.lime", self.name)
        models = require("captum._utils.models.linear_model", self.name)
        kernel = lime.get_exp_kernel_similarity_function(
            "cosine", kernel_width=float(self.config["kernel_width"]))
        return captum.Lime(rec.forward(self._probabilities),
                           interpretable_model=models.SkLearnLasso(
                               alpha=float(self.config["alpha"])),
                           similarity_func=rec.similarity(kernel),
                           perturb_func=rec.function(lime.default_perturb_func))

    def _info(self, model_p: Tensor, fitted_p: Tensor, weights: Tensor) -> dict:
        mean = (weights * model_p).sum() / weights.sum()
        ss_res = (weights * (model_p - fitted_p) ** 2).sum()
        ss_tot = (weights * (model_p - mean) ** 2).sum()
        score = 1 - ss_res / ss_tot if ss_tot > 0 else torch.ones_like(ss_res)
        return {"score": score.reshape(1)}


@register
class KernelSHAPPatches(_Patches):
    """``kernelshap``: Kernel SHAP (Captum ``KernelShap``) on patch features of the target
    probability.

    Options:
        patch: as ``lime-patches`` (default 2: 196 features for 28x28).
        n_samples: coalitions per input (default 1000: as ``lime-patches``, so both get
            the same model budget; Captum's default 25 is far below 196 features).
        perturbations_per_eval: samples per forward pass (default 64; Captum's: 1).
        keep_samples: as ``lime-patches`` (default False).

    Baseline 0. Captum fits a linear regression with the Shapley kernel and weight 1e6 on
    the all-kept and all-removed coalitions, so ``info["bias"]`` ~ P(target | 0) and
    bias + sum(coefficients) = ``probability`` ~ P(target | x) (Shapley efficiency).
    Shapes and ``surrogates``: as ``lime-patches``; ``info``: ``coefficients`` (B, F),
    ``bias`` (B,). Stochastic: input b uses seed + b.
    """

    name = "kernelshap"
    summary = "Kernel SHAP on 2x2 patches of the target probability (Captum KernelShap)"
    options = {"patch": 2, "n_samples": 1000, "perturbations_per_eval": 64,
               "keep_samples": False}

    def _method(self, captum, rec: _Recorder):
        ks = captum.KernelShap(rec.forward(self._probabilities))
        ks.perturb_func = rec.generator(ks.perturb_func)
        ks.similarity_func = rec.similarity(ks.similarity_func)
        return ks


@register
class Occlusion(Explainer):
    """``occlusion``: the drop of the target logit when a window is set to the baseline,
    averaged over the windows covering each pixel (Captum ``Occlusion``).

    Options:
        window: side of the square window, over all channels (default 4: a stroke-sized
            1/7 of a 28x28 image; a 1-pixel window barely moves a CNN's output).
        stride: window step (default 2: each pixel is covered by up to 4 windows, 13x13
            positions on 28x28).
        baseline: the occluding value (default 0.0: black, the [0, 1] background).
        perturbations_per_eval: windows per input per forward pass (default 64; Captum's
            default 1 runs one window per pass).

    Shapes: x (B, C, H, W) -> (B, C, H, W). Batched and deterministic. The logit is
    attributed (a probability saturates near 1 and hides the drops).
    """

    name = "occlusion"
    summary = "target-logit drop under a sliding 4x4 black window (Captum Occlusion)"
    options = {"window": 4, "stride": 2, "baseline": 0.0, "perturbations_per_eval": 64}

    def setup(self) -> None:
        if len(self.input_shape) != 3:
            raise UnsupportedModelError(f"{self.name}: needs image inputs of shape (C, H, W), "
                                        f"got input_shape {self.input_shape}")

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        captum = require("captum.attr", self.name)
        c = self.input_shape[0]
        k, s = int(self.config["window"]), int(self.config["stride"])
        with torch.no_grad():
            attr = captum.Occlusion(self.model).attribute(
                x, target=target, sliding_window_shapes=(c, k, k), strides=(c, s, s),
                baselines=float(self.config["baseline"]),
                perturbations_per_eval=int(self.config["perturbations_per_eval"]))
        return Output(attr)
