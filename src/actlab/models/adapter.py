"""A uniform, read-only view of a loaded causal LM, built from its `ArchSpec`.

Everything downstream (probes, sparsifiers, the decode engine) asks the adapter for "layer 3's down
projection" or "the norm before the MLP" and never looks at module names.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from actlab.errors import UnsupportedArchitectureError
from actlab.models.architectures import ArchSpec, spec_for_model_type, supported_model_types
from actlab.models.keys import projection_key, projection_site, site_key
from actlab.models.placement import materialized

ATTN_ROLES = ("q", "k", "v", "qkv", "o")
MLP_ROLES = ("gate", "up", "down")


Rows = tuple[int, int] | torch.Tensor  # a block [start, stop) of a fused module's output rows, or their indices


def select_rows(t: torch.Tensor, rows: Rows | None, dim: int = -1) -> torch.Tensor:
    """The `rows` of a fused module's output along `dim` (all of `t` for None)."""
    if rows is None:
        return t
    if isinstance(rows, tuple):
        return t.narrow(dim, rows[0], rows[1] - rows[0])
    return t.index_select(dim, rows.to(t.device))


def replace_rows(t: torch.Tensor, rows: Rows, new: torch.Tensor) -> torch.Tensor:
    """`t` (a fused module's output, channels last) with its `rows` replaced by `new`, out of place."""
    if isinstance(rows, tuple):
        return torch.cat([t[..., : rows[0]], new.to(t.dtype), t[..., rows[1] :]], dim=-1)
    return t.index_copy(-1, rows.to(t.device), new.to(t.dtype))


