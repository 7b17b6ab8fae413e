"""CLIP byte-pair-encoding tokenizer without torch, ftfy or regex.

The token ids equal those of open_clip's ``SimpleTokenizer`` (open_clip 3.x, the OpenAI CLIP
tokenizer) for the ``lower`` and ``whitespace`` cleaning modes with truncation. Three parts of
that tokenizer rely on packages the server does not install, and are rebuilt here:

- ``ftfy.fix_text`` (ftfy 6.3): every fix of its default configuration is applied except the
  heuristic repair of mojibake. These are HTML entities, C1 controls read as Windows-1252,
  Latin ligatures, full and half width forms, curly quotes, line breaks, surrogates, terminal
  escapes, control characters and NFC normalization.
- The ``regex`` pattern classes ``\\p{L}`` and ``\\p{N}`` become character classes built from
  the standard library's ``unicodedata`` (general categories L* and N*). Python 3.11 ships
  Unicode 14.0; a letter or digit assigned in a later Unicode version, which a recent
  ``regex`` knows, is treated here as a symbol and may split into other tokens.
- The byte-level BPE merge loop, which is plain Python in open_clip too.
"""

from __future__ import annotations

import gzip
import html
import html.entities
import itertools
import logging
import re
import threading
import unicodedata
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

_logger = logging.getLogger(__name__)

