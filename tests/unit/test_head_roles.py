"""Head roles: the induction and retrieval scores against eager attention weights from transformers itself, the
probes' construction, their place in a profile run (measured once, kept through a merge), and the role list."""

from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

import actlab
from actlab.analyze.head_roles import INDUCTION_SCORE, heads_by_role, role_scores
from actlab.probe.stats.base import TableContext
from actlab.probe.stats.head_roles import HeadRoles, induction_probes, retrieval_probes


def eager_attentions(lm, ids):
    """Every layer's attention weights [H, T, T] and the logits [T, V] from an eager copy of the model."""
    model = copy.deepcopy(lm.model)
    model.set_attn_implementation("eager")
    with torch.no_grad():
        out = model(input_ids=ids[None], output_attentions=True, use_cache=False)
    return [a[0].double() for a in out.attentions], out.logits[0]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3", "tiny-qwen2"])
def test_head_role_scores_equal_eager_attention(name):
    lm = actlab.load_model(name)
    stat = HeadRoles(lm.adapter.num_heads)
    stat.run_probes(lm)
    table = stat.tables(TableContext(decode=str))["head_roles"].set_index(["layer", "head"])
    layers, heads = lm.adapter.num_layers, lm.adapter.num_heads
    induction = torch.zeros(layers, heads, dtype=torch.float64)
    count = 0
    for probe in induction_probes(lm):
        ids, q, k = probe["ids"], probe["queries"], probe["keys"]
        assert torch.equal(ids[q], ids[k - 1])  # each query's token occurred once before, just before its key
        attentions, _ = eager_attentions(lm, ids)
        for layer, a in enumerate(attentions):
            induction[layer] += a[:, q, k].sum(-1)
        count += len(q)
    hits = torch.zeros(layers, heads, dtype=torch.float64)
    copied = answers = 0
    for probe in retrieval_probes(lm):
        ids, q, k = probe["ids"], probe["queries"], probe["keys"]
        assert torch.equal(ids[k], probe["answers"]) and torch.equal(ids[q + 1], probe["answers"])
        attentions, logits = eager_attentions(lm, ids)
        right = logits[q].argmax(-1) == probe["answers"]
        copied, answers = copied + int(right.sum()), answers + len(q)
        for layer, a in enumerate(attentions):
            hits[layer] += ((a[:, q].argmax(-1) == k[None]) & right[None]).sum(-1)
    for layer in range(layers):
        for head in range(heads):
            row = table.loc[(layer, head)]
            assert row["induction_score"] == pytest.approx(float(induction[layer, head]) / count, rel=1e-4, abs=1e-6)
            assert row["retrieval_score"] == pytest.approx(float(hits[layer, head]) / answers)
            assert row["copy_accuracy"] == pytest.approx(copied / answers)


def test_a_planted_induction_head_is_found():
    """Brute force cannot tell the probes' positions are right if every score is near zero: a model whose one
    head attends exactly from each token to the key after that token's earlier occurrence must score 1."""
    lm = actlab.load_model("tiny-llama")
    stat = HeadRoles(lm.adapter.num_heads)
    plan = induction_probes(lm)[0]
    stat._begin(lm.adapter)
    t = len(plan["ids"])
    probs = torch.full((1, lm.adapter.num_heads, t, t), 1.0 / t)
    probs[0, 2] = 0.0
    probs[0, 2, plan["queries"], plan["keys"]] = 1.0
    stat._plan = {"kind": "induction", **plan}
    site = type("S", (), {"layer": 1})()
    stat._deliver(site, probs)
    stat._end()
    scores = stat.tables(TableContext(decode=str))["head_roles"]
    assert float(scores.query("layer == 1 and head == 2")["induction_score"].iloc[0]) == pytest.approx(1.0)
    assert float(scores.query("layer == 1 and head == 0")["induction_score"].iloc[0]) == pytest.approx(1.0 / t)


def test_a_profile_measures_head_roles_once_and_a_merge_keeps_them(tmp_path, tmp_cache):
    from actlab.jobs.profile import ProfileOptions, merge, profile

    runs = [profile("tiny-llama", None, tmp_path / name, tokens=256, seq_len=64, progress=False, log=lambda *a: None)
            for name in ("a", "b")]
    tables = [pd.read_parquet(r.path / "tables" / "head_roles.parquet") for r in runs]
    pd.testing.assert_frame_equal(tables[0], tables[1])  # the same probes for every run of a model
    merged = merge([r.path for r in runs], tmp_path / "m", log=lambda *a: None)
    pd.testing.assert_frame_equal(pd.read_parquet(merged.path / "tables" / "head_roles.parquet"), tables[0])
    assert 'id="roles-table"' in (merged.path / "report.html").read_text()
    ffn = profile("tiny-llama", None, tmp_path / "ffn", tokens=256, seq_len=64, progress=False, log=lambda *a: None,
                  options=ProfileOptions(sites="L*.down_in"))
    assert pd.read_parquet(ffn.path / "tables" / "head_roles.parquet").empty  # a run that reads no attention


def test_heads_by_role_apply_each_threshold():
    heads = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "first_token_mass": [0.9, 0.1, 0.6, 0.2],
                          "streaming_mass": [0.95, 0.5, 0.99, 0.3]})
    roles = pd.DataFrame({"layer": [0, 0, 1, 1], "head": [0, 1, 0, 1], "induction_score": [0.0, 0.8, 0.31, 0.29],
                          "retrieval_score": [0.0, 0.5, 0.0, 0.05]})
    listed = {r["role"]: r for r in heads_by_role({"heads": heads, "head_roles": roles}, first=1)}
    assert listed["sink"]["chosen"] == [(0, 0), (1, 0)] and listed["sink"]["heads"].endswith("and 1 more")
    assert listed["streaming"]["chosen"] == [(1, 0), (0, 0)]
    assert listed["induction"]["chosen"] == [(0, 1), (1, 0)] and INDUCTION_SCORE == 0.3
    assert listed["retrieval"]["chosen"] == [(0, 1)]
    assert set(role_scores({"heads": heads})) == {"layer", "head", "sink", "streaming"}
