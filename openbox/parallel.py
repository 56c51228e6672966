"""Running independent batches side by side in threads on the CPU.

openbox's passes are hundreds of small tensor operations; on the CPU, two single-threaded
passes side by side beat one pass on two threads, whose threads wait on each other at
every operation. :func:`split_threads` divides torch's intra-op threads among the workers
while a block runs and restores the count after; :func:`workers` is the default number of
workers (the census's). Each worker's results are the same bits a pass on its own gives:
nothing here changes what is computed, only where. (The plane walk tried it: its steps
are mostly small numpy work under the GIL, and two half batches side by side ran 0.7-0.85x
the whole batch; it stays on one.)
"""

from __future__ import annotations

import threading
from contextlib import contextmanager

import torch

MAX_WORKERS = 4
"""Most workers :func:`workers` gives (each holds a batch's tensors)."""

_LOCK = threading.Lock()
_HELD = [0, 0]  # [blocks splitting torch's threads now, the count before the first]


def workers(device) -> int:
    """Default workers on ``device``: torch's intra-op threads, at most :data:`MAX_WORKERS`,
    on the CPU; 1 elsewhere (one stream of kernels)."""
    if torch.device(device).type != "cpu":
        return 1
    return max(1, min(MAX_WORKERS, torch.get_num_threads()))


@contextmanager
def split_threads(n: int):
    """torch's intra-op threads divided among ``n`` workers while the block runs
    (``torch.set_num_threads``: process-wide, so other torch work of the process gets the
    reduced count meanwhile), restored when the last such block running in the process
    leaves (blocks running at once in threads share one saved count)."""
    with _LOCK:
        if _HELD[0] == 0:
            _HELD[1] = torch.get_num_threads()
            torch.set_num_threads(max(1, _HELD[1] // n))
        _HELD[0] += 1
    try:
        yield
    finally:
        with _LOCK:
            _HELD[0] -= 1
            if _HELD[0] == 0:
                torch.set_num_threads(_HELD[1])
