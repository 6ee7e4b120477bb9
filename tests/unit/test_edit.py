"""Write hooks: every operation against a hand-written hook, per head and per position (also through a KV
cache), always removed, and clear errors for sites that cannot be edited."""

from __future__ import annotations

import pytest
import torch

from actlab.errors import ConfigError
from actlab.models.compat import output_cache, with_cache
from actlab.probe.edit import Edit, Editor, add, replace, scale, zero
from actlab.probe.sites import all_sites

IDS = (torch.arange(30).remainder(200) + 5)[None]


def _hooks_left(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _logits(lm, ids=IDS):
    with torch.no_grad():
        return lm.model(ids).logits


def _with_hook(lm, module, fn, pre: bool):
    handle = module.register_forward_pre_hook(lambda m, a: (fn(a[0]), *a[1:])) if pre else \
        module.register_forward_hook(lambda m, a, out: fn(out))
    try:
        return _logits(lm)
    finally:
        handle.remove()


def test_add_at_residual_equals_manual_hook(tiny):
    layer = tiny.adapter.layers[-1]
    v = torch.randn(tiny.adapter.hidden_size, generator=torch.Generator().manual_seed(0))

    def manual(out):
        if isinstance(out, tuple):
            return (out[0] + 2.0 * v, *out[1:])
        return out + 2.0 * v

    want = _with_hook(tiny, layer.module, manual, pre=False)
    with Editor(tiny, [Edit(f"L{layer.index}.resid_out", add(v, 2.0))]):
        got = _logits(tiny)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.allclose(got, _logits(tiny))
    assert _hooks_left(tiny.model) == 0


def test_zero_one_head_equals_zeroing_its_slice_of_the_o_input(tiny):
    ad = tiny.adapter
    layer, head = ad.layers[0], 1
    lo, hi = head * ad.head_dim, (head + 1) * ad.head_dim

    def manual(x):
        x = x.clone()
        x[..., lo:hi] = 0
        return x

    want = _with_hook(tiny, layer.linears["o"].module, manual, pre=True)
    with Editor(tiny, [Edit("L0.o_in", zero(), heads=[head])]):
        got = _logits(tiny)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_scale_and_replace_at_chosen_positions(tiny_llama):
    width = tiny_llama.adapter.intermediate_size
    factor = torch.linspace(0.5, 1.5, width)
    value = torch.full((width,), 0.25)

    def manual(x):
        x = x.clone()
        x[:, 3] = x[:, 3] * factor
        x[:, -1] = value
        return x

    want = _with_hook(tiny_llama, tiny_llama.adapter.layers[1].linears["down"].module, manual, pre=True)
    with Editor(tiny_llama, [Edit("L1.down_in", scale(factor), positions=[3]),
                             Edit("L1.down_in", replace(value), positions=[-1])]):
        got = _logits(tiny_llama)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_positions_are_absolute_through_a_kv_cache(tiny_llama):
    """Edit position 20 only: a full forward and a prompt + one-token-at-a-time decode agree."""
    v = torch.randn(tiny_llama.adapter.hidden_size) * 3
    edit = [Edit("L1.resid_out", add(v), positions=[20])]
    with Editor(tiny_llama, edit), torch.no_grad():
        full = tiny_llama.model(IDS).logits
        out = tiny_llama.model(IDS[:, :12], use_cache=True)
        steps, cache = [out.logits], output_cache(out)
        for j in range(12, IDS.shape[1]):
            out = tiny_llama.model(IDS[:, j : j + 1], **with_cache(tiny_llama.model, cache), use_cache=True)
            steps.append(out.logits)
            cache = output_cache(out)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    dense = _logits(tiny_llama)
    assert torch.equal(full[:, :20], dense[:, :20]) and not torch.allclose(full[:, 20:], dense[:, 20:])


def test_every_writable_site_can_be_edited_and_restored(tiny):
    before = {k: v.clone() for k, v in tiny.model.state_dict().items()}
    reference = _logits(tiny)
    sites = [s for s in all_sites(tiny.adapter) if s.writable]
    with Editor(tiny, [Edit(s.name, scale(1.0)) for s in sites]):
        same = _logits(tiny)
    torch.testing.assert_close(same, reference, rtol=0, atol=0)  # editing with the identity changes nothing
    with pytest.raises(RuntimeError, match="boom"):
        with Editor(tiny, [Edit(s.name, zero()) for s in sites[:3]]):
            raise RuntimeError("boom")
    assert _hooks_left(tiny.model) == 0
    assert all(torch.equal(before[k], v) for k, v in tiny.model.state_dict().items())
    assert torch.equal(_logits(tiny), reference)


def test_bad_edits_are_clear_errors(tiny_llama):
    with pytest.raises(ConfigError, match=r"unknown site 'L9.resid_out'.*resid_out"):
        Editor(tiny_llama, [Edit("L9.resid_out", zero())])
    with pytest.raises(ConfigError, match="can be read but not edited"):
        Editor(tiny_llama, [Edit("L0.attn_probs", zero())])
    with pytest.raises(ConfigError, match="has no heads"):
        Editor(tiny_llama, [Edit("L0.resid_out", zero(), heads=[0])])


def test_an_edit_inside_a_fused_projection_changes_only_that_projection():
    """Phi-3's gate and up are one module: zeroing up's input zeroes the MLP (act(gate) * 0), and doubling
    gate's input leaves up's rows as they were; both against the model's own modules, computed by hand."""
    import actlab

    lm = actlab.load_model("tiny-phi3")
    layer = lm.adapter.layers[0]
    fused, width = layer.linears["gate"].module, lm.adapter.intermediate_size
    seen = {}
    handles = [layer.mlp.register_forward_pre_hook(lambda m, a: seen.__setitem__("x", a[0])),
               fused.register_forward_hook(lambda m, a, out: seen.__setitem__("out", out)),
               layer.linears["down"].module.register_forward_hook(lambda m, a, out: seen.__setitem__("down", out))]
    try:
        with Editor(lm, [Edit("L0.up_in", zero())]):
            _logits(lm)
        assert torch.count_nonzero(seen["down"]) == 0
        with Editor(lm, [Edit("L0.gate_in", scale(2.0))]):
            _logits(lm)
        x, out = seen["x"], seen["out"]
        with torch.no_grad():
            expect_gate = torch.nn.functional.linear(2 * x, fused.weight[:width])
            expect_up = torch.nn.functional.linear(x, fused.weight[width:])
        torch.testing.assert_close(out[..., :width], expect_gate, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out[..., width:], expect_up, rtol=1e-5, atol=1e-5)
    finally:
        for h in handles:
            h.remove()
    assert _hooks_left(lm.model) == 0
