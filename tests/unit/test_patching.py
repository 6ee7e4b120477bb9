"""Activation patching against a hand-written recompute, attribution patching against central finite
differences of the metric (an independent route to the same gradient), the job's directory and its errors."""

from __future__ import annotations

import json

import pytest
import torch

from actlab.data.pairs import PatchPair, load_patch_pairs
from actlab.errors import ConfigError
from actlab.jobs.patch import patch_job
from actlab.transforms.steer.patching import attribution_patching, encode_pairs, exact_patching

PAIR = PatchPair("When Mary and John went to the shop, John gave a drink to",
                 "When Mary and John went to the shop, Mary gave a drink to", "M", "J")


def _logit_diff(lm, ids, pair, hook_module=None, fn=None):
    handle = None
    if hook_module is not None:
        handle = hook_module.register_forward_pre_hook(lambda m, a, k: ((fn(a[0]), *a[1:]), k) if a else
                                                       (a, {**k, "hidden_states": fn(k["hidden_states"])}),
                                                       with_kwargs=True)
    try:
        with torch.no_grad():
            logits = lm.model(input_ids=ids).logits[0, -1].double()
    finally:
        if handle is not None:
            handle.remove()
    return float(logits[pair.answer] - logits[pair.wrong])


def _layer_inputs(lm, ids, layer):
    seen = []
    handle = lm.adapter.layers[layer].module.register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach().clone()), with_kwargs=True)
    with torch.no_grad():
        lm.model(input_ids=ids)
    handle.remove()
    return seen[0]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-gpt2"])
def test_exact_patching_equals_a_manual_recompute(name):
    import actlab

    lm = actlab.load_model(name)
    pair = encode_pairs(lm, [PAIR])[0]
    result = exact_patching(lm, pair, tables=("resid",))
    clean = _logit_diff(lm, pair.clean, pair)
    corrupt = _logit_diff(lm, pair.corrupt, pair)
    assert abs(result["clean"] - clean) < 1e-4 and abs(result["corrupt"] - corrupt) < 1e-4
    for layer, pos in ((1, 3), (1, pair.clean.shape[1] - 1), (0, 10)):
        source = _layer_inputs(lm, pair.clean, layer)

        def put(x, source=source, pos=pos):
            x = x.clone()
            x[:, pos] = source[:, pos]
            return x

        patched = _logit_diff(lm, pair.corrupt, pair, lm.adapter.layers[layer].module, put)
        assert abs(float(result["resid"][layer, pos]) - (patched - corrupt) / (clean - corrupt)) < 1e-4


def test_attribution_patching_equals_finite_differences(tiny_llama):
    lm = tiny_llama
    pair = encode_pairs(lm, [PAIR])[0]
    attr = attribution_patching(lm, pair, tables=("resid",))
    scale = attr["clean"] - attr["corrupt"]
    for layer, pos in ((1, 2), (2, pair.clean.shape[1] - 1), (0, 9)):
        clean, corrupt = _layer_inputs(lm, pair.clean, layer), _layer_inputs(lm, pair.corrupt, layer)
        step = 1e-2

        def towards(eps):
            def fn(x):
                x = x.clone()
                x[:, pos] = corrupt[:, pos] + eps * (clean[:, pos] - corrupt[:, pos])
                return x
            return _logit_diff(lm, pair.corrupt, pair, lm.adapter.layers[layer].module, fn)

        derivative = (towards(step) - towards(-step)) / (2 * step)
        assert abs(float(attr["resid"][layer, pos]) * scale - derivative) < 2e-3 * max(1.0, abs(derivative))


def test_patch_job_directory_and_errors(tiny_llama, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    row = {"clean": PAIR.clean, "corrupt": PAIR.corrupt, "answer": PAIR.answer, "wrong": PAIR.wrong}
    pairs.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    out = patch_job("tiny-llama", pairs=str(pairs), out=str(tmp_path / "run"), tables="resid,heads",
                    progress=False, log=lambda *a: None)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"results.json", "resid.csv", "heads.csv", "resid.png",
                                                              "heads.png", "report.html"}
    ad = tiny_llama.adapter
    assert len(saved["exact"]["heads"]) == ad.num_layers and len(saved["exact"]["heads"][0]) == ad.num_heads
    assert -1 <= out["correlation"]["resid"] <= 1
    with pytest.raises(ConfigError, match="exists"):
        patch_job("tiny-llama", pairs=str(pairs), out=str(tmp_path / "run"), log=lambda *a: None)
    with pytest.raises(ConfigError, match="unknown patching metric"):
        patch_job("tiny-llama", pairs=str(pairs), out=str(tmp_path / "x"), metric="kl", log=lambda *a: None)
    with pytest.raises(ConfigError, match="--tables"):
        patch_job("tiny-llama", pairs=str(pairs), out=str(tmp_path / "x"), tables="attn", log=lambda *a: None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({**row, "corrupt": PAIR.corrupt + " and more"}) + "\n")
    with pytest.raises(ConfigError, match="one length"):
        patch_job("tiny-llama", pairs=str(bad), out=str(tmp_path / "x"), log=lambda *a: None)
    bad.write_text(json.dumps({k: v for k, v in row.items() if k != "wrong"}) + "\n")
    with pytest.raises(ConfigError, match="missing wrong"):
        patch_job("tiny-llama", pairs=str(bad), out=str(tmp_path / "x"), log=lambda *a: None)
    assert not (tmp_path / "x").exists()


def test_builtin_ioi_pairs_swap_the_repeated_name_and_keep_one_length():
    pairs = load_patch_pairs("builtin:ioi")
    assert len(pairs) == 16 and load_patch_pairs("builtin:ioi:train") == pairs[::2]
    for p in pairs:
        # the clean prompt repeats the wrong name (the subject), so the indirect object is the answer
        assert p.clean.count(p.wrong) == 2 and p.clean.count(p.answer) == 1
        assert p.corrupt.count(p.answer) == 2 and p.corrupt.count(p.wrong) == 1
        assert len(p.clean) == len(p.corrupt) == len(pairs[0].clean)
    with pytest.raises(ConfigError, match="built-in sets: builtin:ioi"):
        load_patch_pairs("builtin:nope")
