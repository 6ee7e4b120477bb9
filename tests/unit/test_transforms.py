"""The transform spine: recipe files (header + sidecar), validation on load, identity, composition, costs, and
`attach` restoring the model bit for bit."""

from __future__ import annotations

import json

import pytest
import torch

import actlab
from actlab.errors import ConfigError
from actlab.probe.edit import Edit, Editor, add
from actlab.transforms import attach, compose, cost_of, load_recipe, validate
from actlab.transforms.io import sidecar_path
from actlab.transforms.layers import LayerRecipe
from actlab.transforms.sparsity import CalibrationData, SparsityRecipe, calibrate
from actlab.transforms.steer import InterventionRecipe, SiteEdit

IDS = (torch.arange(48).remainder(200) + 5)[None]


@pytest.fixture(scope="module")
def lm():
    return actlab.load_model("tiny-llama")


@pytest.fixture(scope="module")
def sparse(lm, tmp_path_factory):
    import os

    os.environ.setdefault("ACTLAB_CACHE", str(tmp_path_factory.mktemp("cache")))
    calib = CalibrationData.from_corpus(lm, None, seq_len=96, windows=8)
    return calibrate("wina", calib, 0.4)  # per-channel scales: tensors for the sidecar


def steering(lm, site="L1.resid_out", coeff=3.0, op="add"):
    v = torch.randn(lm.adapter.hidden_size, generator=torch.Generator().manual_seed(1))
    return InterventionRecipe("manual", lm.identity.to_dict(), [SiteEdit(site, op, v, coeff)])


def dropping(lm, *parts):
    return LayerRecipe("manual", lm.identity.to_dict(), list(parts))


def only_layer(recipe, layer: int):
    """The part of a sparsity recipe that sparsifies one layer."""
    d = recipe.to_dict()
    prefix = f"L{layer}."
    return SparsityRecipe.from_dict({**d, "rules": {k: v for k, v in d["rules"].items() if k.startswith(prefix)},
                                     "predicted": {k: v for k, v in d["predicted"].items() if k.startswith(prefix)}})


def _logits(lm, ids=IDS):
    with torch.no_grad():
        return lm.model(ids).logits


def _hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# -- files ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_recipe_files_are_a_short_header_and_a_sidecar(lm, sparse, tmp_path, suffix):
    path = tmp_path / f"r{suffix}"
    sparse.save(path)
    assert sidecar_path(path).is_file()
    assert path.stat().st_size < 20_000  # the per-channel numbers are in the sidecar, not the header
    loaded = load_recipe(path)
    assert isinstance(loaded, SparsityRecipe) and loaded.to_dict() == sparse.to_dict()
    with attach(lm, sparse):
        a = _logits(lm)
    with attach(lm, loaded):
        b = _logits(lm)
    assert torch.equal(a, b)


def test_every_family_round_trips_and_reproduces(lm, tmp_path):
    for recipe in (steering(lm), dropping(lm, "L1", "L2.mlp")):
        path = tmp_path / f"{recipe.family}.json"
        recipe.save(path)
        loaded = load_recipe(path)
        assert type(loaded) is type(recipe)
        with attach(lm, recipe):
            a = _logits(lm)
        with attach(lm, loaded):
            b = _logits(lm)
        assert torch.equal(a, b) and not torch.equal(a, _logits(lm))


def test_round_one_recipe_files_still_load(lm, sparse, tmp_path):
    """Format 1 (inline lists, a sampled-weights fingerprint) is read and checked against this model."""
    from actlab.transforms.sparsity.recipe import legacy_fingerprint

    old = {"format": 1, **sparse.to_dict()}
    old["model"] = {"name": "tiny-llama", "model_type": "llama", "layers": 3, "hidden_size": 64,
                    "fingerprint": legacy_fingerprint(lm.adapter)}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    loaded = load_recipe(path)
    with attach(lm, loaded):
        a = _logits(lm)
    with attach(lm, sparse):
        assert torch.equal(a, _logits(lm))
    old["model"]["fingerprint"] = "0" * 64
    path.write_text(json.dumps(old))
    with pytest.raises(ConfigError, match="calibrated for"):
        with attach(lm, load_recipe(path)):
            pass


def _write(path, header):
    path.write_text(json.dumps(header))
    return path