SOT_TOKEN = "<start_of_text>"
EOT_TOKEN = "<end_of_text>"
DEFAULT_CONTEXT_LENGTH = 77
# The OpenAI vocabulary file has a version line, then merges; CLIP uses the first 48,894 merges,
# which with 512 byte symbols and 2 special tokens gives 49,408 ids.
DEFAULT_NUM_MERGES = 49152 - 256 - 2
CLEAN_MODES = ("lower", "whitespace")


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """Map every byte to a printable character, as GPT-2 and CLIP byte-level BPE do."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(code) for code in codes), strict=True))


# ---------------------------------------------------------------------------------------------
# Text cleaning (the non-heuristic part of ftfy.fix_text, then open_clip's own cleaning)


def _build_html_entities() -> dict[str, str]:
    # ftfy decodes the html5 entities that end in ';' plus all-caps forms of lowercase names.
    entities: dict[str, str] = {}
    for name, char in html.entities.html5.items():
        if name.endswith(";"):
            entities["&" + name] = char
            if name == name.lower():
                upper = "&" + name.upper()
                if html.unescape(upper) == upper:
                    entities[upper] = char.upper()
    return entities


def _sloppy_windows_1252(char: str) -> str:
    # Windows-1252, with its five undefined bytes kept as the Latin-1 character.
    try:
        return char.encode("latin-1").decode("windows-1252")
    except UnicodeDecodeError:
        return char


_HTML_ENTITY_RE = re.compile(r"&#?[0-9A-Za-z]{1,24};")
_C1_CONTROL_RE = re.compile(r"[\x80-\x9f]")
_SINGLE_QUOTE_RE = re.compile("[\u02bc\u2018-\u201b]")
_DOUBLE_QUOTE_RE = re.compile("[\u201c-\u201f]")
_ANSI_RE = re.compile("\033\\[((?:\\d|;)*)([a-zA-Z])")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")
_SURROGATE_PAIR_RE = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_LIGATURES = str.maketrans(
    {
        "Ĳ": "IJ",
        "ĳ": "ij",
        "ŉ": "ʼn",
        "Ǳ": "DZ",
        "ǲ": "Dz",
        "ǳ": "dz",
        "Ǆ": "DŽ",
        "ǅ": "Dž",
        "ǆ": "dž",
        "Ǉ": "LJ",
        "ǈ": "Lj",
        "ǉ": "lj",
        "Ǌ": "NJ",
        "ǋ": "Nj",
        "ǌ": "nj",
        "ﬀ": "ff",
        "ﬁ": "fi",
        "ﬂ": "fl",
        "ﬃ": "ffi",
        "ﬄ": "ffl",
        "ﬅ": "ſt",
        "ﬆ": "st",
    }
)


def _build_width_map() -> dict[int, str]:
    width_map = {0x3000: " "}
    for code in range(0xFF01, 0xFFF0):
        alternate = unicodedata.normalize("NFKC", chr(code))
        if alternate != chr(code):
            width_map[code] = alternate
    return width_map


def _build_control_chars() -> dict[int, None]:
    codes = [*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF]
    codes += list(range(0xFFF9, 0xFFFD))
    return dict.fromkeys(codes)


_HTML_ENTITIES = _build_html_entities()
_WIDTH_MAP = _build_width_map()
_CONTROL_CHARS = _build_control_chars()


def _unescape_entity(match: re.Match[str]) -> str:
    text = match.group(0)
    if text in _HTML_ENTITIES:
        return _HTML_ENTITIES[text]
    if text.startswith("&#"):
        unescaped = html.unescape(text)
        return text if ";" in unescaped else unescaped
    return text


def _convert_surrogate_pair(match: re.Match[str]) -> str:
    pair = match.group(0)
    return chr(0x10000 + (ord(pair[0]) - 0xD800) * 0x400 + (ord(pair[1]) - 0xDC00))


def _fix_segment(text: str, unescape: bool) -> str:
    while True:
        original = text
        if unescape:
            text = _HTML_ENTITY_RE.sub(_unescape_entity, text)
        text = _C1_CONTROL_RE.sub(lambda m: _sloppy_windows_1252(m.group(0)), text)
        text = text.translate(_LIGATURES)
        text = text.translate(_WIDTH_MAP)
        text = _SINGLE_QUOTE_RE.sub("'", _DOUBLE_QUOTE_RE.sub('"', text))
        text = (
            text.replace("\r\n", "\n")
            .replace("\r", "\n")
            .replace("\u2028", "\n")
            .replace("\u2029", "\n")
            .replace("\u0085", "\n")
        )
        if _SURROGATE_RE.search(text):
            text = _SURROGATE_PAIR_RE.sub(_convert_surrogate_pair, text)
            text = _SURROGATE_RE.sub("\ufffd", text)
        text = _ANSI_RE.sub("", text)
        text = text.translate(_CONTROL_CHARS)
        text = unicodedata.normalize("NFC", text)
        if text == original:
            return text


def fix_text(text: str) -> str:
    """Apply ftfy 6.3's default ``fix_text`` fixes, except the mojibake repair.

    Like ftfy, the text is fixed line by line, and HTML entities stay as they are from the first
    line that contains a ``<`` on.
    """
    # NOTE: mojibake such as "cafÃ©" is left as it is, where ftfy would repair it to "café", so
    # the token ids differ from open_clip's for such text.
    out = []
    unescape = True
    position = 0
    while position < len(text):
        end = text.find("\n", position) + 1 or len(text)
        segment = text[position:end]
        if "<" in segment:
            unescape = False
        out.append(_fix_segment(segment, unescape))
        position = end
    return "".join(out)


def basic_clean(text: str) -> str:
    """Fix the text as ftfy would, decode HTML entities twice, and strip it."""
    text = fix_text(text)
    text = html.unescape(html.unescape(text))
    return text.strip()


def whitespace_clean(text: str) -> str:
    """Collapse every run of whitespace to one space."""
    return " ".join(text.split()).strip()


# ---------------------------------------------------------------------------------------------
# Pre-tokenization pattern


def _category_ranges(prefix: str) -> str:
    # A regex character-class body covering every code point whose category starts with prefix.
    ranges: list[str] = []
    start = -1
    for code in range(0x110000 + 1):
        inside = code < 0x110000 and unicodedata.category(chr(code)).startswith(prefix)
        if inside and start < 0:
            start = code
        elif not inside and start >= 0:
            end = code - 1
            ranges.append(
                re.escape(chr(start))
                if start == end
                else f"{re.escape(chr(start))}-{re.escape(chr(end))}"
            )
            start = -1
    return "".join(ranges)


@lru_cache(maxsize=1)
def _letter_and_number_classes() -> tuple[str, str]:
    return _category_ranges("L"), _category_ranges("N")


def _compile_pattern(special_tokens: Sequence[str]) -> re.Pattern[str]:
    letters, numbers = _letter_and_number_classes()
    special = "|".join(re.escape(token) for token in special_tokens)
    return re.compile(
        special
        + rf"""|'s|'t|'re|'ve|'m|'ll|'d|[{letters}]+|[{numbers}]|[^\s{letters}{numbers}]+""",
        re.IGNORECASE,
    )


