"""Window index tables: which input positions a sliding window (conv or pool) reads.

Flattening order is row-major over the per-example shape, i.e. (C, H, W) for 2-D
and (C, L) for 1-D maps; stated here once and used by every table in the package.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

PAD = -1
"""Index used for a window position that falls outside the input (padding)."""


def window_table(
    in_size: Sequence[int],
    out_size: Sequence[int],
    kernel: Sequence[int],
    stride: Sequence[int],
    padding: Sequence[int],
    dilation: Sequence[int],
) -> np.ndarray:
    """Flat spatial input index read by every (output position, kernel offset) pair.

    Output position o and kernel offset k along one dimension read input
    position ``o * stride - padding + k * dilation``; positions outside
    ``[0, in_size)`` are padding and get :data:`PAD`.

    Args:
        in_size, out_size, kernel, stride, padding, dilation: one int per spatial
            dimension; ``padding`` is the padding before the first element (the
            amount after it only matters through ``out_size``).

    Returns:
        int64 array (prod(out_size), prod(kernel)): row-major flat index into the
        spatial input (prod(in_size) positions), or PAD.
    """
    dims = len(in_size)
    if not all(len(v) == dims for v in (out_size, kernel, stride, padding, dilation)):
        raise ValueError("window_table: every argument needs one entry per spatial dimension")
    flat = np.zeros((1, 1), dtype=np.int64)
    valid = np.ones((1, 1), dtype=bool)
    for n, o_n, k_n, s, p, d in zip(in_size, out_size, kernel, stride, padding, dilation):
        pos = np.arange(o_n)[:, None] * s - p + np.arange(k_n)[None, :] * d  # (o_n, k_n)
        ok = (pos >= 0) & (pos < n)
        # outer product with the dimensions so far: (O, K) x (o_n, k_n) -> (O*o_n, K*k_n)
        flat = (flat[:, None, :, None] * n + pos[None, :, None, :]).reshape(
            flat.shape[0] * o_n, flat.shape[1] * k_n
        )
        valid = (valid[:, None, :, None] & ok[None, :, None, :]).reshape(flat.shape)
    return np.where(valid, flat, PAD)
