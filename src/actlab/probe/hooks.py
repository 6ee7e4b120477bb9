"""Read-only forward hooks at named sites, as a context manager that always removes them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from actlab.models.loader import LoadedModel
from actlab.probe.attention import probing_attention
from actlab.probe.sites import Site, select_sites

OnActivation = Callable[[Site, torch.Tensor], None]


class Probe(contextlib.AbstractContextManager):
    """`with Probe(lm, sites, fn): lm.model(ids)` calls `fn(site, tensor)` at every site, in forward order.

    `sites` are Site objects, site names or glob patterns (`"L3.resid_out"`, `"L*.down_in"`, a list of them).
    Without `fn` the probe keeps what it reads: `probe.cache[name]` is the list of tensors seen at that site,
    one per forward call. Hooks never change what flows through the model. On exit (normal or exception) every
    hook is removed and the attention implementation is restored, so the model is exactly as before.
    """

    def __init__(self, lm: LoadedModel, sites: Sequence[Site | str] | str | Site,
                 on_activation: OnActivation | None = None, query_stride: int = 1):
        self.lm = lm
        self.sites = resolve_sites(lm, sites)
        self.cache: dict[str, list[torch.Tensor]] = {}
        self.on_activation = on_activation if on_activation is not None else self._keep
        self.query_stride = query_stride
        self._stack = contextlib.ExitStack()

    def _keep(self, site: Site, x: torch.Tensor) -> None:
        self.cache.setdefault(site.name, []).append(x.detach())

    def __enter__(self) -> Probe:
        try:
            for site in self.sites:
                handle = self._register(site)
                self._stack.callback(handle.remove)
            if any(s.kind == "attn_probs" for s in self.sites):
                self._stack.enter_context(probing_attention(self.lm.model, self.query_stride))
        except BaseException:
            self._stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _register(self, site: Site):
        deliver = self.on_activation
        if site.capture == "input":
            def pre_hook(_module, args, kwargs):
                captured = args[0] if args else kwargs.get("hidden_states", next(iter(kwargs.values())))
                deliver(site, site.read(captured))

            return site.module.register_forward_pre_hook(pre_hook, with_kwargs=True)

        def hook(_module, _args, output):
            deliver(site, site.read(output))

        return site.module.register_forward_hook(hook)


def resolve_sites(lm: LoadedModel, sites: Sequence[Site | str] | str | Site) -> list[Site]:
    """Sites from Site objects, names and glob patterns (a bad name is a one-line error listing the kinds)."""
    if isinstance(sites, (str, Site)):
        sites = [sites]
    out: list[Site] = []
    for s in sites:
        out.extend([s] if isinstance(s, Site) else select_sites(lm.adapter, s))
    return out


@torch.no_grad()
def run_with_cache(lm: LoadedModel, input_ids: torch.Tensor, sites: Sequence[Site | str] | str = "*",
                   query_stride: int = 1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One forward of `input_ids` [batch, tokens] (or [tokens]) with every site in `sites` read, in the style of
    TransformerLens' `run_with_cache`: (logits, {site name: tensor}). Tensors are as the site reads them:
    [batch, tokens, channels]; v and o_in [batch * tokens, heads, head_dim]; attn_probs [batch, heads, queries,
    keys]. A site that runs more than once per forward is stacked along a new first dimension."""
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    with Probe(lm, sites, query_stride=query_stride) as probe:
        logits = lm.model(input_ids=ids.to(lm.device)).logits
    return logits, {name: seen[0] if len(seen) == 1 else torch.stack(seen) for name, seen in probe.cache.items()}
