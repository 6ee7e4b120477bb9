"""Write hooks: edit the activation at any site, per head and per position, through one mechanism.

Sparsity masks, steering vectors, ablations, patching and dropped layers are all `Edit`s: a site, an operation
on the site's flat tensor [..., channels], and optionally the heads and positions it applies to.

    with Editor(lm, [Edit("L3.o_in", zero(), heads=[5]), Edit("L6.resid_out", add(v, 4.0), positions=[-1])]):
        lm.model(ids)

Operations are plain functions `op(x, ctx) -> x'` (`x` keeps its shape; `ctx` says which positions the call
covers). Positions are absolute: a call that continues a KV cache of n tokens covers n, n+1, ...; negative
positions count from the end of the current call. Edits at one site apply in list order. On exit, normal or
not, every hook is removed and the model is exactly as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from actlab.errors import ConfigError
from actlab.models.adapter import replace_rows
from actlab.models.compat import call_cache
from actlab.probe.sites import Site, get_site

PositionSpec = None | Sequence[int] | slice | Callable[["ForwardContext"], torch.Tensor]


@dataclass
class ForwardContext:
    """What the current forward call covers: batch size, tokens in the call, tokens before it (KV cache)."""

    batch: int = 0
    tokens: int = 0
    offset: int = 0

    def positions(self, device=None) -> torch.Tensor:
        """Absolute positions of the call's tokens, [tokens]."""
        return torch.arange(self.offset, self.offset + self.tokens, device=device)


Op = Callable[[torch.Tensor, ForwardContext], torch.Tensor]


@dataclass
class Edit:
    site: str
    op: Op
    heads: Sequence[int] | None = None  # only these heads of a head-structured site
    positions: PositionSpec = None  # None: every position
    channels: Sequence[int] | None = None  # only these channels (neurons) of the flat view

    def apply(self, x: torch.Tensor, site: Site, ctx: ForwardContext) -> torch.Tensor:
        # an op on the whole view (a patch from another run) is computed whole and its selected part kept
        whole = self.op(x, ctx) if getattr(self.op, "whole_view", False) else None
        if self.heads is not None:
            n, hd = site.heads
            heads = torch.as_tensor(list(self.heads), dtype=torch.long, device=x.device)
            split = x.reshape(*x.shape[:-1], n, hd)
            part = (whole.reshape(split.shape).index_select(-2, heads) if whole is not None
                    else self.op(split.index_select(-2, heads), ctx))
            new = split.index_copy(-2, heads, part.to(split.dtype)).reshape(x.shape)
        elif self.channels is not None:
            channels = torch.as_tensor(list(self.channels), dtype=torch.long, device=x.device)
            part = whole.index_select(-1, channels) if whole is not None else self.op(x.index_select(-1, channels), ctx)
            new = x.index_copy(-1, channels, part.to(x.dtype))
        else:
            new = whole if whole is not None else self.op(x, ctx)
        if self.positions is None:
            return new
        where = position_mask(self.positions, ctx, x)
        return torch.where(where, new, x)


def position_mask(spec: PositionSpec, ctx: ForwardContext, x: torch.Tensor) -> torch.Tensor:
    """A bool tensor broadcastable to x ([..., tokens, 1]) selecting the positions `spec` names."""
    pos = ctx.positions(x.device)
    if callable(spec) and not isinstance(spec, slice):
        chosen = spec(ctx).to(x.device)
    elif isinstance(spec, slice):
        chosen = torch.zeros(ctx.tokens, dtype=torch.bool, device=x.device)
        chosen[spec] = True
    else:
        wanted = torch.as_tensor(list(spec), dtype=torch.long, device=x.device)
        wanted = torch.where(wanted < 0, wanted + ctx.offset + ctx.tokens, wanted)
        chosen = torch.isin(pos, wanted)
    if x.dim() < 2 or x.shape[-2] != ctx.tokens:
        raise ConfigError("positions can only be chosen at sites whose tensor is [batch, tokens, channels]")
    return chosen.reshape(*([1] * (x.dim() - 2)), ctx.tokens, 1)


# -- operations -----------------------------------------------------------------------------------

def zero() -> Op:
    return lambda x, ctx: torch.zeros_like(x)


def scale(factor: float | torch.Tensor) -> Op:
    return lambda x, ctx: x * _on(factor, x)


def add(vector: torch.Tensor | float, coeff: float = 1.0) -> Op:
    return lambda x, ctx: x + coeff * _on(vector, x)


def replace(value: torch.Tensor | float) -> Op:
    """Every selected position (and head) becomes `value` (a vector broadcast over positions, or a tensor of
    the site's shape)."""
    return lambda x, ctx: _on(value, x).expand_as(x).clone()


