"""Report findings and token display, on hand-made tables: the wording follows the numbers."""

from __future__ import annotations

import pandas as pd

from actlab.analyze.findings import BI_DROP, layer_findings
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
