"""KV methods that set budgets per layer and head: the head-wise policy from a profile's head roles, and
loss-aware budgets (the Fisher estimate against a loop over tokens, the allocation against an exhaustive search,
the gradients against autograd)."""

from __future__ import annotations

import itertools
import math

import pandas as pd
import pytest
import torch

import actlab
from actlab.calib import CalibrationSet
from actlab.errors import ConfigError, RunDirectoryError
from actlab.transforms.base import NoCalibration
from actlab.transforms.kv import get_method, get_press, keep_mask
from actlab.transforms.kv.base import CacheView
from actlab.transforms.kv.budgets import keep_counts
from actlab.transforms.kv.headwise import allocate as headwise_allocate
from actlab.transforms.kv.headwise import head_scores
from actlab.transforms.kv.loss_aware import (
    allocate,
    attention_and_gradients,
    head_errors,
    running_head_errors,
    running_traces,
    scenario_loss,
)


def roles_tables(layers, heads, retrieval):
    rows = [{"layer": i, "head": h, "retrieval_score": retrieval.get((i, h), 0.0), "induction_score": 0.0}
            for i in range(layers) for h in range(heads)]
    streams = [{"layer": i, "head": h, "streaming_mass": 0.5} for i in range(layers) for h in range(heads)]
    return {"head_roles": pd.DataFrame(rows), "heads": pd.DataFrame(streams)}


def test_headwise_keeps_the_retrieval_heads_whole_and_averages_the_ratio(tiny_llama):
    ad = tiny_llama.adapter  # 3 layers, 4 query heads over 2 KV heads
    tables = roles_tables(ad.num_layers, ad.num_heads, {(1, 3): 0.8, (2, 0): 0.5})
    scores = head_scores(tables, ad.num_layers, ad.num_heads, ad.num_kv_heads)
    assert scores[1, 1] == pytest.approx(0.8 - 0.005) and scores[2, 0] == pytest.approx(0.5 - 0.005)
    method = get_method("headwise", streaming_ratio=0.9)
    method.profile = tables
    r = method.calibrate(NoCalibration(tiny_llama), 0.5)
    ratios = r.head_ratios
    assert ratios.mean().item() == pytest.approx(0.5)
    assert ratios[1, 1] == 0 and ratios[2, 0] == 0  # the retrieval heads keep everything
    assert sorted(ratios.flatten().tolist()).count(0.9) == 3  # 3 x 0.9 + 0.3 = 0.5 x 6
    assert r.press == "streaming-llm"
    assert headwise_allocate(torch.zeros(2, 2), 0.95, 0.9).flatten().tolist() == pytest.approx([0.95] * 4)


def test_headwise_without_a_profile_is_a_one_line_error(tiny_llama, tmp_path):
    from actlab.jobs.kv import kv_job

    with pytest.raises(ConfigError, match="needs a profile"):
        get_method("headwise").calibrate(NoCalibration(tiny_llama), 0.5)
    with pytest.raises(ConfigError, match="--run"):
        kv_job("tiny-llama", save=str(tmp_path / "x.json"), method="snapkv", ratio=0.5, run=str(tmp_path))
    with pytest.raises(RunDirectoryError, match="no actlab run"):
        kv_job("tiny-llama", save=str(tmp_path / "x.json"), method="headwise", ratio=0.5, run=str(tmp_path / "none"))
    with pytest.raises(ConfigError, match="head_roles"):
        head_scores({}, 3, 4, 2)


def test_headwise_reads_a_profile_run(tmp_path, tmp_cache):
    from actlab.jobs.kv import kv_job
    from actlab.jobs.profile import profile

    run = profile("tiny-llama", None, tmp_path / "run", tokens=256, seq_len=64, progress=False, log=lambda *a: None)
    out = kv_job("tiny-llama", save=str(tmp_path / "h.json"), method="headwise", ratio=0.5, run=str(run.path),
                 log=lambda m: None, progress=False)
    roles = pd.read_parquet(run.path / "tables" / "head_roles.parquet")
    best = roles.loc[roles[["retrieval_score", "induction_score"]].max(axis=1).idxmax()]
    kv_head = int(best["head"]) // 2
    assert out["layer_ratios"] and sum(out["layer_ratios"]) / 3 == pytest.approx(0.5)
    from actlab.transforms import load_recipe

    assert float(load_recipe(str(tmp_path / "h.json")).head_ratios[int(best["layer"]), kv_head]) == 0.0


