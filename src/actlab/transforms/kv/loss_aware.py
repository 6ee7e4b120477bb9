"""loss-aware KV budgets (actlab): each layer's and KV head's share of the cache from what evicting its tokens
costs the calibration loss, estimated per head and per ratio, then allocated where it costs least.

The scenario is the one the recipe's phase serves. Prefill: a context is read and compressed (query-agnostic:
the press sees the context's own last queries), and the tokens after it attend to what is kept; on a calibration
window the first `context` share is the context. Decode (running): the window is read `chunk` tokens per
forward and the cache held to its budget after each, so every query sees a cache the press has thinned as it
grew - and a head given a high ratio loses its recent tokens too, which the prefill scenario never shows (its
later tokens are all kept); which tokens a head holds at each forward is read from a run of the window with
every head at the level. For head h of layer l evicting at ratio r, the attention output of each query head q
it serves changes by delta_{t,q} (recomputed exactly: the press's kept set, the model's queries, keys and
values, causal and windowed); with g_{t,q} the gradient of the loss at that output (the o projection's input),
the loss changes by

    dL_h(r) ~ sum_t [ g_t . delta_t + 1/2 (g_t . delta_t)^2 ]

whose first term has mean ~0 at a trained model, so the estimate is the empirical-Fisher term 1/2 sum_t
(sum_q g_{t,q} . delta_{t,q})^2 (the same second-order reasoning as loss-aware sparsity, docs/loss-aware.md).
Every head's estimates at the levels are made convex (the lower hull through r = 0); the allocation takes the
cheapest hull segments, loss per token removed, until the ratios average the target (the last one partly).
The estimate adds heads up as if each were evicted alone; what they do together (many heads losing the same
sink tokens at once) is measured instead: the allocation shrunk toward the same ratio everywhere by 0, 1/4, 1/2
and all the way (uniform) is scored by the scenario's calibration loss, and the lowest wins (as loss-aware
sparsity chooses its variant). The recipe records the losses it chose between.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from actlab.errors import ConfigError
from actlab.progress import status
from actlab.transforms.kv.base import ALL_QUERIES, CacheView, keep_mask
from actlab.transforms.kv.budgets import keep_counts, visible_tokens
from actlab.transforms.kv.method import OPTIONS, KVMethod

LEVELS = (0.25, 0.5, 0.75, 0.875, 0.95)
QUERY_BLOCK = 256  # queries whose logits and masks the Fisher estimate holds at once
SHRINKAGES = (0.0, 0.25, 0.5, 1.0)  # toward the same ratio everywhere (1: uniform)


def head_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, context: int, press: Any,
                levels: tuple[float, ...], scaling: float, softcap: float | None, window: int | None) -> torch.Tensor:
    """[KV, levels]: the Fisher estimate of the loss change of evicting each KV head's context at each level, the
    prefill scenario (the press compresses the first `context` tokens once, with the context's last queries).
    q [H, T, D] (rotary applied), k / v [KV, T, D], grad [T, H, D] (dL / d attention output)."""
    kv, t = k.shape[0], k.shape[1]
    qf, kf, vf = q.float(), k.float(), v.float()
    visible = visible_tokens(context, window)
    lo = context - visible
    w = press.window if press.window != ALL_QUERIES else context
    w = min(w, context)
    view = CacheView(kf[None, :, lo:context], vf[None, :, lo:context], qf[None, :, context - w:context] if w else None,
                     scaling, softcap, positions=torch.arange(lo, context), window=window)
    evictions = []
    for ratio in levels:
        keep = keep_counts(torch.full((kv,), ratio, dtype=torch.float64), visible)
        w_level = min(w, int(keep.min()))
        if w_level != w:
            view.queries = qf[None, :, context - w_level:context] if w_level else None
        kept = keep_mask(press.scores(view, keep), keep)[0]  # [KV, visible]
        evicted = torch.zeros(kv, t, dtype=torch.bool)
        evicted[:, lo:context] = ~kept
        evictions.append(evicted[:, None, :])  # the same for every query after the context
    return fisher_errors(q, k, v, grad, context, lambda start, stop: evictions, scaling, softcap, window)


def running_head_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor,
                        traces: list[list[tuple[int, torch.Tensor]]], scaling: float, softcap: float | None,
                        window: int | None, block: int = QUERY_BLOCK) -> torch.Tensor:
    """[KV, levels]: the Fisher estimate of each KV head's loss change in the running scenario (the cache held to
    its budget after every forward). `traces[j]` is what the queries of each forward saw at level j - (first
    query's position, held [KV, positions]) as `KVSession.trace` records it - every query of the window counts."""
    kv, t = k.shape[0], k.shape[1]

    def evictions(start: int, stop: int) -> list[torch.Tensor]:  # the masks of query rows start..stop-1
        out = []
        for trace in traces:
            evicted = torch.zeros(kv, stop - start, t, dtype=torch.bool)
            for first, held in trace:  # this forward's queries: positions first..seen-1
                seen = held.shape[-1]
                lo, hi = max(first, start), min(seen, stop)
                if lo < hi:
                    evicted[:, lo - start:hi - start, :seen] = ~held[:, None, :]
            out.append(evicted)
        return out

    return fisher_errors(q, k, v, grad, 0, evictions, scaling, softcap, window, block)


def fisher_errors(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grad: torch.Tensor, first: int,
                  evictions: Callable[[int, int], list[torch.Tensor]], scaling: float, softcap: float | None,
                  window: int | None, block: int = QUERY_BLOCK) -> torch.Tensor:
    """[KV, levels]: 1/2 sum_t (sum_{q in h} g_{t,q} . delta_{t,q})^2 for the queries from `first` on, delta the
    change of the attention output when each KV head alone loses the keys `evictions(start, stop)[j]` marks
    ([KV, stop - start or 1, T] bool for the query rows start..stop-1) - the masks of the other heads' queries
    stay whole. The sum runs over blocks of `block` queries: the logits and masks of a block at a time, not of
    the whole window (a [heads, T, T] tensor per level at T = 4096 is gigabytes)."""
    h, t, d = q.shape
    kv = k.shape[0]
    group = h // kv
    kf, vf = k.float().repeat_interleave(group, 0), v.float().repeat_interleave(group, 0)
    out = None
    for start in range(first, t, block):
        stop = min(t, start + block)
        logits = torch.einsum("hqd,htd->hqt", q[:, start:stop].float(), kf) * scaling
        if softcap:
            logits = softcap * torch.tanh(logits / softcap)
        distance = torch.arange(start, stop)[:, None] - torch.arange(t)[None]
        hidden = (distance < 0) | ((distance >= window) if window is not None else False)
        full = logits.masked_fill(hidden, float("-inf")).softmax(-1) @ vf
        g = grad[start:stop].float().permute(1, 0, 2)  # [H, block, D]
        masks = evictions(start, stop)
        if out is None:
            out = torch.zeros(kv, len(masks), dtype=torch.float64)
        for j, evicted in enumerate(masks):
            masked = logits.masked_fill(hidden | evicted.repeat_interleave(group, 0), float("-inf"))
            delta = masked.softmax(-1) @ vf - full  # [H, block, D]
            first_order = (g * delta).sum(-1).view(kv, group, -1).sum(1)  # [KV, block]: g . delta over the group
            out[:, j] += 0.5 * first_order.double().pow(2).sum(-1)
    return out if out is not None else torch.zeros(kv, len(evictions(t, t)), dtype=torch.float64)


def allocate(errors: torch.Tensor, levels: tuple[float, ...], target: float) -> torch.Tensor:
    """Ratios [heads] averaging `target` from each head's estimated loss at `levels` (errors [heads, levels]): the
    cheapest segments of the heads' lower convex hulls (loss per ratio removed) first, the last one in part."""
    n = errors.shape[0]
    segments = []  # (slope, head, from ratio, to ratio)
    for head in range(n):
        points = [(0.0, 0.0)] + [(r, float(e)) for r, e in zip(levels, errors[head])]
        hull = [points[0]]
        for p in points[1:]:
            while len(hull) >= 2 and _cross(hull[-2], hull[-1], p) <= 0:
                hull.pop()
            hull.append(p)
        for (r0, e0), (r1, e1) in zip(hull, hull[1:]):
            segments.append(((e1 - e0) / (r1 - r0), head, r0, r1))
    segments.sort(key=lambda s: (s[0], s[1], s[2]))
    ratios = torch.zeros(n, dtype=torch.float64)
    need = target * n
    for _, head, r0, r1 in segments:  # per head the segments come in order (convex: rising slopes)
        if need <= 1e-12:
            break
        step = min(r1 - r0, need)
        ratios[head] = r0 + step
        need -= step
    if need > 1e-9:
        raise ConfigError(f"loss-aware: the levels reach at most {max(levels):g} per head; {target:g} needs more")
    return ratios


def _cross(a, b, c) -> float:
    return (b[0] - a[0]) * (c[1] - a[1]) - (b[1] - a[1]) * (c[0] - a[0])


class LossAware(KVMethod):
    name = "loss-aware"
    paper = "actlab (docs/kv.md)"
    budgets = "per layer and head, by the calibration loss each ratio costs"
    calibrated = True
    press = "snapkv"  # the default after a prompt, H2O during decoding; `press=` picks another

    def __init__(self, press: str | None = None, context: float = 0.5, levels: tuple[float, ...] | list = LEVELS,
                 toward_uniform: float | str = "auto", chunk: int = 64, **params: Any):
        from actlab.transforms.kv import PRESSES

        options = {k: params.pop(k) for k in OPTIONS if k in params}
        if press is None:  # SnapKV's observation window is a prompt's end; H2O's running score suits decoding
            press = "h2o" if options.get("phase") == "decode" else "snapkv"
        if press not in PRESSES:
            raise ConfigError(f"loss-aware: press must be one of {', '.join(PRESSES)}, got {press!r}")
        self.press = press
        super().__init__(press_params=params, **options)
        if isinstance(context, bool) or not isinstance(context, (int, float)) or not 0 < context < 1:
            raise ConfigError(f"loss-aware: context is the share of a calibration window compressed, in (0, 1); "
                              f"got {context!r}")
        levels = tuple(float(x) for x in (levels if isinstance(levels, (list, tuple)) else [levels]))
        if not levels or any(not 0 < x < 1 for x in levels) or list(levels) != sorted(set(levels)):
            raise ConfigError(f"loss-aware: levels must rise within (0, 1), got {levels!r}")
        self.context, self.levels = float(context), levels
        number = isinstance(toward_uniform, (int, float)) and not isinstance(toward_uniform, bool)
        if toward_uniform != "auto" and not (number and 0 <= toward_uniform <= 1):
            raise ConfigError(f"loss-aware: toward_uniform is a shrinkage in [0, 1] or 'auto', got {toward_uniform!r}")
        self.toward_uniform = toward_uniform
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"loss-aware: chunk is the tokens per forward of the running scenario, a whole number "
                              f">= 1; got {chunk!r}")
        self.chunk = chunk

    def params(self) -> dict[str, Any]:
        out = {"context": self.context, "levels": list(self.levels), "toward_uniform": self.toward_uniform}
        return {**out, "chunk": self.chunk} if self.running else out

    @property
    def running(self) -> bool:
        """The decode phase holds the cache to its budget after every forward: calibrate for that scenario."""
        return self.options["phase"] == "decode"

    def calibrate(self, calib: Any, target: float):
        lm = calib.lm
        ad = lm.adapter
        press = self.make_press()
        t = calib.windows.shape[1]
        context = int(t * self.context)
        if not 1 <= context < t:
            raise ConfigError(f"loss-aware: calibration windows of {t} tokens leave no context to compress")
        # the estimates depend on the press, the levels and the windows, not on the target: every ratio calibrated
        # on the same set reads them from its cache
        chunk = self.chunk if self.running else 0
        estimate = {"press": self.press, "press_params": self.press_params, "levels": list(self.levels),
                    "context": context, "options": self.options, **({"chunk": chunk} if chunk else {})}
        errors = calib._cached("kv-loss-aware-errors", estimate,
                               lambda: {"errors": self._head_errors(calib, press, context)})["errors"]
        ratios = allocate(errors.view(-1, len(self.levels)), self.levels, target).view(ad.num_layers, -1)
        # the estimate adds heads up as if each were alone; what they do together is measured: the allocation is
        # shrunk toward the same ratio everywhere by the amount whose scenario loss is lowest
        shrinkages = SHRINKAGES if self.toward_uniform == "auto" else (float(self.toward_uniform),)
        measured = {}
        for b in shrinkages:
            if self.progress:
                status(f"loss-aware KV budgets: the {'running' if chunk else 'prefill'} scenario's loss with the "
                       f"allocation {b:g} of the way to uniform")
            candidate = self.recipe(lm, target, (1 - b) * ratios + b * target)
            measured[b] = (scenario_loss(lm, calib, candidate, context, chunk), candidate)
        best = min(measured, key=lambda b: measured[b][0])
        recipe = measured[best][1]
        recipe.calibration.update({**calib.describe(), **({"chunk": chunk} if chunk else {"context_tokens": context}),
                                   "scenario": "running" if chunk else "prefill", "levels": list(self.levels),
                                   "estimated_loss": errors.tolist(), "toward_uniform": best,
                                   "selection_loss": {f"{b:g}": loss for b, (loss, _) in measured.items()}})
        uniform = (measured[1.0][0] if 1.0 in measured
                   else scenario_loss(lm, calib, self.recipe(lm, target), context, chunk))
        dense = calib._cached("kv-dense-scenario-loss", context if not chunk else {"chunk": chunk}, lambda: {
            "loss": torch.tensor(scenario_loss(lm, calib, None, context, chunk))})["loss"]
        recipe.calibration["measured_loss"] = {"dense": float(dense), "uniform": uniform,
                                               "loss-aware": measured[best][0]}
        return recipe

    def _head_errors(self, calib: Any, press: Any, context: int) -> torch.Tensor:
        """[layers, kv heads, levels]: the first-order loss change of compressing each head alone to each level,
        averaged over the calibration windows. In the running scenario which tokens a head holds at each forward
        is what the press keeps with every head at that level (read from a run of the window, `running_traces`)."""
        lm = calib.lm
        ad = lm.adapter
        t = calib.windows.shape[1]
        errors = torch.zeros(ad.num_layers, ad.num_kv_heads, len(self.levels), dtype=torch.float64)
        mine = calib.local()  # this rank's windows; the estimates add up across ranks
        for n, window in enumerate(mine):
            if self.progress:
                status(f"loss-aware KV budgets: window {n + 1}/{len(mine)} (forward, backward, "
                       f"{len(self.levels)} levels x {ad.num_layers} layers)")
            record, grads = attention_and_gradients(lm, window[None])
            traces = [running_traces(lm, window[None], self.recipe(lm, level), self.chunk)
                      for level in self.levels] if self.running else None
            for i, layer in enumerate(ad.layers):
                q, k, v, scaling, softcap = record[i]
                grad = grads[i].view(t, ad.num_heads, ad.head_dim)
                if traces is None:
                    errors[i] += head_errors(q[0], k[0], v[0], grad, context, press, self.levels, scaling, softcap,
                                             ad.sliding_window(layer))
                else:
                    errors[i] += running_head_errors(q[0], k[0], v[0], grad, [trace[i] for trace in traces],
                                                     scaling, softcap, ad.sliding_window(layer))
        calib.reduce(errors)
        errors /= len(calib.windows)
        return errors


