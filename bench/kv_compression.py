"""KV-cache compression side by side: every method x ratio on long-context retrieval at each length, perplexity
under compression and zero-shot tasks, through `actlab eval` (each long document read once for every KV column),
kvpress's presses as rows beside ours on the same retrieval items, the agreement of kept sets with kvpress, and
decode speed and cache memory at long contexts.

    python bench/kv_compression.py [--models smollm2-135m] [--methods streaming-llm,knorm,snapkv,tova,h2o,
        pyramidkv,headwise,loss-aware,...] [--ratios 0.25,0.5,0.75,0.875] [--kinds niah_single,passkey]
        [--lengths 1024,2048,4096] [--items 20] [--ppl-windows 3] [--ppl-methods M,...] [--ppl-ratios R,...]
        [--tasks arc_easy,...] [--task-limit 100] [--parts retrieval,ppl,tasks,kvpress,agreement,speed]

Recipes, the profile the head-wise policy reads and every evaluation live in bench/.work/kv/MODEL (resumable:
an interrupted run continues where it stopped). kvpress runs in its own virtual environment
(bench/.venvs/kvpress, created on first use: `pip install kvpress`, which pins its own transformers) on the same
token ids. Retrieval cells where the dense model is unreliable (accuracy under --reliable) are reported but left
out of the goals' averages. Speed needs an otherwise quiet machine. Prints markdown tables and writes
bench/results/kv_compression_MODEL.json, keeping what an earlier run wrote there and this one did not measure.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from peers import TORCH_SPEC, VENVS, peer_python, write_results  # noqa: E402

WORK = ROOT / "bench" / ".work" / "kv"
METHODS = "streaming-llm,knorm,snapkv,tova,h2o,pyramidkv,headwise,loss-aware,loss-aware:phase=decode"
KVPRESS = "streaming-llm,snapkv,knorm,tova,pyramidkv,expected-attention"
TASKS = "arc_easy,arc_challenge,piqa,hellaswag,lambada"
AGREEMENT = ("streaming-llm", "snapkv", "knorm", "tova")


def recipes_for(lm, model: str, methods: list[str], ratios: list[float], log) -> dict[tuple[str, float], Path]:
    """Each method x ratio's recipe, calibrated once into the work folder (the head-wise policy reads a profile of
    the model made there first; loss-aware calibrates on WikiText-2 valid). A method may carry options as on the
    command line (`loss-aware:press=h2o;phase=decode`); its files and column are named after the whole spec."""
    from actlab.cli import parse_method
    from actlab.jobs import setup
    from actlab.transforms.base import NoCalibration
    from actlab.transforms.kv import get_method

    folder = WORK / model
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    calib = None
    for method in methods:
        for ratio in ratios:
            slug = method.replace(":", "_").replace(";", "_").replace("=", "-")
            path = folder / f"{slug}-{ratio:g}.json"
            if not path.is_file():
                name, params = parse_method(method)
                chosen = get_method(name, **params)
                chosen.progress = True
                if chosen.needs_profile:
                    chosen.profile, chosen.profile_path = profile_tables(model, folder / "profile", log)
                if chosen.calibrated and calib is None:
                    calib = setup.calibration(lm, "wikitext2:valid", 2048, 2)
                chosen.calibrate(calib if chosen.calibrated else NoCalibration(lm), ratio).save(path)
                log(f"calibrated {method} at {ratio:g} -> {path.name}")
            out[method, ratio] = path
    return out


def profile_tables(model: str, run: Path, log):
    from actlab.jobs.profile import profile
    from actlab.report.rundir import RunDirectory

    if not (run / "manifest.json").is_file() or json.loads((run / "manifest.json").read_text())["status"] != "complete":
        log(f"profiling {model} for its head roles -> {run}")
        profile(model, "wikitext2:valid", run, tokens=16384, seq_len=1024, overwrite=True, progress=True,
                log=lambda *a: None)
    rd = RunDirectory(run)
    return {name: rd.read_table(name) for name in ("head_roles", "heads")}, str(run)


def evaluate_part(model: str, name: str, recipes: dict, tasks: str, limit: int, log):
    from actlab.jobs.eval import eval_job

    # one folder per part and --limit: a grown grid (more methods, ratios or lengths) keeps the finished cells
    return eval_job(model, [str(p) for p in recipes.values()], tasks=tasks, limit=limit,
                    out=str(WORK / model / f"eval-{name}-{limit}"), log=log)


def retrieval_items(lm, tasks: list[str], items: int) -> dict[str, list[dict]]:
    """The token ids actlab scores, for kvpress: context, where its question starts, the answer."""
    from actlab.data.tasks import items as task_items
    from actlab.data.tasks import load_task
    from actlab.eval.scoring import encode_shared, fit_context, question_split

    out = {}
    for task in tasks:
        rows = []
        for item in task_items(load_task(task), items, lm.tokenizer):
            context, continuations = encode_shared(lm.tokenizer, item.contexts[0], item.continuations)
            context, split = fit_context(lm, context, continuations, question_split(lm.tokenizer, item, context))
            rows.append({"context": context, "split": split, "continuation": continuations[0]})
        out[task] = rows
    return out


def model_dir(lm) -> str:
    """The HF directory actlab loaded the model from (its cache entry, or the user's directory)."""
    return str(lm.provenance.get("cache_entry") or lm.provenance.get("path") or lm.name)


def run_kvpress(request: dict, tag: str, log) -> dict:
    python = peer_python("kvpress", TORCH_SPEC, "kvpress==0.5.5", note=", kvpress pins transformers < 5.3")
    folder = WORK / "kvpress"
    folder.mkdir(parents=True, exist_ok=True)
    req, res = folder / f"{tag}-request.json", folder / f"{tag}-result.json"
    if res.is_file() and json.loads(req.read_text()) == request:
        return json.loads(res.read_text())
    req.write_text(json.dumps(request))
    log(f"kvpress ({VENVS / 'kvpress'}): {len(request['presses'])} presses ...")
    subprocess.run([str(python), str(ROOT / "bench" / "kvpress_side.py"), str(req), str(res)], check=True)
    return json.loads(res.read_text())


def actlab_kept(lm, method: str, ratio: float, prompt: list[int]) -> list[list[list[int]]]:
    import torch

    from actlab.transforms import attach
    from actlab.transforms.base import NoCalibration
    from actlab.transforms.kv import get_method
    from actlab.transforms.kv.session import SESSION

    with attach(lm, get_method(method).calibrate(NoCalibration(lm), ratio)), torch.no_grad():
        lm.model(input_ids=torch.tensor([prompt]), use_cache=True)
        state = lm.adapter.layers[0].attn.__dict__[SESSION].layers
        return [[state[i].alive[0, h].nonzero().flatten().tolist() for h in range(state[i].alive.shape[1])]
                for i in sorted(state)]


def agreement(ours: list, theirs: list) -> dict:
    same = jaccard = n = 0
    for layer_a, layer_b in zip(ours, theirs):
        for a, b in zip(layer_a, layer_b):
            n += 1
            same += a == b
            jaccard += len(set(a) & set(b)) / max(1, len(set(a) | set(b)))
    return {"heads": n, "identical": same / n, "jaccard": jaccard / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2-135m")
    ap.add_argument("--methods", default=METHODS, help="'' for the dense model alone (which retrieval cells are "
                    "reliable)")
    ap.add_argument("--ratios", default="0.25,0.5,0.75,0.875")
    ap.add_argument("--kinds", default="niah_single,passkey")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--items", type=int, default=20, help="retrieval items per kind and length")
    ap.add_argument("--ppl-windows", type=int, default=3, help="4096-token WikiText-2 windows (wikitext2_kv)")
    ap.add_argument("--ppl-methods", default=None, help="the methods perplexity under compression is measured for "
                    "(default: every method; it is the slowest part)")
    ap.add_argument("--ppl-ratios", default=None, help="and the ratios (default: every ratio)")
    ap.add_argument("--tasks", default=TASKS)
    ap.add_argument("--task-limit", type=int, default=100)
    ap.add_argument("--kvpress-presses", default=KVPRESS)
    ap.add_argument("--reliable", type=float, default=0.5, help="dense accuracy a retrieval cell needs to count")
    ap.add_argument("--parts", default="retrieval,ppl,tasks,kvpress,agreement")
    ap.add_argument("--speed-contexts", default="2048,4096,8192")
    args = ap.parse_args()
    import actlab

    parts = set(args.parts.split(","))
    ratios = [float(r) for r in args.ratios.split(",")]
    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    for model in args.models.split(","):
        lm = actlab.load_model(model)
        methods = [m for m in args.methods.split(",") if m]  # none (--methods ''): the dense model alone
        recipes = recipes_for(lm, model, methods, ratios, log)
        limit_len = lm.max_context or 10 ** 9
        retrieval = [f"{k}@{n}" for k in args.kinds.split(",") for n in map(int, args.lengths.split(","))
                     if n <= limit_len]
        payload: dict = {"model": model, "args": vars(args), "recipes": {f"{m}@{r:g}": str(p) for (m, r), p in
                                                                          recipes.items()}}
        columns: dict[str, dict] = {}

        def collect(evaluation):
            for col in evaluation.columns:
                entry = columns.setdefault(col.name, {"measured": {}, "cost": col.cost})
                entry["measured"].update(col.measured)
                for task, res in col.results.items():
                    for metric, (value, se) in res.metrics.items():
                        entry[f"{task}/{metric}"] = value
                        entry[f"{task}/{metric}/se"] = se
                        if col is not evaluation.columns[0]:
                            d, dse = evaluation.difference(col, task, metric)
                            entry[f"{task}/{metric}/delta"], entry[f"{task}/{metric}/delta_se"] = d, dse

        if "retrieval" in parts:
            collect(evaluate_part(model, "retrieval", recipes, ",".join(retrieval), args.items, log))
        if "ppl" in parts:
            chosen = args.ppl_methods.split(",") if args.ppl_methods else methods
            at = [float(r) for r in args.ppl_ratios.split(",")] if args.ppl_ratios else ratios
            collect(evaluate_part(model, "ppl", {(m, r): p for (m, r), p in recipes.items() if m in chosen and r in at},
                                  "wikitext2_kv", args.ppl_windows, log))
        if "tasks" in parts:
            collect(evaluate_part(model, "tasks", recipes, args.tasks, args.task_limit, log))
        payload["columns"] = columns
        if "kvpress" in parts:
            presses = [[p, r] for p in args.kvpress_presses.split(",") for r in ratios]
            items = retrieval_items(lm, retrieval, args.items)
            scored = {}
            for task, rows in items.items():
                result = run_kvpress({"model_dir": model_dir(lm),
                                      "presses": presses, "items": rows}, f"{model}-{task}-{args.items}", log)
                scored[task] = result
            payload["kvpress"] = {task: {"acc": {k: statistics.mean(g for _, g in v) for k, v in r["scores"].items()},
                                         "errors": r["errors"], "versions": r["versions"]}
                                  for task, r in scored.items()}
        if "agreement" in parts:
            from actlab.jobs.bench import long_prompt

            prompt = long_prompt(lm, 1024)
            request = {"model_dir": model_dir(lm),
                       "presses": [[p, 0.5] for p in AGREEMENT], "items": [], "kept_prompt": prompt}
            theirs = run_kvpress(request, f"{model}-kept", log)
            payload["agreement"] = {p: agreement(actlab_kept(lm, p, 0.5, prompt), theirs["kept"][f"{p}@0.5"])
                                    if f"{p}@0.5" in theirs["kept"] else {"error": theirs["errors"].get(f"{p}@0.5")}
                                    for p in AGREEMENT}
        if "speed" in parts:
            from actlab.jobs.bench import bench_context

            contexts = [min(c, limit_len - 40) for c in map(int, args.speed_contexts.split(","))]
            # every recipe of this run (--methods x --ratios), keyed like the columns
            payload["speed"] = {path.stem: bench_context(model, str(path), contexts, tokens=32, reps=2, log=log)
                                for path in recipes.values()}
        out = ROOT / "bench" / "results" / f"kv_compression_{model.split('-')[0]}.json"
        merge_earlier(payload, out)
        report(payload, retrieval, args)
        write_results(out, payload)


def merge_earlier(payload: dict, path: Path) -> None:
    """Keep what an earlier run of this model wrote to `path` and this run did not measure (another part, method or
    ratio): each column's cells, the recipes, kvpress rows, agreement and speed of what this run left out, and the
    arguments of the runs before."""
    if not path.is_file():
        return
    earlier = json.loads(path.read_text())
    if earlier.get("model") != payload["model"]:
        return
    payload["earlier_args"] = [*earlier.get("earlier_args", []), earlier["args"]]  # what made the kept cells
    for name, cells in earlier.get("columns", {}).items():
        mine = payload.setdefault("columns", {}).setdefault(name, {})
        payload["columns"][name] = {**cells, **mine, "measured": {**cells.get("measured", {}),
                                                                  **mine.get("measured", {})}}
    # each keyed by recipe, task, press: the earlier run's entries, then this run's
    for part in ("recipes", "kvpress", "agreement", "speed"):
        if part in earlier:
            payload[part] = {**earlier[part], **payload.get(part, {})}


def report(payload: dict, retrieval: list[str], args) -> None:
    """Markdown: retrieval accuracy per cell, the share of dense kept on reliable cells, perplexity under
    compression and the zero-shot change, a row per method x ratio (kvpress's beside); agreement; speed."""
    cols = payload.get("columns", {})
    dense = cols.get("dense", {})
    reliable = [t for t in retrieval if dense.get(f"{t}/acc", 0) >= args.reliable]
    print(f"\n## {payload['model']}: retrieval accuracy (dense reliable where >= {args.reliable}: "
          f"{', '.join(reliable) or 'none'})\n")
    print("| method | ratio | " + " | ".join(retrieval) + " | % of dense (reliable) | ppl Δ% | zero-shot Δ acc |")
    print("|---" * (len(retrieval) + 5) + "|")
    zero_shot = args.tasks.split(",")

    def row(name: str, ratio: str, accs: dict, entry: dict) -> None:
        kept = [accs[t] / dense[f"{t}/acc"] for t in reliable if accs.get(t) is not None]
        ppl, base = entry.get("wikitext2_kv/perplexity"), dense.get("wikitext2_kv/perplexity")
        shots = [entry[f"{t}/acc/delta"] for t in zero_shot if f"{t}/acc/delta" in entry]
        cells = [f"{accs[t]:.2f}" if accs.get(t) is not None else "-" for t in retrieval]
        cells += [f"{100 * statistics.mean(kept):.0f}" if kept else "-",
                  f"{100 * (ppl / base - 1):+.1f}" if ppl and base else "-",
                  f"{100 * statistics.mean(shots):+.1f}" if shots else "-"]
        print(f"| {name} | {ratio} | " + " | ".join(cells) + " |")

    row("dense", "0", {t: dense.get(f"{t}/acc") for t in retrieval}, {})
    for name, entry in cols.items():
        if name != "dense":
            method, _, ratio = name.rpartition("-")
            row(method, ratio, {t: entry.get(f"{t}/acc") for t in retrieval}, entry)
    kvp = payload.get("kvpress", {})
    for key in sorted({k for info in kvp.values() for k in info["acc"]}):
        name, _, ratio = key.rpartition("@")
        row(f"kvpress {name}", ratio, {t: kvp.get(t, {}).get("acc", {}).get(key) for t in retrieval}, {})
    if "agreement" in payload:
        print("\nkept sets against kvpress (ratio 0.5, a 1024-token prompt): " + "; ".join(
            f"{p}: {a['identical']:.1%} of heads identical, Jaccard {a['jaccard']:.3f}" if "identical" in a else
            f"{p}: {a['error']}" for p, a in payload["agreement"].items()))
    for name, out in payload.get("speed", {}).items():
        print(f"\n{name} decode: " + "; ".join(
            f"{r['context']}: {r['full_tok_s']:.1f} -> {r['recipe_tok_s']:.1f} tok/s ({r['speedup']:.2f}x), "
            f"{r['full_kv_mb']:.0f} -> {r['recipe_kv_mb']:.0f} MB" for r in out["contexts"]))


if __name__ == "__main__":
    main()
