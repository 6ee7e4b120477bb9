"""The kv job: a KV-cache method to a compression ratio (and optionally KIVI quantization), saved as a recipe,
with what it costs (the spine's cost line; optionally perplexity under compression on held-out windows)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actlab import parallel
from actlab.errors import ConfigError
from actlab.jobs import setup
from actlab.transforms.base import NoCalibration


def kv_job(model: str, *, save: str, method: str, ratio: float = 0.0, params: dict[str, Any] | None = None,
           phase: str = "prefill", question_aware: bool = False, bits: int = 0, group: int = 32,
           calib: str | None = None, seq_len: int = 2048, calib_windows: int = 2, eval_data: str | None = None,
           windows: int = 0, chunk: int = 64, run: str | None = None, log: Callable[[str], None] = print,
           progress: bool = True) -> dict[str, Any]:
    from actlab.transforms.kv import check_ratio, get_method

    check_ratio(ratio)
    chosen = get_method(method, phase=phase, question_aware=question_aware, bits=bits, group=group, **(params or {}))
    chosen.progress = progress
    if run is not None and not chosen.needs_profile:
        raise ConfigError(f"--run is for methods that read a profile (headwise); {method} does not")
    if run is not None:
        from actlab.jobs.profile import complete_run

        complete_run(run)  # a missing or unfinished run fails before the model loads
    world = parallel.world()  # under torchrun: each rank calibrates on its block of windows
    lm = setup.model(model, log)
    if not lm.adapter.num_kv_heads:
        raise ConfigError(f"{lm.name} has no KV cache to compress")
    if run is not None:
        from actlab.jobs.profile import run_of_model

        profiled = run_of_model(run, lm, f"actlab kv --method {method}")
        chosen.profile = {name: profiled.read_table(name) for name in ("head_roles", "heads")
                          if (profiled.path / "tables" / f"{name}.parquet").is_file()}
        chosen.profile_path = str(run)
    data = setup.calibration(lm, calib, seq_len, calib_windows, world=world) if chosen.calibrated else NoCalibration(lm)
    recipe = chosen.calibrate(data, ratio)
    cost = setup.keep_recipe(recipe, lm, save, world)
    ratios = recipe.ratios(lm.adapter)
    out: dict[str, Any] = {"model": lm.name, "recipe": recipe.describe(), "method": recipe.method, "ratio": ratio,
                           "layer_ratios": ratios.mean(1).tolist(), "cost": cost.to_dict(),
                           "cost_line": cost.line(), "path": save}
    if chosen.calibrated:
        out["calib_data"] = data.corpus.get("name")
    if windows:
        out.update(compressed_perplexity(lm, recipe, eval_data, seq_len, windows, chunk, progress, world))
    return out


def compressed_perplexity(lm, recipe, data: str | None, seq_len: int, windows: int, chunk: int,
                          progress: bool = True, world: parallel.World | None = None) -> dict[str, Any]:
    """Perplexity of held-out windows read `chunk` tokens at a time through the cache, with the full cache and with
    the cache held to `recipe`'s budget as it grows (data parallel: each rank its block of windows)."""
    from actlab.eval.perplexity import perplexity
    from actlab.transforms import attach

    world = world or parallel.World()
    show = progress and world.main
    corpus, ids = setup.eval_windows(lm, data, seq_len, windows)
    dense = setup.sharded(ids, world, lambda w: perplexity(lm, w, progress=show, chunk=chunk).window_nll)
    out: dict[str, Any] = {"dense_ppl": setup.window_ppl(dense), "eval_data": corpus.name, "chunk": chunk}
    with attach(lm, recipe) as attached:
        described = f"perplexity, {recipe.describe()}"
        mine = setup.sharded(ids, world, lambda w: perplexity(lm, w, progress=show, chunk=chunk,
                                                              description=described).window_nll)
        out["ppl"] = setup.window_ppl(mine)
        out.update(attached.summary(lm))  # this rank's
    return out