def brute_head_errors(q, k, v, grad, first, holds, scaling):
    """The Fisher estimate for each KV head's eviction, a query position at a time from `first` on; holds(head,
    query position, key position) says whether the head still holds that key for that query."""
    h, t, d = q.shape
    kv = k.shape[0]
    group = h // kv
    out = torch.zeros(kv, dtype=torch.float64)
    for head in range(kv):
        for pos in range(first, t):
            total = 0.0
            for qh in range(head * group, (head + 1) * group):
                keys = list(range(pos + 1))
                compressed = [p for p in keys if holds(head, pos, p)]
                for chosen, sign in ((keys, -1.0), (compressed, 1.0)):
                    s = torch.tensor([float(q[qh, pos].double() @ k[head, p].double()) * scaling for p in chosen],
                                     dtype=torch.float64)
                    o = torch.softmax(s, 0) @ v[head, chosen].double()
                    total += sign * float(grad[pos, qh].double() @ o)
            out[head] += 0.5 * total ** 2
    return out


@pytest.mark.parametrize("press_name", ["snapkv", "knorm", "streaming-llm"])
def test_head_errors_equal_a_loop_over_tokens(press_name):
    g = torch.Generator().manual_seed(3)
    h, kv, t, d, context = 4, 2, 24, 8, 12
    q, k, v = torch.randn(h, t, d, generator=g), torch.randn(kv, t, d, generator=g), torch.randn(kv, t, d, generator=g)
    grad = torch.randn(t, h, d, generator=g)
    press = get_press(press_name, **({"window": 4} if press_name == "snapkv" else {}))
    levels = (0.25, 0.75)
    errors = head_errors(q, k, v, grad, context, press, levels, d ** -0.5, None, None)
    for j, ratio in enumerate(levels):
        keep = keep_counts(torch.full((kv,), ratio), context)
        w = min(press.window, int(keep.min()))
        view = CacheView(k[None, :, :context], v[None, :, :context], q[None, :, context - w:context] if w else None,
                         d ** -0.5)
        kept = keep_mask(press.scores(view, keep), keep)[0]
        expected = brute_head_errors(q, k, v, grad, context, lambda h, _, p: p >= context or bool(kept[h, p]),
                                     d ** -0.5)
        torch.testing.assert_close(errors[:, j], expected, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("block", [256, 5])
def test_running_head_errors_equal_a_loop_over_tokens(block):
    """The running scenario: each forward's queries see what the head held when it ran (its own tokens whole);
    summed over blocks of queries that cut across the forwards (5) or hold them all (256)."""
    g = torch.Generator().manual_seed(5)
    h, kv, t, d, chunk = 4, 2, 24, 8, 6
    q, k, v = torch.randn(h, t, d, generator=g), torch.randn(kv, t, d, generator=g), torch.randn(kv, t, d, generator=g)
    grad = torch.randn(t, h, d, generator=g)
    traces = []
    for keep in (0.7, 0.4):
        trace = []
        for first in range(0, t, chunk):
            held = torch.rand(kv, first + chunk, generator=g) < keep
            held[:, first:] = True  # this forward's own tokens
            trace.append((first, held))
        traces.append(trace)
    errors = running_head_errors(q, k, v, grad, traces, d ** -0.5, None, None, block=block)
    for j, trace in enumerate(traces):
        def holds(head, pos, p, trace=trace):
            first, held = trace[pos // chunk]
            return bool(held[head, p])
        torch.testing.assert_close(errors[:, j], brute_head_errors(q, k, v, grad, 0, holds, d ** -0.5), rtol=1e-4,
                                   atol=1e-9)


def test_the_allocation_is_the_cheapest_on_the_levels():
    """Convex curves (rising marginal loss): the greedy allocation equals an exhaustive search over the levels."""
    levels = (0.25, 0.5, 0.75)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        steps = torch.rand(3, 3, generator=g).sort(1).values  # rising increments: convex in the ratio
        errors = steps.cumsum(1).double()
        for target in (0.25, 0.5):
            ratios = allocate(errors, levels, target)
            assert ratios.mean().item() == pytest.approx(target)
            cost = lambda rs: sum(0 if r == 0 else float(errors[i, levels.index(r)]) for i, r in enumerate(rs))  # noqa
            best = min(cost(rs) for rs in itertools.product((0.0, *levels), repeat=3)
                       if math.isclose(sum(rs), target * 3))
            got = [min((0.0, *levels), key=lambda x: abs(x - float(r))) for r in ratios]
            assert got == pytest.approx(ratios.tolist()) and cost(got) == pytest.approx(best)
    with pytest.raises(ConfigError, match="levels"):
        allocate(torch.ones(2, 3, dtype=torch.float64), levels, 0.8)


def test_the_gradients_are_the_losss_at_the_attention_output(tiny_llama):
    lm = tiny_llama
    ids = torch.randint(0, lm.adapter.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    record, grads = attention_and_gradients(lm, ids)
    o = lm.adapter.layers[1].linears["o"].module
    held = {}

    def hook(module, args):
        held["x"] = args[0].detach().requires_grad_()
        return (held["x"],)

    handle = o.register_forward_pre_hook(hook)
    try:
        logits = lm.model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:])
        (expected,) = torch.autograd.grad(loss, held["x"])
    finally:
        handle.remove()
    torch.testing.assert_close(grads[1], expected[0], rtol=1e-4, atol=1e-7)
    q, k, v, scaling, _ = record[1]
    assert q.shape == (1, lm.adapter.num_heads, 32, lm.adapter.head_dim) and k.shape[1] == lm.adapter.num_kv_heads
    assert lm.model.config._attn_implementation == "sdpa" and all(p.grad is None for p in lm.model.parameters())


def test_loss_aware_budgets_average_the_ratio_and_record_what_they_cost(tmp_path, monkeypatch):
    monkeypatch.setenv("ACTLAB_CACHE", str(tmp_path))
    lm = actlab.load_model("tiny-llama")
    calib = CalibrationSet.from_corpus(lm, None, seq_len=128, windows=4)
    r = get_method("loss-aware").calibrate(calib, 0.5)
    assert r.head_ratios.mean().item() == pytest.approx(0.5) and r.press == "snapkv"
    measured = r.calibration["measured_loss"]
    assert set(measured) == {"dense", "uniform", "loss-aware"} and all(math.isfinite(v) for v in measured.values())
    assert measured["dense"] != measured["uniform"] and measured["dense"] != measured["loss-aware"]
    chosen = r.calibration["selection_loss"]  # the allocation shrunk toward uniform: the lowest measured loss wins
    assert set(chosen) == {"0", "0.25", "0.5", "1"} and measured["loss-aware"] == min(chosen.values())
    assert measured["uniform"] == chosen["1"] and measured["loss-aware"] <= measured["uniform"]
    # another ratio on the same set reads the estimates (they do not depend on the target) and equals a fresh set's
    from actlab.transforms.kv import loss_aware

    passes = []
    traced = loss_aware.attention_and_gradients
    monkeypatch.setattr(loss_aware, "attention_and_gradients", lambda *a: passes.append(1) or traced(*a))
    again = get_method("loss-aware").calibrate(calib, 0.75)
    assert passes == []
    monkeypatch.setenv("ACTLAB_CACHE", str(tmp_path / "fresh"))
    fresh = get_method("loss-aware").calibrate(CalibrationSet.from_corpus(lm, None, seq_len=128, windows=4), 0.75)
    assert len(passes) == 4 and torch.equal(again.head_ratios, fresh.head_ratios)
    assert again.calibration["measured_loss"] == fresh.calibration["measured_loss"]
    with pytest.raises(ConfigError, match="levels"):
        get_method("loss-aware", levels=[0.5, 0.25])
    with pytest.raises(ConfigError, match="press"):
        get_method("loss-aware", press="nope")
    with pytest.raises(ConfigError, match="toward_uniform"):
        get_method("loss-aware", toward_uniform=1.5)


def test_the_running_scenario_holds_the_budget_and_scores_as_the_evaluation_does(tmp_path, monkeypatch):
    """phase=decode calibrates for the cache held to its budget after every forward: the traces it reads hold
    each head's count of what it saw, its losses are the chunked evaluation's, and dense is one plain forward."""
    from actlab.eval.perplexity import perplexity
    from actlab.transforms import attach

    monkeypatch.setenv("ACTLAB_CACHE", str(tmp_path))
    lm = actlab.load_model("tiny-llama")
    calib = CalibrationSet.from_corpus(lm, None, seq_len=64, windows=8)
    method = get_method("loss-aware", phase="decode", chunk=16)  # H2O: the press during decoding
    trace = running_traces(lm, calib.windows[:1], method.recipe(lm, 0.5), 16)
    assert sorted(trace) == list(range(lm.adapter.num_layers))
    for forwards in trace.values():
        assert [first for first, _ in forwards] == [0, 16, 32, 48]
        for first, held in forwards[1:]:  # compressed after the forward before: max(1, int(seen * 0.5)) each
            assert held[:, :first].sum(-1).tolist() == [first // 2] * lm.adapter.num_kv_heads
            assert bool(held[:, first:].all())
    with torch.no_grad():
        logits = lm.model(input_ids=calib.windows).logits
    dense = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), calib.windows[:, 1:].flatten())
    assert scenario_loss(lm, calib, None, 0, 16) == pytest.approx(float(dense), rel=1e-5)
    r = method.calibrate(calib, 0.5)
    assert r.phase == "decode" and r.press == "h2o" and r.calibration["scenario"] == "running"
    assert r.calibration["chunk"] == 16
    assert r.head_ratios.mean().item() == pytest.approx(0.5) and r.params["chunk"] == 16
    measured = r.calibration["measured_loss"]
    assert measured["loss-aware"] == min(r.calibration["selection_loss"].values()) <= measured["uniform"]
    assert measured["dense"] == pytest.approx(float(dense), rel=1e-5)
    with attach(lm, r):
        evaluated = perplexity(lm, calib.windows, progress=False, chunk=16).nll
    assert measured["loss-aware"] == pytest.approx(evaluated, rel=1e-6) and evaluated != measured["dense"]
    with pytest.raises(ConfigError, match="chunk"):
        get_method("loss-aware", phase="decode", chunk=0)
