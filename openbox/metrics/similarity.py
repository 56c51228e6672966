"""Similarity of two batches of attribution maps: cosine and Spearman rank correlation.

Both flatten each map (everything after the batch dimension), compute in float64 and return
a (B,) float64 tensor. Neither ever returns NaN: where the measure is undefined (a map that
is all zeros for cosine, a constant map for Spearman) they raise ValueError naming the
inputs, unless the caller names the value to use instead (``zero=`` / ``constant=``), and
then that value is what those entries hold.
"""

from __future__ import annotations

import torch
from torch import Tensor

from openbox.metrics._common import check_pair


def cosine(a: Tensor, b: Tensor, *, zero: float | None = None) -> Tensor:
    """Cosine similarity of flattened maps.

    cos_b = <a_b, b_b> / (||a_b||_2 ||b_b||_2), each map flattened to a vector.

    Args:
        a, b: (B, ...) finite floating tensors of the same shape.
        zero: the value for an entry where a_b or b_b is all zeros (the cosine is 0 / 0
            there). None (the default): raise ValueError naming those inputs.

    Returns:
        (B,) float64 in [-1, 1] (clamped: rounding can push |cos| a few ulp past 1).
    """
    a, b = check_pair(a, b)
    a = a.reshape(a.shape[0], -1).double()
    b = b.reshape(b.shape[0], -1).double()
    # scale each map by its largest |entry| first: the norms of tiny (or huge) maps
    # underflow (overflow) otherwise
    ma, mb = a.abs().amax(1), b.abs().amax(1)
    bad = (ma == 0) | (mb == 0)
    if bool(bad.any()) and zero is None:
        raise ValueError(
            f"cosine is undefined for all-zero maps: inputs {bad.nonzero().flatten().tolist()[:10]}"
            " (pass zero=<value> to give them a value)"
        )
    a = a / torch.where(bad, 1.0, ma).unsqueeze(1)
    b = b / torch.where(bad, 1.0, mb).unsqueeze(1)
    na = torch.where(bad, 1.0, a.norm(dim=1)).unsqueeze(1)
    nb = torch.where(bad, 1.0, b.norm(dim=1)).unsqueeze(1)
    cos = ((a / na) * (b / nb)).sum(1).clamp(-1.0, 1.0)
    if bool(bad.any()):
        cos = torch.where(bad, torch.as_tensor(float(zero), dtype=cos.dtype), cos)
    return cos


def rank(a: Tensor) -> Tensor:
    """Ranks 1..D of each row of a (B, D), ties given their average rank (as
    ``scipy.stats.rankdata(method="average")``). Returns float64 (B, D)."""
    a = a.double()
    batch, d = a.shape
    s, order = torch.sort(a, dim=1, stable=True)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    group = new.long().cumsum(1) - 1                                    # (B, D) 0-based tie group
    pos = torch.arange(1, d + 1, dtype=torch.float64, device=a.device).expand(batch, d)
    total = torch.zeros_like(s).scatter_add_(1, group, pos)
    count = torch.zeros_like(s).scatter_add_(1, group, torch.ones_like(s))
    avg = (total / count.clamp(min=1)).gather(1, group)                 # rank of each sorted entry
    return torch.empty_like(s).scatter_(1, order, avg)


def spearman(a: Tensor, b: Tensor, *, constant: float | None = None) -> Tensor:
    """Spearman rank correlation of flattened maps.

    rho_b = Pearson correlation of rank(a_b) and rank(b_b), ranks 1..D with ties given
    their average rank (``scipy.stats.spearmanr``'s definition).

    Args:
        a, b: (B, ...) finite floating tensors of the same shape, at least 2 elements a map.
        constant: the value for an entry where a_b or b_b is constant (its ranks have zero
            variance and rho is 0 / 0). None (the default): raise ValueError naming them.

    Returns:
        (B,) float64 in [-1, 1].
    """
    a, b = check_pair(a, b)
    ra = rank(a.reshape(a.shape[0], -1))
    rb = rank(b.reshape(b.shape[0], -1))
    if ra.shape[1] < 2:
        raise ValueError("spearman needs maps of at least 2 elements")
    ra = ra - ra.mean(1, keepdim=True)
    rb = rb - rb.mean(1, keepdim=True)
    na, nb = ra.norm(dim=1), rb.norm(dim=1)
    bad = (na == 0) | (nb == 0)
    if bool(bad.any()) and constant is None:
        raise ValueError(
            "spearman is undefined for constant maps: inputs "
            f"{bad.nonzero().flatten().tolist()[:10]} (pass constant=<value> to give them a value)"
        )
    rho = ((ra * rb).sum(1) / torch.where(bad, 1.0, na * nb)).clamp(-1.0, 1.0)
    if bool(bad.any()):
        rho = torch.where(bad, torch.as_tensor(float(constant), dtype=rho.dtype), rho)
    return rho
