"""Sparsity's own calibration statistics, on top of the shared `CalibrationSet`.

- `score_histograms`: per projection, the log-bin histogram of its score |x_i| * scale_i (or of the score
  relative to its token's RMS) over every calibration token (any quantile, any "fraction below t" reads
  back from it);
- `standardized_histograms`: per projection, a histogram of scores standardised over each token's channels
  (statistical top-k's per-projection z).

`SparsityCalibration.under` is the sparsity recipe being refined: the histograms are then recorded through
the sparsified model, each rule's input before its own mask (budget refinement).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from actlab import native
from actlab.calib import CalibrationSet
from actlab.calib.set import _recipe_digest
from actlab.probe.stats.histogram import NUM_BINS, fraction_below, histogram_of, quantile
from actlab.transforms.sparsity.rules import token_rms

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


class SparsityCalibration(CalibrationSet):
    """A calibration set with sparsity's statistics; `under` is the sparsity recipe being refined."""

    under: Any = None

    @classmethod
    def of(cls, calib: CalibrationSet, under: Any = None) -> SparsityCalibration:
        """`calib` seen by the sparsity methods (sharing its cached statistics)."""
        view = cls(calib.lm, calib.windows, calib.corpus, calib.protocol, calib._memo, calib.base, calib.world)
        view.under = under
        return view

    def sparse_view(self, recipe: Any) -> SparsityCalibration:
        """The same calibration data seen through a sparsified model: score histograms record each rule's
        input before its mask, under the upstream sparsity of `recipe` (for budget refinement)."""
        return SparsityCalibration.of(self, recipe)

    def observed_under(self) -> list[Any]:
        return self.applied() + ([self.under] if self.under is not None else [])

    def _key(self, what: str, extra: Any = None) -> str:
        if self.under is not None and what in ("hist", "zhist"):  # only these are recorded through `under`
            extra = [extra, _recipe_digest(self.under)]
        return super()._key(what, extra)

    # -- statistics ------------------------------------------------------------------------------
    def score_histograms(self, scales: dict[str, torch.Tensor | None], source: str = "input",
                         progress: bool = True, relative: bool = False) -> dict[str, ScoreHistogram]:
        """Histogram of |x| * scale at the input of each projection in `scales` (or at act(gate) for
        `source="act"`, keyed by the layer's down projection). `relative=True`: of each score divided by the
        RMS of its token's scores (what a "relative" rule's threshold is compared with)."""
        tag = {k: (None if v is None else hashlib.sha256(v.float().numpy().tobytes()).hexdigest()[:16])
               for k, v in sorted(scales.items())}
        extra = [source, tag, "relative"] if relative else [source, tag]
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

        with self.observing(list(scales), source, observe):
            self.run_windows("calibrating", progress)
        out = {f"{k}|counts": hist[k] for k in scales}
        out.update({f"{k}|zeros": torch.tensor(zeros[k]) for k in scales})
        self.reduce(*out.values())  # counts: exact in any number of processes
        return out

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

            with self.observing(keys, "input", observe):
                self.run_windows("calibrating", progress)
            self.reduce(*counts.values())
            return counts

        raw = self._cached("zhist", keys, compute)
        return {k: raw[k].numpy() for k in keys}
