"""Stability of an explainer: across its own seeds, and across nearby inputs (consistency).

Both compare attribution maps by :func:`openbox.metrics.similarity.cosine`, which raises
on an all-zero map unless ``zero=`` names the value to use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from openbox.engine import OpenBox
from openbox.explainers.base import Explainer
from openbox.metrics._common import generator
from openbox.metrics.similarity import cosine


def _check_explainer(explainer) -> Explainer:
    if not isinstance(explainer, Explainer):
        raise TypeError(f"explainer must be an openbox.explainers.Explainer, got "
                        f"{type(explainer).__name__}")
    return explainer


def seed_stability(explainer: Explainer, x: Tensor, target, seeds: Sequence[int] = (0, 1),
                   *, zero: float | None = None) -> Tensor:
    """Cosine between two runs of the method with different seeds.

    s_b = cos(Phi_{seed0}(x_b), Phi_{seed1}(x_b)), Phi_s = ``explainer.explain(x, target,
    seed=s).attribution``.

    For a deterministic method (``explainer.stochastic`` False) this is 1 (to rounding):
    it is still computed, so it checks that the method really is deterministic.

    Args:
        explainer: the method.
        x: (B, *input_shape) inputs; target: an int or (B,) classes.
        seeds: two different non-negative ints.
        zero: passed to :func:`cosine` (value for an all-zero map; default: raise).

    Returns:
        (B,) float64.
    """
    explainer = _check_explainer(explainer)
    seeds = tuple(seeds)
    if len(seeds) != 2 or seeds[0] == seeds[1]:
        raise ValueError(f"seeds must be two different ints, got {seeds!r}")
    for s in seeds:
        generator(s)                                       # validates the seed
    a = explainer.explain(x, target, seed=seeds[0]).attribution
    b = explainer.explain(x, target, seed=seeds[1]).attribution
    return cosine(a, b, zero=zero)


@dataclass(frozen=True, eq=False)
class Consistency:
    """What :func:`consistency` returns (B inputs).

    Attributes:
        neighbour_index: (B,) int64 index into ``reference`` of each input's nearest neighbour.
        neighbour_distance: (B,) its L2 distance in pixel space.
        neighbour_cosine: (B,) cos(Phi(x_b), Phi(reference[j_b])), same target.
        noise_cosine: (B,) cos(Phi(x_b), Phi(x_b + noise * eps_b)).
        same_region_neighbour: (B,) bool, the neighbour lies in x_b's closed region (for
            explainers with an ``openbox`` attribute, i.e. openbox's own methods), else None.
        same_region_noise: (B,) bool, likewise for the noisy copy, else None.
    """

    neighbour_index: Tensor
    neighbour_distance: Tensor
    neighbour_cosine: Tensor
    noise_cosine: Tensor
    same_region_neighbour: Tensor | None
    same_region_noise: Tensor | None


def nearest_neighbours(x: Tensor, reference: Tensor, k: int = 1) -> tuple[Tensor, Tensor]:
    """The k nearest entries of ``reference`` (N, *in) to each x[b] (B, *in), by L2 in pixel
    space, excluding exact copies of x[b] (distance 0 and equal): (distance (B, k) float64,
    index (B, k) int64), nearest first, ties to the lowest index.

    Distances are computed directly (not by the matrix-product shortcut), exact enough to
    rank near ties, and 0 only for copies (or differences that underflow when squared,
    which are checked with ``torch.equal``). ValueError when an input has fewer than k
    entries that are not its copies.
    """
    flat_x = x.reshape(x.shape[0], -1).double()
    flat_r = reference.reshape(reference.shape[0], -1).double()
    dist = torch.cdist(flat_x, flat_r, compute_mode="donot_use_mm_for_euclid_dist")   # (B, N)
    for b, j in (dist == 0).nonzero().tolist():
        if torch.equal(x[b], reference[j]):
            dist[b, j] = float("inf")
    short = (~torch.isinf(dist)).sum(1) < k
    if bool(short.any()):
        bad = short.nonzero().flatten().tolist()
        what = "nothing but copies" if k == 1 else f"fewer than {k} entries besides copies"
        raise ValueError(f"reference holds {what} of inputs {bad[:10]}: they have no "
                         f"neighbour{'s' * (k > 1)}")
    distance, index = torch.sort(dist, dim=1, stable=True)
    return distance[:, :k], index[:, :k]


def consistency(explainer: Explainer, x: Tensor, target, reference: Tensor, *,
                noise: float = 1e-3, seed: int = 0, clip: tuple[float, float] | None = None,
                zero: float | None = None) -> Consistency:
    """Do nearby inputs get similar explanations?

    Nearest neighbour: j_b = argmin_j ||reference[j] - x_b||_2 (flattened, pixel space) over
    the reference entries that are not exact copies of x_b (distance 0 is excluded, so a test
    image taken from the reference set is not its own neighbour; ties: the lowest index).
    Noisy copy: x~_b = x_b + noise * eps_b, eps ~ N(0, I) from a torch.Generator seeded with
    ``seed``, *not* clipped unless ``clip = (lo, hi)`` is given. Every map is computed for
    the same target c_b, with the explainer's own seed (one per call), so a stochastic method
    is compared at equal randomness.

        neighbour_cosine[b] = cos(Phi(x_b), Phi(reference[j_b]))
        noise_cosine[b] = cos(Phi(x_b), Phi(x~_b))

    For an explainer with an ``openbox`` (an :class:`~openbox.OpenBox`: ``openbox``,
    ``openbox-ig``): same_region_*[b] = ``explainer.openbox.polytope(x_b).contains(y)``,
    whether y lies in x_b's closed region (within the polytope's slack tolerance).

    Args:
        explainer: the method.
        x: (B, *input_shape); target: an int or (B,) classes.
        reference: (N, *input_shape) the candidate neighbours (e.g. a training set).
        noise: standard deviation of the noisy copy (> 0).
        seed: seed of the noise.
        clip: optional (lo, hi) box the noisy copy is clamped to.
        zero: passed to :func:`cosine`.

    Returns:
        a :class:`Consistency`.

    Raises:
        ValueError: bad shapes or targets; no reference entry other than copies of x_b.
    """
    explainer = _check_explainer(explainer)
    x = explainer.check_input(x)
    reference = explainer.check_input(reference, "reference")
    target = explainer.check_target(target, x.shape[0])
    if not noise > 0 or noise == float("inf"):
        raise ValueError(f"noise must be a positive float, got {noise!r}")
    if clip is not None and (len(clip) != 2 or not float(clip[0]) <= float(clip[1])):
        raise ValueError(f"clip must be None or (lo, hi) with lo <= hi, got {clip!r}")
    distance, index = (t[:, 0] for t in nearest_neighbours(x, reference))
    nb = reference[index]
    g = generator(seed, x.device)
    noisy = x + noise * torch.randn(x.shape, generator=g, dtype=x.dtype, device=x.device)
    if clip is not None:
        noisy = noisy.clamp(float(clip[0]), float(clip[1]))
    batch = x.shape[0]
    # three calls, so that input b gets the same seed in each (one-by-one methods use
    # seed + b for input b)
    phi_x, phi_nb, phi_noisy = (explainer.explain(v, target).attribution for v in (x, nb, noisy))
    same_nb = same_noise = None
    ob = getattr(explainer, "openbox", None)
    if isinstance(ob, OpenBox):
        same_nb = torch.empty(batch, dtype=torch.bool)
        same_noise = torch.empty(batch, dtype=torch.bool)
        for b in range(batch):
            poly = ob.polytope(x[b])
            same_nb[b] = bool(poly.contains(nb[b]))
            same_noise[b] = bool(poly.contains(noisy[b]))
    return Consistency(index, distance.to(x.dtype), cosine(phi_x, phi_nb, zero=zero),
                       cosine(phi_x, phi_noisy, zero=zero), same_nb, same_noise)
