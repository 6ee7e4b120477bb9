"""Cost accounting in the same units for every family, composable.

A `CostLedger` describes what a decode step reads and what the model holds, per part:
- each projection (and the LM head): its parameters, bits per weight, the fraction of its columns read per
  token (activation sparsity), extra weights read per token (low-rank factors, repair maps), and whether it
  is still there (dropped layers);
- each layer's KV cache: bytes per context token, the fraction of the cache kept, and whether it exists.

Every recipe changes the ledger the way its transform changes the model (`Recipe.apply_cost`), in
composition order, so quantization x sparsity multiply (bits x columns read) and a dropped layer takes its
projections and its cache with it. `Cost` is the summary: weight bytes read per decoded token, KV-cache
bytes per context token and parameters, each with the dense value and the fraction saved.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from actlab.models.keys import layer_key, projection_key

HEAD = "lm_head"


@dataclass
class PartCost:
    params: int
    bits: float
    read: float = 1.0  # fraction of the weights read per decoded token
    extra_params: int = 0  # read on every token besides the (sparse) weights
    present: bool = True

    def bytes_per_token(self) -> float:
        return (self.params * self.read + self.extra_params) * self.bits / 8 if self.present else 0.0

    def held_params(self) -> int:
        return self.params + self.extra_params if self.present else 0


@dataclass
class KVCost:
    bytes_per_token: float
    kept: float = 1.0
    present: bool = True

    def cost(self) -> float:
        return self.bytes_per_token * self.kept if self.present else 0.0


@dataclass
class Cost:
    weight_bytes_per_token: float
    kv_bytes_per_token: float
    params: int
    dense_weight_bytes_per_token: float
    dense_kv_bytes_per_token: float
    dense_params: int

    @property
    def weight_bytes_saved(self) -> float:
        return 1.0 - self.weight_bytes_per_token / self.dense_weight_bytes_per_token

    @property
    def kv_bytes_saved(self) -> float:
        return 1.0 - self.kv_bytes_per_token / self.dense_kv_bytes_per_token if self.dense_kv_bytes_per_token else 0.0

    @property
    def params_saved(self) -> float:
        return 1.0 - self.params / self.dense_params

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weight_bytes_saved": self.weight_bytes_saved, "kv_bytes_saved": self.kv_bytes_saved,
                "params_saved": self.params_saved}

    def line(self) -> str:
        return (f"weights read/token {self.weight_bytes_per_token / 1e6:.1f} MB "
                f"({self.weight_bytes_saved:+.1%} saved), "
                f"KV cache/token {self.kv_bytes_per_token / 1e3:.1f} KB ({self.kv_bytes_saved:+.1%}), "
                f"params {self.params / 1e6:.1f} M ({self.params_saved:+.1%})")


@dataclass
class CostLedger:
    parts: dict[str, PartCost]  # projection keys "L3.q", and "lm_head"
    kv: dict[str, KVCost]  # layer keys "L3"
    fixed_params: int  # embeddings (read one row per token) and norms: never changed by a transform
    fixed_bytes_per_token: float
    dense: Cost | None = field(default=None, repr=False)

    @classmethod
    def dense_model(cls, lm: Any) -> CostLedger:
        ad = lm.adapter
        bits = next(lm.model.parameters()).element_size() * 8
        parts = {projection_key(layer.index, role): PartCost(lin.num_params, bits)
                 for layer in ad.layers for role, lin in layer.linears.items()}
        parts[HEAD] = PartCost(ad.lm_head.weight.numel(), bits)
        kv = {layer_key(layer.index): KVCost(2 * ad.num_kv_heads * ad.head_dim * bits / 8) for layer in ad.layers}
        unique = {id(p): p.numel() for p in lm.model.parameters()}
        fixed = sum(unique.values()) - sum(p.params for p in parts.values())  # a tied head is the embedding
        tables = [ad.pos_embed.weight] if ad.pos_embed is not None else []
        if ad.embed.weight is not ad.lm_head.weight:
            tables.append(ad.embed.weight)
        rows = (1 + (ad.pos_embed is not None)) * ad.hidden_size  # a token reads one row of each table
        small = fixed - sum(t.numel() for t in tables)  # norms and biases, read on every token
        ledger = cls(parts, kv, fixed, (small + rows) * bits / 8)
        ledger.dense = ledger.summary()
        return ledger

    def summary(self) -> Cost:
        weight = self.fixed_bytes_per_token + sum(p.bytes_per_token() for p in self.parts.values())
        kv = sum(c.cost() for c in self.kv.values())
        params = self.fixed_params + sum(p.held_params() for p in self.parts.values())
        base = self.dense
        if base is None:  # this is the dense model
            return Cost(weight, kv, params, weight, kv, params)
        return Cost(weight, kv, params, base.weight_bytes_per_token, base.kv_bytes_per_token, base.params)


def recipe_cost(lm: Any, recipes: list[Any]) -> Cost:
    """The cost of `lm` with `recipes` applied in order."""
    ledger = CostLedger.dense_model(lm)
    for recipe in recipes:
        recipe.apply_cost(ledger, lm)
    return ledger.summary()
