"""Prompt pairs, one JSON object per line: contrastive pairs for steering and clean/corrupted pairs for patching.

    contrastive   {"positive": "...(A", "negative": "...(B"}         the two sides of one behaviour
    patching      {"clean": "...", "corrupt": "...", "answer": " Paris", "wrong": " Rome"}

Built-in sets are generated from templates, deterministically: `sentiment` (A/B questions whose positive side
picks the cheerful answer, CAA's format) and `arc-easy` (an ARC-Easy question with its correct answer vs a wrong
one) for steering; `ioi` (indirect-object identification, clean vs names swapped) for patching. A file is named
by its path, a built-in set by `builtin:NAME`, optionally with `:train` / `:test` for the even / odd items.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from actlab.errors import ConfigError

CONTRAST_FIELDS = ("positive", "negative")
PATCH_FIELDS = ("clean", "corrupt", "answer", "wrong")
HALVES = ("train", "test")


@dataclass(frozen=True)
class ContrastPair:
    positive: str
    negative: str


@dataclass(frozen=True)
class PatchPair:
    clean: str
    corrupt: str
    answer: str
    wrong: str


def read_jsonl(path: str | Path, fields: tuple[str, ...]) -> list[dict[str, str]]:
    """Rows of a jsonl file that each have every field as a non-empty string (one-line errors naming the line)."""
    path = Path(path).expanduser()
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise ConfigError(f"cannot read pairs file {path}: {exc.strerror or exc}") from exc
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{number}: not JSON ({exc.msg})") from exc
        missing = [f for f in fields if not isinstance(row, dict) or not isinstance(row.get(f), str) or not row[f]]
        if missing:
            raise ConfigError(f"{path}:{number}: missing {', '.join(missing)} (each line needs "
                              f"{', '.join(fields)} as non-empty strings)")
        rows.append(row)
    if not rows:
        raise ConfigError(f"pairs file {path} holds no pairs")
    return rows


def load_contrast_pairs(spec: str) -> list[ContrastPair]:
    if spec.startswith("builtin:"):
        return builtin_pairs(spec, BUILTIN)
    return [ContrastPair(r["positive"], r["negative"]) for r in read_jsonl(spec, CONTRAST_FIELDS)]


def load_patch_pairs(spec: str) -> list[PatchPair]:
    if spec.startswith("builtin:"):
        return builtin_pairs(spec, PATCH_BUILTIN)
    return [PatchPair(*(r[f] for f in PATCH_FIELDS)) for r in read_jsonl(spec, PATCH_FIELDS)]


def split_half(pairs: list, half: str | None) -> list:
    """Even items (train) or odd items (test): a split that keeps neighbouring items apart."""
    if half is None:
        return pairs
    if half not in HALVES:
        raise ConfigError(f"pair set half {half!r}: one of {', '.join(HALVES)}")
    return pairs[HALVES.index(half)::2]


# -- built-in sets ----------------------------------------------------------------------------------------

TOPICS = ("the weather today", "your new job", "the city you live in", "the book you just read", "your neighbours",
          "the food at the restaurant", "the film last night", "your morning commute", "the holiday trip",
          "the new phone", "your garden", "the concert", "the school year", "the team's last match",
          "the house you moved into", "the weekend", "the museum visit", "your birthday party", "the train journey",
          "the new song", "the hotel room", "the football season", "the long walk", "the cooking class",
          "your old car", "the local market", "the winter", "the family dinner", "the hiking trail", "the new cafe",
          "the art exhibition", "the summer camp", "the library", "the beach", "the music lesson", "your new bike",
          "the board game", "the theatre play", "the morning run", "the village fair")
CHEERFUL = ("I love it, it makes me so happy.", "It is wonderful and I enjoy every moment.",
            "It is great, I feel delighted.", "Absolutely fantastic, I am thrilled.")
GLOOMY = ("I hate it, it makes me miserable.", "It is awful and I dread every moment.",
          "It is terrible, I feel upset.", "Absolutely dreadful, I am disappointed.")


def _sentiment_questions() -> list[tuple[str, str, str]]:
    """(question, cheerful answer, gloomy answer) per topic."""
    return [(f"Question: How do you feel about {topic}?", CHEERFUL[i % len(CHEERFUL)],
             GLOOMY[(i // len(CHEERFUL)) % len(GLOOMY)]) for i, topic in enumerate(TOPICS)]


def sentiment_pairs(seed: int = 0) -> list[ContrastPair]:
    """A/B questions (CAA's format): the same question and options, the answer letter of the cheerful option on
    the positive side and of the gloomy one on the negative. The cheerful option is (A) in exactly half of each
    half's pairs (in a random order): the state at the answer letter is dominated by which letter it is, and only
    a balanced set cancels that in a mean difference (CAA balances its A/B sets the same way)."""
    rng = random.Random(seed)
    halves = [[True, False] * ((len(TOPICS[h::2]) + 1) // 2) for h in range(2)]
    for h in halves:
        rng.shuffle(h)
    pairs = []
    for i, (question, good, bad) in enumerate(_sentiment_questions()):
        good_first = halves[i % 2][i // 2]
        a, b = (good, bad) if good_first else (bad, good)
        prompt = f"{question}\n(A) {a}\n(B) {b}\nAnswer: ("
        letters = ("A", "B") if good_first else ("B", "A")
        pairs.append(ContrastPair(prompt + letters[0], prompt + letters[1]))
    return pairs


def sentiment_text_pairs(seed: int = 0) -> list[ContrastPair]:
    """The same questions answered in free text: a cheerful vs a gloomy answer after a shared "Answer:". For models
    too small to read A/B options (their A/B probability stays at chance whatever they prefer), the behaviour is
    the probability of the cheerful answer itself."""
    del seed  # nothing is drawn
    return [ContrastPair(f"{question}\nAnswer: {good}", f"{question}\nAnswer: {bad}")
            for question, good, bad in _sentiment_questions()]


def arc_easy_pairs(seed: int = 0) -> list[ContrastPair]:
    """ARC-Easy test questions as statements: the correct answer vs one wrong answer chosen at random."""
    from actlab.data.tasks import items, load_task

    rng = random.Random(seed)
    pairs = []
    for item in items(load_task("arc_easy")):
        def statement(i: int) -> str:  # the text the task scores for choice i: its context and continuation
            return item.contexts[i % len(item.contexts)] + item.continuations[i % len(item.continuations)]
        wrong = [i for i in range(len(item.choices)) if i != item.target]
        if wrong:
            pairs.append(ContrastPair(statement(item.target), statement(rng.choice(wrong))))
    return pairs


# one length in letters per slot, so that a byte-level tokenizer lines the positions up as well
NAMES = (" Mary", " John", " Anna", " Paul", " Mark", " Jack", " Lucy", " Kate")
PLACES = (" store", " beach", " house", " party", " field", " hotel", " court", " lodge")
THINGS = (" book", " ball", " gift", " cake")


def ioi_pairs(seed: int = 0) -> list[PatchPair]:
    """Indirect-object identification (Wang et al. 2023), one template so every prompt has one length: "When A and
    B went to the P, B gave a T to" -> A (clean); the corrupted prompt repeats A instead, which flips the answer to
    B. The metric is the logit of A over B. Names, places and things are single tokens in common vocabularies."""
    rng = random.Random(seed)
    pairs = []
    for n in range(16):
        a, b = rng.sample(NAMES, 2)
        place, thing = PLACES[n % len(PLACES)], THINGS[n % len(THINGS)]
        start = f"When{a} and{b} went to the{place},"
        end = f" gave a{thing} to"
        pairs.append(PatchPair(start + b + end, start + a + end, a, b))
    return pairs


BUILTIN = {"sentiment": sentiment_pairs, "sentiment-text": sentiment_text_pairs, "arc-easy": arc_easy_pairs}
PATCH_BUILTIN = {"ioi": ioi_pairs}


def builtin_pairs(spec: str, sets: dict) -> list:
    _, name, *rest = spec.split(":")
    if name not in sets or len(rest) > 1:
        raise ConfigError(f"unknown pair set {spec!r}; built-in sets: "
                          f"{', '.join(f'builtin:{n}[:train|:test]' for n in sets)}")
    return split_half(sets[name](), rest[0] if rest else None)
