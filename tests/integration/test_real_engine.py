"""Acceptance: the decode engine on the real SmolLM2-135M - greedy tokens equal HF generate (dense) for 64
tokens; sparse, each greedy token is the masked reference's argmax but where a threshold flips, and the native
kernels agree with torch's call by call."""

from __future__ import annotations

import pytest
import torch

from actlab.engine.decode import DecodeEngine
from actlab.engine.kernels import TorchKernels
from actlab.engine.reference import hf_generate, prompt_ids
from actlab.transforms.sparsity import CalibrationData, attach, calibrate

pytestmark = pytest.mark.real

TOKENS = 64


def test_dense_engine_equals_generate(smollm2):
    ids = prompt_ids(smollm2)
    assert DecodeEngine(smollm2, max_len=len(ids) + TOKENS + 1).generate(ids, TOKENS).tokens == \
        hf_generate(smollm2, ids, TOKENS)


@pytest.fixture(scope="module")
def sparse_recipe(smollm2):
    # loss-aware at 50% (`actlab bench decode` calibrates it on 8 x 512 tokens; 4 x 256 here, for time)
    calib = CalibrationData.from_corpus(smollm2, None, seq_len=256, windows=4)
    return calibrate("loss-aware", calib, 0.5)


@pytest.mark.parametrize("native", [False, True], ids=["torch-kernels", "native-kernels"])
def test_sparse_engine_follows_the_masked_reference(smollm2, sparse_recipe, native):
    # The engine's greedy tokens, read by the masked reference in one forward, should be its argmax. A hard
    # threshold is discontinuous: a channel whose score lies within float rounding of its cutoff flips between
    # any two summation orders, and on SmolLM2 (massive activations) one flip moves the logits by units. With
    # transformers 5.24 on an AVX-512 machine 46 of 64 greedy tokens agreed before the first flip; on the AVX2
    # machine of round 2's end, 53 of 64 (torch's kernels) and 54 (native) agree teacher-forced - more
    # disagreement than rare flips explain, an open question in the notes. So this is a sanity bound (a wrong
    # cache, rotary or rule wiring gives garbage), the exactness is the tiny models' unit tests, and the native
    # kernels are checked call by call against torch's on the same inputs (below).
    ids = prompt_ids(smollm2)
    engine = DecodeEngine(smollm2, sparse_recipe, max_len=len(ids) + TOKENS + 1, native=native)
    tokens = engine.generate(ids, TOKENS).tokens
    with attach(smollm2, sparse_recipe), torch.no_grad():
        logits = smollm2.model(torch.tensor([ids + tokens]), use_cache=False).logits[0, len(ids) - 1 : -1]
    agree = sum(int(logits[i].argmax()) == t for i, t in enumerate(tokens))
    assert agree >= 0.75 * TOKENS, (agree, tokens)
    assert 0.3 < engine.achieved_sparsity() < 0.7


class Compared:
    """The native kernels, each call checked against torch's kernels on copies of the same inputs."""

    CHECKED = ("sparse_gemv", "dense_gemv", "decode_attention", "rms_norm")

    def __init__(self, native):
        self.native, self.torch, self.worst, self.calls = native, TorchKernels(), {}, 0

    def __getattr__(self, name):
        fn = getattr(self.native, name)
        if name not in self.CHECKED:
            return fn

        def both(*args):
            copies = [a.clone() if torch.is_tensor(a) else a for a in args]
            result, want = fn(*args), getattr(self.torch, name)(*copies)
            got, want = (result[0], want[0]) if isinstance(result, tuple) else (result, want)
            error = float((got - want).abs().max() / want.abs().max().clamp_min(1e-30))
            self.worst[name] = max(self.worst.get(name, 0.0), error)
            self.calls += 1
            return result
        return both


def test_native_kernels_agree_with_torchs_on_every_call(smollm2, sparse_recipe, monkeypatch):
    from actlab.engine import decode

    native = decode.load_kernels(True)
    if isinstance(native, TorchKernels):
        pytest.skip("no C++ compiler here: the engine runs torch's kernels")
    compared = Compared(native)
    monkeypatch.setattr(decode, "load_kernels", lambda prefer_native=True: compared)
    ids = prompt_ids(smollm2)
    DecodeEngine(smollm2, sparse_recipe, max_len=len(ids) + 17).generate(ids, 16)
    assert compared.calls > 16 * 30 * 7
    assert set(compared.worst) >= {"sparse_gemv", "decode_attention", "rms_norm"}
    assert max(compared.worst.values()) < 1e-5, compared.worst
