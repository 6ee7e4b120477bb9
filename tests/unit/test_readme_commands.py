"""Every command line of the README's command section runs, in order, on tiny models: the README cannot drift.

The commands are read from README.md itself and scaled down (tiny-llama for SmolLM2, tiny-gemma3 for Gemma-3,
short windows, few tokens and items, layer indices folded into the tiny models' three layers); a line whose
comment says "refused" must fail with a one-line error, every other line must succeed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from ..conftest import shared_data

ROOT = Path(__file__).resolve().parents[2]
TAKES_MODEL = {"ppl", "profile", "sparsify", "sparsity-at-ppl", "eval", "export", "bench", "layers", "steer", "patch",
               "ablate", "quant", "kv"}
SEQ_LEN = {"ppl", "profile", "sparsify", "sparsity-at-ppl", "layers", "ablate", "quant", "kv"}
TINY = {"smollm2-135m": "tiny-llama", "gemma3-270m": "tiny-gemma3"}


def readme_commands() -> list[tuple[str, bool]]:
    """(command line, expected to be refused) for each `actlab ...` line of the README's command section."""
    text = (ROOT / "README.md").read_text()
    block = text.split("## Command line", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    out = []
    for line in block.splitlines():
        command, _, comment = line.partition(" #")
        if command.strip().startswith("actlab "):
            out.append((command.strip(), comment.strip().startswith("refused")))
    return out


def scaled(command: str) -> list[str]:
    """The README line made small enough for a test, with the same subcommand and options."""
    args = shlex.split(command)[1:]
    sub = args[0]
    out = []
    i = 0
    while i < len(args):
        arg = args[i]
        value = args[i + 1] if i + 1 < len(args) else None
        if arg == "--model":
            out += [arg, TINY.get(value, value)]
        elif arg == "--seq-len":
            out += [arg, "64"]
        elif arg == "--tokens":
            out += [arg, str(max(128, int(value) // 256))]
        elif arg in ("--windows", "--limit"):
            out += [arg, "3"]
        elif arg == "--layers":  # the tiny models have three layers (a control vector has none for layer 0)
            out += [arg, "1-2"]
        elif arg == "--pairs" and value == "builtin:ioi":  # its answers share a first byte in the tiny vocabulary
            out += [arg, "ioi.jsonl"]
        elif arg == "--group":  # the tiny models' widths (64, 160) are multiples of 32, not of 64
            out += [arg, "32"]
        elif arg == "--context":  # the tiny models hold 512 positions
            out += [arg, "128,256"]
        elif arg in ("--remove", "--part"):
            out += [arg, re.sub(r"L(\d+)", lambda m: f"L{int(m.group(1)) % 3}", value)]
        elif arg in ("--data", "--calib", "--eval") and value and value.startswith("../shared/"):
            out += [arg, str(ROOT.parent / value[3:])]
        else:
            out.append(arg)
            i += 1
            continue
        i += 2
    if sub in TAKES_MODEL and "--model" not in out and "--list-methods" not in out and "--resume" not in out:
        out += ["--model", "tiny-llama"]
    if sub in SEQ_LEN and "--seq-len" not in out and "--list-methods" not in out and "--resume" not in out:
        out += ["--seq-len", "64"]
    if sub == "profile" and "--tokens" not in out:
        out += ["--tokens", "128"]
    if sub in ("sparsify", "sparsity-at-ppl") and "--list-methods" not in out:
        out += ["--windows", "2", "--calib-windows", "8"] if "--windows" not in out else []
    if sub == "layers" and ("--method" in out or "--importance" in out):
        out += ["--calib-windows", "8"]
    if sub in ("quant", "kv") and "--list-methods" not in out:
        out += ["--calib-windows", "8"]
    if sub == "sparsity-at-ppl":
        out += ["--steps", "2"]
    if sub == "eval" and "--limit" not in out:
        out += ["--limit", "3"]
    if sub == "bench":
        out += ["--tokens", "8", "--reps", "1"]
    return out


def test_every_readme_command_runs(tmp_path):
    shared_data("wikitext-2")  # the README's corpora (skips without ../shared/data)
    commands = readme_commands()
    assert len(commands) >= 20 and any(refused for _, refused in commands)
    task = yaml.safe_load((ROOT / "src/actlab/data/tasks/arc_easy.yaml").read_text())
    task["task"] = "my_task"  # "a task of your own": a copy of a built-in one
    (tmp_path / "my_task.yaml").write_text(yaml.safe_dump(task))
    names = (("Ann", "Bob"), ("Cat", "Dan"))
    (tmp_path / "ioi.jsonl").write_text("".join(
        json.dumps({"clean": f"When {a} and {b} met, {b} gave it to ", "answer": a, "wrong": b,  # bytes: no space
                    "corrupt": f"When {a} and {b} met, {a} gave it to "}) + "\n" for a, b in names))
    for command, refused in commands:
        args = scaled(command)
        out = subprocess.run([sys.executable, "-m", "actlab.cli", *args], cwd=tmp_path, capture_output=True, text=True)
        shown = f"README: {command}\nran: actlab {shlex.join(args)}\n{out.stderr[-3000:]}"
        if refused:
            assert out.returncode == 2 and "Traceback" not in out.stderr, shown
            assert out.stderr.strip().splitlines()[-1].startswith("error: "), shown
        else:
            assert out.returncode == 0, shown
    assert (tmp_path / "runs" / "gemma-both" / "report.html").is_file()
    assert (tmp_path / "runs" / "eval" / "compare.html").is_file()
    assert (tmp_path / "pruned" / "config.json").is_file() and (tmp_path / "smollm2.gguf").is_file()
    assert (tmp_path / "runs" / "patch-ioi" / "report.html").is_file() and (tmp_path / "happy.gguf").is_file()
    assert (tmp_path / "awq4.gguf").is_file() and (tmp_path / "la50-awq4.json").is_file()
    shutil.rmtree(tmp_path / "runs")


PYTHON_TINY = (("smollm2-135m", "tiny-llama"), ("seq_len=1024", "seq_len=64"), ("num_windows=16", "num_windows=4"),
               ("windows=16", "windows=8"),
               ('calib="wikitext2:valid")', 'calib="wikitext2:valid", seq_len=64, windows=8)'),
               ("layers[3]", "layers[1]"), ('"L3.', '"L1.'), ('"L10.', '"L1.'), ('"L20"', '"L1"'),
               ('"L21.attn"', '"L2.attn"'))


def test_the_readme_python_example_runs(tmp_path):
    """The README's Python API block, on tiny-llama with short windows."""
    shared_data("wikitext-2")
    text = (ROOT / "README.md").read_text()
    code = text.split("## Python API", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    for real, tiny in PYTHON_TINY:
        assert real in code, f"the README example no longer contains {real!r}: update PYTHON_TINY"
        code = code.replace(real, tiny)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "recipe.json").is_file() and "achieved_sparsity" in out.stdout
