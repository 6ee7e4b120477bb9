"""Decode engine: kernels against dense masked references, exact argmax head, greedy equality with HF."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import actlab
from actlab.engine.decode import DecodeEngine
from actlab.engine.kernels import TorchKernels, load_kernels
from actlab.engine.lm_head import ExactArgmaxHead
from actlab.engine.reference import greedy_reference, hf_generate, prompt_ids
from actlab.errors import ConfigError, UnsupportedArchitectureError
from actlab.transforms.sparsity import CalibrationData, attach, calibrate

NATIVE = load_kernels()
KERNELS = [NATIVE, TorchKernels()]
EMPTY = torch.empty(0)


def _check_native_built():
    assert not isinstance(NATIVE, TorchKernels), "the C++ kernels did not build on this machine"


def test_native_kernels_are_built():
    _check_native_built()


@pytest.mark.parametrize("kernels", KERNELS, ids=["native", "torch"])
@settings(max_examples=40, deadline=None)
@given(out=st.integers(1, 300), inp=st.integers(1, 300), sparsity=st.floats(0.0, 0.95), scaled=st.booleans(),
       seed=st.integers(0, 2**16))
def test_sparse_gemv_equals_masked_dense(kernels, out, inp, sparsity, scaled, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g)
    x = torch.randn(inp, generator=g)
    scale = torch.rand(inp, generator=g) + 0.1 if scaled else EMPTY
    score = x.abs() * scale if scaled else x.abs()
    t = float(torch.quantile(score, sparsity)) if inp > 1 else 0.0
    keep = score > t
    y, kept = kernels.sparse_gemv(w.t().contiguous(), x, scale, t)
    assert kept == int(keep.sum())
    torch.testing.assert_close(y, w @ (x * keep), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernels", KERNELS, ids=["native", "torch"])
def test_sparse_gemv_edge_cases(kernels):
    w = torch.randn(7, 13)
    x = torch.randn(13)
    y, kept = kernels.sparse_gemv(w.t().contiguous(), x, EMPTY, float("inf"))  # all dropped
    assert kept == 0 and torch.equal(y, torch.zeros(7))
    y, kept = kernels.sparse_gemv(w.t().contiguous(), x, EMPTY, -1.0)  # none dropped
    assert kept == 13
    torch.testing.assert_close(y, w @ x, rtol=1e-5, atol=1e-5)
    x0 = torch.zeros(13)
    y, kept = kernels.sparse_gemv(w.t().contiguous(), x0, EMPTY, 0.0)  # zeros are dropped (|0| > 0 is false)
    assert kept == 0 and torch.equal(y, torch.zeros(7))


@pytest.mark.parametrize("kernels", KERNELS, ids=["native", "torch"])
@pytest.mark.parametrize("out,inp", [(1, 1), (5, 3), (64, 576), (577, 129), (1536, 576)])
def test_dense_row_and_indexed_gemv(kernels, out, inp):
    w, x = torch.randn(out, inp), torch.randn(inp)
    torch.testing.assert_close(kernels.dense_gemv(w, x), w @ x, rtol=1e-4, atol=1e-4)
    idx = torch.randperm(out)[: max(1, out // 3)].sort().values
    torch.testing.assert_close(kernels.row_gemv(w, x, idx), (w @ x)[idx], rtol=1e-4, atol=1e-4)
    cols = torch.randperm(inp)[: max(1, inp // 2)]
    vals = torch.randn(len(cols))
    dense_in = torch.zeros(inp).index_put_((cols,), vals)
    torch.testing.assert_close(kernels.indexed_gemv(w.t().contiguous(), cols, vals), w @ dense_in,
                               rtol=1e-4, atol=1e-4)
    empty = torch.empty(0, dtype=torch.long)
    assert torch.equal(kernels.indexed_gemv(w.t().contiguous(), empty, torch.empty(0)), torch.zeros(out))


@pytest.mark.parametrize("kernels", KERNELS, ids=["native", "torch"])
def test_int8_gemv_bound_holds(kernels):
    torch.manual_seed(3)
    w = torch.randn(500, 128) * torch.rand(500, 1) * 0.2
    head = ExactArgmaxHead(w, None, kernels)
    for _ in range(20):
        h = torch.randn(128) * 3
        approx, err = kernels.int8_gemv(head.q, head.scale, h)
        assert bool(((w @ h - approx).abs() <= err + 1e-5).all())


@pytest.mark.parametrize("kernels", KERNELS, ids=["native", "torch"])
@pytest.mark.parametrize("heads,kv,dim,pos,start,rope,softcap", [
    (4, 4, 16, 0, 0, True, 0.0), (6, 2, 8, 9, 0, True, 0.0), (9, 3, 64, 40, 5, False, 0.0),
    (8, 1, 32, 300, 100, True, 30.0), (2, 2, 6, 7, 7, False, 0.0)])
def test_decode_attention_equals_sdpa(kernels, heads, kv, dim, pos, start, rope, softcap):
    g = torch.Generator().manual_seed(pos)
    q, k, v = (torch.randn(n, dim, generator=g) for n in (heads, kv, kv))
    k_cache, v_cache = torch.randn(kv, pos + 3, dim, generator=g), torch.randn(kv, pos + 3, dim, generator=g)
    cos, sin = (torch.randn(dim, generator=g), torch.randn(dim, generator=g)) if rope else (torch.empty(0),) * 2
    scaling = dim**-0.5
    # reference: explicit rotary formula, cache update, repeated kv heads, SDPA over the window
    kc, vc = k_cache.clone(), v_cache.clone()
    if rope:
        half = dim // 2
        rot = lambda x: x * cos + torch.cat((-x[:, half:], x[:, :half]), -1) * sin  # noqa: E731
        q_ref, k_ref = rot(q), rot(k)
    else:
        q_ref, k_ref = q, k
    kc[:, pos], vc[:, pos] = k_ref, v
    keys = kc[:, start : pos + 1].repeat_interleave(heads // kv, 0)
    values = vc[:, start : pos + 1].repeat_interleave(heads // kv, 0)
    scores = torch.einsum("hd,htd->ht", q_ref, keys) * scaling
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    expected = torch.einsum("ht,htd->hd", scores.softmax(-1), values).reshape(-1)
    out = kernels.decode_attention(q, k, v, k_cache, v_cache, pos, start, cos, sin, scaling, softcap)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(k_cache, kc)  # the cache was written in place, at pos only
    torch.testing.assert_close(v_cache, vc)


@pytest.mark.parametrize("kernels", KERNELS, ids=["native", "torch"])
def test_rms_norm_equals_formula(kernels):
    x, w = torch.randn(5, 37) * 4, torch.randn(37)
    expected = x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt() * w
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), expected, rtol=1e-5, atol=1e-5)


def test_exact_head_argmax_even_on_near_ties():
    torch.manual_seed(0)
    w = torch.randn(3000, 64) * 0.05
    head = ExactArgmaxHead(w, None, NATIVE)
    for trial in range(50):
        h = torch.randn(64)
        if trial % 2:  # make the runner-up within a hair of the winner
            logits = w @ h
            top2 = logits.topk(2).indices
            w[top2[1]] = w[top2[0]] - 1e-5 * torch.sign(h)
            head = ExactArgmaxHead(w, None, NATIVE)
        assert head.argmax(h) == int(torch.argmax(w @ h))
    assert head.last_candidates < 50


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-gemma2", "tiny-olmo2",
                                        "tiny-phi3", "tiny-gpt-neox", "tiny-gpt2", "tiny-opt"])
def tiny_lm(request):
    return actlab.load_model(request.param)


def test_dense_engine_equals_generate(tiny_lm):
    ids = prompt_ids(tiny_lm, 24)
    assert DecodeEngine(tiny_lm, max_len=128).generate(ids, 48).tokens == hf_generate(tiny_lm, ids, 48)


@pytest.mark.parametrize("method,params", [("loss-aware", {}), ("loss-aware", {"rule": "relative"}), ("chess", {}),
                                           ("wina", {"topk": True}),
                                           ("stat-topk", {}), ("cats", {})])
def test_sparse_engine_equals_masked_reference(tiny_lm, method, params, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTLAB_CACHE", str(tmp_path))
    calib = CalibrationData.from_corpus(tiny_lm, None, seq_len=96, windows=8)
    target = 0.2 if method == "cats" else 0.3  # CATS reaches only the MLP's share of the weights
    recipe = calibrate(method, calib, target, **params)
    ids = prompt_ids(tiny_lm, 24)
    with attach(tiny_lm, recipe):
        reference = hf_generate(tiny_lm, ids, 40)
    engine = DecodeEngine(tiny_lm, recipe, max_len=128)
    assert engine.generate(ids, 40).tokens == reference
    assert abs(engine.achieved_sparsity() - target) < 0.15


def test_engine_refuses_foreign_recipe(tiny_lm, tmp_path, monkeypatch):
    from actlab.errors import ConfigError

    monkeypatch.setenv("ACTLAB_CACHE", str(tmp_path))
    other = actlab.load_model("tiny-mistral")
    recipe = calibrate("magnitude", CalibrationData.from_corpus(other, None, seq_len=96, windows=8), 0.3)
    with pytest.raises(ConfigError, match="calibrated for"):
        DecodeEngine(tiny_lm, recipe)


# -- text in, text out ------------------------------------------------------------------------------------
def test_sampling_follows_the_hf_models_distribution_and_stops_at_eos():
    from actlab.engine.decode import eos_ids, sample

    lm = actlab.load_model("tiny-llama")
    engine = DecodeEngine(lm, max_len=96)
    ids = prompt_ids(lm, 12)
    greedy = engine.generate_tokens(ids, 10)
    assert greedy == greedy_reference(lm, ids, 10)
    # a sampled continuation, replayed independently: HF logits at each step, the same filtering and generator
    new = engine.generate_tokens(ids, 10, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    generator = torch.Generator().manual_seed(7)
    replay, seq = [], list(ids)
    with torch.no_grad():
        for _ in range(10):
            logits = lm.model(torch.tensor([seq])).logits[0, -1].float()
            replay.append(sample(logits, 0.8, 20, 0.9, generator))
            seq.append(replay[-1])
    assert new == replay
    assert engine.generate_tokens(ids, 10, temperature=0.8, seed=7) == engine.generate_tokens(ids, 10,
                                                                                              temperature=0.8, seed=7)
    stop = engine.generate_tokens(ids, 10, stop={greedy[2]})
    assert stop == greedy[:greedy.index(greedy[2]) + 1]
    reference = greedy_reference(lm, lm.tokenizer("def main():")["input_ids"], 8)
    ends = [i for i, t in enumerate(reference) if t in eos_ids(lm)]
    reference = reference[:ends[0] + 1] if ends else reference
    assert engine.generate_text("def main():", max_new_tokens=8) == lm.tokenizer.decode(reference,
                                                                                        skip_special_tokens=True)
    for bad, message in [({"temperature": -1}, "temperature"), ({"top_k": -2}, "top_k"), ({"top_p": 0}, "top_p")]:
        with pytest.raises(ConfigError, match=message):
            engine.generate_tokens(ids, 4, **bad)


def test_nucleus_and_top_k_filtering_by_brute_force():
    from actlab.engine.decode import sample

    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    probs = torch.softmax(logits.double(), 0)
    counts = torch.zeros(5)
    g = torch.Generator().manual_seed(0)
    for _ in range(4000):
        counts[sample(logits, 1.0, top_k=0, top_p=0.8, generator=g)] += 1
    # the nucleus of 0.8: the fewest most likely tokens whose mass reaches 0.8
    keep = int((torch.cumsum(probs, 0) - probs < 0.8).sum())
    assert (counts[keep:] == 0).all() and (counts[:keep] > 0).all()
    expected = probs[:keep] / probs[:keep].sum()
    assert torch.allclose(counts[:keep] / counts.sum(), expected.float(), atol=0.03)
    counts.zero_()
    for _ in range(500):
        counts[sample(logits, 1.0, top_k=2, generator=g)] += 1
    assert (counts[2:] == 0).all() and (counts[:2] > 0).all()


def test_the_engine_refuses_a_mixture_of_experts_in_one_line():
    lm = actlab.load_model("tiny-qwen3-moe")  # experts in layers 0 and 2, a dense MLP in layer 1
    with pytest.raises(UnsupportedArchitectureError, match=r"the decode engine is not supported on mixture-of-"
                                                           r"experts models \(qwen3_moe: 2 layers route each token "
                                                           r"to 2 of 6 experts"):
        DecodeEngine(lm)
