"""The sparsify job: model + calibration corpus -> recipe -> dense and sparse perplexity on held-out data."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actlab import parallel
from actlab.errors import ConfigError
from actlab.eval.perplexity import perplexity
from actlab.jobs import setup
from actlab.transforms.sparsity import SparsityRecipe, calibrate, check_target, get_method
from actlab.transforms.sparsity.harness import evaluate


def sparsify(model: str, *, method: str | None, sparsity: float | None, calib: str | None, eval_data: str | None,
             seq_len: int = 1024, windows: int = 16, calib_windows: int = 16, positions: str | None = None,
             recipe_path: str | None = None, save: str | None = None, log: Callable[[str], None] = print,
             progress: bool = True, params: dict[str, Any] | None = None) -> dict[str, Any]:
    """Calibrate (or load) a sparsity recipe and measure dense vs sparse perplexity. With a saved recipe, what it
    records wins unless `positions` is given; the result says which was used ("positions_from")."""
    if positions not in (None, "all", "last-half"):
        raise ConfigError("--positions must be all or last-half")
    recipe = SparsityRecipe.load(recipe_path) if recipe_path is not None else None  # bad files fail before loading
    if recipe is None:
        positions = positions or "all"  # a new recipe: every token, unless asked otherwise
        check_target(sparsity)  # before minutes of model loading
        sparsifier = get_method(method, **(params or {}))
        if sparsifier.needs_prompt and positions == "all":
            raise ConfigError(f"{method} chooses its neurons at a prompt, and under --positions all every evaluation "
                              "window is all prompt (dense): use --positions last-half")
    world = parallel.world()  # under torchrun: each rank calibrates and evaluates on its block of windows
    lm = setup.model(model, log)
    lm.adapter.refuse_moe("activation sparsity")
    corpus, eval_windows = setup.eval_windows(lm, eval_data, seq_len, windows)
    if recipe is None:
        recipe = calibrate(sparsifier, setup.calibration(lm, calib, seq_len, calib_windows, world=world), sparsity)
    else:
        recipe.check_model(lm)
    source = "option" if positions is not None or recipe_path is None else "recipe"
    if positions is not None:
        recipe.positions = positions
    if save and world.main:
        recipe.save(save)
    show = progress and world.main
    dense = setup.sharded(eval_windows, world, lambda w: perplexity(lm, w, batch_size=1, progress=show).window_nll)

    def sparse_run(w):
        result = evaluate(lm, recipe, w, progress=show)
        return [(nll, result.achieved_sparsity) for nll in result.window_nll]  # equal windows: a mean per window

    sparse = setup.sharded(eval_windows, world, sparse_run)
    dense_ppl, sparse_ppl = setup.window_ppl(dense), setup.window_ppl([nll for nll, _ in sparse])
    return {
        "model": lm.name, "method": recipe.method, "target_sparsity": recipe.target,
        "achieved_sparsity": sum(a for _, a in sparse) / len(sparse),
        "predicted_sparsity": recipe.predicted.get("effective"),
        "dense_ppl": dense_ppl, "sparse_ppl": sparse_ppl, "ppl_increase": sparse_ppl / dense_ppl - 1,
        "positions": recipe.positions, "positions_from": source, "calib_data": recipe.calibration.get("data"),
        "eval_data": corpus.name,
        "eval_tokens": int(eval_windows.shape[0] * (eval_windows.shape[1] - 1)), "seq_len": seq_len,
        "windows": windows, "recipe": save,
        **({"warnings": lm.provenance["warnings"]} if lm.provenance.get("warnings") else {}),
    }


def sparsity_at_ppl_job(model: str, *, p: float = 1.0, calib: str | None, eval_data: str | None,
                        seq_len: int = 1024, windows: int = 16, calib_windows: int = 4, steps: int = 8,
                        log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    """PPL-p% sparsity of a model (Sparsing Law's CETT criterion), on held-out evaluation windows."""
    from actlab.transforms.sparsity.cett import sparsity_at_ppl

    if not p > 0:
        raise ConfigError("--p must be a positive percentage")
    lm = setup.model(model, log)
    lm.adapter.refuse_moe("the CETT sparsity search")
    corpus, eval_windows = setup.eval_windows(lm, eval_data, seq_len, windows)
    data = setup.calibration(lm, calib, seq_len, calib_windows)
    out = sparsity_at_ppl(data, eval_windows, p=p, steps=steps, progress=progress)
    return {**out, "calib_data": data.corpus.get("name"), "eval_data": corpus.name, "seq_len": seq_len,
            "windows": windows, "search_steps": steps}
