"""The layer recipe: whole decoder blocks and attention / MLP sublayers removed.

A removed block passes its input through unchanged (an edit at L{i}.resid_out that returns L{i}.resid_in's
tensor); a removed sublayer contributes nothing to the residual stream (its output projection's output is
zeroed, bias included, which a post-norm maps to zero as well). It exports into weights: an HF directory
without the removed blocks (every per-layer config field cut to match), removed sublayers as zeroed output
projections.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from actlab import schema
from actlab.errors import ConfigError
from actlab.models.keys import layer_key, layer_of, projection_key, site_key
from actlab.probe.edit import Edit, Editor, zero
from actlab.transforms.base import Claim, Recipe, register_recipe
from actlab.transforms.layers.repair import TENSORS, apply_repair, repair_params

PART = re.compile(r"^L(\d+)(?:\.(attn|mlp))?$")
ATTENTION_ROLES = ("q", "k", "v", "qkv", "o")
MLP_ROLES = ("gate", "up", "down")
SUBLAYER_INPUT = {"attn": "attn_in", "mlp": "mlp_in"}  # what a sublayer's repair reads


@register_recipe
@dataclass
class LayerRecipe(Recipe):
    method: str
    model: dict[str, Any]
    drop: list[str]  # "L3" (a block), "L3.attn", "L3.mlp" (a sublayer)
    target: float = 0.0  # the fraction of non-embedding parameters the method was asked to remove
    params: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    repair: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # part -> repair.py's tensors
    family = "layers"

    def __post_init__(self) -> None:
        for part in self.drop:
            if not PART.match(part):
                raise ConfigError(f"drop: {part!r} is not a block (L<i>) or a sublayer (L<i>.attn, L<i>.mlp)")
        if len(set(self.drop)) != len(self.drop):
            raise ConfigError("drop: a part is listed twice")
        blocks = {p for p in self.drop if "." not in p}
        inside = [p for p in self.drop if "." in p and p.split(".")[0] in blocks]
        if inside:
            raise ConfigError(f"drop: {inside[0]} is inside a block that is removed as a whole")
        kept = sorted(set(self.repair) - set(self.drop))
        if kept:
            raise ConfigError(f"repair: {kept[0]} is not removed (a repair replaces a removed part)")
        for part, tensors in self.repair.items():
            missing = [t for t in TENSORS if not torch.is_tensor(tensors.get(t))]
            if missing:
                raise ConfigError(f"repair: {part} lacks the tensor {missing[0]!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LayerRecipe:
        return schema.build(cls, d, "layer recipe")

    def describe(self) -> str:
        mark = lambda p: f"{p}+repair" if p in self.repair else p  # noqa: E731
        return f"layers:{self.method}[{','.join(mark(p) for p in self.drop)}]"

    # -- parts ---------------------------------------------------------------------------------------
    def blocks(self) -> list[int]:
        return sorted(layer_of(p) for p in self.drop if "." not in p)

    def sublayers(self) -> list[tuple[int, str]]:
        return sorted((layer_of(p), p.split(".")[1]) for p in self.drop if "." in p)

    def check_parts(self, adapter: Any) -> None:
        n = adapter.num_layers
        for part in self.drop:
            if layer_of(part) >= n:
                raise ConfigError(f"drop: {part} is out of range (the model has layers 0-{n - 1})")
        if len(self.blocks()) >= n:
            raise ConfigError(f"drop: removing all {n} blocks leaves no model")

    def removed_projections(self, adapter: Any) -> list[str]:
        out = []
        for layer in adapter.layers:
            i = layer.index
            for role in layer.linears:
                part = "attn" if role in ATTENTION_ROLES else "mlp"
                if layer_key(i) in self.drop or f"{layer_key(i)}.{part}" in self.drop:
                    out.append(projection_key(i, role))
        return out

    # -- behaviour ---------------------------------------------------------------------------------------
    def attach(self, lm: Any, stack: contextlib.ExitStack) -> None:
        self.check_parts(lm.adapter)
        edits = []
        for i in self.blocks():
            held: dict[str, torch.Tensor] = {}
            edits.append(Edit(site_key(i, "resid_in"), _remember(held)))
            edits.append(Edit(site_key(i, "resid_out"), _recall(held, self.repair.get(layer_key(i)))))
        for i, part in self.sublayers():
            name = f"{layer_key(i)}.{part}"
            output = lm.adapter.layers[i].output_site(part)
            if name in self.repair:
                held = {}
                edits.append(Edit(site_key(i, SUBLAYER_INPUT[part]), _remember(held)))
                edits.append(Edit(output, _replace_by_repair(held, self.repair[name])))
            else:
                edits.append(Edit(output, zero()))
        stack.enter_context(Editor(lm, edits))

    def claims(self, lm: Any) -> list[Claim]:
        self.check_parts(lm.adapter)
        return [Claim(f"layer:{p}", "drop") for p in self.drop]

    def apply_cost(self, ledger: Any, lm: Any) -> None:
        from actlab.transforms.cost import PartCost

        for key in self.removed_projections(lm.adapter):
            ledger.parts[key].present = False
        bits = next(lm.model.parameters()).element_size() * 8
        for part, tensors in self.repair.items():
            ledger.parts[f"{part}.repair"] = PartCost(repair_params(tensors), bits)
        for i in self.blocks():
            ledger.kv[layer_key(i)].present = False
        for i, part in self.sublayers():
            if part == "attn":
                ledger.kv[layer_key(i)].present = False

    def export_hf(self, lm: Any) -> str:
        return "runtime" if self.repair else "weights"

    def changes_structure(self, lm: Any) -> bool:
        return bool(self.blocks())

    def fold_into(self, lm: Any, model: Any) -> Any:
        """`model` (a copy of lm.model) with the removed blocks taken out and the removed sublayers' output
        projections zeroed; its config cut to the kept layers."""
        from actlab.models.adapter import adapter_for

        self.check_parts(lm.adapter)
        adapter = adapter_for(model)
        with torch.no_grad():
            for i, part in self.sublayers():
                for param in adapter.layers[i].output_parameters(part):
                    param.zero_()
        removed = set(self.blocks())
        if removed:
            remove_blocks(model, adapter, removed)
        return model


def _remember(held: dict[str, torch.Tensor]):
    def op(x, ctx):
        held["x"] = x
        return x
    return op


def _recall(held: dict[str, torch.Tensor], repair: dict[str, torch.Tensor] | None = None):
    if repair is None:
        return lambda x, ctx: held.pop("x")

    def op(x, ctx):
        x_in = held.pop("x")
        return x_in + apply_repair(x_in, repair)
    return op


def _replace_by_repair(held: dict[str, torch.Tensor], repair: dict[str, torch.Tensor]):
    return lambda x, ctx: apply_repair(held.pop("x"), repair)


def remove_blocks(model: Any, adapter: Any, removed: set[int]) -> None:
    """Take decoder blocks out of an HF model in place: the layer list, every per-layer config field (lists with
    one entry per layer, e.g. Gemma-3's layer_types) and the layer indices the attention modules use for the
    KV cache."""
    n = adapter.num_layers
    kept = [i for i in range(n) if i not in removed]
    container, name = _parent(model, adapter.spec.layers)
    layers = getattr(container, name)
    setattr(container, name, torch.nn.ModuleList([layers[i] for i in kept]))
    config = model.config
    spec = adapter.spec
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n and not key.startswith("_") and key != spec.dense_layers_attr:
            setattr(config, key, [value[i] for i in kept])
    if spec.dense_layers_attr:  # which kept layers are dense, by their new indices (the period no longer holds)
        dense = [new for new, old in enumerate(kept) if adapter.layers[old].moe is None]
        setattr(config, spec.dense_layers_attr, dense)
        setattr(config, spec.sparse_step_attr, 1)
    for attr in ("num_hidden_layers", "n_layer"):
        if hasattr(config, attr):
            setattr(config, attr, len(kept))
    for new_index, layer in enumerate(getattr(container, name)):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index


def _parent(root: Any, path: str) -> tuple[Any, str]:
    from actlab.models.adapter import resolve

    head, _, last = path.rpartition(".")
    return (resolve(root, head) if head else root), last
