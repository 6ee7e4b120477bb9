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

ATTN_ROLES = ("q", "k", "v", "qkv", "o")
MLP_ROLES = ("gate", "up", "down")


@dataclass(frozen=True)
class LinearView:
    """One projection. `weight()` is always [out_features, in_features], whatever the storage layout.

    `rows` selects a block of output rows of a fused module (q, k or v inside GPT-2's c_attn).
    """

    name: str
    module: nn.Module
    transposed: bool = False
    rows: tuple[int, int] | None = None

    def weight(self) -> torch.Tensor:
        w = self.module.weight
        w = w.t() if self.transposed else w
        if self.rows is not None:
            w = w[self.rows[0] : self.rows[1]]
        return w

    def bias(self) -> torch.Tensor | None:
        b = getattr(self.module, "bias", None)
        if b is None:
            return None
        return b[self.rows[0] : self.rows[1]] if self.rows is not None else b

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

    @property
    def gated_mlp(self) -> bool:
        return "up" in self.linears

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
        self.embed: nn.Module = resolve(model, spec.embed)
        self.final_norm: nn.Module = resolve(model, spec.final_norm)
        self.lm_head: nn.Module = resolve(model, spec.lm_head)
        self.layers: list[LayerView] = [self._layer_view(i, m) for i, m in enumerate(resolve(model, spec.layers))]
        self.intermediate_size: int = self.layers[0].linears["gate"].out_features
        self.num_layers = len(self.layers)
        self.rotary: nn.Module | None = resolve(model, spec.rotary) if spec.rotary else None
        self.pos_embed: nn.Module | None = resolve(model, spec.pos_embed) if spec.pos_embed else None

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
        linears: dict[str, LinearView] = {}
        for role in ATTN_ROLES + MLP_ROLES:
            path = getattr(spec, role)
            if path is not None:
                linears[role] = LinearView(f"L{index}.{role}", resolve(layer, path), transposed=t)
        heads: dict[str, LinearView]
        if "qkv" in linears:
            fused = linears["qkv"]
            nq, nkv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            bounds = {"q": (0, nq), "k": (nq, nq + nkv), "v": (nq + nkv, nq + 2 * nkv)}
            heads = {r: LinearView(f"L{index}.{r}", fused.module, t, b) for r, b in bounds.items()}
        else:
            heads = {r: linears[r] for r in ("q", "k", "v")}
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
            act_fn=resolve(layer, spec.act),
            linears=linears,
            head_projections=heads,
            **optional,
        )

    # -- queries --------------------------------------------------------------------------------
    def iter_linears(self) -> list[LinearView]:
        """Every projection module of every layer (embeddings and LM head excluded), in forward order."""
        return [lin for layer in self.layers for lin in layer.linears.values()]

    def linear_params(self) -> int:
        return sum(lin.num_params for lin in self.iter_linears())

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
            "fused_qkv": "qkv" in self.layers[0].linears,
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
