"""The `actlab` command line: parses arguments and calls the jobs, nothing more."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from actlab.errors import ActlabError

# plain click help (rich's panels print every flag as `--json <bool>`); each command's docstring ends in examples
app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Profile the insides of Hugging Face causal LMs and transform them, with the cost measured.")

DEFAULT_MODEL = "smollm2-135m"
CORPUS_HELP = "a text file, a directory of .txt files, python-docs, wikitext2[:test|:valid] or hf:NAME[:CONFIG]:SPLIT"
ModelOpt = Annotated[str, typer.Option("--model", "-m", help="built-in name, HF hub id, HF directory or .gguf path")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", min=2, help="tokens per window")]
CalibOpt = Annotated[str | None, typer.Option(help=f"calibration corpus ({CORPUS_HELP}; default: the calibration "
                                                   "half of python-docs)")]
EvalDataOpt = Annotated[str | None, typer.Option("--eval", help=f"evaluation corpus ({CORPUS_HELP}; default: the "
                                                               "evaluation half of python-docs)")]
WindowsOpt = Annotated[int, typer.Option(min=1, help="evaluation windows")]
NprocOpt = Annotated[int, typer.Option("--nproc", min=1, help="data-parallel processes on this machine (launches "
                                                            "torchrun; each gets a share of the cores)")]
CalibWindowsOpt = Annotated[int, typer.Option("--calib-windows", min=1, help="calibration windows")]
HeldOutOpt = Annotated[int, typer.Option("--windows", min=0, help="held-out windows for the perplexity of the plain "
                                                               "and the transformed model (0: none)")]
TASKS = "wikitext2,lambada,arc_easy,arc_challenge,piqa,hellaswag"


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _version(value: bool) -> None:
    if value:
        from actlab import __version__

        print(f"actlab {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    allow_missing_weights: Annotated[bool, typer.Option("--allow-missing-weights", help="load a checkpoint that "
                                                        "lacks weights (they are random; every output says so)")]
    = False,
    device_map: Annotated[str | None, typer.Option("--device-map", help="spread the weights with accelerate: "
                                                   "auto, balanced, sequential (a model bigger than memory)")] = None,
    max_memory: Annotated[str | None, typer.Option("--max-memory", help="memory per device for --device-map, e.g. "
                                                   "cpu=2GiB,0=20GiB; what does not fit is read from disk")] = None,
    version: Annotated[bool, typer.Option("--version", is_eager=True, callback=_version,
                                          help="print the version and exit")] = False,
) -> None:
    if allow_missing_weights:
        import os

        os.environ["ACTLAB_ALLOW_MISSING_WEIGHTS"] = "1"
    if device_map is not None or max_memory is not None:
        from actlab.models.placement import Placement

        Placement(device_map, max_memory).export()  # every model this command loads (a bad value: one line)


def _emit(obj: dict, as_json: bool, human: str) -> None:
    from actlab.parallel import launched_rank

    if launched_rank() == 0:  # a data-parallel job reports once
        print(json.dumps(obj) if as_json else human)


def _rank0_value(value):
    """Under torchrun, rank 0's `value` on every rank (a name made from the clock); elsewhere `value`."""
    from actlab import parallel

    return parallel.broadcast(value, parallel.world()) if parallel.launched_size() > 1 else value


def _relaunch(nproc: int) -> None:
    """`--nproc N` (N > 1) outside torchrun: run this command line on N processes, then exit with their code."""
    from actlab import parallel

    if nproc > 1 and parallel.launched_size() <= 1:
        raise typer.Exit(parallel.launch(nproc, parallel.without_nproc(sys.argv[1:])))


def parse_method(spec: str) -> tuple[str, dict]:
    """"wina:topk=true;step=0.1" -> ("wina", {"topk": True, "step": 0.1}): numbers, booleans and strings."""
    name, _, options = spec.partition(":")
    params: dict = {}
    for item in filter(None, options.split(";")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ActlabError(f"method option {item!r} is not key=value (e.g. --method wina:topk=true)")
        lowered = value.lower()
        if lowered in ("true", "false"):
            params[key] = lowered == "true"
        else:
            try:
                params[key] = int(value)
            except ValueError:
                try:
                    params[key] = float(value)
                except ValueError:
                    params[key] = value
    return name, params


@app.command("models")
def models_cmd(as_json: JsonOpt = False) -> None:
    """List the built-in models and whether each is cached.

    \b
    Examples:
      actlab models
      actlab models --json
    """
    from actlab.models import list_models

    rows = list_models()
    if as_json:
        print(json.dumps(rows))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"{r['name']:<{width}}  {r['state']}\n{'':<{width}}  {r['description']}")


