"""Token ids of cdul_server's tokenizer against open_clip's on more than 1,000 prompts."""

from __future__ import annotations

import json
import random
import unicodedata
from pathlib import Path

import numpy as np
import open_clip
import pytest
from open_clip.tokenizer import default_bpe

from cdul_server.tokenizer import ClipTokenizer

TEMPLATES = [
    "a photo of a {}.",
    "a blurry photo of the {}.",
    "A PHOTO OF MANY {}S!!!",
    "itap of a {}",
    "a {} in the wild",
    "{}",
]
ODD_PROMPTS = [
    "",
    " ",
    "\t\n  \r\n",
    "café crème brûlée",
    "naïve façade, jalapeño, smörgåsbord, Ærøskøbing",
    "Ünïcödé ßtraße in München",
    "ÀÉÎÕÜ àéîõü ñÑ çÇ",
    "e\u0301 composed with a combining accent",
    "日本語のテキスト",
    "中文提示词：一只猫",
    "한국어 문장",
    "Русский текст с буквой ё",
    "ελληνικά γράμματα",
    "עברית וערבית العربية",
    "हिन्दी पाठ",
    "🐶🐱🐭🐹🐰🦊",
    "👨‍👩‍👧‍👦 family, 🏳️‍🌈 flag, 👍🏽 thumbs",
    "emoji🙂glued🙃to words",
    "!!!???...---***",
    "a....b,,,,c;;;;d::::e",
    "(((nested))) [[brackets]] {{braces}}",
    "$100 & 50% off #deal @home ~tilde ^caret",
    "it's a dog's life, isn't it? we'll see, I'd say, you're right, they've gone, I'm here",
    "IT'S LOUD, ISN'T IT",
    "“curly quotes” and ‘single’ ones, ‹angle› «guillemets»",
    "ＦＵＬＬＷＩＤＴＨ ｌｅｔｔｅｒｓ and ｈａｌｆ ｶﾀｶﾅ",
    "ligatures: ﬁsh ﬂower ﬀ ﬃ ﬄ ĳ",
    "html &amp; entities &lt;b&gt; &#39;quoted&#39; &eacute; &EACUTE;",
    "a <tag> & &amp; with markup",
    "tab\tseparated\nnew line\r\nwindows line",
    "zero\u200bwidth\u200cjoiners\u200d",
    "control\x00chars\x07here\x1b[31mred\x1b[0m",
    "numbers 0123456789 ½ ⅓ ¾ Ⅻ ② ٣ ३",
    "mixed123abc456def",
    "<start_of_text> literal special <end_of_text>",
    "x" * 500,
    "a " * 200,
    " ".join(["a photo of a very long sentence that does not end"] * 12),
    "🐶" * 100,
]


def _class_names(shared_data: Path) -> list[str]:
    coco = json.loads((shared_data / "coco128" / "classes.json").read_text())
    voc = json.loads((shared_data / "voc2012-rn50x64-cache" / "classes.json").read_text())
    return list(coco) + [str(name) for name in voc]


def _prompts(shared_data: Path) -> list[str]:
    names = _class_names(shared_data)
    prompts = [template.format(name) for template in TEMPLATES for name in names]
    prompts += ODD_PROMPTS
    rng = random.Random(0)
    pieces = names + ODD_PROMPTS[3:35] + ["!!", "...", "🙂", "é", "-", "'s", "'LL", "  "]
    for _ in range(400):
        count = rng.randint(1, 12)
        prompts.append(" ".join(rng.choice(pieces) for _ in range(count)))
    for _ in range(100):
        # Random code points from the Basic Multilingual Plane and the emoji blocks, limited to
        # characters assigned in this Python's Unicode database: the regex package open_clip
        # uses may know newer letters, which cdul_server's tokenizer treats as symbols.
        chars = [
            chr(rng.choice([rng.randint(0x20, 0x2FFF), rng.randint(0x1F300, 0x1FAFF)]))
            for _ in range(rng.randint(1, 30))
        ]
        prompts.append("".join(c for c in chars if unicodedata.category(c) not in ("Cn", "Cs")))
    return prompts


@pytest.fixture(scope="module")
def prompts(shared_data: Path) -> list[str]:
    result = _prompts(shared_data)
    assert len(result) >= 1000
    return result


@pytest.mark.parametrize("context_length", [77, 16])
def test_tokenizer_matches_open_clip(prompts: list[str], context_length: int) -> None:
    ours = ClipTokenizer(Path(default_bpe()), context_length=context_length)
    reference = open_clip.get_tokenizer("ViT-B-32", context_length=context_length)
    expected = reference(prompts).numpy()
    actual = ours(prompts)
    assert actual.dtype == np.int64
    assert actual.shape == expected.shape
    mismatched = [prompts[i] for i in np.flatnonzero(np.any(actual != expected, axis=1))]
    assert mismatched == []


def test_long_prompts_truncated_with_end_token(prompts: list[str]) -> None:
    ours = ClipTokenizer(Path(default_bpe()))
    long_prompts = [p for p in prompts if len(ours.encode(p)) > 75]
    assert len(long_prompts) >= 4
    tokens = ours(long_prompts)
    assert (tokens[:, 0] == ours.sot_token_id).all()
    assert (tokens[:, -1] == ours.eot_token_id).all()


def test_whitespace_clean_mode_matches(prompts: list[str]) -> None:
    ours = ClipTokenizer(Path(default_bpe()), clean="whitespace")
    reference = open_clip.tokenizer.SimpleTokenizer(clean="whitespace")
    sample = prompts[::7]
    expected = reference(sample).numpy()
    mismatched = [sample[i] for i in np.flatnonzero(np.any(ours(sample) != expected, axis=1))]
    assert mismatched == []
