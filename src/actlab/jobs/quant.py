"""The quant job: quantize a model's weights with one method (uniform bits, or mixed to an average), save the
recipe and say what it costs (bits, the spine's cost line, optionally held-out perplexity)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from actlab import parallel
from actlab.errors import ConfigError
from actlab.jobs import setup


def quant_job(model: str, *, save: str, method: str = "rtn", bits: int | None = None, group: int | None = None,
              symmetric: bool | None = None, avg_bits: float | None = None, head: bool = False,
              params: dict[str, Any] | None = None, calib: str | None = None, seq_len: int = 1024,
              calib_windows: int = 4, eval_data: str | None = None, windows: int = 0,
              log: Callable[[str], None] = print, progress: bool = True) -> dict[str, Any]:
    from actlab.transforms.quant import NoCalibration, get_method

    grid = {k: v for k, v in (("bits", bits), ("group", group), ("symmetric", symmetric)) if v is not None}
    chosen = get_method(method, head=head, **grid, **(params or {}))  # None: the method's default
    if chosen.mixed and avg_bits is None:
        raise ConfigError(f"--method {method} allocates bits per projection: give --avg-bits (e.g. 3.5)")
    if not chosen.mixed and avg_bits is not None:
        raise ConfigError(f"--avg-bits is for the mixed-precision methods (mixed, layerwise); {method} uses --bits")
    chosen.progress = progress
    world = parallel.world()  # under torchrun: each rank calibrates on its block of windows
    lm = setup.model(model, log)
    lm.adapter.refuse_moe("weight quantization")
    chosen.check_grid(lm)  # a group that does not divide a projection fails before calibration
    data = setup.calibration(lm, calib, seq_len, calib_windows, world=world) if chosen.calibrated else NoCalibration(lm)
    recipe = chosen.calibrate(data, avg_bits)
    cost = setup.keep_recipe(recipe, lm, save, world)
    out: dict[str, Any] = {"model": lm.name, "recipe": recipe.describe(), "method": recipe.method,
                           "average_bits": recipe.average_bits(), "quantized": len(recipe.weights),
                           "cost": cost.to_dict(), "cost_line": cost.line(), "path": save}
    if chosen.calibrated:
        out["calib_data"] = data.corpus.get("name")
    if windows:
        out.update(setup.perplexity_with_and_without(lm, recipe, eval_data, seq_len, windows, progress, world))
    return out