@app.command("ppl")
def ppl_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    data: Annotated[str | None, typer.Option(help=f"corpus: {CORPUS_HELP}")] = None,
    seq_len: SeqLenOpt = 1024,
    windows: Annotated[int | None, typer.Option(min=1, help="number of windows (default: all)")] = None,
    offset: Annotated[int, typer.Option(min=0, help="first token of the first window")] = 0,
    bos: Annotated[str, typer.Option(help="how windows start: tokenizer (as the tokenizer encodes the whole text: "
                                          "BOS, if any, only first), every (BOS first in each window) or none")]
    = "tokenizer",
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="windows per forward (auto)")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity of a model on a corpus (non-overlapping windows from the start, GPTQ/TEAL protocol).

    \b
    Examples:
      actlab ppl --model smollm2-135m --data wikitext2:test --seq-len 1024 --windows 40
    """
    from actlab.data import WindowSpec, load_corpus, make_windows
    from actlab.eval import perplexity
    from actlab.models import load_model

    lm = load_model(model, log_fn=_log)
    corpus = load_corpus(data, role="eval" if data is None else "all")
    spec = WindowSpec(seq_len=seq_len, num_windows=windows, offset=offset, bos=bos)  # type: ignore[arg-type]
    ids = make_windows(lm.tokenizer, corpus, spec, lm.max_context)
    result = perplexity(lm, ids, batch_size=batch_size)
    out = {**result.to_dict(), "stderr": result.stderr(), "data": corpus.name, "protocol": spec.describe(),
           **({"warnings": lm.provenance["warnings"]} if lm.provenance.get("warnings") else {})}
    spread = f" ± {result.stderr():.4f}" if result.windows > 1 else " (one window: no standard error)"
    _emit(out, as_json, f"{lm.name} on {corpus.name}: ppl {result.ppl:.4f}{spread} over "
                        f"{result.tokens} predicted tokens ({result.windows} windows x {result.seq_len}) in "
                        f"{result.seconds:.1f}s")


@app.command("profile")
def profile_cmd(
    model: Annotated[str | None, typer.Option("--model", "-m", help="built-in name, HF hub id, HF directory or "
                                              ".gguf path (default smollm2-135m; with --resume the run's)")] = None,
    data: Annotated[str | None, typer.Option(help=f"corpus ({CORPUS_HELP}; default: python-docs)")] = None,
    tokens: Annotated[int, typer.Option(min=1, help="tokens to profile (rounded up to whole windows)")] = 32 * 1024,
    seq_len: Annotated[int | None, typer.Option("--seq-len", min=2, help="tokens per window (default 1024)")] = None,
    sites: Annotated[str | None, typer.Option(help="site patterns, e.g. 'L*.down_in,L*.resid_out'")] = None,
    out: Annotated[str | None, typer.Option(help="run directory (default runs/<model>-<time>)")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue a partial run, or extend a complete one to "
                                                          "--tokens")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing run in --out")] = False,
    batch_size: Annotated[int | None, typer.Option("--batch-size", min=1, help="windows per forward (1)")] = None,
    query_stride: Annotated[int | None, typer.Option(min=1, help="attention statistics read every n-th query "
                                                                "(default 16)")] = None,
    lens_stride: Annotated[int | None, typer.Option(min=1, help="logit lens reads every n-th position "
                                                               "(default 128)")] = None,
    bos: Annotated[str | None, typer.Option(help="how windows start: every (BOS first in each window), tokenizer "
                                                 "(only where the tokenizer puts it: the first window) or none; "
                                                 "default: every for models whose tokenizer adds BOS (Gemma)")] = None,
    nproc: NprocOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Profile activations at every site and write tables, raw state and report.html into a run directory.

    \b
    Examples:
      actlab profile --model gemma3-270m --data wikitext2:valid --tokens 65536 --out runs/gemma
      actlab profile --sites 'L*.down_in' --out runs/ffn
      actlab profile --nproc 2 --data wikitext2:valid --out runs/two   # data parallel (or: torchrun -m actlab)
    """
    import time as _time

    from actlab.jobs.profile import ProfileOptions, profile

    if out is None:  # one name for every process: the launcher passes it on, torchrun's ranks take rank 0's
        out = f"runs/{Path(model or DEFAULT_MODEL).name}-{_time.strftime('%Y%m%d-%H%M%S')}"
        sys.argv += ["--out", out]
        out = _rank0_value(out)
    _relaunch(nproc)
    options = ProfileOptions(sites=sites, query_stride=query_stride, lens_stride=lens_stride, batch_size=batch_size)
    run = profile(model, data, out, tokens=tokens, seq_len=seq_len, options=options, resume=resume,
                  overwrite=overwrite, log=_log, bos=bos)
    summary = _run_summary(run)
    _emit(summary, as_json, f"{summary['status']}: {summary['tokens']} tokens, {summary['sites']} sites -> "
                            f"{summary['report']}")


def _run_summary(run) -> dict:
    """What --json prints for a run directory: where it is, its status and size, its tables and report."""
    manifest = run.manifest()
    tables = sorted(p.stem for p in (run.path / "tables").glob("*.parquet"))
    return {"run": str(run.path), "status": manifest.get("status"), "model": manifest.get("model", {}).get("name"),
            "tokens": manifest.get("tokens_done"), "windows": manifest.get("windows_done"),
            "sites": len(manifest.get("sites", [])), "tables": tables, "report": str(run.path / "report.html")}


@app.command("report")
def report_cmd(run: Annotated[str, typer.Argument(help="a complete run directory")],
               as_json: JsonOpt = False) -> None:
    """Re-render report.html of a run from its tables.

    \b
    Examples:
      actlab report runs/gemma
    """
    from actlab.jobs.profile import rerender
    from actlab.report.rundir import RunDirectory

    page = rerender(run)
    _emit(_run_summary(RunDirectory(page.parent)), as_json, str(page))


@app.command("merge")
def merge_cmd(runs: Annotated[list[str], typer.Argument(help="two or more complete runs")],
              out: Annotated[str, typer.Option(help="new run directory")], as_json: JsonOpt = False) -> None:
    """Merge the statistics of runs of the same model (e.g. profiled on different corpora) into a new run.

    \b
    Examples:
      actlab merge runs/a runs/b --out runs/ab
    """
    from actlab.jobs.profile import merge

    target = merge(runs, out, log=_log)
    _emit({**_run_summary(target), "merged": list(runs)}, as_json,
          f"merged {len(runs)} runs -> {target.path / 'report.html'}")


@app.command("sparsify")
def sparsify_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str | None, typer.Option(help="sparsity method, with options after a colon "
                                                    "(e.g. wina:topk=true); see --list-methods")] = None,
    sparsity: Annotated[float | None, typer.Option(help="target effective sparsity in [0, 1)")] = None,
    calib: CalibOpt = None,
    eval_data: EvalDataOpt = None,
    seq_len: SeqLenOpt = 1024,
    windows: WindowsOpt = 16,
    calib_windows: CalibWindowsOpt = 16,
    positions: Annotated[str | None, typer.Option(help="all (decode-like: every token) | last-half (TEAL's protocol); "
                                                      "default: all, or what --recipe records")] = None,
    recipe: Annotated[str | None, typer.Option(help="evaluate a saved recipe instead of calibrating")] = None,
    save: Annotated[str | None, typer.Option(help="save the recipe (.json or .yaml)")] = None,
    list_methods: Annotated[bool, typer.Option("--list-methods", help="list the methods and exit")] = False,
    as_json: JsonOpt = False,
    nproc: NprocOpt = 1,
) -> None:
    """Calibrate a sparsity method to a budget, then measure dense and sparse perplexity on held-out data.

    \b
    Examples:
      actlab sparsify --method loss-aware --sparsity 0.5 --calib wikitext2:valid --eval wikitext2:test --save la50.json
      actlab sparsify --list-methods
    """
    if list_methods:
        _list_methods(as_json)
        return
    _relaunch(nproc)  # data parallel: each process calibrates on its block of windows
    from actlab.errors import ConfigError
    from actlab.jobs.sparsify import sparsify

    if recipe is None and (method is None or sparsity is None):
        raise ConfigError("give --method and --sparsity (or --recipe); --list-methods shows the methods")
    name, params = parse_method(method) if method else (None, {})
    out = sparsify(model, method=name, sparsity=sparsity, calib=calib, eval_data=eval_data, seq_len=seq_len,
                   windows=windows, calib_windows=calib_windows, positions=positions, recipe_path=recipe,
                   save=save, log=_log, params=params)
    _emit(out, as_json, f"{out['model']} {out['method']} target {out['target_sparsity']:.2f}: achieved "
                        f"{out['achieved_sparsity']:.3f}, ppl {out['dense_ppl']:.3f} dense -> {out['sparse_ppl']:.3f} "
                        f"sparse ({out['ppl_increase']:+.1%}) on {out['eval_data']}, positions {out['positions']} "
                        f"(from the {out['positions_from']})")


