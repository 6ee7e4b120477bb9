"""The Python API's one-call entry points against the step-by-step calls they stand for."""

from __future__ import annotations

import actlab
from actlab.transforms.sparsity import CalibrationData, calibrate


def test_one_call_sparsify_equals_calibrating_step_by_step(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("ACTLAB_CACHE", str(tmp_path))  # no calibration cache shared with other tests
    one = actlab.sparsify(tiny_llama, "wina", 0.4, seq_len=96, windows=8, topk=True)
    steps = calibrate("wina", CalibrationData.from_corpus(tiny_llama, None, seq_len=96, windows=8), 0.4, topk=True)
    assert one.method == "wina" and one.params == steps.params and one.rules == steps.rules
    by_name = actlab.sparsify("tiny-llama", "magnitude", 0.3, seq_len=96, windows=8)
    assert by_name.method == "magnitude" and by_name.target == 0.3


def test_engine_names_import_from_the_package():
    from actlab.engine import DecodeEngine, EnginePlan  # noqa: F401
    from actlab.probe import Probe, run_with_cache  # noqa: F401


def test_wrap_takes_an_already_loaded_model_and_tokenizer(tiny_llama):
    """A model the user loaded with transformers themselves: the same identity and perplexity as actlab's load."""
    import torch
    from transformers import AutoModelForCausalLM

    from actlab.data import WindowSpec, load_corpus, make_windows
    from actlab.eval.perplexity import perplexity

    model = AutoModelForCausalLM.from_config(tiny_llama.model.config, dtype=torch.float32)
    model.load_state_dict(tiny_llama.model.state_dict())
    lm = actlab.wrap(model, tiny_llama.tokenizer, name="mine")
    assert lm.name == "mine" and lm.adapter.family == "llama" and not model.training
    assert lm.identity.weights_sha256 == tiny_llama.identity.weights_sha256
    ids = make_windows(lm.tokenizer, load_corpus(None), WindowSpec(seq_len=64, num_windows=2))
    assert perplexity(lm, ids, progress=False).nll == perplexity(tiny_llama, ids, progress=False).nll
