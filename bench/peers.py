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


def decode_bench_parser(doc: str, reps: int):
    """The arguments every side-by-side decode bench takes (model, threads, tokens, repetitions, perplexity
    windows, JSON output); the script adds its own."""
    import argparse

    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--windows", type=int, default=8, help="WikiText-2 windows for perplexity")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--json", default=None)
    return ap


def pin_threads(threads: int) -> None:
    """OpenMP and torch at `threads` threads, before anything is timed."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def busy_cores_warning() -> float | None:
    """Cores other work keeps busy (printed as a warning when over half a core: timings would be unreliable)."""
    from actlab.threads import busy_cores  # the bench scripts put src/ on the path

    busy = busy_cores(0.5)
    if busy is not None and busy > 0.5:
        print(f"warning: {busy:.1f} cores busy with other work: timings unreliable", flush=True)
    return busy
