"""SLEB (Song et al. 2024, "SLEB: Streamlining LLMs through Redundancy Verification and Elimination of
Transformer Blocks"): remove blocks one at a time, each time the block whose removal raises the calibration
loss least given the blocks already removed (re-measured after every removal)."""

from __future__ import annotations

from typing import Any

from actlab.errors import ConfigError
from actlab.transforms.layers.base import LayerMethod
from actlab.transforms.layers.importance import calibration_loss, candidate_parts, removal_losses, removed_fraction


class SLEB(LayerMethod):
    name = "sleb"
    paper = "Song et al. 2024, SLEB (arXiv:2402.09025)"
    removes = "blocks"
    measures_loss = True
    greedy = True

    def choose(self, calib: Any, target: float, start: Any = None):
        adapter = calib.lm.adapter
        base = start.calibration["dense_loss"] if start else calibration_loss(calib)
        drop: list[str] = list(start.drop) if start else []
        steps = [dict(s) for s in start.calibration["steps"]] if start else []

        def recipe(reached: float):
            return self.recipe(calib, reached, drop, {"dense_loss": base, "loss": steps[-1]["loss"] if steps else base,
                                                     "steps": list(steps)})

        while removed_fraction(adapter, drop) < target:
            if len(drop) == adapter.num_layers - 1:
                raise ConfigError(f"sleb: {target:.1%} of the parameters cannot be removed without removing "
                                  "every block")
            losses = removal_losses(calib, candidate_parts(adapter, ["block"], drop), drop, progress=self.progress,
                                    description=f"sleb step {len(drop) + 1}")
            part = min(losses, key=lambda p: (losses[p], p))
            drop.append(part)
            steps.append({"removed": part, "loss": losses[part], "saved": removed_fraction(adapter, drop)})
            self.step_done(recipe(min(steps[-1]["saved"], target)))
        return recipe(target)
