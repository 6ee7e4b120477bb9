"""Sparsity methods on tiny models: exactness at 0, masked reference, budgets, recipes, hooks, bad input."""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import actlab
from actlab.errors import ConfigError, UnsupportedArchitectureError
from actlab.models.compat import output_cache, with_cache
from actlab.models.keys import split_key
from actlab.transforms.sparsity import METHODS, CalibrationData, SparsityRecipe, attach, calibrate
from actlab.transforms.sparsity.attach import SparsityMeter
from actlab.transforms.sparsity.budget import dropped_by_rules, effective_sparsity, projection_params, projection_view

SEQ = 96
FAST = {"teal": {"tokens": 96, "step": 0.1}}
MLP_ONLY = ("cats", "coreinfer")


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt2", "tiny-gemma2", "tiny-olmo2", "tiny-phi3",
                                        "tiny-gpt-neox"])
def setup(request, tmp_path_factory):
    import os

    before = os.environ.get("ACTLAB_CACHE")
    os.environ["ACTLAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))  # calibration cache per test module
    lm = actlab.load_model(request.param)
    calib = CalibrationData.from_corpus(lm, None, seq_len=SEQ, windows=8)
    ids = calib.windows[:2]
    yield lm, calib, ids
    if before is None:
        os.environ.pop("ACTLAB_CACHE", None)
    else:
        os.environ["ACTLAB_CACHE"] = before


def _hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def reference_core(a, rule, prompt):
    """CoreInfer's sentence core per row, by plain sorting: count of token-core memberships, then mean |a|."""
    n = a.shape[-1]
    k_token, k_keep = max(1, round(rule.alpha * n)), round(rule.keep * n)
    keep = torch.zeros(a.shape[0], 1, n)
    for b in range(a.shape[0]):
        score = a[b, :prompt].abs()
        counts = [0] * n
        for row in score.tolist():
            for i in sorted(range(n), key=lambda i: -row[i])[:k_token]:
                counts[i] += 1
        mean = score.mean(0).tolist()
        for i in sorted(range(n), key=lambda i: (-counts[i], -mean[i]))[:k_keep]:
            keep[b, 0, i] = 1.0
    return keep


def reference_lowrank(weight, rank):
    u, s, vt = np.linalg.svd(weight.double().numpy(), full_matrices=False)
    return torch.from_numpy((u[:, :rank] * s[:rank]) @ vt[:rank]).float()


def reference_masks(lm, recipe):
    """An independent implementation of the rule semantics in base.py's docstring, as plain hooks."""
    layers = lm.adapter.layers
    stack = contextlib.ExitStack()
    stash = {}

    def core_mask(out, rule):
        t = out.shape[-2]
        prompt = t - t // 2 if recipe.positions == "last-half" else t
        keep = reference_core(out, rule, prompt).expand_as(out).clone()
        keep[:, :prompt] = 1.0
        return out * keep

    def mask_of(x, rule):
        score = x.abs() * (torch.tensor(rule.scale) if rule.scale is not None else 1.0)
        if rule.kind == "threshold":
            cutoff = torch.full_like(score[..., :1], rule.threshold)
        elif rule.kind == "topk":
            k = round(rule.keep * score.shape[-1])
            ordered = score.sort(dim=-1).values
            cutoff = ordered[..., score.shape[-1] - k - 1 : score.shape[-1] - k]
        elif rule.kind == "relative":
            cutoff = rule.threshold * (score.double() ** 2).mean(-1, keepdim=True).sqrt()
        else:
            cutoff = score.mean(-1, keepdim=True) + rule.z * score.std(-1, keepdim=True)
        return (score > cutoff).to(x.dtype)

    def mask_input(x, rule, key):
        keep = mask_of(x, rule)
        stash[key] = x * (1 - keep)
        return (x * keep,)

    for key, rule in recipe.rules.items():
        layer, role = split_key(key)
        view = layers[layer]
        if rule.kind == "core":
            h = view.act_fn.register_forward_hook(lambda m, a, out, r=rule: core_mask(out, r))
        elif rule.source == "act":
            h = view.act_fn.register_forward_hook(lambda m, a, out, r=rule: out * mask_of(out, r))
        elif view.linears[role].rows is not None:  # one projection of a fused module (Phi-3's gate, up)
            a, b = view.linears[role].rows
            h = view.linears[role].module.register_forward_hook(
                lambda m, args, out, r=rule, k=key, a=a, b=b: torch.cat(
                    [out[..., :a], F.linear(mask_input(args[0], r, k)[0], m.weight[a:b],
                                                     None if m.bias is None else m.bias[a:b]), out[..., b:]], dim=-1))
        else:
            h = view.linears[role].module.register_forward_pre_hook(
                lambda m, args, r=rule, k=key: mask_input(args[0], r, k))
        stack.callback(h.remove)
        if rule.rank:
            w_r = reference_lowrank(view.linears[role].weight().detach(), rule.rank)
            h = view.linears[role].module.register_forward_hook(
                lambda m, a, out, k=key, w=w_r: out + stash[k] @ w.T)
            stack.callback(h.remove)
    return stack


@pytest.mark.parametrize("method", sorted(METHODS))
def test_zero_sparsity_is_dense(setup, method):
    lm, calib, ids = setup
    recipe = calibrate(method, calib, 0.0, **FAST.get(method, {}))
    with torch.no_grad():
        dense = lm.model(ids).logits
        with attach(lm, recipe):
            sparse = lm.model(ids).logits
    assert torch.equal(dense, sparse)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_sparse_forward_equals_masked_reference(setup, method):
    lm, calib, ids = setup
    target = 0.3 if method in MLP_ONLY else 0.5
    recipe = calibrate(method, calib, target, **FAST.get(method, {}))
    with torch.no_grad():
        with attach(lm, recipe):
            ours = lm.model(ids).logits
        with reference_masks(lm, recipe):
            reference = lm.model(ids).logits
        dense = lm.model(ids).logits
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, dense), "a 50% recipe must change the output"
    assert _hooks_left(lm.model) == 0


