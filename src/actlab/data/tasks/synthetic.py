"""Long-context retrieval items generated offline and deterministically, RULER-style (Hsieh et al. 2024, "RULER:
What's the Real Context Size of Your Long-Context Language Models?"): needles hidden at random depths in a
haystack of real text, the whole prompt `length` tokens of the model's tokenizer, a question after the document,
and the needle's value as the target continuation.

Kinds:
- `passkey`: one pass key in the text; "What is the pass key?".
- `niah_single`: one "special magic number" for a key word; asked for that word.
- `niah_multikey`: `needles` magic numbers for different key words; asked for one of them (the others distract).
- `variable_tracking`: a value assigned to a variable and passed along `hops` assignments ("VAR B = VAR A ."),
  spread over the text; asked for the last variable's value.

An item is a dict with `document` (the instruction and the haystack with its needles), `question` and `answer`
(with its leading space), `depth` (where the first needle sits, 0-1) and `tokens` (the prompt's length). The same
(kind, length, seed, index, haystack, tokenizer) always gives the same item.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any

from actlab.errors import ConfigError

KINDS = ("passkey", "niah_single", "niah_multikey", "variable_tracking")
WORDS = ("apple", "harbor", "violet", "engine", "meadow", "lantern", "copper", "falcon", "glacier", "orchid", "pepper",
         "quartz", "river", "saddle", "thunder", "velvet", "walnut", "zephyr", "anchor", "blossom", "canyon", "dolphin",
         "ember", "fjord", "granite", "hazel", "island", "jasmine", "kettle", "lagoon", "marble", "nectar", "oyster",
         "pillow", "quiver", "ribbon", "spruce", "tundra", "umbrella", "valley", "willow", "yarrow", "badger", "cedar",
         "dagger", "falcon", "garnet", "hollow", "indigo", "juniper")
INTRO = ("Below is a long text. Some special pieces of information are hidden in it. Memorize them: you will be "
         "asked about them after the text.\n\n")


@dataclass(frozen=True)
class SyntheticSpec:
    kind: str
    length: int = 4096  # tokens in the prompt (document and question)
    items: int = 50
    seed: int = 0
    haystack: str = "python-docs"  # a corpus spec (actlab.data.sources)
    digits: int = 5  # of the numbers to retrieve
    needles: int = 4  # niah_multikey: key words in the text
    hops: int = 2  # variable_tracking: assignments after the first

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"synthetic task kind {self.kind!r} is unknown; kinds: {', '.join(KINDS)}")
        for name, low in (("length", 64), ("items", 1), ("digits", 1), ("needles", 1), ("hops", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(f"synthetic.{name} must be a whole number >= {low}, got {value!r}")


def _sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    return [s.strip() + " " for s in re.split(r"(?<=[.!?]) ", text) if s.strip()]


def _number(rng: random.Random, digits: int) -> str:
    return str(rng.randrange(10 ** (digits - 1), 10 ** digits))


def _needles(spec: SyntheticSpec, rng: random.Random) -> tuple[list[str], str, str]:
    """(needle sentences in the order they appear, question, answer)."""
    value = _number(rng, spec.digits)
    if spec.kind == "passkey":
        return ([f"The pass key is {value}. Remember it. {value} is the pass key. "],
                "What is the pass key? The pass key is", f" {value}")
    if spec.kind == "variable_tracking":
        names = ["".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5)) for _ in range(spec.hops + 1)]
        chain = [f"VAR {names[0]} = {value}. "] + [f"VAR {b} = VAR {a}. " for a, b in zip(names, names[1:])]
        return chain, f"What is the value of VAR {names[-1]}? Answer: VAR {names[-1]} =", f" {value}"
    count = 1 if spec.kind == "niah_single" else spec.needles
    words = rng.sample(sorted(set(WORDS)), count)
    values = [value] + [_number(rng, spec.digits) for _ in range(count - 1)]
    needles = [f"One of the special magic numbers for {w} is: {v}. " for w, v in zip(words, values)]
    rng.shuffle(needles)
    asked = words[0]
    return (needles, f"What is the special magic number for {asked} mentioned in the provided text? The special "
                     f"magic number for {asked} mentioned in the provided text is", f" {values[0]}")


def generate(spec: SyntheticSpec, tokenizer: Any, limit: int | None = None) -> list[dict[str, Any]]:
    from actlab.data.sources import load_corpus

    if tokenizer is None:
        raise ConfigError("synthetic tasks are built with the model's tokenizer (their length is in its tokens)")
    sentences = _sentences(load_corpus(spec.haystack, role="all").text)
    if len(sentences) < 50:
        raise ConfigError(f"the haystack {spec.haystack!r} holds too little text for a synthetic task")
    counts: dict[int, int] = {}

    def tokens(i: int) -> int:
        if i not in counts:
            counts[i] = len(tokenizer(sentences[i % len(sentences)], add_special_tokens=False)["input_ids"])
        return counts[i]

    out = []
    for index in range(min(spec.items, limit or spec.items)):
        rng = random.Random(f"{spec.kind}/{spec.length}/{spec.seed}/{index}")
        needles, question, answer = _needles(spec, rng)
        fixed = len(tokenizer(INTRO + "".join(needles) + "\n\n" + question + answer)["input_ids"])
        budget = spec.length - fixed
        if budget < 16:
            raise ConfigError(f"synthetic length {spec.length} leaves no room for a haystack")
        start = rng.randrange(len(sentences))
        hay, used = [], 0
        while used + tokens(start + len(hay)) <= budget and len(hay) < len(sentences):
            used += tokens(start + len(hay))
            hay.append(sentences[(start + len(hay)) % len(sentences)])
        words = sentences[(start + len(hay)) % len(sentences)].split(" ")
        low, high = 0, len(words)  # the rest of the budget: as much of the next sentence as fits
        while low < high:
            mid = (low + high + 1) // 2
            fits = used + len(tokenizer(" ".join(words[:mid]), add_special_tokens=False)["input_ids"]) <= budget
            low, high = (mid, high) if fits else (low, mid - 1)
        cut = low
        if cut:
            hay.append(" ".join(words[:cut]) + " ")
        depths = sorted(rng.random() for _ in needles)
        places = [round(d * len(hay)) for d in depths]
        text = list(hay)
        for place, needle in reversed(list(zip(places, needles))):  # from the end: places and order hold
            text.insert(place, needle)
        document = INTRO + "".join(text).rstrip() + "\n\n"
        prompt_tokens = len(tokenizer(document + question)["input_ids"])
        out.append({"document": document, "question": question, "answer": answer, "depth": depths[0],
                    "tokens": prompt_tokens, "kind": spec.kind})
    return out
