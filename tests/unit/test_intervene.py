"""The intervention API: every operation against a hand-written hook (patching against hidden states captured
independently by plain hooks), bit-identical restore, HF generate and the decode engine under one steering
edit, clear errors."""

from __future__ import annotations

import math

import pytest
import torch

import actlab
from actlab.engine.decode import DecodeEngine
from actlab.engine.reference import greedy_reference, prompt_ids
from actlab.errors import ConfigError
from actlab.transforms.steer import (
    InterventionRecipe,
    SiteEdit,
    add,
    intervene,
    mean,
    patch,
    record,
    replace,
    scale,
    site_means,
    zero,
)

CLEAN = (torch.arange(24).remainder(180) + 7)[None]
CORRUPT = (torch.arange(24).remainder(180) + 60)[None]


def _logits(lm, ids=CLEAN):
    with torch.no_grad():
        return lm.model(input_ids=ids).logits


def _hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _layer_output(lm, ids, layer):
    """The residual stream leaving `layer`, caught by a plain forward hook (output_hidden_states would leave
    transformers' own recording hooks on the model)."""
    seen = []
    handle = lm.adapter.layers[layer].module.register_forward_hook(
        lambda m, a, out: seen.append((out[0] if isinstance(out, tuple) else out).detach().clone()))
    try:
        _logits(lm, ids)
    finally:
        handle.remove()
    return seen[0]


def _manual(lm, module, fn, ids, pre=False):
    if pre:
        handle = module.register_forward_pre_hook(lambda m, a: (fn(a[0]), *a[1:]))
    else:
        handle = module.register_forward_hook(
            lambda m, a, out: (fn(out[0]), *out[1:]) if isinstance(out, tuple) else fn(out))
    try:
        return _logits(lm, ids)
    finally:
        handle.remove()


def test_residual_patch_at_one_position_equals_a_hook_fed_independent_hidden_states(tiny):
    """Patch clean L{i}.resid_out into the corrupted run at one position; the reference hook takes the clean value
    from a plain hook on the layer."""
    i, pos = 0, 5
    clean_hidden = _layer_output(tiny, CLEAN, i)

    def put(x):
        x = x.clone()
        x[:, pos] = clean_hidden[:, pos]
        return x

    want = _manual(tiny, tiny.adapter.layers[i].module, put, CORRUPT)
    source = record(tiny, CLEAN, [f"L{i}.resid_out"])[f"L{i}.resid_out"]
    torch.testing.assert_close(source, clean_hidden, rtol=0, atol=0)
    with intervene(tiny, {f"L{i}.resid_out": patch(source, positions=[pos])}):
        got = _logits(tiny, CORRUPT)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, _logits(tiny, CORRUPT))


def test_head_patch_and_neuron_zero_equal_hand_written_hooks(tiny_llama):
    lm, ad = tiny_llama, tiny_llama.adapter
    head, hd = 1, ad.head_dim
    o_proj = ad.layers[1].linears["o"].module
    seen = {}
    handle = o_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("clean", a[0].detach().clone()))
    _logits(lm, CLEAN)
    handle.remove()

    def put(x):
        x = x.clone()
        x[..., head * hd:(head + 1) * hd] = seen["clean"][..., head * hd:(head + 1) * hd]
        return x

    want = _manual(lm, o_proj, put, CORRUPT, pre=True)
    source = record(lm, CLEAN, ["L1.o_in"])["L1.o_in"]
    with intervene(lm, {"L1.attn.head1": patch(source)}):
        got = _logits(lm, CORRUPT)
    torch.testing.assert_close(got, want, rtol=0, atol=0)

    def kill(x):
        x = x.clone()
        x[..., [3, 17]] = 0
        return x

    want = _manual(lm, ad.layers[0].act_fn, kill, CLEAN)
    with intervene(lm, {"L0.act[3,17]": zero()}):
        got = _logits(lm, CLEAN)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_mean_ablation_uses_the_mean_over_every_position(tiny_llama):
    windows = torch.stack([CLEAN[0], CORRUPT[0]])
    means = site_means(tiny_llama, windows, ["L0.resid_out"], batch_size=1)["L0.resid_out"]
    states = _layer_output(tiny_llama, windows, 0)
    torch.testing.assert_close(means, states.double().mean((0, 1)).float(), rtol=1e-6, atol=1e-6)
    want = _manual(tiny_llama, tiny_llama.adapter.layers[0].module,
                   lambda x: x.index_copy(-1, torch.tensor([4]), means[4].expand(*x.shape[:-1], 1).to(x.dtype)), CLEAN)
    with intervene(tiny_llama, {"L0.resid_out[4]": mean(means[[4]])}):
        got = _logits(tiny_llama)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_every_operation_restores_the_model_bit_identically(tiny):
    ad = tiny.adapter
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    reference = _logits(tiny)
    hooks = _hooks_left(tiny.model)  # some families register their own
    d = ad.hidden_size
    v = torch.randn(d, generator=torch.Generator().manual_seed(1))
    ops = {"L0.resid_out": [add(v, 3.0, positions=[-1]), scale(0.5)], f"L{ad.num_layers - 1}.mlp_in": replace(v),
           "L0.o_in.head0": zero(), ("L0.moe_out[1,2]" if ad.layers[0].moe else "L0.down_in[1,2]"): mean(torch.ones(2)),
           "L0.resid_in": patch(record(tiny, CORRUPT, ["L0.resid_in"])["L0.resid_in"])}
    with intervene(tiny, ops):
        changed = _logits(tiny)
    assert not torch.equal(changed, reference)
    with pytest.raises(RuntimeError, match="boom"), intervene(tiny, ops):
        raise RuntimeError("boom")
    assert _hooks_left(tiny.model) == hooks
    assert all(torch.equal(before[k], t) for k, t in tiny.model.state_dict().items())
    assert torch.equal(_logits(tiny), reference)


