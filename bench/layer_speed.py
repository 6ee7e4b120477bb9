"""Decode and prefill speed of every depth-pruning recipe in the layer bench's results, one `actlab bench decode`
per recipe (the engine dense, the engine with the recipe and HF generate interleaved in one process; then the HF
prefill of 512 tokens with the removed parts really skipped).

    python bench/layer_speed.py [--models smollm2-135m,gemma3-270m] [--methods M,...] [--tokens 64] [--reps 3]
                                [--redo]

The recipe of a row is the one bench/layer_pruning.py cached in bench/.work/layers/; where that cache is gone, a
recipe without repairs is rebuilt from the row's drop list (removing those parts is all it does), and one with
repairs (joint) is reported as missing. Runs are merged into bench/results/layer_pruning_speed.json under
MODEL-METHOD-FRACTION, written after each run (an interrupted run keeps what it measured; `--redo` measures again).
Needs an otherwise quiet machine: pause other jobs (kill -STOP) while it runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from layer_pruning import WORK  # noqa: E402
from peers import pin_threads  # noqa: E402

SPEED = ROOT / "bench" / "results" / "layer_pruning_speed.json"
RESULTS = {"smollm2-135m": "layer_pruning_smollm2.json", "gemma3-270m": "layer_pruning_gemma3.json"}


def recipe_path(lm, row: dict) -> tuple[Path | None, str]:
    """The cached recipe of a results row, else one rebuilt from its drop list (None, why: it cannot be)."""
    from actlab.transforms.layers import LayerRecipe

    cached = WORK / f"{row['model']}-{row['method']}-{row['target']:g}.json"
    if cached.is_file():
        return cached, "cached"
    if row["method"] == "joint":
        return None, "its repairs are not in the results; calibrate it again with bench/layer_pruning.py"
    rebuilt = WORK / "rebuilt" / cached.name
    if not rebuilt.is_file():
        LayerRecipe(row["method"], lm.identity.to_dict(), list(row["drop"]), target=row["target"]).save(rebuilt)
    return rebuilt, "rebuilt from the drop list"


def cached_without_row(model: str, rows: list[dict]) -> list[dict]:
    """Rows for the recipes cached in bench/.work/layers/ that the results do not hold yet (a calibration whose
    evaluation is still running)."""
    from layer_pruning import budget_of

    from actlab.transforms.layers import LayerRecipe

    have = {(r["method"], r["target"]) for r in rows}
    out = []
    for path in sorted(WORK.glob(f"{model}-*.json")):
        budget = budget_of(path)
        method = path.stem[len(model) + 1:].rsplit("-", 1)[0]
        if budget is not None and (method, budget) not in have:
            out.append({"model": model, "method": method, "target": budget, "drop": LayerRecipe.load(path).drop})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m,gemma3-270m")
    ap.add_argument("--methods", default=None, help="only these methods (default: every row)")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--redo", action="store_true", help="measure runs the speed file already holds again")
    ap.add_argument("--out", default=str(SPEED))
    args = ap.parse_args()
    pin_threads(args.threads)
    import actlab
    from actlab.jobs.bench import bench_decode
    from actlab.transforms.layers import removed_fraction

    out = Path(args.out)
    speed = json.loads(out.read_text()) if out.is_file() else {"runs": {}}
    speed["command"] = (f"python bench/layer_speed.py --tokens {args.tokens} --reps {args.reps} --threads "
                        f"{args.threads} (actlab bench decode per recipe; other jobs paused)")
    methods = set(args.methods.split(",")) if args.methods else None
    table = []
    for model in args.models.split(","):
        lm = actlab.load_model(model)
        rows = json.loads((ROOT / "bench" / "results" / RESULTS[model]).read_text())["rows"]
        rows += cached_without_row(model, rows)
        for row in sorted(rows, key=lambda r: (r["method"], r["target"])):
            if methods and row["method"] not in methods:
                continue
            key = f"{model}-{row['method']}-{row['target']:g}"
            if key not in speed["runs"] or args.redo:
                path, source = recipe_path(lm, row)
                if path is None:
                    print(f"{key}: not measured: {source}", file=sys.stderr)
                    continue
                print(f"{key}: {source} ...", file=sys.stderr, flush=True)
                run = bench_decode(model, recipe_path=str(path), tokens=args.tokens, reps=args.reps,
                                   log=lambda m: print(m, file=sys.stderr))
                run["recipe_source"] = source
                run["removed_fraction"] = removed_fraction(lm.adapter, row["drop"])
                speed["runs"][key] = run
                tmp = out.with_suffix(".tmp")
                tmp.write_text(json.dumps(speed, indent=1))
                tmp.replace(out)  # after each run: an interruption keeps what was measured
            table.append((key, speed["runs"][key]))
    print("| recipe | removed | decode x (bound) | prefill x |")
    print("|---|---|---|---|")
    for key, run in table:
        print(f"| {key} | {run.get('removed_fraction', float('nan')):.3f} | {run['sparse_over_dense']:.2f} "
              f"({run['ceiling']:.2f}) | {run.get('prefill_speedup', float('nan')):.2f} |")


if __name__ == "__main__":
    main()