def _list_methods(as_json: bool) -> None:
    """The sparsity methods as a table: name, engine support, parameters (defaults), paper."""
    import dataclasses

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from actlab.transforms.sparsity import HOOKS_ONLY, METHODS

    rows = [{"method": name, "engine": name not in HOOKS_ONLY,
             "parameters": {f.name: f.default for f in dataclasses.fields(cls)
                            if f.default is not dataclasses.MISSING and not f.name.startswith("_")},
             "paper": cls.paper} for name, cls in METHODS.items()]
    if as_json:
        print(json.dumps(rows, default=str))
        return
    table = Table("method", "engine", "parameters (default)", "paper", show_lines=False)
    for r in rows:
        table.add_row(r["method"], "yes" if r["engine"] else "hooks only",
                      escape(", ".join(f"{k}={v}" for k, v in r["parameters"].items()) or "-"), escape(r["paper"]))
    Console(width=max(160, Console().width)).print(table)
    print("parameters go after the name: --method wina:topk=true;step=0.1 (numbers, booleans and strings)")


@app.command("eval")
def eval_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    recipe: Annotated[list[str] | None, typer.Option(help="a recipe file to evaluate beside dense (repeat for more "
                                                          "columns; a composed recipe file is one column)")] = None,
    tasks: Annotated[str, typer.Option(help="comma-separated task names or task YAML files")] = TASKS,
    limit: Annotated[int | None, typer.Option(min=1, help="the first N items of each task (windows for "
                                                          "perplexity)")] = None,
    out: Annotated[str | None, typer.Option(help="write results.json, per-item records and compare.html here")] = None,
    speed: Annotated[bool, typer.Option("--speed", help="also measure decode tokens/s and engine memory")] = False,
    nproc: NprocOpt = 1,
    as_json: JsonOpt = False,
) -> None:
    """Evaluate the dense model and every recipe on the same items: perplexity and zero-shot tasks (lm-eval's
    prompts and metrics), each with a standard error; a Δ column per recipe with the paired error.

    \b
    Examples:
      actlab eval --recipe la50.json --tasks wikitext2,lambada,arc_easy,piqa --limit 500 --out runs/eval
      actlab eval --tasks my_task.yaml
      actlab eval --nproc 2 --recipe la50.json --tasks arc_easy,piqa   # each process scores half the items
    """
    from actlab.jobs.eval import eval_job
    from actlab.parallel import launched_rank

    _relaunch(nproc)
    result = eval_job(model, recipe or [], tasks=tasks, limit=limit, out=out, speed=speed, log=_log)
    if launched_rank() != 0:
        return
    if as_json:
        print(json.dumps(result.to_dict()))
        return
    print(result.table())
    for col in result.columns[1:]:
        measured = " ".join(f"{k} {v:.3f}" for k, v in col.measured.items())
        print(f"{col.name}: {col.recipe.describe()}; {measured}")
    for col in result.columns:
        if col.speed.get("decode_tok_s"):
            prefill = (f", HF prefill {col.speed['prefill_s'] * 1e3:.0f} ms ({col.speed['prefill_speedup']:.2f}x dense)"
                       if "prefill_s" in col.speed else "")
            print(f"{col.name}: decode {col.speed['decode_tok_s']:.1f} tok/s, engine {col.speed['engine_mb']:.0f} MB"
                  + prefill)
    if out:
        print(f"-> {Path(out) / 'compare.html'}")


@app.command("compose")
def compose_cmd(
    recipes: Annotated[list[str], typer.Argument(help="recipe files, applied in this order")],
    out: Annotated[str, typer.Option(help="the composed recipe file (.json or .yaml)")],
    model: Annotated[str | None, typer.Option("--model", "-m", help="also validate against this model")] = None,
) -> None:
    """Compose recipes of any families into one recipe file (validated: same model, parts that can stack).

    \b
    Examples:
      actlab compose la50.json drop.yaml --out both.json --model smollm2-135m
    """
    from actlab.jobs.export import compose_job

    recipe = compose_job(recipes, out, model=model, log=_log)
    print(f"{recipe.describe()} -> {out}")


