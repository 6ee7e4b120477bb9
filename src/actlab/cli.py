"""The `actlab` command line: parses arguments and calls the library, nothing more."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from actlab.errors import ActlabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Profile the insides of Hugging Face causal LMs and transform them, with the cost measured.")

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="built-in name, HF hub id, HF directory or .gguf path")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]


def _log(message: str) -> None:
    print(message, file=sys.stderr)


def _emit(obj: dict, as_json: bool, human: str) -> None:
    print(json.dumps(obj) if as_json else human)


@app.command("models")
def models_cmd(as_json: JsonOpt = False) -> None:
    """List the built-in models and whether each is cached."""
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
    model: ModelOpt = "smollm2-135m",
    data: Annotated[Optional[str], typer.Option(help="corpus: file, directory, python-docs, wikitext2[:split], hf:...")] = None,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 1024,
    windows: Annotated[Optional[int], typer.Option(help="number of windows (default: all)")] = None,
    offset: Annotated[int, typer.Option(help="first token of the first window")] = 0,
    bos: Annotated[str, typer.Option(help="tokenizer | every | none")] = "tokenizer",
    batch_size: Annotated[Optional[int], typer.Option("--batch-size")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Perplexity of a model on a corpus (non-overlapping windows from the start, GPTQ/TEAL protocol)."""
    from actlab.data import WindowSpec, load_corpus, make_windows
    from actlab.eval import perplexity
    from actlab.models import load_model

    lm = load_model(model, log_fn=_log)
    corpus = load_corpus(data, role="eval" if data is None else "all")
    spec = WindowSpec(seq_len=seq_len, num_windows=windows, offset=offset, bos=bos)  # type: ignore[arg-type]
    ids = make_windows(lm.tokenizer, corpus, spec, lm.max_context)
    result = perplexity(lm, ids, batch_size=batch_size)
    out = {**result.to_dict(), "data": corpus.name, "protocol": spec.describe()}
    _emit(out, as_json, f"{lm.name} on {corpus.name}: ppl {result.ppl:.4f} over {result.tokens} predicted tokens "
                        f"({result.windows} windows x {result.seq_len}) in {result.seconds:.1f}s")


@app.command("profile")
def profile_cmd(
    model: ModelOpt = "smollm2-135m",
    data: Annotated[Optional[str], typer.Option(help="corpus (default: python-docs, shipped with Python)")] = None,
    tokens: Annotated[int, typer.Option(help="tokens to profile (rounded up to whole windows)")] = 32 * 1024,
    seq_len: Annotated[int, typer.Option("--seq-len")] = 1024,
    sites: Annotated[Optional[str], typer.Option(help="comma-separated site patterns, e.g. 'L*.down_in,L*.resid_out'")] = None,
    out: Annotated[Optional[str], typer.Option(help="run directory (default runs/<model>-<time>)")] = None,
    resume: Annotated[bool, typer.Option(help="continue a partial run, or extend a complete one to --tokens")] = False,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run in --out")] = False,
    batch_size: Annotated[int, typer.Option("--batch-size")] = 1,
    query_stride: Annotated[int, typer.Option(help="attention statistics read every n-th query")] = 16,
    lens_stride: Annotated[int, typer.Option(help="logit lens reads every n-th position")] = 128,
) -> None:
    """Profile activations at every site and write tables, raw state and report.html into a run directory."""
    import time as _time

    from actlab.runs import ProfileOptions, profile

    out = out or f"runs/{Path(model).name}-{_time.strftime('%Y%m%d-%H%M%S')}"
    options = ProfileOptions(sites=sites, query_stride=query_stride, lens_stride=lens_stride, batch_size=batch_size)
    run = profile(model, data, out, tokens=tokens, seq_len=seq_len, options=options, resume=resume,
                  overwrite=overwrite, log=_log)
    manifest = run.manifest()
    print(f"{manifest['status']}: {manifest.get('tokens_done')} tokens, {len(manifest['sites'])} sites -> "
          f"{run.path / 'report.html'}")


@app.command("report")
def report_cmd(run: Annotated[str, typer.Argument(help="a complete run directory")]) -> None:
    """Re-render report.html of a run from its tables."""
    from actlab.runs import rerender

    print(rerender(run))


@app.command("merge")
def merge_cmd(runs: Annotated[list[str], typer.Argument(help="two or more complete runs")],
              out: Annotated[str, typer.Option(help="new run directory")]) -> None:
    """Merge the statistics of runs of the same model (e.g. profiled on different corpora) into a new run."""
    from actlab.runs import merge

    target = merge(runs, out, log=_log)
    print(f"merged {len(runs)} runs -> {target.path / 'report.html'}")


def main() -> None:
    try:
        app()
    except ActlabError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
