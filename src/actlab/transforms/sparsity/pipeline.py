"""The sparsify job: model + calibration corpus -> recipe -> dense and sparse perplexity on held-out data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actlab.data import WindowSpec, load_corpus, make_windows
from actlab.errors import ConfigError
from actlab.eval.perplexity import perplexity
from actlab.models import load_model
from actlab.transforms.sparsity import CalibrationData, SparsityRecipe, calibrate, check_target, get_method
from actlab.transforms.sparsity.harness import evaluate


def _model_and_eval_windows(model: str, eval_data: str | None, seq_len: int, windows: int,
                            log: Callable[[str], None]):
    lm = load_model(model, log_fn=log)
    corpus = load_corpus(eval_data, role="eval")
    spec = WindowSpec(seq_len=seq_len, num_windows=windows)
    return lm, corpus, make_windows(lm.tokenizer, corpus, spec, lm.max_context)


def sparsify(model: str, *, method: str | None, sparsity: float | None, calib: str | None, eval_data: str | None,
             seq_len: int = 1024, windows: int = 16, calib_windows: int = 16, positions: str = "all",
             recipe_path: str | None = None, save: str | None = None, log: Callable[[str], None] = print,
             progress: bool = True) -> dict[str, Any]:
    if positions not in ("all", "last-half"):
        raise ConfigError("--positions must be all or last-half")
    if sparsity is not None:
        check_target(sparsity)  # before minutes of model loading
    if method is not None and get_method(method).needs_prompt and positions == "all":
        raise ConfigError(f"{method} chooses its neurons at a prompt, and under --positions all every evaluation "
                          "window is all prompt (dense): use --positions last-half")
    lm, corpus, eval_windows = _model_and_eval_windows(model, eval_data, seq_len, windows, log)
    if recipe_path is not None:
        recipe = SparsityRecipe.load(recipe_path)
        recipe.check_model(lm.adapter)
    else:
        data = CalibrationData.from_corpus(lm, calib, seq_len=seq_len, windows=calib_windows)
        recipe = calibrate(method, data, sparsity)
    recipe.positions = positions
    if save:
        recipe.save(save)
    dense = perplexity(lm, eval_windows, batch_size=1, progress=progress)
    sparse = evaluate(lm, recipe, eval_windows, progress=progress)
    return {
        "model": lm.name, "method": recipe.method, "target_sparsity": recipe.target,
        "achieved_sparsity": sparse.achieved_sparsity, "predicted_sparsity": recipe.predicted.get("effective"),
        "dense_ppl": dense.ppl, "sparse_ppl": sparse.sparse_ppl, "ppl_increase": sparse.sparse_ppl / dense.ppl - 1,
        "positions": positions, "calib_data": recipe.calibration.get("data"), "eval_data": corpus.name,
        "eval_tokens": dense.tokens, "seq_len": seq_len, "windows": windows, "recipe": save,
    }


def sparsity_at_ppl_job(model: str, *, p: float = 1.0, calib: str | None, eval_data: str | None,
                        seq_len: int = 1024, windows: int = 16, calib_windows: int = 4, steps: int = 8,
                        log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """PPL-p% sparsity of a model (Sparsing Law's CETT criterion), on held-out evaluation windows."""
    from actlab.transforms.sparsity.cett import sparsity_at_ppl

    if not p > 0:
        raise ConfigError("--p must be a positive percentage")
    lm, corpus, eval_windows = _model_and_eval_windows(model, eval_data, seq_len, windows, log)
    data = CalibrationData.from_corpus(lm, calib, seq_len=seq_len, windows=calib_windows)
    out = sparsity_at_ppl(data, eval_windows, p=p, steps=steps, progress=progress)
    return {**out, "calib_data": data.corpus.get("name"), "eval_data": corpus.name, "seq_len": seq_len,
            "windows": windows, "search_steps": steps}
