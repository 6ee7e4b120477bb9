"""Probe engine: named sites, hooks that never change the model, exact attention probabilities."""

from __future__ import annotations

import pytest
import torch

import actlab
from actlab.errors import ConfigError
from actlab.probe import Probe, all_sites, select_sites
from actlab.probe.attention import sampled_queries

IDS = torch.arange(4, 4 + 40).remainder(250)[None] + 4


def _hooks_left(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_site_names_are_uniform(tiny):
    names = {s.name for s in all_sites(tiny.adapter)}
    for layer in tiny.adapter.layers:
        mlp = ("router", "routing", "moe_out") if layer.moe else ("gate", "act", "down_in")
        for kind in ("resid_in", "attn_in", "v", "attn_probs", "o_in", "resid_mid", "mlp_in", *mlp, "resid_out"):
            assert f"L{layer.index}.{kind}" in names
        assert (f"L{layer.index}.up" in names) == (layer.gated_mlp and not layer.moe)
    assert {"final_norm", "logits"} <= names


def test_select_by_pattern(tiny_llama):
    chosen = [s.name for s in select_sites(tiny_llama.adapter, "L*.down_in, L1.gate")]
    assert chosen == ["L0.down_in", "L1.gate", "L1.down_in", "L2.down_in"]  # forward order
    default = [s.name for s in select_sites(tiny_llama.adapter, None)]
    assert "L0.resid_in" in default and "L1.resid_in" not in default
    with pytest.raises(ConfigError, match="match no site"):
        select_sites(tiny_llama.adapter, "L*.nonsense")


def test_model_is_bit_identical_after_probe(tiny):
    model = tiny.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attn_impl = model.config._attn_implementation
    with torch.no_grad():
        reference = model(IDS).logits
    seen = []
    with Probe(tiny, all_sites(tiny.adapter), lambda site, x: seen.append(site.name), query_stride=3):
        with torch.no_grad():
            during = model(IDS).logits
    assert torch.equal(during, reference), "hooks must not change the forward"
    assert _hooks_left(model) == 0
    assert model.config._attn_implementation == attn_impl
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert len(set(seen)) == len(all_sites(tiny.adapter))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference)


def test_hooks_removed_on_exception(tiny_llama):
    def explode(site, x):
        raise RuntimeError("statistic failed")

    with pytest.raises(RuntimeError, match="statistic failed"):
        with Probe(tiny_llama, all_sites(tiny_llama.adapter), explode):
            tiny_llama.model(IDS)
    assert _hooks_left(tiny_llama.model) == 0
    assert tiny_llama.model.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("stride", [1, 4])
def test_attention_rows_equal_eager_attention(tiny, stride):
    """Probabilities from the probing attention == eager attention's weights (sampled rows)."""
    model = tiny.model
    eager = {}
    handles = [layer.attn.register_forward_hook(lambda m, a, o, i=layer.index: eager.__setitem__(i, o[1]))
               for layer in tiny.adapter.layers]
    previous = model.config._attn_implementation  # sdpa, or eager for models that need it (Gemma-2)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            model(IDS)
    finally:
        model.set_attn_implementation(previous)
        for h in handles:
            h.remove()
    probed = {}
    sites = [s for s in all_sites(tiny.adapter) if s.kind == "attn_probs"]
    with Probe(tiny, sites, lambda site, x: probed.__setitem__(site.layer, x), query_stride=stride):
        with torch.no_grad():
            model(IDS)
    rows = sampled_queries(IDS.shape[1], stride)
    for layer, weights in eager.items():
        torch.testing.assert_close(probed[layer], weights[:, :, rows].float(), rtol=1e-5, atol=1e-6)


def test_down_in_is_act_times_up(tiny):
    got = {}
    with Probe(tiny, all_sites(tiny.adapter), lambda s, x: got.__setitem__(s.name, x)):
        with torch.no_grad():
            tiny.model(IDS)
    for layer in tiny.adapter.layers:
        if layer.moe:  # no single intermediate: the routing and the MLP output instead
            x = got[f"L{layer.index}.mlp_in"]
            torch.testing.assert_close(got[f"L{layer.index}.routing"], layer.moe.routing(x.reshape(-1, x.shape[-1])))
            torch.testing.assert_close(got[f"L{layer.index}.moe_out"], layer.moe.apply(x))
            continue
        expect = got[f"L{layer.index}.act"]
        if layer.gated_mlp:
            expect = expect * got[f"L{layer.index}.up"]
        torch.testing.assert_close(got[f"L{layer.index}.down_in"], expect)
        torch.testing.assert_close(got[f"L{layer.index}.act"], layer.act_fn(got[f"L{layer.index}.gate"]))


def test_v_and_o_in_have_head_layout(tiny):
    ad = tiny.adapter
    got = {}
    with Probe(tiny, select_sites(ad, "L0.v,L0.o_in,L0.attn_in"), lambda s, x: got.__setitem__(s.kind, x)):
        with torch.no_grad():
            tiny.model(IDS)
    assert got["v"].shape == (IDS.numel(), ad.num_kv_heads, ad.head_dim)
    assert got["o_in"].shape == (IDS.numel(), ad.num_heads, ad.head_dim)
    v_ref = ad.layers[0].head_projections["v"].apply(got["attn_in"]).reshape(-1, ad.num_kv_heads, ad.head_dim)
    torch.testing.assert_close(got["v"], v_ref)


def test_tiny_models_are_deterministic():
    a, b = actlab.load_model("tiny-qwen3"), actlab.load_model("tiny-qwen3")
    assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))


def test_probe_takes_site_names_and_run_with_cache_matches_hf_hidden_states(tiny_llama):
    from actlab.probe import run_with_cache

    ids = (torch.arange(24) % 200 + 5)[None]
    names = [f"L{i}.resid_out" for i in range(tiny_llama.adapter.num_layers)]
    logits, cache = run_with_cache(tiny_llama, ids, "L*.resid_out")
    with torch.no_grad():
        out = tiny_llama.model(ids, output_hidden_states=True)
    torch.testing.assert_close(logits, out.logits)
    assert sorted(cache) == sorted(names)
    for i in range(tiny_llama.adapter.num_layers - 1):  # HF's last hidden state is after the final norm
        torch.testing.assert_close(cache[f"L{i}.resid_out"], out.hidden_states[i + 1])
    with Probe(tiny_llama, "L0.down_in") as probe, torch.no_grad():
        tiny_llama.model(ids)
        tiny_llama.model(ids)
    assert list(probe.cache) == ["L0.down_in"] and len(probe.cache["L0.down_in"]) == 2
    with pytest.raises(ConfigError, match="match no site"):
        Probe(tiny_llama, "L0.nope")
