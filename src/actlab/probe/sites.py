"""Named sites: where in the forward pass an activation can be read or edited, the same names for every
architecture (names from `actlab.models.keys`).

Per layer i:
  L{i}.resid_in    residual stream entering the block (= L{i-1}.resid_out for i > 0)
  L{i}.attn_in     normed input of the q/k/v projections
  L{i}.v           value vectors, [tokens, kv_heads, head_dim]
  L{i}.attn_probs  attention probabilities [batch, heads, queries, keys] (see probe.attention; read only)
  L{i}.o_in        per-head attention output fed to o, [tokens, heads, head_dim]
  L{i}.resid_mid   residual stream after attention (the input of the pre-MLP norm: under a parallel
                   residual, GPT-NeoX, that is the block's input)
  L{i}.mlp_in      normed input of the MLP
  L{i}.gate        pre-activation (output of gate_proj, or fc1 in a non-gated MLP)
  L{i}.act         activation output act(gate)
  L{i}.up          output of up_proj (gated MLPs only)
  L{i}.down_in     the intermediate fed to down_proj (act * up, or act)
  in a mixture-of-experts layer (Mixtral), instead of gate ... down_in:
  L{i}.router      router logits, [tokens, experts] (read only)
  L{i}.routing     the weight each token gives each expert, zero outside its top k, [tokens, experts] (read only)
  L{i}.moe_out     the MLP's output: the routed experts' outputs, weighted and summed
  L{i}.resid_out   residual stream leaving the block
and `final_norm`, `logits`. Every projection also has its own input and output site, `L{i}.<role>_in` and
`L{i}.<role>_out` (role q, k, v or qkv, o, gate, up, down): q_in, k_in and v_in all see attn_in's tensor,
but an edit at q_in changes only what q reads. `o_out` and `down_out` are the attention and MLP sublayer
outputs (before a post-norm, where the family has one). These are not profiled unless asked for. A projection
inside a fused module (Phi-3's gate and up in gate_up_proj) has its own sites too: its output site is its
block of the module's output rows, and an edit at its input site recomputes only its rows from the edited input.

A site reads its tensor with `read` (the view statistics consume) and is edited through `view` / `put`: the
flat [..., channels] tensor at the site, and the captured object with that tensor replaced. A site with
`heads` = (count, head_dim) lays its channels out head after head.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from actlab.errors import ConfigError
from actlab.models.adapter import LinearView, ModelAdapter, Rows, replace_rows, select_rows
from actlab.models.keys import projection_key, projection_site, site_key

LAYER_SITE_KINDS = ("resid_in", "attn_in", "v", "attn_probs", "o_in", "resid_mid", "mlp_in", "gate", "act", "up",
                    "down_in", "router", "routing", "moe_out", "resid_out")
GLOBAL_SITE_KINDS = ("final_norm", "logits")
READ_ONLY_KINDS = ("attn_probs", "router", "routing")


@dataclass(frozen=True, eq=False)
class Site:
    name: str
    kind: str
    layer: int | None
    module: nn.Module
    capture: str  # "input" (forward pre-hook, first argument) or "output" (forward hook)
    channels: int = 0  # width of the flat [tokens, channels] view
    # turns the raw captured object into the site's tensor (tuple element, fused slice, head split)
    select: Callable[[object], torch.Tensor] | None = None
    rows: Rows | None = None  # some of a fused module's output rows (GPT-2's v inside c_attn, Phi-3's gate)
    heads: tuple[int, int] | None = None  # (heads, head_dim) of a head-structured site
    projection: str | None = None  # the projection key of a projection site ("L3.q")
    # the input site of one projection inside a fused module (Phi-3's gate_in): an edit there changes what
    # this projection reads only, so the hook recomputes its rows of the module's output from the edited input
    fused_input: LinearView | None = None

    def read(self, captured: object) -> torch.Tensor:
        return self.select(captured) if self.select else self.view(captured)

    @property
    def writable(self) -> bool:
        return self.kind not in READ_ONLY_KINDS

    def view(self, captured: object) -> torch.Tensor:
        """The site's tensor with its channels flat in the last dimension (batch and positions as captured)."""
        return select_rows(_first(captured), self.rows)

    def put(self, captured: object, new: torch.Tensor) -> object:
        """`captured` with the site's tensor replaced by `new` (same shape as `view(captured)`)."""
        if self.rows is not None:
            new = replace_rows(_first(captured), self.rows, new)
        if isinstance(captured, tuple):
            return (new, *captured[1:])
        return new


def _first(obj: object) -> torch.Tensor:
    return obj[0] if isinstance(obj, tuple) else obj  # type: ignore[index,return-value]


