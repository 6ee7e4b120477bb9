"""Apply a sparsity recipe to an unmodified HF model with hooks (the masked reference computation).

`attach(lm, recipe)` is a context manager: inside it every rule zeroes the dropped input channels of its
projection (or the dropped activations, for `source="act"`), and a `SparsityMeter` counts what was
dropped; on exit every hook is removed and the model is exactly as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from actlab.models.loader import LoadedModel
from actlab.transforms.sparsity.base import (MaskRule, SparsityRecipe, dropped_by_rules, effective_sparsity,
                                             projection_params, projection_shapes, projection_view, token_rms)


def keep_mask(x: torch.Tensor, rule: MaskRule, scale: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask of the channels kept, per token (last dimension = channels)."""
    score = x.abs()
    if scale is not None:
        score = score * scale
    if rule.kind == "threshold":
        return score > rule.threshold
    if rule.kind == "topk":
        channels = score.shape[-1]
        k = min(channels, max(0, round(rule.keep * channels)))
        if k == channels:
            return torch.ones_like(score, dtype=torch.bool)
        if k == 0:
            return torch.zeros_like(score, dtype=torch.bool)
        cutoff = score.float().kthvalue(channels - k, dim=-1, keepdim=True).values  # largest score dropped
        return score > cutoff
    if rule.kind == "relative":
        s = score.float()
        return s > rule.threshold * token_rms(s)
    if rule.kind == "gaussian":
        s = score.float()
        cutoff = s.mean(-1, keepdim=True) + rule.z * s.std(-1, keepdim=True)
        return s > cutoff
    if rule.kind == "core":
        raise ValueError("a core rule's mask depends on the prompt: use sentence_core()")
    raise ValueError(f"unknown rule kind {rule.kind!r}")


def sentence_core(prompt: torch.Tensor, rule: MaskRule, scale: torch.Tensor | None = None) -> torch.Tensor:
    """CoreInfer's sentence-wise core neurons: [batch, prompt tokens, neurons] -> [batch, 1, neurons] bool.

    Each prompt token's core is its top-`alpha` fraction of neurons by score; the sentence keeps the `keep`
    fraction of neurons that are most often in a token's core (ties broken by the mean score)."""
    score = prompt.float().abs()
    if scale is not None:
        score = score * scale
    n = score.shape[-1]
    k_token = max(1, round(rule.alpha * n))
    k_keep = min(n, max(0, round(rule.keep * n)))
    in_core = torch.zeros_like(score).scatter_(-1, score.topk(k_token, dim=-1).indices, 1.0)
    mean = score.mean(-2)
    rank = in_core.sum(-2) + 0.5 * mean / mean.amax(-1, keepdim=True).clamp_min(1e-30)  # count, then magnitude
    keep = torch.zeros_like(rank, dtype=torch.bool)
    keep.scatter_(-1, rank.topk(k_keep, dim=-1).indices, True)
    return keep[:, None, :]


@dataclass
class SparsityMeter:
    """Counts kept / seen channels per projection over the sparsified tokens."""

    kept: dict[str, int] = field(default_factory=dict)
    seen: dict[str, int] = field(default_factory=dict)

    def count(self, key: str, mask: torch.Tensor) -> None:
        self.kept[key] = self.kept.get(key, 0) + int(mask.sum())
        self.seen[key] = self.seen.get(key, 0) + mask.numel()

    def dropped(self) -> dict[str, float]:
        return {k: 1.0 - self.kept[k] / self.seen[k] for k in self.seen if self.seen[k]}

    def effective(self, lm: LoadedModel, recipe: SparsityRecipe) -> float:
        dropped = dropped_by_rules(recipe.rules, self.dropped(), projection_shapes(lm.adapter))
        return effective_sparsity(dropped, projection_params(lm.adapter))


def last_half_start(t: int) -> int:
    """First position of a t-token window that TEAL's "last-half" protocol sparsifies."""
    return t - t // 2


