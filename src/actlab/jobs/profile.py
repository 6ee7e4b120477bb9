"""The profile job: model + corpus -> probe -> statistics -> run directory (tables, state, report).

Composes the library's parts; holds no statistics or model logic of its own.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from actlab import parallel
from actlab.data import WindowSpec, load_corpus, make_windows
from actlab.data.windows import model_bos
from actlab.errors import ConfigError, RunDirectoryError
from actlab.models import DEFAULT_MODEL, LoadedModel, ModelIdentity, load_model
from actlab.probe.profiler import DEFAULT_LENS_STRIDE, DEFAULT_QUERY_STRIDE, Profiler
from actlab.report.rundir import RunDirectory, start_manifest

CHECKPOINT_SECONDS = 20.0
DEFAULT_TOKENS = 32 * 1024
DEFAULT_SEQ_LEN = 1024


@dataclass(frozen=True)
class ProfileOptions:
    """Profile options; None means "not given": a new run takes the default, a resumed run the stored value."""

    sites: str | None = None  # comma-separated glob patterns; None = every site
    query_stride: int | None = None
    lens_stride: int | None = None
    batch_size: int | None = None

    def __post_init__(self) -> None:
        for name in ("query_stride", "lens_stride", "batch_size"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"--{name.replace('_', '-')} must be a whole number >= 1, got {value!r}")

    def resolved(self, stored: dict[str, Any] | None = None) -> ProfileOptions:
        """Every option with a value: given, else stored (a resumed run), else the default."""
        defaults = {"sites": None, "query_stride": DEFAULT_QUERY_STRIDE, "lens_stride": DEFAULT_LENS_STRIDE,
                    "batch_size": 1}
        stored = stored or {}
        return ProfileOptions(**{k: getattr(self, k) if getattr(self, k) is not None else stored.get(k, default)
                                 for k, default in defaults.items()})

    def conflicts(self, stored: dict[str, Any]) -> list[str]:
        return [f"--{k.replace('_', '-')} {getattr(self, k)} (the run has {stored.get(k)})"
                for k in ("sites", "query_stride", "lens_stride", "batch_size")
                if getattr(self, k) is not None and getattr(self, k) != stored.get(k)]

    def profiler(self, lm: LoadedModel) -> Profiler:
        o = self.resolved()
        return Profiler(lm, o.sites, query_stride=o.query_stride, lens_stride=o.lens_stride)


def _protocol_key(manifest: dict[str, Any]) -> tuple:
    p = manifest["protocol"]
    return (manifest["data"]["sha256"], p["seq_len"], p["stride"], p["offset"], p["bos"])


def _stored_model(previous: dict[str, Any]) -> tuple[str, ModelIdentity | None]:
    """What a run was profiled with: where to load it from, and its identity (round-1 runs have none)."""
    ident = previous["model"].get("identity")
    if ident is None:
        return previous["model"]["name"], None
    return ident["location"], ModelIdentity.from_dict(ident)


def _stored_corpus(previous: dict[str, Any]) -> str:
    data = previous["data"]
    return data["path"] if data.get("path") and Path(data["path"]).exists() else data["name"]


def _require_identity(lm: LoadedModel, recorded: ModelIdentity | None, what: str, hint: str) -> None:
    if recorded is not None and lm.identity.differences(recorded):
        raise RunDirectoryError(f"{what} was profiled with {recorded.short()}, and {lm.name} is another model "
                                f"({', '.join(lm.identity.differences(recorded))} differ): {hint}")


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


def profile(model: str | None, data: str | None, out: str | Path, *, tokens: int = DEFAULT_TOKENS,
            seq_len: int | None = None, options: ProfileOptions | None = None, resume: bool = False,
            overwrite: bool = False, progress: bool = True, log: Callable[[str], None] = print,
            lm: LoadedModel | None = None, bos: str | None = None) -> RunDirectory:
    """Profile `model` on `data` into the run directory `out`; see README "Profile". Options left None take the
    defaults; with `resume`, the run's stored values, and a given value that differs is refused. `bos` (see
    WindowSpec) defaults to what the model expects: every window starts with BOS when its tokenizer puts one at
    the start of a text (Gemma), so that first-token statistics (attention sinks) mean the same in every window."""
    options = options or ProfileOptions()
    if seq_len is not None and seq_len < 2:
        raise ConfigError(f"--seq-len must be at least 2, got {seq_len}")
    if tokens < 1:
        raise ConfigError(f"--tokens must be at least 1, got {tokens}")
    if bos is not None and bos not in ("every", "tokenizer", "none"):  # before the model loads
        raise ConfigError(f"--bos must be every, tokenizer or none, got {bos!r}")
    world = parallel.world()
    log = log if world.main else _silent
    run = RunDirectory(Path(out).expanduser())
    previous = parallel.agree(world, lambda: _check_run(run, options, seq_len, bos, resume, overwrite))
    created = not run.path.exists()
    try:
        return _profile_into(run, previous, model, data, tokens, seq_len, options, overwrite, progress, log, lm,
                             bos, world)
    except BaseException:
        if world.main and created and run.path.is_dir() and not any(run.path.iterdir()):
            run.path.rmdir()  # a refused or failed start leaves no empty --out behind
        raise


def _silent(*_: Any) -> None:
    pass


def _check_run(run: RunDirectory, options: ProfileOptions, seq_len: int | None, bos: str | None, resume: bool,
               overwrite: bool) -> dict[str, Any] | None:
    """The run directory may take this profile: the manifest of the run it resumes, or None for a new run."""
    if run.path.exists() and not run.path.is_dir():
        raise RunDirectoryError(f"--out {run.path} is a file, not a run directory")
    if run.exists() and not (resume or overwrite):
        raise RunDirectoryError(
            f"{run.path} already holds a run (status {run.status()}): pass --resume to continue or extend it, "
            "--overwrite to replace it, or choose another --out")
    if resume and not run.exists():
        raise RunDirectoryError(f"{run.path} holds no run to resume")
    previous = run.manifest() if resume else None
    if previous is not None:
        conflicts = options.conflicts(previous["options"])
        if seq_len is not None and seq_len != previous["protocol"]["seq_len"]:
            conflicts.append(f"--seq-len {seq_len} (the run has {previous['protocol']['seq_len']})")
        if bos is not None and bos != previous["protocol"].get("bos", "tokenizer"):
            conflicts.append(f"--bos {bos} (the run has {previous['protocol'].get('bos', 'tokenizer')})")
        if conflicts:
            raise RunDirectoryError(f"{run.path} was profiled with other options: {'; '.join(conflicts)}. Resume "
                                    "without them (the run's are used), or profile into a new --out")
    return previous


def _profile_into(run, previous, model, data, tokens, seq_len, options, overwrite, progress, log, lm, bos, world):
    """Every rank runs this; rank 0 alone holds the lock and writes the run directory."""
    with contextlib.ExitStack() as owned:
        parallel.agree(world, lambda: _take(owned, run, overwrite))
        recorded = None
        if previous is not None:
            stored_spec, recorded = _stored_model(previous)
            model = model if model is not None else stored_spec
            data = data if data is not None else _stored_corpus(previous)
            seq_len = previous["protocol"]["seq_len"]
            bos = previous["protocol"].get("bos", "tokenizer")
        options = options.resolved(previous["options"] if previous is not None else None)
        model = model or DEFAULT_MODEL
        lm = lm if lm is not None and lm.name == model else load_model(model, log_fn=log)
        _require_identity(lm, recorded, str(run.path), "resume with the same --model (or none), or profile into a "
                          "new --out")
        corpus = load_corpus(data, role="all")
        spec = WindowSpec.for_tokens(tokens, seq_len or DEFAULT_SEQ_LEN, bos=bos or model_bos(lm.tokenizer))
        windows = make_windows(lm.tokenizer, corpus, spec, lm.max_context)
        profiler = options.profiler(lm)
        manifest = {
            "kind": "profile",
            "run_id": previous.get("run_id", uuid.uuid4().hex) if previous is not None else uuid.uuid4().hex,
            "model": {"name": lm.name, "provenance": lm.provenance, "architecture": lm.adapter.describe(),
                      "identity": lm.identity.to_dict()},
            "data": corpus.describe(),
            "protocol": spec.describe(),
            "options": asdict(options),
            "sites": [s.name for s in profiler.sites],
            "statistics": profiler.settings()["statistics"],
            "target_windows": len(windows),
            "target_tokens": int(windows.numel()),
            **({"processes": world.size} if world.distributed else {}),
        }
        done = 0
        if previous is not None:
            if _protocol_key(previous) != _protocol_key(manifest):
                raise RunDirectoryError(
                    f"{run.path} was profiled with another model, corpus or window protocol (--data "
                    f"{corpus.name} is not the run's {previous['data'].get('name')}); resume with the same "
                    "--data (or none), or profile into a new --out")
            # rank 0 continues from the saved statistics; the other ranks add theirs to it
            state, done, seen_tokens = run.load_state() if world.main else ({}, 0, 0)
            if state:
                profiler.load_state(state, done, seen_tokens)
            done, seen_tokens = parallel.broadcast((done, seen_tokens), world)
            if done >= len(windows) and previous["status"] == "complete":
                log(f"{run.path} already covers {done} windows ({seen_tokens} tokens); nothing to add")
                return run
        manifest = {**start_manifest(manifest), "windows_done": done}
        if previous is not None and previous.get("started"):
            manifest["started"] = previous["started"]
        if world.main:
            run.write_manifest(manifest)

        last_checkpoint = time.monotonic()

        def checkpoint(windows_done: int) -> None:
            nonlocal last_checkpoint
            due = time.monotonic() - last_checkpoint >= CHECKPOINT_SECONDS or windows_done == len(windows)
            if not parallel.broadcast(due, world):  # rank 0's clock decides for every rank
                return
            union = _union(profiler, options, world)
            if union is not None:
                run.save_state(union.state(), union.windows_seen, union.tokens_seen)
                run.write_manifest({**manifest, "windows_done": windows_done, "tokens_done": union.tokens_seen})
            last_checkpoint = time.monotonic()

        try:
            with _sigterm_as_interrupt():
                profiler.observe(windows[done:], first_window_index=done, batch_size=options.batch_size,
                                 progress=progress, after_batch=checkpoint, world=world)
                union = _union(profiler, options, world)
                if union is not None:
                    finish(run, union, {**manifest, "windows_done": len(windows), "tokens_done": union.tokens_seen})
                parallel.barrier(world)
        except BaseException:
            if world.main:  # the state on disk is the last checkpoint (taken between rounds): never complete
                _, saved, saved_tokens = run.load_state()
                run.write_manifest({**manifest, "status": "partial", "windows_done": saved,
                                    "tokens_done": saved_tokens, "interrupted": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            raise
    return run


def _take(owned: contextlib.ExitStack, run: RunDirectory, overwrite: bool) -> None:
    """Rank 0 locks the run directory for the whole job (and clears it for --overwrite)."""
    owned.enter_context(run.locked())
    if overwrite and run.exists():
        for child in run.path.iterdir():
            if child.name != ".lock":
                shutil.rmtree(child) if child.is_dir() else child.unlink()


def _union(profiler: Profiler, options: ProfileOptions, world: parallel.World) -> Profiler | None:
    """On rank 0, the statistics of every rank's windows, each folded in by its own merge rule; None elsewhere."""
    if not world.distributed:
        return profiler
    parts = parallel.gather((profiler.state(), profiler.windows_seen, profiler.tokens_seen), world)
    return None if parts is None else _merged(profiler.lm, options, parts)


