"""Every profile statistic against a brute-force computation over stored activations; merge == one pass."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import actlab
from actlab.data import WindowSpec, load_corpus, make_windows
from actlab.probe import Probe, Profiler, all_sites
from actlab.probe.attention import sampled_queries
from actlab.probe.stats.base import TableContext
from actlab.probe.stats.distribution import ActivationDistribution, as_channels, batch_fields
from actlab.probe.stats.histogram import _EDGES, NUM_BINS, bin_index, fraction_below, quantile
from actlab.probe.stats.logit_lens import lens_positions

SEQ, WINDOWS, STRIDE, LENS = 48, 4, 4, 8


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gemma3", "tiny-phi3", "tiny-gpt-neox", "tiny-gpt2",
                                        "tiny-opt"])
def run(request):
    """A tiny model, its windows, every activation stored (float64), and a profile of the same windows."""
    lm = actlab.load_model(request.param)
    windows = make_windows(lm.tokenizer, load_corpus(None), WindowSpec(seq_len=SEQ, num_windows=WINDOWS))
    stored: dict[str, list[torch.Tensor]] = {}
    sites = {s.name: s for s in all_sites(lm.adapter)}

    def keep(site, x):
        stored.setdefault(site.name, []).append(x.detach().double().clone())

    with Probe(lm, list(sites.values()), keep, query_stride=1), torch.no_grad():
        for w in windows:
            lm.model(w[None])
    acts = {k: torch.cat([as_channels(t, sites[k]) if sites[k].kind != "attn_probs" else t for t in v])
            for k, v in stored.items()}
    prof = Profiler(lm, query_stride=STRIDE, lens_stride=LENS)
    prof.observe(windows, batch_size=2, progress=False)
    return lm, windows, acts, prof


def test_channel_moments(run):
    lm, _, acts, prof = run
    dist = prof.statistic("distribution")
    for key in ("L0.resid_in", "L1.mlp_in", "L1.down_in", "L0.o_in", "L1.v", "L1.resid_out"):
        x = acts[key]
        s = dist.channel_summary(key)
        tol = 1e-6 * float(x.abs().max())  # the kernel sums float32 blocks of 32 rows, then float64
        torch.testing.assert_close(s["mean"], x.mean(0), rtol=1e-5, atol=tol)
        torch.testing.assert_close(s["var"], x.var(0, correction=0), rtol=1e-4, atol=tol**2)
        torch.testing.assert_close(s["mean_abs"], x.abs().mean(0), rtol=1e-5, atol=tol)
        torch.testing.assert_close(s["mean_sq"], x.pow(2).mean(0), rtol=1e-4, atol=tol**2)
        torch.testing.assert_close(s["min"], x.min(0).values, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(s["max"], x.max(0).values, rtol=1e-6, atol=1e-7)
        assert torch.equal(s["zero_fraction"], (x == 0).double().mean(0))


def _reference_bin(values: np.ndarray) -> np.ndarray:
    """Independent binning: frexp gives |x| = m * 2**e with m in [0.5, 1); 8 bins per octave."""
    m, e = np.frexp(np.abs(values).astype(np.float64))
    normal = e - 1 + 127 >= 1
    idx = (e - 1 + 127) * 8 + np.floor((m * 2 - 1) * 8).astype(np.int64)
    return np.where((values == 0) | ~normal, 0, idx)


def test_histogram_bins_and_readback(run):
    _, _, acts, prof = run
    dist = prof.statistic("distribution")
    for key in ("L0.attn_in", "L1.act", "L1.down_in"):
        x = acts[key].float()
        counts, zeros = dist.histogram(key)
        expected = np.bincount(_reference_bin(x.numpy().ravel()), minlength=NUM_BINS)
        assert np.array_equal(counts, expected)
        assert zeros == int((x == 0).sum())
        flat = x.abs().numpy().ravel().astype(np.float64)
        for eps in (1e-3, 1e-2, 0.05, 0.3):
            exact = (flat < eps).mean()
            k = np.searchsorted(_EDGES, eps, side="right") - 1
            slack = counts[k] / counts.sum()  # interpolation error is bounded by one bin's mass
            assert abs(fraction_below(counts, zeros, eps) - exact) <= slack + 1e-12
        for q in (0.1, 0.5, 0.9, 0.99):
            exact_q = np.quantile(flat, q)
            assert quantile(counts, q) == pytest.approx(exact_q, rel=0.13), "within one bin (factor 1.125)"


def test_bin_index_matches_reference_on_extremes():
    x = torch.tensor([0.0, -0.0, 1e-40, 1e-30, 1.0, 1.124, 1.126, -3.0, 6.5e4, 3e38, float("inf")])
    ref = _reference_bin(x.numpy())
    got = bin_index(x).numpy()
    finite = np.isfinite(x.numpy())
    assert np.array_equal(got[finite][[0, 1, 3, 4, 5, 6, 7, 8, 9]], ref[finite][[0, 1, 3, 4, 5, 6, 7, 8, 9]])
    assert got[-1] == NUM_BINS - 8  # inf lands in the top octave


def test_native_kernel_equals_torch_path(run):
    _, _, acts, _ = run
    x = acts["L1.down_in"].float()
    x[::3, ::2] = 0
    a, b = batch_fields(x, use_native=True), batch_fields(x, use_native=False)
    for name in a:  # float32 centred squares in the kernel: agreement to ~1e-7 of each field's scale
        scale = float(b[name].double().abs().max()) or 1.0
        torch.testing.assert_close(a[name].double(), b[name].double(), rtol=1e-5, atol=1e-6 * scale, msg=name)


@pytest.mark.parametrize("use_native", [True, False], ids=["native", "torch"])
def test_moments_exact_when_one_token_dwarfs_the_rest(use_native):
    """A sink-like first row 1000x the others (and 24215 against ~100, as SmolLM2's L11 has): per-channel mean,
    variance and E[x^2] against float64, to float64 rounding, not to float32's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(700, 96, generator=g) * 3 + 5
    x[0] *= 1000
    x[1, :4] = torch.tensor([24215.0, -24215.0, 1e-3, 0.0])
    ref = x.double()
    fields = batch_fields(x, use_native=use_native)
    n = float(fields["n"])
    mean, var = fields["mean"], fields["m2"] / n
    torch.testing.assert_close(mean, ref.mean(0), rtol=1e-12, atol=0)
    torch.testing.assert_close(var, ref.var(0, unbiased=False), rtol=1e-10, atol=0)
    torch.testing.assert_close(var + mean**2, ref.pow(2).mean(0), rtol=1e-12, atol=0)
    again = batch_fields(x, use_native=use_native)
    assert all(torch.equal(fields[k], again[k]) for k in fields)  # one input, one answer


def test_neuron_frequency(run):
    _, _, acts, prof = run
    freq = prof.statistic("frequency")
    for layer in (0, 1):
        key = f"L{layer}.down_in"
        x = acts[key].float().abs()
        for i, eps in enumerate(freq.eps):
            torch.testing.assert_close(freq.frequency(key)[i], (x > eps).double().mean(0))


def test_massive_activations(run):
    lm, windows, acts, prof = run
    top = prof.tables()["top_activations"]
    for key in ("L0.resid_in", "L1.resid_out"):
        x = acts[key].float().abs().reshape(WINDOWS, SEQ, -1)
        values, idx = x.flatten().topk(16)
        rows = top[top["site"] == key].sort_values("rank")
        np.testing.assert_allclose(rows["value"].to_numpy(), values.numpy(), rtol=1e-6)
        # ties are real (the same token embeds identically at every position): check that each reported
        # location holds its reported value and that locations are distinct
        for r in rows.itertuples():
            assert float(x[r.window, r.position, r.channel]) == pytest.approx(r.value, rel=1e-6)
            assert r.token_id == int(windows[r.window, r.position])
        assert len(set(zip(rows["window"], rows["position"], rows["channel"]))) == len(rows)


def test_attention_heads(run):
    lm, windows, acts, prof = run
    ad = lm.adapter
    stat = prof.statistic("attention")
    heads = prof.tables()["heads"]
    rows = sampled_queries(SEQ, STRIDE)
    for layer in range(ad.num_layers):
        probs = acts[f"L{layer}.attn_probs"][:, :, rows]  # recorded with every query; take the sampled ones
        probs = probs[:, :, rows > 0]
        window = ad.sliding_window(ad.layers[layer])  # a query at q >= window cannot see position 0
        sees_first = torch.as_tensor(rows[rows > 0]) < (window or SEQ)
        first = probs[:, :, sees_first, 0].mean(dim=(0, 2))
        ent = -(probs * probs.clamp_min(1e-300).log()).sum(-1).mean(dim=(0, 2))
        got = heads[heads["layer"] == layer].sort_values("head")
        np.testing.assert_allclose(got["first_token_mass"], first.numpy(), rtol=1e-5)
        np.testing.assert_allclose(got["entropy"], ent.numpy(), rtol=1e-5)
        # later-token sinks, brute force over every (window, head, key)
        count = torch.zeros(ad.num_heads)
        for w in range(WINDOWS):
            for h in range(ad.num_heads):
                for k in range(1, SEQ):
                    seen = probs[w, h, :, k]
                    visible = (seen > 0).sum()
                    if visible >= 4 and seen.sum() / visible > stat.sink_threshold:
                        count[h] += 1
        np.testing.assert_allclose(got["later_sinks_per_window"], (count / WINDOWS).numpy())
        v = acts[f"L{layer}.v"].reshape(WINDOWS, SEQ, ad.num_kv_heads, ad.head_dim).norm(dim=-1)
        kv = torch.arange(ad.num_heads) // (ad.num_heads // ad.num_kv_heads)
        ratio = (v[:, 0].mean(0) / v[:, 1:].mean(1).mean(0))[kv]
        np.testing.assert_allclose(got["value_norm_first_ratio"], ratio.numpy(), rtol=1e-5)


def test_layer_redundancy(run):
    lm, _, acts, prof = run
    layers = prof.tables()["layers"]
    for layer in range(lm.adapter.num_layers):
        x_in = acts["L0.resid_in"] if layer == 0 else acts[f"L{layer - 1}.resid_out"]
        mid, out = acts[f"L{layer}.resid_mid"], acts[f"L{layer}.resid_out"]
        row = layers[layers["layer"] == layer].iloc[0]
        cos = F.cosine_similarity(x_in, out, dim=-1)
        assert row["block_influence"] == pytest.approx(float(1 - cos.mean()), rel=1e-5)
        if lm.adapter.parallel_residual:  # no stream between the sublayers: nothing to measure
            assert math.isnan(row["cos_attn"]) and math.isnan(row["cos_mlp"])
        else:
            assert row["cos_attn"] == pytest.approx(float(F.cosine_similarity(x_in, mid, dim=-1).mean()), rel=1e-5)
            assert row["cos_mlp"] == pytest.approx(float(F.cosine_similarity(mid, out, dim=-1).mean()), rel=1e-5)
        delta = (out - x_in).norm(dim=-1) / x_in.norm(dim=-1)
        assert row["delta_ratio_mean"] == pytest.approx(float(delta.mean()), rel=1e-5)
        assert row["hidden_rms"] == pytest.approx(float(out.pow(2).mean(-1).sqrt().mean()), rel=1e-5)


def test_logit_lens(run):
    lm, windows, acts, prof = run
    ad = lm.adapter
    layers = prof.tables()["layers"]
    pos = lens_positions(SEQ, LENS)
    targets = windows[:, pos + 1].flatten()
    for layer in range(ad.num_layers):
        h = acts[f"L{layer}.resid_out"].reshape(WINDOWS, SEQ, -1)[:, pos].float()
        with torch.no_grad():
            logits = ad.lm_head(ad.final_norm(h)).flatten(0, 1)
        expect = F.cross_entropy(logits, targets).item()
        got = layers[layers["layer"] == layer]["logit_lens_loss"].item()
        assert got == pytest.approx(expect, rel=1e-5)
    # the last layer's lens is the model itself: compare with the model's own logits
    with torch.no_grad():
        model_logits = lm.model(windows).logits[:, pos].flatten(0, 1)
    final = layers[layers["layer"] == ad.num_layers - 1]["logit_lens_loss"].item()
    assert final == pytest.approx(F.cross_entropy(model_logits, targets).item(), rel=1e-4)


def _state_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            scale = float(b[k].abs().max()) if b[k].numel() else 0.0
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6 * scale + 1e-12, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def merge_setup():
    lm = actlab.load_model("tiny-qwen2")
    windows = make_windows(lm.tokenizer, load_corpus(None), WindowSpec(seq_len=32, num_windows=6))
    one = Profiler(lm, query_stride=2, lens_stride=4)
    one.observe(windows, progress=False)
    return lm, windows, one.state()


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=1, max_value=5), batch=st.integers(min_value=1, max_value=3))
def test_merge_equals_one_pass(merge_setup, cut, batch):
    lm, windows, one_pass = merge_setup
    a, b = Profiler(lm, query_stride=2, lens_stride=4), Profiler(lm, query_stride=2, lens_stride=4)
    a.observe(windows[:cut], batch_size=batch, progress=False)
    b.observe(windows[cut:], first_window_index=cut, batch_size=batch, progress=False)
    a.merge(b)
    assert a.windows_seen == len(windows)
    _state_close(a.state(), one_pass)


