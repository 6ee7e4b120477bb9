"""Metrics and their standard errors, as lm-evaluation-harness computes them (where it does).

- acc, acc_norm, greedy acc: the mean of per-item 0/1 values; standard error = sample standard deviation
  (n - 1) / sqrt(n), lm-eval's `mean_stderr`;
- perplexity of targets (LAMBADA): exp(-mean log-likelihood); its standard error by the delta method,
  ppl * se(mean log-likelihood) (lm-eval bootstraps it; the two agree closely for hundreds of items);
- perplexity of windows (WikiText-2 under actlab's protocol): exp(mean NLL per predicted token); windows have
  equal length, so the mean of window means; standard error by the delta method over windows;
- a paired difference (recipe minus dense on the same items): the mean and standard error of the per-item
  differences, which is what says whether a difference is noise.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def mean_stderr(values: Sequence[float]) -> tuple[float, float]:
    n = len(values)
    if n == 0:
        return float("nan"), float("nan")
    mean = sum(values) / n
    if n == 1:
        return mean, float("nan")
    var = sum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


def perplexity_of_loglikelihoods(lls: Sequence[float]) -> tuple[float, float]:
    mean, se = mean_stderr(lls)
    ppl = math.exp(-mean)
    return ppl, ppl * se


def perplexity_of_nlls(nlls: Sequence[float]) -> tuple[float, float]:
    mean, se = mean_stderr(nlls)
    ppl = math.exp(mean)
    return ppl, ppl * se


def paired_difference(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of b - a over paired items."""
    if len(a) != len(b):
        raise ValueError("paired values must come from the same items")
    return mean_stderr([y - x for x, y in zip(a, b)])
