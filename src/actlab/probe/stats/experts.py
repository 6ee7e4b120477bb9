"""Expert routing in mixture-of-experts layers: how often the router picks each expert, with what weight, and
how often as a token's first choice. Load imbalance, experts that are never used and experts that take most
tokens show here (the balance the auxiliary loss of Switch / Mixtral training aims at is a share of k/E each)."""

from __future__ import annotations

import pandas as pd
import torch

from actlab.probe.sites import Site, site_channels
from actlab.probe.stats.base import BatchInfo, Statistic, TableContext, layer_of


class ExpertRouting(Statistic):
    name = "experts"
    rules = {"chosen": "sum", "first": "sum", "weight": "sum", "n": "sum"}

    def accepts(self, site: Site) -> bool:
        return site.kind == "routing"

    def allocate(self, sites, adapter, batch_size, seq_len):
        for site in sites:
            if self.accepts(site) and site.name not in self.acc:
                e = site_channels(site, adapter)
                self.acc[site.name] = self.empty_fields({"chosen": ((e,), torch.int64, 0),
                                                         "first": ((e,), torch.int64, 0),
                                                         "weight": ((e,), torch.float64, 0),
                                                         "n": ((1,), torch.int64, 0)})

    def update(self, site: Site, x: torch.Tensor, batch: BatchInfo) -> None:
        w = x.reshape(-1, x.shape[-1]).float().cpu()
        experts = w.shape[1]
        self.accumulate(site.name, {"chosen": (w > 0).sum(dim=0), "weight": w.double().sum(dim=0),
                                    "first": torch.bincount(w.argmax(dim=1), minlength=experts),
                                    "n": torch.tensor([w.shape[0]])})

    def tables(self, ctx: TableContext) -> dict[str, pd.DataFrame]:
        frames = []
        for key, f in self.acc.items():
            n = int(f["n"].sum())
            if n == 0:
                continue
            chosen = f["chosen"].double()
            share = (chosen / n).numpy()
            per_token = float(chosen.sum()) / n  # k: experts each token uses
            frames.append(pd.DataFrame({
                "site": key, "layer": layer_of(key), "expert": range(len(share)),
                "share": share,  # fraction of tokens routed to the expert (sums to k over the experts)
                "load": share * len(share) / per_token,  # share / (k / E): 1 is a perfectly balanced router
                "first_choice": (f["first"].double() / n).numpy(),
                "mean_weight": (f["weight"] / chosen.clamp(min=1)).numpy(),  # the weight it gets when chosen
                "tokens": n,
            }))
        return {"experts": pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()}
