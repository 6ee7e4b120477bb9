"""The thread policy: idle cores only, sleeping waits under contention, the environment always wins."""

from __future__ import annotations

import os
import subprocess
import sys

from actlab import threads


def test_choice_follows_the_idle_cores():
    assert threads.choose(0.05, 2).threads == 2 and not threads.choose(0.05, 2).passive
    busy = threads.choose(1.0, 2)
    assert busy.threads == 1 and busy.passive and "1.0 of 2 cores busy" in busy.reason
    assert threads.choose(5.0, 2).threads == 1  # never fewer than one
    assert threads.choose(3.4, 16).threads == 13
    assert threads.choose(None, 4).threads == 4  # no /proc/stat: every core


def _configured(env: dict[str, str]) -> list[str]:
    code = ("import os; from actlab import threads; c = threads.configure(); import torch; "
            "print(c.threads, torch.get_num_threads(), os.environ.get('OMP_WAIT_POLICY'))")
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "ACTLAB_THREADS", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**clean, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_configure_sets_torch_before_it_loads_and_the_environment_wins():
    chosen, torch_threads, _ = _configured({})
    assert chosen == torch_threads and 1 <= int(chosen) <= threads.cores_available()
    assert _configured({"ACTLAB_THREADS": "1"})[:2] == ["1", "1"]
    assert _configured({"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "ACTIVE"}) == ["1", "1", "ACTIVE"]
