"""The decode engine's ragged KV cache: the kernel against attention over each head's rows written out, greedy
tokens equal to the masked reference (HF under the recipe) on every engine architecture, and a cache that holds
only what the budget keeps."""

from __future__ import annotations

import pytest
import torch

import actlab
from actlab.engine.decode import DecodeEngine
from actlab.engine.kernels import TorchKernels, load_kernels
from actlab.engine.reference import hf_generate, prompt_ids
from actlab.errors import ConfigError
from actlab.transforms import attach
from actlab.transforms.base import NoCalibration
from actlab.transforms.kv import KVRecipe, get_method
from actlab.transforms.kv.budgets import pyramid

KERNELS = [load_kernels(), TorchKernels()]


@pytest.mark.parametrize("kernels", KERNELS, ids=["native", "torch"])
@pytest.mark.parametrize("heads,kv,dim,window,rope,softcap", [
    (4, 2, 16, 0, True, 0.0), (6, 3, 8, 5, True, 0.0), (8, 1, 32, 0, False, 30.0), (2, 2, 6, 3, False, 0.0)])
def test_ragged_attention_attends_each_heads_own_rows(kernels, heads, kv, dim, window, rope, softcap):
    g = torch.Generator().manual_seed(heads * 10 + kv)
    lens = torch.tensor([3, 7, 1][:kv] + [4] * max(0, kv - 3), dtype=torch.long)
    caps = lens + 2
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), caps.cumsum(0)[:-1]])
    rows, pos = int(caps.sum()), 20
    kc, vc = torch.randn(rows, dim, generator=g), torch.randn(rows, dim, generator=g)
    positions = torch.full((rows,), -1, dtype=torch.long)
    for h in range(kv):  # each head holds some earlier positions, not in order
        held = torch.randperm(pos, generator=g)[: int(lens[h])]
        positions[int(offsets[h]): int(offsets[h]) + int(lens[h])] = held
    q, k, v = torch.randn(heads, dim, generator=g), torch.randn(kv, dim, generator=g), torch.randn(kv, dim, generator=g)
    cos, sin = (torch.randn(dim, generator=g), torch.randn(dim, generator=g)) if rope else (torch.empty(0),) * 2
    half = dim // 2
    rot = (lambda x: x * cos + torch.cat((-x[:, half:], x[:, :half]), -1) * sin) if rope else (lambda x: x)
    expected, written = [], {}
    for h in range(kv):  # the brute force: the head's rows as a list, the new token in a stale row or appended
        o, n = int(offsets[h]), int(lens[h])
        rows_h = [(int(positions[o + t]), kc[o + t], vc[o + t]) for t in range(n)]
        stale = [t for t, r in enumerate(rows_h) if window and pos - r[0] >= window]
        new = (pos, rot(k)[h], v[h])
        if stale:
            rows_h[stale[0]] = new
        else:
            rows_h.append(new)
        written[h] = rows_h
    for hq in range(heads):
        rows_h = [r for r in written[hq // (heads // kv)] if not window or pos - r[0] < window]
        keys, values = torch.stack([r[1] for r in rows_h]), torch.stack([r[2] for r in rows_h])
        scores = keys @ rot(q)[hq] * dim ** -0.5
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        expected.append(scores.softmax(0) @ values)
    out = kernels.ragged_attention(q, k, v, kc, vc, positions, offsets, lens, caps, pos, window, cos, sin,
                                   dim ** -0.5, softcap)
    torch.testing.assert_close(out, torch.cat(expected), rtol=1e-4, atol=1e-5)
    for h in range(kv):
        o = int(offsets[h])
        assert int(lens[h]) == len(written[h])
        assert sorted(positions[o:o + int(lens[h])].tolist()) == sorted(r[0] for r in written[h])


ARCHS = ["tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-gemma2", "tiny-phi3", "tiny-gpt-neox", "tiny-gpt2"]


@pytest.fixture(scope="module", params=ARCHS)
def tiny_lm(request):
    return actlab.load_model(request.param)


def recipes(lm):
    ad = lm.adapter
    make = lambda name, ratio, **p: get_method(name, **p).calibrate(NoCalibration(lm), ratio)  # noqa: E731
    ratios = pyramid(ad.num_layers, ad.num_kv_heads, 0.6)
    if ad.num_kv_heads > 1:  # one head of every layer keeps everything: budgets differ by head, not only by layer
        ratios[:, -1] = 0.0
    return {"snapkv": make("snapkv", 0.5, window=4), "pyramid-heads": KVRecipe(
        "manual", lm.identity.to_dict(), ratio=0.6, press="knorm", head_ratios=ratios),
        "h2o-decode": make("h2o", 0.5, phase="decode"), "tova-decode": make("tova", 0.75, phase="decode"),
        "streaming-decode": make("streaming-llm", 0.5, phase="decode")}


@pytest.mark.parametrize("name", ["snapkv", "pyramid-heads", "h2o-decode", "tova-decode", "streaming-decode"])
def test_the_ragged_cache_gives_the_masked_references_greedy_tokens(tiny_lm, name):
    recipe = recipes(tiny_lm)[name]
    ids = prompt_ids(tiny_lm, 32)
    with attach(tiny_lm, recipe):
        reference = hf_generate(tiny_lm, ids, 24)
    engine = DecodeEngine(tiny_lm, recipe, max_len=96)
    assert engine.generate(ids, 24).tokens == reference
    ad = tiny_lm.adapter
    end = len(ids) + 23  # positions cached after the last step
    full = sum(min(end, ad.sliding_window(layer) or end) for layer in ad.layers) * ad.num_kv_heads
    held = engine.kv_cache_bytes(held=True) // (ad.head_dim * 4 * 2)
    assert held < 0.9 * full  # the cache really holds less


@pytest.mark.parametrize("recent", [0.0, 0.5, 1.0])
def test_heavy_hitter_victims_are_what_h2o_scores_evict(recent):
    """The row-space choice against H2O's scores and keep_mask over the same tokens laid out by position (some
    dead), with tied scores and the rows shuffled."""
    from actlab.transforms.kv.base import CacheView, keep_mask
    from actlab.transforms.kv.h2o import H2O, heavy_hitter_victims

    g = torch.Generator().manual_seed(int(recent * 10))
    for _ in range(20):
        t = int(torch.randint(4, 40, (1,), generator=g))
        accumulated = torch.randint(0, 5, (1, 1, t), generator=g).float()  # small integers: many ties
        alive = torch.rand(1, 1, t, generator=g) < 0.8
        alive[..., -1] = True
        held = alive[0, 0].nonzero().flatten()
        keep = int(torch.randint(1, len(held) + 1, (1,), generator=g))
        view = CacheView(torch.zeros(1, 1, t, 2), torch.zeros(1, 1, t, 2), alive=alive, accumulated=accumulated)
        kept = keep_mask(H2O(recent).scores(view, torch.tensor([keep])), torch.tensor([keep]))[0, 0]
        shuffle = torch.randperm(len(held), generator=g)
        rows = held[shuffle]
        victims = heavy_hitter_victims(accumulated[0, 0, rows], rows, keep, recent)
        assert sorted(rows[victims].tolist()) == sorted(set(held.tolist()) - set(kept.nonzero().flatten().tolist()))


@pytest.mark.parametrize("victims", [[0], [4], [1, 4], [3, 4], [0, 2, 3]])
def test_removing_rows_keeps_every_other_row_of_the_head(victims):
    from actlab.engine.decode import RaggedCache

    k = torch.arange(2 * 8 * 3, dtype=torch.float32).view(2, 8, 3)
    held = torch.zeros(2, 8, dtype=torch.bool)
    held[0, [1, 2, 4, 6, 7]] = held[1, [0, 5]] = True
    r = RaggedCache.holding(k, -k, 10, held, [6, 3])
    r.acc = r.positions.float() / 10
    r.remove(0, torch.tensor(victims))
    rows = {int(p): (r.k[i].tolist(), r.v[i].tolist(), float(r.acc[i])) for i, p in enumerate(r.positions[:5])
            if i < int(r.lens[0])}
    expected = [10 + p for i, p in enumerate([1, 2, 4, 6, 7]) if i not in victims]
    assert sorted(rows) == expected and int(r.lens[0]) == 5 - len(victims)
    for p in expected:
        assert rows[p] == (k[0, p - 10].tolist(), (-k[0, p - 10]).tolist(), pytest.approx(p / 10))
    assert r.positions[6:8].tolist() == [10, 15] and int(r.lens[1]) == 2  # the other head untouched


def test_the_engines_h2o_eviction_keeps_the_masked_references_tokens(tiny_lm):
    """Decode-phase H2O with budgets that differ by layer and head: after every step of a generation, each head
    of the engine's ragged cache holds exactly the positions the masked reference holds."""
    from actlab.transforms.kv.budgets import visible_tokens
    from actlab.transforms.kv.session import SESSION

    ad = tiny_lm.adapter
    ratios = pyramid(ad.num_layers, ad.num_kv_heads, 0.6)
    if ad.num_kv_heads > 1:
        ratios[:, 0] = 0.3
    recipe = KVRecipe("manual", tiny_lm.identity.to_dict(), ratio=0.6, press="h2o", phase="decode",
                      head_ratios=ratios)
    ids = prompt_ids(tiny_lm, 32)
    new = 20
    with attach(tiny_lm, recipe):
        reference = hf_generate(tiny_lm, ids, new)
        states = ad.layers[0].attn.__dict__[SESSION].layers
        end = len(ids) + new - 1
        expected = {i: [states[i].alive[0, h, :end].nonzero().flatten().tolist() for h in range(ad.num_kv_heads)]
                    for i in states}
    engine = DecodeEngine(tiny_lm, recipe, max_len=64)
    assert engine.generate(ids, new).tokens == reference
    for layer, r in zip([x for x in engine.layers if x.attention], engine.ragged):
        lo = end - visible_tokens(end, layer.window)
        for h in range(ad.num_kv_heads):
            o, n = int(r.offsets[h]), int(r.lens[h])
            held = sorted(p for p in r.positions[o:o + n].tolist() if p >= lo)
            assert held == [p for p in expected[layer.index][h] if p >= lo], (layer.index, h)


def test_the_ragged_cache_holds_only_what_the_budget_keeps(tiny_llama):
    lm = tiny_llama
    ids = prompt_ids(lm, 64)
    dense = DecodeEngine(lm, max_len=80)
    r = get_method("snapkv", window=8).calibrate(NoCalibration(lm), 0.75)
    engine = DecodeEngine(lm, r, max_len=80)
    engine.generate(ids, 8)
    per_token = lm.adapter.head_dim * 4 * 2
    layers, kv = lm.adapter.num_layers, lm.adapter.num_kv_heads
    assert engine.kv_cache_bytes(held=True) == layers * kv * (int(64 * 0.25) + 7) * per_token
    assert engine.kv_cache_bytes() == layers * kv * (int(64 * 0.25) + 80 - 64) * per_token  # room for the rest
    assert dense.kv_cache_bytes() == layers * kv * 80 * per_token


def test_the_engine_refuses_a_quantized_kv_cache_in_one_line(tiny_llama):
    r = get_method("kivi", bits=4).calibrate(NoCalibration(tiny_llama), 0.0)
    with pytest.raises(ConfigError, match="KIVI"):
        DecodeEngine(tiny_llama, r)


def test_bench_decode_at_long_contexts_reports_both_caches(tmp_path):
    from actlab.jobs.bench import bench_context

    lm = actlab.load_model("tiny-llama")
    r = get_method("streaming-llm").calibrate(NoCalibration(lm), 0.75)
    r.save(tmp_path / "s.json")
    out = bench_context("tiny-llama", str(tmp_path / "s.json"), [64, 128], tokens=4, reps=1, log=lambda m: None)
    per_token = lm.adapter.num_kv_heads * lm.adapter.head_dim * 8 * lm.adapter.num_layers
    for row, context in zip(out["contexts"], (64, 128)):
        assert row["full_kv_mb"] * 1e6 == (context + 3) * per_token  # every position the last step holds
        assert row["recipe_kv_mb"] * 1e6 == (int(context * 0.25) + 3) * per_token
        assert row["full_tok_s"] > 0 and row["recipe_tok_s"] > 0
    with pytest.raises(ConfigError, match="context"):
        bench_context("tiny-llama", str(tmp_path / "s.json"), [600], tokens=4, log=lambda m: None)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_a_kv_recipe_composes_with_sparsity_quantization_and_layers_in_the_engine(model, tmp_path, monkeypatch):
    """Sparse activations, int4 weights, a removed attention sublayer and a compressed cache, evaluated and
    decoded together: the engine gives the masked reference's tokens, costs multiply."""
    from actlab.calib import CalibrationSet
    from actlab.data.tasks import load_task
    from actlab.eval.harness import DENSE, Column, evaluate
    from actlab.transforms import compose, cost_of
    from actlab.transforms.layers import LayerRecipe
    from actlab.transforms.quant import get_method as quant_method
    from actlab.transforms.sparsity import CalibrationData, calibrate

    monkeypatch.setenv("ACTLAB_CACHE", str(tmp_path))
    lm = actlab.load_model(model)
    g = torch.Generator().manual_seed(0)
    calib = CalibrationSet(lm, torch.randint(5, 250, (3, 48), generator=g), {"name": "random", "sha256": "e0"},
                           {"seq_len": 48})
    sparse = calibrate("cats", CalibrationData.from_corpus(lm, None, seq_len=96, windows=8), 0.2)
    quant = quant_method("rtn", bits=4, group=16).calibrate(calib)
    quant.weights = {k: v for k, v in quant.weights.items() if k not in ("L1.q", "L1.k", "L1.v", "L1.qkv", "L1.o")}
    layers = LayerRecipe("manual", lm.identity.to_dict(), ["L1.attn"])
    kv = get_method("snapkv", window=4).calibrate(NoCalibration(lm), 0.5)
    everything = compose(sparse, quant, layers, kv)
    ids = prompt_ids(lm, 32)
    with attach(lm, everything):
        reference = hf_generate(lm, ids, 16)
    assert DecodeEngine(lm, everything, max_len=64).generate(ids, 16).tokens == reference
    cost, alone = cost_of(lm, everything), cost_of(lm, compose(sparse, quant, layers))
    assert cost.kv_bytes_per_token == pytest.approx(alone.kv_bytes_per_token * 0.5)
    assert cost.weight_bytes_per_token == alone.weight_bytes_per_token
    task = load_task("passkey@300")
    task.dataset.synthetic = {**task.dataset.synthetic, "haystack": "python-docs"}
    result = evaluate(lm, [task], [Column(DENSE), Column("all", everything), Column("kv", kv)], limit=2,
                      progress=False, log=lambda m: None)
    assert all(task.task in col.results for col in result.columns)
