"""Massive activations (Sun et al. 2024): the largest |x| in the residual stream, with where they occur."""

from __future__ import annotations

import pandas as pd
import torch

from actlab.probe.sites import Site
from actlab.probe.stats.base import BatchInfo, Statistic, TableContext, layer_of

FIELDS = ("value", "channel", "window", "position", "token")


class MassiveActivations(Statistic):
    """Top-k |x| per residual-stream site, each with (channel, window, position, token)."""

    name = "massive"

    def __init__(self, k: int = 16, kinds: tuple[str, ...] = ("resid_in", "resid_out")):
        super().__init__()
        self.k = k
        self.kinds = tuple(kinds)

    def settings(self):
        return {"k": self.k, "kinds": list(self.kinds)}

    def accepts(self, site: Site) -> bool:
        return site.kind in self.kinds

    def allocate(self, sites, adapter, batch_size, seq_len):
        for site in sites:
            if self.accepts(site) and site.name not in self.acc:
                self.acc[site.name] = self.empty_fields(
                    {"value": ((self.k,), torch.float32, float("-inf")),
                     **{f: ((self.k,), torch.int64, -1) for f in FIELDS[1:]}})

    def update(self, site: Site, x: torch.Tensor, batch: BatchInfo) -> None:
        channels = x.shape[-1]
        flat = x.reshape(-1).float().abs()
        values, idx = flat.topk(min(self.k, flat.numel()))
        token_index = idx // channels
        b, pos = token_index // batch.seq_len, token_index % batch.seq_len
        found = {"value": values, "channel": idx % channels, "window": batch.window_index[b],
                 "position": pos, "token": batch.ids[b, pos]}
        self.allocate([site], None, 0, 0)
        self.merge_key(self.acc[site.name], found)

    def merge_key(self, a, b):
        """Keep the k largest of a and b, in place in a's fixed-size buffers (empty slots hold -inf)."""
        merged = {f: torch.cat([a[f], b[f]]) for f in FIELDS}
        # stable order: larger value first; ties broken by (window, position, channel) so merge == one pass
        order = sorted(range(len(merged["value"])), key=lambda i: (-float(merged["value"][i]),
                       int(merged["window"][i]), int(merged["position"][i]), int(merged["channel"][i])))
        keep = torch.tensor(order[: self.k], dtype=torch.long)
        for f in FIELDS:
            a[f].copy_(merged[f][keep])
        return a

    def tables(self, ctx: TableContext) -> dict[str, pd.DataFrame]:
        rows = []
        for key, f in self.acc.items():
            for rank in range(int(torch.isfinite(f["value"]).sum())):
                tok = int(f["token"][rank])
                rows.append({"site": key, "layer": layer_of(key), "rank": rank, "value": float(f["value"][rank]),
                             "channel": int(f["channel"][rank]), "window": int(f["window"][rank]),
                             "position": int(f["position"][rank]), "token_id": tok, "token": ctx.decode(tok)})
        return {"top_activations": pd.DataFrame(rows).astype({"layer": "Int64"}) if rows else pd.DataFrame()}
