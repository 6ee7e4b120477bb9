"""Logit lens (nostalgebraist 2020): next-token loss when a layer's residual stream is decoded directly
by the final norm and the LM head. Evaluated at every `position_stride`-th position of each window;
the sampled states of all layers are decoded together after the forward pass, so the LM head's
weights are read once per batch rather than once per layer."""

from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F

from actlab.models.adapter import ModelAdapter
from actlab.models.placement import materialized
from actlab.probe.sites import Site
from actlab.probe.stats.base import BatchInfo, Statistic, TableContext


def lens_positions(seq_len: int, stride: int) -> torch.Tensor:
    """Positions whose next token is predicted: stride-1, 2*stride-1, ... (all < seq_len - 1); windows no
    longer than the stride still get one, their last predicting position."""
    return torch.arange(min(stride, seq_len - 1) - 1, seq_len - 1, stride)


def decode_residual(adapter: ModelAdapter, h: torch.Tensor) -> torch.Tensor:
    """Final norm + LM head (+ Gemma's logit soft-capping), bypassing hooks on those modules."""
    with materialized(adapter.lm_head) as head, materialized(adapter.final_norm):  # offloaded weights read in
        weight = head.weight
        logits = F.linear(adapter.final_norm.forward(h.to(weight.device, weight.dtype)), weight,
                          getattr(head, "bias", None))
    cap = getattr(adapter.config, "final_logit_softcapping", None)
    return cap * torch.tanh(logits / cap) if cap else logits


class LogitLens(Statistic):
    name = "logit_lens"
    rules = {"n": "sum", "loss": "sum", "correct": "sum"}

    def __init__(self, adapter: ModelAdapter, position_stride: int = 128):
        super().__init__()
        self.adapter = adapter
        self.position_stride = position_stride
        self._pending: dict[int, torch.Tensor] = {}
        self._buffer: torch.Tensor | None = None  # [layers, batch, positions, hidden], reused every batch
        self._slot: dict[int, int] = {}

    def settings(self):
        return {"position_stride": self.position_stride}

    def accepts(self, site: Site) -> bool:
        return site.kind == "resid_out"

    def allocate(self, sites, adapter, batch_size, seq_len):
        layers = sorted({s.layer for s in sites if self.accepts(s)})
        for layer in layers:
            self.acc.setdefault(f"L{layer}", self.empty_fields({f: ((), torch.float64, 0.0) for f in self.rules}))
        positions = len(lens_positions(seq_len, self.position_stride))
        shape = (len(layers), batch_size, positions, self.adapter.hidden_size)
        if self._buffer is None or self._buffer.shape != shape:
            self._buffer = torch.empty(shape, dtype=self.adapter.lm_head.weight.dtype)
            self._slot = {layer: j for j, layer in enumerate(layers)}

    def update(self, site: Site, x: torch.Tensor, batch: BatchInfo) -> None:
        b, t = batch.ids.shape
        pos = lens_positions(t, self.position_stride)
        if len(pos):
            sampled = x.reshape(b, t, -1)[:, pos]
            if self._buffer is not None and site.layer in self._slot and self._buffer.shape[1:3] == sampled.shape[:2]:
                self._pending[site.layer] = self._buffer[self._slot[site.layer]].copy_(sampled)
            else:
                self._pending[site.layer] = sampled.clone()  # do not pin the whole stream

    def end_batch(self) -> None:
        self._pending = {}

    @torch.no_grad()
    def finish_batch(self, batch: BatchInfo) -> None:
        if not self._pending:
            return
        layers = sorted(self._pending)
        h = torch.stack([self._pending[i] for i in layers])  # [layers, B, P, C]
        logits = decode_residual(self.adapter, h).float()
        pos = lens_positions(batch.seq_len, self.position_stride)
        target = batch.ids[:, pos + 1].to(logits.device).expand(len(layers), -1, -1)
        loss = F.cross_entropy(logits.flatten(0, 2), target.flatten(), reduction="none").view(len(layers), -1)
        correct = (logits.argmax(-1) == target).flatten(1)
        for j, layer in enumerate(layers):
            fields = {"n": torch.tensor(float(loss.shape[1]), dtype=torch.float64),
                      "loss": loss[j].double().sum().cpu(), "correct": correct[j].double().sum().cpu()}
            key = f"L{layer}"
            self.accumulate(key, fields)

    def tables(self, ctx: TableContext) -> dict[str, pd.DataFrame]:
        rows = [{"layer": int(k[1:]), "logit_lens_loss": float(f["loss"] / f["n"]),
                 "logit_lens_top1": float(f["correct"] / f["n"]), "logit_lens_tokens": int(f["n"])}
                for k, f in sorted(self.acc.items(), key=lambda kv: int(kv[0][1:])) if float(f["n"]) > 0]
        return {"logit_lens": pd.DataFrame(rows)}
