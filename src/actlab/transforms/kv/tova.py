"""TOVA (Oren et al. 2024, "Transformers are Multi-State RNNs"): keep the tokens the last query attends to most
(its attention averaged over the query heads of a KV head); the last token itself is always kept."""

from __future__ import annotations

import torch

from actlab.transforms.kv.base import CacheView, KVPress, window_attention


class TOVA(KVPress):
    name = "tova"
    paper = "Oren et al. 2024 (arXiv:2401.06104)"
    window = 1

    def score(self, view: CacheView, keep: int) -> torch.Tensor:
        score = window_attention(view)[:, :, -1].clone()  # [B, KV, T]
        score[..., -1] = float("inf")  # the newest token
        return score
