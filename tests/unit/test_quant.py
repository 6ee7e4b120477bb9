"""Weight quantization: the grid against a brute force over its levels, GPTQ and AWQ against what they
optimise (measured independently through the model), the bit allocation against an exhaustive search, and
the recipe's lifecycle (exact restore, files, composition, cost, exports)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import actlab
from actlab.calib import CalibrationSet
from actlab.errors import ConfigError
from actlab.export import export_hf
from actlab.models.keys import projection_key, split_key
from actlab.transforms import attach, compose, cost_of
from actlab.transforms.quant import METHODS, Grid, NoCalibration, QuantRecipe, get_method, quantize
from actlab.transforms.quant.awq import search_scale
from actlab.transforms.quant.base import input_groups
from actlab.transforms.quant.gptq import gptq_quantize, reconstruction_error
from actlab.transforms.quant.grid import fake_quantize_tokens, pack, unpack
from actlab.transforms.quant.mixed import allocate_bits, rounding_loss
from actlab.transforms.quant.recipe import HEAD, effective_weight


@pytest.fixture(scope="module")
def lm():
    return actlab.load_model("tiny-llama")


@pytest.fixture
def calib(lm, tmp_cache):
    g = torch.Generator().manual_seed(0)
    return CalibrationSet(lm, torch.randint(5, 250, (3, 48), generator=g), {"name": "random", "sha256": "q0"},
                          {"seq_len": 48})


def brute_force(w: np.ndarray, bits: int, group: int, symmetric: bool) -> np.ndarray:
    """Each weight replaced by the nearest of its group's 2^bits levels, the levels built from the group's range
    as the formats define them (scale and offset in float16, the rest in float64, one group at a time)."""
    out = np.empty_like(w, dtype=np.float64)
    n = 2 ** bits
    for r in range(w.shape[0]):
        for start in range(0, w.shape[1], group):
            g = w[r, start:start + group].astype(np.float64)
            if symmetric:
                big = g[np.argmax(np.abs(g))]
                d = np.float16(big / -(n // 2))  # scales and offsets are stored as float16
                levels = np.float64(d) * (np.arange(n) - n // 2)
            else:
                d = np.float16((g.max() - g.min()) / (n - 1))
                levels = np.float64(np.float16(g.min())) + np.float64(d) * np.arange(n)
            out[r, start:start + group] = levels[np.abs(g[:, None] - levels[None, :]).argmin(axis=1)]
    return out


@pytest.mark.parametrize("bits,group,symmetric", [(2, 16, False), (3, 32, True), (4, 32, False), (4, 0, True),
                                                  (5, 64, False), (8, 16, True)])
def test_round_to_nearest_equals_a_brute_force_over_the_levels(bits, group, symmetric):
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(bits)) * 0.1
    q = quantize(w, Grid(bits, group, symmetric))
    expected = brute_force(w.numpy(), bits, group or 64, symmetric)
    np.testing.assert_allclose(q.dequantize().double().numpy(), expected, atol=1e-6, rtol=0)
    assert int(q.codes.max()) <= 2 ** bits - 1
    torch.testing.assert_close(unpack(pack(q.codes, bits), bits), q.codes, rtol=0, atol=0)


def test_a_matrix_on_the_grid_comes_back_exactly():
    g = torch.Generator().manual_seed(1)
    grid = Grid(4, 32, False)
    codes = torch.randint(0, 16, (8, 64), generator=g, dtype=torch.uint8)
    codes[:, ::32], codes[:, 1::32] = 0, 15  # every group reaches both ends of its range
    scale, offset = (torch.rand(8, 2, generator=g) + 0.1).half().float(), torch.randn(8, 2, generator=g).half().float()
    w = (codes.float().reshape(8, 2, 32) * scale[..., None] + offset[..., None]).reshape(8, 64)
    q = quantize(w, grid)
    torch.testing.assert_close(q.dequantize(), w, rtol=0, atol=1e-6)


def test_per_token_activation_quantization_keeps_each_tokens_maximum():
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    y = fake_quantize_tokens(x, 8)
    step = x.abs().amax(-1, keepdim=True) / 127
    assert float(((y - x).abs() / step).max()) <= 0.5 + 1e-5
    torch.testing.assert_close(y.abs().amax(-1), x.abs().amax(-1))


@pytest.mark.parametrize("bad", [dict(bits=1), dict(bits=9), dict(bits=4.0), dict(group=-1)])
def test_bad_grids_are_one_line_errors(bad):
    with pytest.raises(ConfigError, match="bits|group"):
        get_method("rtn", **bad)


def test_a_group_that_does_not_divide_the_channels_is_refused(lm):
    with pytest.raises(ConfigError, match="group 48 does not divide the 64 input channels of L0.q; groups that "
                                          "do: 16, 32, 64"):
        get_method("rtn", group=48).calibrate(NoCalibration(lm))


def test_a_mixed_budget_outside_the_precisions_on_offer_is_refused(lm, calib):
    with pytest.raises(ConfigError, match="below the lowest precision on offer"):
        get_method("mixed", group=32, candidates="3,4").calibrate(calib, 2.5)
    with pytest.raises(ConfigError, match="above the highest"):
        get_method("mixed", group=32, candidates="3,4").calibrate(calib, 4.5)
    with pytest.raises(ConfigError, match="needs --avg-bits"):
        get_method("layerwise", group=32).calibrate(calib, None)
    with pytest.raises(ConfigError, match="unknown quantization method"):
        get_method("nope")


def recorded(lm, windows, keys=None, side="input") -> dict[str, torch.Tensor]:
    """Each projection's input (or output) on `windows`, read by hooks on the modules (independent of actlab's
    probes)."""
    seen: dict[str, list[torch.Tensor]] = {}
    handles = []
    for layer in lm.adapter.layers:
        for role, view in layer.linears.items():
            key = projection_key(layer.index, role)
            if keys is not None and key not in keys:
                continue
            keep = (lambda k, t: seen.setdefault(k, []).append(t.detach().reshape(-1, t.shape[-1])))
            handles.append(view.module.register_forward_pre_hook(lambda m, a, k=key: keep(k, a[0])) if side == "input"
                           else view.module.register_forward_hook(lambda m, a, o, k=key: keep(k, o)))
    try:
        with torch.no_grad():
            lm.model(windows)
    finally:
        for h in handles:
            h.remove()
    return {k: torch.cat(v).double() for k, v in seen.items()}


def _view(lm, key):
    layer, role = split_key(key)
    return lm.adapter.layers[layer].linears[role]


def test_gptq_reconstructs_every_projection_better_than_rtn(lm, calib):
    gptq = get_method("gptq", bits=3, group=32, sequential=False).calibrate(calib)
    rtn = get_method("rtn", bits=3, group=32).calibrate(calib)
    xs = recorded(lm, calib.windows)
    for key, x in xs.items():
        w = _view(lm, key).weight().double()
        err = {name: float(((x @ (w - effective_weight(r.weights[key]).double()).T) ** 2).sum())
               for name, r in (("gptq", gptq), ("rtn", rtn))}
        assert err["gptq"] < err["rtn"], key
        assert gptq.calibration["reconstruction_error"][key]["gptq"] == pytest.approx(err["gptq"], rel=1e-6)


def test_gptq_with_uncorrelated_inputs_is_round_to_nearest():
    """H = I: no channel's error can be compensated by another, so every column rounds to nearest."""
    w = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    for grid in (Grid(3, 16, False), Grid(4, 0, True)):
        q = gptq_quantize(w, torch.eye(64), grid, block=32)
        torch.testing.assert_close(q.dequantize(), quantize(w, grid).dequantize(), rtol=0, atol=1e-6)


