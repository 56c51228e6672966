"""``lime``: the original ``lime`` package (Ribeiro et al., 2016) in the OpenBox paper's setting.

Chu et al. (KDD 2018) compare OpenBox with LIME on Fashion-MNIST with every pixel its own
interpretable feature, so that LIME's linear surrogate has one coefficient per pixel, like
W_x. This adapter runs ``lime.lime_image.LimeImageExplainer`` exactly so:

- ``feature_selection='none'`` (every feature kept), ``num_features = d``;
- the segmentation maps pixel (i, j) to segment ``i * W + j`` (d = H * W segments);
- ``hide_color = 0``: a "removed" pixel is black, so sample z in {0, 1}^d is the image
  ``x * z``;
- ``num_samples = d + 2`` (786 for 28x28): one more sample than unknowns of the surrogate;
- a single-channel image is expanded to 3 channels for lime, and the model sees channel 0;
- only the target label is explained: lime 0.2.0.1 keeps one ``local_pred`` / ``score``
  per call and overwrites them for every label it explains.

lime fits a ridge regression (alpha = 1) of P(target | x * z) on z, weighted by the kernel
``sqrt(exp(-D^2 / 0.25^2))`` of the cosine distance D between z and the all-ones vector.
The attribution is the per-pixel coefficient; ``probability`` is the surrogate's prediction at
x itself (z = 1), lime's ``local_pred``.

Reading a pixel-space input x' through the surrogate (``Surrogate.predict``): z_i = x'_i / x_i
where x_i > 0, and z_i = 1 where x_i = 0 (a black pixel is the same image whether "kept" or
"removed", so lime's coefficient there is fitted on noise: a property of LIME on images with a
black background, not of this adapter). ``Surrogate.samples`` holds lime's own samples:
``features`` the z vectors, ``inputs`` = x * z, ``model`` the model's probabilities lime fitted
to, ``weights`` the kernel weights and ``surrogate`` the ridge's prediction at each.
"""

from __future__ import annotations

import contextlib
import io
import sys

import numpy as np
import torch
from torch import Tensor

from openbox.explainers.base import (
    Explainer,
    ExplainerError,
    Output,
    Surrogate,
    SurrogateSamples,
    UnsupportedModelError,
    register,
    require,
)