def attention_and_gradients(lm: Any, ids: torch.Tensor) -> tuple[dict[int, tuple], dict[int, torch.Tensor]]:
    """One forward and backward of `ids`: each layer's attention inputs (queries, keys, values as the attention
    saw them, its scale and soft-cap) and the loss gradient at its output (the o projection's input, [T, H*D])."""
    import contextlib

    from actlab.transforms.kv.session import KVSession

    ad = lm.adapter
    captured: dict[int, torch.Tensor] = {}
    handles = []

    def keep(i):
        def hook(module, args):
            x = args[0]
            if x.requires_grad:
                x.retain_grad()
            captured[i] = x
        return hook

    def trace(module, args, out):  # the graph starts at the embeddings (the weights stay frozen)
        return out.requires_grad_()

    with contextlib.ExitStack() as stack:
        session = KVSession.attached(lm, stack)
        session.record = {}
        for layer in ad.layers:
            handles.append(layer.linears["o"].module.register_forward_pre_hook(keep(layer.index)))
        handles.append(ad.embed.register_forward_hook(trace))
        stack.callback(lambda: [h.remove() for h in handles])
        with torch.enable_grad():
            logits = lm.model(input_ids=ids.to(lm.device)).logits
            loss = F.cross_entropy(logits[0, :-1].float(), ids[0, 1:].to(lm.device))
            loss.backward()
        record = session.record
    grads = {i: x.grad[0].detach() if x.grad is not None else torch.zeros_like(x[0]) for i, x in captured.items()}
    return record, grads


