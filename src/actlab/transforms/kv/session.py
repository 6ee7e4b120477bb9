"""The lifecycle of KV recipes on an HF model: the masked reference.

While a KV recipe is attached, the model's attention runs through actlab's own implementation, `actlab_kv`. The
HF cache keeps every token; the session keeps, per layer, which cached positions each KV head still holds, and
the attention ignores the others (computed by transformers' sdpa function, or the model's own eager function,
with the mask extended per head). This is what a cache that really drops those tokens computes - keys carry
their rotary embedding from when they were cached, so positions need no renumbering - while every head may
keep its own count, which a dense HF cache cannot hold; the decode engine's ragged cache is checked against it.

When the cache is compressed:
- phase "prefill": once, at the end of the first forward of a sequence (the prompt), by the press's scores with
  the prompt's last queries as its observation window;
- phase "decode": after every forward, each head back to its budget for the tokens it can see (H2O and TOVA's
  eviction to a running budget), scored with that forward's queries;
- `running_budget()` makes every recipe behave as "decode" (perplexity under compression: the cache held to its
  budget as it grows).
A sequence starts where a forward finds an empty cache (as many keys as queries). Quantization (KIVI) rewrites
a token group in the cache once it is complete, after the forward that completed it attended in full precision.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from actlab.errors import ConfigError
from actlab.transforms.kv.base import ALL_QUERIES, CacheView, keep_mask, received_attention
from actlab.transforms.kv.budgets import keep_counts, visible_tokens
from actlab.transforms.kv.kivi import quantize_keys, quantize_values, value_group

IMPLEMENTATION = "actlab_kv"
SESSION = "_actlab_kv_session"  # the attribute that ties an attention module to its session while attached
_running: contextvars.ContextVar[bool] = contextvars.ContextVar("actlab_kv_running", default=False)


@contextlib.contextmanager
def running_budget() -> Iterator[None]:
    """Within the block, attached KV recipes compress after every forward, whatever their phase."""
    token = _running.set(True)
    try:
        yield
    finally:
        _running.reset(token)


def kv_attention_forward(module, query, key, value, attention_mask, scaling=None, **kwargs):
    session = module.__dict__.get(SESSION)
    if session is None:  # a module the session does not know (not a decoder layer's attention)
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
    return session.attend(module, query, key, value, attention_mask, scaling, kwargs)


AttentionInterface.register(IMPLEMENTATION, kv_attention_forward)
AttentionMaskInterface.register(IMPLEMENTATION, sdpa_mask)  # boolean (or None: plain causal); eager gets floats


@dataclass
class LayerCache:
    """What one layer's cache holds, by absolute position."""

    alive: torch.Tensor  # [rows (1: shared by every row), KV, positions] bool
    end: int = 0  # positions seen
    fresh: bool = True  # this forward started the sequence
    accumulated: torch.Tensor | None = None  # [rows, KV, positions]: attention received so far (H2O)
    quantized: int = 0  # positions below this are quantized in the cache


