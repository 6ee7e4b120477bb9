"""An HF model that really skips what a layer recipe removes, for prefill: removed blocks taken out of the layer
list (as the export does) and removed sublayers replaced by modules that compute nothing but their repair.

The hooked recipe zeroes a removed sublayer's output projection, so the sublayer still runs; an exported model
keeps it too (zeroed weights, identical outputs). To time prefill as a model without those parts would run, each
removed attention / MLP module is swapped for `Skipped`, which returns what the removed module added to the
stream: zero, or its repair of the module's input (the sublayer's normed input, which is what the repair was
fitted on). A block removed with a repair stays in the list as a `Skipped` block returning x + g(x).

For forward passes without a KV cache (prefill timing, logits): a skipped attention writes no cache entry.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from actlab.errors import ConfigError
from actlab.transforms.layers.repair import apply_repair


class Skipped(nn.Module):
    """Stands in for a removed module: what it would add to the residual stream, in the structure it returned
    (a tensor, or a tuple with the tensor first: attention modules also return their weights)."""

    def __init__(self, repair: dict[str, torch.Tensor] | None, arity: int | None, residual: bool):
        super().__init__()
        self.repair, self.arity, self.residual = repair, arity, residual

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        x = args[0] if args else kwargs["hidden_states"]
        out = apply_repair(x, self.repair) if self.repair is not None else torch.zeros_like(x)
        if self.residual:
            out = x + out if self.repair is not None else x
        return out if self.arity is None else (out, *([None] * (self.arity - 1)))


def _arities(model: nn.Module, modules: list[nn.Module]) -> dict[int, int | None]:
    """How many outputs each module returns (None: a bare tensor), from one short forward pass."""
    seen: dict[int, int | None] = {}

    def record(module: nn.Module, args: Any, out: Any) -> None:  # returns None: the output stays as it is
        seen[id(module)] = len(out) if isinstance(out, tuple) else None

    hooks = [m.register_forward_hook(record) for m in modules]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device),
                  use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _replace(parent: nn.Module, child: nn.Module, new: nn.Module) -> None:
    name = next(n for n, m in parent.named_children() if m is child)
    setattr(parent, name, new)


def skipping_model(lm: Any, recipe: Any) -> nn.Module:
    """A copy of lm.model that computes what `recipe` (a LayerRecipe) leaves, and nothing it removes."""
    from actlab.models.adapter import adapter_for
    from actlab.models.keys import layer_key
    from actlab.transforms.layers.recipe import remove_blocks

    recipe.check_parts(lm.adapter)
    model = copy.deepcopy(lm.model)
    adapter = adapter_for(model)
    layers = adapter.layers
    targets = {(i, part): getattr(layers[i], part) for i, part in recipe.sublayers()}
    lacking = [f"{layer_key(i)}.{part}" for (i, part), module in targets.items() if module is None]
    if lacking:
        raise ConfigError(f"{adapter.family}'s blocks hold no module for {lacking[0]} alone (its projections sit "
                          "in the block): a model that skips it cannot be built")
    repaired_blocks = [i for i in recipe.blocks() if layer_key(i) in recipe.repair]
    arity = _arities(model, [*targets.values(), *(layers[i].module for i in repaired_blocks)])
    for (i, part), module in targets.items():
        _replace(layers[i].module, module, Skipped(recipe.repair.get(f"{layer_key(i)}.{part}"), arity[id(module)],
                                                   residual=False))
    container = layers[0].module  # the blocks' list holds every block; find it through the first
    parent = next(m for m in model.modules() if any(c is container for c in m.children()))
    for i in repaired_blocks:
        _replace(parent, layers[i].module, Skipped(recipe.repair[layer_key(i)], arity[id(layers[i].module)],
                                                   residual=True))
    gone = set(recipe.blocks()) - set(repaired_blocks)
    if gone:
        remove_blocks(model, adapter, gone)
    return model