@app.command("layers")
def layers_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str | None, typer.Option(help="a layer method, with options after a colon (e.g. "
                                                    "joint:repair=mean); see --list-methods")] = None,
    budget: Annotated[float | None, typer.Option(help="fraction of non-embedding parameters to remove, "
                                                      "in [0, 1)")] = None,
    remove: Annotated[str | None, typer.Option(help="instead of a method: the blocks and sublayers to remove, e.g. "
                                                    "'L20,L21.attn,L3.mlp'")] = None,
    save: Annotated[str | None, typer.Option(help="the layer recipe file (.json or .yaml)")] = None,
    calib: CalibOpt = None,
    seq_len: SeqLenOpt = 1024,
    calib_windows: CalibWindowsOpt = 4,
    eval_data: EvalDataOpt = None,
    windows: HeldOutOpt = 0,
    importance: Annotated[bool, typer.Option("--importance", help="rank every block and sublayer by each metric and "
                                             "by the measured loss of removing it (--save: a .csv)")] = False,
    run: Annotated[str | None, typer.Option(help="with --importance: a complete profile run of this model that gets "
                                                 "the measured ranking (its report shows it)")] = None,
    extend: Annotated[str | None, typer.Option(help="a recipe of the same greedy method (sleb, joint) on the same "
                                                    "calibration set: continue it to --budget instead of starting "
                                                    "over")] = None,
    list_methods: Annotated[bool, typer.Option("--list-methods", help="list the methods and exit")] = False,
    as_json: JsonOpt = False,
    nproc: NprocOpt = 1,
) -> None:
    """Remove whole blocks (L20) or attention / MLP sublayers (L21.attn, L3.mlp), chosen by a method to a parameter
    budget or named by hand; evaluate, compose and export the recipe like any other; the decode engine skips what
    it removes.

    \b
    Examples:
      actlab layers --method shortgpt --budget 0.25 --save short25.json
      actlab layers --method joint --budget 0.25 --eval wikitext2:test --windows 8 --save j25.json
      actlab layers --method joint --budget 0.375 --extend j25.json --save j375.json
      actlab layers --remove L20,L21.attn --save drop.yaml
      actlab layers --importance --calib-windows 2 --run runs/demo
      actlab layers --list-methods
    """
    if list_methods:
        _list_layer_methods(as_json)
        return
    _relaunch(nproc)  # data parallel: each process calibrates on its block of windows
    from actlab.errors import ConfigError
    from actlab.jobs.layers import importance_job, layers_job

    if run is not None and not importance:
        raise ConfigError("--run is for --importance (the profile run that gets the measured ranking)")
    if importance:
        out = importance_job(model, calib=calib, seq_len=seq_len, calib_windows=calib_windows, save=save, run=run,
                             log=_log)
        _emit(out, as_json, _importance_text(out))
        return

    if not save:
        raise ConfigError("give --save: the layer recipe file to write (.json or .yaml)")
    name, params = parse_method(method) if method else (None, {})
    out = layers_job(model, save=save, remove=remove, method=name, budget=budget, params=params, calib=calib,
                     seq_len=seq_len, calib_windows=calib_windows, eval_data=eval_data, windows=windows,
                     extend=extend, log=_log)
    lines = [f"{out['recipe']} -> {save}", f"removed {out['removed_fraction']:.1%} of the non-embedding parameters; "
             f"{out['cost_line']}"]
    if "calib_loss" in out:
        lines.append(f"calibration loss {out['calib_loss_dense']:.4f} dense -> {out['calib_loss']:.4f} "
                     f"on {out['calib_data']}")
    if "ppl" in out:
        lines.append(f"ppl {out['dense_ppl']:.3f} dense -> {out['ppl']:.3f} ({out['ppl'] / out['dense_ppl'] - 1:+.1%}) "
                     f"on {out['eval_data']}")
    _emit(out, as_json, "\n".join(lines))


def _importance_text(out: dict) -> str:
    lines = [f"{out['model']}: removing one part at a time, {out['tokens']} tokens of {out['calib_data']}"]
    by_kind: dict[str, list[dict]] = {}
    for row in out["parts"]:
        by_kind.setdefault(row["kind"], []).append(row)
    for kind, rows in by_kind.items():
        rows = sorted(rows, key=lambda r: r["delta_loss"])
        label = {"block": "blocks", "attn": "attention sublayers", "mlp": "MLP sublayers"}.get(kind, kind)
        lines.append(f"{label}, least harmful first (Δ loss, influence): " + ", ".join(
            f"{r['part']} {r['delta_loss']:+.3f} ({r['influence']:.3f})" for r in rows[:8]))
    lines.append("Spearman with the measured Δ loss: " + ", ".join(
        f"{name} {rho:+.2f}" for name, rho in out["spearman_with_measured"].items()))
    if out.get("report"):
        lines.append(f"report: {out['report']}")
    return "\n".join(lines)


def _list_layer_methods(as_json: bool) -> None:
    import inspect

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from actlab.transforms.layers import METHODS

    rows = [{"method": name, "removes": cls.removes, "measures_loss": cls.measures_loss,
             "parameters": {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                            if p.default is not inspect.Parameter.empty},
             "paper": cls.paper} for name, cls in METHODS.items()]
    if as_json:
        print(json.dumps(rows, default=str))
        return
    table = Table("method", "removes", "cost", "parameters (default)", "paper")
    for r in rows:
        table.add_row(r["method"], r["removes"], "a forward pass per candidate" if r["measures_loss"] else "one pass",
                      escape(", ".join(f"{k}={v}" for k, v in r["parameters"].items()) or "-"), escape(r["paper"]))
    Console(width=max(160, Console().width)).print(table)
    print("parameters go after the name: --method joint:repair=mean;rank=16")


@app.command("quant")
def quant_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str, typer.Option(help="a quantization method, with options after a colon (e.g. "
                                             "gptq:act_order=true); see --list-methods")] = "rtn",
    bits: Annotated[int | None, typer.Option(help="code bits per weight, 2-8 (default: the method's, 4; "
                                                  "smoothquant 8)")] = None,
    group: Annotated[int | None, typer.Option(help="input channels per scale (0: one scale per output channel; "
                                                   "default 64, smoothquant 0)")] = None,
    symmetric: Annotated[bool | None, typer.Option("--symmetric/--asymmetric", help="a scale per group (Q4_0-like), "
                                                   "or a scale and an offset (Q4_1-like, the default)")] = None,
    avg_bits: Annotated[float | None, typer.Option("--avg-bits", help="mixed precision: the average code bits per "
                                                   "weight to allocate (methods mixed, layerwise)")] = None,
    head: Annotated[bool, typer.Option("--head", help="quantize the LM head too")] = False,
    save: Annotated[str | None, typer.Option(help="the quant recipe file (.json or .yaml)")] = None,
    calib: CalibOpt = None,
    seq_len: SeqLenOpt = 1024,
    calib_windows: CalibWindowsOpt = 4,
    eval_data: EvalDataOpt = None,
    windows: HeldOutOpt = 0,
    list_methods: Annotated[bool, typer.Option("--list-methods", help="list the methods and exit")] = False,
    as_json: JsonOpt = False,
    nproc: NprocOpt = 1,
) -> None:
    """Quantize the weights of every projection (RTN, AWQ, GPTQ, SmoothQuant W8A8, mixed precision); evaluate,
    compose and export the recipe like any other.

    \b
    Examples:
      actlab quant --method rtn --bits 4 --group 64 --save rtn4.json
      actlab quant --method awq --bits 3 --group 64 --windows 8 --save awq3.json
      actlab quant --method gptq:act_order=true --bits 3 --group 64 --save gptq3.json
      actlab quant --method mixed --avg-bits 3.5 --group 64 --save mixed35.json
      actlab quant --method smoothquant --save w8a8.json
      actlab quant --list-methods
    """
    if list_methods:
        _list_quant_methods(as_json)
        return
    _relaunch(nproc)  # data parallel: each process calibrates on its block of windows
    from actlab.errors import ConfigError
    from actlab.jobs.quant import quant_job

    if not save:
        raise ConfigError("give --save: the quant recipe file to write (.json or .yaml)")
    name, params = parse_method(method)
    out = quant_job(model, save=save, method=name, bits=bits, group=group, symmetric=symmetric, avg_bits=avg_bits,
                    head=head, params=params, calib=calib, seq_len=seq_len, calib_windows=calib_windows,
                    eval_data=eval_data, windows=windows, log=_log)
    lines = [f"{out['recipe']} -> {save}", f"{out['quantized']} matrices, {out['average_bits']:.2f} code bits per "
             f"weight on average; {out['cost_line']}"]
    if "ppl" in out:
        lines.append(f"ppl {out['dense_ppl']:.3f} dense -> {out['ppl']:.3f} ({out['ppl'] / out['dense_ppl'] - 1:+.1%}) "
                     f"on {out['eval_data']}")
    _emit(out, as_json, "\n".join(lines))


