"""`tinyllama.Tokenizer` against `sentencepiece` itself and against Hugging Face's TinyLlama tokenizer.

How the two tokenizers differ, and why it does not matter for guanaco rows: see README: Tokenizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
import re
import shutil

import pytest
import sentencepiece as spm
import torch

from helpers import GUANACO_SAMPLE, ROOT, TOKENIZER_PATH
from tinyllama import Tokenizer

FIXTURE_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
SHARED_FIXTURES = ROOT.parent / "shared" / "fixtures"
SPACE = "\u2581"  # "▁", sentencepiece's stand-in for a space

# ---------------------------------------------------------------------------------------------------------------
# The test strings: every snippet plain, wrapped in whitespace, joined to another one, and as a guanaco exchange.

SNIPPETS = [
    # Latin
    "Hello, world!", "The quick brown fox jumps over the lazy dog.", "naïve café résumé", "Straße über Größe",
    "¿Qué tal? ¡Muy bien!", "Ångström œuvre façade", "Tiếng Việt có dấu", "ﬁne ligature, e\u0301 combining",
    # Cyrillic, Greek, Hebrew, Arabic, Devanagari, Thai
    "Привет, мир!", "Как приготовить простой омлет?", "Съешь же ещё этих мягких французских булок",
    "Γειά σου Κόσμε", "שלום עולם", "مرحبا بالعالم", "السلام عليكم ورحمة الله", "नमस्ते दुनिया",
    "हिन्दी में लिखा गया वाक्य", "สวัสดีชาวโลก",
    # CJK
    "你好，世界", "我应该如何开始学习编程？", "日本語のテキストです。", "漢字とかなカナ混じり", "한국어 문장입니다",
    # emoji: single, skin tone, ZWJ sequences, flags, keycap, variation selector
    "😀", "👍🏽 thumbs up", "👨‍👩‍👧‍👦 family", "🏳️‍🌈 flag", "🧑🏿‍💻 coder", "❤️‍🔥 heart on fire", "🇫🇷🇯🇵",
    "1️⃣ keycap",
    # code
    "def f(x):\n    return x ** 2\n", "for (int i = 0; i < n; ++i) { a[i] = 0; }",
    "import torch\nx = torch.zeros(3, 4)", '<div class="a">&amp;</div>', "SELECT * FROM t WHERE id = 42;",
    "\tif (x) {\n\t\treturn;\n\t}", '{"key": [1, 2.5, null], "ok": true}', "$ ls -la | grep '^d' && echo done",
    "\\frac{a}{b} = \\sum_{i=0}^{n} x_i", "```python\nprint('hi')\n```",
    # numbers
    "3.14159", "1,000,000 and 2025-01-31", "x1y22z333",
    # whitespace
    "a  b", "a   b    c", "trailing   ", "   leading", "tab\tseparated", "line1\nline2", "para\n\npara",
    "crlf\r\nline", "mixed \t \n end",
    # text that looks like control tokens, and the guanaco markers
    "<s>", "</s>", "<s>hello</s>", "a <s> b </s> c", "<unk>", "<pad>", "<0x0A>", "### Human: hi",
    "### Assistant: hello", "!### Assistant:",
]
WRAPS = [(" ", ""), ("", " "), ("  ", "  "), ("\n", ""), ("", "\n"), ("\t", "\t"), ("   ", "\n\n"), (" ", " ")]
SEPARATORS = [" ", "  ", "\n", "\n\n", "\t", " \n ", "\r\n", ""]
EDGE_CASES = ["", " ", "  ", "\n", "\n\n", "\t", " \n\t ", "\r\n", "a", "\x00", "\x1b[0m", "\u00a0nbsp",
              "\u200bzero width", SPACE, f"a{SPACE}b", f"{SPACE}start", f"x {SPACE}{SPACE} y"]


def _corpus() -> list[str]:
    n = len(SNIPPETS)
    out = list(EDGE_CASES)
    for i, s in enumerate(SNIPPETS):
        pre, post = WRAPS[i % len(WRAPS)]
        out += [s, pre + s + post, s + SEPARATORS[i % len(SEPARATORS)] + SNIPPETS[(7 * i + 3) % n],
                f"### Human: {s}### Assistant: {SNIPPETS[(i + 5) % n]}"]
    return list(dict.fromkeys(out))  # drop repeats, keep the order


CORPUS = _corpus()
LITERAL_SPECIALS = ("<s>", "</s>", "<unk>")


def _hf_may_differ(s: str) -> bool:
    """The three cases (see README: Tokenizer) in which HF's ids differ from sentencepiece's; a superset."""
    return (s.startswith((" ", SPACE)) or re.search(f"[ {SPACE}]{{2,}}", s) is not None
            or any(t in s for t in LITERAL_SPECIALS))


def _guanaco_rows() -> list[str]:
    return [json.loads(line)["text"] for line in GUANACO_SAMPLE.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def sp():
    """An independent sentencepiece processor, the reference."""
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER_PATH))


# ---------------------------------------------------------------------------------------------------------------
# Against sentencepiece


def test_corpus_is_varied():
    assert len(CORPUS) >= 200 and len(set(CORPUS)) == len(CORPUS)
    joined = "".join(CORPUS)
    for probe in ["", "é", "ж", "世", "ا", "न", "\u200d", "🇫", "def ", "\t", "\n", "  ", "<s>", "</s>",
                  "### Human:", "### Assistant:"]:
        assert probe in CORPUS or probe in joined, probe
    assert any(s.startswith(" ") for s in CORPUS) and any(s.endswith(" ") for s in CORPUS)


@pytest.mark.parametrize("bos,eos", [(True, False), (False, False), (True, True), (False, True)])
def test_encode_matches_sentencepiece(tokenizer, sp, bos, eos):
    for s in CORPUS:
        assert tokenizer.encode(s, bos=bos, eos=eos) == sp.encode(s, add_bos=bos, add_eos=eos), repr(s)


def test_encode_defaults_add_bos_only(tokenizer, sp):
    s = "### Human: hi### Assistant: hello"
    assert tokenizer.encode(s) == [1] + sp.encode(s)
    assert tokenizer.encode("") == [1]
    assert tokenizer.encode("", bos=False) == []
    assert tokenizer.encode("", eos=True) == [1, 2]


def test_byte_fallback_never_gives_unk(tokenizer, sp):
    for s in CORPUS:
        assert tokenizer.sp.unk_id() not in tokenizer.encode(s, bos=False), repr(s)
    ids = tokenizer.encode("😀", bos=False)  # not a piece of the vocabulary: "▁" then its four UTF-8 bytes
    assert ids[0] == sp.piece_to_id(SPACE) and [sp.id_to_piece(i) for i in ids[1:]] == [
        "<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_literal_control_text_is_plain_text(tokenizer):
    # Training text that happens to contain "<s>" or "</s>" must not become a BOS/EOS the model learns to emit.
    for s in ["<s>", "</s>", "<s>hello</s>", "a <s> b </s> c", "<unk>"]:
        ids = tokenizer.encode(s, bos=False)
        assert not {tokenizer.bos_id, tokenizer.eos_id, 0} & set(ids), (s, ids)
        assert tokenizer.decode(ids) == s
    assert tokenizer.encode("<s>hello</s>", bos=False) == [529, 29879, 29958, 12199, 829, 29879, 29958]


def test_round_trip(tokenizer):
    # SentencePiece guarantees decode(encode(s)) == s for this model (identity normalizer, no whitespace removal,
    # byte fallback) for any text without "▁" (U+2581): that character is its own stand-in for a space, so it
    # comes back as " ". Leading, trailing and repeated whitespace all survive.
    exceptions = 0
    for s in CORPUS:
        expected = s.replace(SPACE, " ")
        exceptions += expected != s
        assert tokenizer.decode(tokenizer.encode(s)) == expected, repr(s)
        assert tokenizer.decode(tokenizer.encode(s, bos=False, eos=True)) == expected, repr(s)
    assert exceptions == 4  # the "▁" edge cases really are exercised
    assert tokenizer.decode(tokenizer.encode(" Hello", bos=False)) == " Hello"
    assert tokenizer.encode(" Hello", bos=False) == [29871, 15043]  # dummy prefix "▁" + "▁Hello"


def test_round_trip_random_code_points(tokenizer):
    rng = random.Random(0)
    ranges = [(0x00, 0x7F), (0x80, 0x2FFF), (0x3000, 0xD7FF), (0xE000, 0x10FFFF)]  # no surrogates
    for _ in range(400):
        s = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 12))).replace(SPACE, "_")
        assert tokenizer.decode(tokenizer.encode(s, eos=True)) == s, repr(s)


def test_decode_takes_tensors_and_drops_bos_eos(tokenizer):
    s = "Hello, world!\n"
    ids = tokenizer.encode(s, bos=True, eos=True)
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == s
    assert tokenizer.decode(torch.tensor(ids)) == s
    assert tokenizer.decode([]) == ""


def test_special_ids_and_no_pad(tokenizer):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.vocab_size) == (1, 2, 32000)
    assert tokenizer.sp.pad_id() == -1  # TinyLlama has no pad token, and we add none
    assert tokenizer.sp.piece_to_id("<pad>") == tokenizer.sp.unk_id() == 0  # i.e. not in the vocabulary
    assert [tokenizer.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]


# ---------------------------------------------------------------------------------------------------------------
# Loading


def test_loads_from_a_folder_or_a_str(sp):
    for path in [TOKENIZER_PATH.parent, str(TOKENIZER_PATH.parent), str(TOKENIZER_PATH)]:
        tok = Tokenizer(path)
        assert tok.path == TOKENIZER_PATH
        assert tok.encode("Hello, world!") == sp.encode("Hello, world!", add_bos=True)


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.model"))):
        Tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match="tokenizer.model") as err:  # a folder without one
        Tokenizer(tmp_path)
    assert str(tmp_path / "tokenizer.model") in str(err.value)


def test_asset_is_the_fixture_model():
    assert hashlib.sha256(TOKENIZER_PATH.read_bytes()).hexdigest() == FIXTURE_SHA256


def test_asset_is_byte_identical_to_shared_fixture():
    shared = SHARED_FIXTURES / "tokenizer.model"
    if not shared.is_file():
        pytest.skip(f"{SHARED_FIXTURES} is absent (a plain clone); the sha256 test still covers the asset")
    assert shared.read_bytes() == TOKENIZER_PATH.read_bytes()


# ---------------------------------------------------------------------------------------------------------------
# Against Hugging Face, configured as TinyLlama_v1.1 ships its tokenizer


def _added(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _hf_tokenizer(folder, legacy: bool):
    if importlib.util.find_spec("transformers") is None or importlib.util.find_spec("google.protobuf") is None:
        pytest.fail("the Hugging Face comparison needs `transformers` and `protobuf` (transformers converts "
                    "tokenizer.model with it); install the test extras: pip install -e '.[test]'")
    import transformers

    folder.mkdir()
    shutil.copyfile(TOKENIZER_PATH, folder / "tokenizer.model")
    config = {"add_bos_token": True, "add_eos_token": False, "bos_token": {"__type": "AddedToken", **_added("<s>")},
              "eos_token": {"__type": "AddedToken", **_added("</s>")},
              "unk_token": {"__type": "AddedToken", **_added("<unk>")}, "pad_token": None,
              "clean_up_tokenization_spaces": False, "legacy": legacy, "model_max_length": 2048,
              "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {"bos_token": _added("<s>"), "eos_token": _added("</s>"), "unk_token": _added("<unk>")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return _hf_tokenizer(tmp_path_factory.mktemp("hf") / "tinyllama", legacy=False)


@pytest.fixture(scope="module")
def hf_legacy(tmp_path_factory):
    return _hf_tokenizer(tmp_path_factory.mktemp("hf_legacy") / "tinyllama", legacy=True)


def _ids(hf, s: str, bos: bool = True) -> list[int]:
    return hf(s, add_special_tokens=bos)["input_ids"]


def test_hf_is_configured_like_tinyllama(hf, tokenizer):
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0)
    assert hf.pad_token is None and len(hf) == tokenizer.vocab_size
    assert _ids(hf, "Hello") == [1, 15043]  # BOS added, no EOS


def test_hf_matches_on_guanaco_rows(hf, tokenizer):
    rows = _guanaco_rows()
    assert len(rows) == 11
    for row in rows:
        ids = tokenizer.encode(row)
        assert _ids(hf, row) == ids, row[:60]
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids) == row


def test_hf_matches_on_corpus_outside_known_differences(hf, tokenizer):
    compared = 0
    for s in CORPUS:
        if _hf_may_differ(s):
            continue
        ids = tokenizer.encode(s)
        assert _ids(hf, s) == ids, repr(s)
        assert hf.decode(ids, skip_special_tokens=True) == tokenizer.decode(ids), repr(s)
        compared += 1
    assert compared >= 150


def test_hf_differs_on_a_leading_space(hf, tokenizer):
    s = " A list is mutable."
    assert tokenizer.encode(s) == [1, 29871, 319, 1051, 338, 26691, 29889]
    assert _ids(hf, s) == [1, 319, 1051, 338, 26691, 29889]
    assert hf.decode(_ids(hf, s), skip_special_tokens=True) == "A list is mutable."  # HF loses the space
    # In general HF encodes " t" exactly as sentencepiece encodes "t": the leading space becomes the dummy prefix.
    checked = 0
    for s in CORPUS:
        if s.startswith(" ") and s[1:] and not _hf_may_differ(s[1:]):  # (" " alone: HF gives "▁", ours "▁▁")
            assert _ids(hf, s) == tokenizer.encode(s[1:]) != tokenizer.encode(s), repr(s)
            checked += 1
    assert checked >= 10


def test_hf_differs_on_guanaco_segments_that_start_with_a_space(hf, tokenizer):
    # Encoding a guanaco row as marker / text segments (for loss masking) gives segments like " A list is ...".
    markers = segments = 0
    for row in _guanaco_rows():
        for seg in filter(None, re.split(r"(### Human:|### Assistant:)", row)):
            ours, theirs = tokenizer.encode(seg, bos=False), _ids(hf, seg, bos=False)
            if seg in ("### Human:", "### Assistant:"):
                assert theirs == ours, seg
                markers += 1
            else:
                assert seg.startswith(" ")
                assert theirs == tokenizer.encode(seg[1:], bos=False) != ours, seg[:60]
                segments += 1
    assert markers == segments == 2 * 14  # 11 rows, 3 of them with two turns


def test_hf_differs_on_runs_of_spaces(hf, tokenizer):
    # Why: sentencepiece scores the whitespace-only pieces at -1e9, so it merges "▁▁" after everything else;
    # the BPE transformers builds from the model ranks the ("▁", "▁") merge first.
    assert {tokenizer.sp.get_score(tokenizer.sp.piece_to_id(SPACE * k)) for k in (1, 2, 3, 4)} == {-1e9}
    cases = {
        "def f(x):\n    return x": ([1, 822, 285, 29898, 29916, 1125, 13, 1678, 736, 921],
                                      [1, 822, 285, 29898, 29916, 1125, 13, 268, 2457, 921]),
        "a  b": ([1, 263, 29871, 289], [1, 263, 259, 29890]),
        "### Human: Fix it:\n```python\ndef f():\n    return 1\n```### Assistant: Done.": (
            [1, 835, 12968, 29901, 24778, 372, 29901, 13, 28956, 4691, 13, 1753, 285, 7295, 13, 1678, 736,
             29871, 29896, 13, 28956, 2277, 29937, 4007, 22137, 29901, 25679, 29889],
            [1, 835, 12968, 29901, 24778, 372, 29901, 13, 28956, 4691, 13, 1753, 285, 7295, 13, 268, 2457,
             29871, 29896, 13, 28956, 2277, 29937, 4007, 22137, 29901, 25679, 29889]),
    }
    for s, (ours, theirs) in cases.items():
        assert tokenizer.encode(s) == ours, repr(s)
        assert _ids(hf, s) == theirs, repr(s)
        assert tokenizer.decode(ours) == hf.decode(theirs, skip_special_tokens=True) == s  # same text


def test_hf_differs_on_literal_special_tokens(hf, hf_legacy, tokenizer):
    cases = {  # text: (ours, HF legacy=False, HF legacy=True)
        "<s>hello</s>": ([1, 529, 29879, 29958, 12199, 829, 29879, 29958], [1, 1, 12199, 2], [1, 1, 22172, 2]),
        "Say </s> now": ([1, 14891, 1533, 29879, 29958, 1286], [1, 14891, 29871, 2, 1286],
                         [1, 14891, 29871, 2, 1286]),
        "<unk>": ([1, 529, 2960, 29958], [1, 0], [1, 0]),
    }
    for s, (ours, theirs, theirs_legacy) in cases.items():
        assert tokenizer.encode(s) == ours, s
        assert _ids(hf, s) == theirs, s
        assert _ids(hf_legacy, s) == theirs_legacy, s


def test_hf_legacy_flag_only_matters_after_literal_special_tokens(hf, hf_legacy):
    plain = [s for s in CORPUS if not any(t in s for t in LITERAL_SPECIALS)]
    assert len(plain) >= 200
    for s in plain:
        assert _ids(hf_legacy, s) == _ids(hf, s), repr(s)
    for row in _guanaco_rows():
        assert _ids(hf_legacy, row) == _ids(hf, row)