@pytest.mark.parametrize("method", sorted(METHODS))
def test_achieved_sparsity_on_calibration_data(setup, method, request):
    lm, calib, _ = setup
    if method == "magnitude" and lm.adapter.family == "olmo2":
        # one global |x| threshold over OLMo-2's un-normalised sublayer inputs: dropping nearly all of o's input
        # zeroes attention outputs (post-norm of zero), the residual shrinks, and refinement oscillates
        # (achieved 0.086 / 0.57 / 0.085 after 1 / 2 / 3 steps at 0.25). A limit of the baseline, kept visible.
        request.applymarker(pytest.mark.xfail(strict=True, reason="magnitude's refinement does not converge on OLMo-2"))
    for target in ((0.15, 0.3) if method in MLP_ONLY else (0.25, 0.45)):  # CATS, CoreInfer reach only the MLP
        recipe = calibrate(method, calib, target, **FAST.get(method, {}))
        meter = SparsityMeter()
        with attach(lm, recipe, meter), torch.no_grad():
            for w in calib.windows:
                lm.model(w[None])
        achieved = meter.effective(lm, recipe)
        assert abs(achieved - target) <= 0.02, f"{method} at {target}: achieved {achieved:.3f}"


@pytest.mark.parametrize("rule", ["threshold", "topk", "relative"])
def test_loss_aware_rules_mask_as_the_reference_and_meet_the_budget(setup, rule):
    lm, calib, ids = setup
    for target in (0.25, 0.45):
        recipe = calibrate("loss-aware", calib, target, rule=rule, toward_uniform=0.5)
        assert {r.kind for r in recipe.rules.values()} == {rule}
        meter = SparsityMeter()
        with torch.no_grad():
            with attach(lm, recipe, meter):
                ours = lm.model(ids).logits
                for w in calib.windows[len(ids):]:
                    lm.model(w[None])
            with reference_masks(lm, recipe):
                reference = lm.model(ids).logits
        torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-5)
        achieved = meter.effective(lm, recipe)
        assert abs(achieved - target) <= 0.02, f"{rule} at {target}: achieved {achieved:.3f}"


