"""Layer recipes: a removed block through hooks equals a model built without it; a removed sublayer equals its
output projection zeroed; both export to directories plain transformers loads, and the engine skips them."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

import actlab
from actlab.engine import DecodeEngine
from actlab.engine.reference import hf_generate, prompt_ids
from actlab.export import export_hf
from actlab.models.tiny import TINY_CONFIGS
from actlab.transforms import attach
from actlab.transforms.layers import LayerRecipe

IDS = (torch.arange(40).remainder(200) + 5)[None]


def drop(lm, *parts):
    return LayerRecipe("manual", lm.identity.to_dict(), list(parts))


def _logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def built_without(lm, removed: int):
    """An independent construction: a config with one layer fewer (per-layer fields cut by hand), weights copied
    over by renaming the state dict's keys."""
    cfg = copy.deepcopy(lm.model.config)
    n = cfg.num_hidden_layers
    cfg.num_hidden_layers = n - 1
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i != removed]
    if getattr(cfg, "mlp_only_layers", None) is not None:  # Qwen-MoE's dense layers, renumbered
        cfg.mlp_only_layers = [i - (i > removed) for i in cfg.mlp_only_layers if i != removed]
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    prefix = lm.adapter.spec.layers + "."
    state = {}
    for key, value in lm.model.state_dict().items():
        if key.startswith(prefix):
            index, rest = key[len(prefix):].split(".", 1)
            if int(index) == removed:
                continue
            key = f"{prefix}{int(index) - (int(index) > removed)}.{rest}"
        state[key] = value
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all("rotary" in k or "bias" in k for k in missing)
    return model


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_removed_block_equals_a_model_built_without_it(name, tmp_path):
    lm = actlab.load_model(name)
    recipe = drop(lm, "L1")
    with attach(lm, recipe):
        hooked = _logits(lm.model)
    torch.testing.assert_close(hooked, _logits(built_without(lm, 1)), rtol=1e-5, atol=1e-5)
    export_hf(lm, recipe, tmp_path / "pruned")  # plain transformers loads the export and computes the same
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "pruned"), dtype=torch.float32)
    assert plain.config.num_hidden_layers == lm.adapter.num_layers - 1
    torch.testing.assert_close(_logits(plain), hooked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("part", ["attn", "mlp"])
def test_removed_sublayer_equals_a_zeroed_output_projection(name, part, tmp_path):
    lm = actlab.load_model(name)
    manual = copy.deepcopy(lm.model)
    layer = actlab.models.adapter_for(manual).layers[0]
    with torch.no_grad():
        if part == "mlp" and layer.moe is not None:  # every expert's down projection
            layer.mlp.experts.down_proj.zero_()
        else:
            lin = layer.linears["o" if part == "attn" else "down"].module
            lin.weight.zero_()
            if getattr(lin, "bias", None) is not None:
                lin.bias.zero_()
    recipe = drop(lm, f"L0.{part}")
    with attach(lm, recipe):
        hooked = _logits(lm.model)
    torch.testing.assert_close(hooked, _logits(manual), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(hooked, _logits(lm.model))
    export_hf(lm, recipe, tmp_path / "zeroed")
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "zeroed"), dtype=torch.float32)
    torch.testing.assert_close(_logits(plain), hooked, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2", "tiny-gemma3", "tiny-phi3", "tiny-gpt-neox", "tiny-gpt2",
                                  "tiny-opt"])
def test_engine_skips_removed_parts_like_the_hooked_model(name):
    lm = actlab.load_model(name)
    recipe = drop(lm, "L1", "L0.mlp")
    ids = prompt_ids(lm, 24)
    with attach(lm, recipe):
        reference = hf_generate(lm, ids, 32)
    engine = DecodeEngine(lm, recipe, max_len=128)
    assert engine.generate(ids, 32).tokens == reference
    dense = DecodeEngine(lm, max_len=128)
    assert engine.weight_bytes_per_token() < dense.weight_bytes_per_token()
    assert engine.k_cache.shape[0] == lm.adapter.num_layers - 1  # the removed block keeps no cache