def _steering(lm, layer, coeff=6.0, positions=None):
    v = torch.randn(lm.adapter.hidden_size, generator=torch.Generator().manual_seed(3))
    v = v / v.norm() * 4
    return InterventionRecipe("manual", lm.identity.to_dict(),
                              [SiteEdit(f"L{layer}.resid_out", "add", v, coeff, positions=positions)])


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-qwen2", "tiny-gpt2", "tiny-phi3"])
def test_steering_in_the_engine_equals_generate_under_the_intervention(name):
    lm = actlab.load_model(name)
    ids = prompt_ids(lm, 16)
    recipe = _steering(lm, lm.adapter.num_layers // 2)
    with intervene(lm, {e.site: e for e in recipe.edits}):
        reference = greedy_reference(lm, ids, 24)
        steered_generate = lm.model.generate(torch.tensor([ids]), max_new_tokens=24, min_new_tokens=24,
                                             do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    assert reference != greedy_reference(lm, ids, 24)  # the steering changes the tokens
    assert steered_generate == reference
    assert DecodeEngine(lm, recipe, max_len=64).generate(ids, 24).tokens == reference
    # positions: only the last prompt token and every new one (one token per decode call)
    late = _steering(lm, 0, positions=[-1])
    with intervene(lm, {e.site: e for e in late.edits}):
        reference = greedy_reference(lm, ids, 16)
    assert DecodeEngine(lm, late, max_len=64).generate(ids, 16).tokens == reference


def test_the_engine_refuses_interventions_off_the_residual_stream(tiny_llama):
    recipe = InterventionRecipe("manual", tiny_llama.identity.to_dict(), [SiteEdit("L0.o_in", "zero", heads=[0])])
    with pytest.raises(ConfigError, match="residual stream"):
        DecodeEngine(tiny_llama, recipe)


def test_bad_interventions_are_one_line_errors(tiny_llama):
    d = tiny_llama.adapter.hidden_size
    hooks = _hooks_left(tiny_llama.model)
    cases = [({"L9.resid_out": zero()}, r"unknown site 'L9.resid_out'.*resid_out"),
             ({"L0.resid_out": add(torch.ones(d + 1))}, f"has {d + 1} values, the site has {d} channels"),
             ({"L0.o_in.head0": add(torch.ones(d))}, "channels per head"),
             ({"L0.resid_out.head0": zero()}, "has no heads"),
             ({"L0.o_in.head99": zero()}, "head 99 out of range"),
             ({"L0.act[999]": zero()}, "channel 999 out of range"),
             ({"L0.resid_out": "zero"}, "not an intervention"),
             ({"L0.attn_probs": zero()}, "read but not edited"),
             ({"L0.resid_out": patch(torch.ones(1, 3, d + 2))}, "patch source has"),
             ({"L0 resid_out!": zero()}, "unknown site")]
    for ops, message in cases:
        with pytest.raises(ConfigError, match=message):
            intervene(tiny_llama, ops)
    with pytest.raises(ConfigError, match="coeff must be a finite number"):
        add(torch.ones(d), math.nan)
    with pytest.raises(ConfigError, match="NaN or infinite"):
        add(torch.full((d,), math.inf))
    with pytest.raises(ConfigError, match="unknown intervention"):
        SiteEdit("L0.resid_out", "double")
    short = patch(record(tiny_llama, CLEAN[:, :4], ["L0.resid_out"])["L0.resid_out"])
    with pytest.raises(ConfigError, match="needs positions up to 24"), intervene(tiny_llama, {"L0.resid_out": short}):
        _logits(tiny_llama)
    assert _hooks_left(tiny_llama.model) == hooks
