"""Calibration statistics for sparsity methods, computed once per (model, corpus, protocol) and cached.

- `score_histograms`: per projection, the log-bin histogram of its score |x_i| * scale_i (or of the score
  relative to its token's RMS) over every calibration token (any quantile, any "fraction below t" reads
  back from it);
- `channel_mean_sq`: per-channel E[x^2] at a site (CHESS weights channels by E[up^2]);
- `input_grad_rms`: per projection input channel, sqrt(E[(dL/dx_i)^2]) of the next-token loss;
- `layer_replay`: each decoder layer's recorded inputs (args and kwargs), to re-run one layer alone.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from actlab import native
from actlab.data import WindowSpec, load_corpus, make_windows
from actlab.errors import ConfigError
from actlab.fsutil import atomic_path
from actlab.models.cache import cache_root
from actlab.models.loader import LoadedModel
from actlab.probe.stats.histogram import NUM_BINS, fraction_below, histogram_of, quantile
from actlab.progress import track
from actlab.transforms.sparsity.base import model_fingerprint, split_key, token_rms

MIN_CALIBRATION_TOKENS = 512
Z_EDGES = np.linspace(-8.0, 40.0, 9601)  # 0.005 wide bins for standardised scores


def z_for_fraction(counts: np.ndarray, fraction: float) -> float:
    """The standardised cutoff below which `fraction` of the scores fall (linear within a bin)."""
    cum = np.cumsum(counts) / counts.sum()
    k = int(np.searchsorted(cum, fraction))
    if k == 0:
        return float(Z_EDGES[0])
    if k >= len(Z_EDGES):
        return float(Z_EDGES[-1])
    lo, hi = cum[k - 1], cum[k]
    frac = (fraction - lo) / (hi - lo) if hi > lo else 0.0
    return float(Z_EDGES[k - 1] + frac * (Z_EDGES[k] - Z_EDGES[k - 1]))


@dataclass
class ScoreHistogram:
    counts: np.ndarray
    zeros: int

    def dropped_at(self, threshold: float) -> float:
        """Fraction of scores <= threshold (dropped by a rule `keep score > threshold`)."""
        return fraction_below(self.counts, self.zeros, threshold) if threshold > 0 else self.zeros / self.total

    def threshold_for(self, fraction: float) -> float:
        """Threshold dropping `fraction` of the scores."""
        if fraction <= 0:
            return 0.0
        if fraction <= self.zeros / self.total:
            return 0.0
        return quantile(self.counts, fraction)

    @property
    def total(self) -> int:
        return int(self.counts.sum())


@dataclass
class CalibrationData:
    """Calibration windows of one model, with cached derived statistics."""

    lm: LoadedModel
    windows: torch.Tensor
    corpus: dict[str, Any]
    protocol: dict[str, Any]
    _memo: dict[str, Any] = field(default_factory=dict, repr=False)
    under: Any = None  # a SparsityRecipe: score histograms are then collected with it attached

    def sparse_view(self, recipe: Any) -> CalibrationData:
        """The same calibration data seen through a sparsified model: score histograms record each rule's
        input before its mask, under the upstream sparsity of `recipe` (for budget refinement)."""
        return CalibrationData(self.lm, self.windows, self.corpus, self.protocol, self._memo, recipe)

    @classmethod
    def from_corpus(cls, lm: LoadedModel, data: str | None, seq_len: int = 1024, windows: int = 16,
                    offset: int = 0) -> CalibrationData:
        corpus = load_corpus(data, role="calib")
        spec = WindowSpec(seq_len=seq_len, num_windows=windows, offset=offset)
        ids = make_windows(lm.tokenizer, corpus, spec, lm.max_context)
        if ids.numel() < MIN_CALIBRATION_TOKENS:
            raise ConfigError(f"calibration corpus too small for the histograms: {ids.numel()} tokens, "
                              f"need at least {MIN_CALIBRATION_TOKENS}")
        return cls(lm, ids, corpus.describe(), spec.describe())

    def describe(self) -> dict[str, Any]:
        return {"data": self.corpus.get("name"), "sha256": self.corpus.get("sha256"), "protocol": self.protocol,
                "tokens": int(self.windows.numel())}

    # -- caching ---------------------------------------------------------------------------------
    def _key(self, what: str, extra: Any = None) -> str:
        fp = self._memo.get("fingerprint") or model_fingerprint(self.lm.adapter)["fingerprint"]
        self._memo["fingerprint"] = fp
        under = None
        if self.under is not None and what in ("hist", "zhist"):
            under = hashlib.sha256(json.dumps(self.under.to_dict(), sort_keys=True).encode()).hexdigest()
        payload = json.dumps([fp, self.corpus.get("sha256"), self.protocol, what, extra, under], sort_keys=True,
                             default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def _cached(self, what: str, extra: Any, compute: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        key = self._key(what, extra)
        if key in self._memo:
            return self._memo[key]
        path = cache_root() / "calibration" / f"{what}-{key}.safetensors"
        if path.is_file():
            try:
                result = load_file(str(path))
                self._memo[key] = result
                return result
            except Exception:
                path.unlink(missing_ok=True)
        result = compute()
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in result.items()}, str(tmp))
        self._memo[key] = result
        return result

    def _body(self, ids: torch.Tensor) -> None:
        """A forward pass without the LM head: statistics passes never need logits, and on a model with a
        large vocabulary (Gemma's 262k tokens) the head costs more than all the layers."""
        self.lm.model.base_model(input_ids=ids.to(self.lm.device), use_cache=False)

    # -- statistics ------------------------------------------------------------------------------
    def score_histograms(self, scales: dict[str, torch.Tensor | None], source: str = "input",
                         progress: bool = True, relative: bool = False) -> dict[str, ScoreHistogram]:
        """Histogram of |x| * scale at the input of each projection in `scales` (or at act(gate) for
        `source="act"`, keyed by the layer's down projection). `relative=True`: of each score divided by the
        RMS of its token's scores (what a "relative" rule's threshold is compared with)."""
        tag = {k: (None if v is None else hashlib.sha256(v.float().numpy().tobytes()).hexdigest()[:16])
               for k, v in sorted(scales.items())}
        extra = [source, tag, "relative"] if relative else [source, tag]  # absolute keys as before: caches stay valid
        raw = self._cached("hist", extra, lambda: self._collect_histograms(scales, source, progress, relative))
        return {k: ScoreHistogram(raw[f"{k}|counts"].numpy(), int(raw[f"{k}|zeros"])) for k in scales}

    def _collect_histograms(self, scales, source, progress, relative=False) -> dict[str, torch.Tensor]:
        hist = {k: torch.zeros(NUM_BINS, dtype=torch.int64) for k in scales}
        zeros = {k: 0 for k in scales}
        kernel = native.load("site_stats")

        def observe(key: str, x: torch.Tensor) -> None:
            score = x.detach().reshape(-1, x.shape[-1]).float().abs()
            if scales[key] is not None:
                score = score * scales[key]
            if relative:
                score = score / token_rms(score).clamp_min(1e-30)
            zeros[key] += int((score == 0).sum())
            if kernel is not None:
                kernel.site_stats(score, hist[key])
            else:
                hist[key] += histogram_of(score)

        with self._hooks(list(scales), source, observe), torch.no_grad():
            for w in track(self.windows, total=len(self.windows), description="calibrating", enabled=progress):
                self._body(w[None])
        out = {f"{k}|counts": hist[k] for k in scales}
        out.update({f"{k}|zeros": torch.tensor(zeros[k]) for k in scales})
        return out

    def _hooks(self, keys: list[str], source: str, observe: Callable[[str, torch.Tensor], None]):
        """Observation hooks, registered before `self.under`'s masking hooks so that they see inputs before masking."""
        import contextlib

        from actlab.transforms.sparsity.masking import attach

        stack = contextlib.ExitStack()
        layers = self.lm.adapter.layers
        for key in keys:
            layer_index, role = split_key(key)
            layer = layers[layer_index]
            if source == "act":
                h = layer.act_fn.register_forward_hook(lambda m, a, out, k=key: observe(k, out))
            else:
                h = layer.linears[role].module.register_forward_pre_hook(lambda m, args, k=key: observe(k, args[0]))
            stack.callback(h.remove)
        if self.under is not None:
            stack.enter_context(attach(self.lm, self.under))
        return stack

    def standardized_histograms(self, keys: list[str], progress: bool = True) -> dict[str, np.ndarray]:
        """Per projection, a histogram of u = (|x_i| - mean_t) / std_t, standardised over each token's
        channels, on the linear grid Z_EDGES (for statistical top-k's per-projection z)."""
        def compute():
            counts = {k: torch.zeros(len(Z_EDGES) + 1, dtype=torch.int64) for k in keys}
            edges = torch.tensor(Z_EDGES, dtype=torch.float32)

            def observe(key, x):
                a = x.detach().reshape(-1, x.shape[-1]).float().abs()
                u = (a - a.mean(-1, keepdim=True)) / a.std(-1, keepdim=True).clamp_min(1e-30)
                counts[key] += torch.bincount(torch.bucketize(u.flatten(), edges), minlength=len(Z_EDGES) + 1)

            with self._hooks(keys, "input", observe), torch.no_grad():
                for w in track(self.windows, total=len(self.windows), description="calibrating", enabled=progress):
                    self._body(w[None])
            return counts

        raw = self._cached("zhist", keys, compute)
        return {k: raw[k].numpy() for k in keys}

    def channel_mean_sq(self, kind: str) -> dict[int, torch.Tensor]:
        """Per layer, per-channel E[x^2] at site kind `kind` (e.g. "up")."""
        from actlab.probe import Profiler
        from actlab.probe.stats.distribution import ActivationDistribution

        def compute():
            prof = Profiler(self.lm, sites=f"L*.{kind}", statistics=[ActivationDistribution()])
            prof.observe(self.windows, progress=False)
            dist = prof.statistic("distribution")
            return {key: dist.channel_summary(key)["mean_sq"] for key in dist.acc}

        raw = self._cached("meansq", kind, compute)
        return {split_key(k)[0]: v for k, v in raw.items()}

    def input_grad_rms(self, windows: int | None = None, progress: bool = True,
                       robust: bool = False) -> dict[str, torch.Tensor]:
        """Per projection input channel: sqrt(E[(dL/dx_i)^2]), L = mean next-token loss of a window.

        `robust=True`: a typical token's gradient instead of the mean square, which a few tokens can own
        (on Gemma-3 the attention-sink token carries over 90% of the gradient energy of many projections):
        each token's squared gradient is normalised to unit sum, averaged over tokens, and rescaled by the
        median over tokens of the squared gradient norm."""
        use = self.windows if windows is None else self.windows[:windows]
        what = "gradtypical" if robust else "gradrms"
        return self._cached(what, int(len(use)), lambda: self._collect_grad_rms(use, progress, robust))

    def _collect_grad_rms(self, windows: torch.Tensor, progress: bool, robust: bool = False) -> dict[str, torch.Tensor]:
        """Gradient with respect to each projection's input *through that projection only*:
        W^T dL/dy from the output gradient (q, k and v share one input tensor, whose own gradient
        would mix the three paths)."""
        import contextlib

        lm = self.lm
        sums: dict[str, torch.Tensor] = {}
        norms: dict[str, list[torch.Tensor]] = {}
        count = 0
        views = {f"L{layer.index}.{role}": lin for layer in lm.adapter.layers for role, lin in layer.linears.items()}

        def accumulate(key: str, grad_x: torch.Tensor) -> None:
            sq = grad_x.double().pow(2)
            if robust:
                energy = sq.sum(-1, keepdim=True)
                norms.setdefault(key, []).append(energy.flatten().float())
                sq = sq / energy.clamp_min(1e-300)
            sums[key] = sums.get(key, 0) + sq.sum(0)

        def watch(key: str):
            weight = views[key].weight()

            def hook(_m, _a, out):
                if out.requires_grad:
                    out.register_hook(lambda g: accumulate(key, g.detach().reshape(-1, g.shape[-1]) @ weight))
            return hook

        with contextlib.ExitStack() as stack:
            for key, view in views.items():
                stack.callback(view.module.register_forward_hook(watch(key)).remove)
            stack.callback(lm.adapter.embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True)).remove)
            for w in track(windows, total=len(windows), description="gradients", enabled=progress):
                ids = w[None].to(lm.device)
                logits = lm.model(input_ids=ids, use_cache=False).logits
                F.cross_entropy(logits[0, :-1].float(), ids[0, 1:]).backward()
                count += ids.shape[1]
        if robust:
            return {k: (v / count * torch.cat(norms[k]).median().double()).sqrt().float() for k, v in sums.items()}
        return {k: (v / count).sqrt().float() for k, v in sums.items()}

    def input_samples(self, keys: list[str], tokens: int = 512) -> dict[str, torch.Tensor]:
        """Each projection's input [tokens, in] on the first `tokens` calibration tokens (under `self.under`,
        before its masks)."""
        seq = min(tokens, self.windows.shape[1])
        rows = -(-tokens // seq)
        got: dict[str, torch.Tensor] = {}

        def observe(key, x):
            got[key] = x.detach().reshape(-1, x.shape[-1]).float().clone()

        with self._hooks(keys, "input", observe), torch.no_grad():
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

        handles = [layer.module.register_forward_pre_hook(record(layer.index), with_kwargs=True)
                   for layer in self.lm.adapter.layers]
        try:
            with torch.no_grad():
                self._body(ids)
        finally:
            for h in handles:
                h.remove()
        return calls