def test_merge_refuses_different_settings(merge_setup):
    lm, windows, _ = merge_setup
    a, b = Profiler(lm, query_stride=2), Profiler(lm, query_stride=3)
    with pytest.raises(ValueError):
        a.merge(b)


def test_distribution_state_roundtrip(merge_setup):
    lm, windows, one_pass = merge_setup
    p = Profiler(lm, query_stride=2, lens_stride=4)
    p.load_state(one_pass, 6, 6 * 32)
    _state_close(p.state(), one_pass)
    assert math.isfinite(p.tables()["layers"]["block_influence"].iloc[0])
    assert isinstance(p.statistic("distribution"), ActivationDistribution)


@pytest.mark.parametrize("name", ["tiny-mixtral", "tiny-qwen3-moe"])
def test_expert_routing_against_the_router_recomputed(name):
    """The experts table against routing recomputed from each MoE layer's recorded input and the router's
    weight (softmax, top k, renormalised where the family does): share, first choice, mean weight."""
    lm = actlab.load_model(name)
    windows = make_windows(lm.tokenizer, load_corpus(None), WindowSpec(seq_len=SEQ, num_windows=WINDOWS))
    inputs: dict[int, list[torch.Tensor]] = {}
    with Probe(lm, "L*.mlp_in", lambda site, x: inputs.setdefault(site.layer, []).append(x.reshape(-1, x.shape[-1]))):
        with torch.no_grad():
            lm.model(windows)
    prof = Profiler(lm)
    prof.observe(windows, batch_size=2, progress=False)
    table = prof.tables()["experts"]
    assert sorted(table["layer"].unique()) == lm.adapter.moe_layers  # Qwen3-MoE's dense layer 1 has none
    for layer in lm.adapter.moe_layers:
        moe = lm.adapter.layers[layer].moe
        w = moe.routing(torch.cat(inputs[layer])).double()
        got = table[table["layer"] == layer].sort_values("expert")
        chosen = (w > 0).double()
        np.testing.assert_allclose(got["share"], chosen.mean(0).numpy(), rtol=1e-12)
        np.testing.assert_allclose(got["share"].sum(), moe.top_k, rtol=1e-12)
        first = torch.bincount(w.argmax(1), minlength=moe.num_experts).double() / len(w)
        np.testing.assert_allclose(got["first_choice"], first.numpy(), rtol=1e-12)
        np.testing.assert_allclose(got["mean_weight"], (w.sum(0) / chosen.sum(0)).numpy(), rtol=1e-5)
        np.testing.assert_allclose(got["load"], chosen.mean(0).numpy() * moe.num_experts / moe.top_k, rtol=1e-12)


