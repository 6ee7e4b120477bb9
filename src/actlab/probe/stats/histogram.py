"""Histograms of |x| on log-spaced bins wide enough for any float32: binning and reading back.

Binning reads the float32 bit pattern: the 8 exponent bits and the top 3 mantissa bits of |x| give
2048 bins, 8 per octave (each bin spans a factor of at most 1.125), from denormals up to inf/nan.
It costs one integer shift per element, so every site can afford it; any quantile and any
"fraction below eps" is read back by interpolating within one bin.
"""

from __future__ import annotations

import numpy as np
import torch

MANTISSA_BITS = 3
SHIFT = 23 - MANTISSA_BITS
NUM_BINS = 1 << (31 - SHIFT)  # 2048
SPARSITY_EPS = tuple(float(e) for e in np.logspace(-4, 1, 26))  # the eps grid of the tables


def bin_index(x: torch.Tensor) -> torch.Tensor:
    """Bin of |x| for float32 x (the sign bit is dropped by the mask)."""
    return (x.contiguous().view(torch.int32) >> SHIFT) & (NUM_BINS - 1)


def bin_edges() -> np.ndarray:
    """Lower edge of every bin, plus the upper edge of the last: NUM_BINS + 1 float64 values."""
    bits = (np.arange(NUM_BINS + 1, dtype=np.int64) << SHIFT).clip(max=0x7F7FFFFF).astype(np.uint32)
    return bits.view(np.float32).astype(np.float64)


_EDGES = bin_edges()


def histogram_of(x: torch.Tensor) -> torch.Tensor:
    return torch.bincount(bin_index(x.float()).flatten(), minlength=NUM_BINS)


def fraction_below(counts: np.ndarray, zeros: int, eps: float) -> float:
    """Fraction of values with |x| < eps (linear interpolation inside the bin holding eps); zeros count."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    k = int(np.searchsorted(_EDGES, eps, side="right") - 1)
    k = min(max(k, 0), NUM_BINS - 1)
    below = counts[:k].sum()
    lo, hi = _EDGES[k], _EDGES[k + 1]
    part = counts[k] * (eps - lo) / (hi - lo) if hi > lo else 0.0
    if k == 0:  # bin 0 holds exact zeros and denormals; zeros are always below any eps > 0
        part = zeros + (counts[0] - zeros) * min(1.0, (eps - lo) / (hi - lo))
    return float((below + part) / total)


def quantile(counts: np.ndarray, q: float) -> float:
    """Value v with a fraction q of |x| below it (interpolated within its bin)."""
    total = counts.sum()
    if total == 0:
        return float("nan")
    cum = np.cumsum(counts)
    target = q * total
    k = int(np.searchsorted(cum, target, side="left"))
    k = min(k, NUM_BINS - 1)
    before = cum[k - 1] if k else 0
    frac = (target - before) / counts[k] if counts[k] else 0.0
    return float(_EDGES[k] + frac * (_EDGES[k + 1] - _EDGES[k]))
