"""Shared test setup.

Tests run small tensors, where torch's intra-op thread pool costs far more than the
work (on 2 cores: ~20 ms vs ~20 us for a tiny conv, and far worse when another
process holds a core), so the suite runs on one thread. Benchmarks in
experiments/ keep torch's default.
"""

import torch

torch.set_num_threads(1)
