"""The report's layer-importance section: the profile's angular distances against a brute force over hidden
states, the rankings and rank correlations against an independent computation, and the measured ranking that
`actlab layers --importance --run` adds to a run (refused for another model's run)."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

import actlab
from actlab.analyze.importance import ANGULAR, MEASURED, agreement, part_metrics, rankings, removal_order
from actlab.probe import Profiler

from .test_layer_methods import hidden_states


def spearman(a, b) -> float:
    """Spearman's rho from its definition on untied ranks: 1 - 6 sum d^2 / (n (n^2 - 1))."""
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    n = len(a)
    return 1 - 6 * float(((ra - rb) ** 2).sum()) / (n * (n * n - 1))


def test_a_profile_of_every_site_holds_the_angular_distance_between_all_depths():
    lm = actlab.load_model("tiny-llama")
    windows = torch.randint(5, 250, (2, 40), generator=torch.Generator().manual_seed(1))
    prof = Profiler(lm)  # every site: the blocks' inputs after the first are hooked only as resid_out
    prof.observe(windows)
    table = prof.tables()["angular_distance"]
    h = hidden_states(lm, windows)
    assert len(table) == h.shape[0] * (h.shape[0] - 1) // 2
    for r in table.itertuples():
        cos = F.cosine_similarity(h[r.start], h[r.start + r.span], dim=-1).clamp(-1, 1)
        assert r.angular_distance == pytest.approx(float(torch.arccos(cos).mean() / math.pi), abs=1e-5)


def synthetic_tables(layers: int = 6, seed: int = 0) -> dict[str, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    table = pd.DataFrame({"layer": range(layers), "block_influence": rng.uniform(0.01, 0.5, layers),
                          "cos_attn": rng.uniform(0.5, 0.99, layers), "cos_mlp": rng.uniform(0.5, 0.99, layers)})
    angular = pd.DataFrame([{"start": a, "span": n, "angular_distance": rng.uniform(0, 0.5)}
                            for a in range(layers) for n in range(1, layers - a + 1)])
    parts = [f"L{i}{s}" for i in range(layers) for s in ("", ".attn", ".mlp")]
    measured = pd.DataFrame({"part": parts, "delta_loss": rng.uniform(-0.01, 2.0, len(parts))})
    return {"layers": table, "angular_distance": angular, "importance": measured}


def test_rankings_and_agreement_equal_an_independent_computation():
    tables = synthetic_tables()
    parts = part_metrics(tables)
    layers, measured = tables["layers"], tables["importance"].set_index("part")["delta_loss"]
    by_block = measured[[f"L{i}" for i in range(6)]].to_numpy()
    assert removal_order(parts, "block", "Block Influence") == [f"L{i}" for i in np.argsort(layers["block_influence"])]
    attn = measured[[f"L{i}.attn" for i in range(6)]]
    assert removal_order(parts, "attn", MEASURED) == list(attn.sort_values().index)
    rho = agreement(parts).set_index(["kind", "metric", "against"])["spearman"]
    assert rho["block", "Block Influence", MEASURED] == pytest.approx(spearman(layers["block_influence"], by_block))
    d1 = tables["angular_distance"].query("span == 1").sort_values("start")["angular_distance"].to_numpy()
    assert rho["block", ANGULAR, MEASURED] == pytest.approx(spearman(d1, by_block))
    mlp = measured[[f"L{i}.mlp" for i in range(6)]].to_numpy()
    assert rho["mlp", "1 - cos(x, x + mlp)", MEASURED] == pytest.approx(spearman(1 - layers["cos_mlp"], mlp))
    listed = {(r["kind"], r["metric"]): r for r in rankings(parts, first=3)}
    row = listed["MLP sublayers", "1 - cos(x, x + mlp)"]
    assert row["first"] == ", ".join(f"L{i}.mlp" for i in np.argsort(1 - layers["cos_mlp"].to_numpy())[:3])
    assert row["spearman_with_measured"] == pytest.approx(spearman(1 - layers["cos_mlp"], mlp))
    without = part_metrics({k: v for k, v in tables.items() if k != "importance"})
    assert MEASURED not in without and agreement(without)["against"].tolist() == [ANGULAR]


def test_layers_importance_adds_the_measured_ranking_to_a_run(tmp_path, tmp_cache):
    run = [sys.executable, "-m", "actlab.cli"]
    out = subprocess.run(run + ["profile", "--model", "tiny-llama", "--out", str(tmp_path / "run"), "--tokens", "1024",
                                "--seq-len", "256"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    before = (tmp_path / "run" / "report.html").read_text()
    assert 'id="plot-importance"' in before and "holds no measured losses" in before
    out = subprocess.run(run + ["layers", "--model", "tiny-llama", "--importance", "--run", str(tmp_path / "run"),
                                "--calib-windows", "2", "--seq-len", "256"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = pd.read_parquet(tmp_path / "run" / "tables" / "importance.parquet")
    assert sorted(measured["part"]) == sorted(f"L{i}{s}" for i in range(3) for s in ("", ".attn", ".mlp"))
    after = (tmp_path / "run" / "report.html").read_text()
    assert "holds no measured losses" not in after and MEASURED in after
    out = subprocess.run(run + ["layers", "--model", "tiny-qwen2", "--importance", "--run", str(tmp_path / "run"),
                                "--calib-windows", "2", "--seq-len", "256"], capture_output=True, text=True)
    last = out.stderr.strip().splitlines()[-1]
    assert out.returncode != 0 and last.startswith("error: --run") and "another model" in last
    assert "measuring every part" not in out.stderr  # refused before the long part
    out = subprocess.run(run + ["layers", "--model", "tiny-llama", "--run", str(tmp_path / "run"), "--save", "x.json",
                                "--remove", "L1"], capture_output=True, text=True)
    assert out.returncode != 0 and "--run is for --importance" in out.stderr
