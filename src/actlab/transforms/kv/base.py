"""The scoring protocol of the KV-cache family: a press scores every cached token of every KV head, and the
cache keeps the highest-scored tokens of each head (kvpress's `ScorerPress` is the model).

A press sees one layer's cache after a prefill (`CacheView`: keys as cached, rotary embedding applied; values;
the queries of the last `window` positions when it needs them) and returns scores [batch, kv heads, tokens],
higher = keep. `kept_indices` turns scores into each head's kept positions for a ratio: every head keeps the
same number, int(tokens * (1 - ratio)) as kvpress counts, so the compressed cache is a dense tensor again.
The math is in plain functions here; budgets per layer or head and the cache's lifecycle live elsewhere.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from actlab.errors import ConfigError


@dataclass
class CacheView:
    keys: torch.Tensor  # [B, KV, T, D], as cached (rotary applied)
    values: torch.Tensor  # [B, KV, T, D]
    queries: torch.Tensor | None = None  # [B, H, W, D]: the last W positions' queries (rotary applied)
    scaling: float | None = None  # the attention's softmax scale (default D^-1/2)

    @property
    def tokens(self) -> int:
        return self.keys.shape[2]


def check_ratio(ratio: Any) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise ConfigError(f"--ratio is the fraction of cached tokens to remove, in [0, 1); got {ratio!r}")
    return float(ratio)


def kept_count(tokens: int, ratio: float) -> int:
    """Tokens each head keeps: int(tokens * (1 - ratio)), at least one."""
    return max(1, int(tokens * (1 - check_ratio(ratio))))


def kept_indices(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Each head's `keep` highest-scored positions, in position order: [B, KV, keep]. Ties go to the earlier
    position (a stable, deterministic choice)."""
    t = scores.shape[-1]
    if not 1 <= keep <= t:
        raise ConfigError(f"cannot keep {keep} of {t} cached tokens")
    order = torch.argsort(scores.float(), dim=-1, descending=True, stable=True)
    return order[..., :keep].sort(dim=-1).values


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, KV, T, D] at index [B, KV, K] -> [B, KV, K, D]."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))


def window_attention(view: CacheView) -> torch.Tensor:
    """Softmax attention of the window's queries on every cached key, causal (the window is the last W
    positions), averaged over the query heads that share a KV head: [B, KV, W, T]."""
    if view.queries is None:
        raise ConfigError("this press needs the queries of an observation window")
    q, k = view.queries.float(), view.keys.float()
    b, h, w, d = q.shape
    kv, t = k.shape[1], k.shape[2]
    if w > t:
        raise ConfigError(f"an observation window of {w} queries is longer than the {t}-token context")
    group = h // kv
    scores = torch.einsum("bkgwd,bktd->bkgwt", q.reshape(b, kv, group, w, d), k) * (view.scaling or d ** -0.5)
    query_pos = torch.arange(t - w, t, device=k.device)
    future = torch.arange(t, device=k.device)[None] > query_pos[:, None]  # [W, T]
    probs = scores.masked_fill(future, float("-inf")).softmax(-1)
    return probs.mean(2)


ALL_QUERIES = -1  # a press's window: every prompt position's query


class KVPress(ABC):
    """Scores cached tokens of one layer; the cache keeps the top `kept_count` per head."""

    name: ClassVar[str]
    paper: ClassVar[str]
    window: int = 0  # the observation window of queries the press reads (0: none; ALL_QUERIES: every one)

    @abstractmethod
    def score(self, view: CacheView, keep: int) -> torch.Tensor:
        """Scores [B, KV, T], higher = keep; `keep` is what each head will keep (position-based presses
        need it)."""

    def params(self) -> dict[str, Any]:
        return {}

    def compress(self, view: CacheView, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept positions [B, KV, K], keys [B, KV, K, D], values [B, KV, K, D]) for `ratio`."""
        keep = kept_count(view.tokens, ratio)
        index = kept_indices(self.score(view, keep), keep)
        return index, gather_tokens(view.keys, index), gather_tokens(view.values, index)
