"""Peer tools (lm-eval, llama-cpp-python, TransformerLens, repeng) in their own virtual environments under
bench/.venvs: created on first use, never actlab dependencies. A bench script runs its peer's side as a
separate Python process of that environment and exchanges JSON or safetensors files with it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENVS = ROOT / "bench" / ".venvs"
# the CPU build from local disk; a bare `torch` requirement would pull a multi-GB CUDA build
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")


def peer_python(name: str, *specs: str, note: str = "") -> Path:
    """The python of bench/.venvs/`name`, with `specs` pip-installed in that order (once)."""
    venv = VENVS / name
    python = venv / "bin" / "python"
    if not (venv / ".installed").is_file():
        print(f"creating {venv} with {', '.join(specs)} (once{note}) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        for spec in specs:
            subprocess.run([str(python), "-m", "pip", "install", "-q", spec], check=True)
        (venv / ".installed").touch()
    return python


def run_peer(python: Path, script: str, *args: str) -> str:
    """Run `script` (source text) with the peer's python; its stdout, or SystemExit with its stderr's tail."""
    out = subprocess.run([str(python), "-c", script, *args], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the peer process failed:\n{out.stderr[-4000:]}")
    return out.stdout


def write_results(path: str | Path, payload: dict) -> None:
    """The bench's JSON, its folder made if needed."""
    import json

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1))
    print(f"wrote {out}")