def test_gptq_act_order_keeps_contiguous_groups_and_beats_rtn():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(512, 64, generator=g) * torch.linspace(0.1, 3, 64)
    x[:, 5] *= 20
    H = x.T.double() @ x.double()
    w = torch.randn(16, 64, generator=g)
    grid = Grid(3, 16, False)
    for act_order in (False, True):
        q = gptq_quantize(w, H, grid, block=32, act_order=act_order)
        assert q.scale.shape == (16, 4)
        assert reconstruction_error(w, q.dequantize(), H) < reconstruction_error(w, quantize(w, grid).dequantize(), H)


def test_sequential_gptq_runs_on_the_quantized_layers_before(lm, calib):
    """Sequential and one-pass GPTQ agree on layer 0 (same inputs) and differ after it."""
    seq = get_method("gptq", bits=3, group=32).calibrate(calib)
    flat = get_method("gptq", bits=3, group=32, sequential=False).calibrate(calib)
    first = [k for k in seq.weights if k.startswith("L0.") and k.split(".")[1] in ("q", "k", "v")]
    for key in first:
        torch.testing.assert_close(seq.weights[key]["codes"], flat.weights[key]["codes"])
    assert any(not torch.equal(seq.weights[k]["codes"], flat.weights[k]["codes"]) for k in seq.weights
               if k.startswith("L2."))


