"""One-call entry points in the style of llm-compressor's `oneshot`: a loaded model (or a name) in, a recipe out.

    lm = actlab.load_model("smollm2-135m")
    recipe = actlab.sparsify(lm, "loss-aware", 0.5, calib="wikitext2:valid")
    recipe.save("la50.json")
"""

from __future__ import annotations

from typing import Any


def sparsify(lm: Any, method: str, sparsity: float, calib: Any = None, seq_len: int = 1024, windows: int = 16,
             **params: Any) -> Any:
    """Calibrate the activation-sparsity `method` (any name `actlab sparsify --list-methods` shows, with its
    parameters as keywords) to `sparsity` effective sparsity and return its recipe.

    `lm` is a LoadedModel or a model name/path; `calib` a CalibrationSet, or a corpus (a path, `wikitext2:valid`,
    `python-docs`; None: the calibration half of python-docs) cut into `windows` windows of `seq_len` tokens."""
    from actlab.calib import CalibrationSet
    from actlab.models import load_model
    from actlab.transforms.sparsity import calibrate

    lm = load_model(lm) if isinstance(lm, str) else lm
    lm.adapter.refuse_moe("activation sparsity")
    if not isinstance(calib, CalibrationSet):
        calib = CalibrationSet.from_corpus(lm, calib, seq_len=min(seq_len, lm.max_context or seq_len), windows=windows)
    return calibrate(method, calib, sparsity, **params)
