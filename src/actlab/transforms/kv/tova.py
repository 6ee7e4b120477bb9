"""TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): keep the tokens the last query attends to most,
its attention averaged over every head of the layer (the paper's policy, and kvpress's: every head keeps the
same tokens; `per_head=True` averages over the query heads of each KV head instead); the last token itself is
always kept."""

from __future__ import annotations

import torch

from actlab.errors import ConfigError
from actlab.transforms.kv.base import CacheView, KVPress, window_attention


class TOVA(KVPress):
    name = "tova"
    paper = "Oren et al. 2024 (arXiv:2401.06104)"
    window = 1

    def __init__(self, per_head: bool = False):
        if not isinstance(per_head, bool):
            raise ConfigError(f"tova: per_head is true or false, got {per_head!r}")
        self.per_head = per_head

    def params(self):
        return {"per_head": self.per_head}

    def score(self, view: CacheView, keep: int) -> torch.Tensor:
        score = window_attention(view)[:, :, -1].clone()  # [B, KV, T]
        if not self.per_head:
            score = score.mean(1, keepdim=True).expand_as(score).clone()
        score[..., -1] = float("inf")  # the newest token
        return score
