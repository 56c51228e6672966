"""Census of linear regions over a data set.

:func:`census` pushes a data set through the network once (one configuration pass per
batch, no LLCs, no polytopes) and counts the regions its inputs fall into: how many,
how large, how pure in label, how many inputs sit on a facet, and how each gate layer
on its own splits the data (distinct activation patterns per layer, and how many gates
of a layer differ between an input and its nearest neighbour in input space).

>>> c = openbox.regions.census(ob, ds.images, ds.labels)      # or a DataLoader of (x, y)
>>> c.n_inputs, c.n_regions, c.on_facet, c.purity
>>> print(c.to_markdown(top=20, classes=CLASSES)); print(c.layer_table())
>>> whole = part_a + part_b                                   # censuses of shards merge

What is stored. A region key is the packed configuration itself (3.5-7 KB per input on
the reference CNNs); a census never keeps keys or activations. Per input it keeps the
16-byte BLAKE2b digest of its region key (:attr:`RegionKey.digest16
<openbox.configuration.RegionKey.digest16>`), one 16-byte digest per gate layer of that
layer's part of the configuration, the number of facets it lies on, its predicted class
and its label: ``16 (L + 1) + 24`` bytes for L gate layers, 2.5 MB for 60,000 inputs on
a 4-gate CNN. Two different configurations share a digest with probability ~2^-128 per
pair, so N inputs hold any collision with probability below ``N^2 / 2^129`` (< 1e-29 for
the 60,000 Fashion-MNIST training images; < 1e-20 for 10^9 inputs).

Nearest neighbours are the one part that needs the inputs themselves. They are found
within a *sample* of at most ``neighbours_n`` inputs (default :data:`NEIGHBOURS_N`),
drawn as a uniform reservoir sample (Algorithm R, seeded: a census is deterministic and
does not depend on how the data is batched). The sample holds every input when there
are at most ``neighbours_n``; its memory is ``neighbours_n x (8 prod(input_shape) +
pattern bytes)`` (about 20 MB at 2,000 inputs on the demo CNN) whatever the size of the
data set, and it is freed once the statistics are computed. The nearest neighbour of a
sampled input is the closest *other* sampled input in L2 (ties: the earliest in the
data; "closest" by the computed sum of squared differences); a duplicated input is its
copy's neighbour, at distance 0 and Hamming distance 0. The search takes candidates from
half a Gram matrix (one matrix product per block of rows, ~M^2 D / 2 multiply-adds) and
certifies each answer against a bound on that form's rounding; rows it cannot settle
(exact ties, more copies of an input than candidates) get every distance computed.

Merging. ``a.merge(b)`` (or ``a + b``, or ``sum(parts)``) is exact for everything but
the nearest-neighbour statistics: counts add, regions and per-layer patterns are the
union, purity is recomputed from the merged per-input labels. Nearest neighbours within
two samples are not those within the union, so a merged census **drops** them
(``neighbours is None``; its tables say so); take them from one shard's census, or
census a sample of the whole directly. Censuses of different programs, dtypes or
tie-break directions (different :attr:`OpenBox.key_context`) refuse to merge.

Sharding a data set over processes: see ``docs/census.md`` (``torch.distributed`` with
``all_gather_object``, and Ray Data's ``map_batches``).

Speed. One configuration pass per batch, the OpenBox's own (the keys are bit for bit
those of :meth:`OpenBox.region_key`); on the CPU the census runs batches side by side in
threads with torch's threads split among them (:data:`CENSUS_WORKERS`), which changes
nothing in the result. ``experiments/bench_census.py`` measures it against the forward.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from math import prod
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from linearize import MaxPool, ReLU
from openbox.configuration import selection_dtype
from openbox.parallel import split_threads
from openbox.parallel import workers as default_device_workers

DIGEST_BYTES = 16
"""Bytes of every digest a census stores (BLAKE2b, as :attr:`RegionKey.digest16`)."""

CENSUS_BATCH: int | None = 128
"""Default inputs per configuration pass of a census; None: the OpenBox's ``batch_size``
(64 by default). With two batches side by side (:data:`CENSUS_WORKERS`), on the demo CNN
(2 CPU threads, float64, 10,000 test images, whole censuses interleaved) 128 ran 1.11x
and 1.18x the census at 64 (medians of 4), 96 1.13x, 192 1.08x, 256 0.94x; one batch at a
time, 32 to 128 had been within the machine's noise of each other
(``experiments/bench_census.py`` scans batch sizes)."""

CENSUS_WORKERS: int | None = None
"""Default number of batches a census configures at once, each in a thread of its own
(:func:`census`'s ``workers``); None: :func:`default_workers`. While more than one runs,
torch's intra-op threads are split among them (``torch.set_num_threads``, restored when
the passes end): a configuration pass is hundreds of small tensor operations, and on the
CPU two single-threaded passes side by side beat one pass on two threads, whose threads
wait on each other at every operation. Demo CNN, 2 cores, 10,000 test images: 1.05-1.45x
the census with one pass at a time (the same census bit for bit; most in this machine's
slow phases); more cores are unmeasured, so the split there is a guess (pass ``workers=``
to choose)."""

NEIGHBOURS_N = 2000
"""Default cap on the inputs sampled for nearest-neighbour statistics."""

NEIGHBOURS_SEED = 0
"""Default seed of the reservoir sample for nearest-neighbour statistics."""

NEIGHBOUR_CANDIDATES = 4
"""Candidates per input kept from the fast (Gram-matrix) distance pass. An input whose
best candidate is not ahead of all others by more than the pass's rounding bound has its
candidates' sums of squared differences computed, and, if the farthest candidate cannot
rule out the inputs outside them, its distances to every input (see :func:`_nearest`):
rounding in ``|a|^2 + |b|^2 - 2 a.b`` never picks a neighbour that is not the nearest."""

DISTANCE_ROWS = 256
"""Sample rows per block of the nearest-neighbour search (memory ~ 2 x rows x sample x
8 B, and rows x NEIGHBOUR_CANDIDATES x input size x 8 B for the rows it recomputes)."""

class Layer(NamedTuple):
    """One gate node of the program.

    Attributes:
        node: index into ``ob.program.nodes``.
        name: the module path it was lowered from (may be "").
        kind: ``"relu"`` (ReLU / LeakyReLU: one sign per input) or ``"maxpool"`` (one
            selection per window).
        units: gates of the layer: ReLU inputs, or max-pool windows. The largest possible
            Hamming distance between two patterns of the layer.
        describe: the node's own one-line description (``ReLU``, ``MaxPool window 4``).
    """

    node: int
    name: str
    kind: str
    units: int
    describe: str

    @property
    def label(self) -> str:
        """``"1 relu1"``: node index and module path (or kind when unnamed)."""
        return f"{self.node} {self.name or self.kind}"


class RegionRow(NamedTuple):
    """One region of a census, as the tables show it.

    Attributes:
        rank: 1 for the region with most inputs (ties: smaller digest first).
        region: the 32 hex digits of the region key's 16-byte digest.
        count: inputs in the region.
        share: ``count / n_inputs``.
        majority: the most frequent label in the region (ties: the smallest), or None
            for an unlabelled census.
        purity: fraction of the region's inputs with the majority label, or None.
        on_facet: inputs of the region that lie on a facet (``n_tight > 0``).
    """

    rank: int
    region: str
    count: int
    share: float
    majority: int | None
    purity: float | None
    on_facet: int


class LayerStats(NamedTuple):
    """Per-layer structure of a census.

    Attributes:
        layer: the gate layer (``None`` for the row of the whole network).
        distinct: distinct activation patterns of the layer among the inputs.
        hamming_median, hamming_mean: Hamming distance between a sampled input's pattern
            and its nearest neighbour's (gates that differ), or None when the census has
            no nearest-neighbour statistics.
    """

    layer: Layer | None
    distinct: int
    hamming_median: float | None
    hamming_mean: float | None


@dataclass(frozen=True, eq=False)
class Neighbours:
    """Nearest neighbours (L2 in input space) within a census's sample of M inputs.

    Attributes:
        index: (M,) int64 position in the census data of each sampled input (ascending).
        neighbour: (M,) int64 position in the data of its nearest other sampled input.
        distance: (M,) float64 L2 distance to it, in the working dtype's input space.
        hamming: (M, L) int64 gates of each layer that differ between the two (sign
            flips for a ReLU layer, windows with another selection for a max-pool layer).
        same_region: (M,) bool, the two share their whole configuration.
        seed: the reservoir's seed. n_inputs: inputs the sample was drawn from.
    """

    index: np.ndarray
    neighbour: np.ndarray
    distance: np.ndarray
    hamming: np.ndarray
    same_region: np.ndarray
    seed: int
    n_inputs: int

    @property
    def n(self) -> int:
        return int(self.index.shape[0])

    def median(self) -> np.ndarray:
        """(L,) float64 median Hamming distance per layer."""
        return np.median(self.hamming, axis=0).astype(np.float64)

    def mean(self) -> np.ndarray:
        """(L,) float64 mean Hamming distance per layer."""
        return self.hamming.mean(axis=0).astype(np.float64)


@dataclass(frozen=True, eq=False)
class Census:
    """The regions a data set falls into (see the module docstring for what is stored,
    the digest collision bound, sampling and merging).

    Attributes:
        key_context: the 16-byte :attr:`OpenBox.key_context` (program, dtype, tie-break
            direction) every digest was made under.
        layers: the gate layers, in program order.
        digests: (N, 16) uint8, per input the :attr:`RegionKey.digest16` of its region.
        layer_digests: (N, L, 16) uint8, per input and gate layer the BLAKE2b digest of
            that layer's pattern (ReLU: the packed sign bits; max-pool: the selections).
        n_tight: (N,) int64 facets each input lies on.
        predictions: (N,) int64 predicted class.
        labels: (N,) int64 labels, or None for an unlabelled census.
        neighbours: nearest-neighbour statistics of the sample, or None (no sample of two
            inputs, ``neighbours_n=0``, or a merged census).
        neighbours_n: the sample cap used.

    Inputs keep the order of the data (a merged census: left operand's first).
    """

    key_context: bytes
    layers: tuple[Layer, ...]
    digests: np.ndarray
    layer_digests: np.ndarray
    n_tight: np.ndarray
    predictions: np.ndarray
    labels: np.ndarray | None
    neighbours: Neighbours | None
    neighbours_n: int = NEIGHBOURS_N

    # -- counts --------------------------------------------------------------------------

    @property
    def n_inputs(self) -> int:
        return int(self.digests.shape[0])

    @cached_property
    def _regions(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Distinct digests (R, 16) ordered by count (descending; ties: digest), their
        counts (R,), and each input's region rank (N,)."""
        uniq, inverse, counts = np.unique(self.digests, axis=0, return_inverse=True,
                                          return_counts=True)
        order = np.argsort(-counts, kind="stable")
        rank = np.empty_like(order)
        rank[order] = np.arange(order.shape[0])
        return uniq[order], counts[order], rank[inverse.reshape(-1)]

    @property
    def n_regions(self) -> int:
        """Distinct regions (distinct region-key digests) among the inputs."""
        return int(self._regions[1].shape[0])

    @cached_property
    def counts(self) -> dict[str, int]:
        """Region digest (32 hex digits of :attr:`RegionKey.digest16`) -> inputs in it,
        largest first."""
        uniq, counts, _ = self._regions
        return {bytes(d).hex(): int(c) for d, c in zip(uniq, counts)}

    def count(self, key) -> int:
        """Inputs in the region of ``key``: a :class:`RegionKey` (its context must be the
        census's), its 16-byte digest, or the digest's hex; 0 for a region not seen."""
        if hasattr(key, "digest16"):
            if key.context != self.key_context:
                raise ValueError("the key was made under another key context (model, dtype "
                                 "or tie-break direction) than the census")
            key = key.digest16
        if isinstance(key, (bytes, bytearray)):
            key = bytes(key).hex()
        return self.counts.get(str(key).lower(), 0)

    @property
    def on_facet(self) -> int:
        """Inputs that lie on at least one facet (``n_tight > 0``)."""
        return int((self.n_tight > 0).sum())

    @property
    def singletons(self) -> int:
        """Regions holding a single input."""
        return int((self._regions[1] == 1).sum())

    def region_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """The distribution of region sizes: sizes (S,) ascending and, for each, the number
        of regions of that size (S,); ``(sizes * n).sum() == n_inputs``."""
        return np.unique(self._regions[1], return_counts=True)

    # -- labels --------------------------------------------------------------------------

    @property
    def labelled(self) -> bool:
        return self.labels is not None

    @cached_property
    def _majority(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Per region (in rank order): majority label (R,), its count (R,); and the sorted
        (region, label, count) triples of every label present in a region."""
        if self.labels is None:
            raise ValueError("the census has no labels; pass labels= or (x, y) batches")
        _, _, region = self._regions
        values, label_idx = np.unique(self.labels, return_inverse=True)
        n_values = values.shape[0]
        pairs, pair_counts = np.unique(region * n_values + label_idx.reshape(-1),
                                       return_counts=True)
        r, lab = pairs // n_values, pairs % n_values
        order = np.lexsort((lab, -pair_counts, r))
        first = order[np.r_[True, r[order][1:] != r[order][:-1]]]
        return values[lab[first]], pair_counts[first], r, values[lab], pair_counts

    def class_counts(self, region: str) -> dict[int, int]:
        """Label -> inputs with it, in the region with digest hex ``region``."""
        if region not in self.counts:
            raise KeyError(f"no region {region} in the census")
        want = np.frombuffer(bytes.fromhex(region), dtype=np.uint8)
        rank = int(np.flatnonzero((self._regions[0] == want).all(axis=1))[0])
        _, _, r, lab, counts = self._majority
        hit = r == rank
        return {int(a): int(b) for a, b in zip(lab[hit], counts[hit])}

    @property
    def purity(self) -> float | None:
        """Fraction of inputs whose label is the majority label of their region (the
        clustering "purity" of the partition); None without labels. 1.0 when every region
        holds one label."""
        if self.labels is None:
            return None
        return float(self._majority[1].sum() / self.n_inputs)

    @property
    def prediction_purity(self) -> float:
        """As :attr:`purity`, with the predicted class in place of the label: below 1 when
        some region holds inputs the network classifies differently (a region's LLC is one
        affine map, but its argmax may change inside the region)."""
        _, _, region = self._regions
        c = int(self.predictions.max()) + 1 if self.n_inputs else 1
        pair = np.unique(region * c + self.predictions, return_counts=True)
        r = pair[0] // c
        best = np.zeros(self.n_regions, dtype=np.int64)
        np.maximum.at(best, r, pair[1])
        return float(best.sum() / self.n_inputs)

    def regions(self, top: int | None = None) -> list[RegionRow]:
        """The ``top`` largest regions (all with None), largest first."""
        uniq, counts, region = self._regions
        top = len(counts) if top is None else max(0, min(int(top), len(counts)))
        facets = np.bincount(region[self.n_tight > 0], minlength=len(counts))
        if self.labels is not None:
            major, major_n = self._majority[:2]
        rows = []
        for i in range(top):
            purity = None if self.labels is None else float(major_n[i] / counts[i])
            rows.append(RegionRow(
                i + 1, bytes(uniq[i]).hex(), int(counts[i]), float(counts[i] / self.n_inputs),
                None if self.labels is None else int(major[i]), purity, int(facets[i]),
            ))
        return rows

    # -- per-layer structure ---------------------------------------------------------------

    @cached_property
    def distinct_patterns(self) -> dict[int, int]:
        """Gate node index -> distinct activation patterns of that layer among the inputs."""
        return {
            layer.node: int(np.unique(self.layer_digests[:, j], axis=0).shape[0])
            for j, layer in enumerate(self.layers)
        }

    def layer_stats(self) -> list[LayerStats]:
        """One row per gate layer, then one (``layer=None``) for the whole network: its
        distinct patterns are the regions, its Hamming distance the sum over layers."""
        nb = self.neighbours
        med = mean = None
        if nb is not None:
            med, mean = nb.median(), nb.mean()
        rows = [
            LayerStats(layer, self.distinct_patterns[layer.node],
                       None if nb is None else float(med[j]),
                       None if nb is None else float(mean[j]))
            for j, layer in enumerate(self.layers)
        ]
        total = None if nb is None else nb.hamming.sum(axis=1)
        rows.append(LayerStats(
            None, self.n_regions,
            None if total is None else float(np.median(total)),
            None if total is None else float(total.mean()),
        ))
        return rows

    # -- merging -------------------------------------------------------------------------

    def merge(self, *others: Census) -> Census:
        """The census of the union of the inputs (this census's first). Exact for counts,
        regions, per-layer patterns, facets and labels; nearest-neighbour statistics are
        dropped (``neighbours is None``, see the module docstring). Raises ValueError for
        censuses of different key contexts (model, dtype, tie-break direction) or of
        labelled with unlabelled data."""
        parts = [self]
        for other in others:
            if not isinstance(other, Census):
                raise TypeError(f"can only merge a Census, got {type(other).__name__}")
            if other.key_context != self.key_context or other.layers != self.layers:
                raise ValueError(
                    "cannot merge censuses made under different key contexts (model, dtype or "
                    f"tie-break direction): {self.key_context.hex()[:16]} vs "
                    f"{other.key_context.hex()[:16]}; census every shard with the same "
                    "OpenBox settings"
                )
            if (other.labels is None) != (self.labels is None):
                raise ValueError("cannot merge a labelled census with an unlabelled one; "
                                 "census both with labels, or both without")
            parts.append(other)
        return Census(
            self.key_context,
            self.layers,
            np.concatenate([p.digests for p in parts]),
            np.concatenate([p.layer_digests for p in parts]),
            np.concatenate([p.n_tight for p in parts]),
            np.concatenate([p.predictions for p in parts]),
            None if self.labels is None else np.concatenate([p.labels for p in parts]),
            None,
            self.neighbours_n,
        )

    def __add__(self, other: Census) -> Census:
        if not isinstance(other, Census):
            return NotImplemented
        return self.merge(other)

    def __radd__(self, other) -> Census:
        if isinstance(other, int) and other == 0:  # sum(censuses)
            return self
        return NotImplemented

    # -- tables --------------------------------------------------------------------------

    def summary(self) -> str:
        """One line: inputs, regions, singletons, inputs on a facet, purity."""
        parts = [
            f"{self.n_inputs:,} inputs in {self.n_regions:,} regions "
            f"({self.singletons:,} holding a single input; largest {self.regions(1)[0].count:,})",
            f"{self.on_facet:,} on a facet",
        ]
        if self.labels is not None:
            parts.append(f"label purity {self.purity:.4f}")
        parts.append(f"prediction purity {self.prediction_purity:.4f}")
        return "; ".join(parts)

    def __repr__(self) -> str:
        return f"Census({self.summary()})"

    def to_markdown(self, top: int | None = 20, classes: Sequence[str] | None = None) -> str:
        """A Markdown table of the ``top`` largest regions (all with None): rank, region
        digest, inputs, share, majority label (with its name from ``classes``), purity,
        inputs on a facet; a row for the remaining regions; then :meth:`summary`."""
        rows = self.regions(top)
        out = [
            "| rank | region | inputs | share | majority | purity | on facet |",
            "|---:|:---|---:|---:|:---|---:|---:|",
        ]
        for r in rows:
            out.append(
                f"| {r.rank} | `{r.region}` | {r.count} | {100 * r.share:.2f}% | "
                f"{_label(r.majority, classes)} | "
                f"{'-' if r.purity is None else f'{r.purity:.4f}'} | {r.on_facet} |"
            )
        rest = self.n_regions - len(rows)
        if rest:
            n = self.n_inputs - sum(r.count for r in rows)
            out.append(f"| | {rest} other regions | {n} | {100 * n / self.n_inputs:.2f}% "
                       "| | | |")
        out += ["", self.summary() + "."]
        return "\n".join(out)

    def to_csv(self, path_or_buffer, top: int | None = None,
               classes: Sequence[str] | None = None) -> None:
        """Write the regions (all, or the ``top`` largest) as CSV with a header row:
        ``rank, region, inputs, share, majority, purity, on_facet`` (and ``majority_class``
        when ``classes`` names the labels). Empty cells for an unlabelled census.
        ``path_or_buffer``: a path, or a text stream (``io.StringIO``, an open file)."""
        header = ["rank", "region", "inputs", "share", "majority", "purity", "on_facet"]
        if classes is not None:
            header.append("majority_class")

        def write(f) -> None:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(header)
            for r in self.regions(top):
                row = [r.rank, r.region, r.count, repr(r.share),
                       "" if r.majority is None else r.majority,
                       "" if r.purity is None else repr(r.purity), r.on_facet]
                if classes is not None:
                    row.append(_label(r.majority, classes, bare=True))
                w.writerow(row)

        if isinstance(path_or_buffer, (str, os.PathLike)):
            with open(path_or_buffer, "w", newline="") as f:
                write(f)
        else:
            write(path_or_buffer)

    def layer_table(self) -> str:
        """A Markdown table of the per-layer structure: node, module, gate kind, gates,
        distinct patterns, and the nearest-neighbour Hamming distance (median, mean, mean
        as a fraction of the layer's gates); a last row for the whole network; then a line
        saying what sample the neighbours come from."""
        out = [
            "| node | layer | gate | gates | distinct patterns | NN Hamming median | "
            "NN Hamming mean | mean / gates |",
            "|---:|:---|:---|---:|---:|---:|---:|---:|",
        ]
        total_units = sum(layer.units for layer in self.layers)
        for s in self.layer_stats():
            layer = s.layer
            units = total_units if layer is None else layer.units
            frac = "-" if s.hamming_mean is None or not units else \
                f"{s.hamming_mean / units:.4f}"
            head = ("", "all gates", "") if layer is None else \
                (str(layer.node), layer.name or "-", layer.describe)
            out.append(
                f"| {head[0]} | {head[1]} | {head[2]} | {units} | {s.distinct} | "
                f"{_num(s.hamming_median)} | {_num(s.hamming_mean)} | {frac} |"
            )
        nb = self.neighbours
        out.append("")
        if nb is None:
            out.append(
                "Nearest neighbours: not computed (a merged census drops them, as they do not "
                "combine; a census with neighbours_n=0 or a single input has none)."
            )
        else:
            same = float(nb.same_region.mean())
            out.append(
                f"Nearest neighbours: L2 in input space, within a sample of {nb.n:,} of the "
                f"{nb.n_inputs:,} inputs (reservoir, seed {nb.seed}); median distance "
                f"{float(np.median(nb.distance)):.4g}; {100 * same:.1f}% share their "
                "neighbour's region."
            )
        return "\n".join(out)

    def plot(self, ax=None):
        """Histogram of region sizes (inputs per region against the number of regions of
        that size; logarithmic axes when the sizes or counts span more than a decade) on
        ``ax`` (a matplotlib Axes; default: a new Figure, built without pyplot). Returns the
        Axes; ``ax.figure.savefig("census.png")`` writes it."""
        from matplotlib.ticker import MaxNLocator

        if ax is None:
            from matplotlib.figure import Figure

            ax = Figure(figsize=(6.0, 4.0), layout="constrained").add_subplot()
        sizes, n = self.region_sizes()
        if sizes.max() > 10 * sizes.min():  # bars of equal width on a log axis
            ax.bar(sizes / 1.2, n, width=sizes * (1.2 - 1 / 1.2), align="edge")
            ax.set_xscale("log")
        else:
            ax.bar(sizes, n, width=0.8)
            ax.set_xlim(sizes.min() - 0.6, sizes.max() + 0.6)
            if len(sizes) <= 12:
                ax.set_xticks(sizes)
            else:
                ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if n.max() > 10 * n.min():
            ax.set_yscale("log")
        else:
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("inputs in the region")
        ax.set_ylabel("regions")
        ax.set_title(f"{self.n_inputs:,} inputs in {self.n_regions:,} linear regions "
                     f"({self.singletons:,} singletons, {self.on_facet:,} inputs on a facet)",
                     fontsize=9)
        return ax


def _label(value: int | None, classes: Sequence[str] | None, bare: bool = False) -> str:
    if value is None:
        return "" if bare else "-"
    if classes is not None and 0 <= value < len(classes):
        return str(classes[value]) if bare else f"{value} ({classes[value]})"
    return "" if bare else str(value)


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


# --------------------------------------------------------------------------- the pass


def census(
    ob,
    data,
    labels=None,
    *,
    batch_size: int | None = None,
    progress: bool | None = None,
    neighbours_n: int = NEIGHBOURS_N,
    seed: int = NEIGHBOURS_SEED,
    workers: int | None = None,
) -> Census:
    """Count the linear regions a data set falls into.

    Args:
        ob: an :class:`openbox.OpenBox`.
        data: a tensor (N, *input_shape), or any iterable of batches: a tensor x
            (B, *input_shape) per batch, or ``(x, y)`` pairs with integer labels y (B,)
            (e.g. a ``torch.utils.data.DataLoader``). Inputs are checked and converted as
            :meth:`OpenBox.check_input` does, batch by batch (the whole data set is never
            converted at once).
        labels: (N,) integer labels, with a tensor ``data`` only (batches carry their own).
        batch_size: inputs per configuration pass (default :data:`CENSUS_BATCH`, or
            ``ob.batch_size`` when that is None); larger batches of an iterable are split.
        progress: tqdm bar over the batches on stderr (default: when there is more than
            one batch, or their number is unknown).
        neighbours_n: cap on the reservoir sample for nearest-neighbour statistics (0: no
            neighbours).
        seed: the reservoir's seed.
        workers: batches configured at once, each in a thread (default
            :data:`CENSUS_WORKERS`); with more than one, torch's intra-op threads are
            split among them while the passes run (``torch.set_num_threads``, restored
            after: other torch work of the process meanwhile gets the reduced count). At
            most ``workers + 1`` batches are held. The census is the same for any number.

    Returns:
        A :class:`Census`. Raises ValueError for data of the wrong shape, dtype or device,
        non-finite or out-of-domain inputs, labels that do not match the inputs, or data
        holding no inputs.
    """
    if batch_size is None:
        batch_size = CENSUS_BATCH or ob.batch_size
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(neighbours_n, int) or neighbours_n < 0:
        raise ValueError(f"neighbours_n must be an int >= 0, got {neighbours_n!r}")
    if workers is None:
        workers = CENSUS_WORKERS or default_workers(ob)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
        raise ValueError(f"workers must be a positive int, got {workers!r}")
    layers = _layers(ob.program)
    batches, total = _batches(ob, data, labels, batch_size)
    show = (total is None or total > 1) if progress is None else bool(progress)
    sample = _Reservoir(neighbours_n, seed, layers)
    known = data.shape[0] if isinstance(data, (Tensor, np.ndarray)) else None
    rows = _Rows(known)
    labelled = None

    def jobs():  # (x, y or None) of at most batch_size inputs, in the data's order
        nonlocal labelled
        for xb, yb in tqdm(batches, total=total, desc="census", unit="batch",
                           disable=not show, leave=False):
            if labelled is None:
                labelled = yb is not None
            elif labelled != (yb is not None):
                raise ValueError("some batches of data carry labels and others do not; "
                                 "give every batch as (x, y), or none")
            for i in range(0, xb.shape[0], batch_size):
                yield xb[i : i + batch_size], None if yb is None else yb[i : i + batch_size]

    def record(x: Tensor, y, done) -> None:  # in the data's order
        columns, patterns = done
        if y is not None:
            columns.append(y)
        sample.add(rows.n, x, patterns, columns[0])
        rows.append(columns)

    if workers == 1:
        for x, y in jobs():
            record(x, y, _census_batch(ob, x, layers))
    else:
        pending: deque = deque()
        with split_threads(workers), ThreadPoolExecutor(workers,
                                                         thread_name_prefix="census") as pool:
            try:
                for x, y in jobs():
                    pending.append((x, y, pool.submit(_census_batch, ob, x, layers)))
                    if len(pending) > workers:
                        x0, y0, done = pending.popleft()
                        record(x0, y0, done.result())
                while pending:
                    x0, y0, done = pending.popleft()
                    record(x0, y0, done.result())
            finally:
                for *_, done in pending:  # an error: drop what has not started
                    done.cancel()
    if rows.n == 0:
        raise ValueError("data holds no inputs; pass a tensor (N, "
                         f"{', '.join(map(str, ob.input_shape))}) with N >= 1, or a non-empty "
                         "iterable of batches")
    digests, layer_digests, n_tight, predictions, *label_column = rows.result()
    return Census(
        ob.key_context,
        layers,
        digests,
        layer_digests,
        n_tight,
        predictions,
        label_column[0] if labelled else None,
        sample.neighbours(),
        neighbours_n,
    )


def default_workers(ob) -> int:
    """Batches a census configures at once by default (:func:`openbox.parallel.workers`):
    torch's intra-op threads, at most 4, on the CPU; 1 on other devices."""
    return default_device_workers(ob.device)


def _census_batch(ob, x: Tensor, layers: tuple[Layer, ...]):
    """One batch's pass of a census, x (B, *input_shape) checked: ([key digests (B, 16),
    layer digests (B, L, 16), facets (B,), predictions (B,)], the layer patterns). It
    touches no state of the census, so batches run in threads side by side."""
    lg, config, _, _ = ob.configure(x)
    patterns = _patterns(config, layers)
    dig = _key_digests(config, layers, patterns)
    columns = [dig, _digest_rows(patterns, config.batch_size),
               config.n_tight.cpu().numpy().astype(np.int64),
               lg.argmax(dim=1).cpu().numpy().astype(np.int64)]
    return columns, patterns


class _Rows:
    """Per-input columns in preallocated arrays that grow by doubling.

    A few large allocations instead of small ones per batch: small arrays that outlive
    their batch, interleaved with the configuration pass's large temporaries, fragment the
    C heap (on the demo CNN the process's RSS grew ~20 KB per input that way, against the
    ~100 bytes per input actually kept)."""

    FIRST = 4096

    def __init__(self, size: int | None = None):
        """``size``: the number of inputs when known (a tensor of data): the columns are
        then allocated once at that size, never grown, and handed over without a copy."""
        self.n = 0
        self.size = size
        self.columns: list[np.ndarray] | None = None

    def append(self, arrays: list[np.ndarray]) -> None:
        b = arrays[0].shape[0]
        if self.columns is None:
            self.columns = [np.empty((self.size or max(self.FIRST, b), *a.shape[1:]), a.dtype)
                            for a in arrays]
        elif self.n + b > self.columns[0].shape[0]:
            size = max(2 * self.columns[0].shape[0], self.n + b)
            grown = [np.empty((size, *c.shape[1:]), c.dtype) for c in self.columns]
            for g, c in zip(grown, self.columns):
                g[: self.n] = c[: self.n]
            self.columns = grown
        for c, a in zip(self.columns, arrays):
            c[self.n : self.n + b] = a
        self.n += b

    def result(self) -> list[np.ndarray]:
        if self.columns is not None and self.n == self.columns[0].shape[0]:
            return self.columns  # exactly full: no copy
        return [c[: self.n].copy() for c in self.columns or []]


def _layers(program) -> tuple[Layer, ...]:
    out = []
    for k in program.gates:
        node = program.nodes[k]
        if isinstance(node, ReLU):
            out.append(Layer(k, node.name, "relu", prod(node.in_shape), node.describe()))
        elif isinstance(node, MaxPool):
            out.append(Layer(k, node.name, "maxpool", prod(node.out_shape), node.describe()))
    return tuple(out)


def _patterns(config, layers: tuple[Layer, ...]) -> list[np.ndarray]:
    """Each layer's part of the configuration, per input: (B, ceil(units / 8)) uint8
    packed sign bits for a ReLU layer, (B, units) selections for a max-pool layer."""
    b = config.batch_size
    out = []
    for layer in layers:
        if layer.kind == "relu":
            bits = config.on[layer.node].reshape(b, -1).cpu().numpy()
            out.append(np.packbits(bits, axis=1))
        else:
            sel = config.select[layer.node].cpu().numpy()
            out.append(sel.astype(selection_dtype(config.window_sizes[layer.node])))
    return out


def _key_digests(config, layers: tuple[Layer, ...], patterns: list[np.ndarray]) -> np.ndarray:
    """(B, 16) uint8: every input's :attr:`RegionKey.digest16`, hashed straight from the
    layer patterns (the key's packing is their bytes in node order, as
    :meth:`Configuration.region_keys` lays them out) without building the keys."""
    b = config.batch_size
    nodes = [layer.node for layer in layers]
    if nodes != sorted(set(config.on) | set(config.select)):  # not the key's layout
        keys = config.region_keys()
        dig = np.frombuffer(b"".join(k.digest16 for k in keys), dtype=np.uint8)
        return dig.reshape(b, DIGEST_BYTES)
    parts = [np.ascontiguousarray(p).view(np.uint8).reshape(b, -1) for p in patterns]
    packed = (np.concatenate(parts, axis=1) if parts
              else np.zeros((b, 0), dtype=np.uint8))
    head = hashlib.blake2b(config.context, digest_size=DIGEST_BYTES)
    return _digests(head, packed)


def _digests(head, rows: np.ndarray) -> np.ndarray:
    """(B, 16) uint8: the digest of ``head`` (a BLAKE2b object, copied) updated with each
    row of rows (B, W) uint8. The rows' bytes are hashed in place (memoryview slices): the
    hashing itself, ~1 GB/s, is most of the cost."""
    b, w = rows.shape
    if w == 0:  # no gates: every input hashes the head alone
        return np.tile(np.frombuffer(head.copy().digest(), dtype=np.uint8), (b, 1))
    mv = memoryview(np.ascontiguousarray(rows).reshape(-1))
    out = []
    for o in range(0, b * w, w):
        h = head.copy()
        h.update(mv[o : o + w])
        out.append(h.digest())
    return np.frombuffer(b"".join(out), dtype=np.uint8).reshape(b, DIGEST_BYTES)


def _digest_rows(patterns: list[np.ndarray], b: int) -> np.ndarray:
    """(B, L, 16) uint8: the BLAKE2b digest of every input's pattern of every layer."""
    out = np.empty((b, len(patterns), DIGEST_BYTES), dtype=np.uint8)
    head = hashlib.blake2b(digest_size=DIGEST_BYTES)
    for j, p in enumerate(patterns):
        out[:, j] = _digests(head, np.ascontiguousarray(p).view(np.uint8).reshape(b, -1))
    return out


def _labels(y, n: int, where: str) -> np.ndarray:
    t = torch.as_tensor(y) if not isinstance(y, Tensor) else y
    if t.dim() != 1 or t.shape[0] != n:
        raise ValueError(f"{where} must have shape ({n},), one label per input, got "
                         f"{tuple(t.shape)}")
    if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
        raise ValueError(f"{where} must hold integer class labels, got {t.dtype}")
    return t.detach().cpu().numpy().astype(np.int64)


def _batches(ob, data, labels, size: int) -> tuple[Iterator, int | None]:
    """The data's batches as (checked x, int64 labels or None), and their number if known.
    A tensor is cut into batches of ``size``; an iterable's batches come as they are."""
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise ValueError(
                f"data holds no inputs (shape {tuple(data.shape)}); pass a tensor (N, "
                f"{', '.join(map(str, ob.input_shape))}) with N >= 1"
            )
        y = None if labels is None else _labels(labels, data.shape[0], "labels")
        n = data.shape[0]

        def from_tensor():
            for i in range(0, n, size):
                x = ob.check_input(data[i : i + size], f"data[{i}:{min(i + size, n)}]")
                yield x, None if y is None else y[i : i + size]

        ob.check_input(data[:1], "data")  # a wrong shape fails before any work is done
        return from_tensor(), -(-n // size)
    if labels is not None:
        raise ValueError("labels= goes with a tensor of inputs; an iterable's batches carry "
                         "their own labels as (x, y) pairs")
    if isinstance(data, (str, bytes, os.PathLike)) or not isinstance(data, Iterable):
        raise ValueError(
            "data must be a tensor (N, " + ", ".join(map(str, ob.input_shape)) + ") or an "
            f"iterable of batches x or (x, y) (e.g. a DataLoader), got {type(data).__name__}"
        )
    total = None
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        pass

    def from_iterable():
        for i, batch in enumerate(data):
            where = f"data batch {i}"
            if isinstance(batch, Tensor):
                x, y = batch, None
            elif isinstance(batch, (tuple, list)) and len(batch) in (1, 2):
                x, y = batch[0], batch[1] if len(batch) == 2 else None
            else:
                size_note = f" of length {len(batch)}" if hasattr(batch, "__len__") else ""
                raise ValueError(f"{where} must be a tensor x or a pair (x, y), got "
                                 f"{type(batch).__name__}{size_note}")
            x = ob.check_input(x, where)
            yield x, None if y is None else _labels(y, x.shape[0], f"the labels of {where}")

    return from_iterable(), total


# --------------------------------------------------------------------------- neighbours


class _Reservoir:
    """A uniform sample of at most ``cap`` inputs with their per-layer patterns
    (Algorithm R: input i >= cap replaces a random slot with probability cap / (i + 1))."""

    def __init__(self, cap: int, seed: int, layers: tuple[Layer, ...]):
        self.cap = cap
        self.seed = seed
        self.layers = layers
        self.rng = np.random.default_rng(seed)
        self.filled = 0
        self.seen = 0
        self.x: np.ndarray | None = None
        self.patterns: list[np.ndarray] = []
        self.digests: np.ndarray | None = None
        self.index: np.ndarray | None = None

    def add(self, start: int, x: Tensor, patterns: list[np.ndarray], digests: np.ndarray):
        b = x.shape[0]
        self.seen = start + b
        if self.cap == 0:
            return
        idx = start + np.arange(b)
        slots = np.where(idx < self.cap, idx, -1)
        late = idx >= self.cap
        if late.any():
            # one float64 draw per input, so the sample does not depend on how the data
            # is batched (bias of floor(u (i + 1)): below i / 2^53)
            j = np.floor(self.rng.random(int(late.sum())) * (idx[late] + 1)).astype(np.int64)
            slots[late] = np.where(j < self.cap, j, -1)
        rows = np.flatnonzero(slots >= 0)
        if not rows.size:
            return
        # a slot drawn twice in one batch keeps the later input, as one at a time would
        _, last = np.unique(slots[rows][::-1], return_index=True)
        rows = rows[::-1][last]
        if self.x is None:
            self.x = np.empty((self.cap, x[0].numel()), dtype=np.float64)
            self.patterns = [np.empty((self.cap, p.shape[1]), p.dtype) for p in patterns]
            self.digests = np.empty((self.cap, DIGEST_BYTES), np.uint8)
            self.index = np.empty(self.cap, np.int64)
        s = slots[rows]
        self.x[s] = x.detach().reshape(b, -1).cpu().numpy()[rows]  # float64 store
        for store, p in zip(self.patterns, patterns):
            store[s] = p[rows]
        self.digests[s] = digests[rows]
        self.index[s] = idx[rows]
        self.filled = max(self.filled, int(s.max()) + 1)

    def neighbours(self) -> Neighbours | None:
        m = self.filled
        if m < 2:
            return None
        order = np.argsort(self.index[:m], kind="stable")  # data order: ties go to the earliest
        x = self.x[:m][order]
        self.x = None  # the reordered copy replaces it
        nn = _nearest(x)
        hamming = np.empty((m, len(self.layers)), dtype=np.int64)
        for j, layer in enumerate(self.layers):
            p = self.patterns[j][:m][order]
            if layer.kind == "relu":
                hamming[:, j] = np.bitwise_count(p ^ p[nn]).sum(axis=1, dtype=np.int64)
            else:
                hamming[:, j] = (p != p[nn]).sum(axis=1)
        d = self.digests[:m][order]
        index = self.index[:m][order]
        xt = torch.from_numpy(x)  # the norm as torch takes it, as before the numpy search
        distance = torch.linalg.vector_norm(xt - xt[torch.from_numpy(nn)], dim=1).numpy()
        return Neighbours(index, index[nn], distance, hamming, (d == d[nn]).all(axis=1),
                          self.seed, self.seen)


def _sq_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sums of squared differences along the last axis (float64) of a (N, ..., D) and b
    (N or 1, ..., D), by blocks of DISTANCE_ROWS along the first axis."""
    out = np.empty(np.broadcast_shapes(a.shape, b.shape)[:-1], dtype=np.float64)
    for i in range(0, out.shape[0], DISTANCE_ROWS):
        rows = slice(i, i + DISTANCE_ROWS)
        diff = a[rows] - (b if b.shape[0] == 1 else b[rows])
        out[rows] = np.einsum("...d,...d->...", diff, diff)
    return out


def _nearest(x: np.ndarray) -> np.ndarray:
    """(M,) position of each row's nearest other row of x (M, D) float64 in L2: the
    smallest sum of squared differences, ties to the smaller position.

    Candidates (the NEIGHBOUR_CANDIDATES smallest per row) come from the Gram-matrix form
    ``|x_j|^2 - 2 x_i.x_j``, of which only the upper triangle is computed, by blocks of
    DISTANCE_ROWS rows (each product serves both its rows). Every answer is *certified*
    against a bound on the rounding of that form (:func:`_gram_slack`): a row whose best
    candidate beats all others by more than the bound is settled; otherwise its
    candidates' sums of squared differences are computed, and when even the farthest
    candidate, less the bound, does not put every non-candidate strictly farther than
    the winner (an exact tie, more copies of an input than candidates), the sums of
    squared differences to every row."""
    m, dim = x.shape
    k = min(NEIGHBOUR_CANDIDATES, m - 1)
    sq = np.einsum("ij,ij->i", x, x)
    best = np.full((m, k), np.inf)  # per row, the k smallest |x_j|^2 - 2 x_i.x_j so far
    cand = np.zeros((m, k), dtype=np.int64)  # and their j

    def keep(rows: slice, values: np.ndarray, first: int) -> None:
        """Merge values (n, c), C-contiguous, into the candidates of the n rows ``rows``:
        values[a, b] is row a's value at row ``first + b`` of x. Takes the k smallest by
        repeated argmin (writing inf over them)."""
        n, c = values.shape
        at = np.arange(n)
        c = min(k, c)
        got_v = np.empty((n, c))
        got_j = np.empty((n, c), dtype=np.int64)
        for t in range(c):
            j = values.argmin(axis=1)
            got_v[:, t] = values[at, j]
            got_j[:, t] = j + first
            values[at, j] = np.inf
        v = np.concatenate([best[rows], got_v], axis=1)
        cj = np.concatenate([cand[rows], got_j], axis=1)
        part = np.argsort(v, axis=1, kind="stable")[:, :k]
        best[rows] = np.take_along_axis(v, part, axis=1)
        cand[rows] = np.take_along_axis(cj, part, axis=1)

    for i in range(0, m, DISTANCE_ROWS):
        r = min(DISTANCE_ROWS, m - i)
        g = x[i : i + r] @ x[i:].T  # (r, m - i): the block's rows against columns i..
        g *= -2.0
        if i + r < m:  # the block's rows as candidates of the rows after it (transposed)
            keep(slice(i + r, m), np.ascontiguousarray(g[:, r:].T) + sq[None, i : i + r], i)
        g += sq[None, i:]
        g[np.arange(r), np.arange(r)] = np.inf  # not its own neighbour
        keep(slice(i, i + r), g, i)
        del g
    out = cand[:, 0].copy()  # the smallest Gram-form value
    slack = _gram_slack(dim)
    top_sq = float(sq.max())
    err = slack * (top_sq + 2.0 * np.sqrt(sq * top_sq) + sq)
    if k == 1:
        unsure = np.zeros(m, dtype=bool)  # m == 2: the other row
    else:
        # settled: every other row's distance (>= the second value) beats the winner's
        second = (best[:, 1] + sq - err) * (1.0 - slack)
        unsure = ~(second > (best[:, 0] + sq + err) * (1.0 + slack))
    rows = np.flatnonzero(unsure)
    if rows.size:
        blocks = [rows[b : b + DISTANCE_ROWS] for b in range(0, rows.size, DISTANCE_ROWS)]
        exact = np.concatenate([_sq_distances(x[r, None], x[cand[r]]) for r in blocks])
        low = exact.min(axis=1)
        out[rows] = np.where(exact == low[:, None], cand[rows], m).min(axis=1)
        if k < m - 1:
            # a row j outside the candidates has a Gram-form value >= the largest kept one
            floor = (best[rows, -1] + sq[rows] - err[rows]) * (1.0 - slack)
            for i in rows[~(floor > low)]:
                d = _sq_distances(x, x[i][None, :])
                d[i] = np.inf
                out[i] = int(np.argmin(d))  # the first of equal minima: the smaller position
    return out


def _gram_slack(dim: int) -> float:
    """Relative rounding bound of the nearest-neighbour search in float64: a dot product
    or a sum of ``dim`` terms (any order, with or without FMA) errs by less than
    gamma_dim = dim u / (1 - dim u) of the sum of the terms' sizes (u = 2^-53); taken as
    2 gamma_(dim + 4), which covers the few further roundings (the subtraction, the
    squared differences) with room to spare. With it, for rows i, j of norms below
    ``sqrt(S)``: the Gram form ``|x_j|^2 - 2 x_i.x_j + |x_i|^2`` is within ``slack (S +
    2 |x_i| sqrt(S) + |x_i|^2)`` of ``|x_i - x_j|^2``, and the computed sum of squared
    differences within a factor ``1 +- slack`` of it."""
    u = (dim + 4) * 2.0**-53
    return 2.0 * u / (1.0 - u)


__all__ = ["Census", "Layer", "LayerStats", "Neighbours", "RegionRow", "census"]