class KVSession:
    """The KV recipes attached to one model (at most one that evicts, one that quantizes) and their cache state."""

    def __init__(self, lm: Any, underlying: str):
        self.lm, self.underlying = lm, underlying
        ad = lm.adapter
        self.index = {id(layer.attn): layer.index for layer in ad.layers}
        self.windows = [ad.sliding_window(layer) for layer in ad.layers]
        self.evict = self.quant = None
        self.press = None
        self.ratios: torch.Tensor | None = None
        self.layers: dict[int, LayerCache] = {}
        self.record: dict[int, tuple] | None = None  # set to a dict: each layer's attention inputs are kept there
        self.trace: dict[int, list] | None = None  # set to a dict: (first query, held [KV, positions]) per forward
        self.memo: dict | None = None  # while replaying: results every replay of one record shares
        self.kept = self.full = 0  # cached tokens the queries could use, and would without compression

    @classmethod
    def attached(cls, lm: Any, stack: contextlib.ExitStack) -> KVSession:
        """The model's session: the one a KV recipe before this one in the composition started, or a new one that
        switches the model's attention until `stack` closes."""
        modules = [layer.attn for layer in lm.adapter.layers]
        existing = modules[0].__dict__.get(SESSION) if modules else None
        if existing is not None:
            return existing
        previous = lm.model.config._attn_implementation
        if previous not in ("sdpa", "eager"):
            raise ConfigError(f"KV recipes run under sdpa or eager attention, not {previous!r} (load the model with "
                              "attn_implementation='sdpa')")
        session = cls(lm, previous)
        for module in modules:
            module.__dict__[SESSION] = session
        lm.model.set_attn_implementation(IMPLEMENTATION)

        def detach() -> None:
            lm.model.set_attn_implementation(previous)
            for module in modules:
                module.__dict__.pop(SESSION, None)

        stack.callback(detach)
        return session

    def add(self, recipe: Any) -> KVSession:
        if recipe.evicts:
            if self.evict is not None:
                raise ConfigError(f"{self.evict.describe()} and {recipe.describe()} both evict cached tokens")
            self.evict, self.press, self.ratios = recipe, recipe.make_press(), recipe.ratios(self.lm.adapter)
        if recipe.bits:
            if self.quant is not None:
                raise ConfigError(f"{self.quant.describe()} and {recipe.describe()} both quantize the cache")
            value_group(self.lm.adapter.head_dim, recipe.group)  # a group that does not divide heads: one line
            self.quant = recipe
        return self

    def question_aware(self) -> bool:
        return self.evict is not None and self.evict.question_aware

    def summary(self, lm: Any) -> dict[str, Any]:
        return {"kv_kept_fraction": self.kept / self.full} if self.full else {}

    # -- one attention call -------------------------------------------------------------------------------
    def attend(self, module, query, key, value, mask, scaling, kwargs):
        i = self.index[id(module)]
        b, heads, tq, d = query.shape
        if self.record is not None:
            scale = scaling if scaling is not None else d ** -0.5
            self.record[i] = (query.detach(), key.detach(), value.detach(), scale, kwargs.get("softcap"))
        tk = key.shape[2]
        state = self._advance(i, b, tq, tk, kwargs.get("position_ids"))
        alive = state.alive[..., state.end - tk:state.end]
        if self.trace is not None:  # what this forward's queries see, before it compresses
            self.trace.setdefault(i, []).append((state.end - tq, state.alive[0, :, :state.end].clone()))
        if bool(alive.all()):  # nothing evicted among these keys: the model's own computation, bit for bit
            out = self._underlying(module, query, key, value, mask, scaling, kwargs)
        else:
            allowed = self._allowed(mask, alive, heads, tq, tk, state.end)
            out = self._underlying(module, query, key, value, allowed, scaling, kwargs, per_head=True)
        if self.evict is not None:
            self.compress_layer(i, state, query, key, value, scaling, kwargs.get("softcap"))
        if self.quant is not None:
            self._quantize(state, key, value)
        return out, None

    def replay(self, record: dict[int, tuple], cache: Any, memo: dict | None = None) -> None:
        """What `attend` does at the end of a sequence's first forward - the fresh state, its compression, the
        quantization of the cache - from that forward's recorded attention inputs (`record`: a session's `record`
        of the dense model reading the document), applied to `cache`, a copy of that forward's cache. `memo` keeps
        what every replay of this record computes alike (H2O's attention over the whole document) for the next."""
        self.memo = memo
        for i, (query, key, value, scaling, softcap) in record.items():
            state = self._advance(i, query.shape[0], query.shape[2], key.shape[2], None)
            if self.evict is not None:
                self.compress_layer(i, state, query, key, value, scaling, softcap)
            if self.quant is not None:
                entry = cache.layers[i]
                self._quantize(state, entry.keys, entry.values)
        self.memo = None

    def _advance(self, i: int, rows: int, tq: int, tk: int, position_ids) -> LayerCache:
        """The layer's state with this forward's positions added (a new sequence when the cache was empty)."""
        kv = self.lm.adapter.num_kv_heads
        state = self.layers.get(i)
        fresh = state is None or tk == tq
        end = int(position_ids[0, -1]) + 1 if position_ids is not None else (tq if fresh else state.end + tq)
        if fresh:
            state = self.layers[i] = LayerCache(torch.ones(1, kv, end, dtype=torch.bool), end)
            return state
        start = end - tq  # a forward may also re-read positions it has seen (another continuation)
        if state.alive.shape[0] not in (1, rows):
            raise ConfigError(f"a KV-compressed cache of {state.alive.shape[0]} rows cannot serve a batch of {rows}")
        new = torch.ones(state.alive.shape[0], kv, tq, dtype=torch.bool)
        state.alive = torch.cat([state.alive[..., :start], new], -1)
        if state.accumulated is not None:
            zeros = torch.zeros(state.accumulated.shape[0], kv, tq)
            state.accumulated = torch.cat([state.accumulated[..., :start], zeros], -1)
        state.quantized = min(state.quantized, start)
        state.end, state.fresh = end, False
        return state

    def _allowed(self, mask, alive, heads: int, tq: int, tk: int, end: int) -> torch.Tensor:
        """[B, H, tq, tk] bool: what each query head may attend - the model's mask (causal, window, padding) and
        the tokens its KV head still holds."""
        if mask is None:  # plain causal
            q_pos = torch.arange(end - tq, end, device=alive.device)
            k_pos = torch.arange(end - tk, end, device=alive.device)
            mask = (k_pos[None] <= q_pos[:, None]).view(1, 1, tq, tk)
        per_head = alive.repeat_interleave(heads // alive.shape[1], dim=1)[:, :, None, :]
        return mask.to(per_head.device) & per_head

    def _underlying(self, module, query, key, value, mask, scaling, kwargs, per_head: bool = False):
        if self.underlying == "eager":
            forward = sys.modules[type(module).__module__].eager_attention_forward
            if mask is not None and mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=query.dtype).masked_fill(~mask, torch.finfo(query.dtype).min)
            return forward(module, query, key, value, mask, scaling=scaling, **kwargs)[0]
        if not per_head:
            return sdpa_attention_forward(module, query, key, value, mask, scaling=scaling, **kwargs)[0]
        groups = query.shape[1] // key.shape[1]
        out = F.scaled_dot_product_attention(query, repeat_kv(key, groups), repeat_kv(value, groups), attn_mask=mask,
                                             scale=scaling)
        return out.transpose(1, 2).contiguous()

    # -- eviction -------------------------------------------------------------------------------------------
    def compress_layer(self, i: int, state: LayerCache, query, key, value, scaling, softcap) -> None:
        """After layer i attended `query` [B, H, tq, D] over `key` / `value` [B, KV, tk, D] (positions up to
        state.end): compress its cache if due (the decode engine calls this on its ragged cache laid out by
        position)."""
        press, window, end = self.press, self.windows[i], state.end
        tq, tk = query.shape[2], key.shape[2]
        due = state.fresh or self.evict.phase == "decode" or _running.get()
        if press.accumulates and due:  # every forward whose attention a later compression reads
            self._accumulate(i, state, query, key, scaling, softcap, window)
        visible = visible_tokens(end, window)
        if due and visible:
            keep = keep_counts(self.ratios[i], visible)
            lo = end - visible
            alive = state.alive[..., lo:end]
            if bool((alive.sum(-1) > keep.view(1, -1)).any()):
                w = press.window if press.window != ALL_QUERIES else tq
                w = min(w, tq, int(keep.min()))  # a short prompt shortens the window (it is always kept)
                view = CacheView(key[:, :, tk - visible:], value[:, :, tk - visible:],
                                 query[:, :, tq - w:] if w > 0 else None, scaling, softcap,
                                 positions=torch.arange(lo, end), alive=alive,
                                 accumulated=None if state.accumulated is None else state.accumulated[..., lo:end],
                                 window=window)
                kept = keep_mask(press.scores(view, keep), keep)
                if state.alive.shape[0] != kept.shape[0]:
                    state.alive = state.alive.expand(kept.shape[0], -1, -1).clone()
                state.alive[..., lo:end] = kept
        held = state.alive[..., end - visible:end]
        self.kept += int(held.sum()) * (query.shape[0] // held.shape[0])
        self.full += visible * key.shape[1] * query.shape[0]

    def _accumulate(self, i: int, state: LayerCache, query, key, scaling, softcap, window) -> None:
        """Add the attention this forward's queries paid to each cached token (H2O's running score)."""
        tq, tk, end = query.shape[2], key.shape[2], state.end
        if state.accumulated is None:
            state.accumulated = torch.zeros(state.alive.shape[0], key.shape[1], end)
        view = CacheView(key, key, None, scaling, softcap, positions=torch.arange(end - tk, end),
                         alive=state.alive[..., end - tk:end], window=window)
        if self.memo is not None and state.fresh:  # a replayed first forward: every cached token alive, shared
            if ("received", i) not in self.memo:
                self.memo["received", i] = received_attention(view, query, torch.arange(end - tq, end)).float()
            received = self.memo["received", i]
        else:
            received = received_attention(view, query, torch.arange(end - tq, end)).float()
        if state.accumulated.shape[0] != received.shape[0]:
            state.accumulated = state.accumulated.expand(received.shape[0], -1, -1).clone()
        state.accumulated[..., end - tk:end] += received

    # -- quantization ------------------------------------------------------------------------------------------
    def _quantize(self, state: LayerCache, key, value) -> None:
        """Rewrite, in the cache itself, every token group this forward completed with its quantized values."""
        g, bits, end, tk = self.quant.group, self.quant.bits, state.end, key.shape[2]
        first = max(state.quantized, -(-(end - tk) // g) * g)  # groups wholly in the cache
        last = end // g * g
        if last > first:
            lo, hi = first - (end - tk), last - (end - tk)
            with torch.no_grad():
                k = key[:, :, lo:hi]
                key[:, :, lo:hi] = quantize_keys(k.unflatten(2, (-1, g)), bits).flatten(2, 3)
                value[:, :, lo:hi] = quantize_values(value[:, :, lo:hi], bits, g)
        state.quantized = max(state.quantized, last)


def question_aware(lm: Any) -> bool:
    """Whether a KV recipe attached to `lm` compresses after the question (evaluation then runs the document and
    the question as one prompt) rather than after the document alone."""
    layers = lm.adapter.layers
    session = layers[0].attn.__dict__.get(SESSION) if layers else None
    return session is not None and session.question_aware()
