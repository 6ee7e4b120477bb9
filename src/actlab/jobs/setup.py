"""The one setup every job shares: a model, evaluation windows, a calibration set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from actlab.calib import CalibrationSet
from actlab.data import Corpus, WindowSpec, load_corpus, make_windows
from actlab.models import LoadedModel, load_model


def model(spec: str, log: Callable[[str], None] = print) -> LoadedModel:
    return load_model(spec, log_fn=log)


def eval_windows(lm: LoadedModel, data: str | None, seq_len: int, windows: int | None,
                 role: str = "eval") -> tuple[Corpus, torch.Tensor]:
    """The evaluation corpus (its evaluation part by default) cut into `windows` windows of `seq_len` tokens."""
    corpus = load_corpus(data, role=role)  # type: ignore[arg-type]
    spec = WindowSpec(seq_len=seq_len, num_windows=windows)
    return corpus, make_windows(lm.tokenizer, corpus, spec, lm.max_context)


def calibration(lm: LoadedModel, data: str | None, seq_len: int, windows: int, **kw: Any) -> CalibrationSet:
    """The calibration set on the calibration part of `data` (see actlab.data.sources for roles)."""
    return CalibrationSet.from_corpus(lm, data, seq_len=seq_len, windows=windows, **kw)


def perplexity_with_and_without(lm: LoadedModel, recipe: Any, data: str | None, seq_len: int, windows: int,
                                progress: bool = True) -> dict[str, Any]:
    """Held-out perplexity of the plain model and with `recipe` attached, on the same windows."""
    from actlab.eval.perplexity import perplexity
    from actlab.transforms import attach

    corpus, ids = eval_windows(lm, data, seq_len, windows)
    out: dict[str, Any] = {"dense_ppl": perplexity(lm, ids, progress=progress).ppl, "eval_data": corpus.name}
    with attach(lm, recipe):
        out["ppl"] = perplexity(lm, ids, progress=progress, description=f"perplexity, {recipe.describe()}").ppl
    return out