# ---------------------------------------------------------------------------------------------


class ClipTokenizer:
    """The CLIP BPE tokenizer, reading the vocabulary file that open_clip ships.

    Calling the tokenizer on N strings returns an int64 array (N, context_length): the start
    token, the BPE ids, the end token, then zeros. Longer texts are truncated to the context
    length with the end token kept as the last id, as open_clip does.

    Safe to call from several threads at once.
    """

    def __init__(
        self,
        vocab_path: Path,
        context_length: int = DEFAULT_CONTEXT_LENGTH,
        *,
        clean: str = "lower",
        num_merges: int = DEFAULT_NUM_MERGES,
        additional_special_tokens: Sequence[str] = (),
    ) -> None:
        """Load the vocabulary.

        Args:
            vocab_path: gzip file of BPE merges (open_clip's ``bpe_simple_vocab_16e6.txt.gz``).
            context_length: Number of ids per text, start and end tokens included.
            clean: ``lower`` (fix, collapse whitespace, lower case) or ``whitespace`` (the same
                without lower case), open_clip's cleaning modes for this tokenizer.
            num_merges: How many merges of the file to use.
            additional_special_tokens: Special tokens appended after start and end of text.

        Raises:
            ValueError: The file is missing or unreadable, or an option is invalid.
        """
        if context_length < 2:
            raise ValueError(f"context_length must be at least 2, got {context_length}")
        if clean not in CLEAN_MODES:
            raise ValueError(
                f"tokenizer clean mode {clean!r} is not supported: use one of {list(CLEAN_MODES)}"
            )
        self.vocab_path = Path(vocab_path)
        try:
            with gzip.open(self.vocab_path, "rt", encoding="utf-8") as handle:
                lines = handle.read().split("\n")
        except (OSError, EOFError, UnicodeDecodeError) as err:
            raise ValueError(
                f"cannot read the BPE vocabulary {self.vocab_path}: {err}; export the model again"
            ) from err
        merges = [tuple(line.split()) for line in lines[1 : num_merges + 1]]
        if len(merges) < num_merges or any(len(merge) != 2 for merge in merges):
            raise ValueError(
                f"BPE vocabulary {self.vocab_path} has fewer than {num_merges} valid merges: "
                "use the vocabulary file written by cdul-export"
            )
        vocab = list(bytes_to_unicode().values())
        vocab = vocab + [symbol + "</w>" for symbol in vocab]
        vocab.extend("".join(merge) for merge in merges)
        self.special_tokens = [SOT_TOKEN, EOT_TOKEN, *additional_special_tokens]
        vocab.extend(self.special_tokens)
        self.encoder: dict[str, int] = {token: index for index, token in enumerate(vocab)}
        self.bpe_ranks: dict[tuple[str, ...], int] = {merge: i for i, merge in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.context_length = int(context_length)
        self.clean = clean
        self.vocab_size = len(self.encoder)
        self.sot_token_id = self.encoder[SOT_TOKEN]
        self.eot_token_id = self.encoder[EOT_TOKEN]
        self._pattern = _compile_pattern(self.special_tokens)
        self._cache: dict[str, str] = {token: token for token in self.special_tokens}
        self._cache_lock = threading.Lock()

    @classmethod
    def from_config(cls, tokenizer_config: Mapping[str, Any], model_dir: Path) -> ClipTokenizer:
        """Build the tokenizer from the ``tokenizer`` object of a model's ``config.json``.

        Raises:
            ValueError: The kind is not ``clip-bpe``, a value is invalid, or the stored special
                token ids differ from the vocabulary's.
        """
        kind = tokenizer_config.get("kind", "clip-bpe")
        if kind != "clip-bpe":
            raise ValueError(f"tokenizer kind {kind!r} is not supported: only 'clip-bpe' is")
        if tokenizer_config.get("reduction"):
            raise ValueError(
                f"tokenizer reduction {tokenizer_config['reduction']!r} is not supported: "
                "only truncation (reduction null) is"
            )
        vocab_file = tokenizer_config.get("vocab_file", "vocab.txt.gz")
        tokenizer = cls(
            Path(model_dir) / str(vocab_file),
            context_length=int(tokenizer_config.get("context_length", DEFAULT_CONTEXT_LENGTH)),
            clean=str(tokenizer_config.get("clean", "lower")),
            num_merges=int(tokenizer_config.get("num_merges", DEFAULT_NUM_MERGES)),
            additional_special_tokens=list(tokenizer_config.get("additional_special_tokens", [])),
        )
        for key, actual in (
            ("sot_token_id", tokenizer.sot_token_id),
            ("eot_token_id", tokenizer.eot_token_id),
        ):
            expected = tokenizer_config.get(key)
            if expected is not None and int(expected) != actual:
                raise ValueError(
                    f"tokenizer {key} is {expected} in config.json but {actual} in "
                    f"{tokenizer.vocab_path.name}: export the model again"
                )
        return tokenizer

    def to_config(self) -> dict[str, Any]:
        """Return the ``tokenizer`` object of ``config.json`` for this tokenizer."""
        return {
            "kind": "clip-bpe",
            "vocab_file": self.vocab_path.name,
            "context_length": self.context_length,
            "sot_token_id": self.sot_token_id,
            "eot_token_id": self.eot_token_id,
            "clean": self.clean,
            "reduction": None,
            "num_merges": len(self.bpe_ranks),
            "additional_special_tokens": self.special_tokens[2:],
        }

    def _bpe(self, token: str) -> str:
        cached = self._cache.get(token)
        if cached is not None:
            return cached
        word: tuple[str, ...] = (*token[:-1], token[-1] + "</w>")
        pairs = set(itertools.pairwise(word))
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            merged: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    merged.extend(word[i:])
                    break
                merged.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = tuple(merged)
            if len(word) == 1:
                break
            pairs = set(itertools.pairwise(word))
        result = " ".join(word)
        with self._cache_lock:
            if len(self._cache) > 100_000:
                self._cache = {t: t for t in self.special_tokens}
            self._cache[token] = result
        return result

    def clean_text(self, text: str) -> str:
        """Apply the cleaning that precedes tokenization."""
        text = whitespace_clean(basic_clean(text))
        return text.lower() if self.clean == "lower" else text

    def encode(self, text: str) -> list[int]:
        """Return the BPE ids of one text, without start and end tokens."""
        ids: list[int] = []
        for piece in self._pattern.findall(self.clean_text(text)):
            symbols = "".join(self.byte_encoder[byte] for byte in piece.encode("utf-8"))
            ids.extend(self.encoder[bpe_token] for bpe_token in self._bpe(symbols).split(" "))
        return ids

    def __call__(self, texts: Sequence[str] | str) -> np.ndarray:
        """Tokenize texts.

        Args:
            texts: One string or a sequence of strings.

        Returns:
            int64 array (N, context_length).

        Raises:
            TypeError: An element is not a string.
        """
        if isinstance(texts, str):
            texts = [texts]
        result = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts must be strings, got {type(text).__name__} at {row}")
            tokens = [self.sot_token_id, *self.encode(text), self.eot_token_id]
            if len(tokens) > self.context_length:
                tokens = tokens[: self.context_length]
                tokens[-1] = self.eot_token_id
            result[row, : len(tokens)] = tokens
        return result
