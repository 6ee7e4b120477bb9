"""actlab's perplexity against an independent loop using the model's own loss."""

from __future__ import annotations

import math

import pytest
import torch

from actlab.data import WindowSpec, load_corpus, make_windows
from actlab.eval import perplexity


def reference_ppl(model, windows):
    nll, n = 0.0, 0
    with torch.no_grad():
        for w in windows:
            loss = model(input_ids=w[None], labels=w[None]).loss.item()
            nll += loss * (len(w) - 1)
            n += len(w) - 1
    return math.exp(nll / n)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_matches_model_loss(tiny, batch_size):
    windows = make_windows(tiny.tokenizer, load_corpus(None, role="eval"), WindowSpec(seq_len=96, num_windows=5))
    result = perplexity(tiny, windows, batch_size=batch_size, progress=False)
    assert result.tokens == 5 * 95 and result.windows == 5 and result.seq_len == 96
    assert result.ppl == pytest.approx(reference_ppl(tiny.model, windows), rel=1e-5)
