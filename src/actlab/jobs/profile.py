"""The profile job: model + corpus -> probe -> statistics -> run directory (tables, state, report).

Composes the library's parts; holds no statistics or model logic of its own.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from actlab.data import WindowSpec, load_corpus, make_windows
from actlab.errors import ConfigError, RunDirectoryError
from actlab.models import LoadedModel, load_model
from actlab.probe.profiler import DEFAULT_LENS_STRIDE, DEFAULT_QUERY_STRIDE, Profiler
from actlab.report.rundir import RunDirectory, start_manifest

CHECKPOINT_SECONDS = 20.0
DEFAULT_TOKENS = 32 * 1024
DEFAULT_SEQ_LEN = 1024


@dataclass(frozen=True)
class ProfileOptions:
    sites: str | None = None  # comma-separated glob patterns; None = every site
    query_stride: int = DEFAULT_QUERY_STRIDE
    lens_stride: int = DEFAULT_LENS_STRIDE
    batch_size: int = 1

    def profiler(self, lm: LoadedModel) -> Profiler:
        return Profiler(lm, self.sites, query_stride=self.query_stride, lens_stride=self.lens_stride)


def _protocol_key(manifest: dict[str, Any]) -> tuple:
    p = manifest["protocol"]
    return (manifest["model"]["name"], manifest["data"]["sha256"], p["seq_len"], p["stride"], p["offset"], p["bos"])


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """A polite kill (SIGTERM) is handled like Ctrl-C: the run is left `partial`, never half-written."""
    def handler(signum, frame):
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def profile(model: str, data: str | None, out: str | Path, *, tokens: int = DEFAULT_TOKENS,
            seq_len: int = DEFAULT_SEQ_LEN, options: ProfileOptions = ProfileOptions(), resume: bool = False,
            overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = print,
            lm: LoadedModel | None = None) -> RunDirectory:
    """Profile `model` on `data` into the run directory `out`; see README "Profile"."""
    run = RunDirectory(Path(out))
    if run.exists() and not (resume or overwrite):
        raise RunDirectoryError(
            f"{run.path} already holds a run (status {run.status()}): pass --resume to continue or extend it, "
            "--overwrite to replace it, or choose another --out")
    if resume and not run.exists():
        raise RunDirectoryError(f"{run.path} holds no run to resume")
    with run.locked():
        if overwrite and run.exists():
            for child in run.path.iterdir():
                if child.name != ".lock":
                    shutil.rmtree(child) if child.is_dir() else child.unlink()
        previous = run.manifest() if resume else None
        if previous is not None:
            options = ProfileOptions(**previous["options"])
            seq_len = previous["protocol"]["seq_len"]
            model = previous["model"]["name"]
        lm = lm if lm is not None and lm.name == model else load_model(model, log_fn=log)
        corpus = load_corpus(data, role="all")
        spec = WindowSpec.for_tokens(tokens, seq_len)
        windows = make_windows(lm.tokenizer, corpus, spec, lm.max_context)
        profiler = options.profiler(lm)
        manifest = {
            "kind": "profile",
            "model": {"name": lm.name, "provenance": lm.provenance, "architecture": lm.adapter.describe()},
            "data": corpus.describe(),
            "protocol": spec.describe(),
            "options": asdict(options),
            "sites": [s.name for s in profiler.sites],
            "statistics": profiler.settings()["statistics"],
            "target_windows": len(windows),
            "target_tokens": int(windows.numel()),
        }
        done = 0
        if previous is not None:
            if _protocol_key(previous) != _protocol_key(manifest):
                raise RunDirectoryError(
                    f"{run.path} was profiled with another model, corpus or window protocol; "
                    "resume with the same --model/--data/--seq-len, or profile into a new --out")
            state, done, seen_tokens = run.load_state()
            if state:
                profiler.load_state(state, done, seen_tokens)
            if done >= len(windows) and previous["status"] == "complete":
                log(f"{run.path} already covers {done} windows ({seen_tokens} tokens); nothing to add")
                return run
            manifest["started"] = previous.get("started")
        manifest = {**start_manifest(manifest), "windows_done": done}
        if previous is not None and previous.get("started"):
            manifest["started"] = previous["started"]
        run.write_manifest(manifest)

        last_checkpoint = time.monotonic()

        def checkpoint(windows_done: int) -> None:
            nonlocal last_checkpoint
            if time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS or windows_done == len(windows):
                run.save_state(profiler.state(), profiler.windows_seen, profiler.tokens_seen)
                run.write_manifest({**manifest, "windows_done": windows_done, "tokens_done": profiler.tokens_seen})
                last_checkpoint = time.monotonic()

        try:
            with _sigterm_as_interrupt():
                profiler.observe(windows[done:], first_window_index=done, batch_size=options.batch_size,
                                 progress=progress, after_batch=checkpoint)
                finish(run, profiler, {**manifest, "windows_done": len(windows),
                                       "tokens_done": profiler.tokens_seen})
        except BaseException:
            # the state on disk is the last checkpoint (taken between batches); never mark this complete
            _, saved, saved_tokens = run.load_state()
            run.write_manifest({**manifest, "status": "partial", "windows_done": saved, "tokens_done": saved_tokens,
                                "interrupted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            raise
    return run


def finish(run: RunDirectory, profiler: Profiler, manifest: dict[str, Any]) -> None:
    """Write tables and report, then - last - mark the run complete."""
    from actlab.report.html import render_report

    tables = profiler.tables()
    run.write_tables(tables)
    finished = {**manifest, "status": "complete", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    run.write_report(render_report(finished, tables))
    run.write_manifest(finished)


def rerender(path: str | Path) -> Path:
    """Re-render report.html of a complete run from its tables."""
    from actlab.report.html import render_report
    from actlab.report.rundir import TABLES

    run = RunDirectory(Path(path))
    manifest = run.manifest()
    if manifest["status"] != "complete":
        raise RunDirectoryError(f"{run.path} is {manifest['status']}: resume it first (actlab profile --resume)")
    tables = {p.stem: run.read_table(p.stem) for p in sorted((run.path / TABLES).glob("*.parquet"))}
    run.write_report(render_report(manifest, tables))
    return run.path / "report.html"


def merge(paths: list[str | Path], out: str | Path, log: Callable[[str], None] = print) -> RunDirectory:
    """Merge complete runs of the same model and options into a new run (statistics of the union)."""
    if len(paths) < 2:
        raise ConfigError("merge needs at least two runs")
    runs = [RunDirectory(Path(p)) for p in paths]
    manifests = [r.manifest() for r in runs]
    for r, m in zip(runs, manifests):
        if m["status"] != "complete":
            raise RunDirectoryError(f"{r.path} is {m['status']}; only complete runs can be merged")
    key = lambda m: (m["model"]["name"], m["options"], m["sites"], m["statistics"])  # noqa: E731
    if any(key(m) != key(manifests[0]) for m in manifests[1:]):
        raise RunDirectoryError("runs of different models, sites or statistic settings cannot be merged")
    target = RunDirectory(Path(out))
    if target.exists():
        raise RunDirectoryError(f"{target.path} already holds a run; merge into a new directory")
    lm = load_model(manifests[0]["model"]["name"], log_fn=log)
    options = ProfileOptions(**manifests[0]["options"])
    merged: Profiler | None = None
    for r in runs:
        p = options.profiler(lm)
        state, windows, tokens = r.load_state()
        p.load_state(state, windows, tokens)
        if merged is None:
            merged = p
        else:
            merged.merge(p)
    with target.locked():
        manifest = {**manifests[0], "kind": "profile-merge", "sources": [
            {"path": str(r.path.resolve()), "data": m["data"], "protocol": m["protocol"],
             "tokens": m.get("tokens_done")} for r, m in zip(runs, manifests)],
            "windows_done": merged.windows_seen, "tokens_done": merged.tokens_seen}
        manifest = start_manifest(manifest)
        target.write_manifest(manifest)
        target.save_state(merged.state(), merged.windows_seen, merged.tokens_seen)
        finish(target, merged, manifest)
    return target
