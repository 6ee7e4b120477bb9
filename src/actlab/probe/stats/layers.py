"""Layer redundancy and depth profile of the residual stream.

Per layer, per token (means over tokens):
- cos(block input, block output); ShortGPT's Block Influence BI = 1 - cos (Men et al. 2024);
- cos(x, x + attn) and cos(x + attn, x + attn + mlp): how much each sublayer turns the stream (NaN under a
  parallel residual, where the sublayers' updates are not applied one after the other);
- ||h_out - h_in|| / ||h_in||: relative update size per token (its distribution is the basis of
  L2-norm adaptive computation: tokens whose update is tiny could skip the block);
- RMS of the hidden state leaving the block.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from actlab.probe.sites import Site
from actlab.probe.stats.base import BatchInfo, Statistic, TableContext
from actlab.probe.stats.histogram import NUM_BINS, histogram_of, quantile

SUMS = ("n", "cos_block", "cos_block_sq", "cos_attn", "cos_mlp", "delta", "delta_sq", "rms", "delta_hist")


class LayerRedundancy(Statistic):
    name = "layers"
    rules = {f: "sum" for f in SUMS}

    def __init__(self) -> None:
        super().__init__()
        self._sequential = True
        self._block_in: dict[int, torch.Tensor] = {}
        self._mid: dict[int, torch.Tensor] = {}

    def accepts(self, site: Site) -> bool:
        return site.kind in ("resid_in", "resid_mid", "resid_out")

    def allocate(self, sites, adapter, batch_size, seq_len):
        # under a parallel residual (GPT-NeoX) the MLP reads the block's input: no stream "after attention"
        self._sequential = not adapter.parallel_residual
        skip = {"delta_hist"} | (set() if self._sequential else {"cos_attn", "cos_mlp"})  # absent: NaN in tables
        fields = {f: ((), torch.float64, 0.0) for f in SUMS if f not in skip}
        fields["delta_hist"] = ((NUM_BINS,), torch.int64, 0)
        for layer in sorted({s.layer for s in sites if s.kind == "resid_out"}):
            self.acc.setdefault(f"L{layer}", self.empty_fields(fields))

    def end_batch(self) -> None:
        self._block_in.clear()
        self._mid.clear()

    def update(self, site: Site, x: torch.Tensor, batch: BatchInfo) -> None:
        h = x.reshape(-1, x.shape[-1]).float()
        i = site.layer
        if site.kind == "resid_in":
            self._block_in[i] = h
            return
        block_in = self._block_in.get(i)
        if site.kind == "resid_mid":
            if not self._sequential:
                return
            self._mid[i] = h
            if block_in is not None:
                self._add(i, {"cos_attn": F.cosine_similarity(block_in, h, dim=-1).double().sum()})
            return
        self._block_in[i + 1] = h  # resid_out of layer i is the input of layer i+1
        fields: dict[str, torch.Tensor] = {"rms": h.pow(2).mean(-1).sqrt().double().sum()}
        mid = self._mid.pop(i, None)
        if mid is not None:
            fields["cos_mlp"] = F.cosine_similarity(mid, h, dim=-1).double().sum()
        if block_in is not None:
            cos = F.cosine_similarity(block_in, h, dim=-1).double()
            delta = ((h - block_in).norm(dim=-1) / block_in.norm(dim=-1).clamp_min(1e-12)).double()
            fields.update(n=torch.tensor(float(h.shape[0]), dtype=torch.float64), cos_block=cos.sum(),
                          cos_block_sq=cos.pow(2).sum(), delta=delta.sum(), delta_sq=delta.pow(2).sum(),
                          delta_hist=histogram_of(delta.float()))
            self._block_in.pop(i, None)
        self._add(i, fields)

    def _add(self, layer: int, fields: dict[str, torch.Tensor]) -> None:
        key = f"L{layer}"
        self.accumulate(key, fields)

    def tables(self, ctx: TableContext) -> dict[str, pd.DataFrame]:
        rows = []
        for key, f in sorted(self.acc.items(), key=lambda kv: int(kv[0][1:])):
            n = float(f.get("n", torch.tensor(float("nan"))))
            row = {"layer": int(key[1:]), "tokens": n}
            if n > 0:
                cos = float(f["cos_block"]) / n
                d_mean = float(f["delta"]) / n
                hist = f["delta_hist"].numpy()
                row.update(cos_block=cos, block_influence=1 - cos,
                           cos_block_std=float(np.sqrt(max(float(f["cos_block_sq"]) / n - cos**2, 0.0))),
                           cos_attn=float(f["cos_attn"]) / n if "cos_attn" in f else float("nan"),
                           cos_mlp=float(f["cos_mlp"]) / n if "cos_mlp" in f else float("nan"),
                           delta_ratio_mean=d_mean,
                           delta_ratio_std=float(np.sqrt(max(float(f["delta_sq"]) / n - d_mean**2, 0.0))),
                           delta_ratio_p10=quantile(hist, 0.1), delta_ratio_p50=quantile(hist, 0.5),
                           delta_ratio_p90=quantile(hist, 0.9))
            row["hidden_rms"] = float(f["rms"]) / n if "rms" in f and n == n else float("nan")
            rows.append(row)
        return {"layers": pd.DataFrame(rows)}
