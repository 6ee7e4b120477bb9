"""The actlab cache: converted models and downloaded files, each entry written atomically.

Layout under `cache_root()` (`$ACTLAB_CACHE`, default `~/.cache/actlab`):

    models/<key>/            a normal Hugging Face directory (config, safetensors, tokenizer)
    models/<key>/actlab-entry.json   written last: lists every file with its size; an entry
                             without it, or whose files do not match it, is not valid
    downloads/<file>         fetched source files (GGUF), renamed into place after their sha256 checks
    build/                   compiled kernels
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from actlab.fsutil import TMP_PREFIX, atomic_directory, atomic_write_json, stale_temporaries

MARKER = "actlab-entry.json"
STALE_TMP_SECONDS = 24 * 3600


def cache_root() -> Path:
    return Path(os.environ.get("ACTLAB_CACHE") or Path.home() / ".cache" / "actlab")


def models_dir() -> Path:
    return cache_root() / "models"


def downloads_dir() -> Path:
    return cache_root() / "downloads"


def entry_path(key: str) -> Path:
    return models_dir() / key


def valid_entry(key: str) -> Path | None:
    """Return the entry's directory if it is complete and its files match the marker, else None."""
    path = entry_path(key)
    try:
        marker = json.loads((path / MARKER).read_text())
        files: dict[str, int] = marker["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, size in files.items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return None
    return path


def entry_metadata(key: str) -> dict[str, Any]:
    return json.loads((entry_path(key) / MARKER).read_text())


@contextmanager
def new_entry(key: str, metadata: dict[str, Any]) -> Iterator[Path]:
    """Yield a temporary directory to fill; it becomes `models/<key>` only when the body succeeds."""
    _remove_stale_tmp(models_dir())
    remove_entry(key)
    with atomic_directory(entry_path(key)) as tmp:
        yield tmp
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        atomic_write_json(tmp / MARKER, {**metadata, "files": files, "created": time.time()})


def remove_entry(key: str) -> None:
    path = entry_path(key)
    if path.exists():
        # rename first so that a concurrent reader never sees a half-deleted entry as valid
        doomed = path.with_name(f"{TMP_PREFIX}{os.getpid()}-deleting-{path.name}")
        os.replace(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)


def _remove_stale_tmp(parent: Path) -> None:
    """Leftovers of killed conversions: never valid; removed as soon as their process is gone (or after a day)."""
    if parent.is_dir():
        for p in stale_temporaries(parent, STALE_TMP_SECONDS):
            shutil.rmtree(p, ignore_errors=True)