def _merged(lm: LoadedModel, options: ProfileOptions, parts: Iterable[tuple[dict, int, int]]) -> Profiler:
    """One profiler holding the union of saved states (state, windows, tokens), folded by each statistic's rule."""
    from actlab.probe.profiler import folded

    return folded(lambda: options.profiler(lm), parts)


def finish(run: RunDirectory, profiler: Profiler, manifest: dict[str, Any]) -> None:
    """Write the tables, mark the run complete (its statistics are), then render the report from them (should
    that fail, `actlab report` renders it again without re-running anything)."""
    from actlab.analyze.neurons import neuron_tokens
    from actlab.report.html import render_report

    if profiler.run_probes():  # head roles, once per run: kept in the state so that merges and resumes have them
        run.save_state(profiler.state(), profiler.windows_seen, profiler.tokens_seen)
    tables = profiler.tables()
    if "neurons" in tables:  # which neurons fire comes from the run; what they write, from the weights
        tables["neuron_tokens"] = neuron_tokens(profiler.lm, tables["neurons"])
    run.write_tables(tables)
    finished = {**manifest, "status": "complete", "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    run.write_manifest(finished)
    run.write_report(render_report(finished, tables))


def rerender(path: str | Path) -> Path:
    """Re-render report.html of a complete run from its tables."""
    from actlab.report.html import render_report
    from actlab.report.rundir import TABLES

    run = RunDirectory(Path(path).expanduser())
    manifest = run.manifest()
    if manifest["status"] != "complete":
        raise RunDirectoryError(f"{run.path} is {manifest['status']}: resume it first (actlab profile --resume)")
    tables = {p.stem: run.read_table(p.stem) for p in sorted((run.path / TABLES).glob("*.parquet"))}
    run.write_report(render_report(manifest, tables))
    return run.path / "report.html"


def complete_run(path: str | Path) -> tuple[RunDirectory, dict[str, Any]]:
    """The complete run at --run `path` and its manifest (checked before a model is loaded)."""
    run = RunDirectory(Path(path).expanduser())
    if not run.exists():
        raise RunDirectoryError(f"--run {path}: no actlab run there (actlab profile --out {path} makes one)")
    manifest = run.manifest()
    if manifest["status"] != "complete":
        raise RunDirectoryError(f"--run {path} is {manifest['status']}: resume it first (actlab profile --resume)")
    return run, manifest


def run_of_model(path: str | Path, lm: LoadedModel, what: str) -> RunDirectory:
    """A complete run profiled with `lm`, which `what` (a command) is about to add tables to."""
    run, manifest = complete_run(path)
    _require_identity(lm, _stored_model(manifest)[1], f"--run {path}", f"{what} must use the run's model")
    return run


def add_tables(run: RunDirectory, tables: dict[str, Any]) -> Path:
    """Add tables computed elsewhere to a complete run and re-render its report with them."""
    run.write_tables(tables)
    return rerender(run.path)


def merge(paths: list[str | Path], out: str | Path, log: Callable[[str], None] = print) -> RunDirectory:
    """Merge complete runs of the same model and options into a new run (statistics of the union)."""
    if len(paths) < 2:
        raise ConfigError("merge needs at least two runs")
    runs = [RunDirectory(Path(p).expanduser()) for p in paths]
    manifests = [r.manifest() for r in runs]
    for r, m in zip(runs, manifests):
        if m.get("status") != "complete":
            raise RunDirectoryError(f"{r.path} is {m.get('status', 'of unknown status')}; only complete runs can be "
                                    "merged")
    seen: dict[str, Path] = {}
    for r, m in zip(runs, manifests):  # one run twice (or a copy of it) would count its tokens twice
        for key in (str(r.path.resolve()), m.get("run_id")):
            if key and key in seen:
                raise RunDirectoryError(f"{r.path} is the same run as {seen[key]}: merging it would count its tokens "
                                        "twice")
            if key:
                seen[key] = r.path
    first = manifests[0]
    spec, recorded = _stored_model(first)
    for r, m in zip(runs[1:], manifests[1:]):
        _, theirs = _stored_model(m)
        if recorded is not None and theirs is not None and recorded.differences(theirs):
            raise RunDirectoryError(f"{r.path} was profiled with {theirs.short()} and {runs[0].path} with "
                                    f"{recorded.short()}: runs of different models cannot be merged")
        if (recorded is None or theirs is None) and m["model"]["name"] != first["model"]["name"]:
            raise RunDirectoryError(f"{r.path} and {runs[0].path} name different models")
    for r, m in zip(runs[1:], manifests[1:]):
        for field in ("options", "sites", "statistics"):
            if m[field] != first[field]:
                raise RunDirectoryError(f"{r.path} and {runs[0].path} differ in {field}; runs merge only with the "
                                        "same sites and statistic settings")
    target = RunDirectory(Path(out).expanduser())
    if target.exists():
        raise RunDirectoryError(f"{target.path} already holds a run; merge into a new directory")
    lm = load_model(spec, log_fn=log)
    _require_identity(lm, recorded, str(runs[0].path), "the model it names now loads with other weights")
    merged = _merged(lm, ProfileOptions(**first["options"]), (r.load_state() for r in runs))
    with target.locked():
        manifest = {**first, "kind": "profile-merge", "run_id": uuid.uuid4().hex, "sources": [
            {"path": str(r.path.resolve()), "run_id": m.get("run_id"), "data": m["data"], "protocol": m["protocol"],
             "tokens": m.get("tokens_done")} for r, m in zip(runs, manifests)],
            "windows_done": merged.windows_seen, "tokens_done": merged.tokens_seen}
        manifest = start_manifest(manifest)
        target.write_manifest(manifest)
        target.save_state(merged.state(), merged.windows_seen, merged.tokens_seen)
        finish(target, merged, manifest)
    return target
