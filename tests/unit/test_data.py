"""Corpus sources and the window protocol, checked against brute-force slicing."""

from __future__ import annotations

import pytest
import torch

from actlab.data import Corpus, WindowSpec, load_corpus, make_windows
from actlab.errors import ConfigError, CorpusError
from actlab.models.tiny import byte_tokenizer

TOK = byte_tokenizer()
TEXT = "".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog.\n\n" for i in range(40))


def corpus(text=TEXT):
    return Corpus("test", text)


def test_default_protocol_is_consecutive_slices_from_start():
    ids = TOK(TEXT)["input_ids"]
    w = make_windows(TOK, corpus(), WindowSpec(seq_len=100, num_windows=7))
    expected = torch.tensor([ids[k * 100 : (k + 1) * 100] for k in range(7)])
    assert torch.equal(w, expected)
    assert w[0, 0] == TOK.bos_token_id and (w[1:, 0] != TOK.bos_token_id).all()


def test_stride_offset_and_all_windows():
    ids = TOK(TEXT)["input_ids"]
    w = make_windows(TOK, corpus(), WindowSpec(seq_len=64, stride=50, offset=3))
    n = (len(ids) - 3 - 64) // 50 + 1
    assert w.shape == (n, 64)
    for k in (0, n // 2, n - 1):
        assert w[k].tolist() == ids[3 + 50 * k : 3 + 50 * k + 64]


def test_bos_every_window():
    raw = TOK(TEXT, add_special_tokens=False)["input_ids"]
    w = make_windows(TOK, corpus(), WindowSpec(seq_len=32, num_windows=5, bos="every"))
    assert (w[:, 0] == TOK.bos_token_id).all()
    assert w[2, 1:].tolist() == raw[2 * 31 : 3 * 31]


def test_bos_none():
    raw = TOK(TEXT, add_special_tokens=False)["input_ids"]
    w = make_windows(TOK, corpus(), WindowSpec(seq_len=32, num_windows=2, bos="none"))
    assert w[0].tolist() == raw[:32]


def test_for_tokens_rounds_up():
    assert WindowSpec.for_tokens(1000, 256).num_windows == 4


def test_empty_corpus():
    with pytest.raises(CorpusError, match="empty"):
        make_windows(TOK, corpus("   \n"), WindowSpec(seq_len=16))


def test_corpus_shorter_than_one_window():
    with pytest.raises(CorpusError, match=r"has 6 tokens.*fewer than one window of 64"):
        make_windows(TOK, corpus("hello"), WindowSpec(seq_len=64))


def test_too_many_windows_requested():
    with pytest.raises(CorpusError, match=r"gives only \d+ windows"):
        make_windows(TOK, corpus(), WindowSpec(seq_len=512, num_windows=100))


def test_seq_len_beyond_context():
    with pytest.raises(ConfigError, match="exceeds the model's context of 512"):
        make_windows(TOK, corpus(), WindowSpec(seq_len=1024), max_context=512)


@pytest.mark.parametrize("kw", [dict(seq_len=1), dict(num_windows=0), dict(stride=0), dict(offset=-1),
                                dict(bos="sometimes")])
def test_bad_window_specs(kw):
    with pytest.raises(ConfigError):
        WindowSpec(**{"seq_len": 16, **kw})


def test_roles_split_a_single_source_into_disjoint_halves(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text(TEXT)
    ev, cal, whole = (load_corpus(str(f), role=r) for r in ("eval", "calib", "all"))
    assert ev.text + cal.text == whole.text == TEXT
    assert ev.text and cal.text and not set(ev.text.split("\n\n")[:-1]) & set(cal.text.split("\n\n")[1:])


def test_builtin_corpus_is_available_offline():
    c = load_corpus(None, role="all")
    assert c.name == "python-docs" and len(c.text) > 100_000
    assert load_corpus("python-docs:calib").text == load_corpus(None, role="calib").text


def test_directory_corpus_sorted(tmp_path):
    (tmp_path / "b.txt").write_text("second")
    (tmp_path / "a.txt").write_text("first")
    (tmp_path / "skip.bin").write_bytes(b"\x00\x01")
    assert load_corpus(str(tmp_path)).text == "first\n\nsecond"


def test_missing_and_empty_sources(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        load_corpus(str(tmp_path / "nope.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no text files"):
        load_corpus(str(tmp_path / "empty"))


def test_non_utf8_file(tmp_path):
    f = tmp_path / "latin.txt"
    f.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match="not UTF-8"):
        load_corpus(str(f))


def test_wikitext2_shortcut_uses_valid_for_calibration():
    from tests.conftest import shared_data

    shared_data("wikitext-2", "test.txt")
    assert load_corpus("wikitext2", role="calib").name == "wikitext2:valid"
    assert load_corpus("wikitext2", role="eval").name == "wikitext2:test"
    assert load_corpus("wikitext2:test").text.startswith(" \n = Robert")
