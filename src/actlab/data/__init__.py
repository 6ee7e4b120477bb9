"""Corpora -> deterministic token windows; task sets for zero-shot evaluation."""

from actlab.data.sources import DEFAULT_CORPUS, Corpus, load_corpus, wikitext2_dir
from actlab.data.windows import WindowSpec, make_windows, tokenize

__all__ = ["DEFAULT_CORPUS", "Corpus", "WindowSpec", "load_corpus", "make_windows", "tokenize", "wikitext2_dir"]
