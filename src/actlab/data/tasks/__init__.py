"""Evaluation tasks are data: a YAML file names a dataset, prompt templates, the choices or target, the metrics.

    task: arc_easy
    dataset: {jsonl: ${tasks}/arc/ARC-Easy-Test.jsonl}      # or lines/group/fields, labels, hf, corpus
    output_type: multiple_choice                             # | loglikelihood | partial | perplexity
    doc_to_text: "Question: {{question.stem}}\\nAnswer:"    # Jinja, over the item's fields
    doc_to_choice: "{{question.choices | map(attribute='text') | list}}"
    doc_to_target: "{{(question.choices | map(attribute='label') | list).index(answerKey)}}"
    target_delimiter: " "                                    # between context and each choice (lm-eval's)
    metrics: [acc, acc_norm]

Output types, as lm-evaluation-harness defines them:
- multiple_choice: the context, then each choice after `target_delimiter`; acc (highest log-likelihood) and
  acc_norm (highest log-likelihood per character of the choice, the delimiter not counted);
- loglikelihood: the context and one target continuation, as written (no delimiter); acc (the target is the
  greedy continuation) and perplexity (exp of minus the mean target log-likelihood) - LAMBADA;
- partial: fill-in-the-blank - `doc_to_contexts` gives one context per option, `doc_to_continuation` the
  shared rest of the sentence, scored given each context (Winogrande's "partial evaluation"); acc;
- perplexity: a corpus cut into windows with actlab's window protocol (`seq_len`); perplexity; with `chunk`, each
  window is read that many tokens per forward through the KV cache (perplexity under KV compression).

`doc_to_question` (optional) is read after `doc_to_text`: the document and the question run as two forwards, so a
KV recipe compresses the document's cache before the question (a question-aware recipe: after it).

Dataset sources: `jsonl` (one JSON object per line); `lines` + `group` + `fields` (a text file, .bz2 or .gz
read transparently, every `group` lines one item); `labels` (a file with one label per line, added to each
item as `label`); `hf: {path, name, split}` (a Hugging Face dataset, needs network and `datasets`);
`corpus` (a corpus spec, for perplexity); `synthetic: {kind, length, items, seed, haystack}` (long-context
retrieval generated with the model's tokenizer: synthetic.py; `NAME@LENGTH` sets the length). Paths may use
${tasks} (the task data folder: $ACTLAB_TASKS or shared/data/tasks) and are otherwise relative to the YAML file.
The built-in tasks are the YAML files
beside this module; any other task is a YAML file a user writes, with no code.
"""

from __future__ import annotations

import bz2
import gzip
import json
import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

from actlab import schema
from actlab.errors import ConfigError, CorpusError

BUILTIN_DIR = Path(__file__).parent
OutputType = Literal["multiple_choice", "loglikelihood", "partial", "perplexity"]
METRICS: dict[str, tuple[str, ...]] = {"multiple_choice": ("acc", "acc_norm"), "loglikelihood": ("perplexity", "acc"),
                                       "partial": ("acc",), "perplexity": ("perplexity",)}
LOWER_IS_BETTER = {"perplexity"}


@dataclass
class DatasetSpec:
    jsonl: str | None = None
    lines: str | None = None
    group: int = 1
    fields: list[str] | None = None
    labels: str | None = None
    hf: dict[str, str] | None = None
    corpus: str | None = None
    synthetic: dict[str, Any] | None = None  # a generated long-context task (synthetic.py)


