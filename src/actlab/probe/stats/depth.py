"""Angular distance between the residual stream at any two depths (Gromov et al. 2024, "The Unreasonable
Ineffectiveness of the Deeper Layers").

With x_l the input of block l (x_L the output of the last block), the angular distance between depths a < b is
arccos(cos(x_a, x_b)) / pi, in [0, 1]: 0 when blocks a..b-1 leave every token's direction unchanged. A span of
n blocks starting at l whose distance d(l, l+n) is small is the cheapest contiguous span to remove. The paper
measures it at the last token; this is the mean over every token (a window's last token is one sample of it).
Kept as sums over tokens of the full (L+1) x (L+1) matrix, so it merges by addition.
"""

from __future__ import annotations

import math

import pandas as pd
import torch
import torch.nn.functional as F

from actlab.probe.sites import Site
from actlab.probe.stats.base import BatchInfo, Statistic, TableContext

KEY = "depth"


class AngularDistance(Statistic):
    name = "angular"
    rules = {"n": "sum", "distance": "sum"}

    def __init__(self) -> None:
        super().__init__()
        self._states: dict[int, torch.Tensor] = {}
        self._last = -1

    def accepts(self, site: Site) -> bool:
        return site.kind in ("resid_in", "resid_out")

    def allocate(self, sites, adapter, batch_size, seq_len):
        self._last = adapter.num_layers - 1
        depths = adapter.num_layers + 1
        self.acc.setdefault(KEY, self.empty_fields({"n": ((), torch.float64, 0.0),
                                                    "distance": ((depths, depths), torch.float64, 0.0)}))

    def update(self, site: Site, x: torch.Tensor, batch: BatchInfo) -> None:
        # resid_out of block l is resid_in of block l+1 (a profile of every site hooks only one of the two)
        depth = site.layer if site.kind == "resid_in" else site.layer + 1
        if depth not in self._states:
            self._states[depth] = F.normalize(x.reshape(-1, x.shape[-1]).float(), dim=-1)

    def finish_batch(self, batch: BatchInfo) -> None:
        depths = self._last + 2
        if len(self._states) != depths:
            return  # a run over some sites only: no full matrix from this batch
        unit = torch.stack([self._states[d] for d in range(depths)])  # [depths, tokens, channels]
        cos = torch.einsum("atc,btc->tab", unit, unit).clamp(-1.0, 1.0)
        self.accumulate(KEY, {"n": torch.tensor(float(unit.shape[1]), dtype=torch.float64),
                              "distance": (torch.arccos(cos.double()) / math.pi).sum(0)})

    def end_batch(self) -> None:
        self._states.clear()

    def matrix(self) -> torch.Tensor:
        """Mean angular distance between depths a and b, [L+1, L+1] (NaN before any token)."""
        f = self.acc.get(KEY)
        if f is None or float(f["n"]) == 0:
            return torch.full((self._last + 2,) * 2, float("nan"), dtype=torch.float64)
        return f["distance"] / f["n"]

    def tables(self, ctx: TableContext) -> dict[str, pd.DataFrame]:
        d = self.matrix()
        rows = [{"start": a, "span": b - a, "angular_distance": float(d[a, b])}
                for a in range(d.shape[0]) for b in range(a + 1, d.shape[0])]
        return {"angular_distance": pd.DataFrame(rows)}