@torch.no_grad()
def running_traces(lm: Any, ids: torch.Tensor, recipe: Any, chunk: int) -> dict[int, list[tuple[int, torch.Tensor]]]:
    """Per layer, what the queries of each forward saw - (first query's position, held [KV, positions]) - when
    `ids` [1, T] is read `chunk` tokens per forward with `recipe` holding the cache to its budget."""
    from actlab.eval.perplexity import chunked_window_nll
    from actlab.transforms import attach
    from actlab.transforms.kv.session import SESSION

    with attach(lm, recipe):
        session = lm.adapter.layers[0].attn.__dict__[SESSION]
        session.trace = {}
        chunked_window_nll(lm.model, ids.to(lm.device), chunk)
        return session.trace


@torch.no_grad()
def scenario_loss(lm: Any, calib: Any, recipe: Any, context: int, chunk: int = 0) -> float:
    """Mean NLL of the calibration windows' tokens in the scenario: with `chunk`, the running one (every window
    read `chunk` tokens per forward, the cache held to its budget as it grows; every token counts); else the
    prefill one (the first `context` tokens read and compressed in one forward, the tokens after them read in
    another through its cache; they count)."""
    from actlab.eval.perplexity import chunked_window_nll
    from actlab.models.compat import output_cache, with_cache
    from actlab.transforms import attach

    total, count = 0.0, 0
    with (attach(lm, recipe) if recipe is not None else _nothing()):
        for window in calib.local():
            ids = window[None].to(lm.device)
            if chunk:
                total += float(chunked_window_nll(lm.model, ids, chunk))
                count += ids.shape[1] - 1
                continue
            first = lm.model(input_ids=ids[:, :context], use_cache=True, logits_to_keep=1)
            rest = lm.model(input_ids=ids[:, context:-1], **with_cache(lm.model, output_cache(first)), use_cache=True)
            logits = torch.cat([first.logits[:, -1:], rest.logits], 1)[0].float()
            total += float(F.cross_entropy(logits, ids[0, context:], reduction="sum"))
            count += ids.shape[1] - context
    sums = torch.tensor([total, count], dtype=torch.float64)
    calib.reduce(sums)
    return float(sums[0] / sums[1]) if sums[1] else math.nan


def _nothing():
    import contextlib

    return contextlib.nullcontext()
