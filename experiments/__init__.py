"""Scripts that regenerate the paper's tables and figures (``python -m experiments``) and the
benchmarks (``experiments/bench_*.py``). The library never imports this package."""