class patch:  # noqa: N801 (an op constructor, like the functions above)
    """Every selected position takes its value from another run: `source` is the site's flat view recorded there,
    [batch or 1, tokens, channels], indexed by absolute position (so it also patches through a KV cache)."""

    whole_view = True

    def __init__(self, source: torch.Tensor):
        self.source = source if source.dim() == 3 else source.reshape(1, *source.shape[-2:])

    def __call__(self, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        end = ctx.offset + ctx.tokens
        if self.source.shape[-2] < end or self.source.shape[-1] != x.shape[-1]:
            raise ConfigError(f"the patch source is {self.source.shape[-2]} positions x {self.source.shape[-1]} "
                              f"channels; this call needs positions up to {end} x {x.shape[-1]} channels")
        src = self.source[:, ctx.offset:end].to(device=x.device, dtype=x.dtype)
        if src.shape[0] not in (1, x.shape[0]):
            raise ConfigError(f"the patch source has a batch of {src.shape[0]}, the run {x.shape[0]}")
        return src.expand_as(x).clone()


def _on(value: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor | float:
    return value.to(device=x.device, dtype=x.dtype) if torch.is_tensor(value) else value


# -- the hooks ------------------------------------------------------------------------------------

class Editor(contextlib.AbstractContextManager):
    """Registers `edits` on `lm` for the duration; hooks are always removed, also on exceptions."""

    def __init__(self, lm: Any, edits: Sequence[Edit]):
        self.lm = lm
        self.edits = list(edits)
        self.context = ForwardContext()
        self._stack = contextlib.ExitStack()
        self._sites = [get_site(lm.adapter, e.site, writable=True) for e in self.edits]
        for edit, site in zip(self.edits, self._sites):
            check_selection(edit, site)

    def __enter__(self) -> Editor:
        try:
            # the causal LM and its base model: some families (OPT) call their decoder without the base model
            for module in dict.fromkeys([self.lm.model, self.lm.model.base_model]):
                self._stack.callback(module.register_forward_pre_hook(self._remember_call, with_kwargs=True).remove)
            by_site: dict[str, tuple[Site, list[Edit]]] = {}
            for edit, site in zip(self.edits, self._sites):
                by_site.setdefault(site.name, (site, []))[1].append(edit)
            for site, edits in by_site.values():
                self._stack.callback(self._register(site, edits).remove)
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _remember_call(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        ctx = self.context
        if ids is None or ids.dim() < 2:
            ctx.batch, ctx.tokens = 0, 0
        else:
            ctx.batch, ctx.tokens = int(ids.shape[0]), int(ids.shape[1])
        ctx.offset = _cache_length(kwargs)

    def _register(self, site: Site, edits: list[Edit]):
        ctx = self.context

        def run(captured):
            x = site.view(captured)
            for e in edits:
                x = e.apply(x, site, ctx)
            return site.put(captured, x)

        if site.fused_input is not None:  # one projection of a fused module: recompute its rows from the edit
            view = site.fused_input

            def fused_hook(_module, args, kwargs, out):
                x = args[0] if args else next(iter(kwargs.values()))
                return replace_rows(out, view.rows, view.apply(run(x)))

            # before the module's output edits, which then see the recomputed rows
            return site.module.register_forward_hook(fused_hook, with_kwargs=True, prepend=True)
        if site.capture == "input":
            def pre_hook(_module, args, kwargs):
                if args:
                    return (run(args[0]), *args[1:]), kwargs
                name = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
                return args, {**kwargs, name: run(kwargs[name])}

            return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
        return site.module.register_forward_hook(lambda _m, _a, out: run(out))


def check_selection(edit: Edit, site: Site) -> None:
    """Heads and channels that the site has (one-line errors before any hook is registered)."""
    if edit.heads is not None and edit.channels is not None:
        raise ConfigError(f"{site.name}: an edit selects heads or channels, not both")
    if edit.heads is not None:
        if site.heads is None:
            raise ConfigError(f"site {site.name} has no heads; per-head edits need one of the attention sites "
                              "(o_in, v, q_out, k_out, v_out)")
        _check_indices(edit.heads, site.heads[0], f"{site.name}: head", "heads")
    if edit.channels is not None:
        _check_indices(edit.channels, site.channels, f"{site.name}: channel", "channels")


def _check_indices(indices: Sequence[int], count: int, what: str, plural: str) -> None:
    if not len(indices):
        raise ConfigError(f"{what} list is empty")
    bad = [i for i in indices if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < count]
    if bad:
        raise ConfigError(f"{what} {bad[0]!r} out of range: the site has {count} {plural} (0..{count - 1})")


def _cache_length(kwargs: dict[str, Any]) -> int:
    position = kwargs.get("cache_position")
    if torch.is_tensor(position) and position.numel():
        return int(position.reshape(-1)[0])
    cache = call_cache(kwargs)
    if cache is not None and hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length())
    return 0


@dataclass
class EditGroup:
    """A bundle of edits with the state its operations share (e.g. a sparsity meter), built by a recipe."""

    edits: list[Edit] = field(default_factory=list)
    on_exit: list[Callable[[], None]] = field(default_factory=list)
