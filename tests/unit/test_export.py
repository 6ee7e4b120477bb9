"""Export: HF directories plain transformers loads (dense, folded, or with a runtime recipe embedded that actlab
re-attaches), GGUF files an independent reader (transformers' GGUF loader) reproduces, and clear refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, Gemma3TextConfig, Qwen3Config

import actlab
from actlab.errors import ConfigError
from actlab.export import export_gguf, export_hf
from actlab.models.tiny import byte_tokenizer
from actlab.transforms import attach, compose, load_recipe
from actlab.transforms.layers import LayerRecipe
from actlab.transforms.sparsity import CalibrationData, calibrate

IDS = (torch.arange(40).remainder(200) + 5)[None]


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def lm():
    return actlab.load_model("tiny-llama")


@pytest.fixture(scope="module")
def sparse(lm, tmp_path_factory):
    import os

    os.environ.setdefault("ACTLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    return calibrate("loss-aware", CalibrationData.from_corpus(lm, None, seq_len=96, windows=8), 0.4, refine=0,
                     rule="threshold", sensitivity="mean-square", toward_uniform=0.0)


def test_dense_export_is_a_plain_hf_directory(lm, tmp_path):
    export_hf(lm, None, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "dense"), dtype=torch.float32)
    assert torch.equal(_logits(plain), _logits(lm.model))
    again = actlab.load_model(str(tmp_path / "dense"))
    assert again.identity.differences(lm.identity) == [] and again.attached == []


def test_a_runtime_recipe_is_embedded_and_re_attached(lm, sparse, tmp_path):
    report = export_hf(lm, sparse, tmp_path / "sparse")
    assert report["embedded"] and not report["folded"]
    assert any("plain transformers runs this directory without it" in n for n in report["notes"])
    with attach(lm, sparse):
        sparse_logits = _logits(lm.model)
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "sparse"), dtype=torch.float32)
    assert torch.equal(_logits(plain), _logits(lm.model))  # transformers runs it dense, as the notes say
    messages = []
    back = actlab.load_model(str(tmp_path / "sparse"), log_fn=messages.append)
    assert [r.describe() for r in back.attached] == [sparse.describe()] and "attached the recipe" in messages[0]
    assert torch.equal(_logits(back.model), sparse_logits)
    back.detach()
    assert torch.equal(_logits(back.model), _logits(lm.model))
    bare = actlab.load_model(str(tmp_path / "sparse"), attach_recipe=False)
    assert bare.attached == [] and torch.equal(_logits(bare.model), _logits(lm.model))


def test_folded_and_runtime_parts_export_together(lm, sparse, tmp_path):
    """A zeroed sublayer is folded into the weights, the sparsity beside them: actlab's reload equals both."""
    keep = {k: v for k, v in sparse.to_dict()["rules"].items() if not k.startswith("L2.")}
    partial = type(sparse).from_dict({**sparse.to_dict(), "rules": keep, "predicted": {}})
    recipe = compose(LayerRecipe("manual", lm.identity.to_dict(), ["L2.mlp"]), partial)
    with attach(lm, recipe):
        want = _logits(lm.model)
    export_hf(lm, recipe, tmp_path / "both")
    back = actlab.load_model(str(tmp_path / "both"), log_fn=lambda m: None)
    assert torch.equal(_logits(back.model), want)
    manifest = json.loads((tmp_path / "both" / "actlab-export.json").read_text())
    assert manifest["folded"] and manifest["embedded"] and manifest["source"]["weights_sha256"]


