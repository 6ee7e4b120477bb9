"""Progress of long work, on stderr so that `--json` output on stdout stays clean.

On a terminal (or in a notebook) a live progress bar; anywhere else - a log file, CI, `nohup`, a pipe - a
plain line after the first item (with the estimate of the whole job) and then every `ACTLAB_PROGRESS_SECONDS`
(30 by default): done/total, seconds per item, elapsed, ETA.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
_console = Console(stderr=True)
PLAIN_EVERY_S = 30.0


def track(items: Iterable[T], total: int | None = None, description: str = "", enabled: bool = True) -> Iterator[T]:
    if not enabled:
        yield from items
        return
    if not live_display():
        yield from plain_lines(items, total, description)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn())
    with Progress(*columns, console=_console, transient=False) as bar:
        task = bar.add_task(description, total=total)
        for item in items:
            yield item
            bar.advance(task)


def plain_lines(items: Iterable[T], total: int | None, description: str,
                every: float | None = None) -> Iterator[T]:
    """`items`, writing a progress line to stderr after the first one and then at most every `every` seconds."""
    every = float(os.environ.get("ACTLAB_PROGRESS_SECONDS", PLAIN_EVERY_S)) if every is None else every
    start = last = time.monotonic()
    done = 0
    for item in items:
        yield item
        done += 1
        now = time.monotonic()
        if done == 1 or now - last >= every or done == total:
            print(progress_line(description, done, total, now - start, first=done == 1), file=sys.stderr,
                  flush=True)
            last = now


def progress_line(description: str, done: int, total: int | None, elapsed: float, first: bool = False) -> str:
    per = elapsed / done
    head = f"{description}: {done}/{total}" if total else f"{description}: {done}"
    line = f"{head}, {per:.2f} s each, {_clock(elapsed)} elapsed"
    if total and done < total:
        line += f", eta {_clock(per * (total - done))}"
        if first:
            line += f" (estimate for all {total}: {_clock(per * total)})"
    return line


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60}:{rest % 60:02d}"


def live_display() -> bool:
    """Whether stderr shows live bars (a terminal or a notebook) rather than lines kept in a log."""
    return sys.stderr.isatty() or _console.is_jupyter


@contextmanager
def foreign_bars_off() -> Iterator[None]:
    """transformers' own tqdm bars ("Loading weights", GGUF de-quantization) switched off where they would
    only fill a log with carriage returns; restored afterwards."""
    if live_display():
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def status(message: str) -> None:
    _console.print(message, style="dim")
