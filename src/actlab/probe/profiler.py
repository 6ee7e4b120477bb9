"""Stream token windows through an unmodified model and feed every site to the statistics that want it."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pandas as pd
import torch

from actlab.models.keys import layer_of
from actlab.models.loader import LoadedModel
from actlab.parallel import World, round_end, rounds
from actlab.probe.hooks import Probe
from actlab.probe.sites import Site, select_sites
from actlab.probe.stats.attention_heads import AttentionHeads
from actlab.probe.stats.base import BatchInfo, Statistic, TableContext
from actlab.probe.stats.depth import AngularDistance
from actlab.probe.stats.distribution import ActivationDistribution
from actlab.probe.stats.experts import ExpertRouting
from actlab.probe.stats.frequency import NeuronFrequency
from actlab.probe.stats.head_roles import HeadRoles
from actlab.probe.stats.layers import LayerRedundancy
from actlab.probe.stats.logit_lens import LogitLens
from actlab.probe.stats.massive import MassiveActivations
from actlab.progress import track

DEFAULT_QUERY_STRIDE = 16
DEFAULT_LENS_STRIDE = 128


def default_statistics(lm: LoadedModel, query_stride: int = DEFAULT_QUERY_STRIDE,
                       lens_stride: int = DEFAULT_LENS_STRIDE) -> list[Statistic]:
    ad = lm.adapter
    return [
        ActivationDistribution(),
        NeuronFrequency(),
        MassiveActivations(),
        AttentionHeads(ad.num_heads, ad.num_kv_heads, ad.vocab_size, query_stride=query_stride),
        LayerRedundancy(),
        AngularDistance(),
        HeadRoles(ad.num_heads),
        LogitLens(ad, position_stride=lens_stride),
        *([ExpertRouting()] if ad.moe_layers else []),
    ]


class Profiler:
    """Collects statistics over any number of `observe` calls; state can be saved, loaded and merged."""

    def __init__(self, lm: LoadedModel, sites: Sequence[str] | str | None = None,
                 statistics: Iterable[Statistic] | None = None, query_stride: int = DEFAULT_QUERY_STRIDE,
                 lens_stride: int = DEFAULT_LENS_STRIDE):
        self.lm = lm
        self.sites: list[Site] = select_sites(lm.adapter, sites)
        self.query_stride = query_stride
        self.statistics: list[Statistic] = list(
            statistics if statistics is not None else default_statistics(lm, query_stride, lens_stride))
        self.routes: dict[str, list[Statistic]] = {
            s.name: [st for st in self.statistics if st.accepts(s)] for s in self.sites}
        self.sites = [s for s in self.sites if self.routes[s.name]]  # hook only what someone reads
        self.windows_seen = 0
        self.tokens_seen = 0
        self._batch: BatchInfo | None = None

    def _deliver(self, site: Site, x: torch.Tensor) -> None:
        x = x.detach()
        for stat in self.routes[site.name]:
            stat.update(site, x, self._batch)

    @torch.no_grad()
    def observe(self, windows: torch.Tensor, first_window_index: int = 0, batch_size: int = 1,
                progress: bool = True, after_batch: Callable[[int], None] | None = None,
                world: World | None = None) -> None:
        """Run `windows` [K, L] (window k has the number first_window_index + k); `after_batch(windows_done)` is
        called after each batch (checkpoints) with the count of leading windows done. With a distributed `world`
        every rank passes the same windows and runs its own batches of each round (`parallel.rounds`);
        `after_batch` is then called on every rank after each round, and rank 0 holds the union only after the
        caller merges the ranks' statistics (`parallel.gather`)."""
        world = world or World()
        model = self.lm.model
        device = self.lm.device
        batches = list(rounds(len(windows), batch_size, world))
        for stat in self.statistics:
            stat.allocate(self.sites, self.lm.adapter, min(batch_size, len(windows)), windows.shape[1])
        with Probe(self.lm, self.sites, self._deliver, query_stride=self.query_stride):
            for done, mine in track(enumerate(batches, 1), total=len(batches), description="profiling",
                                    enabled=progress and world.main):
                if len(mine):
                    self._run_batch(model, device, windows[mine.start:mine.stop],
                                    torch.arange(mine.start, mine.stop) + first_window_index)
                if after_batch is not None:
                    after_batch(first_window_index + round_end(len(windows), batch_size, world, 0, done))

    def _run_batch(self, model: Any, device: Any, ids: torch.Tensor, index: torch.Tensor) -> None:
        self._batch = BatchInfo(ids=ids.cpu(), window_index=index)
        try:
            model(input_ids=ids.to(device), use_cache=False)
            for stat in self.statistics:
                stat.finish_batch(self._batch)
        finally:
            for stat in self.statistics:
                stat.end_batch()
            self._batch = None
        self.windows_seen += len(ids)
        self.tokens_seen += ids.numel()

    def run_probes(self) -> bool:
        """Statistics measured on constructed inputs (head roles) rather than the corpus: run them once, where
        the profile reads attention and they have no scores yet. True if anything ran."""
        if not any(s.kind == "attn_probs" for s in self.sites):
            return False
        ran = False
        for stat in self.statistics:
            if isinstance(stat, HeadRoles) and not stat.measured():
                stat.run_probes(self.lm)
                ran = True
        return ran

    # -- state -----------------------------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        return {"sites": [s.name for s in self.sites], "query_stride": self.query_stride,
                "statistics": {st.name: st.settings() for st in self.statistics}}

    def state(self) -> dict[str, torch.Tensor]:
        return {f"{st.name}/{k}": v for st in self.statistics for k, v in st.state().items()}

    def load_state(self, state: dict[str, torch.Tensor], windows: int, tokens: int) -> None:
        order = {s.name: i for i, s in enumerate(self.sites)}

        def rank(key: str) -> tuple:  # the order a fresh run allocates: sites in forward order, layers by number
            layer = layer_of(key)
            return order.get(key, len(order)), -1 if layer is None else layer, key

        for st in self.statistics:
            prefix = f"{st.name}/"
            st.load_state({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)})
            st.acc = {k: st.acc[k] for k in sorted(st.acc, key=rank)}
        self.windows_seen, self.tokens_seen = windows, tokens

    def merge(self, other: Profiler) -> None:
        if other.settings() != self.settings():
            raise ValueError("profiles with different sites or statistic settings cannot be merged")
        for mine, theirs in zip(self.statistics, other.statistics):
            mine.merge(theirs)
        self.windows_seen += other.windows_seen
        self.tokens_seen += other.tokens_seen

    def statistic(self, name: str) -> Statistic:
        for st in self.statistics:
            if st.name == name:
                return st
        raise KeyError(name)

    # -- tables ----------------------------------------------------------------------------------
    def tables(self) -> dict[str, pd.DataFrame]:
        tok = self.lm.tokenizer
        ctx = TableContext(decode=lambda i: tok.decode([i]), sites={s.name: s for s in self.sites})
        out: dict[str, pd.DataFrame] = {}
        for st in self.statistics:
            out.update(st.tables(ctx))
        out["layers"] = per_layer_table(out, self.lm.adapter.num_layers)
        for name in ("logit_lens", "attention_layers"):
            out.pop(name, None)
        return out


