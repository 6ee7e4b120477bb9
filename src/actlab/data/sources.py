"""Corpus sources: where text comes from.

A corpus spec is one of
- `python-docs` (default): the Python language reference text shipped with every CPython
  (`pydoc_data.topics`), so a fresh machine always has a corpus;
- `wikitext2` (or `wikitext2:test` / `wikitext2:valid`): WikiText-2 from a local folder
  (`$ACTLAB_WIKITEXT2`, else `shared/data/wikitext-2` or `../shared/data/wikitext-2`);
- a path to a text file, or to a directory of text files (read in sorted order);
- `hf:<dataset>[:<config>]:<split>[:<column>]`: a Hugging Face dataset (needs network and `datasets`).

Calibration and evaluation are kept apart by default: every spec is resolved for a *role*.
`wikitext2` gives `valid` for calibration and `test` for evaluation; a source with no splits of its own
is cut at the paragraph boundary nearest its middle: evaluation reads the first half, calibration
the second. An explicit split (`wikitext2:test`) or a role of `all` reads exactly what was named.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from actlab.errors import CorpusError

Role = Literal["eval", "calib", "all"]
DEFAULT_CORPUS = "python-docs"
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".text", ".tokens", ".raw"}
WIKITEXT2_ROLE_SPLIT = {"eval": "test", "calib": "valid"}


@dataclass(frozen=True)
class Corpus:
    name: str
    text: str = field(repr=False)
    provenance: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "chars": len(self.text),
                "sha256": hashlib.sha256(self.text.encode()).hexdigest(), **self.provenance}


def load_corpus(spec: str | None = None, role: Role = "all") -> Corpus:
    spec = spec or DEFAULT_CORPUS
    if spec == "python-docs" or spec.startswith("python-docs:"):
        corpus = _python_docs()
        return _by_role(corpus, _explicit_half(spec) or role)
    if spec == "wikitext2" or spec.startswith("wikitext2:"):
        split = spec.split(":", 1)[1] if ":" in spec else WIKITEXT2_ROLE_SPLIT.get(role, "test")
        return _file_corpus(wikitext2_dir() / f"{split}.txt", name=f"wikitext2:{split}")
    if spec.startswith("hf:"):
        return _by_role(_hf_dataset(spec), role)
    path = Path(spec).expanduser()
    if path.is_file():
        return _by_role(_file_corpus(path, name=str(path)), role)
    if path.is_dir():
        return _by_role(_dir_corpus(path), role)
    raise CorpusError(
        f"corpus {spec!r} not found: give a text file, a directory of text files, 'python-docs', "
        "'wikitext2[:test|:valid]' or 'hf:<dataset>[:<config>]:<split>'"
    )


def wikitext2_dir() -> Path:
    candidates = [os.environ.get("ACTLAB_WIKITEXT2")] if os.environ.get("ACTLAB_WIKITEXT2") else []
    candidates += [Path.cwd() / "shared/data/wikitext-2", Path.cwd().parent / "shared/data/wikitext-2",
                   Path(__file__).resolve().parents[3].parent / "shared/data/wikitext-2"]
    for c in candidates:
        if (Path(c) / "test.txt").is_file():
            return Path(c)
    raise CorpusError(
        "WikiText-2 not found: set ACTLAB_WIKITEXT2 to a folder holding test.txt and valid.txt "
        f"(looked in: {', '.join(str(c) for c in candidates)})"
    )


# -- roles --------------------------------------------------------------------------------------

def _explicit_half(spec: str) -> Role | None:
    if ":" not in spec:
        return None
    half = spec.split(":", 1)[1]
    if half not in ("eval", "calib", "all"):
        raise CorpusError(f"{spec!r}: the split after ':' must be eval, calib or all")
    return half  # type: ignore[return-value]


def _by_role(corpus: Corpus, role: Role) -> Corpus:
    if role == "all":
        return corpus
    cut = _paragraph_cut(corpus.text)
    text = corpus.text[:cut] if role == "eval" else corpus.text[cut:]
    return Corpus(f"{corpus.name}:{role}", text, {**corpus.provenance, "part": f"{role} half (split at char {cut})"})


def _paragraph_cut(text: str) -> int:
    middle = len(text) // 2
    after = text.find("\n\n", middle)
    return after if after != -1 else middle


# -- readers ------------------------------------------------------------------------------------

def _python_docs() -> Corpus:
    import platform
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
    return Corpus("python-docs", text, {"source": "pydoc_data.topics", "python": platform.python_version()})


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{path} is not UTF-8 text ({exc})") from exc
    except OSError as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from exc


def _file_corpus(path: Path, name: str) -> Corpus:
    if not path.is_file():
        raise CorpusError(f"corpus file {path} does not exist")
    return Corpus(name, _read_text(path), {"source": "file", "path": str(path.resolve())})


def _dir_corpus(path: Path) -> Corpus:
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        raise CorpusError(f"directory {path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))})")
    text = "\n\n".join(_read_text(p) for p in files)
    return Corpus(str(path), text, {"source": "directory", "path": str(path.resolve()), "files": len(files)})


def _hf_dataset(spec: str) -> Corpus:
    parts = spec.split(":")[1:]
    if len(parts) < 2:
        raise CorpusError(f"{spec!r}: use hf:<dataset>[:<config>]:<split>[:<column>]")
    dataset, rest = parts[0], parts[1:]
    config = rest[0] if len(rest) >= 2 else None
    split = rest[1] if len(rest) >= 2 else rest[0]
    column = rest[2] if len(rest) >= 3 else "text"
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError("hf: corpora need the `datasets` package (pip install 'actlab[hub]')") from exc
    try:
        ds = datasets.load_dataset(dataset, config, split=split)
    except Exception as exc:
        raise CorpusError(f"cannot load dataset {spec!r} (offline?): {type(exc).__name__}: {exc}") from exc
    text = "\n\n".join(str(t) for t in ds[column])
    return Corpus(spec, text, {"source": "huggingface-datasets", "dataset": dataset, "config": config,
                               "split": split, "column": column})