def test_sink_local_and_streaming_mass(run):
    """Mass on the first four tokens, on a recent window and on both, against the recorded attention rows."""
    from actlab.probe.stats.attention_heads import SINK_TOKENS, AttentionHeads

    lm, windows, acts, _ = run
    ad, window = lm.adapter, 8
    stat = AttentionHeads(ad.num_heads, ad.num_kv_heads, ad.vocab_size, query_stride=STRIDE, recent_window=window)
    Profiler(lm, statistics=[stat], query_stride=STRIDE).observe(windows, progress=False)
    heads = stat.tables(TableContext(decode=str))["heads"]
    rows = sampled_queries(SEQ, STRIDE)
    rows = rows[rows > 0]
    for layer in range(ad.num_layers):
        probs = acts[f"L{layer}.attn_probs"][:, :, rows]  # [W, H, rows, T]
        sees_first = probs[..., 0] > 0
        sink = (probs[..., :SINK_TOKENS].sum(-1) * sees_first).sum(dim=(0, 2)) / sees_first.sum(dim=(0, 2))
        local, stream, n = torch.zeros(ad.num_heads), torch.zeros(ad.num_heads), 0
        for r, p in enumerate(rows.tolist()):
            if p < SINK_TOKENS + window:
                continue
            recent = probs[:, :, r, p - window + 1:p + 1].sum(-1)  # [W, H]
            local += recent.sum(0)
            stream += (recent + probs[:, :, r, :SINK_TOKENS].sum(-1)).sum(0)
            n += WINDOWS
        got = heads[heads["layer"] == layer].sort_values("head")
        np.testing.assert_allclose(got["sink_mass"], sink.numpy(), rtol=1e-5)
        np.testing.assert_allclose(got["local_mass"], (local / n).numpy(), rtol=1e-5)
        np.testing.assert_allclose(got["streaming_mass"], (stream / n).numpy(), rtol=1e-5)