@dataclass
class TaskSpec:
    task: str
    dataset: DatasetSpec
    output_type: OutputType
    doc_to_text: str = ""
    doc_to_choice: str | None = None
    doc_to_target: str | None = None
    doc_to_contexts: str | None = None
    doc_to_continuation: str | None = None
    doc_to_question: str | None = None  # read after doc_to_text: a KV cache is compressed between the two
    target_delimiter: str = " "
    metrics: list[str] | None = None
    seq_len: int = 1024
    chunk: int = 0  # perplexity: tokens read per forward through the KV cache (0: a window in one forward)
    version: int = 1
    description: str = ""
    source: str = field(default="", repr=False)  # the YAML file (set when loaded)

    def synthetic(self):
        from actlab.data.tasks.synthetic import SyntheticSpec

        return schema.build(SyntheticSpec, self.dataset.synthetic, f"task {self.task!r}: dataset.synthetic")

    def __post_init__(self) -> None:
        where = f"task {self.task!r}"
        needed = {"multiple_choice": ("doc_to_choice", "doc_to_target"), "loglikelihood": ("doc_to_target",),
                  "partial": ("doc_to_contexts", "doc_to_continuation", "doc_to_target"), "perplexity": ()}
        for name in needed[self.output_type]:
            if getattr(self, name) is None:
                raise ConfigError(f"{where}: output_type {self.output_type} needs {name}")
        allowed = METRICS[self.output_type]
        self.metrics = list(self.metrics or allowed)
        bad = [m for m in self.metrics if m not in allowed]
        if bad:
            raise ConfigError(f"{where}: metric {bad[0]!r} does not apply to {self.output_type}; "
                              f"use {', '.join(allowed)}")
        sources = [n for n in ("jsonl", "lines", "hf", "corpus", "synthetic") if getattr(self.dataset, n) is not None]
        if len(sources) != 1:
            raise ConfigError(f"{where}: dataset needs exactly one of jsonl, lines, hf, corpus, synthetic "
                              f"(got {sources or 'none'})")
        if self.dataset.synthetic is not None:
            self.synthetic()  # a bad kind or size: one line
        if (self.output_type == "perplexity") != (sources[0] == "corpus"):
            raise ConfigError(f"{where}: a perplexity task reads a corpus, and only a perplexity task does")
        ds = self.dataset
        if ds.lines is not None and (not ds.fields or len(ds.fields) != ds.group):
            raise ConfigError(f"{where}: dataset.lines needs `fields`, one name per line of a group of {ds.group}")
        if self.seq_len < 2:
            raise ConfigError(f"{where}: seq_len must be at least 2")
        if self.chunk < 0 or (self.chunk and self.output_type != "perplexity"):
            raise ConfigError(f"{where}: chunk is a perplexity task's tokens per forward (>= 1)")
        if self.doc_to_question is not None and self.output_type not in ("loglikelihood", "multiple_choice"):
            raise ConfigError(f"{where}: doc_to_question needs one shared context (loglikelihood, multiple_choice)")
        for name in ("doc_to_text", "doc_to_choice", "doc_to_target", "doc_to_contexts", "doc_to_continuation",
                     "doc_to_question"):
            template = getattr(self, name)
            if template is not None:
                _compile(template, f"{where}: {name}")


@dataclass(frozen=True)
class Item:
    """One scored request group: contexts (one shared, or one per choice) and continuations (one per choice,
    or one shared); `choices` are the choice texts (acc_norm divides by their length); `target` the gold index."""

    index: int
    contexts: tuple[str, ...]
    continuations: tuple[str, ...]
    choices: tuple[str, ...]
    target: int
    question_at: int | None = None  # where the question starts in the shared context (doc_to_question)


def task_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.yaml"))


def load_task(name_or_path: str) -> TaskSpec:
    """A built-in task by name, or a task YAML file by path; `NAME@LENGTH` sets a synthetic task's length in
    tokens (niah_single@2048)."""
    name_or_path, at, length = name_or_path.partition("@")
    if at:
        spec = load_task(name_or_path)
        if spec.dataset.synthetic is None or not length.isdigit():
            raise ConfigError(f"{name_or_path}@{length}: @LENGTH sets a synthetic task's length in tokens "
                              "(e.g. niah_single@2048)")
        spec.dataset.synthetic = {**spec.dataset.synthetic, "length": int(length)}
        spec.task = f"{spec.task}@{length}"
        spec.synthetic()
        return spec
    path = Path(name_or_path).expanduser()
    if path.suffix.lower() in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise ConfigError(f"task file {path} does not exist")
    elif (BUILTIN_DIR / f"{name_or_path}.yaml").is_file():
        path = BUILTIN_DIR / f"{name_or_path}.yaml"
    else:
        raise ConfigError(f"unknown task {name_or_path!r}; built-in tasks: {', '.join(task_names())} "
                          "(or give the path of a task YAML file)")
    import yaml

    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read task file {path}: {str(exc).splitlines()[0]}") from exc
    spec = schema.build(TaskSpec, raw, f"task file {path.name}")
    spec.source = str(path)
    return spec