def _list_quant_methods(as_json: bool) -> None:
    import dataclasses

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from actlab.transforms.quant import METHODS, QuantMethod

    common = {f.name: f.default for f in dataclasses.fields(QuantMethod)}
    rows = [{"method": name, "calibration": cls.calibrated, "mixed": cls.mixed,
             "parameters": {f.name: f.default for f in dataclasses.fields(cls)  # its own, and the grid it changes
                            if common.get(f.name, dataclasses.MISSING) != f.default},
             "paper": cls.paper} for name, cls in METHODS.items()]
    if as_json:
        print(json.dumps(rows, default=str))
        return
    table = Table("method", "data", "bits", "parameters (default)", "paper")
    for r in rows:
        table.add_row(r["method"], "calibration" if r["calibration"] else "none",
                      "--avg-bits" if r["mixed"] else "--bits",
                      escape(", ".join(f"{k}={v}" for k, v in r["parameters"].items()) or "-"), escape(r["paper"]))
    Console(width=max(160, Console().width)).print(table)
    print("parameters go after the name: --method gptq:act_order=true;damp=0.02")


@app.command("kv")
def kv_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str | None, typer.Option(help="a KV method, with options after a colon (e.g. snapkv:window=32); "
                                                    "see --list-methods")] = None,
    ratio: Annotated[float, typer.Option(help="fraction of cached tokens to remove, in [0, 1)")] = 0.0,
    phase: Annotated[str, typer.Option(help="prefill: compress once after the prompt; decode: after every forward, "
                                            "to a running budget")] = "prefill",
    question_aware: Annotated[bool, typer.Option("--question-aware", help="compress after the question is read "
                                                 "(evaluation then runs a document and its question as one prompt)")]
    = False,
    bits: Annotated[int, typer.Option(help="KIVI quantization of the kept tokens: 8, 4 or 2 bits (0: none)")] = 0,
    group: Annotated[int, typer.Option(help="tokens per key group and channels per value group (KIVI)")] = 32,
    save: Annotated[str | None, typer.Option(help="the KV recipe file (.json or .yaml)")] = None,
    calib: CalibOpt = None,
    seq_len: Annotated[int, typer.Option("--seq-len", min=2, help="tokens per window (calibration and "
                                                                  "--windows)")] = 2048,
    calib_windows: CalibWindowsOpt = 2,
    eval_data: EvalDataOpt = None,
    windows: HeldOutOpt = 0,
    chunk: Annotated[int, typer.Option(min=1, help="with --windows: tokens read per forward; the cache is held to "
                                                   "its budget after each")] = 64,
    run: Annotated[str | None, typer.Option(help="a complete profile run of this model (methods that read head "
                                                 "roles: headwise)")] = None,
    list_methods: Annotated[bool, typer.Option("--list-methods", help="list the methods and exit")] = False,
    as_json: JsonOpt = False,
    nproc: NprocOpt = 1,
) -> None:
    """Compress the KV cache: a press scores cached tokens, a method sets each layer's and head's budget
    (StreamingLLM, K-norm, SnapKV, TOVA, H2O, PyramidKV, ...), optionally quantized (KIVI); evaluate, compose and
    run the recipe in the decode engine like any other.

    \b
    Examples:
      actlab kv --method snapkv --ratio 0.5 --save snap50.json
      actlab kv --method h2o --ratio 0.75 --phase decode --windows 4 --eval wikitext2:test --save h2o75.json
      actlab kv --method pyramidkv --ratio 0.75 --bits 4 --save pyr75-int4.json
      actlab kv --method headwise --ratio 0.75 --run runs/demo --save heads75.json
      actlab kv --list-methods
    """
    if list_methods:
        _list_kv_methods(as_json)
        return
    _relaunch(nproc)  # data parallel: each process calibrates on its block of windows
    from actlab.errors import ConfigError
    from actlab.jobs.kv import kv_job

    if not save:
        raise ConfigError("give --save: the KV recipe file to write (.json or .yaml)")
    if not method:
        raise ConfigError("give --method (and --ratio); --list-methods shows the methods")
    name, params = parse_method(method)
    out = kv_job(model, save=save, method=name, ratio=ratio, params=params, phase=phase,
                 question_aware=question_aware, bits=bits, group=group, calib=calib, seq_len=seq_len,
                 calib_windows=calib_windows, eval_data=eval_data, windows=windows, chunk=chunk, run=run, log=_log)
    lines = [f"{out['recipe']} -> {save}", out["cost_line"]]
    if "ppl" in out:
        lines.append(f"ppl {out['dense_ppl']:.3f} full cache -> {out['ppl']:.3f} "
                     f"({out['ppl'] / out['dense_ppl'] - 1:+.1%}) on {out['eval_data']}, {seq_len} tokens read "
                     f"{out['chunk']} at a time, {out.get('kv_kept_fraction', 1):.1%} of the cache kept")
    _emit(out, as_json, "\n".join(lines))


