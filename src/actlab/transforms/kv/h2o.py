"""H2O (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient Generative Inference"): keep the heavy
hitters, the keys with the most attention accumulated over every query so far, and a recent window; after a
prefill the accumulation runs over every prompt position, and half of the kept tokens are the most recent."""

from __future__ import annotations

import torch

from actlab.errors import ConfigError
from actlab.transforms.kv.base import ALL_QUERIES, CacheView, KVPress, accumulated_attention


class H2O(KVPress):
    name = "h2o"
    paper = "Zhang et al. 2023 (arXiv:2306.14048)"
    window = ALL_QUERIES
    accumulates = True

    def __init__(self, recent: float = 0.5):
        if isinstance(recent, bool) or not isinstance(recent, (int, float)) or not 0 <= recent <= 1:
            raise ConfigError(f"h2o: recent is the share of the kept tokens that are the most recent, in [0, 1]; "
                              f"got {recent!r}")
        self.recent = float(recent)

    def params(self):
        return {"recent": self.recent}

    def score(self, view: CacheView, keep: int) -> torch.Tensor:
        score = accumulated_attention(view).clone()  # [B, KV, T]: attention accumulated over every query
        recent = int(keep * self.recent)
        if recent:  # the most recent tokens still in the cache
            alive = view.alive if view.alive is not None else torch.ones_like(score, dtype=torch.bool)
            later = alive.flip(-1).long().cumsum(-1).flip(-1)  # cached tokens at or after each position
            score = score.masked_fill(alive.expand_as(score) & (later <= recent), float("inf"))
        return score


def heavy_hitter_victims(accumulated: torch.Tensor, positions: torch.Tensor, keep: int, recent: float) -> torch.Tensor:
    """The tokens H2O evicts from one head to hold `keep` of the tokens a query can see, given their accumulated
    attention and positions ([m] each, in any order): indices into them. The choice `H2O.score` and `keep_mask`
    make over the same tokens laid out by position (the `int(keep * recent)` most recent are kept, then the most
    attended, ties to the earlier position), for a cache kept in rows (the decode engine's, one step at a time)."""
    if len(positions) <= keep:
        return torch.zeros(0, dtype=torch.long)
    by_position = torch.argsort(positions)
    score = accumulated[by_position].float().clone()
    protected = int(keep * recent)
    if protected:
        score[len(score) - protected:] = float("inf")
    order = torch.argsort(score, descending=True, stable=True)  # stable on position order: ties to the earlier
    return by_position[order[keep:]]
