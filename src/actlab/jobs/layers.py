"""The layers job: remove named parts, or calibrate a layer method to a parameter budget; save the recipe and
say what it costs (calibration loss, the spine's cost line, optionally held-out perplexity)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from actlab import parallel
from actlab.errors import ConfigError
from actlab.jobs import setup


def layers_job(model: str, *, save: str, remove: str | None = None, method: str | None = None,
               budget: float | None = None, params: dict[str, Any] | None = None, calib: str | None = None,
               seq_len: int = 1024, calib_windows: int = 4, eval_data: str | None = None, windows: int = 0,
               extend: str | None = None, log: Callable[[str], None] = print,
               progress: bool = True) -> dict[str, Any]:
    """`extend`: a recipe of the same greedy method (SLEB, joint) on the same calibration set to continue to the
    larger `budget`. A greedy calibration keeps its last step beside `save` (partial_path) and, interrupted,
    resumes from there when run again."""
    from actlab.transforms.layers import LayerRecipe, check_budget, get_method, removed_fraction
    from actlab.transforms.layers.importance import calibration_loss

    if (remove is None) == (method is None):
        raise ConfigError("give either --remove (the parts to remove) or --method with --budget; "
                          "--list-methods shows the methods")
    if extend is not None and method is None:
        raise ConfigError("--extend continues a greedy method's calibration: give --method and --budget too")
    if method is not None:
        if budget is None:
            raise ConfigError(f"--method {method} needs --budget (the fraction of non-embedding parameters to remove)")
        check_budget(budget)
        chosen = get_method(method, **(params or {}))  # unknown methods and parameters fail before loading
        chosen.progress = progress
    else:
        parts = [p.strip() for p in remove.split(",") if p.strip()]
        if not parts:
            raise ConfigError("--remove names no part (e.g. --remove L20,L21.attn)")
    world = parallel.world()  # under torchrun: each rank calibrates on its block of windows
    lm = setup.model(model, log)
    data = None
    if method is not None:
        data = setup.calibration(lm, calib, seq_len, calib_windows, world=world)
        recipe = calibrate_resumably(chosen, data, budget, save, extend=extend, log=log, main=world.main)
    else:
        recipe = LayerRecipe("manual", lm.identity.to_dict(), parts)
    cost = setup.keep_recipe(recipe, lm, save, world)
    if method is not None and world.main:
        forget_checkpoint(save)
    out: dict[str, Any] = {"model": lm.name, "recipe": recipe.describe(), "method": recipe.method,
                           "drop": recipe.drop, "target": recipe.target,
                           "removed_fraction": removed_fraction(lm.adapter, recipe.drop),
                           "cost": cost.to_dict(), "cost_line": cost.line(), "path": save}
    if data is not None:
        out["calib_loss_dense"] = calibration_loss(data)
        out["calib_loss"] = calibration_loss(data, recipe.drop, repair=recipe.repair)
        out["calib_data"] = data.corpus.get("name")
    if windows:
        out.update(setup.perplexity_with_and_without(lm, recipe, eval_data, seq_len, windows, progress, world))
    return out


def partial_path(save: str | Path) -> Path:
    """Where a greedy calibration keeps its last step until it finishes: beside `save`, `R.partial.json`."""
    path = Path(save)
    return path.with_name(f"{path.stem}.partial{path.suffix}")


def calibrate_resumably(chosen: Any, data: Any, budget: float, save: str | Path, *, extend: str | Path | None = None,
                        earlier: Sequence[str | Path] = (), log: Callable[[str], None] = print,
                        main: bool = True) -> Any:
    """`chosen` calibrated on `data` for `budget`, to be saved at `save`. A greedy method continues, in this order
    of preference: the checkpoint an interrupted run left beside `save` (partial_path; one that does not fit is an
    error: deleting it is the user's call), else `extend` (which must fit), else the first of `earlier` that fits (the
    others are logged and passed over). While it runs, its last step is kept at partial_path(save) (by the
    main rank); forget_checkpoint removes it once the recipe is saved."""
    from actlab.transforms.layers import LayerRecipe

    partial = partial_path(save)
    start = None
    interrupted = chosen.greedy and partial.is_file()
    if interrupted:
        try:
            start = chosen.resume(data, LayerRecipe.load(partial), budget)
        except ConfigError as exc:
            raise ConfigError(f"{partial} is left from an interrupted calibration this one cannot continue ({exc}); "
                              "delete it or run with the options it had") from None
        log(f"resuming an interrupted calibration from {partial} ({len(start.drop)} steps done)")
    elif extend is not None:
        start = chosen.resume(data, LayerRecipe.load(extend), budget)  # not greedy, or not fitting: an error
    elif chosen.greedy:
        for path in (p for p in earlier if Path(p).is_file()):
            try:
                start = chosen.resume(data, LayerRecipe.load(path), budget)
                break
            except ConfigError as exc:
                log(f"not continuing {path}: {exc}")
    if start is not None and not interrupted:
        log(f"continuing {start.describe()} ({len(start.drop)} steps) to {budget:g}")
    if chosen.greedy and main:
        chosen.checkpoint = lambda step: step.save(partial)
    return chosen.calibrate(data, budget, start=start)


def forget_checkpoint(save: str | Path) -> None:
    """Remove the checkpoint (and its tensors) a greedy calibration kept beside `save`, once the recipe is saved."""
    from actlab.transforms.io import sidecar_path

    for path in (partial_path(save), sidecar_path(partial_path(save))):
        path.unlink(missing_ok=True)


def importance_job(model: str, *, calib: str | None = None, seq_len: int = 1024, calib_windows: int = 4,
                   save: str | None = None, run: str | None = None, log: Callable[[str], None] = print,
                   progress: bool = True) -> dict[str, Any]:
    """Every block and sublayer ranked by the cheap metrics and by the measured loss of removing it; how well the
    cheap ones predict the measured one. `save`: the table as CSV; `run`: a complete profile run of the same model
    that gets the table (its report's layer-importance section then shows the measured ranking)."""
    from actlab.fsutil import atomic_write_text
    from actlab.jobs.profile import add_tables, complete_run, run_of_model
    from actlab.transforms.layers.importance import importance_table

    if save is not None and not save.endswith(".csv"):
        raise ConfigError(f"--save {save}: the importance table is written as .csv")
    if run is not None:
        complete_run(run)  # a missing or unfinished run fails before the model loads
    world = parallel.world()
    lm = setup.model(model, log)
    target = run_of_model(run, lm, "actlab layers --importance") if run else None  # before the long part
    data = setup.calibration(lm, calib, seq_len, calib_windows, world=world)
    table, agreement = importance_table(data, progress=progress and world.main)
    if save and world.main:
        atomic_write_text(save, table.to_csv(index=False))
    report = str(add_tables(target, {"importance": table})) if target and world.main else None
    return {"model": lm.name, "calib_data": data.corpus.get("name"), "tokens": int(data.windows.numel()),
            "parts": table.to_dict("records"), "spearman_with_measured": agreement, "path": save, "report": report}