def all_sites(adapter: ModelAdapter) -> list[Site]:
    """Every site of the model: per layer the named sites in forward order, then its projection sites."""
    sites: list[Site] = []
    hd, nh, nkv = adapter.head_dim, adapter.num_heads, adapter.num_kv_heads
    d = adapter.hidden_size
    for layer in adapter.layers:
        i = layer.index
        ffn = layer.ffn_width
        v_view = layer.head_projections["v"]

        def v_select(out, rows=v_view.rows, nkv=nkv, hd=hd):
            return select_rows(_first(out), rows).reshape(-1, nkv, hd)

        def o_select(x, nh=nh, hd=hd):
            return _first(x).reshape(-1, nh, hd)

        named = [  # kind, module, capture, channels, select, rows, heads
            ("resid_in", layer.module, "input", d, None, None, None),
            ("attn_in", *((layer.attn_norm, "output") if layer.attn_norm is not None else (layer.attn, "input")), d,
             None, None, None),
            ("v", v_view.module, "output", nkv * hd, v_select, v_view.rows, (nkv, hd)),
            ("attn_probs", layer.attn, "output", 0, lambda out: out[1], None, None),
            ("o_in", layer.linears["o"].module, "input", nh * hd, o_select, None, (nh, hd)),
            ("resid_mid", layer.mlp_norm if layer.mlp_norm is not None else layer.mlp, "input", d, None, None, None),
            ("mlp_in", *((layer.mlp_norm, "output") if layer.mlp_norm is not None else (layer.mlp, "input")), d,
             None, None, None),
            *(_expert_sites(layer, d) if layer.moe else _mlp_sites(layer, ffn)),
            ("resid_out", layer.module, "output", d, None, None, None),
        ]
        sites += [Site(site_key(i, kind), kind, i, mod, cap, ch, sel, rows, heads)
                  for kind, mod, cap, ch, sel, rows, heads in named if mod is not None]
        have = {s.name for s in sites}
        for role, lin in layer.linears.items():
            key = projection_key(i, role)
            head_layout = {"q": (nh, hd), "k": (nkv, hd), "v": (nkv, hd)}.get(role)
            for side, capture, width, heads in (("in", "input", lin.in_features, (nh, hd) if role == "o" else None),
                                                ("out", "output", lin.out_features, head_layout)):
                name = projection_site(key, side)
                if name not in have:
                    sites.append(Site(name, f"{role}_{side}", i, lin.module, capture, width, heads=heads,
                                      projection=key, rows=lin.rows if side == "out" else None,
                                      fused_input=lin if side == "in" and lin.fused else None))
    sites.append(Site("final_norm", "final_norm", None, adapter.final_norm, "output", d))
    sites.append(Site("logits", "logits", None, adapter.lm_head, "output", adapter.vocab_size))
    return sites


def _mlp_sites(layer, ffn: int) -> list[tuple]:
    gate, up = layer.linears["gate"], layer.linears.get("up")
    return [("gate", gate.module, "output", ffn, None, gate.rows, None),
            ("act", layer.act_fn, "output", ffn, None, None, None),
            ("up", up.module if up else None, "output", ffn, None, up.rows if up else None, None),
            ("down_in", layer.linears["down"].module, "input", ffn, None, None, None)]


def _expert_sites(layer, d: int) -> list[tuple]:
    moe = layer.moe

    def routing(out, n=moe.num_experts):  # the router returns (logits, top-k weights, top-k indices)
        logits, weights, index = out
        return torch.zeros(logits.shape[0], n, dtype=weights.dtype, device=weights.device).scatter(-1, index,
                                                                                                   weights)

    return [("router", moe.router, "output", moe.num_experts, lambda out: out[0], None, None),
            ("routing", moe.router, "output", moe.num_experts, routing, None, None),
            ("moe_out", layer.mlp, "output", d, None, None, None)]


def site_channels(site: Site, adapter: ModelAdapter) -> int:
    """Channels of a site's [tokens, channels] view (heads flattened), known before any forward pass."""
    return site.channels


def default_site_names(adapter: ModelAdapter) -> list[str]:
    """What a profile reads by default: the named sites (not the per-projection aliases), without the redundant
    L{i}.resid_in for i > 0 (it equals L{i-1}.resid_out)."""
    return [s.name for s in all_sites(adapter)
            if (s.kind in LAYER_SITE_KINDS or s.kind in GLOBAL_SITE_KINDS) and not (s.kind == "resid_in" and s.layer)]


def site_index(adapter: ModelAdapter) -> dict[str, Site]:
    """Every site by name (memoised on the adapter: the modules do not change under a loaded model)."""
    memo = adapter.__dict__.get("_actlab_sites")
    if memo is None:
        memo = {s.name: s for s in all_sites(adapter)}
        adapter.__dict__["_actlab_sites"] = memo
    return memo


def get_site(adapter: ModelAdapter, name: str, writable: bool = False) -> Site:
    """The site `name`, or a one-line error naming the valid ones."""
    sites = site_index(adapter)
    site = sites.get(name)
    if site is None:
        raise ConfigError(f"unknown site {name!r}; sites are L<0..{adapter.num_layers - 1}>.<kind> with kind one of "
                          f"{', '.join(sorted({s.kind for s in sites.values() if s.layer is not None}))}, "
                          "and final_norm, logits")
    if writable and not site.writable:
        raise ConfigError(f"site {name!r} can be read but not edited")
    return site


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
                          f"sites are L<i>.<kind> with kind one of {kinds} (and <role>_in / <role>_out of every "
                          "projection), and final_norm, logits")
    return chosen
