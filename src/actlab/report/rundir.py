"""Run directories: what a profile leaves on disk, written so that nothing is ever half-true.

    manifest.json        model + provenance, data + protocol, versions, sites, times, status
    state.safetensors    raw mergeable statistics; its metadata holds how many windows/tokens it covers
                         (one atomic file, so the count and the state can never disagree)
    tables/*.parquet     statistics as tables (written when the run completes)
    report.html          self-contained report (written when the run completes)
    .lock                held while a process writes the run

Status is `running` while a process works (with its pid), `partial` after an interruption, `complete`
once the tables are written (the report is rendered from them next; `actlab report` renders it again). A
`running` run whose process is gone is partial.
"""

from __future__ import annotations

import json
import os
import platform
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from actlab.errors import RunDirectoryError
from actlab.fsutil import atomic_path, atomic_write_json, pid_alive

MANIFEST = "manifest.json"
STATE = "state.safetensors"
LOCK = ".lock"
TABLES = "tables"
REPORT = "report.html"
FORMAT_VERSION = 1


def versions() -> dict[str, str]:
    import transformers

    import actlab

    return {"actlab": actlab.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform()}


@dataclass
class RunDirectory:
    path: Path

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError) as exc:
            raise RunDirectoryError(f"{self.path} is not a readable actlab run ({exc})") from exc
        missing = [k for k in ("status", "model", "options", "sites", "protocol", "data") if k not in manifest] \
            if isinstance(manifest, dict) else ["everything"]
        if missing:
            raise RunDirectoryError(f"{self.manifest_path} is not an actlab run manifest: it lacks "
                                    f"{', '.join(missing)}")
        if manifest.get("status") == "running" and not pid_alive(int(manifest.get("pid", -1))) \
                and manifest.get("host") == socket.gethostname():
            manifest["status"] = "partial"
        return manifest

    def status(self) -> str:
        return self.manifest()["status"]

    def write_manifest(self, manifest: dict[str, Any]) -> None:
        atomic_write_json(self.manifest_path, {"format": FORMAT_VERSION, **manifest})

    # -- locking ---------------------------------------------------------------------------------
    @contextmanager
    def locked(self):
        """Exclusive ownership of the run directory for one process."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock = self.path / LOCK
        for _ in range(2):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                break
            except FileExistsError:
                try:
                    owner = int(lock.read_text().strip() or -1)
                except (OSError, ValueError):
                    owner = -1
                if owner > 0 and pid_alive(owner) and owner != os.getpid():
                    raise RunDirectoryError(
                        f"{self.path} is being written by another actlab process (pid {owner})") from None
                lock.unlink(missing_ok=True)  # stale lock of a process that is gone
        else:
            raise RunDirectoryError(f"cannot lock {self.path}")
        try:
            os.write(fd, str(os.getpid()).encode())
            os.close(fd)
            yield self
        finally:
            lock.unlink(missing_ok=True)

    # -- state -----------------------------------------------------------------------------------
    def save_state(self, state: dict[str, torch.Tensor], windows: int, tokens: int) -> None:
        with atomic_path(self.path / STATE) as tmp:
            save_file({k: v.contiguous() for k, v in state.items()}, str(tmp),
                      metadata={"windows": str(windows), "tokens": str(tokens)})

    def load_state(self) -> tuple[dict[str, torch.Tensor], int, int]:
        from safetensors import safe_open

        path = self.path / STATE
        if not path.is_file():
            return {}, 0, 0
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
            return load_file(str(path)), int(meta.get("windows", 0)), int(meta.get("tokens", 0))
        except Exception as exc:
            raise RunDirectoryError(f"{path} is unreadable ({type(exc).__name__}: {exc})") from exc

    # -- outputs ---------------------------------------------------------------------------------
    def write_tables(self, tables: dict[str, pd.DataFrame]) -> None:
        for name, df in tables.items():
            with atomic_path(self.path / TABLES / f"{name}.parquet") as tmp:
                df.to_parquet(tmp, index=False)

    def read_table(self, name: str) -> pd.DataFrame:
        return pd.read_parquet(self.path / TABLES / f"{name}.parquet")

    def write_report(self, html: str) -> None:
        with atomic_path(self.path / REPORT) as tmp:
            tmp.write_text(html, encoding="utf-8")


def start_manifest(base: dict[str, Any]) -> dict[str, Any]:
    return {**base, "status": "running", "pid": os.getpid(), "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "versions": versions()}
