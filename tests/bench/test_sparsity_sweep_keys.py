"""The sparsity sweep's cells survive refactors: keys blind to imports, committed tables regenerate."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SWEEPS = {  # results folder -> the --report-only arguments its committed tables were written with
    "sparsity_sweep": dict(levels="0.25,0.4,0.5,0.65", positions="all", task_items=500,
                           methods="loss-aware,stat-topk,wina,wina:topk=True,teal,chess,cats,magnitude,rsparse"),
    "sparsity_last_half": dict(levels="0.25,0.4,0.5,0.65", positions="last-half", task_items=0,
                               methods="loss-aware,coreinfer,teal"),
}


@pytest.fixture(scope="module")
def sweep():
    spec = importlib.util.spec_from_file_location("sparsity_sweep", ROOT / "bench" / "sparsity_sweep.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fingerprint_ignores_imports_docstrings_and_formatting(sweep):
    code = '"""doc"""\nimport os\nfrom a import b\n\ndef f(x):\n    """doc"""\n    import json\n    return x + 1\n'
    moved = 'from c import b, d\nimport sys\n\n\ndef f(x):\n    from k import json  # moved\n    return (x + 1)\n'
    assert sweep.code_fingerprint(code) == sweep.code_fingerprint(moved)
    changed = code.replace("x + 1", "x + 2")
    assert sweep.code_fingerprint(code) != sweep.code_fingerprint(changed)
    try_import = "try:\n    import numba\nexcept ImportError:\n    numba = None\nelse:\n    import os\n"
    assert sweep.code_fingerprint(try_import) == sweep.code_fingerprint("try:\n    pass\nexcept ImportError:\n"
                                                                        "    numba = None\nelse:\n    pass\n")


@pytest.mark.parametrize("folder", sorted(SWEEPS))
def test_report_only_regenerates_the_committed_tables(sweep, folder, tmp_path):
    """Every cell of the committed tables is found under the current method files' keys: a method whose code
    changed must be re-run (its cells are re-keyed), and a refactor that only moves code keeps them all."""
    results = ROOT / "bench" / "results" / folder
    args = argparse.Namespace(models="smollm2-135m,gemma3-270m", windows=16, calib_windows=16, seq_len=1024, refine=1,
                              tasks_at=0.5, out=str(tmp_path), **SWEEPS[folder])
    sweep.report(args, sweep.Cells(results / "cells.json"))
    assert (tmp_path / "sweep.md").read_text() == (results / "sweep.md").read_text()
