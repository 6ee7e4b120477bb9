"""Data parallelism: the deal of windows over ranks, and 2 processes on gloo against 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from actlab.errors import ActlabError
from actlab.parallel import World, agree, launch, round_end, rounds, without_nproc
from actlab.report.rundir import RunDirectory

from ..conftest import shared_data

PROFILE = ["profile", "--model", "tiny-llama", "--data", "wikitext2:valid", "--tokens", "1536", "--seq-len", "64",
           "--query-stride", "4", "--lens-stride", "8"]


@pytest.mark.parametrize("count,batch,size,start", [(10, 1, 2, 0), (11, 2, 3, 1), (5, 4, 2, 0), (1, 1, 4, 0),
                                                    (0, 1, 2, 0), (7, 3, 1, 2)])
def test_rounds_deal_every_window_once_and_leave_a_prefix_after_each_round(count, batch, size, start):
    per_rank = [list(rounds(count, batch, World(r, size), start)) for r in range(size)]
    assert len({len(p) for p in per_rank}) == 1  # every rank runs the same number of rounds (collectives match)
    seen: list[int] = []
    for j in range(len(per_rank[0])):
        for r in range(size):
            assert len(per_rank[r][j]) <= batch
            seen += list(per_rank[r][j])
        assert sorted(seen) == list(range(start, round_end(count, batch, World(0, size), start, j + 1)))
    assert sorted(seen) == list(range(start, count))


def test_without_nproc_and_agree_in_one_process():
    assert without_nproc(["profile", "--nproc", "2", "--out", "x", "--nproc=3"]) == ["profile", "--out", "x"]
    assert agree(World(), lambda: 7) == 7
    with pytest.raises(ActlabError, match="no"):
        agree(World(), lambda: (_ for _ in ()).throw(ActlabError("no")))
    with pytest.raises(ActlabError, match="--nproc"):
        launch(0, [])


def _cli(args, cwd, **env):
    full = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    return subprocess.run([sys.executable, "-m", "actlab", *args], cwd=cwd, capture_output=True, text=True, env=full)


def assert_same_tables(a: Path, b: Path) -> None:
    """The tables of two runs: integers and text exactly, floats up to the order of their sums."""
    names = sorted(p.name for p in (a / "tables").glob("*.parquet"))
    assert names and names == sorted(p.name for p in (b / "tables").glob("*.parquet"))
    for name in names:
        x, y = pd.read_parquet(a / "tables" / name), pd.read_parquet(b / "tables" / name)
        assert list(x.columns) == list(y.columns) and len(x) == len(y), name
        for col in x.columns:
            if pd.api.types.is_float_dtype(x[col]):
                pd.testing.assert_series_equal(x[col], y[col], rtol=1e-5, atol=1e-6, obj=f"{name}:{col}")
            else:
                assert x[col].astype(str).tolist() == y[col].astype(str).tolist(), f"{name}:{col}"


def test_two_processes_give_the_tables_of_one(tmp_path):
    shared_data("wikitext-2")
    one = _cli([*PROFILE, "--out", "one"], tmp_path)
    two = _cli([*PROFILE, "--nproc", "2", "--out", "two"], tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.count("complete:") == 1  # one report line, from rank 0
    manifest = RunDirectory(tmp_path / "two").manifest()
    assert manifest["status"] == "complete" and manifest["processes"] == 2 and manifest["windows_done"] == 24
    assert_same_tables(tmp_path / "one", tmp_path / "two")
    again = _cli([*PROFILE, "--nproc", "2", "--out", "two"], tmp_path)  # bad input: one line, from rank 0
    assert again.returncode == 2 and again.stderr.count("error:") == 1 and "Traceback" not in again.stderr


KILL_RANK_1 = """
import os, sys, runpy
import actlab.jobs.profile as job
from actlab.probe import Profiler
job.CHECKPOINT_SECONDS = 0.0  # a checkpoint after every round
run_batch = Profiler._run_batch
def dying(self, *a, **k):
    run_batch(self, *a, **k)
    if os.environ["RANK"] == "1" and self.windows_seen == 5:
        os._exit(9)  # rank 1 dies in its sixth round
Profiler._run_batch = dying
sys.argv = ["actlab", *sys.argv[1:]]
runpy.run_module("actlab", run_name="__main__")
"""


def test_a_dead_rank_leaves_a_partial_run_that_resumes_to_the_same_tables(tmp_path):
    shared_data("wikitext-2")
    (tmp_path / "kill.py").write_text(KILL_RANK_1)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                "--max-restarts", "0", "kill.py"]
    died = subprocess.run([*launcher, *PROFILE, "--out", "run"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert died.returncode != 0
    run = RunDirectory(tmp_path / "run")
    manifest = run.manifest()
    assert manifest["status"] == "partial" and not (tmp_path / "run" / "report.html").exists()
    _, windows, tokens = run.load_state()
    assert 0 < windows < 24 and windows % 2 == 0 and tokens == 64 * windows  # a prefix: whole rounds only
    resumed = _cli([*PROFILE, "--resume", "--out", "run"], tmp_path)  # one process finishes what two began
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _cli([*PROFILE, "--out", "one"], tmp_path).returncode == 0
    assert_same_tables(tmp_path / "one", tmp_path / "run")
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["status"] == "complete"


def _records(out: Path) -> dict[str, list[dict]]:
    return {f"{p.parent.name}/{p.stem}": [json.loads(line) for line in p.read_text().splitlines()]
            for p in sorted((out / "items").glob("*/*.jsonl"))}


def test_two_processes_score_the_items_of_one(tmp_path):
    """Dense and a recipe, a perplexity task and choice tasks: the same per-item records in the same order."""
    shared_data("wikitext-2")
    drop = _cli(["layers", "--model", "tiny-llama", "--remove", "L1.attn", "--save", "drop.json"], tmp_path)
    assert drop.returncode == 0, drop.stderr[-2000:]
    args = ["eval", "--model", "tiny-llama", "--recipe", "drop.json", "--tasks", "wikitext2,arc_easy,lambada",
            "--limit", "5"]
    one = _cli([*args, "--out", "one"], tmp_path)
    two = _cli([*args, "--nproc", "2", "--out", "two"], tmp_path)
    assert one.returncode == 0 and two.returncode == 0, (one.stderr + two.stderr)[-2000:]
    assert two.stdout.count("|wikitext2") == 1  # rank 0 prints the table
    a, b = _records(tmp_path / "one"), _records(tmp_path / "two")
    assert a.keys() == b.keys() and len(a) == 6
    for key in a:
        assert len(a[key]) == len(b[key]) == 5, key
        for x, y in zip(a[key], b[key]):
            assert x.keys() == y.keys() and {k: v for k, v in x.items() if k not in ("nll", "loglikelihoods")} == \
                {k: v for k, v in y.items() if k not in ("nll", "loglikelihoods")}, key
            for field in ("nll", "loglikelihoods"):
                if field in x:
                    assert x[field] == pytest.approx(y[field], rel=1e-6), key