def per_layer_table(tables: dict[str, pd.DataFrame], num_layers: int) -> pd.DataFrame:
    """One row per layer: redundancy, logit lens, residual peaks and residual-stream magnitudes."""
    table = pd.DataFrame({"layer": range(num_layers)})
    for name in ("layers", "logit_lens", "attention_layers"):
        part = tables.get(name)
        if part is not None and len(part):
            table = table.merge(part, on="layer", how="left")
    sites = tables.get("sites")
    if sites is not None and len(sites):
        resid = sites[sites["kind"] == "resid_out"][["layer", "q50", "max_abs"]].copy()
        resid = resid.rename(columns={"q50": "resid_median_abs", "max_abs": "resid_max_abs"})
        resid["layer"] = resid["layer"].astype(int)
        table = table.merge(resid, on="layer", how="left")
        table["resid_max_over_median"] = table["resid_max_abs"] / table["resid_median_abs"]
    return table


def folded(make: Callable[[], Profiler], parts: Iterable[tuple[dict[str, torch.Tensor], int, int]]) -> Profiler:
    """One profiler (each made by `make`) holding the union of saved states (state, windows, tokens), folded by
    each statistic's merge rule in the order given."""
    merged: Profiler | None = None
    for state, windows, tokens in parts:
        part = make()
        part.load_state(state, windows, tokens)
        if merged is None:
            merged = part
        else:
            merged.merge(part)
    if merged is None:
        raise ValueError("nothing to fold")
    return merged
