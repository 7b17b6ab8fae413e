"""Tests of the torch-free CLIP tokenizer (parity with open_clip is in the export tests)."""

from __future__ import annotations

import gzip
import threading
from pathlib import Path

import numpy as np
import pytest

from cdul_server.tokenizer import ClipTokenizer, fix_text


@pytest.fixture(scope="module")
def vocab(tiny_model_repository: Path) -> Path:
    return tiny_model_repository / "tiny-clip" / "vocab.txt.gz"


@pytest.fixture(scope="module")
def tokenizer(vocab: Path) -> ClipTokenizer:
    return ClipTokenizer(vocab)


def test_special_tokens_and_vocab_size(tokenizer: ClipTokenizer) -> None:
    assert tokenizer.vocab_size == 49408
    assert tokenizer.sot_token_id == 49406
    assert tokenizer.eot_token_id == 49407


def test_common_words_are_single_tokens(tokenizer: ClipTokenizer) -> None:
    tokens = tokenizer(["a photo of a dog."])[0]
    words = [tokenizer.encoder[w] for w in ("a</w>", "photo</w>", "of</w>", "a</w>", "dog</w>")]
    expected = [49406, *words, tokenizer.encoder[".</w>"], 49407]
    assert tokens[: len(expected)].tolist() == expected
    assert not tokens[len(expected) :].any()


def test_output_shape_and_dtype(tokenizer: ClipTokenizer) -> None:
    tokens = tokenizer(["one", "two words", ""])
    assert tokens.shape == (3, 77)
    assert tokens.dtype == np.int64
    assert tokenizer("single").shape == (1, 77)


def test_empty_string(tokenizer: ClipTokenizer) -> None:
    assert tokenizer([""])[0, :3].tolist() == [49406, 49407, 0]


def test_long_text_truncated_end_token_kept(tokenizer: ClipTokenizer) -> None:
    tokens = tokenizer(["dog " * 200])[0]
    assert tokens[0] == 49406
    assert tokens[-1] == 49407
    assert (tokens[1:-1] == tokenizer.encoder["dog</w>"]).all()


def test_short_context_length(vocab: Path) -> None:
    short = ClipTokenizer(vocab, context_length=8)
    tokens = short(["a photo of a very large dog on a beach"])
    assert tokens.shape == (1, 8)
    assert tokens[0, -1] == 49407


def test_lower_case_cleaning(tokenizer: ClipTokenizer, vocab: Path) -> None:
    assert (tokenizer(["A DOG"]) == tokenizer(["a dog"])).all()
    case_kept = ClipTokenizer(vocab, clean="whitespace")
    assert (case_kept(["A DOG"]) != case_kept(["a dog"])).any()


def test_whitespace_collapsed(tokenizer: ClipTokenizer) -> None:
    assert (tokenizer(["  a \t\n dog  "]) == tokenizer(["a dog"])).all()


@pytest.mark.parametrize(
    ("messy", "clean"),
    [
        ("ﬁsh", "fish"),
        ("ＬＯＵＤ", "LOUD"),
        ("“quoted” it’s", '"quoted" it\'s'),
        ("e\u0301", "\u00e9"),
        ("tab\x00null\x07bell", "tabnullbell"),
        ("\x1b[31mred\x1b[0m", "red"),
        ("&EACUTE;t&eacute;", "Été"),
        ("caf\u00e9\r\nbar", "caf\u00e9\nbar"),
    ],
)
def test_fix_text_repairs(messy: str, clean: str) -> None:
    assert fix_text(messy) == clean


def test_html_kept_after_markup() -> None:
    assert fix_text("<b>&eacute;</b>") == "<b>&eacute;</b>"


def test_decomposed_accents_equal_composed(tokenizer: ClipTokenizer) -> None:
    assert (tokenizer(["cre\u0300me bru\u0302le\u0301e"]) == tokenizer(["crème brûlée"])).all()


def test_emoji_and_scripts_tokenize(tokenizer: ClipTokenizer) -> None:
    tokens = tokenizer(["🐶🐱 日本語 Русский العربية"])[0]
    length = int(np.flatnonzero(tokens == 49407)[0])
    assert length > 6
    assert (tokens[1:length] < 49406).all()


def test_non_string_rejected(tokenizer: ClipTokenizer) -> None:
    with pytest.raises(TypeError, match="strings"):
        tokenizer(["fine", 3])  # type: ignore[list-item]


def test_concurrent_calls_agree(tokenizer: ClipTokenizer) -> None:
    texts = [f"a photo of {n} unusual creatures number {n}" for n in range(200)]
    expected = ClipTokenizer(tokenizer.vocab_path)(texts)
    results: list[np.ndarray] = []
    threads = [threading.Thread(target=lambda: results.append(tokenizer(texts))) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4
    for result in results:
        assert (result == expected).all()


def test_from_config_round_trip(tokenizer: ClipTokenizer, vocab: Path) -> None:
    config = tokenizer.to_config()
    rebuilt = ClipTokenizer.from_config(config, vocab.parent)
    assert rebuilt.context_length == 77
    assert (rebuilt(["a cat"]) == tokenizer(["a cat"])).all()


def test_from_config_rejects_wrong_special_id(vocab: Path) -> None:
    with pytest.raises(ValueError, match="eot_token_id is 5"):
        ClipTokenizer.from_config({"eot_token_id": 5, "vocab_file": vocab.name}, vocab.parent)


def test_from_config_rejects_other_kinds(vocab: Path) -> None:
    with pytest.raises(ValueError, match="not supported"):
        ClipTokenizer.from_config({"kind": "sentencepiece"}, vocab.parent)
    with pytest.raises(ValueError, match="reduction"):
        ClipTokenizer.from_config({"reduction": "random"}, vocab.parent)


def test_missing_vocab_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read the BPE vocabulary"):
        ClipTokenizer(tmp_path / "absent.txt.gz")


def test_truncated_vocab_file(tmp_path: Path) -> None:
    path = tmp_path / "short.txt.gz"
    with gzip.open(path, "wt", encoding="utf-8") as handle:
        handle.write("#version\na b\n")
    with pytest.raises(ValueError, match="fewer than"):
        ClipTokenizer(path)


def test_invalid_options(vocab: Path) -> None:
    with pytest.raises(ValueError, match="context_length"):
        ClipTokenizer(vocab, context_length=1)
    with pytest.raises(ValueError, match="clean mode"):
        ClipTokenizer(vocab, clean="canonicalize")
