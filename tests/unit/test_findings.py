"""Report findings and token display, on hand-made tables: the wording follows the numbers."""

from __future__ import annotations

import pandas as pd
import pytest

from actlab.analyze.findings import BI_DROP, findings, layer_findings
from actlab.report.html import show_token


def _layers(bi, lens):
    return pd.DataFrame({"layer": range(len(bi)), "block_influence": bi, "cos_attn": [0.5] * len(bi),
                         "logit_lens_loss": lens})


def test_one_layer_is_named_in_the_singular_and_the_lens_finding_reads_the_curve():
    texts = [f.text for f in layer_findings(_layers([0.3, BI_DROP / 2, 0.2], [9.0, 6.0, 5.0]))]
    assert texts[0].startswith("layer 1 has Block Influence")
    assert "at layer 2" not in texts[-1] and "only at the last layer" in texts[-1]
    texts = [f.text for f in layer_findings(_layers([BI_DROP / 2, BI_DROP / 3, 0.2], [9.0, 5.2, 5.0]))]
    assert texts[0].startswith("layers 0-1 have Block Influence")
    assert "at layer 1 (layers 0-2); layer 2 refines it" in texts[-1]


def test_tokens_are_shown_as_quoted_text_not_unicode_escapes():
    assert show_token("<bos>") == '"<bos>"' and show_token("\n") == '"\\n"' and show_token(" the") == '" the"'


def _tables():
    n = 16
    layers = _layers([0.5 - 0.01 * i for i in range(n)], [9.0 - 0.2 * i for i in range(n)])
    layers["cos_attn"] = [0.995 if i in (3, 4) else 0.9 for i in range(n)]
    layers["resid_max_over_median"] = [500.0 if i == 2 else 10.0 for i in range(n)]
    sparsity = pd.DataFrame({"site": [f"L{i}.down_in" for i in range(n)], "layer": range(n), "kind": "down_in",
                             "eps": 0.01, "fraction_below": [0.40 + 0.01 * i for i in range(n)]})
    heads = pd.DataFrame({"layer": [0, 0, 1, 5], "head": [0, 1, 0, 2], "first_token_mass": [0.9, 0.1, 0.7, 0.2]})
    heads["streaming_mass"] = [0.95, 0.5, 0.97, 0.2]
    roles = pd.DataFrame({"layer": [0, 0, 1, 5], "head": [0, 1, 0, 2], "induction_score": 0.0,
                          "retrieval_score": [0.0, 0.4, 0.0, 0.2]})
    return {"layers": layers, "sparsity": sparsity, "heads": heads, "head_roles": roles}


def test_next_steps_are_commands_derived_from_the_numbers():
    from actlab.analyze.findings import next_steps

    steps = next_steps(_tables(), "my-model")
    commands = [s.command for s in steps]
    median = pd.Series([0.40 + 0.01 * i for i in range(16)]).median()  # 0.475 -> a 40% budget
    assert any(f"--sparsity {int(median * 10) / 10:g}" in c and "--model my-model" in c for c in commands)
    assert any("--remove L3.attn,L4.attn" in c for c in commands)
    lowest = next(s.text for s in steps if "Block Influence" in s.text)
    assert "layers 14-15" in lowest  # the two of sixteen blocks with the lowest BI
    assert any("2 heads are attention sinks" in s.text for s in steps)
    assert any("massive" in s.text for s in steps)
    kv = next(s.text for s in steps if "retrieval heads" in s.text)
    assert kv.startswith("2 of 4 heads copy") and "L0.H1, L5.H2" in kv and "and 2 attend" in kv
    assert next_steps({}, "m") == []


def test_layer_summary_and_grouped_massive_events():
    from actlab.analyze.findings import layer_summary
    from actlab.report.html import massive_events

    summary = layer_summary(_tables()).set_index("layer")
    assert summary.loc[0, "sink_heads"] == 1 and summary.loc[1, "sink_heads"] == 1
    assert pd.isna(summary.loc[7, "sink_heads"])
    assert summary.loc[3, "down_in_near_zero"] == pytest.approx(0.43)
    assert summary.loc[2, "resid_max_over_median"] == 500.0
    # channel 7 at <bos> in windows 0 and 1 (layers 3-5) is one event; so is channel 2 at "x" in two positions
    top = pd.DataFrame({"site": [f"L{i}.resid_out" for i in (3, 4, 5, 4, 9, 9)], "layer": [3, 4, 5, 4, 9, 9],
                        "value": [900.0, 1200.0, 1000.0, 1100.0, 50.0, 40.0], "channel": [7, 7, 7, 7, 2, 2],
                        "window": [0, 0, 0, 1, 0, 0], "position": [0, 0, 0, 0, 4, 9],
                        "token": ["<bos>", "<bos>", "<bos>", "<bos>", "x", "x"]})
    events = massive_events(top)
    assert [(e["first"], e["last"], e["value"], e["places"], e["positions"]) for e in events] == [
        (3, 5, 1200.0, 2, "0"), (9, 9, 50.0, 2, "4, 9")]


def test_sparsity_at_a_relative_threshold_matches_the_samples():
    import numpy as np

    from actlab.report.plots import fraction_below_relative

    rng = np.random.default_rng(0)
    rows, sites = [], []
    eps = np.logspace(-4, 2, 61)
    for layer, scale in enumerate((0.01, 1.0, 30.0)):  # very different scales, same shape
        x = np.abs(rng.standard_t(3, 20000) * scale)
        rows += [{"site": f"L{layer}.down_in", "layer": layer, "kind": "down_in", "eps": e,
                  "fraction_below": float((x < e).mean())} for e in eps]
        sites.append({"site": f"L{layer}.down_in", "rms": float(np.sqrt((x ** 2).mean()))})
        exact = float((x < 0.1 * sites[-1]["rms"]).mean())
        sites[-1]["exact"] = exact
    got = fraction_below_relative(pd.DataFrame(rows), pd.DataFrame(sites)).set_index("site")["fraction_below"]
    for s in sites:
        assert got[s["site"]] == pytest.approx(s["exact"], abs=0.02)


def test_expert_findings_name_the_busiest_and_the_idle_experts():
    # two layers of 4 experts, 2 per token: balanced share 50%; layer 1's expert 3 takes 95%, its expert 0 2%
    share = [0.5, 0.5, 0.5, 0.5, 0.02, 0.53, 0.5, 0.95]
    experts = pd.DataFrame({"layer": [0] * 4 + [1] * 4, "expert": list(range(4)) * 2, "share": share,
                            "load": [s / 0.5 for s in share]})
    found = [f.text for f in findings({"experts": experts}) if f.topic == "experts"]
    assert found[0].startswith("the busiest expert, 3 of layer 1, takes 95% of the tokens (1.9x a balanced share)")
    assert "median over 2 layers" in found[0]
    assert found[1] == "1 expert gets at most 10% of a balanced share: L1.E0"
    assert not [f for f in findings({}) if f.topic == "experts"]  # dense models: no experts table, no finding
