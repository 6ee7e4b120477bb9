"""Activation frequency of every MLP neuron: how often |a| > eps. Dead neurons never fire; always-on ones always do."""

from __future__ import annotations

import pandas as pd
import torch

from actlab import native
from actlab.probe.sites import Site, site_channels
from actlab.probe.stats.base import BatchInfo, Statistic, TableContext, layer_of

DEFAULT_EPS = (1e-3, 1e-2, 1e-1)
DEAD_BELOW = 1e-3  # frequency under which a neuron is reported dead
ALWAYS_ON_ABOVE = 0.999


def middle_frequency_column(columns) -> str:
    """The neurons table's `freq_<eps>` column at the middle threshold: the one `dead` and `always_on` use."""
    freq = [c for c in columns if str(c).startswith("freq_")]
    if not freq:
        raise KeyError("the neurons table has no freq_<eps> columns")
    return freq[len(freq) // 2]


class NeuronFrequency(Statistic):
    name = "frequency"
    rules = {"active": "sum", "n": "sum"}

    def __init__(self, eps: tuple[float, ...] = DEFAULT_EPS, kinds: tuple[str, ...] = ("down_in",)):
        super().__init__()
        self.eps = tuple(float(e) for e in eps)
        self.kinds = tuple(kinds)

    def settings(self):
        return {"eps": list(self.eps), "kinds": list(self.kinds)}

    def accepts(self, site: Site) -> bool:
        return site.kind in self.kinds

    def allocate(self, sites, adapter, batch_size, seq_len):
        for site in sites:
            if self.accepts(site) and site.name not in self.acc:
                c = site_channels(site, adapter)
                self.acc[site.name] = self.empty_fields({"active": ((len(self.eps), c), torch.int64, 0),
                                                         "n": ((1,), torch.int64, 0)})

    def update(self, site: Site, x: torch.Tensor, batch: BatchInfo) -> None:
        a = x.reshape(-1, x.shape[-1])
        kernel = native.load("site_stats") if a.device.type == "cpu" else None
        if kernel is not None:
            active = kernel.count_above(a, list(self.eps))
        else:
            mag = a.float().abs()
            active = torch.stack([(mag > e).sum(dim=0) for e in self.eps]).cpu()  # [eps, neurons]
        fields = {"active": active, "n": torch.tensor([a.shape[0]])}
        self.accumulate(site.name, fields)

    def frequency(self, key: str) -> torch.Tensor:
        f = self.acc[key]
        return f["active"].double() / f["n"].double()

    def tables(self, ctx: TableContext) -> dict[str, pd.DataFrame]:
        frames = []
        for key in self.acc:
            if int(self.acc[key]["n"].sum()) == 0:
                continue
            freq = self.frequency(key)
            df = pd.DataFrame({f"freq_{e:g}": freq[i].numpy() for i, e in enumerate(self.eps)})
            df.insert(0, "neuron", range(len(df)))
            df.insert(0, "layer", layer_of(key))
            df.insert(0, "site", key)
            mid = middle_frequency_column(df.columns)
            df["dead"] = df[mid] < DEAD_BELOW
            df["always_on"] = df[mid] > ALWAYS_ON_ABOVE
            frames.append(df)
        return {"neurons": pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()}