def tasks_dir() -> Path:
    candidates = [os.environ.get("ACTLAB_TASKS")] if os.environ.get("ACTLAB_TASKS") else []
    candidates += [Path.cwd() / "shared/data/tasks", Path.cwd().parent / "shared/data/tasks",
                   Path(__file__).resolve().parents[4].parent / "shared/data/tasks"]
    for c in candidates:
        if (Path(c) / "piqa" / "valid.jsonl").is_file():
            return Path(c)
    raise CorpusError("task data not found: set ACTLAB_TASKS to a folder with arc/, piqa/, lambada/, hellaswag_text/ "
                      f"(looked in: {', '.join(str(c) for c in candidates)})")


def resolve_path(spec: TaskSpec, value: str) -> Path:
    if "${tasks}" in value:
        value = value.replace("${tasks}", str(tasks_dir()))
    path = Path(value).expanduser()
    if not path.is_absolute() and spec.source:
        path = Path(spec.source).parent / path
    return path


# -- reading items ----------------------------------------------------------------------------------

def read_docs(spec: TaskSpec, limit: int | None = None, tokenizer: Any = None) -> list[dict[str, Any]]:
    """The task's documents (dicts of fields), the first `limit` of them in file order (a synthetic task's are
    generated with the model's `tokenizer`)."""
    ds = spec.dataset
    if ds.synthetic is not None:
        from actlab.data.tasks.synthetic import generate

        return generate(spec.synthetic(), tokenizer, limit)
    if ds.jsonl is not None:
        path = resolve_path(spec, ds.jsonl)
        docs = []
        for number, line in enumerate(_lines(path), start=1):
            if line.strip():
                try:
                    docs.append(json.loads(line))
                except ValueError as exc:
                    raise CorpusError(f"{path}: line {number} is not JSON ({exc})") from exc
            if limit and len(docs) >= limit and ds.labels is None:
                break
    elif ds.lines is not None:
        path = resolve_path(spec, ds.lines)
        lines = _lines(path)
        if len(lines) % ds.group:
            raise CorpusError(f"{path}: {len(lines)} lines is not a whole number of groups of {ds.group}")
        docs = [dict(zip(ds.fields, lines[i : i + ds.group])) for i in range(0, len(lines), ds.group)]
    else:
        docs = _hf_docs(ds.hf or {}, spec.task, limit)
    if ds.labels is not None:
        path = resolve_path(spec, ds.labels)
        labels = [x for x in _lines(path) if x.strip()]
        if len(labels) != len(docs):
            raise CorpusError(f"{path}: {len(labels)} labels for {len(docs)} items")
        docs = [{**d, "label": y.strip()} for d, y in zip(docs, labels)]
    return docs[:limit] if limit else docs


def items(spec: TaskSpec, limit: int | None = None, tokenizer: Any = None) -> list[Item]:
    """The task's scored items (multiple_choice, loglikelihood and partial tasks)."""
    if spec.output_type == "perplexity":
        raise ConfigError(f"task {spec.task} is a perplexity task: it has windows, not items")
    out = []
    for index, doc in enumerate(read_docs(spec, limit, tokenizer)):
        try:
            out.append(_item(spec, index, doc))
        except ConfigError as exc:
            raise ConfigError(f"task {spec.task}, item {index}: {exc}") from exc
    return out


