"""The scoring protocol of the KV-cache family: a press scores every cached token of every KV head, and the
cache keeps the highest-scored tokens of each head (kvpress's `ScorerPress` is the model).

A press sees one layer's cache (`CacheView`: keys as cached, rotary embedding applied; values; the queries of
the last `window` positions when it needs them; each token's absolute position; which tokens are still in the
cache) and returns scores [batch, kv heads, tokens], higher = keep. `kept_indices` turns scores into each head's
kept positions for a ratio: every head keeps int(tokens * (1 - ratio)), as kvpress counts, so the compressed
cache is a dense tensor again; `keep_mask` does the same for budgets that differ by head (a ragged cache).
The math is in plain functions here; budgets per layer or head live in budgets.py, the cache's lifecycle in
session.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from actlab.errors import ConfigError

QUERY_CHUNK = 256  # queries per block when attention over every prompt position is accumulated


@dataclass
class CacheView:
    keys: torch.Tensor  # [B, KV, T, D], as cached (rotary applied)
    values: torch.Tensor  # [B, KV, T, D]
    queries: torch.Tensor | None = None  # [B, H, W, D]: the last W positions' queries (rotary applied)
    scaling: float | None = None  # the attention's softmax scale (default D^-1/2)
    softcap: float | None = None  # logit soft-capping (Gemma-2)
    positions: torch.Tensor | None = None  # [T] absolute positions of the cached tokens (default 0..T-1)
    alive: torch.Tensor | None = None  # [B or 1, KV, T] bool: tokens still in the cache (default: all)
    accumulated: torch.Tensor | None = None  # [B, KV, T]: attention each token received from every query so far
    window: int | None = None  # a sliding-window layer's reach: a query sees the keys less than `window` back

    @property
    def tokens(self) -> int:
        return self.keys.shape[2]

    def token_positions(self) -> torch.Tensor:
        return self.positions if self.positions is not None else torch.arange(self.tokens, device=self.keys.device)

    def query_positions(self) -> torch.Tensor:
        """The window's queries sit at the last W positions, ending at the last cached token."""
        w = self.queries.shape[2]
        return self.token_positions()[-1] - torch.arange(w - 1, -1, -1, device=self.keys.device)


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


def keep_mask(scores: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """[B, KV, T] bool: each head's `keep[kv]` highest-scored tokens (ties to the earlier position); tokens scored
    -inf (not in the cache) are never kept."""
    order = torch.argsort(scores.float(), dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1], device=scores.device).expand_as(order))
    return (rank < keep.to(scores.device).view(1, -1, 1)) & (scores > float("-inf"))


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [B, KV, T, D] at index [B, KV, K] -> [B, KV, K, D]."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))


def _attention_block(view: CacheView, q: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """Softmax attention of queries q [B, H, W, D] at `query_pos` on the cached keys, causal, dead tokens excluded,
    averaged over the query heads that share a KV head: [B, KV, W, T]."""
    k = view.keys.float()
    b, h, w, d = q.shape
    kv = k.shape[1]
    group = h // kv
    scores = torch.einsum("bkgwd,bktd->bkgwt", q.float().reshape(b, kv, group, w, d), k)
    scores = scores * (view.scaling or d ** -0.5)
    if view.softcap:
        scores = view.softcap * torch.tanh(scores / view.softcap)
    distance = query_pos[:, None] - view.token_positions()[None]  # [W, T]
    hidden = distance < 0  # the future
    if view.window is not None:
        hidden = hidden | (distance >= view.window)
    hidden = hidden.view(1, 1, 1, w, -1)
    if view.alive is not None:
        hidden = hidden | ~view.alive[:, :, None, None, :]
    return scores.masked_fill(hidden, float("-inf")).softmax(-1).mean(2)


def window_attention(view: CacheView) -> torch.Tensor:
    """Softmax attention of the window's queries on every cached key, causal (the window is the last W
    positions), averaged over the query heads that share a KV head: [B, KV, W, T]."""
    if view.queries is None:
        raise ConfigError("this press needs the queries of an observation window")
    w, t = view.queries.shape[2], view.tokens
    if w > t:
        raise ConfigError(f"an observation window of {w} queries is longer than the {t}-token context")
    return _attention_block(view, view.queries, view.query_positions())


def accumulated_attention(view: CacheView) -> torch.Tensor:
    """The attention each cached token received, summed over the window's queries (H2O's heavy-hitter score):
    [B, KV, T], computed a block of queries at a time so that a long prompt never holds its whole attention
    matrix."""
    if view.accumulated is not None:
        return view.accumulated.float()
    if view.queries is None:
        raise ConfigError("this press needs the queries of an observation window")
    return received_attention(view, view.queries, view.query_positions())


def received_attention(view: CacheView, queries: torch.Tensor, query_pos: torch.Tensor) -> torch.Tensor:
    """Attention each cached token receives from `queries` [B, H, W, D] at `query_pos`, summed over them (and
    averaged over the query heads of a KV head): [B, KV, T]."""
    total = None
    for start in range(0, queries.shape[2], QUERY_CHUNK):
        part = _attention_block(view, queries[:, :, start:start + QUERY_CHUNK],
                                query_pos[start:start + QUERY_CHUNK]).sum(2)
        total = part if total is None else total + part
    return total


ALL_QUERIES = -1  # a press's window: every prompt position's query


class KVPress(ABC):
    """Scores cached tokens of one layer; the cache keeps the top `kept_count` per head."""

    name: ClassVar[str]
    paper: ClassVar[str]
    window: int = 0  # the observation window of queries the press reads (0: none; ALL_QUERIES: every one)
    accumulates: ClassVar[bool] = False  # scores from the attention every query so far paid (H2O)

    @abstractmethod
    def score(self, view: CacheView, keep: int) -> torch.Tensor:
        """Scores [B, KV, T], higher = keep; `keep` is what each head will keep (position-based presses
        need it)."""

    def params(self) -> dict[str, Any]:
        return {}

    def scores(self, view: CacheView, keep: torch.Tensor) -> torch.Tensor:
        """Scores for per-head budgets `keep` [KV]: heads that keep the same count are scored together; tokens no
        longer in the cache score -inf."""
        out = torch.empty(view.keys.shape[:3], dtype=torch.float32, device=view.keys.device)
        for k in sorted(set(keep.tolist())):
            heads = (keep == k).nonzero().flatten()
            out[:, heads] = self.score(view, int(k)).float().expand(out.shape)[:, heads]
        if view.alive is not None:
            out = out.masked_fill(~view.alive.expand(out.shape), float("-inf"))
        return out

    def compress(self, view: CacheView, ratio: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(kept positions [B, KV, K], keys [B, KV, K, D], values [B, KV, K, D]) for `ratio`."""
        keep = kept_count(view.tokens, ratio)
        index = kept_indices(self.score(view, keep), keep)
        return index, gather_tokens(view.keys, index), gather_tokens(view.values, index)