def test_meter_matches_zeros_counted_independently(setup):
    lm, calib, ids = setup
    recipe = calibrate("magnitude", calib, 0.4)
    zeros, total = {}, {}

    def count(key):
        def hook(_m, args):  # registered after attach's masking hook, so it sees the masked input
            zeros[key] = zeros.get(key, 0) + int((args[0] == 0).sum())
            total[key] = total.get(key, 0) + args[0].numel()
        return hook

    # a projection inside a fused module (Phi-3's gate and up) reads a masked copy that never reaches the
    # module's input; the masked-reference test covers those, this one counts the others
    counted = [key for key in recipe.rules if not projection_view(lm.adapter, key).fused]
    meter = SparsityMeter()
    with attach(lm, recipe, meter), contextlib.ExitStack() as stack:
        for key in counted:
            module = projection_view(lm.adapter, key).module
            stack.callback(module.register_forward_pre_hook(count(key)).remove)
        with torch.no_grad():
            lm.model(ids)
    assert counted
    for key in counted:
        assert meter.dropped()[key] == pytest.approx(zeros[key] / total[key], abs=1e-9)
    if len(counted) == len(recipe.rules):
        expect = effective_sparsity(dropped_by_rules(recipe.rules, {k: zeros[k] / total[k] for k in zeros}),
                                    projection_params(lm.adapter))
        assert meter.effective(lm, recipe) == pytest.approx(expect)


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
@pytest.mark.parametrize("method", ["loss-aware", "chess", "stat-topk", "wina", "rsparse", "coreinfer"])
def test_recipe_roundtrip_reproduces_outputs(setup, tmp_path, method, suffix):
    lm, calib, ids = setup
    recipe = calibrate(method, calib, 0.4)
    path = tmp_path / f"recipe{suffix}"
    recipe.save(path)
    loaded = SparsityRecipe.load(path)
    assert loaded.to_dict() == recipe.to_dict()
    with torch.no_grad():
        with attach(lm, recipe):
            a = lm.model(ids).logits
        with attach(lm, loaded):
            b = lm.model(ids).logits
    assert torch.equal(a, b)


def test_hooks_removed_even_on_error(setup):
    lm, calib, ids = setup
    recipe = calibrate("teal", calib, 0.3, greedy=False)
    with pytest.raises(RuntimeError, match="boom"):
        with attach(lm, recipe):
            raise RuntimeError("boom")
    assert _hooks_left(lm.model) == 0


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_sparsity_out_of_range(setup, bad):
    _, calib, _ = setup
    with pytest.raises(ConfigError, match=r"sparsity must be in \[0, 1\)"):
        calibrate("magnitude", calib, bad)


def test_unknown_method(setup):
    _, calib, _ = setup
    with pytest.raises(ConfigError, match=r"unknown sparsity method 'teel'.*teal"):
        calibrate("teel", calib, 0.5)


def test_calibration_corpus_too_small(tmp_path):
    lm = actlab.load_model("tiny-llama")
    small = tmp_path / "small.txt"
    small.write_text("a short calibration text. " * 30)
    with pytest.raises(ConfigError, match="calibration corpus too small"):
        CalibrationData.from_corpus(lm, str(small), seq_len=32, windows=3)


def test_recipe_for_another_model_is_refused(setup):
    lm, calib, ids = setup
    recipe = calibrate("magnitude", calib, 0.3)
    other = actlab.load_model("tiny-qwen3")
    with pytest.raises(ConfigError, match="calibrated for"):
        with attach(other, recipe):
            pass
    changed = copy.deepcopy(lm)
    with torch.no_grad():
        changed.adapter.layers[0].linears["o"].module.weight.add_(0.01)
    changed.refresh_identity()  # a model with other weights (as if loaded from another checkpoint)
    with pytest.raises(ConfigError, match="calibrated for"):
        with attach(changed, recipe):
            pass


@pytest.mark.parametrize("params,match", [({"sensitivity": "median"}, "sensitivity must be"),
                                          ({"rule": "top-k"}, "rule one of"),
                                          ({"toward_uniform": 1.5}, "toward_uniform must be"),
                                          ({"toward_uniform": "half"}, "toward_uniform must be")])
def test_loss_aware_refuses_bad_parameters(setup, params, match):
    _, calib, _ = setup
    with pytest.raises(ConfigError, match=match):
        calibrate("loss-aware", calib, 0.5, **params)


def test_cats_refuses_unreachable_budget(setup):
    _, calib, _ = setup
    with pytest.raises(ConfigError, match="cats sparsifies only"):
        calibrate("cats", calib, 0.6)