def _item(spec: TaskSpec, index: int, doc: dict[str, Any]) -> Item:
    context = _render(spec.doc_to_text, doc)
    question_at = None
    if spec.doc_to_question is not None:
        question_at = len(context)
        context += _render(spec.doc_to_question, doc)
    if spec.output_type == "multiple_choice":
        choices = _as_list(_render(spec.doc_to_choice, doc, native=True), "doc_to_choice")
        return Item(index, (context,), tuple(spec.target_delimiter + c for c in choices), tuple(choices),
                    _target(_render(spec.doc_to_target, doc, native=True), choices), question_at)
    if spec.output_type == "loglikelihood":  # lm-eval scores the target as written: no delimiter
        target = _render(spec.doc_to_target, doc)
        return Item(index, (context,), (target,), (target,), 0, question_at)
    contexts = _as_list(_render(spec.doc_to_contexts, doc, native=True), "doc_to_contexts")
    continuation = spec.target_delimiter + _render(spec.doc_to_continuation, doc)
    return Item(index, tuple(contexts), (continuation,), tuple(contexts),
                _target(_render(spec.doc_to_target, doc, native=True), contexts))


def _target(value: Any, choices: list[str]) -> int:
    """The gold index: an integer (or its digits, which lm-eval also reads as an index first), or the text of one
    of the choices."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, str):
        if value not in choices:
            raise ConfigError(f"doc_to_target gave {value!r}, which is neither an index nor one of the choices")
        value = choices.index(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(choices):
        raise ConfigError(f"doc_to_target gave {value!r}, not an index among {len(choices)} choices")
    return value


def _as_list(value: Any, what: str) -> list[str]:
    if not isinstance(value, (list, tuple)) or not value or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{what} must give a non-empty list of strings, got {type(value).__name__} {value!r:.60}")
    return list(value)


@cache
def _environments():
    from jinja2 import StrictUndefined
    from jinja2.nativetypes import NativeEnvironment
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class NativeSandbox(ImmutableSandboxedEnvironment, NativeEnvironment):
        """Renders to Python objects (lists of choices, integer targets), sandboxed like the text templates."""

    return (ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True),
            NativeSandbox(undefined=StrictUndefined))


@cache
def _compile(template: str, where: str, native: bool = False):
    from jinja2 import TemplateError

    try:
        return _environments()[int(native)].from_string(template)
    except TemplateError as exc:
        raise ConfigError(f"{where}: bad template ({exc})") from exc


def _render(template: str, doc: dict[str, Any], native: bool = False) -> Any:
    """The template on one document; a bare field name (no braces) is that field, as in lm-eval."""
    from jinja2 import TemplateError

    if "{" not in template and template in doc:
        return doc[template]
    try:
        return _compile(template, "template", native).render(**doc)
    except TemplateError as exc:
        raise ConfigError(f"template {template!r:.60} failed on this item: {exc}") from exc
    except (TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
        raise ConfigError(f"template {template!r:.60} failed on this item: {type(exc).__name__}: {exc}") from exc


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise CorpusError(f"task data file {path} does not exist")
    opener = {".bz2": bz2.open, ".gz": gzip.open}.get(path.suffix.lower(), open)
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            return fh.read().splitlines()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise CorpusError(f"cannot read {path}: {exc}") from exc


def _hf_docs(hf: dict[str, str], task: str, limit: int | None) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as exc:
        raise CorpusError(f"task {task} reads a Hugging Face dataset: install `datasets` (pip install 'actlab[hub]')") \
            from exc
    try:
        ds = datasets.load_dataset(hf["path"], hf.get("name"), split=hf.get("split", "test"))
    except Exception as exc:  # datasets raises many kinds; offline is the usual one
        raise CorpusError(f"task {task}: cannot load dataset {hf.get('path')!r} (offline?): {type(exc).__name__}: "
                          f"{exc}") from exc
    return [dict(d) for d in (ds.select(range(min(limit, len(ds)))) if limit else ds)]
