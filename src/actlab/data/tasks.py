"""Zero-shot multiple-choice task sets, read in place from local copies (see shared/data/tasks/README.md).

Prompts follow lm-evaluation-harness: ARC "Question: {question}\\nAnswer:" with choices " {text}";
PIQA "Question: {goal}\\nAnswer:" with choices " {sol1}" / " {sol2}".
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from actlab.errors import CorpusError


@dataclass(frozen=True)
class Choice:
    context: str
    continuations: tuple[str, ...]
    label: int


TASKS = ("arc_easy", "arc_challenge", "piqa")


def tasks_dir() -> Path:
    candidates = [os.environ.get("ACTLAB_TASKS")] if os.environ.get("ACTLAB_TASKS") else []
    candidates += [Path.cwd() / "shared/data/tasks", Path.cwd().parent / "shared/data/tasks",
                   Path(__file__).resolve().parents[3].parent / "shared/data/tasks"]
    for c in candidates:
        if (Path(c) / "piqa" / "valid.jsonl").is_file():
            return Path(c)
    raise CorpusError("task data not found: set ACTLAB_TASKS to a folder with arc/ and piqa/ "
                      f"(looked in: {', '.join(str(c) for c in candidates)})")


def load_task(name: str, limit: int | None = None) -> list[Choice]:
    """The first `limit` items of a task, in file order (a fixed, documented subset)."""
    root = tasks_dir()
    if name in ("arc_easy", "arc_challenge"):
        fname = "ARC-Easy-Test.jsonl" if name == "arc_easy" else "ARC-Challenge-Test.jsonl"
        items = []
        for line in (root / "arc" / fname).read_text().splitlines():
            d = json.loads(line)
            labels = [c["label"] for c in d["question"]["choices"]]
            items.append(Choice(f"Question: {d['question']['stem']}\nAnswer:",
                                tuple(f" {c['text']}" for c in d["question"]["choices"]),
                                labels.index(d["answerKey"])))
    elif name == "piqa":
        goals = [json.loads(line) for line in (root / "piqa" / "valid.jsonl").read_text().splitlines()]
        labels = [int(x) for x in (root / "piqa" / "valid-labels.lst").read_text().split()]
        items = [Choice(f"Question: {g['goal']}\nAnswer:", (f" {g['sol1']}", f" {g['sol2']}"), y)
                 for g, y in zip(goals, labels)]
    else:
        raise CorpusError(f"unknown task {name!r}; tasks: {', '.join(TASKS)}")
    return items[:limit] if limit else items
