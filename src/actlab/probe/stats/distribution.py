"""The distribution of activations at every site: per-channel moments and a per-site |x| histogram.

Per channel: count, mean, variance (Chan's pairwise merge of float64 per-batch moments), mean |x|,
mean x^2, min, max, fraction of exact zeros. Per site: the log-bin histogram of |x| (see histogram.py),
from which any quantile and any sparsity "fraction below eps" is read. Both come from one fused pass
(`csrc/site_stats.cpp`) when the kernel is available, else from plain torch operations.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from actlab import native
from actlab.probe.sites import Site, site_channels
from actlab.probe.stats.base import BatchInfo, Statistic, TableContext, kind_of, layer_of
from actlab.probe.stats.histogram import _EDGES, NUM_BINS, SPARSITY_EPS, fraction_below, histogram_of, quantile


def as_channels(x: torch.Tensor, site: Site) -> torch.Tensor:
    """[tokens, channels] view of a site tensor (heads are flattened into channels)."""
    if site.kind in ("v", "o_in"):
        return x.reshape(x.shape[0], -1)
    return x.reshape(-1, x.shape[-1])


def batch_fields(x2: torch.Tensor, use_native: bool = True) -> dict[str, torch.Tensor]:
    """Accumulator fields of one batch [tokens, channels]."""
    n = x2.shape[0]
    kernel = native.load("site_stats") if use_native and x2.device.type == "cpu" else None
    hist = torch.zeros(NUM_BINS, dtype=torch.int64)
    if kernel is not None:
        s, m2, a, lo, hi, zeros = kernel.site_stats(x2, hist)
    else:
        x = x2.float()
        xd = x.double()
        s, a = xd.sum(0), xd.abs().sum(0)
        m2 = (xd - s / n).pow(2).sum(0)
        lo, hi = torch.aminmax(x, dim=0)
        zeros = (x == 0).sum(0)
        hist = histogram_of(x).cpu()
        s, m2, a, lo, hi, zeros = (t.cpu() for t in (s, m2, a, lo, hi, zeros))
    return {"n": torch.tensor(float(n), dtype=torch.float64), "mean": s / n, "m2": m2, "abs_sum": a, "min": lo,
            "max": hi, "zeros": zeros.to(torch.int64), "hist": hist}


class ActivationDistribution(Statistic):
    name = "distribution"
    rules = {"n": "chan", "mean": "chan", "m2": "chan", "abs_sum": "sum", "min": "min", "max": "max",
             "zeros": "sum", "hist": "sum"}

    def __init__(self, use_native: bool = True):
        super().__init__()
        self.use_native = use_native

    def accepts(self, site: Site) -> bool:
        return site.kind != "attn_probs"

    def allocate(self, sites, adapter, batch_size, seq_len):
        f64, inf = torch.float64, float("inf")
        for site in sites:
            if self.accepts(site) and site.name not in self.acc:
                c = site_channels(site, adapter)
                self.acc[site.name] = self.empty_fields({
                    "n": ((), f64, 0.0), "mean": ((c,), f64, 0.0), "m2": ((c,), f64, 0.0),
                    "abs_sum": ((c,), f64, 0.0), "min": ((c,), torch.float32, inf),
                    "max": ((c,), torch.float32, -inf), "zeros": ((c,), torch.int64, 0),
                    "hist": ((NUM_BINS,), torch.int64, 0)})

    def update(self, site: Site, x: torch.Tensor, batch: BatchInfo) -> None:
        fields = batch_fields(as_channels(x, site), self.use_native)
        self.accumulate(site.name, fields)

    # -- reading back ----------------------------------------------------------------------------
    def channel_summary(self, key: str) -> dict[str, torch.Tensor]:
        f = self.acc[key]
        n = f["n"]
        var = f["m2"] / n
        return {"n": n.expand_as(f["mean"]), "mean": f["mean"], "var": var, "std": var.sqrt(),
                "mean_abs": f["abs_sum"] / n, "mean_sq": var + f["mean"] ** 2, "min": f["min"].double(),
                "max": f["max"].double(), "zero_fraction": f["zeros"].double() / n}

    def histogram(self, key: str) -> tuple[np.ndarray, int]:
        f = self.acc[key]
        return f["hist"].numpy(), int(f["zeros"].sum())

    def fraction_below(self, key: str, eps: float) -> float:
        return fraction_below(*self.histogram(key), eps)

    def quantile(self, key: str, q: float) -> float:
        return quantile(self.histogram(key)[0], q)

    def tables(self, ctx: TableContext) -> dict[str, pd.DataFrame]:
        channels, sites, curves, bins = [], [], [], []
        for key in self.acc:
            if float(self.acc[key]["n"]) == 0:  # allocated, never fed
                continue
            layer, kind = layer_of(key), kind_of(key)
            summary = self.channel_summary(key)
            df = pd.DataFrame({k: v.numpy() for k, v in summary.items()})
            df.insert(0, "channel", range(len(df)))
            df.insert(0, "kind", kind)
            df.insert(0, "layer", layer)
            df.insert(0, "site", key)
            channels.append(df)
            counts, zeros = self.histogram(key)
            total = int(counts.sum())
            row = {"site": key, "layer": layer, "kind": kind, "channels": len(df), "n": total,
                   "zero_fraction": zeros / total if total else float("nan"),
                   "mean_abs": float(summary["mean_abs"].mean()),
                   "rms": float(summary["mean_sq"].mean().sqrt()),
                   "max_abs": float(torch.maximum(summary["max"].abs(), summary["min"].abs()).max())}
            row.update({f"q{q:g}": quantile(counts, q / 100) for q in (50, 90, 99, 99.9)})
            sites.append(row)
            curves += [{"site": key, "layer": layer, "kind": kind, "eps": e,
                        "fraction_below": fraction_below(counts, zeros, e)} for e in SPARSITY_EPS]
            nz = np.nonzero(counts)[0]
            bins.append(pd.DataFrame({"site": key, "bin_low": _EDGES[nz], "bin_high": _EDGES[nz + 1],
                                      "count": counts[nz]}))
        layer_int = {"layer": "Int64"}
        channel_table = pd.concat(channels, ignore_index=True).astype(layer_int) if channels else pd.DataFrame()
        if len(channel_table):
            channel_table["n"] = channel_table["n"].astype("int64")
        return {
            "channels": channel_table,
            "sites": pd.DataFrame(sites).astype(layer_int),
            "sparsity": pd.DataFrame(curves).astype(layer_int),
            "histograms": pd.concat(bins, ignore_index=True) if bins else pd.DataFrame(),
        }