def test_last_half_protocol_leaves_prefix_dense(setup):
    lm, calib, ids = setup
    recipe = calibrate("magnitude", calib, 0.5)
    recipe.positions = "last-half"
    with torch.no_grad():
        dense = lm.model(ids).logits
        with attach(lm, recipe):
            half = lm.model(ids).logits
    cut = SEQ - SEQ // 2
    assert torch.equal(half[:, :cut], dense[:, :cut])  # causal: the first half never sees sparsity
    assert not torch.allclose(half[:, cut:], dense[:, cut:])


def test_input_gradients_match_autograd(setup):
    """loss-aware's per-projection gradient RMS against autograd through one projection at a time."""
    lm, calib, _ = setup
    grads = calib._collect_grad_rms(calib.windows[:2], progress=False)
    layer = lm.adapter.layers[1]
    role = "qkv" if "qkv" in layer.linears else "q"
    module = layer.linears[role].module
    total = 0
    for w in calib.windows[:2]:
        delta = None

        def add_delta(m, args):
            nonlocal delta
            delta = torch.zeros_like(args[0], requires_grad=True)
            return (args[0] + delta,)

        h = module.register_forward_pre_hook(add_delta)
        try:
            logits = lm.model(w[None]).logits
            loss = F.cross_entropy(logits[0, :-1], w[1:])
            (g,) = torch.autograd.grad(loss, delta)
        finally:
            h.remove()
        total = total + g.reshape(-1, g.shape[-1]).double().pow(2).sum(0)
    expect = (total / calib.windows[:2].numel()).sqrt().float()
    torch.testing.assert_close(grads[f"L1.{role}"], expect, rtol=1e-4, atol=1e-9)


def test_loss_aware_uses_one_threshold_on_scaled_scores(setup):
    lm, calib, _ = setup
    recipe = calibrate("loss-aware", calib, 0.4, refine=0, sensitivity="mean-square", rule="threshold",
                       toward_uniform=0.0)  # a shrink toward uniform (chosen on some models) moves each threshold
    thresholds = {rule.threshold for rule in recipe.rules.values()}
    assert len(thresholds) == 1
    grads = calib.input_grad_rms(8)
    for key, rule in recipe.rules.items():
        out = projection_view(lm.adapter, key).out_features
        torch.testing.assert_close(torch.tensor(rule.scale), grads[key] / math.sqrt(out))


def test_teal_greedy_table_is_monotone(setup):
    lm, calib, _ = setup
    from actlab.transforms.sparsity.teal import Teal

    teal = Teal(tokens=96, step=0.1)
    keys = [f"L{lyr.index}.{r}" for lyr in lm.adapter.layers for r in lyr.linears]
    hists = calib.score_histograms({k: None for k in keys})
    table = teal.greedy_table(calib, hists, 0.7)
    for rows in table:
        levels = [r[0] for r in rows]
        assert levels == sorted(levels) and levels[-1] >= 0.7
        for a, b in zip(rows, rows[1:]):
            assert all(b[1][r] >= a[1][r] for r in a[1])  # one projection raised per step
            assert sum(b[1][r] > a[1][r] for r in a[1]) == 1


@pytest.mark.parametrize("args,message", [
    (["--method", "teal", "--sparsity", "1.5"], "sparsity must be in [0, 1)"),
    (["--method", "nope", "--sparsity", "0.5"], "unknown sparsity method 'nope'"),
    (["--method", "coreinfer", "--sparsity", "0.5"], "use --positions last-half"),
])
def test_cli_rejects_bad_input_before_loading(args, message):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "actlab.cli", "sparsify", "--model", "no/such-model", *args],
                         capture_output=True, text=True)
    assert out.returncode == 2 and message in out.stderr  # the bad model name is never reached


