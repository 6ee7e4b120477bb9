"""How many cached tokens each layer and KV head keeps: plain functions of the recipe's per-head ratios and
the number of tokens a head can see.

A head that may see `visible` cached tokens keeps max(1, int(visible * (1 - ratio))) of them (kvpress's count,
per head), so a uniform ratio removes exactly that fraction from every head; ratios that differ by layer
(PyramidKV) or by head (the head-wise policy, loss-aware budgets) average to the recipe's ratio over the heads.
A sliding-window layer's head sees at most window - 1 cached tokens (the next query sees itself and the
window - 1 before it), so its budget stops growing where its cache would.
"""

from __future__ import annotations

import torch

from actlab.errors import ConfigError


def visible_tokens(end: int, window: int | None) -> int:
    """Cached tokens the query at position `end` can see (positions 0..end-1 are cached)."""
    return end if window is None else min(end, window - 1)


def keep_counts(ratios: torch.Tensor, visible: int) -> torch.Tensor:
    """Tokens each head keeps of `visible`: [KV] long, from the heads' ratios [KV]."""
    return torch.tensor([min(visible, max(1, int(visible * (1 - r)))) for r in ratios.tolist()], dtype=torch.long)


def uniform(num_layers: int, num_kv: int, ratio: float) -> torch.Tensor:
    return torch.full((num_layers, num_kv), float(ratio), dtype=torch.float64)


def pyramid(num_layers: int, num_kv: int, ratio: float, beta: float = 20.0) -> torch.Tensor:
    """PyramidKV's schedule (Cai et al. 2024): the share kept falls linearly from the first layer to the last,
    the last keeping 1/beta of the mean share, the first the rest of twice the mean (capped at everything, the
    last then taking what the cap frees); the mean share kept is 1 - ratio."""
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or beta < 1:
        raise ConfigError(f"pyramidkv: beta must be a number >= 1, got {beta!r}")
    keep = 1.0 - ratio
    last = keep / beta
    first = 2 * keep - last
    if first > 1:
        first, last = 1.0, 2 * keep - 1
    if num_layers == 1:
        first = last = keep
    shares = torch.linspace(first, last, num_layers, dtype=torch.float64)
    return (1 - shares)[:, None].expand(num_layers, num_kv).clone()


def mean_ratio(ratios: torch.Tensor, weights: torch.Tensor | None = None) -> float:
    """The ratio the per-head ratios remove on average, each head weighted by the tokens it would hold."""
    if weights is None:
        return float(ratios.mean())
    w = weights.to(ratios.dtype).expand_as(ratios)
    return float((ratios * w).sum() / w.sum())