@pytest.mark.parametrize("mutate,message", [
    (lambda h: h.pop("rules"), "missing field 'rules'"),
    (lambda h: h.update(extra=1), "unknown field"),
    (lambda h: h.update(target=5.0), r"sparsity must be in \[0, 1\)"),
    (lambda h: h.update(family="nope"), "unknown recipe family 'nope'"),
    (lambda h: next(iter(h["rules"].values())).update(threshold="0.5"), "threshold: expected a number, got str"),
    (lambda h: next(iter(h["rules"].values())).update(kind="top-k"), "kind: must be one of"),
    (lambda h: h.update(positions="first-half"), "positions: must be one of"),
])
def test_malformed_recipes_name_the_field(sparse, tmp_path, mutate, message):
    header = {"format": 2, "family": "sparsity", "version": 1, **json.loads(json.dumps(sparse.to_dict()))}
    mutate(header)
    with pytest.raises(ConfigError, match=message):
        load_recipe(_write(tmp_path / "bad.json", header))


def test_broken_files_are_clear_errors(sparse, tmp_path):
    path = tmp_path / "r.json"
    sparse.save(path)
    text = path.read_text()
    (tmp_path / "cut.json").write_text(text[: len(text) // 2])
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_recipe(tmp_path / "cut.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_recipe(tmp_path / "list.json")
    (tmp_path / "bad.yaml").write_text("rules: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")
    side = sidecar_path(path)
    side.write_bytes(side.read_bytes()[:-8])
    with pytest.raises(ConfigError, match="does not match the recipe"):
        load_recipe(path)
    side.unlink()
    with pytest.raises(ConfigError, match="is missing"):
        load_recipe(path)
    with pytest.raises(ConfigError, match="cannot read recipe"):
        load_recipe(tmp_path / "absent.json")


def test_recipe_checks_against_the_model(lm, sparse):
    header = sparse.to_dict()
    first = next(iter(header["rules"]))
    bad = SparsityRecipe.from_dict({**header, "rules": {"L7.q": header["rules"][first]}})
    with pytest.raises(ConfigError, match="L7.q: this model has no such projection"):
        validate(bad, lm)
    short = dict(header["rules"][first], scale=[1.0, 2.0])
    with pytest.raises(ConfigError, match="scale has 2 values"):
        validate(SparsityRecipe.from_dict({**header, "rules": {first: short}}), lm)
    with pytest.raises(ConfigError, match="the site has 64 channels"):
        validate(InterventionRecipe("m", lm.identity.to_dict(), [SiteEdit("L0.resid_out", "add", torch.ones(3))]), lm)
    with pytest.raises(ConfigError, match="NaN"):
        SiteEdit("L0.resid_out", "add", torch.tensor([float("nan")] * 64))
    with pytest.raises(ConfigError, match="out of range"):
        validate(dropping(lm, "L3"), lm)
    with pytest.raises(ConfigError, match="leaves no model"):
        validate(dropping(lm, "L0", "L1", "L2"), lm)


def test_a_recipe_for_another_model_is_refused(lm, sparse):
    other = actlab.load_model("tiny-mistral")
    with pytest.raises(ConfigError, match="calibrated for .*not for this model"):
        with attach(other, sparse):
            pass


# -- attach -----------------------------------------------------------------------------------------

def test_attach_restores_the_model_bit_for_bit_also_on_errors(lm, sparse):
    model = lm.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keys, impl = set(vars(model)), model.config._attn_implementation
    reference = _logits(lm)
    composed = compose(only_layer(sparse, 0), steering(lm), dropping(lm, "L2.attn"))
    with pytest.raises(RuntimeError, match="boom"):
        with attach(lm, composed):
            assert not torch.equal(_logits(lm), reference)
            raise RuntimeError("boom")
    assert _hooks_left(model) == 0 and set(vars(model)) == keys and model.config._attn_implementation == impl
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(_logits(lm), reference)


def test_saving_inside_attach_warns_that_the_transform_is_not_saved(lm, sparse, tmp_path):
    with attach(lm, sparse), pytest.warns(UserWarning, match="saves the model without"):
        lm.model.save_pretrained(tmp_path / "m")
    assert "save_pretrained" not in vars(lm.model)


# -- composition ------------------------------------------------------------------------------------

def test_composition_applies_members_in_order(lm, sparse, tmp_path):
    """A saved and reloaded composition equals attaching its members one inside the other."""
    parts = [only_layer(sparse, 0), steering(lm), dropping(lm, "L1.mlp")]
    path = tmp_path / "composed.yaml"
    compose(parts).save(path)
    loaded = load_recipe(path)
    assert [type(p) for p in loaded.recipes] == [type(p) for p in parts]
    with attach(lm, loaded) as att:
        together = _logits(lm)
    assert 0.05 < att.summary(lm)["achieved_sparsity"] < 0.3  # one layer of three
    with attach(lm, parts[0]), attach(lm, parts[1]), attach(lm, parts[2]):
        nested = _logits(lm)
    assert torch.equal(together, nested)


def test_compositions_that_cannot_stack_are_refused(lm, sparse):
    with pytest.raises(ConfigError, match="a rule on a dropped layer"):
        validate(compose(sparse, dropping(lm, "L1")), lm)
    with pytest.raises(ConfigError, match="a rule on a dropped layer"):
        validate(compose(dropping(lm, "L0.attn"), steering(lm, site="L0.o_in", op="zero")), lm)
    with pytest.raises(ConfigError, match="both mask L0.q_in"):
        validate(compose(sparse, sparse), lm)
    with pytest.raises(ConfigError, match="both replace L1.resid_out"):
        validate(compose(steering(lm, op="zero"), steering(lm)), lm)
    validate(compose(steering(lm), steering(lm)), lm)  # two additions stack
    other = actlab.load_model("tiny-qwen2")
    with pytest.raises(ConfigError, match="not for this model"):
        validate(compose(sparse, steering(other)), lm)


# -- costs ------------------------------------------------------------------------------------------

def test_dense_cost_counts_every_parameter_once(lm):
    cost = cost_of(lm, None)
    assert cost.params == sum(p.numel() for p in lm.model.parameters())  # tied head counted once
    ad = lm.adapter
    linear = sum(lin.num_params for layer in ad.layers for lin in layer.linears.values())
    norms = sum(p.numel() for n, p in lm.model.named_parameters() if "norm" in n)
    assert cost.weight_bytes_per_token == 4 * (linear + ad.lm_head.weight.numel() + ad.hidden_size + norms)
    assert cost.kv_bytes_per_token == 4 * 2 * ad.num_layers * ad.num_kv_heads * ad.head_dim
    assert cost.weight_bytes_saved == cost.kv_bytes_saved == cost.params_saved == 0.0


def test_costs_compose(lm, sparse):
    ad = lm.adapter
    dense = cost_of(lm, None)
    linear_bytes = 4 * sum(lin.num_params for layer in ad.layers for lin in layer.linears.values())
    s = cost_of(lm, sparse)
    expect = linear_bytes * sparse.predicted["effective"]
    assert dense.weight_bytes_per_token - s.weight_bytes_per_token == pytest.approx(expect, rel=1e-9)
    assert s.params == dense.params and s.kv_bytes_per_token == dense.kv_bytes_per_token
    drop = dropping(lm, "L1", "L2.attn")
    removed = sum(lin.num_params for lin in ad.layers[1].linears.values()) + \
        sum(ad.layers[2].linears[r].num_params for r in ("q", "k", "v", "o"))
    d = cost_of(lm, drop)
    assert dense.params - d.params == removed
    assert d.kv_bytes_per_token == dense.kv_bytes_per_token / 3
    both = cost_of(lm, compose(drop, only_layer(sparse, 0)))
    kept_l0 = 4 * sum(lin.num_params * sparse.predicted[f"L0.{r}"] for r, lin in ad.layers[0].linears.items())
    assert d.weight_bytes_per_token - both.weight_bytes_per_token == pytest.approx(kept_l0, rel=1e-9)


def test_editor_and_recipes_share_one_mechanism(lm):
    """A steering recipe is exactly the probe's write hook with the same operation."""
    recipe = steering(lm)
    edit = recipe.edits[0]
    with Editor(lm, [Edit(edit.site, add(edit.value, edit.coeff))]):
        manual = _logits(lm)
    with attach(lm, recipe):
        assert torch.equal(_logits(lm), manual)
