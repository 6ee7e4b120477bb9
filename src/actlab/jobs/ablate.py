"""The ablation job: each part (or all of them together) zeroed, mean- or resample-ablated, and the loss change
on evaluation windows with its paired standard error."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from actlab.errors import ConfigError
from actlab.jobs import setup


def ablate_job(model: str, *, parts: Sequence[str], kind: str = "mean", together: bool = False,
               eval_data: str | None = "wikitext2:test", seq_len: int = 512, windows: int = 8,
               log: Callable[[str], None] = print) -> dict[str, Any]:
    from actlab.transforms.steer.ablation import KINDS, loss_change, window_nll

    if kind not in KINDS:
        raise ConfigError(f"--kind {kind!r}: one of {', '.join(KINDS)}")
    if not parts:
        raise ConfigError("give at least one --part (e.g. --part L3.attn.head5 --part 'L5.act[12,40]' --part L6.mlp)")
    lm = setup.model(model, log)
    corpus, eval_windows = setup.eval_windows(lm, eval_data, seq_len, windows)
    dense = window_nll(lm, eval_windows)
    groups = [list(parts)] if together else [[p] for p in parts]
    rows = []
    for group in groups:
        rows.append(loss_change(lm, eval_windows, group, kind, dense=dense))
        r = rows[-1]
        log(f"{' + '.join(group)}: loss {r['loss_dense']:.4f} -> {r['loss']:.4f} "
            f"({r['delta']:+.4f} ± {r['stderr']:.4f})")
    return {"model": lm.name, "kind": kind, "eval_data": corpus.name, "windows": len(eval_windows),
            "seq_len": seq_len, "rows": rows}
