"""SnapKV (Li et al. 2024, "SnapKV: LLM Knows What You are Looking for Before Generation"): the attention the
last `window` prompt positions pay to each earlier key, averaged over the window and the query heads of a KV
head and smoothed by a 1-D average pool over the keys before the window (zero-padded at its ends, as the
paper's code and kvpress pool; clusters of neighbouring tokens stay together); the window itself is always
kept."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from actlab.errors import ConfigError
from actlab.transforms.kv.base import CacheView, KVPress, window_attention


class SnapKV(KVPress):
    name = "snapkv"
    paper = "Li et al. 2024 (arXiv:2404.14469)"

    def __init__(self, window: int = 64, kernel: int = 5):
        if not isinstance(window, int) or window < 1:
            raise ConfigError(f"snapkv: window must be a whole number >= 1, got {window!r}")
        if not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ConfigError(f"snapkv: kernel must be an odd whole number, got {kernel!r}")
        self.window, self.kernel = window, kernel

    def params(self):
        return {"window": self.window, "kernel": self.kernel}

    def score(self, view: CacheView, keep: int) -> torch.Tensor:
        probs = window_attention(view)  # [B, KV, W, T]
        b, kv, w, t = probs.shape
        before = int((view.token_positions() < view.query_positions()[0]).sum())  # positions rise: a prefix
        window = torch.full((b, kv, t - before), float("inf"), device=probs.device)  # the window stays
        if not before:
            return window
        mass = probs.mean(2)[..., :before]  # [B, KV, before]
        pooled = F.avg_pool1d(mass.reshape(b * kv, 1, before), self.kernel, stride=1, padding=self.kernel // 2)
        return torch.cat([pooled.reshape(b, kv, before), window], -1)