def _group_error(lm, recipe: QuantRecipe, keys: list[str], windows) -> float:
    """Sum over `keys` of the squared change of the projection's output, measured through the model with only
    those projections quantized (the same inputs as the dense model)."""
    part = QuantRecipe(recipe.method, recipe.model, {k: recipe.weights[k] for k in keys})
    dense = recorded(lm, windows, keys, side="output")
    with attach(lm, part):
        moved = recorded(lm, windows, keys, side="output")
    return sum(float(((moved[k] - dense[k]) ** 2).sum()) for k in keys)


def test_awq_search_picks_the_scale_with_the_least_measured_error(lm, calib):
    n_grid = 8
    searched = get_method("awq", bits=3, group=32, n_grid=n_grid, clip=False).calibrate(calib)
    fixed = {a: get_method("awq", bits=3, group=32, alpha=a / n_grid, clip=False).calibrate(calib)
             for a in range(n_grid)}
    for layer in lm.adapter.layers:
        for roles in input_groups(layer):
            keys = [projection_key(layer.index, r) for r in roles]
            measured = {a: _group_error(lm, r, keys, calib.windows) for a, r in fixed.items()}
            best = min(measured, key=measured.get) / n_grid
            assert searched.calibration["alpha"][keys[0]] == pytest.approx(best), keys


def test_awq_scale_search_beats_no_scaling_on_an_outlier_channel():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(256, 64, generator=g)
    x[:, 3] *= 50
    w = torch.randn(32, 64, generator=g)
    alpha, s, tried = search_scale([w], x, Grid(3, 32, False), n_grid=10)
    assert alpha > 0 and min(e for _, e in tried) < tried[0][1]


