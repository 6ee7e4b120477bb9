"""Model loading: every bad input gets a clear error, and no broken cache entry survives."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import actlab
from actlab.errors import ModelLoadError, UnsupportedArchitectureError
from actlab.models import cache
from actlab.models.loader import _convert_gguf, check_gguf


def test_unknown_name_lists_builtins():
    with pytest.raises(ModelLoadError, match=r"unknown model 'smollm2-13'.*smollm2-135m.*tiny-llama"):
        actlab.load_model("smollm2-13")


def test_missing_path_like_spec_is_unknown():
    with pytest.raises(ModelLoadError, match="unknown model"):
        actlab.load_model("./no/such/dir")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="cannot read the config of hub id nobody/nothing"):
        actlab.load_model("nobody/nothing")


def test_hf_directory_roundtrip(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    lm = actlab.load_model(str(tmp_path))
    ids = torch.arange(5, 40)[None]
    torch.testing.assert_close(lm.model(ids).logits, tiny_llama.model(ids).logits, rtol=0, atol=0)
    assert lm.provenance["source"] == "local-directory"


def test_truncated_safetensors_in_directory(tmp_path, tiny_llama):
    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="corrupt or truncated safetensors"):
        actlab.load_model(str(tmp_path))


def test_unsupported_architecture_directory(tmp_path):
    from transformers import BloomConfig

    BloomConfig(hidden_size=32, n_layer=1, n_head=2, vocab_size=50).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedArchitectureError, match=r"'bloom' is not supported.*gemma3_text"):
        actlab.load_model(str(tmp_path))


def _write_gguf(path, n=4096):
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tensor("blk.0.ffn_up.weight", np.ones((n, 16), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_garbage_is_refused_and_nothing_cached(tmp_cache, tmp_path):
    bad = tmp_path / "garbage.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 100)
    with pytest.raises(ModelLoadError, match="not a readable GGUF file"):
        actlab.load_model(str(bad))
    assert not any(cache.models_dir().glob("gguf-*")) if cache.models_dir().exists() else True


def test_gguf_truncated_is_refused(tmp_cache, tmp_path):
    good = tmp_path / "good.gguf"
    _write_gguf(good)
    assert check_gguf(good) == "llama"
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size - 1000])
    with pytest.raises(ModelLoadError, match="truncated|not a readable GGUF"):
        actlab.load_model(str(cut))
    assert not cache.models_dir().exists() or not any(p for p in cache.models_dir().iterdir()
                                                      if not p.name.startswith(".tmp-"))


def test_gguf_that_transformers_cannot_load_leaves_no_entry(tmp_cache, tmp_path):
    only_tensor = tmp_path / "minimal.gguf"  # a valid GGUF container, but no model metadata
    _write_gguf(only_tensor)
    with pytest.raises(ModelLoadError, match="transformers could not load"):
        actlab.load_model(str(only_tensor))
    assert list(cache.models_dir().glob("gguf-*")) == [] if cache.models_dir().exists() else True


def test_conversion_killed_midway_leaves_no_valid_entry(tmp_cache, tiny_llama, monkeypatch):
    """An exception while writing (a stand-in for a kill) must not leave an entry that loads as valid."""
    def exploding_save(self, path, **kw):
        (path / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(tiny_llama.model), "save_pretrained", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        with cache.new_entry("victim", {"source": "test"}) as tmp:
            tiny_llama.model.save_pretrained(tmp)
    assert cache.valid_entry("victim") is None
    assert not cache.entry_path("victim").exists()


def _make_entry(key, lm):
    with cache.new_entry(key, {"source": "test"}) as tmp:
        lm.model.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)


def test_cache_entry_with_wrong_size_is_not_valid(tmp_cache, tiny_llama):
    _make_entry("sized", tiny_llama)
    assert cache.valid_entry("sized") is not None
    weights = cache.entry_path("sized") / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert cache.valid_entry("sized") is None


def test_corrupt_cache_entry_is_reported_and_removed(tmp_cache, tiny_llama):
    from actlab.models.loader import _load_cache_entry

    _make_entry("corrupt", tiny_llama)
    weights = cache.entry_path("corrupt") / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8:40] = b"{" * 32  # same size, broken safetensors header
    weights.write_bytes(bytes(raw))
    assert cache.valid_entry("corrupt") is not None  # sizes still match ...
    with pytest.raises(ModelLoadError, match="broken cache entry was removed"):
        _load_cache_entry("corrupt", torch.float32)  # ... but loading detects it
    assert not cache.entry_path("corrupt").exists()


def test_marker_lists_files(tmp_cache, tiny_llama):
    _make_entry("listed", tiny_llama)
    marker = json.loads((cache.entry_path("listed") / cache.MARKER).read_text())
    assert marker["files"]["model.safetensors"] == (cache.entry_path("listed") / "model.safetensors").stat().st_size


def test_list_models_reports_cache_state(tmp_cache):
    rows = {r["name"]: r["state"] for r in actlab.models.list_models()}
    assert rows["smollm2-135m"].startswith("not cached")
    assert rows["tiny-opt"] == "built in memory"


def test_convert_refuses_unreadable_before_writing(tmp_cache, tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(ModelLoadError):
        _convert_gguf(bad, "k", {}, print)
    assert cache.valid_entry("k") is None


def _save(lm, path, tokenizer=True):
    lm.model.save_pretrained(path)
    if tokenizer:
        lm.tokenizer.save_pretrained(path)
    return path


def test_a_checkpoint_missing_weights_is_refused(tmp_path, monkeypatch):
    """A tensor removed from the checkpoint (transformers would initialise it at random), or a base-model
    checkpoint of a model with an untied head: an error naming the weights; allowed on request, with a warning
    carried by the outputs."""
    from safetensors.torch import load_file, save_file

    lm = actlab.load_model("tiny-mistral")  # untied LM head
    path = _save(lm, tmp_path / "cut")
    weights = load_file(str(path / "model.safetensors"))
    weights.pop("model.layers.1.mlp.up_proj.weight")
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"1 weight missing \(model.layers.1.mlp.up_proj.weight\)"):
        actlab.load_model(str(path))
    base = tmp_path / "base"
    lm.model.model.save_pretrained(base)
    lm.tokenizer.save_pretrained(base)
    with pytest.raises(ModelLoadError, match=r"missing \(lm_head.weight\)"):
        actlab.load_model(str(base))
    monkeypatch.setenv("ACTLAB_ALLOW_MISSING_WEIGHTS", "1")
    said = []
    loaded = actlab.load_model(str(path), log_fn=said.append)
    assert "missing" in loaded.provenance["warnings"][0] and said and said[0].startswith("warning:")


def test_own_directories_get_clear_errors(tmp_path, monkeypatch, tiny_llama):
    _save(tiny_llama, tmp_path / "no-tokenizer", tokenizer=False)
    with pytest.raises(ModelLoadError, match="has no tokenizer"):
        actlab.load_model(str(tmp_path / "no-tokenizer"))
    big = _save(tiny_llama, tmp_path / "big-tokenizer")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(big)
    tok.add_tokens([f"<extra{i}>" for i in range(20)])
    tok.save_pretrained(big)
    with pytest.raises(ModelLoadError, match=r"tokenizer has 280 tokens but the model's embedding only 260"):
        actlab.load_model(str(big))
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelLoadError, match="no such model directory models/llamaX"):
        actlab.load_model("models/llamaX")  # a typo, not a hub id: no 30 s of retries


def test_a_killed_conversion_leaves_nothing_for_long(tmp_cache):
    """The temporary directory of a process that is gone is removed by the next conversion, not a day later."""
    import subprocess
    import sys

    cache.models_dir().mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = cache.models_dir() / f".tmp-{int(dead.stdout)}-smollm2-135m-abcd"
    orphan.mkdir()
    (orphan / "model.safetensors").write_bytes(b"x" * 1000)
    mine = cache.models_dir() / f".tmp-{os.getpid()}-other-efgh"  # a live writer's: kept
    mine.mkdir()
    with cache.new_entry("fresh", {"source": "test"}) as tmp:
        (tmp / "f").write_text("y")
    assert not orphan.exists() and mine.exists() and cache.valid_entry("fresh")


def test_transformers_bars_stay_out_of_logs(tmp_path, tiny_llama, capfd):
    """Without a terminal, transformers' "Loading weights" tqdm bar would write carriage-return frames into
    the log; loading a directory leaves stderr free of it, and the bars are switched back on afterwards."""
    from transformers.utils import logging as hf_logging

    tiny_llama.model.save_pretrained(tmp_path)
    tiny_llama.tokenizer.save_pretrained(tmp_path)
    capfd.readouterr()
    assert hf_logging.is_progress_bar_enabled()
    actlab.load_model(str(tmp_path), log_fn=lambda *_: None)
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "\r" not in err
    assert hf_logging.is_progress_bar_enabled()
