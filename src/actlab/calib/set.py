"""`CalibrationSet`: the calibration windows of one model, their protocol, and statistics computed once.

Every family calibrates from one of these. Statistics are cached in memory and on disk (the actlab cache),
keyed by the model's identity, the corpus, the window protocol, what is computed and the recipes attached
while computing it (`under`: calibrate one transform on top of another). Generic statistics live here:

- `channel_mean_sq`: per-channel E[x^2] at a site kind (every layer);
- `input_grad_rms`: per projection input channel, sqrt(E[(dL/dx_i)^2]) of the next-token loss, through that
  projection only (see `collectors.GradientEnergy`);
- `output_grad_rms`: the same at each projection's output channels;
- `input_moments`: each projection's input second moment E[x x^T];
- `input_samples`: each projection's input on the first calibration tokens;
- `layer_replay`: each decoder layer's recorded call, to re-run one layer alone.

Family-specific statistics (the sparsity score histograms) live in their family and use `_cached` and
`observing` from here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from actlab.calib.collectors import GradientEnergy
from actlab.data import WindowSpec, load_corpus, make_windows
from actlab.errors import ConfigError
from actlab.fsutil import atomic_path
from actlab.models.adapter import select_rows
from actlab.models.cache import cache_root
from actlab.models.keys import projection_key, split_key
from actlab.parallel import World, agree, all_gather, all_reduce_sum, shard
from actlab.progress import track

MIN_CALIBRATION_TOKENS = 512


@dataclass
class CalibrationSet:
    lm: Any  # LoadedModel
    windows: torch.Tensor
    corpus: dict[str, Any]
    protocol: dict[str, Any]
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)
    base: Any = None  # a Recipe attached while statistics are collected (calibrating on top of it)
    world: World = field(default_factory=World)  # data parallel: each rank reads its block of the windows

    @classmethod
    def from_corpus(cls, lm: Any, data: str | None, seq_len: int = 1024, windows: int = 16, offset: int = 0,
                    world: World | None = None, **kw: Any) -> CalibrationSet:
        corpus = load_corpus(data, role="calib")
        spec = WindowSpec(seq_len=seq_len, num_windows=windows, offset=offset)
        ids = make_windows(lm.tokenizer, corpus, spec, lm.max_context)
        if ids.numel() < MIN_CALIBRATION_TOKENS:
            raise ConfigError(f"calibration corpus too small: {ids.numel()} tokens, "
                              f"need at least {MIN_CALIBRATION_TOKENS}")
        return cls(lm, ids, corpus.describe(), spec.describe(), world=world or World(), **kw)

    def describe(self) -> dict[str, Any]:
        out = {"data": self.corpus.get("name"), "sha256": self.corpus.get("sha256"), "protocol": self.protocol,
               "tokens": int(self.windows.numel())}
        if self.base is not None:
            out["under"] = self.base.describe()
        return out

    def on_top_of(self, recipe: Any) -> CalibrationSet:
        """The same windows seen through `lm` with `recipe` attached (statistics for a transform composed after
        it). Shares nothing cached with this set: every key includes the recipe."""
        return CalibrationSet(self.lm, self.windows, self.corpus, self.protocol, base=recipe, world=self.world)

    # -- caching ---------------------------------------------------------------------------------
    def applied(self) -> list[Any]:
        """The recipes attached while any statistic is collected (part of every cache key)."""
        return [self.base] if self.base is not None else []

    def observed_under(self) -> list[Any]:
        """The recipes attached while `observing` (a family's view may add the recipe it is refining)."""
        return self.applied()

    def _key(self, what: str, extra: Any = None) -> str:
        ident = self.lm.identity
        under = [_recipe_digest(r) for r in self.applied()]
        payload = json.dumps([ident.weights_sha256, ident.config_sha256, ident.tokenizer_sha256,
                              self.corpus.get("sha256"), self.protocol, what, extra, under], sort_keys=True,
                             default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def _cached(self, what: str, extra: Any, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save_file

        key = self._key(what, extra)
        if key in self._memo:
            return self._memo[key]
        path = cache_root() / "calibration" / f"{what}-{key}.safetensors"
        if agree(self.world, path.is_file):  # every rank computes it, or none: its sums meet across ranks
            try:
                result = load_file(str(path))
                self._memo[key] = result
                return result
            except Exception:  # a torn or foreign file: recompute it
                path.unlink(missing_ok=True)
        result = compute()
        if self.world.main:
            with atomic_path(path) as tmp:
                save_file({k: v.contiguous() for k, v in result.items()}, str(tmp))
        self._memo[key] = result
        return result

    def _body(self, ids: torch.Tensor) -> None:
        """A forward pass without the LM head: statistics passes never need logits, and on a model with a
        large vocabulary (Gemma's 262k tokens) the head costs more than all the layers."""
        self.lm.model.base_model(input_ids=ids.to(self.lm.device), use_cache=False)

    @contextlib.contextmanager
    def observing(self, keys: list[str], source: str, observe: Callable[[str, torch.Tensor], None]) -> Iterator[None]:
        """Call `observe(key, x)` with each projection's input (`source="input"`), or with act(gate) keyed by
        the layer's down projection (`source="act"`). The observation hooks are registered before the recipes
        of `observed_under()` are attached, so they see each input before any edit of those recipes there."""
        layers = self.lm.adapter.layers
        with contextlib.ExitStack() as stack:
            for key in keys:
                layer_index, role = split_key(key)
                layer = layers[layer_index]
                if source == "act":
                    h = layer.act_fn.register_forward_hook(lambda m, a, out, k=key: observe(k, out))
                else:
                    h = layer.linears[role].module.register_forward_pre_hook(lambda m, args, k=key: observe(k, args[0]))
                stack.callback(h.remove)
            stack.enter_context(self.attached(self.observed_under()))
            yield

    def attached(self, recipes: list[Any]) -> contextlib.AbstractContextManager:
        """`recipes` attached to the model (nothing when there are none)."""
        if not recipes:
            return contextlib.nullcontext()
        from actlab.transforms.compose import attach

        return attach(self.lm, recipes)

    def local(self, windows: torch.Tensor | None = None) -> torch.Tensor:
        """This rank's block of `windows` (default: the calibration windows); all of them in one process."""
        use = self.windows if windows is None else windows
        mine = shard(len(use), self.world)
        return use[mine.start:mine.stop]

    def reduce(self, *tensors: torch.Tensor) -> None:
        """Sum tensors accumulated over this rank's windows with every other rank's, in place."""
        all_reduce_sum(list(tensors), self.world)

    def run_windows(self, description: str, progress: bool = True, windows: torch.Tensor | None = None) -> None:
        """A forward (without the LM head) of each of this rank's windows: observers see them; what they sum is
        then added up across ranks by the caller (`reduce`)."""
        with torch.no_grad():
            use = self.local(windows)
            for w in track(use, total=len(use), description=description, enabled=progress and self.world.main):
                self._body(w[None])

    def profiled(self, make: Callable[[], Any], windows: torch.Tensor | None = None) -> Any:
        """A Profiler (made by `make`) that observed the windows: each rank its block, the states folded by each
        statistic's merge rule in rank order."""
        prof = make()
        prof.observe(self.local(windows), progress=False)
        if not self.world.distributed:
            return prof
        from actlab.probe.profiler import folded

        return folded(make, all_gather((prof.state(), prof.windows_seen, prof.tokens_seen), self.world))

    # -- generic statistics ------------------------------------------------------------------------
    def channel_mean_sq(self, kind: str) -> dict[int, torch.Tensor]:
        """Per layer, per-channel E[x^2] at site kind `kind` (e.g. "up")."""
        from actlab.probe import Profiler
        from actlab.probe.stats.distribution import ActivationDistribution

        def compute():
            with self.attached(self.applied()):
                prof = self.profiled(lambda: Profiler(self.lm, sites=f"L*.{kind}",
                                                      statistics=[ActivationDistribution()]))
            dist = prof.statistic("distribution")
            return {key: dist.channel_summary(key)["mean_sq"] for key in dist.acc}

        raw = self._cached("meansq", kind, compute)
        return {split_key(k)[0]: v for k, v in raw.items()}

    def input_grad_rms(self, windows: int | None = None, progress: bool = True,
                       robust: bool = False) -> dict[str, torch.Tensor]:
        """Per projection input channel: sqrt(E[(dL/dx_i)^2]), L = mean next-token loss of a window (`robust`:
        a typical token's instead of the mean square, see `collectors.GradientEnergy`)."""
        use = self.windows if windows is None else self.windows[:windows]
        what = "gradtypical" if robust else "gradrms"
        return self._cached(what, int(len(use)), lambda: self._collect_grad_rms(use, progress, robust))

    def output_grad_rms(self, windows: int | None = None, progress: bool = True) -> dict[str, torch.Tensor]:
        """Per projection output channel: sqrt(E[(dL/dy_o)^2]), L = mean next-token loss of a window."""
        use = self.windows if windows is None else self.windows[:windows]
        return self._cached("outgradrms", int(len(use)), lambda: self._collect_grad_rms(use, progress, side="output"))

    def _collect_grad_rms(self, windows: torch.Tensor, progress: bool, robust: bool = False,
                          side: str = "input") -> dict[str, torch.Tensor]:
        """Gradient with respect to each projection's output (`side="output"`), or its input *through that
        projection only* (`"input"`): W^T dL/dy from the output gradient (q, k and v share one input tensor,
        whose own gradient would mix the three paths)."""
        lm = self.lm
        energy: dict[str, GradientEnergy] = {}
        count = 0
        views = {projection_key(layer.index, role): lin for layer in lm.adapter.layers
                 for role, lin in layer.linears.items()}

        def watch(key: str):
            weight, rows = views[key].weight(), views[key].rows  # rows: this projection's part of a fused module

            def through(g: torch.Tensor) -> torch.Tensor:
                g = select_rows(g.detach(), rows).reshape(-1, weight.shape[0])
                return g if side == "output" else g @ weight

            def hook(_m, _a, out):
                if out.requires_grad:
                    out.register_hook(lambda g: energy.setdefault(key, GradientEnergy(robust)).add(through(g)))
            return hook

        with contextlib.ExitStack() as stack:
            for key, view in views.items():
                stack.callback(view.module.register_forward_hook(watch(key)).remove)
            stack.callback(lm.adapter.embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)).remove)
            stack.enter_context(self.attached(self.applied()))
            mine = self.local(windows)
            for w in track(mine, total=len(mine), description="gradients", enabled=progress and self.world.main):
                ids = w[None].to(lm.device)
                logits = lm.model(input_ids=ids, use_cache=False).logits
                F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
                count += ids.shape[1]
        if self.world.distributed:  # every rank's sums (and a robust estimate's token norms) meet
            for key in sorted(views):
                e = energy.setdefault(key, GradientEnergy(robust))
                total = e.sums if e.sums is not None else torch.zeros(views[key].weight().shape[
                    0 if side == "output" else 1], dtype=torch.float64)
                self.reduce(total)
                e.sums = total
                if robust:
                    e.norms = [n for part in all_gather(e.norms, self.world) for n in part]
            count = sum(all_gather(count, self.world))
        return {k: e.rms(count) for k, e in energy.items()}

    def input_moments(self, keys: list[str], progress: bool = True) -> dict[str, torch.Tensor]:
        """Each projection's input second moment E[x x^T] [in, in] over every calibration token (with the recipes
        of `observed_under()` attached, before their edits at that input)."""
        sums: dict[str, torch.Tensor] = {}
        count: dict[str, int] = {}

        def observe(key, x):
            x = x.detach().reshape(-1, x.shape[-1]).float()
            sums[key] = sums[key] + x.T @ x if key in sums else x.T @ x
            count[key] = count.get(key, 0) + x.shape[0]

        with self.observing(keys, "input", observe):
            self.run_windows("input moments", progress)
        for key in keys if self.world.distributed else []:  # a rank without windows has nothing to add yet
            width = self.lm.adapter.layers[split_key(key)[0]].linears[split_key(key)[1]].in_features
            sums.setdefault(key, torch.zeros(width, width))
            n = torch.tensor(count.get(key, 0), dtype=torch.float64)
            self.reduce(sums[key], n)
            count[key] = int(n)
        return {k: v / count[k] for k, v in sums.items()}

    def input_samples(self, keys: list[str], tokens: int = 512) -> dict[str, torch.Tensor]:
        """Each projection's input [tokens, in] on the first `tokens` calibration tokens (with the recipes of
        `observed_under()` attached, before their edits at that input)."""
        seq = min(tokens, self.windows.shape[1])
        rows = -(-tokens // seq)
        got: dict[str, torch.Tensor] = {}

        def observe(key, x):
            got[key] = x.detach().reshape(-1, x.shape[-1]).float().clone()

        with self.observing(keys, "input", observe), torch.no_grad():
            self._body(self.windows[:rows, :seq])
        return got

    def layer_replay(self, tokens: int = 512) -> list[tuple[tuple, dict]]:
        """Each decoder layer's exact call (args, kwargs) on the first `tokens` calibration tokens."""
        seq = min(tokens, self.windows.shape[1])
        rows = max(1, tokens // seq)
        ids = self.windows[:rows, :seq].to(self.lm.device)
        calls: list[tuple[tuple, dict]] = [None] * self.lm.adapter.num_layers  # type: ignore[list-item]

        def record(i):
            def hook(_m, args, kwargs):
                calls[i] = (tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs))
            return hook

        with contextlib.ExitStack() as stack:
            for layer in self.lm.adapter.layers:
                stack.callback(layer.module.register_forward_pre_hook(record(layer.index), with_kwargs=True).remove)
            stack.enter_context(self.attached(self.applied()))
            with torch.no_grad():
                self._body(ids)
        return calls


def _recipe_digest(recipe: Any) -> str:
    from actlab.transforms.io import _extract

    tensors: dict[str, torch.Tensor] = {}
    header = _extract(recipe.header(), "", tensors)
    h = hashlib.sha256(json.dumps(header, sort_keys=True, default=str).encode())
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
