"""Progress without a terminal: plain lines with done/total, time per item and ETA (logs, CI, nohup)."""

from __future__ import annotations

import subprocess
import sys

from actlab import progress


def test_plain_lines_report_counts_rate_and_eta(monkeypatch, capsys):
    clock = iter(float(t) for t in (0, 10, 20, 45, 50, 100))  # start, then after each of 5 items
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    assert list(progress.plain_lines(range(5), 5, "windows", every=30)) == list(range(5))
    lines = capsys.readouterr().err.splitlines()
    # after item 1 (10 s each: estimate 50 s); item 3 comes 35 s after that line; item 5 ends the job
    assert lines == ["windows: 1/5, 10.00 s each, 0:10 elapsed, eta 0:40 (estimate for all 5: 0:50)",
                     "windows: 3/5, 15.00 s each, 0:45 elapsed, eta 0:30",
                     "windows: 5/5, 20.00 s each, 1:40 elapsed"]


def test_track_without_a_terminal_prints_lines_to_stderr_only():
    code = ("from actlab.progress import track\n"
            "print(sum(track(range(3), total=3, description='items')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "3"
    assert out.stderr.splitlines()[0].startswith("items: 1/3") and out.stderr.splitlines()[-1].startswith("items: 3/3")
