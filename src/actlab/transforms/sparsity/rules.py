"""The rule math: which channels a rule keeps, per token. The masked reference (`attach`) and the decode
engine's kernels both follow these definitions.

Every rule keeps channel i of a token when its score beats a cutoff:

    score_i = |x_i| * scale_i        (scale_i = 1 when no per-channel scale is given)
    threshold: cutoff = a calibrated constant
    topk:      cutoff = the k-th largest score of the token (k = keep fraction * channels)
    relative:  cutoff = threshold * RMS of the token's scores (scale-free like topk, a variable count)
    gaussian:  cutoff = mean(score) + z * std(score) over the token's channels (statistical top-k)
    core:      (CoreInfer, `source="act"`) a fixed set per sequence, chosen at the prompt: the `keep`
               fraction of neurons most often among each prompt token's top-`alpha` scores
"""

from __future__ import annotations

from typing import Any

import torch


def token_rms(score: torch.Tensor) -> torch.Tensor:
    """RMS of each token's scores over its channels (last dimension, kept): the scale a relative rule's
    threshold multiplies. One definition for the masks, the decode engine and the calibration histograms."""
    return score.pow(2).mean(-1, keepdim=True).sqrt()


def keep_mask(x: torch.Tensor, rule: Any, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the channels kept, per token (last dimension = channels)."""
    score = x.abs()
    if scale is not None:
        score = score * scale
    if rule.kind == "threshold":
        return score > rule.threshold
    if rule.kind == "topk":
        channels = score.shape[-1]
        k = min(channels, max(0, round(rule.keep * channels)))
        if k == channels:
            return torch.ones_like(score, dtype=torch.bool)
        if k == 0:
            return torch.zeros_like(score, dtype=torch.bool)
        cutoff = score.float().kthvalue(channels - k, dim=-1, keepdim=True).values  # largest score dropped
        return score > cutoff
    if rule.kind == "relative":
        s = score.float()
        return s > rule.threshold * token_rms(s)
    if rule.kind == "gaussian":
        s = score.float()
        cutoff = s.mean(-1, keepdim=True) + rule.z * s.std(-1, keepdim=True)
        return s > cutoff
    if rule.kind == "core":
        raise ValueError("a core rule's mask depends on the prompt: use sentence_core()")
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def sentence_core(prompt: torch.Tensor, rule: Any, scale: torch.Tensor | None = None) -> torch.Tensor:
    """CoreInfer's sentence-wise core neurons: [batch, prompt tokens, neurons] -> [batch, 1, neurons] bool.

    Each prompt token's core is its top-`alpha` fraction of neurons by score; the sentence keeps the `keep`
    fraction of neurons that are most often in a token's core (ties broken by the mean score)."""
    score = prompt.float().abs()
    if scale is not None:
        score = score * scale
    n = score.shape[-1]
    k_token = max(1, round(rule.alpha * n))
    k_keep = min(n, max(0, round(rule.keep * n)))
    in_core = torch.zeros_like(score).scatter_(-1, score.topk(k_token, dim=-1).indices, 1.0)
    mean = score.mean(-2)
    rank = in_core.sum(-2) + 0.5 * mean / mean.amax(-1, keepdim=True).clamp_min(1e-30)  # count, then magnitude
    keep = torch.zeros_like(rank, dtype=torch.bool)
    keep.scatter_(-1, rank.topk(k_keep, dim=-1).indices, True)
    return keep[:, None, :]


def last_half_start(t: int) -> int:
    """First position of a t-token window that TEAL's "last-half" protocol sparsifies."""
    return t - t // 2
