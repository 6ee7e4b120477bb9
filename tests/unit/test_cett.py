"""PPL-p% sparsity with the CETT criterion (Sparsing Law) on tiny models, against brute force."""

from __future__ import annotations

import pytest
import torch

import actlab
from actlab.transforms.sparsity import CalibrationData
from actlab.transforms.sparsity.cett import CettLayer, collect_layers, recipe_for, sparsity_at_ppl


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    import os

    before = os.environ.get("ACTLAB_CACHE")
    os.environ["ACTLAB_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    lm = actlab.load_model("tiny-llama")
    yield CalibrationData.from_corpus(lm, None, seq_len=64, windows=8)
    if before is None:
        os.environ.pop("ACTLAB_CACHE", None)
    else:
        os.environ["ACTLAB_CACHE"] = before


def brute_force_cett(a: torch.Tensor, w: torch.Tensor, eps: float) -> float:
    """Per token: || sum of the dropped neurons' output vectors || / || full output ||, averaged."""
    values = []
    for token in a:
        vectors = [token[i] * w[:, i] for i in range(w.shape[1])]
        dropped = [v for v in vectors if v.norm() < eps]
        total = torch.stack(vectors).sum(0)
        part = torch.stack(dropped).sum(0) if dropped else torch.zeros_like(total)
        values.append(float(part.norm() / total.norm()))
    return sum(values) / len(values)


def test_cett_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(6, 12, generator=g)
    w = torch.randn(5, 12, generator=g)
    layer = CettLayer(a, w.norm(dim=0), w, (a @ w.t()).norm(dim=-1))
    for eps in (0.0, 0.5, 1.5, 3.0, 100.0):
        assert layer.cett(eps) == pytest.approx(brute_force_cett(a, w, eps), rel=1e-5, abs=1e-6)
    assert layer.cett(100.0) == pytest.approx(1.0, rel=1e-5)  # everything dropped


def test_per_layer_thresholds_hit_the_common_cett(calib):
    layers = collect_layers(calib, tokens=128)
    assert len(layers) == len(calib.lm.adapter.layers)
    for c in (0.05, 0.2):
        for layer in layers:
            eps = layer.threshold_for(c)
            assert layer.cett(eps) <= c + 1e-6
            # the threshold is the largest such eps: a slightly larger one exceeds c (CETT is a step function)
            values = (layer.activations.abs() * layer.norms).flatten().sort().values
            nxt = values[values > eps]
            if len(nxt):
                assert layer.cett(float(nxt[0]) * (1 + 1e-6)) > c - 1e-6


def test_recipe_drops_more_with_larger_cett(calib):
    layers = collect_layers(calib, tokens=128)
    small, large = recipe_for(calib, layers, 0.05), recipe_for(calib, layers, 0.3)
    assert set(small.rules) == {f"L{i}.down" for i in range(len(layers))}
    assert all(large.rules[k].threshold >= small.rules[k].threshold for k in small.rules)


def test_sparsity_at_ppl_respects_the_limit(calib):
    ids = calib.windows[:2]
    tight = sparsity_at_ppl(calib, ids, p=1.0, steps=5, tokens=128, progress=False)
    loose = sparsity_at_ppl(calib, ids, p=50.0, steps=5, tokens=128, progress=False)
    for out in (tight, loose):
        assert out["ppl"] <= out["ppl_limit"] * (1 + 1e-9)
        assert 0.0 <= out["activation_sparsity"] <= 1.0
    assert loose["activation_sparsity"] >= tight["activation_sparsity"]
    assert loose["cett"] >= tight["cett"]
