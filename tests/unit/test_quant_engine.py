"""The quantized decode engine: its kernels against the dequantized weights times x (random shapes, group sizes,
bit widths and sparsities 0-0.95), and greedy tokens equal to the dequantized (masked) reference model's."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import actlab
from actlab.calib import CalibrationSet
from actlab.engine.decode import DecodeEngine
from actlab.engine.quantized import QuantLinear, offsets, quant_kernels, sparse_codes
from actlab.engine.reference import hf_generate, prompt_ids
from actlab.errors import ConfigError
from actlab.transforms import attach, compose
from actlab.transforms.quant import Grid, get_method, quantize
from actlab.transforms.sparsity import CalibrationData, calibrate

QK = quant_kernels()


def test_quantized_kernels_are_built():
    assert QK is not None, "the quantized C++ kernels did not build on this machine"


def _case(out, groups, group, bits, symmetric, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, groups * group, generator=g)
    q = quantize(w, Grid(bits, group, symmetric))
    x = torch.randn(groups * group, generator=g) * torch.rand(groups * group, generator=g) * 3
    return q, x


@settings(max_examples=60, deadline=None)
@given(out=st.integers(1, 40).map(lambda n: 2 * n), groups=st.integers(1, 6), group=st.sampled_from([16, 32, 64]),
       bits=st.sampled_from([2, 3, 4, 5, 8]), symmetric=st.booleans(), sparsity=st.floats(0.0, 0.95),
       seed=st.integers(0, 2**16))
def test_kernels_equal_the_dequantized_product(out, groups, group, bits, symmetric, sparsity, seed):
    q, x = _case(out, groups, group, bits, symmetric, seed)
    w = q.dequantize().double()
    four = bits <= 4
    layout = (sparse_codes(q.codes, four), q.scale.half().t().contiguous(), offsets(q).half().t().contiguous())
    dense, kept = QK.q_sparse_gemv(*layout, x, torch.empty(0), -1.0, torch.empty(0), group, four)
    assert kept == x.shape[0]
    torch.testing.assert_close(dense.double(), w @ x.double(), rtol=1e-4, atol=1e-3)
    score = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed + 1)) + 0.5
    cutoff = float(torch.quantile((x.abs() * score).double(), sparsity)) if sparsity > 0 else -1.0
    keep = (x.abs() * score) > cutoff
    value = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(seed + 2)) + 0.5
    y, kept = QK.q_sparse_gemv(*layout, x, score, cutoff, value, group, four)
    assert kept == int(keep.sum())
    torch.testing.assert_close(y.double(), w[:, keep] @ (x * value)[keep].double(), rtol=1e-4, atol=1e-3)


def test_kernels_refuse_codes_that_do_not_tile_the_groups():
    q, x = _case(4, 2, 16, 4, False, 0)
    layout = (sparse_codes(q.codes, True), q.scale.half().t().contiguous(), offsets(q).half().t().contiguous())
    with pytest.raises(RuntimeError, match="tile the input channels"):
        QK.q_sparse_gemv(*layout, x, torch.empty(0), -1.0, torch.empty(0), 12, True)


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-phi3", "tiny-gpt2"])
def tiny_lm(request):
    return actlab.load_model(request.param)


def _calib(lm):
    g = torch.Generator().manual_seed(0)
    return CalibrationSet(lm, torch.randint(5, 250, (3, 48), generator=g), {"name": "random", "sha256": "e0"},
                          {"seq_len": 48})


@pytest.mark.parametrize("method,kw", [("rtn", dict(bits=4, group=16, head=True)), ("rtn", dict(bits=8, group=32)),
                                       ("awq", dict(bits=3, group=16)), ("gptq", dict(bits=4, group=0))])
def test_quantized_engine_equals_the_dequantized_reference(tiny_lm, method, kw, tmp_cache):
    recipe = get_method(method, **kw).calibrate(_calib(tiny_lm))
    ids = prompt_ids(tiny_lm, 24)
    with attach(tiny_lm, recipe):
        reference = hf_generate(tiny_lm, ids, 40)
    engine = DecodeEngine(tiny_lm, recipe, max_len=128)
    assert all(isinstance(p, QuantLinear) and p.native for layer in engine.layers for p in layer.projections.values())
    assert engine.generate(ids, 40).tokens == reference


def test_quantized_and_sparse_engine_equals_the_masked_dequantized_reference(tiny_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTLAB_CACHE", str(tmp_path))
    sparse = calibrate("loss-aware", CalibrationData.from_corpus(tiny_lm, None, seq_len=96, windows=8), 0.5)
    quant = get_method("awq", bits=4, group=16).calibrate(_calib(tiny_lm))  # an input scale under the rule
    ids = prompt_ids(tiny_lm, 24)
    with attach(tiny_lm, [sparse, quant]):
        reference = hf_generate(tiny_lm, ids, 40)
    engine = DecodeEngine(tiny_lm, compose(sparse, quant), max_len=128)
    assert engine.generate(ids, 40).tokens == reference
    assert abs(engine.achieved_sparsity() - 0.5) < 0.15
    dense_bytes = DecodeEngine(tiny_lm, max_len=128).weight_bytes_per_token()
    assert engine.weight_bytes_per_token(engine.achieved_sparsity()) < 0.3 * dense_bytes


def test_engine_refuses_w8a8(tmp_cache):
    lm = actlab.load_model("tiny-llama")
    with pytest.raises(ConfigError, match="weight-only quantization"):
        DecodeEngine(lm, get_method("smoothquant").calibrate(_calib(lm)))
