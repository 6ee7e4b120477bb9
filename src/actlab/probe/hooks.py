"""Read-only forward hooks at named sites, as a context manager that always removes them."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch

from actlab.models.loader import LoadedModel
from actlab.probe.attention import probing_attention
from actlab.probe.sites import Site

OnActivation = Callable[[Site, torch.Tensor], None]


class Probe(contextlib.AbstractContextManager):
    """`with Probe(lm, sites, fn): lm.model(ids)` calls `fn(site, tensor)` at every site, in forward order.

    Hooks never change what flows through the model. On exit (normal or exception) every hook is
    removed and the attention implementation is restored, so the model is exactly as before.
    """

    def __init__(self, lm: LoadedModel, sites: Sequence[Site], on_activation: OnActivation, query_stride: int = 1):
        self.lm = lm
        self.sites = list(sites)
        self.on_activation = on_activation
        self.query_stride = query_stride
        self._stack = contextlib.ExitStack()

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
