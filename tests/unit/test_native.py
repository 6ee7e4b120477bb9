"""The C++ kernels' build: a build lock left by a killed build never blocks later loads."""

from __future__ import annotations

import subprocess
import sys

import pytest

from actlab import native


def test_stale_torch_build_lock_does_not_block():
    directory = native.build_dir("site_stats")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "lock").touch()  # what a build killed mid-way leaves behind
    code = "from actlab import native; m = native.load('site_stats'); print(m is not None)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True"  # loaded: without the fix the child waits on the lock until the timeout


def test_a_missing_source_falls_back_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "CSRC", tmp_path / "no-sources")
    native.load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="falling back to plain torch"):
            assert native.load("site_stats") is None
    finally:
        native.load.cache_clear()


def test_the_wheel_carries_the_kernel_sources_and_task_files(tmp_path):
    """A wheel built from this checkout has what an installed actlab needs at run time."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                          str(tmp_path), str(root)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    names = set(zipfile.ZipFile(next(tmp_path.glob("actlab-*.whl"))).namelist())
    for source in (root / "src" / "actlab" / "csrc").glob("*.cpp"):
        assert f"actlab/csrc/{source.name}" in names
    for task in (root / "src" / "actlab" / "data" / "tasks").glob("*.yaml"):
        assert f"actlab/data/tasks/{task.name}" in names
    assert {"actlab/report/templates/report.html", "actlab/report/templates/compare.html"} <= names