def _sparsified_positions(x: torch.Tensor, shape: tuple[int, int] | None, recipe: SparsityRecipe,
                          offset: int = 0) -> torch.Tensor | None:
    """A [..., 1] bool selecting the positions a recipe sparsifies, or None for "every position".

    "last-half" (TEAL's protocol) sparsifies the second half of each window; `dense_prefix` keeps the
    first positions of a sequence dense. `offset` is the position of x's first token (decoding)."""
    if shape is None or (recipe.positions == "all" and recipe.dense_prefix == 0):
        return None
    b, t = shape
    pos = torch.arange(x.numel() // x.shape[-1], device=x.device) % t + offset
    where = pos >= recipe.dense_prefix
    if recipe.positions == "last-half":
        where &= pos >= last_half_start(t)
    return where.reshape(*x.shape[:-1], 1)


@contextlib.contextmanager
def attach(lm: LoadedModel, recipe: SparsityRecipe, meter: SparsityMeter | None = None) -> Iterator[SparsityMeter]:
    """Sparsify `lm` according to `recipe` for the duration of the block."""
    recipe.check_model(lm.adapter)
    meter = meter if meter is not None else SparsityMeter()
    shape: list[tuple[int, int] | None] = [None]
    modules = {f"L{layer.index}.{role}": lin.module for layer in lm.adapter.layers for role, lin in layer.linears.items()}
    act_modules = {f"L{layer.index}.down": layer.act_fn for layer in lm.adapter.layers}
    device = lm.device

    def remember_shape(_module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        shape[0] = tuple(ids.shape) if ids is not None and ids.dim() == 2 else None

    dropped_part: dict[str, torch.Tensor] = {}  # R-Sparse: x * ~keep, from a projection's pre-hook to its hook
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

        def apply(x: torch.Tensor) -> torch.Tensor:
            if rule.kind == "core":
                return apply_core(key, rule, scale, x)
            keep = keep_mask(x, rule, scale)
            where = _sparsified_positions(x, shape[0], recipe)
            if where is not None:
                keep = keep | ~where
                meter.count(key, keep.expand_as(x)[where.expand_as(x)].reshape(-1, x.shape[-1]))
            else:
                meter.count(key, keep)
            if rule.rank:
                dropped_part[key] = x * ~keep
            return x * keep

        return apply

    with contextlib.ExitStack() as stack:
        h = lm.model.base_model.register_forward_pre_hook(remember_shape, with_kwargs=True)  # with or without the head
        stack.callback(h.remove)
        for key, rule in recipe.rules.items():
            apply = masker(key, rule)
            if rule.source == "act":
                h = act_modules[key].register_forward_hook(lambda m, a, out, f=apply: f(out))
            else:
                h = modules[key].register_forward_pre_hook(lambda m, args, f=apply: (f(args[0]), *args[1:]))
            stack.callback(h.remove)
            if rule.rank:
                h = modules[key].register_forward_hook(_lowrank_correction(lm, key, rule.rank, dropped_part))
                stack.callback(h.remove)
        stack.callback(dropped_part.clear)
        for key, bias in recipe.bias.items():
            b = torch.tensor(bias, dtype=torch.float32, device=device)

            def add_bias(m, a, out, b=b):
                where = _sparsified_positions(out, shape[0], recipe)
                return out + (b if where is None else b * where)

            h = modules[key].register_forward_hook(add_bias)
            stack.callback(h.remove)
        yield meter


def lowrank_factors(lm: LoadedModel, key: str, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_r S_r, V_r^T) of projection `key`'s weight, memoised on the adapter (an SVD is not free)."""
    memo = lm.adapter.__dict__.setdefault("_actlab_svd", {})
    if key not in memo:
        w = projection_view(lm.adapter, key).weight().detach().float()
        u, sv, vt = torch.linalg.svd(w, full_matrices=False)
        memo[key] = (u * sv, vt)
    us, vt = memo[key]
    return us[:, :rank], vt[:rank]


def _lowrank_correction(lm: LoadedModel, key: str, rank: int, dropped_part: dict[str, torch.Tensor]):
    us, vt = lowrank_factors(lm, key, rank)

    def add(_module, _args, out):
        x = dropped_part.pop(key)
        return out + ((x.float() @ vt.T) @ us.T).to(out.dtype)

    return add