def _list_kv_methods(as_json: bool) -> None:
    import inspect

    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from actlab.transforms.kv import METHODS, PRESSES, PressMethod

    def parameters(cls) -> dict:
        init = PRESSES[cls.press].__init__ if issubclass(cls, PressMethod) else cls.__init__
        return {k: p.default for k, p in inspect.signature(init).parameters.items()
                if p.default is not inspect.Parameter.empty and k not in ("phase", "question_aware", "bits", "group")}

    rows = [{"method": name, "press": cls.press, "budgets": cls.budgets, "calibration": cls.calibrated,
             "parameters": parameters(cls), "paper": cls.paper} for name, cls in METHODS.items()]
    if as_json:
        print(json.dumps(rows, default=str))
        return
    table = Table("method", "scores by", "budgets", "data", "parameters (default)", "paper")
    for r in rows:
        table.add_row(r["method"], r["press"], r["budgets"], "calibration" if r["calibration"] else "none",
                      escape(", ".join(f"{k}={v}" for k, v in r["parameters"].items()) or "-"), escape(r["paper"]))
    Console(width=max(160, Console().width)).print(table)
    print("parameters go after the name: --method snapkv:window=32;kernel=7; every method takes --phase, "
          "--question-aware, --bits and --group")


@app.command("export")
def export_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    recipe: Annotated[str | None, typer.Option(help="a recipe to export with the model (none: dense)")] = None,
    out: Annotated[str, typer.Option(help="the directory to create (hf) or the .gguf file to write")] = "",
    fmt: Annotated[str, typer.Option("--format", help="hf | gguf")] = "hf",
    dtype: Annotated[str, typer.Option(help="gguf: the type of the matrices a quant recipe does not set: f32, f16, "
                                            "q8_0, q5_0, q5_1, q4_0 or q4_1")] = "f32",
    as_json: JsonOpt = False,
) -> None:
    """Export a model (with a recipe) as a Hugging Face directory or a GGUF file. What a recipe can fold into
    weights is folded; a runtime transform (activation sparsity, interventions) is saved beside the weights:
    actlab.load_model re-attaches it, plain transformers runs the model without it.

    \b
    Examples:
      actlab export --recipe la50.json --out exported/
      actlab export --out smollm2.gguf --format gguf
      actlab export --recipe gptq4.json --out smollm2-gptq4.gguf --format gguf
      actlab export --out smollm2-q8.gguf --format gguf --dtype q8_0
    """
    from actlab.jobs.export import export_job

    report = export_job(model, recipe, out, fmt=fmt, dtype=dtype, log=_log)
    _emit(report, as_json, "\n".join(report["notes"] + [f"-> {report['path']}"]))


@app.command("sparsity-at-ppl")
def sparsity_at_ppl_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    p: Annotated[float, typer.Option("--p", help="allowed perplexity increase over dense, in percent")] = 1.0,
    calib: CalibOpt = None,
    eval_data: EvalDataOpt = None,
    seq_len: SeqLenOpt = 1024,
    windows: WindowsOpt = 16,
    calib_windows: Annotated[int, typer.Option("--calib-windows", min=1, help="windows whose FFN activations fix the "
                                                                        "per-layer thresholds")] = 4,
    steps: Annotated[int, typer.Option(min=1, help="bisection steps on the common CETT")] = 8,
    as_json: JsonOpt = False,
) -> None:
    """PPL-p% sparsity (Sparsing Law): the highest FFN activation sparsity with perplexity within p% of dense.

    \b
    Examples:
      actlab sparsity-at-ppl --p 1 --calib wikitext2:valid --eval wikitext2:test
    """
    from actlab.jobs.sparsify import sparsity_at_ppl_job

    out = sparsity_at_ppl_job(model, p=p, calib=calib, eval_data=eval_data, seq_len=seq_len, windows=windows,
                              calib_windows=calib_windows, steps=steps, log=_log)
    _emit(out, as_json, f"{out['model']} PPL-{p:g}% sparsity: {out['activation_sparsity']:.3f} of FFN neurons "
                        f"(CETT {out['cett']:.4f}; ppl {out['dense_ppl']:.3f} dense -> {out['ppl']:.3f}, limit "
                        f"{out['ppl_limit']:.3f}; effective sparsity {out['effective_sparsity']:.3f}) "
                        f"on {out['eval_data']}")


bench_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmarks.")
app.add_typer(bench_app, name="bench")


