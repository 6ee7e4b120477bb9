"""Bad input and a hostile environment: one line on stderr, a non-zero exit, nothing half-written."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from actlab.report.rundir import RunDirectory

CLI = [sys.executable, "-m", "actlab.cli"]


def _run(args, **kw):
    return subprocess.run(CLI + args, capture_output=True, text=True, timeout=600, **kw)


def _one_line(out):
    lines = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert out.returncode == 2 and len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("args,message", [
    (["ppl", "--batch-size", "-1"], "Invalid value for '--batch-size'"),
    (["ppl", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["profile", "--batch-size", "0"], "Invalid value for '--batch-size'"),
    (["profile", "--query-stride", "0"], "Invalid value for '--query-stride'"),
    (["profile", "--lens-stride", "0"], "Invalid value for '--lens-stride'"),
    (["sparsity-at-ppl", "--steps", "0"], "Invalid value for '--steps'"),
    (["eval", "--limit", "0"], "Invalid value for '--limit'"),
    (["bench", "decode", "--reps", "0"], "Invalid value for '--reps'"),
    (["nonsense"], "No such command 'nonsense'"),
])
def test_numeric_options_are_checked_when_parsed(args, message, tmp_path):
    assert message in _one_line(_run(args, cwd=tmp_path))
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_environment_faults_are_one_line_errors(tmp_path):
    line = _one_line(_run(["profile", "--model", "tiny-llama", "--tokens", "128", "--seq-len", "64",
                           "--out", "/proc/actlab-nope/run"]))
    assert "/proc/actlab-nope" in line
    (tmp_path / "file").write_text("x")
    assert "is a file" in _one_line(_run(["profile", "--model", "tiny-llama", "--out", str(tmp_path / "file")]))
    out = _run(["profile", "--model", "tiny-llama", "--tokens", "128", "--seq-len", "64", "--out",
                str(tmp_path / "run")], env={**os.environ, "ACTLAB_CACHE": "/proc/actlab-nope"})
    assert out.returncode == 0, out.stderr[-2000:]  # an unusable cache: kernels fall back to torch, the run completes
    assert RunDirectory(tmp_path / "run").manifest()["status"] == "complete"


def test_a_full_disk_leaves_a_resumable_run(tmp_path, monkeypatch, tiny_llama):
    import actlab.jobs.profile as jobs
    from actlab.jobs.profile import ProfileOptions, profile

    monkeypatch.setattr(jobs, "CHECKPOINT_SECONDS", 0.0)
    calls = {"n": 0}
    original = RunDirectory.save_state

    def full(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(self.path / "state.safetensors"))
        return original(self, *a, **kw)

    monkeypatch.setattr(RunDirectory, "save_state", full)
    kw = dict(seq_len=64, options=ProfileOptions(query_stride=4, lens_stride=8), progress=False, log=lambda *a: None)
    with pytest.raises(OSError, match="No space left"):
        profile("tiny-llama", None, tmp_path / "r", tokens=64 * 6, lm=tiny_llama, **kw)
    assert RunDirectory(tmp_path / "r").manifest()["status"] == "partial"
    monkeypatch.setattr(RunDirectory, "save_state", original)
    run = profile(None, None, tmp_path / "r", tokens=64 * 6, resume=True, lm=tiny_llama, **kw)
    assert run.manifest()["status"] == "complete" and run.manifest()["windows_done"] == 6


def test_ctrl_c_says_interrupted_and_leaves_a_partial_run(tmp_path):
    out = tmp_path / "r"
    proc = subprocess.Popen(CLI + ["profile", "--model", "tiny-llama", "--tokens", str(64 * 4000), "--seq-len", "64",
                                   "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "manifest.json").exists():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err.splitlines()[-1]
    assert json.loads((out / "manifest.json").read_text())["status"] == "partial"


def test_bench_decode_refuses_what_it_cannot_run_before_calibrating():
    out = _run(["bench", "decode", "--model", "tiny-llama", "--tokens", "600"])
    assert "exceed the model's context of 512" in _one_line(out) and "calibrating" not in out.stderr
    assert "engine methods" in _one_line(_run(["bench", "decode", "--model", "no/such-model", "--method",
                                               "coreinfer"]))


@pytest.mark.parametrize("args,message", [
    (["--bits", "9"], "bits must be an integer from 2 to 8"),
    (["--bits", "1"], "bits must be an integer from 2 to 8"),
    (["--group", "48"], "group 48 does not divide the 64 input channels of L0.q; groups that do: 16, 32, 64"),
    (["--avg-bits", "3.5"], "--avg-bits is for the mixed-precision methods"),
    (["--method", "mixed"], "give --avg-bits"),
    (["--method", "mixed", "--avg-bits", "1.5", "--group", "32", "--calib-windows", "8", "--seq-len", "64"],
     "below the lowest precision on offer (2 bits)"),
    (["--method", "nope"], "unknown quantization method 'nope'"),
    (["--method", "gptq:blocks=4"], "bad parameters for gptq"),
])
def test_bad_quantization_arguments_are_one_line_errors(args, message, tmp_path):
    line = _one_line(_run(["quant", "--model", "tiny-llama", "--save", "q.json", *args], cwd=tmp_path))
    assert message in line
    assert not (tmp_path / "q.json").exists()


M = ["--model", "tiny-mixtral"]


@pytest.mark.parametrize("args,what", [
    (["sparsify", *M, "--method", "teal", "--sparsity", "0.5", "--save", "s.json"], "activation sparsity"),
    (["sparsity-at-ppl", *M], "the CETT sparsity search"),
    (["quant", *M, "--method", "rtn", "--bits", "4", "--save", "q.json"], "weight quantization"),
    (["bench", "decode", *M, "--tokens", "8"], "the decode engine"),
    (["export", *M, "--format", "gguf", "--out", "m.gguf"], "GGUF export of mixtral is not supported"),
])
def test_transforms_that_do_not_reach_experts_refuse_moe_models(args, what, tmp_path):
    """A mixture-of-experts model is profiled, evaluated and pruned by layers; what cannot reach into its experts
    says so in one line before any calibration, and writes nothing."""
    out = _run(args, cwd=tmp_path)
    line = _one_line(out)
    assert what in line and "calibrat" not in out.stderr.replace(line, "")
    assert list(tmp_path.iterdir()) == []