def test_recipe_attach_restores_the_model_bit_for_bit_and_round_trips_a_file(lm, calib, tmp_path):
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    objects = [p for p in lm.model.parameters()]
    recipe = get_method("awq", bits=4, group=32, head=True).calibrate(calib)
    recipe.save(tmp_path / "q.json")
    loaded = QuantRecipe.load(tmp_path / "q.json")
    ids = calib.windows[:1]
    with attach(lm, recipe):
        a = lm.model(ids).logits
        assert not torch.equal(lm.adapter.lm_head.weight, lm.adapter.embed.weight)  # a tied head quantized alone
        assert torch.equal(lm.adapter.embed.weight, before["model.embed_tokens.weight"])
    with attach(lm, loaded):
        b = lm.model(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(torch.equal(v, before[k]) for k, v in lm.model.state_dict().items())
    assert all(p is q for p, q in zip(lm.model.parameters(), objects))
    with attach(lm, recipe):
        for key, e in recipe.weights.items():
            if key != HEAD:
                torch.testing.assert_close(_view(lm, key).weight(), effective_weight(e), rtol=0, atol=0)


def test_cost_counts_code_bits_and_scales(lm):
    recipe = get_method("rtn", bits=4, group=32).calibrate(NoCalibration(lm))
    dense = cost_of(lm, None)
    cost = cost_of(lm, recipe)
    proj = sum(v.num_params for layer in lm.adapter.layers for v in layer.linears.values())
    saved = proj * (32 - (4 + 32 / 32)) / 8  # 4-bit codes + a float16 scale and offset per 32 weights
    assert dense.weight_bytes_per_token - cost.weight_bytes_per_token == pytest.approx(saved)


def test_quantization_composes_with_sparsity_and_refuses_a_second_quantization(lm, calib):
    from actlab.transforms.sparsity.recipe import MaskRule, SparsityRecipe, model_fingerprint

    q = get_method("rtn", bits=4, group=32).calibrate(calib)
    sparse = SparsityRecipe("manual", 0.0, model_fingerprint(lm.adapter, lm.name), {"L0.q": MaskRule(threshold=0.05)})
    ids = calib.windows[:1]
    with attach(lm, [sparse, q]):
        both = lm.model(ids).logits
    assert both.isfinite().all()
    with pytest.raises(ConfigError, match="both weights weights:L0.q"):
        with attach(lm, [q, get_method("rtn", bits=3, group=32).calibrate(calib)]):
            pass
    w8a8 = get_method("smoothquant").calibrate(calib)
    assert {c.kind for c in w8a8.claims(lm) if c.target == "L0.q_in"} == {"quantize"}
    with pytest.raises(ConfigError, match="cannot stack"):
        with attach(lm, compose(w8a8, QuantRecipe("x", w8a8.model, {"L0.q": w8a8.weights["L0.q"]}))):
            pass


def test_smoothquant_is_w8a8_of_the_smoothed_weights(lm, calib):
    recipe = get_method("smoothquant", alpha=0.5).calibrate(calib)
    e = recipe.weights["L1.gate"]
    assert e["bits"] == 8 and e["act_bits"] == 8 and e["group"] == 0
    s = e["input_scale"]
    seen = {}
    module = lm.adapter.layers[1].linears["gate"].module
    handles = [module.register_forward_pre_hook(lambda m, a: seen.update(x=a[0])),  # before the recipe's edit
               module.register_forward_hook(lambda m, a, o: seen.update(y=o))]
    try:
        with attach(lm, recipe), torch.no_grad():
            lm.model(calib.windows)
    finally:
        for h in handles:
            h.remove()
    w_codes = effective_weight(e) * s[None, :]  # the 8-bit weights of W diag(s)
    torch.testing.assert_close(quantize(w_codes, Grid(8, 0, True)).dequantize(), w_codes)  # on an 8-bit grid
    expected = fake_quantize_tokens(seen["x"] / s, 8) @ w_codes.T
    torch.testing.assert_close(seen["y"], expected, rtol=1e-4, atol=1e-5)


def test_bit_allocation_matches_an_exhaustive_search():
    rng = np.random.default_rng(6)
    cands = (2, 3, 4, 8)
    for trial in range(20):
        keys = [f"L{i}.q" for i in range(5)]
        params = {k: int(rng.integers(1, 4)) * 100 for k in keys}
        losses = {}
        for k in keys:  # decreasing and convex in the bits, as rounding error is
            base = rng.uniform(0.1, 10)
            losses[k] = {b: base * 4.0 ** (-b) for b in cands}
        avg = float(rng.uniform(2.2, 5))
        budget = avg * sum(params.values())
        best = min(sum(losses[k][b] for k, b in zip(keys, combo)) for combo in itertools.product(cands, repeat=5)
                    if sum(params[k] * b for k, b in zip(keys, combo)) <= budget + 1e-9)
        got = allocate_bits(losses, params, avg)
        assert sum(params[k] * b for k, b in got.items()) <= budget + 1e-9
        assert sum(losses[k][b] for k, b in got.items()) <= best * 1.25 + 1e-12, trial


def test_rounding_loss_is_the_fisher_weighted_output_error(lm, calib):
    w = torch.randn(6, 64, generator=torch.Generator().manual_seed(7))
    x = torch.randn(100, 64, generator=torch.Generator().manual_seed(8)).double()
    energy = torch.rand(6, dtype=torch.float64)
    grid = Grid(3, 32, False)
    d = (w - quantize(w, grid).dequantize()).double()
    direct = 0.5 * float((energy[None, :] * (x @ d.T) ** 2).sum(1).mean())
    assert rounding_loss(w, grid, x.T @ x / x.shape[0], energy) == pytest.approx(direct, rel=1e-9)


def test_mixed_precision_meets_its_budget_and_spends_bits_where_the_loss_is(lm, calib):
    recipe = get_method("mixed", group=32, candidates="2,3,4,8").calibrate(calib, 3.5)
    assert recipe.average_bits() <= 3.5 + 1e-9 and recipe.average_bits() > 3.0
    assert len({e["bits"] for e in recipe.weights.values()}) > 1
    layerwise = get_method("layerwise", group=32).calibrate(calib, 3.5)
    assert layerwise.average_bits() <= 3.5 + 1e-9
    assert set(layerwise.calibration["layer_bits"]) <= {3, 4}
    expected = recipe.calibration["expected_loss"]
    assert sum(expected.values()) > 0


def test_every_method_exports_to_a_directory_plain_transformers_loads(lm, calib, tmp_path):
    ids = calib.windows[:1]
    for name in ("rtn", "gptq", "awq"):
        recipe = get_method(name, bits=4, group=32, head=(name == "rtn")).calibrate(calib)
        out = tmp_path / name
        report = export_hf(lm, recipe, out)
        assert report["folded"] == [recipe.describe()]
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        with torch.no_grad(), attach(lm, recipe):
            torch.testing.assert_close(plain(ids).logits, lm.model(ids).logits, rtol=1e-5, atol=1e-5)
    w8a8 = get_method("smoothquant").calibrate(calib)
    assert export_hf(lm, w8a8, tmp_path / "sq")["embedded"] == [w8a8.describe()]


def test_every_method_runs_on_every_tiny_family(tiny, tmp_cache):
    g = torch.Generator().manual_seed(9)
    calib = CalibrationSet(tiny, torch.randint(5, 250, (2, 32), generator=g), {"name": "random", "sha256": "q9"},
                           {"seq_len": 32})
    ids = calib.windows[:1]
    dense = tiny.model(ids).logits
    for name, cls in METHODS.items():
        kw = {} if name == "smoothquant" else {"bits": 8, "group": 16}
        recipe = cls(**kw).calibrate(calib, 8.0 if cls.mixed else None)
        with attach(tiny, recipe), torch.no_grad():
            moved = tiny.model(ids).logits
        assert (moved - dense).norm() < 0.05 * dense.norm(), name  # 8 bits: close to dense


@pytest.mark.parametrize("grid,block", [((4, 32, False), "Q4_1"), ((4, 32, True), "Q4_0"), ((8, 32, True), "Q8_0"),
                                        ((5, 32, False), "Q5_1")])
def test_gguf_export_writes_the_grids_block_type_and_reads_back(grid, block, tmp_path):
    import gguf

    from actlab.export import export_gguf
    from actlab.transforms.layers import LayerRecipe

    lm = actlab.load_model("tiny-qwen2")
    bits, group, symmetric = grid
    full = get_method("rtn", bits=bits, group=group, symmetric=symmetric).calibrate(NoCalibration(lm))
    recipe = QuantRecipe("rtn", full.model, {k: e for k, e in full.weights.items() if not k.startswith("L1.")})
    both = compose(LayerRecipe("manual", lm.identity.to_dict(), ["L1"]), recipe)  # the kept layers renumbered
    report = export_gguf(lm, both, tmp_path / "q.gguf")
    n_matrices = 7 * (lm.adapter.num_layers - 1)
    assert report["block_types"] == {block.lower(): n_matrices}
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "q.gguf")).tensors}
    assert types["blk.0.attn_q.weight"] == block and types["token_embd.weight"] == "F32"
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="q.gguf", dtype=torch.float32)
    ids = torch.arange(5, 40)[None]
    with torch.no_grad(), attach(lm, both):
        expected = lm.model(ids).logits
        got = back(ids).logits
    # the same grid, up to GGUF's float16 scales (Q8_0 re-rounds onto its absmax / 127 grid)
    assert float((got - expected).norm() / expected.norm()) < (2e-2 if block == "Q8_0" else 5e-3)


def test_gguf_export_of_a_dense_model_in_a_block_type(tmp_path):
    import gguf

    from actlab.export import export_gguf

    lm = actlab.load_model("tiny-qwen2")
    export_gguf(lm, None, tmp_path / "d.gguf", dtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(tmp_path / "d.gguf")).tensors}
    assert types["blk.0.ffn_down.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    with pytest.raises(ConfigError, match="--dtype must be one of"):
        export_gguf(lm, None, tmp_path / "x.gguf", dtype="q3_k")