@bench_app.command("decode")
def bench_decode_cmd(
    model: ModelOpt = DEFAULT_MODEL,
    method: Annotated[str | None, typer.Option(help="sparsity method (default: the best one, loss-aware)")] = None,
    sparsity: Annotated[float, typer.Option(help="target effective sparsity")] = 0.5,
    recipe: Annotated[str | None, typer.Option(help="a saved recipe (any the engine runs) instead of --method")] = None,
    tokens: Annotated[int, typer.Option(min=2, help="new tokens per generation")] = 64,
    reps: Annotated[int, typer.Option(min=1, help="repetitions (median reported)")] = 5,
    calib: Annotated[str | None, typer.Option(help="calibration corpus for --method")] = None,
    profile: Annotated[bool, typer.Option("--profile", help="also print where the sparse engine's time goes")] = False,
    context: Annotated[str | None, typer.Option(help="with --recipe: decode at these context lengths (e.g. "
                                                     "2048,4096,8192), the full cache against the recipe's")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Tokens/s of HF generate, the engine dense and the engine with the recipe (greedy, batch 1), one process;
    with --context, decode speed and KV-cache memory at long contexts, full cache against the recipe's.

    \b
    Examples:
      actlab bench decode --model smollm2-135m --sparsity 0.5
      actlab bench decode --recipe la50.json --json
      actlab bench decode --recipe snap75.json --context 2048,4096,8192 --tokens 32 --reps 2
    """
    from actlab.errors import ConfigError
    from actlab.jobs.bench import bench_context, bench_decode, profile_step
    from actlab.transforms import load_recipe

    if context is not None:
        if recipe is None:
            raise ConfigError("--context compares the full cache with a recipe's: give --recipe (e.g. a KV recipe)")
        try:
            lengths = [int(c) for c in context.split(",") if c.strip()]
        except ValueError as exc:
            raise ConfigError(f"--context takes token counts separated by commas, got {context!r}") from exc
        out = bench_context(model, recipe, lengths, tokens=tokens, reps=reps, log=_log)
        lines = [f"{out['model']}, {out['recipe']}: decode tokens/s (median step of {out['tokens']} tokens x "
                 f"{out['reps']}) and KV cache held"]
        lines += [f"  context {r['context']:6d}: full {r['full_tok_s']:7.2f} tok/s {r['full_kv_mb']:8.1f} MB | recipe "
                  f"{r['recipe_tok_s']:7.2f} tok/s {r['recipe_kv_mb']:8.1f} MB | {r['speedup']:.2f}x"
                  for r in out["contexts"]]
        _emit(out, as_json, "\n".join(lines))
        return

    out = bench_decode(model, method=method, sparsity=sparsity, recipe_path=recipe, tokens=tokens, reps=reps,
                       calib=calib, log=_log)
    if profile:
        _log(profile_step(model, load_recipe(recipe) if recipe else None, log=_log))
    _emit(out, as_json, "\n".join([
        f"{out['model']} ({out['recipe']}, achieved sparsity {out['achieved_sparsity']:.3f}), {out['tokens']} tokens, "
        f"median of {out['reps']}; decode phase (after the prompt's prefill), end to end in brackets:",
        f"  HF generate   {out['hf_tok_s']:7.2f} tok/s  [{out['hf_e2e_tok_s']:.2f}]",
        f"  engine dense  {out['dense_tok_s']:7.2f} tok/s  [{out['dense_e2e_tok_s']:.2f}]  "
        f"({out['dense_over_hf']:.2f}x HF; same tokens as HF: {out['dense_matches_hf']})",
        f"  engine recipe {out['sparse_tok_s']:7.2f} tok/s  [{out['sparse_e2e_tok_s']:.2f}]  "
        f"({out['sparse_over_dense']:.2f}x dense, {out['sparse_over_hf']:.2f}x HF)",
        f"  the fewer weight bytes read allow at most {out['ceiling']:.2f}x dense ({out['ceiling_fp32_head']:.2f}x "
        "with a float32 LM head)", *_prefill_lines(out)]))


def _prefill_lines(out: dict) -> list[str]:
    """The HF prefill time of a recipe that removes layers (the others change nothing HF computes)."""
    head = f"  HF prefill of {out['prefill_tokens']} tokens: dense {out['dense_prefill_s'] * 1e3:.0f} ms"
    if "prefill_s" in out:
        return [f"{head}, layers removed {out['prefill_s'] * 1e3:.0f} ms ({out['prefill_speedup']:.2f}x)"]
    return [f"{head}; {out['prefill_error']}" if "prefill_error" in out else head]


steer_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Steering vectors from contrastive pairs: train, generate, measure.")
app.add_typer(steer_app, name="steer")
PairsOpt = Annotated[str, typer.Option(help="a jsonl of {positive, negative} pairs, or builtin:sentiment / "
                                            "builtin:sentiment-text / builtin:arc-easy, optionally :train or "
                                            ":test (even / odd items)")]


@steer_app.command("train")
def steer_train_cmd(
    pairs: PairsOpt,
    save: Annotated[str, typer.Option(help="where to write the recipe (.json or .yaml; vectors in a sidecar)")],
    model: ModelOpt = DEFAULT_MODEL,
    layers: Annotated[str | None, typer.Option(help="layers to steer: 10-20, 3,5,7 or all (default: all but the "
                                                    "first and last)")] = None,
    method: Annotated[str, typer.Option(help="mean-diff (ActAdd/CAA), pca-diff or pca-center (RepE / repeng)")]
    = "pca-diff",
    coeff: Annotated[float, typer.Option(help="the coefficient saved in the recipe")] = 1.0,
    as_json: JsonOpt = False,
) -> None:
    """One direction per layer from contrastive pairs (last-token residual states), saved as a recipe that adds
    coeff x direction at each layer's output.

    \b
    Examples:
      actlab steer train --pairs builtin:sentiment-text:train --method mean-diff --layers 14-17 --save happy.json
      actlab steer train --pairs my_pairs.jsonl --method pca-diff --coeff 4 --save vec.json
    """
    from actlab.jobs.steer import train_job

    _finite("--coeff", coeff)
    out = train_job(model, pairs=pairs, save=save, layers=layers, method=method, coeff=coeff, log=_log)
    _emit(out, as_json, f"{out['model']}: {out['method']} from {out['pairs']} pairs at layers "
                        f"{out['layers'][0]}..{out['layers'][-1]}, coeff {out['coeff']:g} -> {out['path']}; "
                        f"pairs ordered by the direction: {min(out['separation'].values()):.2f}.."
                        f"{max(out['separation'].values()):.2f}")


@steer_app.command("generate")
def steer_generate_cmd(
    recipe: Annotated[str, typer.Option(help="a steering recipe (actlab steer train)")],
    prompt: Annotated[str, typer.Option(help="the prompt")],
    model: ModelOpt = DEFAULT_MODEL,
    coeff: Annotated[float | None, typer.Option(help="override the recipe's coefficient")] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1, help="new tokens (greedy)")] = 48,
    as_json: JsonOpt = False,
) -> None:
    """The same prompt without and with the steering recipe (greedy HF generate).

    \b
    Examples:
      actlab steer generate --recipe happy.json --coeff 6 --prompt "I think the weather is"
    """
    from actlab.jobs.steer import generate_job

    if coeff is not None:
        _finite("--coeff", coeff)
    out = generate_job(model, recipe=recipe, prompt=prompt, coeff=coeff, max_new_tokens=max_new_tokens, log=_log)
    _emit(out, as_json, f"plain:   {out['prompt']}{out['plain']}\nsteered: {out['prompt']}{out['steered']}  "
                        f"(coeff {out['coeff']})")


@steer_app.command("sweep")
def steer_sweep_cmd(
    recipe: Annotated[str, typer.Option(help="a steering recipe (actlab steer train)")],
    pairs: PairsOpt,
    coeffs: Annotated[str, typer.Option(help="coefficients, comma-separated (0, the plain model, is always run)")]
    = "1,2,4,8",
    model: ModelOpt = DEFAULT_MODEL,
    task: Annotated[str | None, typer.Option(help="also score a multiple-choice task on one half of its items")]
    = None,
    half: Annotated[str, typer.Option(help="the task's half: test (odd items) or train (even)")] = "test",
    limit: Annotated[int | None, typer.Option(min=1, help="at most this many task items")] = None,
    eval_data: EvalDataOpt = "wikitext2:test",
    seq_len: SeqLenOpt = 1024,
    windows: Annotated[int, typer.Option(min=0, help="perplexity windows (0: no perplexity)")] = 8,
    as_json: JsonOpt = False,
) -> None:
    """Per coefficient: p(positive side) on held-out pairs (CAA's A/B metric), task accuracy, perplexity.

    \b
    Examples:
      actlab steer sweep --recipe happy.json --pairs builtin:sentiment-text:test --coeffs 0.1,0.15,0.3
      actlab steer sweep --recipe arc.json --pairs builtin:arc-easy:test --task arc_easy --half test
    """
    from actlab.jobs.steer import sweep_job, sweep_table

    try:
        values = [float(c) for c in coeffs.split(",") if c.strip()]
    except ValueError as exc:
        raise ActlabError(f"--coeffs {coeffs!r}: give numbers separated by commas") from exc
    for c in values:
        _finite("--coeffs", c)
    out = sweep_job(model, recipe=recipe, pairs=pairs, coeffs=values, task=task, half=half, limit=limit,
                    eval_data=eval_data, seq_len=seq_len, windows=windows, log=_log)
    _emit(out, as_json, sweep_table(out))


@app.command("patch")
def patch_cmd(
    pairs: Annotated[str, typer.Option(help="a jsonl of {clean, corrupt, answer, wrong} (prompts of one token "
                                              "length), or builtin:ioi")],
    out: Annotated[str, typer.Option(help="the run directory to write (results.json, CSVs, heatmaps, report.html)")],
    model: ModelOpt = DEFAULT_MODEL,
    metric: Annotated[str, typer.Option(help="logit-diff (answer minus wrong at the last position) or loss")]
    = "logit-diff",
    tables: Annotated[str, typer.Option(help="resid (layer x position), heads (layer x head), mlp (layer x "
                                             "position), comma-separated")] = "resid,heads,mlp",
    attribution_only: Annotated[bool, typer.Option("--attribution-only", help="only the one-backward-pass "
                                                   "estimate (attribution patching), no exact patching")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing directory")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Activation patching (clean activations into the corrupted run, one at a time) and attribution patching.

    \b
    Examples:
      actlab patch --pairs builtin:ioi --metric logit-diff --out runs/patch-ioi
      actlab patch --pairs ioi.jsonl --tables heads --attribution-only --out runs/attr
    """
    from actlab.jobs.patch import patch_job

    result = patch_job(model, pairs=pairs, out=out, metric=metric, tables=tables, exact=not attribution_only,
                       overwrite=overwrite, log=_log)
    lines = [f"{result['model']}: {result['n_pairs']} pairs x {result['tokens']} tokens, {result['metric']} -> "
             f"{result['out']}/report.html"]
    for table, top in result["top"].items():
        corr = result.get("correlation", {}).get(table)
        lines.append(f"  {table}: strongest " + ", ".join(
            f"L{t['layer']}/{next(k for k in t if k not in ('layer', 'effect'))[0]}"
            f"{t[next(k for k in t if k not in ('layer', 'effect'))]} {t['effect']:+.3f}" for t in top[:3])
            + (f"; attribution vs exact r = {corr:.3f}" if corr is not None else ""))
    _emit(result, as_json, "\n".join(lines))


@app.command("ablate")
def ablate_cmd(
    part: Annotated[list[str], typer.Option("--part", help="a part to ablate, repeatable: L3.attn.head5, "
                                                           "'L5.act[12,40]' (neurons), L6.attn, L6.mlp, L2.resid_out")],
    model: ModelOpt = DEFAULT_MODEL,
    kind: Annotated[str, typer.Option(help="zero, mean (over the evaluation windows) or resample (another "
                                           "window's activation)")] = "mean",
    together: Annotated[bool, typer.Option("--together", help="ablate every part at once (default: one by one)")]
    = False,
    eval_data: EvalDataOpt = "wikitext2:test",
    seq_len: SeqLenOpt = 512,
    windows: WindowsOpt = 8,
    as_json: JsonOpt = False,
) -> None:
    """The loss change from ablating parts of the model (paired per-window standard errors).

    \b
    Examples:
      actlab ablate --part L3.attn.head5 --part L6.mlp --kind mean
      actlab ablate --part 'L2.resid_out[10,400]' --kind zero --together --json
    """
    from actlab.jobs.ablate import ablate_job

    out = ablate_job(model, parts=part, kind=kind, together=together, eval_data=eval_data, seq_len=seq_len,
                     windows=windows, log=_log)
    _emit(out, as_json, "\n".join(
        f"{' + '.join(r['parts'])}: {out['kind']} ablation, loss {r['loss_dense']:.4f} -> {r['loss']:.4f} "
        f"({r['delta']:+.4f} ± {r['stderr']:.4f}), ppl {r['ppl_dense']:.3f} -> {r['ppl']:.3f}" for r in out["rows"]))


def _finite(option: str, value: float) -> None:
    import math

    if not math.isfinite(value):
        raise ActlabError(f"{option} must be a finite number, got {value}")


def _click_exceptions():
    try:
        from typer._click import exceptions  # typer >= 0.2x carries its own click
    except ImportError:
        from click import exceptions
    return exceptions


def quiet_library_deprecations() -> None:
    """Deprecation notices from transformers and the hub are addressed to actlab's code, not to its user: kept
    out of the command line's output (the Python API leaves warnings as the caller set them)."""
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        for module in ("transformers", "huggingface_hub", "torch", "actlab"):  # stacklevel=2 names the caller
            warnings.filterwarnings("ignore", category=category, module=module)


def main() -> None:
    click = _click_exceptions()
    quiet_library_deprecations()
    if len(sys.argv) > 1 and not {"--help", "-h", "--version"} & set(sys.argv):
        from actlab import threads

        threads.configure(log=_log)  # before torch is imported: thread count and OpenMP wait policy
    try:
        code = app(standalone_mode=False)
    except ActlabError as exc:
        from actlab.parallel import launched_rank

        if launched_rank() == 0:  # every rank meets the same bad input; rank 0 says so, once
            print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except click.NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else str(exc))
        sys.exit(0)
    except click.ClickException as exc:  # bad arguments: one line, like every other error
        print(f"error: {exc.format_message()}", file=sys.stderr)
        sys.exit(2)
    except (KeyboardInterrupt, typer.Abort):
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except OSError as exc:  # a full disk, a read-only or missing directory: the path and the cause
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"error: {where}{exc.strerror or exc}", file=sys.stderr)
        sys.exit(2)
    finally:
        if "torch.distributed" in sys.modules:
            from actlab.parallel import shutdown

            shutdown()
    if code == 130:  # typer turns Ctrl-C into exit code 130 before it reaches the handler above
        print("interrupted", file=sys.stderr)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
