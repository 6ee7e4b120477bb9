"""Run directories: complete/partial status, refusal, resume, extend, merge, kill -9, locking."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from actlab.errors import CorpusError, RunDirectoryError
from actlab.jobs.profile import ProfileOptions, merge, profile, rerender
from actlab.models.tiny import TINY_CONFIGS
from actlab.probe import Profiler
from actlab.report.rundir import RunDirectory

OPTS = ProfileOptions(query_stride=4, lens_stride=8)
KW = dict(seq_len=64, options=OPTS, progress=False, log=lambda *a: None)


def _state(path):
    state, windows, tokens = RunDirectory(path).load_state()
    return state, windows, tokens


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if a[k].is_floating_point():
            scale = float(b[k].abs().max()) if b[k].numel() else 0.0
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6 * scale + 1e-12, msg=k)
        else:
            assert torch.equal(a[k], b[k]), k


def test_complete_run_layout(tmp_path, tiny_llama):
    run = profile("tiny-llama", None, tmp_path / "r", tokens=256, lm=tiny_llama, **KW)
    m = run.manifest()
    assert m["status"] == "complete" and m["windows_done"] == 4 and m["tokens_done"] == 256
    assert m["model"]["name"] == "tiny-llama" and m["data"]["name"] == "python-docs"
    assert m["protocol"]["seq_len"] == 64 and set(m["versions"]) >= {"actlab", "torch", "transformers"}
    assert "started" in m and "finished" in m and len(m["sites"]) > 20
    for name, cols in {"layers": {"block_influence", "logit_lens_loss", "resid_max_abs"},
                       "heads": {"first_token_mass", "entropy"}, "channels": {"mean", "std", "max"},
                       "top_activations": {"value", "channel", "window", "position", "token"},
                       "sparsity": {"eps", "fraction_below"}, "neurons": {"dead", "always_on"},
                       "neuron_tokens": {"layer", "neuron", "promotes", "suppresses", "frequency"}}.items():
        table = pd.read_parquet(tmp_path / "r" / "tables" / f"{name}.parquet")
        assert cols <= set(table.columns) and len(table)
    html = (tmp_path / "r" / "report.html").read_text()
    assert "actlab profile" in html and "http://" not in html.split("<pre")[0] and "https://" not in html
    assert 'id="neuron-token-table"' in html
    assert not (tmp_path / "r" / ".lock").exists()


def test_a_run_of_some_sites_completes_and_its_report_says_what_was_not_collected(tmp_path, tiny_llama):
    """The README's `--sites 'L*.down_in'` run: a layers table without the residual columns, figures that need
    them say so instead of crashing, and the run is complete (and re-renders)."""
    options = ProfileOptions(sites="L*.down_in", query_stride=4, lens_stride=8)
    run = profile("tiny-llama", None, tmp_path / "ffn", tokens=128, lm=tiny_llama,
                  **{**KW, "options": options})
    assert run.manifest()["status"] == "complete"
    html = (tmp_path / "ffn" / "report.html").read_text()
    assert "did not collect layers.block_influence" in html and "did not collect heads" in html
    assert html.count('src="data:image/png;base64,') >= 1  # the sparsity figure of the down_in sites is drawn
    (tmp_path / "ffn" / "report.html").unlink()
    assert rerender(tmp_path / "ffn").is_file()


def test_windows_start_the_way_the_model_expects_unless_told(tmp_path, tiny_llama):
    """The tiny models' tokenizer puts BOS first (like Gemma's): by default every window starts with it, so the
    first-token (sink) statistics see BOS in every window; --bos tokenizer keeps it in the first window only."""
    from actlab.data import WindowSpec, load_corpus, make_windows

    run = profile("tiny-llama", None, tmp_path / "a", tokens=128, lm=tiny_llama, **KW)
    assert run.manifest()["protocol"]["bos"] == "every"
    windows = make_windows(tiny_llama.tokenizer, load_corpus(None, role="all"),
                           WindowSpec.for_tokens(128, 64, bos="every"))
    assert (windows[:, 0] == tiny_llama.tokenizer.bos_token_id).all()
    assert "BOS first in every window" in (tmp_path / "a" / "report.html").read_text()
    other = profile("tiny-llama", None, tmp_path / "b", tokens=128, lm=tiny_llama, bos="tokenizer", **KW)
    assert other.manifest()["protocol"]["bos"] == "tokenizer"
    with pytest.raises(RunDirectoryError, match="--bos every"):
        profile("tiny-llama", None, tmp_path / "b", tokens=256, lm=tiny_llama, bos="every", resume=True, **KW)


def test_second_run_into_same_directory_is_refused(tmp_path, tiny_llama):
    profile("tiny-llama", None, tmp_path / "r", tokens=128, lm=tiny_llama, **KW)
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        profile("tiny-llama", None, tmp_path / "r", tokens=128, lm=tiny_llama, **KW)


def test_extend_equals_one_shot(tmp_path, tiny_llama):
    profile("tiny-llama", None, tmp_path / "small", tokens=192, lm=tiny_llama, **KW)
    profile("tiny-llama", None, tmp_path / "small", tokens=384, resume=True, lm=tiny_llama, **KW)
    profile("tiny-llama", None, tmp_path / "big", tokens=384, lm=tiny_llama, **KW)
    a, b = _state(tmp_path / "small"), _state(tmp_path / "big")
    assert a[1:] == b[1:] == (6, 384)
    _assert_same_state(a[0], b[0])
    assert RunDirectory(tmp_path / "small").manifest()["status"] == "complete"


def test_resume_with_other_model_or_data_is_refused(tmp_path, tiny_llama):
    profile("tiny-llama", None, tmp_path / "r", tokens=128, lm=tiny_llama, **KW)
    other = tmp_path / "other.txt"
    other.write_text("something else entirely. " * 400)
    with pytest.raises(RunDirectoryError, match="another model, corpus or window protocol"):
        profile("tiny-llama", str(other), tmp_path / "r", tokens=256, resume=True, lm=tiny_llama, **KW)


def test_interrupted_run_is_partial_then_resumes_to_the_same_result(tmp_path, tiny_llama, monkeypatch):
    import actlab.jobs.profile as runs

    monkeypatch.setattr(runs, "CHECKPOINT_SECONDS", 0.0)  # checkpoint after every batch
    original = Profiler.observe

    def interrupted(self, windows, first_window_index=0, batch_size=1, progress=True, after_batch=None, world=None):
        def stop_after_three(done):
            after_batch(done)
            if done == 3:
                raise KeyboardInterrupt

        return original(self, windows, first_window_index, batch_size, progress, stop_after_three, world)

    monkeypatch.setattr(Profiler, "observe", interrupted)
    with pytest.raises(KeyboardInterrupt):
        profile("tiny-llama", None, tmp_path / "r", tokens=384, lm=tiny_llama, **KW)
    run = RunDirectory(tmp_path / "r")
    m = run.manifest()
    assert m["status"] == "partial" and m["windows_done"] == 3
    assert not (tmp_path / "r" / "report.html").exists() and not (tmp_path / "r" / "tables").exists()
    with pytest.raises(RunDirectoryError, match=r"status partial.*--resume"):
        profile("tiny-llama", None, tmp_path / "r", tokens=384, lm=tiny_llama, **KW)
    with pytest.raises(RunDirectoryError, match="resume it first"):
        rerender(tmp_path / "r")
    monkeypatch.setattr(Profiler, "observe", original)
    profile("tiny-llama", None, tmp_path / "r", tokens=384, resume=True, lm=tiny_llama, **KW)
    profile("tiny-llama", None, tmp_path / "once", tokens=384, lm=tiny_llama, **KW)
    _assert_same_state(_state(tmp_path / "r")[0], _state(tmp_path / "once")[0])
    assert run.manifest()["status"] == "complete"


def test_killed_process_leaves_a_partial_run(tmp_path):
    """kill -9 in the middle: the manifest never claims completion, and the run resumes."""
    out = tmp_path / "killed"
    code = (
        "import actlab.jobs.profile as r; r.CHECKPOINT_SECONDS = 0.0\n"
        "from actlab.jobs.profile import profile, ProfileOptions\n"
        f"profile('tiny-llama', None, {str(out)!r}, tokens=64*400, seq_len=64, progress=False,"
        " options=ProfileOptions(query_stride=4, lens_stride=8))\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "state.safetensors").exists():
        time.sleep(0.2)
    time.sleep(0.5)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    run = RunDirectory(out)
    assert (out / "state.safetensors").exists(), "the child never checkpointed"
    raw = json.loads((out / "manifest.json").read_text())
    assert raw["status"] == "running"  # what the dead process left ...
    assert run.manifest()["status"] == "partial"  # ... is read as partial
    assert not (out / "report.html").exists()
    state, windows, tokens = run.load_state()
    assert 0 < windows < 400 and tokens == 64 * windows


def test_lock_refuses_a_live_writer(tmp_path):
    run = RunDirectory(tmp_path / "busy")
    run.path.mkdir()
    (run.path / ".lock").write_text(str(os.getppid()))  # a live process that is not us
    with pytest.raises(RunDirectoryError, match="being written by another actlab process"):
        with run.locked():
            pass
    (run.path / ".lock").write_text("999999999")  # a dead one: the stale lock is taken over
    with run.locked():
        assert (run.path / ".lock").read_text() == str(os.getpid())


def test_merge_of_two_corpora_equals_one_pass(tmp_path, tiny_llama):
    text = load_text = "".join(f"Sentence number {i} about activations and attention.\n\n" for i in range(300))
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    cut = len(text) // 2
    first.write_text(load_text[:cut])
    second.write_text(load_text[cut:])
    profile("tiny-llama", str(first), tmp_path / "A", tokens=256, lm=tiny_llama, **KW)
    profile("tiny-llama", str(second), tmp_path / "B", tokens=256, lm=tiny_llama, **KW)
    target = merge([tmp_path / "A", tmp_path / "B"], tmp_path / "AB", log=lambda *a: None)
    m = target.manifest()
    assert m["status"] == "complete" and m["tokens_done"] == 512 and len(m["sources"]) == 2
    # reference: one profiler over both sets of windows
    from actlab.data import WindowSpec, load_corpus, make_windows

    ref = OPTS.profiler(tiny_llama)
    for path, offset in ((first, 0), (second, 4)):
        w = make_windows(tiny_llama.tokenizer, load_corpus(str(path)), WindowSpec(seq_len=64, num_windows=4,
                                                                                  bos="every"))
        ref.observe(w, first_window_index=offset, progress=False)
    ref.run_probes()  # head roles: measured once per run on constructed probes, kept once by a merge
    merged_state = _state(tmp_path / "AB")[0]
    ref_state = ref.state()
    for k in ref_state:
        if not k.startswith("massive/"):  # window numbers restart in each source run
            a, b = merged_state[k], ref_state[k]
            if a.is_floating_point():
                scale = float(b.abs().max()) if b.numel() else 0.0
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * scale + 1e-12, msg=k)
            else:
                assert torch.equal(a, b), k
    header = (tmp_path / "AB" / "report.html").read_text().split('<p class="meta">', 1)[1].split("</p>", 1)[0]
    assert f"{first} (256 tokens) + {second} (256 tokens)" in header, header


def test_profile_errors_are_clear(tmp_path, tiny_llama):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusError, match="empty"):
        profile("tiny-llama", str(empty), tmp_path / "e", tokens=128, lm=tiny_llama, **KW)
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(CorpusError, match="fewer than one window"):
        profile("tiny-llama", str(short), tmp_path / "s", tokens=128, lm=tiny_llama, **KW)
    with pytest.raises(RunDirectoryError, match="no run to resume"):
        profile("tiny-llama", None, tmp_path / "none", tokens=128, resume=True, lm=tiny_llama, **KW)


@pytest.mark.parametrize("model", sorted(TINY_CONFIGS))
def test_profile_command_on_every_tiny_architecture(tmp_path, model):
    """`actlab profile --model <tiny>` end to end through the CLI: complete run, tables, report."""
    out = subprocess.run([sys.executable, "-m", "actlab.cli", "profile", "--model", model, "--tokens", "256",
                          "--seq-len", "128", "--out", str(tmp_path / "run")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["tokens_done"] == 256
    layers = pd.read_parquet(tmp_path / "run" / "tables" / "layers.parquet")
    assert len(layers) == manifest["model"]["architecture"]["layers"]
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000


# -- runs know their model (identity), options and sources -----------------------------------------

def _saved(lm, path):
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return path


def test_resume_and_merge_compare_model_identity_not_the_name_typed(tmp_path, monkeypatch, tiny_llama):
    import actlab

    one, two = tmp_path / "one", tmp_path / "two"
    _saved(tiny_llama, one / "models" / "m")
    _saved(actlab.load_model("tiny-qwen2"), two / "models" / "m")  # another model under the same relative name
    monkeypatch.chdir(one)
    profile("models/m", None, tmp_path / "r", tokens=128, **KW)
    profile("models/m", None, tmp_path / "r2", tokens=128, **KW)
    monkeypatch.chdir(two)
    with pytest.raises(RunDirectoryError, match="is another model"):
        profile("models/m", None, tmp_path / "r", tokens=256, resume=True, **KW)
    run = profile(None, None, tmp_path / "r", tokens=256, resume=True, **KW)  # the run's own model, by identity
    assert run.manifest()["windows_done"] == 4
    profile("models/m", None, tmp_path / "q", tokens=128, **KW)
    with pytest.raises(RunDirectoryError, match="runs of different models cannot be merged"):
        merge([tmp_path / "r", tmp_path / "q"], tmp_path / "rq", log=lambda *a: None)
    merge([tmp_path / "r", tmp_path / "r2"], tmp_path / "both", log=lambda *a: None)


@pytest.mark.parametrize("change,message", [
    (dict(seq_len=32), r"--seq-len 32 \(the run has 64\)"),
    (dict(options=ProfileOptions(sites="L*.down_in", query_stride=4, lens_stride=8)), r"--sites L\*.down_in"),
    (dict(options=ProfileOptions(query_stride=2, lens_stride=8)), r"--query-stride 2 \(the run has 4\)"),
])
def test_resume_refuses_conflicting_options(tmp_path, tiny_llama, change, message):
    profile("tiny-llama", None, tmp_path / "r", tokens=128, lm=tiny_llama, **KW)
    kw = {**KW, **change}
    with pytest.raises(RunDirectoryError, match=message):
        profile("tiny-llama", None, tmp_path / "r", tokens=256, resume=True, lm=tiny_llama, **kw)
    assert RunDirectory(tmp_path / "r").manifest()["windows_done"] == 2  # nothing was changed


def test_a_run_is_not_merged_with_itself(tmp_path, tiny_llama):
    import shutil

    profile("tiny-llama", None, tmp_path / "a", tokens=128, lm=tiny_llama, **KW)
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    for pair in ([tmp_path / "a", tmp_path / "a"], [tmp_path / "a", tmp_path / "copy"]):
        with pytest.raises(RunDirectoryError, match="count its tokens twice"):
            merge(pair, tmp_path / "m", log=lambda *a: None)
    assert not (tmp_path / "m").exists()


def test_resumed_tables_keep_the_forward_order(tmp_path, tiny_llama):
    profile("tiny-llama", None, tmp_path / "small", tokens=128, lm=tiny_llama, **KW)
    profile("tiny-llama", None, tmp_path / "small", tokens=256, resume=True, lm=tiny_llama, **KW)
    profile("tiny-llama", None, tmp_path / "big", tokens=256, lm=tiny_llama, **KW)
    for table in ("sites", "channels", "layers"):
        a = pd.read_parquet(tmp_path / "small" / "tables" / f"{table}.parquet")
        b = pd.read_parquet(tmp_path / "big" / "tables" / f"{table}.parquet")
        key = "site" if "site" in a else "layer"
        assert list(a[key]) == list(b[key]), table


def test_bad_run_directories_are_clear_errors(tmp_path, tiny_llama, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirectoryError, match="is a file"):
        profile("tiny-llama", None, tmp_path / "file", tokens=128, lm=tiny_llama, **KW)
    with pytest.raises(CorpusError):
        profile("tiny-llama", str(tmp_path / "absent.txt"), tmp_path / "refused", tokens=128, lm=tiny_llama, **KW)
    assert not (tmp_path / "refused").exists()  # a refused start leaves no empty directory
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "manifest.json").write_text(json.dumps({"model": {"name": "x"}}))
    with pytest.raises(RunDirectoryError, match="not an actlab run manifest: it lacks status"):
        rerender(bare)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run = profile("tiny-llama", None, "~/run", tokens=128, lm=tiny_llama, **KW)
    assert run.path == tmp_path / "home" / "run" and not (Path.cwd() / "~").exists()
