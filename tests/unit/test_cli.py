"""The command line's surface: --version, --json on the run commands, flags shown as flags, an example in
every command's help."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

COMMANDS = ("models", "ppl", "profile", "report", "merge", "sparsify", "eval", "compose", "layers", "export",
            "sparsity-at-ppl", "bench decode")


def _actlab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "actlab.cli", *args], capture_output=True, text=True)


def test_version_answers_without_loading_anything():
    from actlab import __version__

    out = _actlab("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"actlab {__version__}" and out.stderr == ""


@pytest.mark.parametrize("command", COMMANDS)
def test_every_help_has_an_example_and_shows_flags_as_flags(command):
    out = _actlab(*command.split(), "--help")
    assert out.returncode == 0, out.stderr
    assert "Examples:" in out.stdout and f"actlab {command}" in out.stdout
    assert "<bool>" not in out.stdout and "--no-" not in out.stdout


def test_profile_merge_and_report_print_json(tmp_path):
    runs = []
    for name, data in (("a", "python-docs"), ("b", "wikitext2:valid")):
        out = _actlab("profile", "--model", "tiny-llama", "--data", data, "--tokens", "128", "--seq-len", "64",
                      "--out", str(tmp_path / name), "--json")
        assert out.returncode == 0, out.stderr[-2000:]
        summary = json.loads(out.stdout)
        assert summary["status"] == "complete" and summary["tokens"] == 128 and "layers" in summary["tables"]
        runs.append(summary["run"])
    merged = _actlab("merge", *runs, "--out", str(tmp_path / "ab"), "--json")
    assert merged.returncode == 0, merged.stderr[-2000:]
    summary = json.loads(merged.stdout)
    assert summary["merged"] == runs and summary["tokens"] == 256
    report = _actlab("report", str(tmp_path / "ab"), "--json")
    assert report.returncode == 0 and json.loads(report.stdout)["report"].endswith("report.html")


def test_library_deprecation_notices_stay_out_of_the_command_line():
    """transformers' deprecate_kwarg warns with stacklevel=2: the notice is attributed to whoever called the
    deprecated function (torch's module call, or actlab). The CLI drops those, and keeps every other warning."""
    import warnings

    from actlab.cli import quiet_library_deprecations

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet_library_deprecations()
        for module in ("torch.nn.modules.module", "actlab.engine.decode", "transformers.generation.utils"):
            warnings.warn_explicit("`past_key_values` is deprecated", FutureWarning, "x.py", 1, module=module)
        warnings.warn_explicit("a real problem", UserWarning, "x.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("someone else's", FutureWarning, "x.py", 1, module="numpy")
    assert [str(w.message) for w in seen] == ["a real problem", "someone else's"]