def test_rsparse_lowrank_path_reduces_error_and_is_charged(setup):
    """The rank-r path must bring the output closer to dense than dropping the same channels, and the
    weights it reads must be charged to the budget: effective = sum params * (dropped - r(in+out)/(in out))."""
    lm, calib, ids = setup
    recipe = calibrate("rsparse", calib, 0.5, rank_fractions=(0.125,), refine=0)
    assert all(rule.rank > 0 for rule in recipe.rules.values())
    no_rank = copy.deepcopy(recipe)
    for rule in no_rank.rules.values():
        rule.rank = 0
    with torch.no_grad():
        dense = lm.model(ids).logits
        with attach(lm, recipe) as meter:
            with_rank = lm.model(ids).logits
        with attach(lm, no_rank):
            dropped_only = lm.model(ids).logits
    assert (with_rank - dense).norm() < (dropped_only - dense).norm()
    params = projection_params(lm.adapter)
    expect = 0.0
    for key, frac in meter.dropped().items():
        lin = projection_view(lm.adapter, key)
        rank = recipe.rules[key].rank
        expect += params[key] * (frac - rank * (lin.in_features + lin.out_features) / lin.num_params)
    assert meter.effective(lm, recipe) == pytest.approx(expect / sum(params.values()))


def test_coreinfer_decoding_uses_the_prompt_core(setup):
    """Prompt once, then one token at a time with the KV cache: every decoded token's logits equal a full
    forward in which the second half is masked with the core chosen from the first half."""
    lm, calib, ids = setup
    recipe = calibrate("coreinfer", calib, 0.3)
    decoding = copy.deepcopy(recipe)
    decoding.positions = "all"  # a multi-token call is all prompt; later calls use its core
    prompt = SEQ - SEQ // 2
    with torch.no_grad():
        with reference_masks(lm, recipe):
            reference = lm.model(ids).logits[:, prompt:]
        steps = []
        with attach(lm, decoding) as meter:
            out = lm.model(ids[:, :prompt], use_cache=True)
            past = output_cache(out)
            for j in range(prompt, SEQ):
                out = lm.model(ids[:, j : j + 1], **with_cache(lm.model, past), use_cache=True)
                past = output_cache(out)
                steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), reference, rtol=1e-4, atol=1e-4)
    with attach(lm, decoding) as prompt_only, torch.no_grad():
        lm.model(ids)  # all prompt: nothing sparsified, nothing counted
    assert prompt_only.dropped() == {} and prompt_only.effective(lm, decoding) == 0.0
    n = lm.adapter.intermediate_size
    assert all(frac == pytest.approx(1 - round(recipe.rules[k].keep * n) / n) for k, frac in meter.dropped().items())


@pytest.mark.parametrize("method,params", [("rsparse", {"rank_fractions": (0.125,)}), ("coreinfer", {})])
def test_engine_refuses_rules_it_cannot_run(setup, method, params):
    from actlab.engine.decode import DecodeEngine

    lm, calib, _ = setup
    recipe = calibrate(method, calib, 0.3, refine=0, **params)
    with pytest.raises(ConfigError, match="decode engine"):
        DecodeEngine(lm, recipe)


def test_loss_aware_picks_the_candidate_with_the_lowest_calibration_loss(setup):
    lm, calib, _ = setup
    held = calib.windows[-2:]

    def loss_with(recipe):  # independent of loss_aware.calibration_loss: summed NLL / tokens
        total, count = 0.0, 0
        with attach(lm, recipe), torch.no_grad():
            for w in held:
                logits = lm.model(w[None]).logits[0, :-1]
                total += float(F.cross_entropy(logits, w[1:], reduction="sum"))
                count += len(w) - 1
        return total / count

    def forced(s, r, b):
        return calibrate("loss-aware", calib, 0.5, refine=0, sensitivity=s, rule=r, toward_uniform=b)

    chosen = calibrate("loss-aware", calib, 0.5, refine=0)
    variants = {(s, r, 0.0): forced(s, r, 0.0) for s in ("mean-square", "typical")
                for r in ("threshold", "topk", "relative")}
    losses = {k: loss_with(v) for k, v in variants.items()}
    s, r, _ = min(losses, key=losses.get)
    for b in (0.25, 0.5, 0.75):  # the shrinkage is searched for the best variant only
        variants[s, r, b] = forced(s, r, b)
        losses[s, r, b] = loss_with(variants[s, r, b])
    best = min(losses, key=losses.get)
    assert tuple(chosen.calibration["choice"].values()) == best
    assert chosen.to_dict()["rules"] == variants[best].to_dict()["rules"]
    assert len(set(losses.values())) > 1  # the candidates really differ


