"""Apply a sparsity recipe to an unmodified HF model through the probe's write hooks (the masked reference).

Inside `attach(lm, recipe)` every rule zeroes the dropped input channels of its projection (an edit at the
projection's input site), or the dropped activations for `source="act"` (an edit at L{i}.act); R-Sparse's
low-rank path and output biases are edits at the projection's output site. A `SparsityMeter` counts what was
dropped. On exit every hook is removed and the model is exactly as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from actlab.models.keys import projection_site, site_key, split_key
from actlab.probe.edit import Edit, Editor, ForwardContext
from actlab.transforms.sparsity.budget import (
    dropped_by_rules,
    effective_sparsity,
    projection_params,
    projection_shapes,
    projection_view,
)
from actlab.transforms.sparsity.recipe import MaskRule, SparsityRecipe
from actlab.transforms.sparsity.rules import keep_mask, last_half_start, sentence_core


@dataclass
class SparsityMeter:
    """Counts kept / seen channels per projection over the sparsified tokens."""

    kept: dict[str, int] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)
    recipe: SparsityRecipe | None = field(default=None, repr=False)

    def count(self, key: str, mask: torch.Tensor) -> None:
        self.kept[key] = self.kept.get(key, 0) + int(mask.sum())
        self.seen[key] = self.seen.get(key, 0) + mask.numel()

    def dropped(self) -> dict[str, float]:
        return {k: 1.0 - self.kept[k] / self.seen[k] for k in self.seen if self.seen[k]}

    def effective(self, lm: Any, recipe: SparsityRecipe) -> float:
        dropped = dropped_by_rules(recipe.rules, self.dropped(), projection_shapes(lm.adapter))
        return effective_sparsity(dropped, projection_params(lm.adapter))

    def summary(self, lm: Any) -> dict[str, float]:
        return {"achieved_sparsity": self.effective(lm, self.recipe)} if self.recipe is not None else {}


def sparsified_positions(x: torch.Tensor, ctx: ForwardContext, recipe: SparsityRecipe) -> torch.Tensor | None:
    """A [..., 1] bool selecting the positions a recipe sparsifies, or None for "every position".

    "last-half" (TEAL's protocol) sparsifies the second half of each call's window; `dense_prefix` keeps the
    first positions of a sequence dense (absolute positions: a call continuing a KV cache is past them)."""
    if ctx.tokens == 0 or (recipe.positions == "all" and recipe.dense_prefix == 0):
        return None
    t = ctx.tokens
    pos = torch.arange(x.numel() // x.shape[-1], device=x.device) % t
    where = pos + ctx.offset >= recipe.dense_prefix
    if recipe.positions == "last-half":
        where &= pos >= last_half_start(t)
    return where.reshape(*x.shape[:-1], 1)


def sparsity_edits(lm: Any, recipe: SparsityRecipe, meter: SparsityMeter) -> list[Edit]:
    """The write-hook edits that apply `recipe` (in the order the rules list them, biases last)."""
    device = lm.device
    dropped_part: dict[str, torch.Tensor] = {}  # R-Sparse: x * ~keep, from a projection's input to its output
    cores: dict[str, torch.Tensor] = {}  # CoreInfer: the current sequence's core neurons, set at its prompt

    def apply_core(key: str, rule: MaskRule, scale, x: torch.Tensor) -> torch.Tensor:
        """A call of several tokens is a prompt: it chooses the core from its dense part (all of it, or the
        first half under "last-half") and stays dense there; the tokens after it use the core."""
        t = x.shape[-2]
        if t > 1:
            prompt = last_half_start(t) if recipe.positions == "last-half" else t
            cores[key] = sentence_core(x[..., :prompt, :], rule, scale)
            if prompt == t:
                return x
            keep = cores[key].expand_as(x[..., prompt:, :])
            meter.count(key, keep)
            return torch.cat([x[..., :prompt, :], x[..., prompt:, :] * keep], dim=-2)
        if key not in cores:
            return x  # no prompt seen yet: nothing to choose from
        keep = cores[key].expand_as(x)
        meter.count(key, keep)
        return x * keep

    def masker(key: str, rule: MaskRule):
        scale = rule.scale_tensor(device)

        def apply(x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
            if rule.kind == "core":
                return apply_core(key, rule, scale, x)
            keep = keep_mask(x, rule, scale)
            where = sparsified_positions(x, ctx, recipe)
            if where is not None:
                keep = keep | ~where
                meter.count(key, keep.expand_as(x)[where.expand_as(x)].reshape(-1, x.shape[-1]))
            else:
                meter.count(key, keep)
            if rule.rank:
                dropped_part[key] = x * ~keep
            return x * keep

        return apply

    def lowrank(key: str, rank: int):
        us, vt = lowrank_factors(lm, key, rank)
        return lambda out, ctx: out + ((dropped_part.pop(key).float() @ vt.T) @ us.T).to(out.dtype)

    def add_bias(values: list[float]):
        b = torch.tensor(values, dtype=torch.float32, device=device)

        def apply(out: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
            where = sparsified_positions(out, ctx, recipe)
            return out + (b if where is None else b * where)

        return apply

    edits = []
    for key, rule in recipe.rules.items():
        site = site_key(split_key(key)[0], "act") if rule.source == "act" else projection_site(key, "in")
        edits.append(Edit(site, masker(key, rule)))
        if rule.rank:
            edits.append(Edit(projection_site(key, "out"), lowrank(key, rule.rank)))
    edits += [Edit(projection_site(key, "out"), add_bias(values)) for key, values in recipe.bias.items()]
    return edits


def sparsity_editor(lm: Any, recipe: SparsityRecipe, meter: SparsityMeter) -> Editor:
    """The write hooks of `recipe` (validated by the caller: `compose.validate` checks model and keys)."""
    return Editor(lm, sparsity_edits(lm, recipe, meter))


@contextlib.contextmanager
def attach(lm: Any, recipe: SparsityRecipe, meter: SparsityMeter | None = None) -> Iterator[SparsityMeter]:
    """Sparsify `lm` according to `recipe` for the duration of the block; yields the meter."""
    from actlab.transforms.compose import validate

    validate(recipe, lm)
    meter = meter if meter is not None else SparsityMeter(recipe=recipe)
    with sparsity_editor(lm, recipe, meter):
        yield meter


def lowrank_factors(lm: Any, key: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r, V_r^T) of projection `key`'s weight, memoised on the adapter (an SVD is not free) for as long as
    the weight tensor is the same one, unchanged."""
    memo = lm.adapter.__dict__.setdefault("_actlab_svd", {})
    view = projection_view(lm.adapter, key)
    tag = (key, id(view.module.weight), view.module.weight._version)
    if tag not in memo:
        w = view.weight().detach().float()
        u, sv, vt = torch.linalg.svd(w, full_matrices=False)
        memo[tag] = (u * sv, vt)
    us, vt = memo[tag]
    return us[:, :rank], vt[:rank]
