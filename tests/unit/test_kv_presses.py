"""KV presses: each one's kept set against a brute force written from its paper's rule with loops over heads
and tokens, the ratio met exactly, and bad input refused in one line."""

from __future__ import annotations

import math

import pytest
import torch

from actlab.errors import ConfigError
from actlab.transforms.kv import PRESSES, CacheView, get_press, kept_count
from actlab.transforms.kv.base import window_attention

B, KV, GROUP, T, D = 2, 2, 3, 40, 8


@pytest.fixture
def view():
    g = torch.Generator().manual_seed(0)
    keys = torch.randn(B, KV, T, D, generator=g) * torch.rand(B, KV, T, 1, generator=g) * 3
    return CacheView(keys, torch.randn(B, KV, T, D, generator=g), torch.randn(B, KV * GROUP, T, D, generator=g))


def attention_row(view, b, kv, pos):
    """Softmax attention of the query at `pos` on keys 0..pos, averaged over the query heads of KV head kv."""
    out = torch.zeros(T, dtype=torch.float64)
    for h in range(kv * GROUP, (kv + 1) * GROUP):
        q = view.queries[b, h, pos].double()
        s = torch.tensor([float(q @ view.keys[b, kv, k].double()) / math.sqrt(D) for k in range(pos + 1)])
        out[: pos + 1] += torch.softmax(s, 0) / GROUP
    return out


def top(scores, keep):  # highest first, ties to the earlier position
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep])


def brute_force(name, view, keep):
    kept = {}
    for b in range(B):
        for kv in range(KV):
            if name == "streaming-llm":
                kept[b, kv] = sorted(set(range(4)) | set(range(T - (keep - 4), T)))
            elif name == "knorm":
                kept[b, kv] = top([-float(view.keys[b, kv, t].norm()) for t in range(T)], keep)
            elif name == "tova":  # every head of the layer: the same tokens
                row = (sum(attention_row(view, b, k, T - 1) for k in range(KV)) / KV).tolist()
                row[-1] = math.inf
                kept[b, kv] = top(row, keep)
            elif name == "snapkv":
                w = 64 if T >= 64 else 16
                mass = sum(attention_row(view, b, kv, p) for p in range(T - w, T)) / w
                pooled = [float(mass[max(0, t - 2): min(t + 3, T - w)].sum()) / 5 for t in range(T)]  # zero-padded
                kept[b, kv] = top([math.inf if t >= T - w else pooled[t] for t in range(T)], keep)
            elif name == "h2o":
                acc = sum(attention_row(view, b, kv, p) for p in range(T)).tolist()
                recent = keep // 2
                kept[b, kv] = top([math.inf if t >= T - recent else acc[t] for t in range(T)], keep)
    return kept


@pytest.mark.parametrize("name", sorted(PRESSES))
@pytest.mark.parametrize("ratio", [0.25, 0.5, 0.75, 0.875])
def test_each_press_keeps_what_its_rule_says(view, name, ratio):
    press = get_press(name, **({"window": 16} if name == "snapkv" else {}))
    full = view  # every position's query, for the brute force
    if name == "tova":
        view = CacheView(view.keys, view.values, view.queries[:, :, -1:])
    elif name == "snapkv":
        view = CacheView(view.keys, view.values, view.queries[:, :, -16:])
    index, keys, values = press.compress(view, ratio)
    keep = kept_count(T, ratio)
    assert keep == int(T * (1 - ratio)) and index.shape == (B, KV, keep)  # the ratio, exactly
    expected = brute_force(name, full, keep)
    for (b, kv), positions in expected.items():
        assert index[b, kv].tolist() == positions, (name, b, kv)
        torch.testing.assert_close(keys[b, kv], view.keys[b, kv, positions])
        torch.testing.assert_close(values[b, kv], view.values[b, kv, positions])


def test_window_attention_is_causal_and_grouped(view):
    probs = window_attention(CacheView(view.keys, view.values, view.queries[:, :, -5:]))
    assert probs.shape == (B, KV, 5, T)
    for i, pos in enumerate(range(T - 5, T)):
        torch.testing.assert_close(probs[1, 1, i].double(), attention_row(view, 1, 1, pos), atol=1e-6, rtol=1e-5)


def test_bad_input_is_a_one_line_error(view):
    for ratio in (-0.1, 1.0, 1.5, True, "half"):
        with pytest.raises(ConfigError, match="--ratio"):
            get_press("knorm").compress(view, ratio)
    with pytest.raises(ConfigError, match="longer than"):
        get_press("snapkv", window=64).compress(CacheView(view.keys, view.values, torch.randn(B, 6, 64, D)), 0.5)
    with pytest.raises(ConfigError, match="needs the queries"):
        get_press("tova").compress(CacheView(view.keys, view.values), 0.5)
    with pytest.raises(ConfigError, match="unknown kv method"):
        get_press("nope")
    with pytest.raises(ConfigError, match="bad parameters"):
        get_press("knorm", window=3)
    with pytest.raises(ConfigError, match="kernel"):
        get_press("snapkv", kernel=4)