@dataclass(frozen=True, eq=False)
class LinearView:
    """One projection. `weight()` is always [out_features, in_features], whatever the storage layout.

    `rows` selects output rows of a fused module: a block (q, k or v inside GPT-2's c_attn, gate or up inside
    Phi-3's gate_up_proj) or an index tensor (q, k or v of GPT-NeoX, stored head after head).
    """

    name: str
    module: nn.Module
    transposed: bool = False
    rows: Rows | None = None

    def weight(self) -> torch.Tensor:
        """[out, in]: a view of the module's weight (a copy, read in, when accelerate keeps it on disk)."""
        with materialized(self.module) as module:
            w = module.weight.t() if self.transposed else module.weight
            return select_rows(w, self.rows, 0)  # holds the read-in values after the block puts meta back

    def bias(self) -> torch.Tensor | None:
        with materialized(self.module) as module:
            b = getattr(module, "bias", None)
            return None if b is None else select_rows(b, self.rows, 0)

    @property
    def fused(self) -> bool:
        """Whether this view is part of a module that computes other projections too."""
        return self.rows is not None

    @property
    def in_features(self) -> int:
        return self.weight().shape[1]

    @property
    def out_features(self) -> int:
        return self.weight().shape[0]

    @property
    def num_params(self) -> int:
        return self.in_features * self.out_features

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The projection recomputed from the view (an independent check of the module's forward)."""
        return nn.functional.linear(x, self.weight(), self.bias())


@dataclass(frozen=True, eq=False)
class ExpertsView:
    """A mixture-of-experts MLP: a router that sends each token to `top_k` of `num_experts` gated MLPs and
    sums their outputs weighted by the router's (renormalised) top-k probabilities.

    The experts are 3-D parameters of one module, not modules: `weight(e, role)` is expert e's gate, up or
    down matrix as [out, in], a view of the stored tensor."""

    name: str  # "L3.experts"
    router: nn.Module  # weight [num_experts, hidden]; forward -> (logits, top-k weights, top-k indices)
    experts: nn.Module  # gate_up_proj [E, 2I, H] (rows [gate; up]), down_proj [E, H, I], act_fn
    top_k: int

    @property
    def num_experts(self) -> int:
        return int(self.experts.down_proj.shape[0])

    @property
    def intermediate_size(self) -> int:
        return int(self.experts.down_proj.shape[2])

    @property
    def act_fn(self) -> nn.Module:
        return self.experts.act_fn

    @property
    def renormalises(self) -> bool:
        """Whether the top-k probabilities are rescaled to sum to 1 (Mixtral always; Qwen3-MoE by its config)."""
        return bool(getattr(self.router, "norm_topk_prob", True))

    def weight(self, expert: int, role: str) -> torch.Tensor:
        width = self.intermediate_size
        with materialized(self.experts) as module:
            if role == "down":
                return module.down_proj[expert]
            rows = {"gate": (0, width), "up": (width, 2 * width)}[role]
            return module.gate_up_proj[expert].narrow(0, rows[0], width)

    @property
    def num_params(self) -> int:
        return 3 * self.num_experts * self.intermediate_size * int(self.experts.down_proj.shape[1]) + \
            self.router.weight.numel()

    def routing(self, x: torch.Tensor) -> torch.Tensor:
        """[tokens, num_experts] weights each token gives each expert (zero outside its top k), recomputed
        from the router's weight."""
        probs = torch.softmax(nn.functional.linear(x, self.router.weight).float(), dim=-1)
        top, index = probs.topk(self.top_k, dim=-1)
        if self.renormalises:
            top = top / top.sum(dim=-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, index, top).to(x.dtype)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The MoE MLP recomputed expert by expert, densely (an independent check of the module's forward)."""
        flat = x.reshape(-1, x.shape[-1])
        weights = self.routing(flat)
        out = torch.zeros_like(flat)
        for e in range(self.num_experts):
            h = self.act_fn(flat @ self.weight(e, "gate").T) * (flat @ self.weight(e, "up").T)
            out += weights[:, e : e + 1] * (h @ self.weight(e, "down").T)
        return out.reshape(x.shape)


@dataclass
class LayerView:
    index: int
    module: nn.Module
    attn: nn.Module
    attn_norm: nn.Module | None  # None: attention reads the residual stream (OLMo-2)
    mlp_norm: nn.Module | None
    act_fn: nn.Module
    linears: dict[str, LinearView]  # the real modules, by role (q,k,v,o or qkv,o; gate,[up],down)
    attn_post_norm: nn.Module | None = None
    mlp_post_norm: nn.Module | None = None
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None
    head_projections: dict[str, LinearView] = field(default_factory=dict)  # q, k, v (split if fused)
    mlp: nn.Module | None = None
    moe: ExpertsView | None = None  # a mixture-of-experts MLP: then linears hold the attention projections only

    @property
    def gated_mlp(self) -> bool:
        return "up" in self.linears or self.moe is not None

    def output_site(self, part: str) -> str:
        """The site of a sublayer's output ("attn" or "mlp"): its output projection's, or the mixture's."""
        if part == "mlp" and self.moe is not None:
            return site_key(self.index, "moe_out")
        return projection_site(projection_key(self.index, "o" if part == "attn" else "down"), "out")

    def output_parameters(self, part: str) -> list[torch.Tensor]:
        """The parameters that, zeroed, silence a sublayer: its output projection's weight and bias (every
        expert's down projection in a mixture of experts)."""
        if part == "mlp" and self.moe is not None:
            return [self.moe.experts.down_proj]
        module = self.linears["o" if part == "attn" else "down"].module
        return [p for p in (module.weight, getattr(module, "bias", None)) if p is not None]

    @property
    def ffn_width(self) -> int:
        """Width of the MLP's intermediate (one expert's, in a mixture of experts)."""
        return self.moe.intermediate_size if self.moe is not None else self.linears["gate"].out_features

    def linear(self, role: str) -> LinearView:
        return self.linears[role]


class ModelAdapter:
    """Canonical description of a `*ForCausalLM` model: layers, projections, norms, shapes."""

    def __init__(self, model: nn.Module, spec: ArchSpec):
        self.model = model
        self.spec = spec
        cfg = model.config
        self.config = cfg
        self.family = spec.family
        self.model_type: str = cfg.model_type
        self.num_heads: int = int(cfg.num_attention_heads)
        self.num_kv_heads: int = int(getattr(cfg, "num_key_value_heads", None) or self.num_heads)
        self.hidden_size: int = int(cfg.hidden_size)
        self.head_dim: int = int(getattr(cfg, "head_dim", None) or self.hidden_size // self.num_heads)
        self.vocab_size: int = int(cfg.vocab_size)
        self.max_context: int | None = getattr(cfg, "max_position_embeddings", None)
        attr = spec.parallel_residual_attr
        self.parallel_residual: bool = bool(getattr(cfg, attr, False)) if attr else False
        self.embed: nn.Module = resolve(model, spec.embed)
        self.final_norm: nn.Module = resolve(model, spec.final_norm)
        self.lm_head: nn.Module = resolve(model, spec.lm_head)
        self.layers: list[LayerView] = [self._layer_view(i, m) for i, m in enumerate(resolve(model, spec.layers))]
        self.intermediate_size: int = self.layers[0].ffn_width
        self.num_layers = len(self.layers)
        self.rotary: nn.Module | None = resolve(model, spec.rotary) if spec.rotary else None
        self.pos_embed: nn.Module | None = resolve(model, spec.pos_embed) if spec.pos_embed else None
        self.rotary_dim: int = self._rotary_dim()

    def _rotary_dim(self) -> int:
        """Leading channels of each head that the rotary embedding turns (the rest pass through: Phi-3 variants
        and GPT-NeoX rotate part of each head); 0 without a rotary embedding."""
        if self.rotary is None:
            return 0
        params = getattr(self.config, "rope_parameters", None) or {}
        factor = params.get("partial_rotary_factor") if isinstance(params, dict) else None
        if factor is None:
            factor = getattr(self.config, "partial_rotary_factor", None) or getattr(self.config, "rotary_pct", 1.0)
        return int(self.head_dim * float(factor))

    def sliding_window(self, layer: LayerView) -> int | None:
        """Keys a layer's queries may see (None: all), as the model's own attention applies it."""
        window = getattr(layer.attn, "sliding_window", None)
        if window is None and self.spec.sliding_window_from_config:
            window = getattr(self.config, "sliding_window", None)
        return window

    # -- construction -------------------------------------------------------------------------
    def _layer_view(self, index: int, layer: nn.Module) -> LayerView:
        spec = self.spec
        t = spec.transposed_weights
        moe = self._experts_view(index, layer)
        linears: dict[str, LinearView] = {}
        for role in ATTN_ROLES + (() if moe else MLP_ROLES):
            path = getattr(spec, role)
            if path is not None:
                linears[role] = LinearView(f"L{index}.{role}", resolve(layer, path), transposed=t)
        if spec.gate_up is not None and moe is None:  # one module, output rows [gate; up]: two views of it
            fused_mlp = resolve(layer, spec.gate_up)
            width = (fused_mlp.weight.shape[1] if t else fused_mlp.weight.shape[0]) // 2
            linears["gate"] = LinearView(f"L{index}.gate", fused_mlp, t, (0, width))
            linears["up"] = LinearView(f"L{index}.up", fused_mlp, t, (width, 2 * width))
            linears = {role: linears[role] for role in ATTN_ROLES + MLP_ROLES if role in linears}
        heads = ({r: LinearView(f"L{index}.{r}", linears["qkv"].module, t, rows)
                  for r, rows in self._qkv_rows().items()} if "qkv" in linears
                 else {r: linears[r] for r in ("q", "k", "v")})
        optional = {
            name: resolve(layer, getattr(spec, name)) if getattr(spec, name) else None
            for name in ("attn_norm", "mlp_norm", "attn_post_norm", "mlp_post_norm", "q_norm", "k_norm", "mlp")
        }
        if optional["mlp_norm"] is None and optional["mlp"] is None:
            raise AttributeError("a family without a pre-MLP norm must name its MLP module")
        return LayerView(
            index=index,
            module=layer,
            attn=resolve(layer, spec.attn),
            act_fn=moe.act_fn if moe else resolve(layer, spec.act),
            linears=linears,
            head_projections=heads,
            moe=moe,
            **optional,
        )

    def _experts_view(self, index: int, layer: nn.Module) -> ExpertsView | None:
        """The layer's mixture of experts, or None for a dense MLP (every layer of a dense family; the
        `mlp_only_layers` of Qwen3-MoE)."""
        if self.spec.experts is None:
            return None
        try:
            experts = resolve(layer, self.spec.experts)
        except AttributeError:
            return None
        router = resolve(layer, self.spec.router)
        return ExpertsView(f"L{index}.experts", router, experts, int(router.top_k))

    def _qkv_rows(self) -> dict[str, Rows]:
        """Where q, k and v sit in a fused qkv projection's output rows."""
        nh, nkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        if self.spec.qkv_layout == "heads":  # [q_h; k_h; v_h] for each head h (no grouped-query attention)
            base = torch.arange(nh)[:, None] * 3 * hd
            return {r: (base + j * hd + torch.arange(hd)).reshape(-1) for j, r in enumerate(("q", "k", "v"))}
        nq, nk = nh * hd, nkv * hd
        return {"q": (0, nq), "k": (nq, nq + nk), "v": (nq + nk, nq + 2 * nk)}

    # -- queries --------------------------------------------------------------------------------
    def iter_linears(self) -> list[LinearView]:
        """Every projection module of every layer (embeddings and LM head excluded), in forward order."""
        return [lin for layer in self.layers for lin in layer.linears.values()]

    def linear_params(self) -> int:
        return sum(lin.num_params for lin in self.iter_linears()) + sum(
            layer.moe.num_params for layer in self.layers if layer.moe is not None)

    @property
    def moe_layers(self) -> list[int]:
        """Layers whose MLP is a mixture of experts."""
        return [layer.index for layer in self.layers if layer.moe is not None]

    def _describe_experts(self) -> dict[str, int]:
        """Experts per MoE layer, how many a token uses, and how many layers have them ({} for a dense model)."""
        layers = self.moe_layers
        if not layers:
            return {}
        moe = self.layers[layers[0]].moe
        return {"experts": moe.num_experts, "experts_per_token": moe.top_k, "moe_layers": len(layers)}

    def refuse_moe(self, what: str) -> None:
        """A one-line error for a transform that does not reach into mixture-of-experts MLPs."""
        experts = self._describe_experts()
        if experts:
            raise UnsupportedArchitectureError(
                f"{what} is not supported on mixture-of-experts models ({self.family}: {experts['moe_layers']} "
                f"layers route each token to {experts['experts_per_token']} of {experts['experts']} experts, whose "
                "weights are 3-D tensors of one module); profile, ppl, eval, layer removal and steering work on "
                "this model")

    def describe(self) -> dict[str, Any]:
        return {
            "family": self.family,
            "model_type": self.model_type,
            "layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "heads": self.num_heads,
            "kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "gated_mlp": self.layers[0].gated_mlp,
            **self._describe_experts(),
            "fused_qkv": "qkv" in self.layers[0].linears,
            "fused_gate_up": self.spec.gate_up is not None,
            "parallel_residual": self.parallel_residual,
            "rotary_dim": self.rotary_dim,
            "activation": type(self.layers[0].act_fn).__name__,
            "vocab_size": self.vocab_size,
            "max_context": self.max_context,
            "linear_params": self.linear_params(),
        }


def adapter_for(model: nn.Module) -> ModelAdapter:
    """Build the adapter for a loaded model, or explain clearly why it is not supported."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    spec = spec_for_model_type(model_type) if model_type else None
    if spec is None:
        raise UnsupportedArchitectureError(
            f"architecture {model_type!r} ({type(model).__name__}) is not supported; "
            f"supported model types: {', '.join(supported_model_types())}. "
            "Adding one is a single ArchSpec entry in actlab/models/architectures.py."
        )
    reason = spec.unsupported_variant(config) if spec.unsupported_variant else None
    if reason:
        raise UnsupportedArchitectureError(f"{type(model).__name__}: {reason}")
    try:
        return ModelAdapter(model, spec)
    except AttributeError as exc:
        raise UnsupportedArchitectureError(
            f"{type(model).__name__} (model_type {model_type!r}) does not have the module layout its "
            f"{spec.family!r} adapter expects: {exc}"
        ) from exc


def resolve(root: nn.Module, path: str) -> Any:
    obj: Any = root
    for part in path.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj
