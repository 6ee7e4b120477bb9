"""Model identity: taken at load, the same for one model under any name, different for any changed weight or
computation-relevant config field; recipes and calibration caches use it."""

from __future__ import annotations

import copy

import pytest
import torch

import actlab
from actlab.errors import ConfigError
from actlab.models.identity import config_digest, require_same_model, weights_digest
from actlab.transforms.sparsity import CalibrationData, attach, calibrate


def test_same_model_same_identity_under_any_name(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path / "a")
    tiny_llama.tokenizer.save_pretrained(tmp_path / "a")
    by_dir = actlab.load_model(str(tmp_path / "a"))
    assert by_dir.identity.differences(tiny_llama.identity) == []
    assert by_dir.identity.location != tiny_llama.identity.location  # where it came from is not what it is


@pytest.mark.parametrize("change", ["one weight", "a norm", "the embedding", "the activation", "rope theta"])
def test_any_relevant_change_is_another_model(tiny_llama, change):
    other = copy.deepcopy(tiny_llama)
    ad = other.adapter
    with torch.no_grad():
        if change == "one weight":
            ad.layers[2].linears["down"].module.weight[3, 5] += 1e-6
        elif change == "a norm":
            ad.layers[0].attn_norm.weight[0] += 1e-3
        elif change == "the embedding":
            ad.embed.weight[7, 0] += 1e-3
    if change == "the activation":
        other.model.config.hidden_act = "gelu"
    if change == "rope theta":
        other.model.config.rope_parameters = {**other.model.config.rope_parameters, "rope_theta": 5000.0}
    other.refresh_identity()
    diff = tiny_llama.identity.differences(other.identity)
    assert diff == (["weights"] if change in ("one weight", "a norm", "the embedding") else ["config"])
    with pytest.raises(ConfigError, match=r"made for|calibrated for"):
        require_same_model(tiny_llama.identity, other.identity, "this was made")


def test_digests_are_independent_of_storage_but_not_of_values(tiny_llama):
    model = copy.deepcopy(tiny_llama.model)
    assert weights_digest(model) == weights_digest(tiny_llama.model)
    with torch.no_grad():
        p = next(model.parameters())
        p.copy_(p.clone())  # same values, new storage
    assert weights_digest(model) == weights_digest(tiny_llama.model)
    assert config_digest(model.config) == config_digest(tiny_llama.model.config)
    model.config.use_cache = not model.config.use_cache  # how a model is run is not what it computes
    assert config_digest(model.config) == config_digest(tiny_llama.model.config)


def test_recipe_of_one_family_is_refused_on_another(tmp_path, monkeypatch):
    """A Llama recipe on a Qwen3 model of the same shapes: refused by architecture and weights."""
    monkeypatch.setenv("ACTLAB_CACHE", str(tmp_path))
    llama = actlab.load_model("tiny-llama")
    qwen = actlab.load_model("tiny-qwen3")
    recipe = calibrate("magnitude", CalibrationData.from_corpus(llama, None, seq_len=96, windows=8), 0.3)
    with pytest.raises(ConfigError, match="architecture llama vs qwen3"):
        with attach(qwen, recipe):
            pass


def test_calibration_cache_is_keyed_by_identity(tmp_path, monkeypatch):
    """A model that differs only in config must not reuse another's cached statistics."""
    monkeypatch.setenv("ACTLAB_CACHE", str(tmp_path))
    lm = actlab.load_model("tiny-llama")
    other = copy.deepcopy(lm)
    other.model.config.rms_norm_eps = 1e-2
    for layer in other.adapter.layers:
        layer.attn_norm.variance_epsilon = layer.mlp_norm.variance_epsilon = 1e-2
    other.refresh_identity()
    a = CalibrationData.from_corpus(lm, None, seq_len=96, windows=8)
    b = CalibrationData.from_corpus(other, None, seq_len=96, windows=8)
    assert a._key("hist", "x") != b._key("hist", "x")
    keys = ["L0.q", "L1.down"]
    ha = a.score_histograms(dict.fromkeys(keys))
    hb = b.score_histograms(dict.fromkeys(keys))  # computed fresh, not read from a's cache file
    fresh = CalibrationData.from_corpus(other, None, seq_len=96, windows=8)
    fresh._memo.clear()
    assert all((hb[k].counts == fresh.score_histograms(dict.fromkeys(keys))[k].counts).all() for k in keys)
    assert any((ha[k].counts != hb[k].counts).any() for k in keys)
