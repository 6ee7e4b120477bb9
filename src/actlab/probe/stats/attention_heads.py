"""Per-head attention anatomy: attention sinks, entropy, later-token sinks, value drain, residual peaks.

Reads `L{i}.attn_probs` (rows for the sampled queries, see probe.attention), `L{i}.v` and `L{i}.resid_out`.
Per head h of layer i, over sampled query rows at positions p > 0:
- first_token_mass: mean attention probability on position 0 (the classic sink, Xiao et al. 2023), over the
  queries that can see it (a sliding-window layer's later queries cannot: Gemma, Mistral);
- entropy: mean Shannon entropy (nats) of a query's attention distribution;
- later sinks: keys k > 0 whose mean received mass, over the sampled queries that can see k, exceeds
  `sink_threshold` (counted per window; their tokens are tallied);
- value drain: mean value-vector norm at position 0 and at later sinks vs. the other positions
  (sinks tend to carry tiny values: attention is "parked" there, Gu et al. 2024);
- residual peak: norm of the block's output at position 0 / at later sinks vs. the median position;
- sink_mass: mass on the first SINK_TOKENS positions (over the queries that can see position 0);
- local_mass: mass on the RECENT_WINDOW most recent keys (the query's own included), and streaming_mass: on
  those and the first SINK_TOKENS together, over queries at p >= SINK_TOKENS + RECENT_WINDOW (the two never
  overlap): what a StreamingLLM cache of sinks + window keeps of this head's attention (DuoAttention's
  streaming heads have it near 1).
"""

from __future__ import annotations

import pandas as pd
import torch

from actlab.probe.attention import sampled_queries
from actlab.probe.sites import Site
from actlab.probe.stats.base import BatchInfo, Statistic, TableContext

MIN_VISIBLE_ROWS = 4
SINK_TOKENS = 4  # StreamingLLM keeps four initial tokens
RECENT_WINDOW = 64