@register
class Lime(Explainer):
    """``lime``: lime's ``LimeImageExplainer`` with one feature per pixel (the OpenBox paper).

    Options:
        num_samples: perturbed samples per explanation (default None: d + 2, the paper's).
        batch_size: samples per model call inside lime (default 256; lime's own default of
            10 makes it several times slower without changing the result).
        kernel_width: lime's kernel width on the cosine distance (default 0.25, lime's).
        keep_samples: keep lime's own samples in ``surrogates[b].samples`` (default True;
            d + 2 samples of d pixels in float64 twice, ~10 MB per 28x28 image: pass False
            for large batches when the own-sample error is not wanted).

    The seed is lime's ``random_state`` (the z samples); input b of a batch uses seed + b.
    ``info["score"]`` (B,): the surrogate's weighted R^2 on its samples (lime's ``score``).
    """

    name = "lime"
    summary = "lime package, one feature per pixel, d + 2 samples (the OpenBox paper's LIME)"
    stochastic = True
    batched = False
    local_model = True
    options = {"num_samples": None, "batch_size": 256, "kernel_width": 0.25,
               "keep_samples": True}

    def setup(self) -> None:
        if len(self.input_shape) != 3 or self.input_shape[0] not in (1, 3):
            raise UnsupportedModelError(
                f"lime explains images of shape (1, H, W) or (3, H, W); this input shape is "
                f"{self.input_shape}"
            )
        c, h, w = self.input_shape
        self.pixels = h * w
        n = self.config["num_samples"]
        self.num_samples = self.pixels + 2 if n is None else int(n)
        if self.num_samples < 2:
            raise ValueError(f"lime: num_samples must be at least 2, got {n}")

    def _classifier(self, images: np.ndarray) -> np.ndarray:
        """lime's classifier_fn: (N, H, W, 3) float images -> (N, C) probabilities."""
        t = torch.from_numpy(np.ascontiguousarray(images)).to(self.dtype)
        t = t[..., :1] if self.input_shape[0] == 1 else t
        return self.probabilities(t.permute(0, 3, 1, 2).to(self.device)).cpu().double().numpy()

    def _attribute(self, x: Tensor, target: Tensor, seed: int) -> Output:
        lime_image = require("lime.lime_image", self.name)
        c, h, w = self.input_shape
        label = int(target[0])
        image = x[0].permute(1, 2, 0).cpu().double().numpy()
        if c == 1:
            image = np.repeat(image, 3, axis=2)
        segments = np.arange(self.pixels).reshape(h, w)
        explainer = lime_image.LimeImageExplainer(
            kernel_width=self.config["kernel_width"], feature_selection="none",
            random_state=seed,
        )
        seen = {}
        fit = explainer.base.explain_instance_with_data

        def record(data, labels, distances, *args, **kwargs):
            seen.update(data=data, labels=labels, distances=distances)
            return fit(data, labels, distances, *args, **kwargs)

        explainer.base.explain_instance_with_data = record   # this instance only
        with _quiet_stderr():
            exp = explainer.explain_instance(
                image, self._classifier, labels=(label,), hide_color=0, top_labels=None,
                num_features=self.pixels, num_samples=self.num_samples,
                batch_size=self.config["batch_size"], segmentation_fn=lambda _: segments,
                random_seed=seed,
            )
        coef = np.zeros(self.pixels)
        for feature, value in exp.local_exp[label]:
            coef[feature] = value
        intercept = float(exp.intercept[label])
        local_pred = float(np.asarray(exp.local_pred).reshape(-1)[0])
        if not np.isclose(local_pred, intercept + coef.sum(), rtol=1e-9, atol=1e-12):
            raise ExplainerError(
                f"lime: local_pred {local_pred} is not the surrogate at x "
                f"({intercept + coef.sum()}): the lime package behaves unlike 0.2.0.1"
            )
        z = torch.from_numpy(seen["data"].astype(np.float64))
        weights = torch.from_numpy(explainer.base.kernel_fn(seen["distances"]))
        model_p = torch.from_numpy(seen["labels"][:, label].astype(np.float64))
        coef_t = torch.from_numpy(coef)
        xs = x[0].cpu().double()
        samples = SurrogateSamples(
            inputs=(xs.reshape(c, -1) * z[:, None, :]).reshape(-1, c, h, w).to(x.dtype),
            model=model_p, surrogate=intercept + z @ coef_t, features=z, weights=weights,
        )
        surrogate = Surrogate(_pixel_predict(xs, coef_t, intercept),
                              samples if self.config["keep_samples"] else None)
        attribution = coef_t.to(x.dtype).reshape(1, 1, h, w).expand(1, c, h, w).clone()
        return Output(attribution.to(x.device), torch.tensor([local_pred], dtype=x.dtype),
                      [surrogate], {"score": torch.tensor([float(exp.score)])})


def _pixel_predict(x: Tensor, coef: Tensor, intercept: float):
    """x' (N, C, H, W) -> (N,) lime's surrogate read through z_i = x'_i / x_i (1 where x_i = 0;
    channel 0 of a 3-channel image)."""
    base = x[0].reshape(-1)
    kept = base > 0

    def predict(xs: Tensor) -> Tensor:
        xs = torch.as_tensor(xs).detach().cpu().double()[:, 0].reshape(xs.shape[0], -1)
        z = torch.ones_like(xs)
        z[:, kept] = xs[:, kept] / base[kept]
        return intercept + z @ coef

    return predict


@contextlib.contextmanager
def _quiet_stderr():
    """Swallow lime 0.2.0.1's per-call tqdm bar (it has no switch) but pass on any other
    stderr output (warnings) once the call is over."""
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        yield
    kept = [line for line in buffer.getvalue().replace("\r", "\n").split("\n")
            if line.strip() and "it/s" not in line and "s/it" not in line and "%|" not in line]
    if kept:
        sys.stderr.write("\n".join(kept) + "\n")
