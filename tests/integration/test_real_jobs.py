"""The main jobs end to end on the real SmolLM2-135M, small: profile (run directory + report), sparsify and
sparsity-at-ppl through the CLI (JSON contracts)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from ..unit.test_parallel import assert_same_tables

pytestmark = pytest.mark.real


def actlab_cli(*args: str, **env: str) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "actlab.cli", *args], capture_output=True, text=True, timeout=1200,
                         env={**os.environ, **env})
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def test_profile_small(smollm2, tmp_path):
    one_thread = {"OMP_NUM_THREADS": "1"}  # the two-process run below gets the same per-process arithmetic
    actlab_cli("profile", "--model", "smollm2-135m", "--tokens", "1024", "--seq-len", "512", "--out",
               str(tmp_path / "run"), **one_thread)
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["tokens_done"] == 1024
    layers = pd.read_parquet(tmp_path / "run" / "tables" / "layers.parquet")
    assert len(layers) == 30
    heads = pd.read_parquet(tmp_path / "run" / "tables" / "heads.parquet")
    assert len(heads) == 30 * 9
    html = (tmp_path / "run" / "report.html").read_text()
    assert "smollm2-135m" in html and html.count("data:image/png;base64") >= 6  # every plot, inlined
    # the same profile on two processes (gloo): the same tables
    actlab_cli("profile", "--model", "smollm2-135m", "--tokens", "1024", "--seq-len", "512", "--nproc", "2",
               "--out", str(tmp_path / "two"), **one_thread)
    assert json.loads((tmp_path / "two" / "manifest.json").read_text())["processes"] == 2
    assert_same_tables(tmp_path / "run", tmp_path / "two")


def test_sparsify_json(smollm2, tmp_path):
    out = actlab_cli("sparsify", "--model", "smollm2-135m", "--method", "wina", "--sparsity", "0.4",
                     "--seq-len", "256", "--windows", "2", "--calib-windows", "4", "--save", str(tmp_path / "r.json"),
                     "--json")
    result = json.loads(out.stdout)
    for key in ("dense_ppl", "sparse_ppl", "target_sparsity", "achieved_sparsity", "method", "model"):
        assert key in result
    assert result["method"] == "wina" and result["target_sparsity"] == 0.4
    assert abs(result["achieved_sparsity"] - 0.4) < 0.06
    assert result["sparse_ppl"] > result["dense_ppl"]
    # the saved recipe reproduces the same perplexity
    again = json.loads(actlab_cli("sparsify", "--model", "smollm2-135m", "--recipe", str(tmp_path / "r.json"),
                                  "--seq-len", "256", "--windows", "2", "--json").stdout)
    assert again["sparse_ppl"] == pytest.approx(result["sparse_ppl"], rel=1e-6)


def test_list_methods_format():
    """A table for people, JSON for programs: every method with engine support, parameters and paper."""
    from actlab.transforms.sparsity import HOOKS_ONLY, METHODS

    rows = json.loads(actlab_cli("sparsify", "--list-methods", "--json").stdout)
    assert [r["method"] for r in rows] == list(METHODS)
    for r in rows:
        assert r["paper"] and r["engine"] == (r["method"] not in HOOKS_ONLY)
    assert {r["method"]: r["parameters"] for r in rows}["wina"] == {"topk": False}
    table = actlab_cli("sparsify", "--list-methods").stdout
    assert all(name in table for name in METHODS) and "hooks only" in table and "W[:,i]" in table
