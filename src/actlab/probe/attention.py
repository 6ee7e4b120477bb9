"""Attention probabilities without giving up sdpa.

HF models return attention probabilities only under eager attention, which materialises every
[queries x keys] matrix and changes the forward's numerics. While a probe needs `attn_probs`, actlab
registers its own attention implementation, `actlab_probe`: the output is computed by the implementation
the model was using (transformers' sdpa function, or the model's own eager function for models that need it,
such as Gemma-2 with its logit soft-capping), so it is bit-identical to a bare forward, and the probabilities
are recomputed exactly (softmax of scaled q.k with the model's mask, softcap and sliding window) for every
`query_stride`-th query only. `query_stride=1` gives the full matrix, equal to eager attention's.

The sampled query rows are positions stride-1, 2*stride-1, ... (`sampled_queries`).
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

from actlab.errors import ConfigError

IMPLEMENTATION = "actlab_probe"
_query_stride: contextvars.ContextVar[int] = contextvars.ContextVar("actlab_query_stride", default=1)
_underlying: contextvars.ContextVar[str] = contextvars.ContextVar("actlab_underlying_attention", default="sdpa")


def sampled_queries(seq_len: int, stride: int) -> torch.Tensor:
    return torch.arange(stride - 1, seq_len, stride)


def probe_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, scaling: float | None = None, **kwargs):
    if _underlying.get() == "eager":
        forward = sys.modules[type(module).__module__].eager_attention_forward
    else:
        forward = sdpa_attention_forward
    output, _ = forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    return output, attention_rows(query, key, attention_mask, scaling, kwargs.get("softcap"), _query_stride.get())


def attention_rows(query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float | None,
                   softcap: float | None, stride: int) -> torch.Tensor:
    """Softmax attention probabilities [batch, heads, sampled queries, keys] in float32."""
    b, h, t_q, d = query.shape
    t_k = key.shape[2]
    rows = sampled_queries(t_q, stride).to(query.device)
    q = query[:, :, rows].float()
    k = key.float()
    if k.shape[1] != h:  # grouped-query attention: each kv head serves h / kv query heads
        k = k.repeat_interleave(h // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scaling if scaling is not None else d**-0.5)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is None:  # sdpa's pure-causal fast path: queries are the last t_q of t_k positions
        allowed = torch.arange(t_k, device=query.device)[None, :] <= (rows + (t_k - t_q))[:, None]
        scores = scores.masked_fill(~allowed, float("-inf"))
    else:
        m = mask[:, :, rows]
        scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m.float()
    return torch.softmax(scores, dim=-1)


def probe_mask(*args, **kwargs):
    """The mask the underlying implementation expects (sdpa: boolean or None; eager: additive floats)."""
    return (eager_mask if _underlying.get() == "eager" else sdpa_mask)(*args, **kwargs)


AttentionInterface.register(IMPLEMENTATION, probe_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, probe_mask)


@contextlib.contextmanager
def probing_attention(model: nn.Module, query_stride: int = 1) -> Iterator[None]:
    """Switch `model` to the probing attention for the duration; always switch back."""
    previous = model.config._attn_implementation
    if previous not in ("sdpa", "eager"):
        raise ConfigError(f"attention probabilities can be probed under sdpa or eager attention, not {previous!r}")
    token = _query_stride.set(query_stride)
    under = _underlying.set(previous)
    model.set_attn_implementation(IMPLEMENTATION)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
        _query_stride.reset(token)
        _underlying.reset(under)
