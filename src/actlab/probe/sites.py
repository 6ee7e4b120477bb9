"""Named sites: where in the forward pass an activation can be read, the same names for every architecture.

Per layer i:
  L{i}.resid_in    residual stream entering the block (= L{i-1}.resid_out for i > 0)
  L{i}.attn_in     normed input of the q/k/v projections
  L{i}.v           value vectors, [tokens, kv_heads, head_dim]
  L{i}.attn_probs  attention probabilities [batch, heads, queries, keys] (see probe.attention)
  L{i}.o_in        per-head attention output fed to o, [tokens, heads, head_dim]
  L{i}.resid_mid   residual stream after attention (the input of the pre-MLP norm)
  L{i}.mlp_in      normed input of the MLP
  L{i}.gate        pre-activation (output of gate_proj, or fc1 in a non-gated MLP)
  L{i}.act         activation output act(gate)
  L{i}.up          output of up_proj (gated MLPs only)
  L{i}.down_in     the intermediate fed to down_proj (act * up, or act)
  L{i}.resid_out   residual stream leaving the block
and `final_norm`, `logits`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from actlab.errors import ConfigError
from actlab.models.adapter import ModelAdapter

LAYER_SITE_KINDS = ("resid_in", "attn_in", "v", "attn_probs", "o_in", "resid_mid", "mlp_in", "gate", "act", "up",
                    "down_in", "resid_out")
GLOBAL_SITE_KINDS = ("final_norm", "logits")


@dataclass(frozen=True)
class Site:
    name: str
    kind: str
    layer: int | None
    module: nn.Module
    capture: str  # "input" (forward pre-hook, first argument) or "output" (forward hook)
    # turns the raw captured object into the site's tensor (tuple element, fused slice, head split)
    select: Callable[[object], torch.Tensor] | None = None

    def read(self, captured: object) -> torch.Tensor:
        return self.select(captured) if self.select else _first(captured)


def _first(obj: object) -> torch.Tensor:
    return obj[0] if isinstance(obj, tuple) else obj  # type: ignore[index,return-value]


def all_sites(adapter: ModelAdapter) -> list[Site]:
    sites: list[Site] = []
    hd, nh, nkv = adapter.head_dim, adapter.num_heads, adapter.num_kv_heads
    for layer in adapter.layers:
        i = layer.index
        v_view = layer.head_projections["v"]
        v_rows = v_view.rows

        def v_select(out, rows=v_rows, nkv=nkv, hd=hd):
            t = _first(out)
            if rows is not None:
                t = t[..., rows[0] : rows[1]]
            return t.reshape(-1, nkv, hd)

        entries = [
            ("resid_in", layer.module, "input", None),
            ("attn_in", layer.attn_norm, "output", None),
            ("v", v_view.module, "output", v_select),
            ("attn_probs", layer.attn, "output", lambda out: out[1]),
            ("o_in", layer.linears["o"].module, "input", lambda x, nh=nh, hd=hd: _first(x).reshape(-1, nh, hd)),
            ("resid_mid", layer.mlp_norm, "input", None),
            ("mlp_in", layer.mlp_norm, "output", None),
            ("gate", layer.linears["gate"].module, "output", None),
            ("act", layer.act_fn, "output", None),
            ("up", layer.linears["up"].module if layer.gated_mlp else None, "output", None),
            ("down_in", layer.linears["down"].module, "input", None),
            ("resid_out", layer.module, "output", None),
        ]
        sites += [Site(f"L{i}.{kind}", kind, i, mod, cap, sel) for kind, mod, cap, sel in entries if mod is not None]
    sites.append(Site("final_norm", "final_norm", None, adapter.final_norm, "output"))
    sites.append(Site("logits", "logits", None, adapter.lm_head, "output"))
    return sites


def site_channels(site: Site, adapter: ModelAdapter) -> int:
    """Channels of a site's [tokens, channels] view (heads flattened), known before any forward pass."""
    return {
        "v": adapter.num_kv_heads * adapter.head_dim,
        "o_in": adapter.num_heads * adapter.head_dim,
        "gate": adapter.intermediate_size, "act": adapter.intermediate_size, "up": adapter.intermediate_size,
        "down_in": adapter.intermediate_size,
        "logits": adapter.vocab_size,
    }.get(site.kind, adapter.hidden_size)


def default_site_names(adapter: ModelAdapter) -> list[str]:
    """Every site except the redundant L{i}.resid_in for i > 0 (it equals L{i-1}.resid_out)."""
    return [s.name for s in all_sites(adapter) if not (s.kind == "resid_in" and s.layer)]


def select_sites(adapter: ModelAdapter, patterns: Iterable[str] | str | None) -> list[Site]:
    """Sites whose names match any of the glob patterns (`L*.down_in`, `L1?.gate`, `final_norm`).

    None selects the default full set."""
    sites = all_sites(adapter)
    if patterns is None:
        wanted = set(default_site_names(adapter))
        return [s for s in sites if s.name in wanted]
    if isinstance(patterns, str):
        patterns = [p.strip() for p in patterns.split(",") if p.strip()]
    patterns = list(patterns)
    chosen = [s for s in sites if any(fnmatch.fnmatchcase(s.name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(s.name, p) for s in sites)]
    if unmatched:
        kinds = ", ".join(LAYER_SITE_KINDS + GLOBAL_SITE_KINDS)
        raise ConfigError(f"site pattern(s) {', '.join(unmatched)} match no site of this model; "
                          f"sites are L<i>.<kind> with kind one of {kinds}, and final_norm, logits")
    return chosen
