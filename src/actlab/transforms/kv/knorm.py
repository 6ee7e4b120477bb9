"""K-norm (Devoto et al. 2024, "A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression"): keys
with a small L2 norm draw the most attention, so the cache keeps the lowest-norm keys."""

from __future__ import annotations

import torch

from actlab.transforms.kv.base import CacheView, KVPress


class KNorm(KVPress):
    name = "knorm"
    paper = "Devoto et al. 2024 (arXiv:2406.11430)"

    def score(self, view: CacheView, keep: int) -> torch.Tensor:
        return -view.keys.float().norm(dim=-1)