def test_exports_refuse_what_they_cannot_hold(lm, sparse, tmp_path):
    with pytest.raises(ConfigError, match="renumbers them"):
        export_hf(lm, compose(LayerRecipe("manual", lm.identity.to_dict(), ["L2"]),
                              type(sparse).from_dict({**sparse.to_dict(), "rules": {
                                  k: v for k, v in sparse.to_dict()["rules"].items() if k.startswith("L0.")}})),
                  tmp_path / "x")
    with pytest.raises(ConfigError, match="llama.cpp cannot run"):
        export_gguf(lm, sparse, tmp_path / "s.gguf")
    with pytest.raises(ConfigError, match="ending in .gguf"):
        export_gguf(lm, None, tmp_path / "model.bin")
    with pytest.raises(ConfigError, match="GGUF export of opt is not supported"):
        export_gguf(actlab.load_model("tiny-opt"), None, tmp_path / "o.gguf")
    with pytest.raises(ConfigError, match="every 6th layer global"):
        export_gguf(actlab.load_model("tiny-gemma3"), None, tmp_path / "g.gguf")  # its layers are 2 sliding + 1 full
    (tmp_path / "taken").mkdir()
    with pytest.raises(ConfigError, match="already exists"):
        export_hf(lm, None, tmp_path / "taken")


def _variant(name: str):
    """Tiny models that transformers' GGUF reader can rebuild (it assumes Qwen3's head_dim of 128 and Gemma-3's
    six-layer pattern with head_dim = query_pre_attn_scalar = 256): an independent check of the GGUF writer."""
    if name in ("tiny-llama", "tiny-mistral", "tiny-qwen2"):
        return actlab.load_model(name)
    tok = byte_tokenizer()
    common = dict(vocab_size=len(tok), bos_token_id=1, eos_token_id=2, pad_token_id=0, hidden_size=64,
                  intermediate_size=160, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.08)
    if name == "tiny-qwen3":
        cfg = Qwen3Config(num_hidden_layers=2, head_dim=128, tie_word_embeddings=True, **common)
    else:
        cfg = Gemma3TextConfig(num_hidden_layers=6, head_dim=256, query_pre_attn_scalar=256, sliding_window=8,
                               **{**common, "num_key_value_heads": 1})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(0.3 * torch.randn_like(p))
    return actlab.wrap(model, tok, name=name)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-gemma3"])
def test_gguf_export_is_read_back_by_transformers(name, tmp_path):
    lm = _variant(name)
    export_gguf(lm, None, tmp_path / "m.gguf")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32)
    tol = 1e-4 if "gemma" in name else 0  # Gemma norms are stored as 1 + w: one float32 rounding
    torch.testing.assert_close(_logits(back), _logits(lm.model), rtol=tol, atol=tol)


def test_gguf_of_a_pruned_model(tmp_path):
    lm = actlab.load_model("tiny-qwen2")
    recipe = LayerRecipe("manual", lm.identity.to_dict(), ["L1", "L0.mlp"])
    export_gguf(lm, recipe, tmp_path / "p.gguf")
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="p.gguf", dtype=torch.float32)
    assert back.config.num_hidden_layers == 1
    with attach(lm, recipe):
        torch.testing.assert_close(_logits(back), _logits(lm.model), rtol=1e-5, atol=1e-5)


def test_compose_and_export_through_the_cli(lm, sparse, tmp_path):
    sparse.save(tmp_path / "sparse.json")
    LayerRecipe("manual", lm.identity.to_dict(), ["L2.mlp"]).save(tmp_path / "drop.yaml")
    run = [sys.executable, "-m", "actlab.cli"]
    out = subprocess.run(run + ["compose", str(tmp_path / "sparse.json"), str(tmp_path / "drop.yaml"),
                                "--out", str(tmp_path / "both.json"), "--model", "tiny-llama"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "a rule on a dropped layer" in out.stderr  # sparsity rules on L2's MLP
    out = subprocess.run(run + ["export", "--model", "tiny-llama", "--recipe", str(tmp_path / "sparse.json"),
                                "--out", str(tmp_path / "exported"), "--json"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout)
    assert report["embedded"] == [sparse.describe()]
    assert load_recipe(tmp_path / "exported" / "actlab-recipe.json").describe() == sparse.describe()
    out = subprocess.run(run + ["export", "--model", "tiny-llama", "--out", str(tmp_path / "m.gguf"), "--format",
                                "gguf"], capture_output=True, text=True)
    assert out.returncode == 0 and (tmp_path / "m.gguf").stat().st_size > 100_000, out.stderr[-2000:]
