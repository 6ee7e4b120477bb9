"""Depth pruning: every layer method at several parameter budgets, evaluated side by side through `actlab eval`,
with decode speed (the engine) and prefill speed (the HF model with the removed blocks taken out).

    python bench/layer_pruning.py [--models smollm2-135m] [--methods shortgpt,gromov,sleb,attn-drop,mlp-drop,joint]
                                  [--fractions 0.125,0.25,0.375] [--tasks wikitext2,arc_easy,...] [--limit 500]
                                  [--ppl-limit 40] [--calib-windows 4] [--speed]

Recipes are calibrated once into bench/.work/layers/ and reused; the evaluation of each model is one resumable
`actlab eval --out` directory (bench/.work/layers/eval-MODEL), so an interrupted run continues where it stopped.
Prints a markdown table and writes bench/results/layer_pruning.json (keeping the rows an earlier run wrote there
and this one did not measure). A budget a method cannot reach (attention
sublayers alone hold too few parameters) is reported as such, not skipped silently. Speed numbers need an
otherwise quiet machine.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "bench" / ".work" / "layers"
TASKS = "wikitext2,lambada,arc_easy,arc_challenge,piqa,hellaswag"
PERPLEXITY_TASKS = ("wikitext2",)


def calibrate(lm, method: str, fractions: list[float], calib_windows: int,
              seq_len: int) -> dict[float, tuple[Path | None, str | None]]:
    """Each fraction's recipe (path, or the reason it cannot be reached). A greedy method (SLEB, joint) is
    calibrated once for the largest fraction; the smaller ones are its prefixes (LayerMethod.prefix), which are
    what calibrating for them would return. A greedy calibration for a grown grid continues the largest recipe
    already made on the same calibration set, and an interrupted one resumes from its last step (both what
    calibrating from nothing returns)."""
    from actlab.errors import ConfigError
    from actlab.jobs.layers import forget_checkpoint
    from actlab.transforms.layers import LayerRecipe, get_method

    chosen = get_method(method)
    chosen.progress = True
    out: dict[float, tuple[Path | None, str | None]] = {}
    largest = None
    for fraction in sorted(fractions, reverse=True):
        path = WORK / f"{lm.name}-{method}-{fraction:g}.json"
        if path.is_file():
            out[fraction] = path, None
            largest = largest or LayerRecipe.load(path)
            continue
        try:
            if chosen.greedy and largest is None:
                largest = checkpoint_reaching(lm, method, fraction)
            if chosen.greedy and largest is not None:
                recipe = chosen.prefix(largest, lm.adapter, fraction)
            else:
                recipe = calibrate_one(lm, chosen, path, fraction, calib_windows, seq_len)
                largest = largest or recipe
        except ConfigError as exc:
            out[fraction] = None, str(exc)
            continue
        recipe.save(path)
        forget_checkpoint(path)  # saved: a greedy calibration's checkpoint is no longer needed
        out[fraction] = path, None
    return {f: out[f] for f in fractions}


def checkpoint_reaching(lm, method: str, fraction: float):
    """The checkpoint of a larger budget's greedy calibration (stopped, or still to resume) that already saves
    `fraction`, if there is one: its prefix is the recipe for `fraction`."""
    from actlab.transforms.layers import LayerRecipe

    reached = [LayerRecipe.load(p) for p in WORK.glob(f"{lm.name}-{method}-*.partial.json")]
    reached = [r for r in reached if r.target >= fraction]
    return max(reached, key=lambda r: r.target) if reached else None


def calibrate_one(lm, chosen, path: Path, fraction: float, calib_windows: int, seq_len: int):
    """`chosen` calibrated for `fraction` (the recipe records its seconds); a greedy method resumes its checkpoint
    (interrupted) or continues the largest smaller recipe of an earlier grid that fits this calibration set."""
    from actlab.jobs import setup
    from actlab.jobs.layers import calibrate_resumably

    calib = setup.calibration(lm, "wikitext2:valid", seq_len, calib_windows)
    smaller = sorted(((budget, p) for p in WORK.glob(f"{lm.name}-{chosen.name}-*.json")
                      if (budget := budget_of(p)) is not None and budget < fraction), reverse=True)
    earlier = [p for _, p in smaller]
    return calibrate_resumably(chosen, calib, fraction, path, earlier=earlier, log=lambda m: print(m, file=sys.stderr))


def budget_of(path: Path) -> float | None:
    """The budget in a recipe file's name, MODEL-METHOD-BUDGET.json (None if it has none: a checkpoint)."""
    try:
        return float(path.stem.rsplit("-", 1)[1])
    except (IndexError, ValueError):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--methods", default="shortgpt,gromov,sleb,attn-drop,mlp-drop,joint")
    ap.add_argument("--fractions", default="0.125,0.25,0.375")
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--limit", type=int, default=None, help="items per choice task")
    ap.add_argument("--ppl-limit", type=int, default=None, help="windows of the perplexity tasks (default --limit)")
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--speed", action="store_true", help="decode (engine) and prefill (HF) speed per recipe")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "layer_pruning.json"))
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT / "src"))
    import actlab
    from actlab.jobs.eval import eval_job
    from actlab.transforms import load_recipe
    from actlab.transforms.layers import removed_fraction

    WORK.mkdir(parents=True, exist_ok=True)
    rows, notes, speeds = [], [], {}
    for model in args.models.split(","):
        lm = actlab.load_model(model)
        recipes = {}
        fractions = [float(f) for f in args.fractions.split(",")]
        for method in args.methods.split(","):
            for fraction, (path, error) in calibrate(lm, method, fractions, args.calib_windows, args.seq_len).items():
                if error:
                    notes.append(f"{model} {method} {fraction:g}: {error}")
                    print(notes[-1], file=sys.stderr)
                else:
                    recipes[(method, fraction)] = path
        # perplexity and choice tasks in two evaluations: a window of WikiText-2 costs what ~20 choice items do
        tasks = args.tasks.split(",")
        ppl = [t for t in tasks if t in PERPLEXITY_TASKS]
        parts = [(name, ",".join(group), limit) for name, group, limit in (
            ("ppl", ppl, args.ppl_limit or args.limit), ("tasks", [t for t in tasks if t not in ppl], args.limit))
            if group]
        results = [eval_job(model, [str(p) for p in recipes.values()], tasks=group, limit=limit,
                            out=str(WORK / f"eval-{model}-{name}-{limit}"), speed=args.speed and k == 0,
                            log=lambda m: print(m, file=sys.stderr)) for k, (name, group, limit) in enumerate(parts)]
        dense = results[0].columns[0]
        for k, (method, fraction) in enumerate(recipes):
            col = results[0].columns[k + 1]
            recipe = load_recipe(str(recipes[(method, fraction)]))
            row = {"model": model, "method": method, "target": fraction, "drop": recipe.drop,
                   "removed_fraction": removed_fraction(lm.adapter, recipe.drop),
                   "calib_seconds": recipe.calibration.get("seconds")}
            for result in results:
                for task, res in result.columns[k + 1].results.items():
                    for metric, (value, stderr) in res.metrics.items():
                        d, d_se = result.difference(result.columns[k + 1], task, metric)
                        row[f"{task}/{metric}"] = value
                        row[f"{task}/{metric}/se"] = stderr
                        row[f"{task}/{metric}/delta"] = d
                        row[f"{task}/{metric}/delta_se"] = d_se
            if args.speed and col.speed and "decode_tok_s" in col.speed and dense.speed:
                row["decode_speedup"] = col.speed["decode_tok_s"] / dense.speed["decode_tok_s"]
                row["prefill_speedup"] = col.speed.get("prefill_speedup")  # HF, the removed parts skipped
                row["speed"] = col.speed
            rows.append(row)
        if args.speed and dense.speed:
            speeds[model] = dense.speed
    metrics = [k for k in (rows[0] if rows else {}) if k.count("/") == 1]
    print("| model | method | target | removed | " + " | ".join(metrics) + " | decode × | prefill × |")
    print("|---" * (6 + len(metrics)) + "|")
    for r in rows:
        cells = [f"{r[m]:.4g} ({r[m + '/delta']:+.3g})" for m in metrics]
        print(f"| {r['model']} | {r['method']} | {r['target']:g} | {r['removed_fraction']:.3f} | " + " | ".join(cells)
              + f" | {r.get('decode_speedup') or float('nan'):.2f} | {r.get('prefill_speedup') or float('nan'):.2f} |")
    for n in notes:
        print(f"- {n}")
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows + earlier_rows(Path(args.out), rows),
                                          "notes": notes, "dense_speed": speeds}, indent=1))


def earlier_rows(out: Path, rows: list[dict]) -> list[dict]:
    """The rows an earlier run wrote to `out` that this run did not measure (another method or budget)."""
    if not out.is_file():
        return []
    measured = {(r["model"], r["method"], r["target"]) for r in rows}
    return [r for r in json.loads(out.read_text()).get("rows", [])
            if (r["model"], r["method"], r["target"]) not in measured]


if __name__ == "__main__":
    main()
