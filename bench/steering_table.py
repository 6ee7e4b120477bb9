"""The steering table of the interventions issue: per coefficient, the behaviour shift on held-out pairs, a task's
held-out accuracy, WikiText-2 perplexity and the other tasks of the harness, for three directions trained on the
train half of a built-in pair set (mean difference, CAA) and added at the same layers:

  sentiment-ab     CAA's A/B format (`builtin:sentiment`): the probability of the cheerful option's letter
  sentiment-text   the same questions answered in free text (`builtin:sentiment-text`): the probability of the
                   cheerful answer
  arc-correctness  ARC-Easy statements, correct vs a wrong answer (`builtin:arc-easy`), with ARC-Easy accuracy on
                   the items the direction was not trained on (the task's odd half)

Each direction is swept with `actlab.jobs.steer.sweep_job` (what `actlab steer sweep` runs); the recipe at each
coefficient of `--eval-coeffs` then goes through `actlab eval` on the other tasks. Shifts and gains carry standard
errors paired with the plain model.

    python bench/steering_table.py --model smollm2-135m --layers 14-17 --json bench/results/steering_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from actlab.fsutil import atomic_write_json  # noqa: E402
from actlab.jobs.eval import eval_job  # noqa: E402
from actlab.jobs.steer import sweep_job, sweep_table, train_job, with_coeff  # noqa: E402
from actlab.transforms import load_recipe  # noqa: E402

EXPERIMENTS = {  # name: (pair set, task scored on its held-out half)
    "sentiment-ab": ("builtin:sentiment", None),
    "sentiment-text": ("builtin:sentiment-text", None),
    "arc-correctness": ("builtin:arc-easy", "arc_easy"),
}


def floats(text: str) -> list[float]:
    return [float(c) for c in text.split(",") if c.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", required=True, help="the layers the direction is added at, e.g. 14-17")
    ap.add_argument("--method", default="mean-diff")
    ap.add_argument("--coeffs", default="-0.3,-0.15,0.05,0.1,0.15,0.2,0.3",
                    help="coefficients of the sweeps (negative: towards the negative side)")
    ap.add_argument("--task-coeffs", default="-0.15,0.1,0.2",
                    help="coefficients of the sweeps that also score a task (each one scores every item)")
    ap.add_argument("--eval-coeffs", default="0.15", help="coefficients whose recipes `actlab eval` scores")
    ap.add_argument("--eval-tasks", default="lambada,arc_challenge,piqa,hellaswag")
    ap.add_argument("--eval-limit", type=int, default=200, help="items per task for `actlab eval`")
    ap.add_argument("--task-limit", type=int, default=None, help="held-out task items in the sweep (default all)")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--experiments", default=",".join(EXPERIMENTS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    quiet = lambda *a: None  # noqa: E731
    results = {"model": args.model, "layers": args.layers, "method": args.method, "experiments": {}}
    steered = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.experiments.split(","):
            pairs, task = EXPERIMENTS[name]
            recipe = str(Path(tmp) / f"{name}.json")
            trained = train_job(args.model, pairs=f"{pairs}:train", save=recipe, layers=args.layers,
                                method=args.method, log=quiet)
            coeffs = floats(args.task_coeffs if task else args.coeffs)
            swept = sweep_job(args.model, recipe=recipe, pairs=f"{pairs}:test", coeffs=coeffs,
                              task=task, half="test", limit=args.task_limit, windows=args.windows,
                              seq_len=args.seq_len, progress=False, log=print)
            scored = f", {swept['task_items']} held-out {task} items" if task else ""
            print(f"\n## {args.model}: {name} ({pairs}, {args.method} at layers {args.layers}, "
                  f"{swept['n_pairs']} held-out pairs{scored})\n\n{sweep_table(swept)}\n", flush=True)
            entry = {"pairs": pairs, "task": task, "separation": trained["separation"], "norms": trained["norms"],
                     "sweep": swept}
            for coeff in floats(args.eval_coeffs):
                path = Path(tmp) / f"{name}-{coeff:g}.json"
                with_coeff(load_recipe(recipe), coeff).save(path)
                steered.append(str(path))
            results["experiments"][name] = entry
        if steered:  # one evaluation: every steered recipe beside one plain column
            evaluation = eval_job(args.model, steered, tasks=args.eval_tasks, limit=args.eval_limit,
                                  progress=False, log=quiet)
            print(f"\n## {args.model}: the other tasks (actlab eval, {args.eval_limit} items each)\n\n"
                  f"{evaluation.table()}", flush=True)
            results["eval"] = evaluation.to_dict()
    if args.json:
        atomic_write_json(Path(args.json), results)


if __name__ == "__main__":
    main()
