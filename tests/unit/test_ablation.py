"""Ablation: zero, mean and resample against hand-written hooks and a plain loss loop; clear errors."""

from __future__ import annotations

import pytest
import torch

from actlab.errors import ConfigError
from actlab.jobs.ablate import ablate_job
from actlab.transforms.steer.ablation import loss_change, part_target

WINDOWS = torch.stack([(torch.arange(40) * (k + 3)).remainder(200) + 5 for k in range(3)])


def _nll_with(lm, module, fn, windows, pre=False):
    handles = [module.register_forward_pre_hook(lambda m, a: (fn(a[0]), *a[1:])) if pre else
               module.register_forward_hook(lambda m, a, out: fn(out))]
    try:
        out = []
        with torch.no_grad():
            for k in range(len(windows)):
                ids = windows[k:k + 1]
                logits = lm.model(input_ids=ids).logits.float()
                out.append(float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])))
        return sum(out) / len(out)
    finally:
        for h in handles:
            h.remove()


def test_zero_and_mean_ablation_of_a_head_equal_hand_written_hooks(tiny_llama):
    lm, ad = tiny_llama, tiny_llama.adapter
    o_proj, hd, head = ad.layers[1].linears["o"].module, ad.head_dim, 2
    lo, hi = head * hd, (head + 1) * hd
    seen = []
    h = o_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        lm.model(input_ids=WINDOWS)
    h.remove()
    head_mean = seen[0][..., lo:hi].double().mean((0, 1)).float()

    def zero(x):
        x = x.clone()
        x[..., lo:hi] = 0
        return x

    def mean(x):
        x = x.clone()
        x[..., lo:hi] = head_mean
        return x

    for kind, fn in (("zero", zero), ("mean", mean)):
        got = loss_change(lm, WINDOWS, ["L1.attn.head2"], kind)
        assert abs(got["loss"] - _nll_with(lm, o_proj, fn, WINDOWS, pre=True)) < 1e-5
        assert abs(got["loss_dense"] - _nll_with(lm, o_proj, lambda x: x, WINDOWS, pre=True)) < 1e-5


def test_resample_ablation_of_a_sublayer_takes_the_next_windows_output(tiny_llama):
    lm = tiny_llama
    o_proj = lm.adapter.layers[0].linears["o"].module
    outputs = []
    h = o_proj.register_forward_hook(lambda m, a, out: outputs.append(out.detach()))
    with torch.no_grad():
        for k in range(len(WINDOWS)):
            lm.model(input_ids=WINDOWS[k:k + 1])
    h.remove()
    losses = []
    for k in range(len(WINDOWS)):
        donor = outputs[(k + 1) % len(WINDOWS)]
        losses.append(_nll_with(lm, o_proj, lambda out, donor=donor: donor, WINDOWS[k:k + 1]))
    got = loss_change(lm, WINDOWS, ["L0.attn"], "resample")
    assert abs(got["loss"] - sum(losses) / len(losses)) < 1e-5
    assert part_target("L0.attn") == "L0.o_out" and part_target("L3.mlp") == "L3.down_out"


def test_ablation_errors(tiny_llama):
    with pytest.raises(ConfigError, match="unknown ablation"):
        loss_change(tiny_llama, WINDOWS, ["L0.mlp"], "shuffle")
    with pytest.raises(ConfigError, match="at least two windows"):
        loss_change(tiny_llama, WINDOWS[:1], ["L0.mlp"], "resample")
    with pytest.raises(ConfigError, match="unknown site"):
        loss_change(tiny_llama, WINDOWS, ["L7.mlp"], "zero")
    with pytest.raises(ConfigError, match="--kind"):
        ablate_job("tiny-llama", parts=["L0.mlp"], kind="nope", log=lambda *a: None)
    with pytest.raises(ConfigError, match="at least one --part"):
        ablate_job("tiny-llama", parts=[], log=lambda *a: None)