class AttentionHeads(Statistic):
    name = "attention"
    rules = {f: "sum" for f in ("rows", "windows", "first_rows", "first_mass", "entropy", "sink_count", "vnorm_first",
                                "vnorm_rest", "vnorm_sink", "resid_first", "resid_median_rest", "resid_sink",
                                "resid_sink_count", "resid_windows", "sink_tokens", "sinks_mass", "local_rows",
                                "local_mass", "streaming_mass")}

    def __init__(self, num_heads: int, num_kv_heads: int, vocab_size: int, query_stride: int = 1,
                 sink_threshold: float = 0.3, recent_window: int = RECENT_WINDOW):
        super().__init__()
        self.recent_window = recent_window
        self.num_heads, self.num_kv_heads, self.vocab_size = num_heads, num_kv_heads, vocab_size
        self.query_stride = query_stride
        self.sink_threshold = sink_threshold
        self._vnorm: dict[int, torch.Tensor] = {}  # per-batch scratch: layer -> [B, T, KV]
        self._sinks: dict[int, torch.Tensor] = {}  # layer -> [B, T] bool, later-sink keys of any head

    def settings(self):
        return {"num_heads": self.num_heads, "num_kv_heads": self.num_kv_heads, "vocab_size": self.vocab_size,
                "query_stride": self.query_stride, "sink_threshold": self.sink_threshold,
                **({"recent_window": self.recent_window} if self.recent_window != RECENT_WINDOW else {})}

    def accepts(self, site: Site) -> bool:
        return site.kind in ("v", "attn_probs", "resid_out")

    def allocate(self, sites, adapter, batch_size, seq_len):
        f64, h, kv = torch.float64, self.num_heads, self.num_kv_heads
        shapes = {"rows": (1,), "windows": (1,), "first_rows": (h,),
                  "first_mass": (h,), "entropy": (h,), "sink_count": (h,),
                  "sink_tokens": (self.vocab_size,), "vnorm_first": (kv,), "vnorm_rest": (kv,), "vnorm_sink": (h,),
                  "resid_windows": (1,), "resid_first": (1,), "resid_median_rest": (1,), "resid_sink": (1,),
                  "resid_sink_count": (1,), "sinks_mass": (h,), "local_rows": (1,), "local_mass": (h,),
                  "streaming_mass": (h,)}
        for layer in sorted({s.layer for s in sites if self.accepts(s)}):
            self.acc.setdefault(f"L{layer}", self.empty_fields({k: (v, f64, 0.0) for k, v in shapes.items()}))

    def end_batch(self) -> None:
        self._vnorm.clear()
        self._sinks.clear()

    def update(self, site: Site, x: torch.Tensor, batch: BatchInfo) -> None:
        b, t = batch.ids.shape
        if site.kind == "v":
            self._vnorm[site.layer] = x.float().norm(dim=-1).reshape(b, t, -1)
        elif site.kind == "attn_probs":
            self._attention(site.layer, x.float(), batch)
        elif site.kind == "resid_out":
            self._residual(site.layer, x.float().reshape(b, t, -1))

    def _attention(self, layer: int, probs: torch.Tensor, batch: BatchInfo) -> None:
        b, h, _, t = probs.shape
        pos = sampled_queries(t, self.query_stride)
        probs = probs[:, :, pos > 0]  # the query at position 0 can only attend to itself
        rows = probs.shape[2]
        fields = {
            "rows": torch.tensor([b * rows], dtype=torch.float64),
            "windows": torch.tensor([b], dtype=torch.float64),
            "first_rows": (probs[..., 0] > 0).double().sum(dim=(0, 2)),  # queries the window lets see position 0
            "first_mass": probs[..., 0].double().sum(dim=(0, 2)),
            "entropy": -torch.special.xlogy(probs, probs).sum(-1).double().sum(dim=(0, 2)),
            "sinks_mass": probs[..., :SINK_TOKENS].sum(-1).double().sum(dim=(0, 2)),
            **_local_fields(probs, pos[pos > 0], self.recent_window),
        }
        visible = (probs > 0).sum(dim=2)  # [B, H, T]: sampled queries that can see each key
        received = probs.sum(dim=2) / visible.clamp_min(1)
        sink = (received > self.sink_threshold) & (visible >= MIN_VISIBLE_ROWS)
        sink[..., 0] = False  # position 0 is the first-token sink, reported separately
        fields["sink_count"] = sink.sum(dim=(0, 2)).double()
        tokens = batch.ids.unsqueeze(1).expand(b, h, t)[sink]
        fields["sink_tokens"] = torch.bincount(tokens, minlength=self.vocab_size).double()
        self._sinks[layer] = sink.any(dim=1)
        vnorm = self._vnorm.get(layer)
        if vnorm is not None:
            kv_of_head = torch.arange(h) // (h // vnorm.shape[-1])
            fields["vnorm_first"] = vnorm[:, 0].double().sum(0)
            fields["vnorm_rest"] = vnorm[:, 1:].double().mean(1).sum(0)
            per_head = vnorm[:, :, kv_of_head].permute(0, 2, 1)  # [B, H, T]
            fields["vnorm_sink"] = (per_head * sink).double().sum(dim=(0, 2))
        self.accumulate(f"L{layer}", fields)

    def _residual(self, layer: int, resid: torch.Tensor) -> None:
        norms = resid.norm(dim=-1).double()  # [B, T]
        fields = {"resid_windows": torch.tensor([float(norms.shape[0])], dtype=torch.float64),
                  "resid_first": norms[:, 0].sum().reshape(1),
                  "resid_median_rest": norms[:, 1:].median(dim=1).values.sum().reshape(1)}
        sink = self._sinks.get(layer)
        if sink is not None:
            fields["resid_sink"] = (norms * sink).sum().reshape(1)
            fields["resid_sink_count"] = sink.sum().double().reshape(1)
        self.accumulate(f"L{layer}", fields)

    def tables(self, ctx: TableContext) -> dict[str, pd.DataFrame]:
        heads, layers = [], []
        tokens = torch.zeros(self.vocab_size, dtype=torch.float64)
        for key, f in sorted(self.acc.items(), key=lambda kv: int(kv[0][1:])):
            layer = int(key[1:])
            if float(f["rows"].sum()) > 0:
                tokens += f["sink_tokens"]
                nan = torch.full((self.num_heads,), float("nan"), dtype=torch.float64)
                kv = torch.arange(self.num_heads) // (self.num_heads // self.num_kv_heads)
                rest = f["vnorm_rest"][kv] / f["windows"] if "vnorm_rest" in f else nan
                first = f["vnorm_first"][kv] / f["windows"] if "vnorm_first" in f else nan
                sink_v = f["vnorm_sink"] / f["sink_count"].clamp_min(1) if "vnorm_sink" in f else nan
                first_rows = f["first_rows"] if "first_rows" in f else f["rows"].expand(self.num_heads)  # older runs
                local_rows = float(f["local_rows"]) if "local_rows" in f else 0.0
                local = {name: f[name] / local_rows if local_rows else nan for name in ("local_mass", "streaming_mass")}
                for h in range(self.num_heads):
                    has_sinks = f["sink_count"][h] > 0
                    heads.append({
                        "layer": layer, "head": h,
                        "first_token_mass": float(f["first_mass"][h] / first_rows[h].clamp_min(1)),
                        "entropy": float(f["entropy"][h] / f["rows"]),
                        "later_sinks_per_window": float(f["sink_count"][h] / f["windows"]),
                        "value_norm_first": float(first[h]),
                        "value_norm_rest": float(rest[h]),
                        "value_norm_first_ratio": float(first[h] / rest[h]),
                        "value_norm_sink_ratio": float(sink_v[h] / rest[h]) if has_sinks else float("nan"),
                        "sink_mass": float(f["sinks_mass"][h] / first_rows[h].clamp_min(1)) if "sinks_mass" in f
                        else float("nan"),
                        **{name: float(values[h]) for name, values in local.items()},
                    })
            if float(f["resid_windows"].sum()) > 0:
                count = f.get("resid_sink_count", torch.zeros(1))
                layers.append({
                    "layer": layer,
                    "resid_norm_first_ratio": float(f["resid_first"] / f["resid_median_rest"]),
                    "resid_norm_sink_ratio":
                        float((f["resid_sink"] / count) / (f["resid_median_rest"] / f["resid_windows"]))
                        if float(count) > 0 else float("nan"),
                })
        nz = torch.nonzero(tokens).flatten()
        sink_tokens = pd.DataFrame({"token_id": nz.numpy(), "count": tokens[nz].numpy().astype("int64")})
        sink_tokens["token"] = [ctx.decode(int(i)) for i in sink_tokens["token_id"]]
        sink_tokens = sink_tokens.sort_values("count", ascending=False, kind="stable").reset_index(drop=True)
        return {"heads": pd.DataFrame(heads), "attention_layers": pd.DataFrame(layers), "sink_tokens": sink_tokens}


def _local_fields(probs: torch.Tensor, pos: torch.Tensor, window: int) -> dict[str, torch.Tensor]:
    """Mass on each query's `window` most recent keys, alone and with the first SINK_TOKENS, summed over the
    queries at p >= SINK_TOKENS + window (probs [B, H, rows, T], pos the rows' positions)."""
    far = pos >= SINK_TOKENS + window
    keys = torch.arange(probs.shape[-1], device=probs.device)
    p = pos[far].to(probs.device)[:, None]
    recent = (keys[None] > p - window) & (keys[None] <= p)  # [rows, T]
    rows = probs[:, :, far]
    local = (rows * recent).sum(-1).double()  # [B, H, rows]
    stream = local + rows[..., :SINK_TOKENS].sum(-1).double()
    return {"local_rows": torch.tensor([float(rows.shape[0] * rows.shape[2])], dtype=torch.float64),
            "local_mass": local.sum(dim=(0, 2)), "streaming_mass": stream.sum(dim=(0, 2))}
