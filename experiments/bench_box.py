"""Benchmark the box search (openbox.regions.box): regions found and regions/s in an L-inf box
around a point, on small MLPs and CNNs of growing input size, and for growing eps on one MLP.

Each row also checks the search against dense random sampling of the box (every sampled
point's region must be among those found). Seeded random models (weights N(0, 1/fan_in),
biases N(0, 0.25)), float64.

    python experiments/bench_box.py [--max-regions 3000] [--samples 4000] [--threads 1]

The figures quoted in openbox/regions/box.py come from this script.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
from torch import nn

import openbox
from openbox.regions.box import box


def _randomize(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
    return model.eval()


def mlp(sizes, seed=0) -> nn.Module:
    layers = []
    for a, b in zip(sizes[:-2], sizes[1:-1]):
        layers += [nn.Linear(a, b), nn.ReLU()]
    layers.append(nn.Linear(sizes[-2], sizes[-1]))
    return _randomize(nn.Sequential(*layers), seed)


def cnn(side, channels=(2, 3), seed=0) -> nn.Module:
    c1, c2 = channels
    model = nn.Sequential(
        nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(c2 * (side // 4) ** 2, 4),
    )
    return _randomize(model, seed)


def row(name, model, shape, eps, max_regions, samples, seed=1):
    ob = openbox.OpenBox(model, shape)
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64) * 0.5
    t = time.perf_counter()
    bs = box(ob, x0, eps, max_regions=max_regions, progress=False)
    seconds = time.perf_counter() - t
    pts = x0 + eps * (2 * torch.rand((samples, *shape), generator=g, dtype=torch.float64) - 1)
    keys = set(ob.region_key(pts))
    found = len(keys & set(bs.regions))
    n = math.prod(shape)
    print(f"{name:<28} {n:>4} {eps:>7g} {len(bs):>8} {'yes' if bs.complete else 'NO':>8} "
          f"{bs.graph.number_of_edges():>7} {seconds:>8.2f} {len(bs) / seconds:>9.1f} "
          f"{found:>5}/{len(keys):<5}")
    return bs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-regions", type=int, default=3000)
    parser.add_argument("--samples", type=int, default=4000,
                        help="random points of the box whose regions must be found")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}; max_regions {args.max_regions}")
    print(f"{'network':<28} {'n':>4} {'eps':>7} {'regions':>8} {'complete':>8} {'facets':>7} "
          f"{'seconds':>8} {'regions/s':>9} {'sampled found'}")
    m, r = args.max_regions, args.samples
    print("-- growing input size")
    row("MLP 2-10-10-3", mlp((2, 10, 10, 3)), (2,), 1.5, m, r)
    row("MLP 4-16-16-4", mlp((4, 16, 16, 4)), (4,), 0.5, m, r)
    row("MLP 8-16-16-4", mlp((8, 16, 16, 4)), (8,), 0.25, m, r)
    row("MLP 16-16-16-4", mlp((16, 16, 16, 4)), (16,), 0.1, m, r)
    row("MLP 32-32-32-4", mlp((32, 32, 32, 4)), (32,), 0.03, m, r)
    row("CNN (1,4,4) ch (2,3)", cnn(4), (1, 4, 4), 0.04, m, r)
    row("CNN (1,8,8) ch (2,3)", cnn(8), (1, 8, 8), 0.01, m, r)
    row("MLP 64-64-64-4", mlp((64, 64, 64, 4)), (64,), 0.01, m, r)
    row("CNN (1,12,12) ch (2,3)", cnn(12), (1, 12, 12), 0.003, m, r)
    row("CNN (1,12,12) ch (2,3)", cnn(12), (1, 12, 12), 0.01, min(m, 1000), r)
    row("CNN (1,28,28) ch (4,8)", cnn(28, (4, 8)), (1, 28, 28), 5e-4, min(m, 100), r)
    print("-- growing eps, MLP 4-16-16-4")
    for eps in (0.1, 0.2, 0.4, 0.8):
        row("MLP 4-16-16-4", mlp((4, 16, 16, 4)), (4,), eps, m, r)


if __name__ == "__main__":
    main()
