"""Acceptance: `actlab ppl` on the real SmolLM2-135M agrees with an independent plain-transformers loop."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actlab.models.registry import BUILTINS
from tests.conftest import shared_data

pytestmark = pytest.mark.real

# 8 windows of 1024 tokens: the agreement, not the full protocol (the 40-window protocol gives 21.38)
SEQ_LEN, WINDOWS = 1024, 8


def independent_ppl(gguf_path, text_path) -> float:
    """Plain transformers, straight from the GGUF file (not actlab's cache), the GPTQ/TEAL loop."""
    tok = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name,
                                                 dtype=torch.float32).eval()
    ids = tok(text_path.read_text(), return_tensors="pt").input_ids[0]
    nll = 0.0
    with torch.no_grad():
        for k in range(WINDOWS):
            w = ids[k * SEQ_LEN : (k + 1) * SEQ_LEN][None]
            nll += model(w, labels=w).loss.item() * (SEQ_LEN - 1)
    return math.exp(nll / (WINDOWS * (SEQ_LEN - 1)))


def test_cli_ppl_matches_plain_transformers(smollm2):
    text = shared_data("wikitext-2", "test.txt")
    out = subprocess.run(
        [sys.executable, "-m", "actlab.cli", "ppl", "--model", "smollm2-135m", "--data", str(text),
         "--seq-len", str(SEQ_LEN), "--windows", str(WINDOWS), "--json"],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(out.stdout)
    assert {"ppl", "tokens", "seq_len", "windows", "model"} <= result.keys()
    assert result["tokens"] == WINDOWS * (SEQ_LEN - 1) and result["windows"] == WINDOWS
    reference = independent_ppl(BUILTINS["smollm2-135m"].gguf.local_path(), text)
    assert result["ppl"] == pytest.approx(reference, rel=1e-4)


def test_second_load_comes_from_cache(smollm2):
    assert smollm2.provenance["source"] == "pypi-gguf"
    assert "cache_entry" in smollm2.provenance


def test_truncated_real_gguf_is_refused(smollm2, tmp_path):
    import actlab
    from actlab.errors import ModelLoadError
    from actlab.models import cache
    from actlab.models.fetch import sha256_of

    cut = tmp_path / "cut.gguf"
    with open(BUILTINS["smollm2-135m"].gguf.local_path(), "rb") as fh:
        cut.write_bytes(fh.read(20_000_000))
    with pytest.raises(ModelLoadError, match="truncated"):
        actlab.load_model(str(cut))
    assert cache.valid_entry(f"gguf-{sha256_of(cut)[:16]}") is None
