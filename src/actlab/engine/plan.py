"""Lowering a (composed) recipe to what the decode engine does per layer and per projection.

The engine runs activation-sparsity rules inside its GEMV kernels (threshold, top-k, relative, statistical),
weight-only quantization (8- and 4-bit grouped kernels, sparse or not), output biases, removed blocks and
sublayers (skipped, with their KV cache; a repair in their place), interventions on the residual stream
(steering vectors, ablations at resid_in / resid_out), and KV recipes that evict cached tokens (a ragged cache).
Anything else is refused with a one-line error naming the recipe, before any weight is laid out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from actlab.errors import ConfigError
from actlab.transforms.compose import members, validate
from actlab.transforms.kv import KVRecipe
from actlab.transforms.layers import LayerRecipe
from actlab.transforms.quant import QuantRecipe
from actlab.transforms.sparsity import MaskRule, SparsityRecipe
from actlab.transforms.steer import InterventionRecipe

ENGINE_EDIT_KINDS = ("resid_in", "resid_out")


@dataclass
class EnginePlan:
    recipe: Any = None  # what prefill attaches to the HF model (the masked reference)
    rules: dict[str, MaskRule] = field(default_factory=dict)  # projection key -> rule (act rules keyed by down)
    bias: dict[str, list[float]] = field(default_factory=dict)
    skip_blocks: set[int] = field(default_factory=set)
    skip_attn: set[int] = field(default_factory=set)
    skip_mlp: set[int] = field(default_factory=set)
    repairs: dict[str, dict[str, Any]] = field(default_factory=dict)  # removed part ("L3", "L3.attn") -> repair
    sparsity: list[SparsityRecipe] = field(default_factory=list)
    # (layer, "resid_in" | "resid_out") -> the edits applied to the residual stream there, in order
    resid_edits: dict[tuple[int, str], list[Any]] = field(default_factory=dict)
    quant: dict[str, dict[str, Any]] = field(default_factory=dict)  # projection key or "lm_head" -> recipe entry
    kv: KVRecipe | None = None  # the KV recipe that evicts cached tokens (the engine's cache is then ragged)

    @classmethod
    def lower(cls, lm: Any, recipe: Any | None) -> EnginePlan:
        if recipe is None:
            return cls()
        validate(recipe, lm)
        plan = cls(recipe=recipe)
        for part in members(recipe):
            if isinstance(part, SparsityRecipe):
                for key, rule in part.rules.items():
                    if rule.kind == "core" or rule.rank:
                        raise ConfigError(
                            f"the decode engine runs threshold, top-k and statistical rules; {key} is a "
                            f"{'core-neuron' if rule.kind == 'core' else 'low-rank'} rule ({part.method}): "
                            "evaluate it with actlab.transforms.sparsity.attach instead")
                plan.rules.update(part.rules)
                plan.bias.update(part.bias)
                plan.sparsity.append(part)
            elif isinstance(part, LayerRecipe):
                plan.repairs.update(part.repair)
                plan.skip_blocks.update(part.blocks())
                for i, sub in part.sublayers():
                    (plan.skip_attn if sub == "attn" else plan.skip_mlp).add(i)
            elif isinstance(part, InterventionRecipe):
                plan.add_interventions(lm, part)
            elif isinstance(part, KVRecipe):
                if part.bits:
                    raise ConfigError(f"the decode engine holds its KV cache in float32; {part.describe()} quantizes "
                                      "it (KIVI), which runs through hooks in `actlab eval`")
                plan.kv = part if part.evicts else None
            elif isinstance(part, QuantRecipe):
                a8 = next((k for k, e in part.weights.items() if "act_bits" in e), None)
                if a8 is not None:
                    raise ConfigError(f"the decode engine runs weight-only quantization; {part.describe()} also "
                                      f"rounds activations ({a8}: W8A8), which runs through hooks in `actlab eval`")
                plan.quant.update(part.weights)
            else:
                raise ConfigError(f"the decode engine cannot run {part.describe()} yet (it runs sparsity, layer, "
                                  "quantization, intervention and KV eviction recipes); evaluate it through hooks with "
                                  "`actlab eval`")
        return plan

    def add_interventions(self, lm: Any, recipe: InterventionRecipe) -> None:
        from actlab.probe.sites import get_site

        for edit in recipe.edits:
            site = get_site(lm.adapter, edit.site, writable=True)
            if site.kind not in ENGINE_EDIT_KINDS:
                raise ConfigError(f"the decode engine runs interventions on the residual stream "
                                  f"({', '.join(ENGINE_EDIT_KINDS)}); {edit.site} is not one: evaluate "
                                  f"{recipe.describe()} through hooks with `actlab eval`")
            self.resid_edits.setdefault((site.layer, site.kind), []).append((edit.edit(lm), site))