def test_refinement_keeps_the_record_of_the_selection(setup):
    _, calib, _ = setup
    unrefined = calibrate("loss-aware", calib, 0.4, refine=0, rule="threshold")  # top-k is never refined
    refined = calibrate("loss-aware", calib, 0.4, refine=1, rule="threshold")
    assert refined.calibration["refined"] == 1
    assert refined.calibration["selection_loss"] == unrefined.calibration["selection_loss"]
    assert refined.calibration["choice"] == unrefined.calibration["choice"]


@pytest.mark.parametrize("rule", ["threshold", "relative"])
def test_loss_aware_shrinks_its_allocation_toward_uniform(setup, rule):
    lm, calib, _ = setup
    params = projection_params(lm.adapter)
    fixed = {"rule": rule, "sensitivity": "mean-square"}
    plain = calibrate("loss-aware", calib, 0.4, refine=0, toward_uniform=0.0, **fixed)
    half = calibrate("loss-aware", calib, 0.4, refine=0, toward_uniform=0.5, **fixed)
    for key in params:
        assert half.predicted[key] == pytest.approx(0.5 * plain.predicted[key] + 0.5 * 0.4)
    assert half.predicted["effective"] == pytest.approx(0.4, abs=1e-6)
    spread = [plain.predicted[k] for k in params]
    assert max(spread) - min(spread) > 0.1  # the loss-aware allocation is far from uniform on this model
    meter = SparsityMeter()
    with attach(lm, half, meter), torch.no_grad():
        for w in calib.windows:
            lm.model(w[None])
    measured = meter.dropped()
    for key in params:  # each projection drops its shrunk share, measured on the calibration data (the shares
        # are read from dense activations; masking upstream shifts o's input by up to ~0.03 on tiny GPT-NeoX)
        assert measured[key] == pytest.approx(half.predicted[key], abs=0.04)


def test_typical_gradient_is_not_owned_by_one_token(setup):
    """robust=True against a brute-force recomputation: mean over tokens of each token's squared gradient
    normalised to unit sum, times the median token's squared gradient norm."""
    lm, calib, _ = setup
    plain = calib._collect_grad_rms(calib.windows[:2], progress=False)
    typical = calib._collect_grad_rms(calib.windows[:2], progress=False, robust=True)
    key = next(iter(plain))
    assert plain[key].shape == typical[key].shape
    grads = []
    view = projection_view(lm.adapter, key)

    def keep(_m, _a, out):
        out.register_hook(lambda g: grads.append((g.detach().reshape(-1, g.shape[-1]) @ view.weight()).double()))

    h = view.module.register_forward_hook(keep)
    e = lm.adapter.embed.register_forward_hook(lambda m, a, out: out.requires_grad_(True))
    try:
        for w in calib.windows[:2]:
            logits = lm.model(w[None]).logits
            F.cross_entropy(logits[0, :-1], w[1:]).backward()
    finally:
        h.remove()
        e.remove()
    g = torch.cat(grads)
    energy = g.pow(2).sum(-1)
    expect = ((g.pow(2) / energy.clamp_min(1e-300)[:, None]).mean(0) * energy.median()).sqrt().float()
    torch.testing.assert_close(typical[key], expect, rtol=1e-4, atol=1e-9)


def test_a_saved_recipe_reproduces_its_positions(setup, tmp_path):
    """`sparsify --recipe` keeps what the recipe records (last-half) unless --positions says otherwise."""
    from actlab.jobs.sparsify import sparsify

    lm, calib, _ = setup
    recipe = calibrate("magnitude", calib, 0.5)
    recipe.positions = "last-half"
    recipe.save(tmp_path / "r.json")
    kw = dict(method=None, sparsity=None, calib=None, eval_data=None, seq_len=96, windows=2,
              recipe_path=str(tmp_path / "r.json"), log=lambda *a: None, progress=False)
    kept = sparsify(lm.name, **kw)
    forced = sparsify(lm.name, positions="all", **kw)
    assert (kept["positions"], kept["positions_from"]) == ("last-half", "recipe")
    assert (forced["positions"], forced["positions_from"]) == ("all", "option")
    assert kept["sparse_ppl"] != forced["sparse_ppl"]


def test_sparsify_refuses_a_mixture_of_experts_before_calibrating():
    with pytest.raises(UnsupportedArchitectureError, match="activation sparsity is not supported on mixture-of-"):
        actlab.sparsify(actlab.load_model("tiny-mixtral"), "teal", 0.5, calib=object())  # calib is never read
