"""The quantization quality table: method x setting x {WikiText-2 perplexity, LAMBADA, ARC-E, ARC-C, PIQA,
HellaSwag} through `actlab eval`, every recipe made by `actlab quant`'s job, one evaluation per model (one
plain column beside every quantized one, paired standard errors).

    python bench/quant_table.py --model smollm2-135m --limit 100 --json bench/results/quant_smollm2.json
    python bench/quant_table.py --model gemma3-270m --limit 100 --json bench/results/quant_gemma3.json

Settings are `method-bits-g<group>[-option=value]` (`mixed-3.5-g128`: an average of 3.5 bits; `smoothquant-8`:
W8A8; `gptq-3-gG-act_order=true`: a method option). Group
`gG` stands for 128 where it divides every projection's input and otherwise the largest of 64 and 32 that does
(SmolLM2's widths, 576 and 1536, are not multiples of 128). Both built-in models were published as 4-bit GGUF
(SmolLM2: Q4_1, groups of 32) and are dequantized to float32: `rtn-4-g32` rebuilds SmolLM2's source grid.
Recipes and the evaluation are kept under bench/.work/quant/<model> (an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from actlab.fsutil import atomic_write_json  # noqa: E402
from actlab.jobs import setup  # noqa: E402
from actlab.jobs.eval import DEFAULT_TASKS, eval_job  # noqa: E402
from actlab.jobs.quant import quant_job  # noqa: E402

SETTINGS = ("rtn-4-g32,rtn-4-gG,awq-4-gG,gptq-4-gG-act_order=true,rtn-3-gG,awq-3-gG,gptq-3-gG-act_order=true,"
            "mixed-3.5-gG,mixed-3.5-gG-quantizer=awq,layerwise-3.5-gG,smoothquant-8")


def large_group(lm) -> int:
    widths = {v.in_features for layer in lm.adapter.layers for v in layer.linears.values()}
    return next(g for g in (128, 64, 32) if all(w % g == 0 for w in widths))


def parse(setting: str, big: int) -> dict:
    """`method-bits-g<group>[-key=value...]` -> quant_job's arguments (method options after the grid)."""
    from actlab.cli import parse_method

    parts = setting.split("-")
    method = parts[0]
    params = parse_method(":" + ";".join(p for p in parts[1:] if "=" in p))[1]
    parts = [p for p in parts if "=" not in p]
    if method == "smoothquant":
        return {"method": method, "params": params}
    bits = float(parts[1])
    group = big if parts[2] == "gG" else int(parts[2].removeprefix("g"))
    out = {"method": method, "group": group, "params": params}
    if method in ("mixed", "layerwise"):
        out["avg_bits"] = bits
    else:
        out["bits"] = int(bits)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--settings", default=SETTINGS)
    ap.add_argument("--tasks", default=DEFAULT_TASKS)
    ap.add_argument("--limit", type=int, default=200, help="items per choice / LAMBADA task")
    ap.add_argument("--ppl-windows", type=int, default=20, help="WikiText-2 windows of 1024 tokens")
    ap.add_argument("--calib-windows", type=int, default=4)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    quiet = lambda *_: None  # noqa: E731
    lm = setup.model(args.model, quiet)
    big = large_group(lm)
    work = ROOT / "bench" / ".work" / "quant" / args.model
    work.mkdir(parents=True, exist_ok=True)
    made = {}
    for setting in [s.strip() for s in args.settings.split(",") if s.strip()]:
        name = setting.replace("gG", f"g{big}").replace("=", "_")
        path = work / f"{name}.json"
        spec = parse(setting, big)
        if not path.is_file():
            t0 = time.perf_counter()
            out = quant_job(args.model, save=str(path), calib_windows=args.calib_windows, progress=False, log=quiet,
                            **spec)
            out["seconds"] = time.perf_counter() - t0
            (work / f"{name}.made.json").write_text(json.dumps(out, default=str))
            print(f"{name}: {out['recipe']} ({out['seconds']:.0f} s) {out['cost_line']}", flush=True)
        made[name] = {**spec, **json.loads((work / f"{name}.made.json").read_text())}
    recipes = [str(work / f"{n}.json") for n in made]
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    evaluations = {}
    if "wikitext2" in tasks:  # perplexity windows are 1024 tokens each: fewer of them than items of a choice task
        evaluations["wikitext2"] = eval_job(args.model, recipes, tasks="wikitext2", limit=args.ppl_windows,
                                            out=str(work / f"eval-wikitext2-{args.ppl_windows}"), progress=False,
                                            log=quiet)
    others = ",".join(t for t in tasks if t != "wikitext2")
    if others:
        evaluations["tasks"] = eval_job(args.model, recipes, tasks=others, limit=args.limit,
                                        out=str(work / f"eval-tasks-{args.limit}"), progress=False, log=quiet)
    for part, evaluation in evaluations.items():
        what = f"{args.ppl_windows} windows" if part == "wikitext2" else f"{args.limit} items per task"
        print(f"\n## {args.model}: quantization, {part} ({what}; group G = {big})\n\n{evaluation.table()}", flush=True)
    if args.json:
        atomic_write_json(Path(args.json), {"model": args.model, "group_G": big, "limit": args.limit,
                                            "ppl_windows": args.ppl_windows, "recipes": made,
                                            "eval": {k: e.to_dict() for k, e in evaluations.items()}})
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
