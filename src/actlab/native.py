"""Build and load actlab's C++ kernels (torch extensions) on first use, from the sources in `csrc/`.

Each extension is compiled once per machine with the host compiler (`-O3 -march=native`; no prebuilt
binaries are shipped) into the actlab cache, keyed by the source hash, the torch version and the CPU,
so a changed source or another machine rebuilds. If no compiler works, `load` returns None and callers
fall back to plain torch operations (same results, slower).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import torch

from actlab.models.cache import cache_root
from actlab.progress import status

CSRC = Path(__file__).parent / "csrc"
# -fopenmp makes ATen's parallel_for (an OpenMP pragma in the headers) parallel; the extension then binds to the
# libgomp.so.1 torch has already loaded (same soname), so both share one thread pool.
CFLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
LDFLAGS = ["-fopenmp"]
log = logging.getLogger("actlab")


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return hashlib.sha256(f"{platform.machine()} {flags}".encode()).hexdigest()[:8]


@contextlib.contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    """An inter-process lock that the OS releases when the holding process dies (flock; no-op without fcntl)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; torch's own lock still serialises builds
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_dir(name: str) -> Path:
    source = (CSRC / f"{name}.cpp").read_bytes()
    key = hashlib.sha256(source + " ".join(CFLAGS + LDFLAGS).encode()).hexdigest()[:10]
    return cache_root() / "build" / f"{name}-{key}-torch{torch.__version__}-{_cpu_signature()}"


@functools.cache
def load(name: str) -> ModuleType | None:
    """The compiled extension `name` (csrc/<name>.cpp), or None when it cannot be built here (no compiler, no
    Python headers, the source missing from an installation): callers then use plain torch operations."""
    if os.environ.get("ACTLAB_NO_NATIVE"):
        return None
    try:
        from torch.utils import cpp_extension

        directory = build_dir(name)  # reads the source: a missing source falls back like a missing compiler
        directory.mkdir(parents=True, exist_ok=True)
        with _exclusive(directory / ".actlab-build.lock"):
            # torch's own build lock is a plain file that a killed build leaves behind, after which every
            # later build waits forever; under our OS-level lock (released when its holder dies) any such
            # file is stale.
            (directory / "lock").unlink(missing_ok=True)
            if not any(directory.glob(f"actlab_{name}*.so")):
                status(f"compiling actlab's {name} kernels for this machine, once (about a minute) ...")
            return cpp_extension.load(name=f"actlab_{name}", sources=[str(CSRC / f"{name}.cpp")],
                                      extra_cflags=CFLAGS, extra_ldflags=LDFLAGS, build_directory=str(directory),
                                      verbose=False)
    except Exception as exc:  # no compiler, no Python headers, no source, an unwritable cache ...
        warnings.warn(f"actlab: could not build the {name} kernel ({type(exc).__name__}: {exc}); "
                      "falling back to plain torch operations", RuntimeWarning, stacklevel=2)
        return None
