"""KV recipes on HF models (the masked reference): the kept sets follow each press's rule on the model's own
attention, a masked cache computes what a cache that really drops those tokens computes, the budgets are met,
and the model is unchanged afterwards."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import DynamicCache

import actlab
from actlab.errors import ConfigError
from actlab.models.compat import output_cache, with_cache
from actlab.probe import run_with_cache
from actlab.transforms import attach, compose
from actlab.transforms.base import NoCalibration
from actlab.transforms.kv import KVRecipe, get_method
from actlab.transforms.kv.budgets import keep_counts, pyramid, visible_tokens
from actlab.transforms.kv.session import SESSION, running_budget

PROMPT = 40
FULL_ATTENTION = ["tiny-llama", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-olmo2", "tiny-gpt-neox"]


def prompt(lm, n=PROMPT, seed=0):
    return torch.randint(0, lm.adapter.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def recipe(lm, name, ratio=0.5, **params):
    if name in ("snapkv", "pyramidkv"):
        params.setdefault("window", 8)
    return get_method(name, **params).calibrate(NoCalibration(lm), ratio)


def session_of(lm):
    return lm.adapter.layers[0].attn.__dict__[SESSION]


def top(scores, keep):  # highest first, ties to the earlier position
    return sorted(sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:keep])


def expected_kept(name, lm, ids, keep):
    """Each layer's and KV head's kept positions after the prompt, from the press's rule written with loops over
    the model's own attention probabilities (actlab's attn_probs site) and its cached keys."""
    ad = lm.adapter
    _, recorded = run_with_cache(lm, ids, "L*.attn_probs")
    cache = output_cache(lm.model(ids, use_cache=True))
    group = ad.num_heads // ad.num_kv_heads
    t = ids.shape[1]
    out = {}
    for i in range(ad.num_layers):
        probs = recorded[f"L{i}.attn_probs"][0].double()  # [H, T, T]
        for kv in range(ad.num_kv_heads):
            rows = probs[kv * group:(kv + 1) * group].mean(0)  # [T, T]
            if name == "streaming-llm":
                scores = [math.inf if p < 4 else p for p in range(t)]
            elif name == "knorm":
                scores = [-float(cache.layers[i].keys[0, kv, p].norm()) for p in range(t)]
            elif name == "tova":  # the layer's every head
                scores = (probs[:, -1].mean(0)).tolist()
                scores[-1] = math.inf
            elif name == "h2o":
                acc = rows.sum(0).tolist()
                scores = [math.inf if p >= t - keep // 2 else acc[p] for p in range(t)]
            elif name == "snapkv":
                mass = rows[-8:].mean(0)
                scores = [math.inf if p >= t - 8 else float(mass[max(0, p - 2): min(p + 3, t - 8)].sum()) / 5
                          for p in range(t)]
            out[i, kv] = top(scores, keep)
    return out


@pytest.mark.parametrize("name", ["streaming-llm", "knorm", "tova", "h2o", "snapkv"])
def test_the_kept_sets_follow_each_press_on_the_models_attention(tiny_llama, name):
    lm = tiny_llama
    ids = prompt(lm)
    keep = int(PROMPT * 0.5)
    with attach(lm, recipe(lm, name, 0.5)):
        lm.model(ids, use_cache=True)
        state = session_of(lm).layers
        kept = {(i, kv): state[i].alive[0, kv].nonzero().flatten().tolist()
                for i in state for kv in range(lm.adapter.num_kv_heads)}
    expected = expected_kept(name, lm, ids, keep)
    for key, positions in expected.items():
        assert kept[key] == positions, (name, key)
        assert len(kept[key]) == keep  # the ratio, exactly (kvpress's count per head)


def physical_cache(lm, dense_cache, kept):
    """A cache that holds only the kept tokens of each head (the same count in every head, so a dense tensor)."""
    cache = DynamicCache()
    for i, entry in enumerate(dense_cache.layers):
        index = kept[i][None, :, :, None].expand(-1, -1, -1, entry.keys.shape[-1])
        cache.update(entry.keys.gather(2, index), entry.values.gather(2, index), i)
    return cache


@pytest.mark.parametrize("model", FULL_ATTENTION)
@pytest.mark.parametrize("name", ["snapkv", "knorm"])
def test_the_masked_cache_computes_what_a_cache_without_those_tokens_computes(model, name):
    lm = actlab.load_model(model)
    ids = prompt(lm)
    follow = prompt(lm, 5, seed=1)[0]
    with attach(lm, recipe(lm, name, 0.5)):
        cache = output_cache(lm.model(ids, use_cache=True))
        state = session_of(lm).layers
        kept = {i: state[i].alive[0].nonzero()[:, 1].view(lm.adapter.num_kv_heads, -1) for i in state}
        masked = []
        for token in follow:
            masked.append(lm.model(token.view(1, 1), **with_cache(lm.model, cache), use_cache=True).logits[0, -1])
    dense_cache = output_cache(lm.model(ids, use_cache=True))
    cache = physical_cache(lm, dense_cache, kept)
    for step, token in enumerate(follow):
        position = torch.tensor([[PROMPT + step]])
        logits = lm.model(token.view(1, 1), position_ids=position, **with_cache(lm.model, cache),
                          use_cache=True).logits[0, -1]
        torch.testing.assert_close(masked[step], logits, atol=2e-5, rtol=1e-4)


def test_a_model_leaves_the_recipe_bit_identical_and_dense_before_any_eviction(tiny_llama):
    lm = tiny_llama
    ids = prompt(lm)
    state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    plain = lm.model(ids).logits
    with attach(lm, recipe(lm, "h2o", 0.75)):
        assert lm.model.config._attn_implementation == "actlab_kv"
        hooked = lm.model(ids).logits  # the prompt itself attends before it is compressed
    assert torch.equal(plain, hooked)
    assert lm.model.config._attn_implementation == "sdpa"
    assert all(SESSION not in layer.attn.__dict__ for layer in lm.adapter.layers)
    assert all(torch.equal(v, state[k]) for k, v in lm.model.state_dict().items())
    assert torch.equal(lm.model(ids).logits, plain)


@pytest.mark.parametrize("name", ["streaming-llm", "knorm"])
def test_decode_phase_evicts_to_a_running_budget(tiny_llama, name):
    """After every forward each head holds max(1, int(seen * (1 - ratio))) tokens: the lowest-scored go, one
    step at a time, as a loop over the steps does it."""
    lm = tiny_llama
    ids = prompt(lm, 16)
    follow = prompt(lm, 12, seed=2)[0]
    r = recipe(lm, name, 0.5, phase="decode")
    with attach(lm, r):
        cache = output_cache(lm.model(ids, use_cache=True))
        for token in follow:
            cache = output_cache(lm.model(token.view(1, 1), **with_cache(lm.model, cache), use_cache=True))
        state = session_of(lm).layers
    total = ids.shape[1] + len(follow)
    full = cache  # the masked cache keeps every token's key (each as the compressed run computed it)
    for i in range(lm.adapter.num_layers):
        for kv in range(lm.adapter.num_kv_heads):
            if name == "knorm":
                score = [-float(full.layers[i].keys[0, kv, p].norm()) for p in range(total)]
            else:
                score = [math.inf if p < 4 else p for p in range(total)]
            held = top(score[:16], 8)
            for t in range(17, total + 1):  # a forward that ends at t: the new token joins, the budget is t // 2
                held = sorted(sorted(held + [t - 1], key=lambda p: (-score[p], p))[: int(t * 0.5)])
            assert state[i].alive[0, kv].nonzero().flatten().tolist() == held, (i, kv)


def test_per_head_budgets_are_ragged_and_average_to_the_ratio(tiny_llama):
    lm = tiny_llama
    ad = lm.adapter
    ratios = pyramid(ad.num_layers, ad.num_kv_heads, 0.5)
    ratios[:, 0] = 0.0  # one head keeps everything
    r = KVRecipe("manual", lm.identity.to_dict(), ratio=0.5, press="knorm", head_ratios=ratios)
    with attach(lm, r):
        lm.model(prompt(lm), use_cache=True)
        state = session_of(lm).layers
        for i in range(ad.num_layers):
            held = state[i].alive[0].sum(-1)
            assert held.tolist() == keep_counts(ratios[i], PROMPT).tolist()
            assert held[0] == PROMPT
    assert pyramid(30, 3, 0.75)[:, 0].mean().item() == pytest.approx(0.75)
    assert (pyramid(30, 3, 0.75)[:, 0].diff() > 0).all()  # upper layers keep less


def test_sliding_window_layers_keep_their_share_of_the_window():
    lm = actlab.load_model("tiny-gemma3")  # sliding layers of window 8, then a global layer
    ad = lm.adapter
    with attach(lm, recipe(lm, "knorm", 0.5)):
        lm.model(prompt(lm), use_cache=True)
        state = session_of(lm).layers
        for layer in ad.layers:
            window = ad.sliding_window(layer)
            visible = visible_tokens(PROMPT, window)
            held = state[layer.index].alive[0, :, PROMPT - visible:].sum(-1)
            assert held.tolist() == [int(visible * 0.5)] * ad.num_kv_heads
            assert (window is None) == (visible == PROMPT)


def test_running_budget_compresses_a_prefill_recipe_as_the_cache_grows(tiny_llama):
    lm = tiny_llama
    ids = prompt(lm, 64)
    with attach(lm, recipe(lm, "streaming-llm", 0.75)), running_budget():
        cache = None
        for start in range(0, 64, 16):
            kwargs = with_cache(lm.model, cache) if cache is not None else {}
            cache = output_cache(lm.model(ids[:, start:start + 16], use_cache=True, **kwargs))
            held = session_of(lm).layers[0].alive[0].sum(-1)
            assert held.tolist() == [int((start + 16) * 0.25)] * lm.adapter.num_kv_heads


def test_kivi_quantizes_complete_groups_in_the_cache(tiny_llama):
    from actlab.transforms.kv.kivi import quantize_keys, quantize_values

    lm = tiny_llama
    ids = prompt(lm, 37)
    dense = output_cache(lm.model(ids, use_cache=True))
    with attach(lm, get_method("kivi", bits=4, group=16).calibrate(NoCalibration(lm), 0.0)):
        cache = output_cache(lm.model(ids, use_cache=True))
    for i, entry in enumerate(cache.layers):
        k, v = dense.layers[i].keys, dense.layers[i].values
        for g in (0, 16):  # complete groups: keys per channel over the group's tokens, values per token
            torch.testing.assert_close(entry.keys[:, :, g:g + 16], quantize_keys(k[:, :, g:g + 16], 4))
            torch.testing.assert_close(entry.values[:, :, g:g + 16], quantize_values(v[:, :, g:g + 16], 4, 16))
        assert torch.equal(entry.keys[:, :, 32:], k[:, :, 32:])  # the incomplete group stays in full precision
        err = (entry.keys[:, :, :32] - k[:, :, :32]).abs()
        span = k[:, :, :32].amax(2, keepdim=True) - k[:, :, :32].amin(2, keepdim=True)
        assert bool((err <= span / 15 / 2 * 1.01 + 1e-6).all())  # within half a step of the 4-bit grid


def test_a_quantizing_and_an_evicting_recipe_compose_but_two_evicting_ones_do_not(tiny_llama):
    lm = tiny_llama
    evict, again = recipe(lm, "snapkv"), recipe(lm, "knorm")
    quant = get_method("kivi", bits=8).calibrate(NoCalibration(lm), 0.0)
    with attach(lm, compose(evict, quant)):
        lm.model(prompt(lm), use_cache=True)
        s = session_of(lm)
        assert s.evict is evict and s.quant is quant
    with pytest.raises(ConfigError, match="both mask kv-cache"):
        with attach(lm, compose(evict, again)):
            pass


def test_bad_kv_input_is_a_one_line_error(tiny_llama):
    lm = tiny_llama
    with pytest.raises(ConfigError, match="--ratio"):
        recipe(lm, "knorm", 1.0)
    with pytest.raises(ConfigError, match="--ratio"):
        recipe(lm, "knorm", -0.2)
    with pytest.raises(ConfigError, match="phase"):
        get_method("knorm", phase="sometimes")
    with pytest.raises(ConfigError, match="bits"):
        get_method("snapkv", bits=3)
    with pytest.raises(ConfigError, match="unknown kv method"):
        get_method("nope")
    with pytest.raises(ConfigError, match="bad parameters"):
        get_method("knorm", window=3)
    bad = KVRecipe("manual", lm.identity.to_dict(), ratio=0.5, press="knorm", head_ratios=torch.zeros(2, 2) + 0.5)
    with pytest.raises(ConfigError, match="head_ratios"):
        with attach(lm, bad):
            pass
    with pytest.raises(ConfigError, match="head_ratios"):
        KVRecipe("manual", {}, ratio=0.5, head_ratios=torch.ones(3, 2))
    with pytest.raises(ConfigError, match="kivi"):
        get_method("kivi", bits=0)
    from actlab.transforms.layers import LayerRecipe

    no_attention = LayerRecipe("manual", lm.identity.to_dict(), [f"L{i}.attn" for i in range(lm.adapter.num_layers)])
    with pytest.raises(ConfigError, match="no KV cache left"):
        with attach(lm, compose(no_attention, recipe(lm, "knorm"))):
            pass
    with attach(lm, compose(LayerRecipe("manual", lm.identity.to_dict(), ["L1.attn"]), recipe(lm, "knorm"))):
        lm.model(prompt(lm), use_cache=True)  # attention left in other layers: their cache is compressed


def test_a_kv_recipe_saves_loads_and_costs(tiny_llama, tmp_path):
    from actlab.transforms import cost_of, load_recipe

    lm = tiny_llama
    r = recipe(lm, "pyramidkv", 0.75, bits=4, group=16)
    r.save(tmp_path / "kv.json")
    back = load_recipe(str(tmp_path / "kv.json"))
    assert back.describe() == r.describe() and torch.equal(back.head_ratios, r.head_ratios)
    cost = cost_of(lm, back)
    dense = cost_of(lm, None)
    bits = (4 + 32 / 16) / 32
    assert cost.kv_bytes_per_token == pytest.approx(dense.kv_bytes_per_token * 0.25 * bits)
    assert cost.weight_bytes_per_token == dense.weight_bytes_per_token


def test_chunked_perplexity_equals_one_forward_and_compression_costs_loss(tiny_llama):
    from actlab.eval.perplexity import perplexity

    lm = tiny_llama
    ids = torch.cat([prompt(lm, 96, seed=s) for s in range(2)])
    whole = perplexity(lm, ids, progress=False)
    chunked = perplexity(lm, ids, progress=False, chunk=16)
    assert chunked.window_nll == pytest.approx(whole.window_nll, rel=1e-5)
    with attach(lm, recipe(lm, "streaming-llm", 0.75)) as attached:
        squeezed = perplexity(lm, ids, progress=False, chunk=16)
        kept = attached.summary(lm)["kv_kept_fraction"]
    assert squeezed.nll != pytest.approx(whole.nll, rel=1e-6)  # the budget bites as the cache grows
    assert 0.25 <= kept < 0.5  # held to a quarter after every chunk; a chunk's own tokens wait for the next


def test_the_kv_command_saves_a_recipe_and_measures_compressed_perplexity(tmp_path):
    from actlab.jobs.kv import kv_job

    out = kv_job("tiny-llama", save=str(tmp_path / "h2o.json"), method="h2o", ratio=0.5, phase="decode",
                 seq_len=64, windows=2, chunk=8, log=lambda m: None, progress=False)
    assert out["recipe"] == "kv:h2o[h2o@0.5/decode]" and (tmp_path / "h2o.json").is_file()
    assert out["cost"]["kv_bytes_saved"] == pytest.approx(0.5)
    assert out["ppl"] > 0 and out["dense_ppl"] > 0 and out["ppl"] != out["dense_ppl"]
