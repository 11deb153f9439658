"""`tinyllama.load_tokenizer` and `BPETokenizer`: the right kind per folder, ids equal to transformers'
`AutoTokenizer`, exact round trips, the guanaco encoding and streaming decode with a byte-level BPE tokenizer.

The BPE tokenizers are built here with the `tokenizers` library, trained on the guanaco fixture rows (no
download): one shaped like Llama 3's (its pre-tokenizer regex, a TemplateProcessing post-processor that adds
<|begin_of_text|>, reserved special tokens added after the vocabulary) and one like SmolLM2's (GPT-2 regex with
single digits, a post-processor that adds no BOS although tokenizer_config.json names a bos_token).
"""

from __future__ import annotations

import builtins
import json
import random
import re
import shutil
import sys

import pytest

from data import IGNORE_INDEX, encode, encode_prompt, parse_guanaco, render
from data.dialogue import TextStream
from helpers import (
    ADVERSARIAL,
    GUANACO_SAMPLE,
    RESERVED,
    TOKENIZER_PATH,
    assert_labelled_runs_are_the_replies,
    label_runs,
    llama3_like_tokenizer,
    smollm2_like_tokenizer,
)
from tinyllama import BPETokenizer, Tokenizer, load_tokenizer

tokenizers = pytest.importorskip("tokenizers", reason="the [bpe] extra: pip install -e .[bpe]")
transformers = pytest.importorskip("transformers", reason="the reference: pip install -e .[test]")

ROWS = [json.loads(line)["text"] for line in GUANACO_SAMPLE.read_text(encoding="utf-8").splitlines()]
# Adversarial rows as they are given, and in canonical form (render of the parse): the guanaco encoding
# decodes back to the canonical form.
RAW_ADVERSARIAL = [row for row, _ in ADVERSARIAL.values()]
ALL_ROWS = ROWS + [render(parse_guanaco(row)) for row in RAW_ADVERSARIAL]
KINDS = ["llama3", "smollm2"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("bpe")
    return {"llama3": llama3_like_tokenizer(root / "llama3"), "smollm2": smollm2_like_tokenizer(root / "smollm2")}


@pytest.fixture(scope="module", params=KINDS)
def kind(request, folders):
    return request.param, folders[request.param]


def _hf(folder, **kwargs):
    return transformers.AutoTokenizer.from_pretrained(folder, **kwargs)


def _sentencepiece_folder(folder):
    """tokenizer.model with a tokenizer_config.json as TinyLlama ships it (LlamaTokenizer, add_bos_token)."""
    added = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    folder.mkdir(parents=True)
    shutil.copyfile(TOKENIZER_PATH, folder / "tokenizer.model")
    config = {"add_bos_token": True, "add_eos_token": False, "legacy": False, "pad_token": None,
              "bos_token": {"__type": "AddedToken", "content": "<s>", **added},
              "eos_token": {"__type": "AddedToken", "content": "</s>", **added},
              "unk_token": {"__type": "AddedToken", "content": "<unk>", **added},
              "clean_up_tokenization_spaces": False, "model_max_length": 2048, "tokenizer_class": "LlamaTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


# ---------------------------------------------------------------------------------------------------------------
# Which tokenizer a folder gets


def test_a_folder_gets_the_kind_its_files_say(tmp_path, folders):
    sp_folder = _sentencepiece_folder(tmp_path / "llama2")
    tok = load_tokenizer(sp_folder)
    assert type(tok) is Tokenizer and tok.path == sp_folder / "tokenizer.model"
    tok = load_tokenizer(folders["llama3"])
    assert type(tok) is BPETokenizer and tok.path == folders["llama3"] / "tokenizer.json"
    # Files work too, and a str.
    assert type(load_tokenizer(str(sp_folder / "tokenizer.model"))) is Tokenizer
    assert type(load_tokenizer(folders["smollm2"] / "tokenizer.json")) is BPETokenizer


def test_sentencepiece_wins_when_a_folder_has_both(tmp_path, folders):
    # Llama 2 folders ship tokenizer.model and tokenizer.json; they keep today's SentencePiece behaviour exactly.
    both = _sentencepiece_folder(tmp_path / "both")
    shutil.copyfile(folders["llama3"] / "tokenizer.json", both / "tokenizer.json")
    tok = load_tokenizer(both)
    reference = Tokenizer(TOKENIZER_PATH)
    assert type(tok) is Tokenizer and tok.path == both / "tokenizer.model"
    for row in ROWS:
        assert tok.encode(row) == reference.encode(row)


def test_a_folder_without_a_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.model .*tokenizer\.json") as err:
        load_tokenizer(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope"))):
        load_tokenizer(tmp_path / "nope")


def test_without_the_tokenizers_package_the_error_names_the_extra(monkeypatch, tmp_path, folders):
    real_import = builtins.__import__

    def no_tokenizers(name, *args, **kwargs):
        if name == "tokenizers" or name.startswith("tokenizers."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tokenizers)
    for name in [m for m in sys.modules if m == "tokenizers" or m.startswith("tokenizers.")]:
        monkeypatch.delitem(sys.modules, name)
    with pytest.raises(ImportError, match=r"pip install -e \.\[bpe\]") as err:
        load_tokenizer(folders["llama3"])
    assert "\n" not in str(err.value) and "tokenizer.json" in str(err.value)
    # SentencePiece folders do not need it.
    assert load_tokenizer(_sentencepiece_folder(tmp_path / "llama2")).encode("Hi") == [1, 6324]


def test_tokenizer_config_problems_are_clear_errors(tmp_path, folders):
    folder = tmp_path / "x"
    shutil.copytree(folders["llama3"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "</s>"}))
    with pytest.raises(ValueError, match=r"eos_token '</s>', which .* does not have"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": None}))
    with pytest.raises(ValueError, match="names no eos_token"):
        load_tokenizer(folder)
    (folder / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer_config.json beside"):
        load_tokenizer(folder)


# ---------------------------------------------------------------------------------------------------------------
# Against transformers' AutoTokenizer


@pytest.mark.slow
def test_sentencepiece_folder_matches_transformers(tmp_path):
    folder = _sentencepiece_folder(tmp_path / "llama2")
    ours, hf = load_tokenizer(folder), _hf(folder)
    assert (ours.bos_id, ours.eos_id, ours.vocab_size) == (hf.bos_token_id, hf.eos_token_id, len(hf))
    for row in ROWS:
        assert ours.encode(row, bos=True) == hf(row)["input_ids"], row[:60]


def test_bpe_folder_matches_transformers(kind):
    name, folder = kind
    ours, hf = load_tokenizer(folder), _hf(folder)
    assert ours.eos_id == hf.eos_token_id
    assert ours.vocab_size == len(hf)
    if name == "llama3":
        assert ours.vocab_size == 800 + len(RESERVED)  # the added tokens count
        assert ours.bos_id == hf.bos_token_id == hf.convert_tokens_to_ids("<|begin_of_text|>")
    else:  # SmolLM2 names a bos_token that neither its post-processor nor transformers puts in front
        assert hf.bos_token == "<|endoftext|>" and ours.bos_id is None
    for row in ROWS:
        ids = ours.encode(row, bos=True)
        assert ids == hf(row)["input_ids"], row[:60]
        assert ours.encode(row, bos=False) == hf(row, add_special_tokens=False)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True) == row


def test_add_bos_token_in_the_config_changes_nothing_as_in_transformers(tmp_path, kind):
    # With a tokenizer.json, transformers ignores add_bos_token: the post-processor decides. So do we.
    name, folder = kind
    changed = tmp_path / name
    shutil.copytree(folder, changed)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (changed / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": name != "llama3"}))
    ours, hf = load_tokenizer(changed), _hf(changed)
    assert ours.bos_id == load_tokenizer(folder).bos_id
    assert ours.encode(ROWS[0]) == hf(ROWS[0])["input_ids"] == load_tokenizer(folder).encode(ROWS[0])


def test_bos_is_added_exactly_once_and_only_when_asked(folders):
    tok = load_tokenizer(folders["llama3"])
    bos = tok.bos_id
    for row in ROWS:
        without, with_bos = tok.encode(row, bos=False), tok.encode(row, bos=True)
        assert bos not in without
        assert with_bos == [bos] + without
        assert tok.encode(row, bos=False, eos=True) == without + [tok.eos_id]
    assert tok.encode("") == [bos] and tok.encode("", bos=False) == []
    assert load_tokenizer(folders["smollm2"]).encode("", bos=True) == []  # no BOS to add


def test_text_that_reads_like_a_special_token_is_plain_text(kind):
    _, folder = kind
    tok, hf = load_tokenizer(folder), _hf(folder, split_special_tokens=True)
    specials = {i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special}
    assert tok.eos_id in specials
    for text in ["<|end_of_text|>", "a <|begin_of_text|> b", "<|endoftext|>x<|im_start|>", RESERVED[0]]:
        ids = tok.encode(text, bos=False)
        assert not specials & set(ids), (text, ids)
        assert tok.decode(ids) == text
        assert ids == hf(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_of_the_fixture_and_adversarial_rows(kind):
    tok = load_tokenizer(kind[1])
    for text in ROWS + RAW_ADVERSARIAL + ALL_ROWS:
        assert tok.decode(tok.encode(text)) == text, repr(text)
        assert tok.decode(tok.encode(text, bos=False, eos=True)) == text, repr(text)


def test_round_trip_of_random_code_points(kind):
    tok = load_tokenizer(kind[1])
    rng = random.Random(0)
    ranges = [(0x00, 0x7F), (0x80, 0x2FFF), (0x3000, 0xD7FF), (0xE000, 0x10FFFF)]  # no surrogates
    for _ in range(400):
        s = "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, 12)))
        assert tok.decode(tok.encode(s, eos=True)) == s, repr(s)


# ---------------------------------------------------------------------------------------------------------------
# The guanaco encoding with a byte-level BPE tokenizer


@pytest.mark.parametrize("row", ALL_ROWS)
def test_guanaco_labels_decode_to_exactly_the_replies(kind, row):
    tok = load_tokenizer(kind[1])
    conv = parse_guanaco(row)
    ids, labels = encode(conv, tok, None)
    assert len(ids) == len(labels)
    if tok.bos_id is not None:
        assert ids[0] == tok.bos_id and labels[0] == IGNORE_INDEX and tok.bos_id not in ids[1:]
    assert tok.decode(ids) == row
    assert ids.count(tok.eos_id) == sum(t.role == "assistant" for t in conv) and ids[-1] == tok.eos_id
    # Byte-level decode keeps the space after "### Assistant:", which belongs to the reply's tokens.
    assert_labelled_runs_are_the_replies(conv, ids, labels, tok, reply_prefix=" ")


def test_guanaco_ids_are_the_whole_row_tokenization_where_a_reply_end_is_a_word_boundary(kind):
    """Segment-wise ids equal the whole row's exactly when the pre-tokenizer already cuts the row at every reply
    end; where it glues a reply's last characters to the next "###" (".###"), ours split there, for the EOS."""
    tok = load_tokenizer(kind[1])
    same = glued = 0
    for row in ALL_ROWS:
        conv = parse_guanaco(row)
        ids, _ = encode(conv, tok, None)
        ours = [i for i in ids if i != tok.eos_id]
        assert render(conv) == row
        reply_ends, at = set(), 0
        for turn in conv:
            at += len(render([turn]))
            if turn.role == "assistant":
                reply_ends.add(at)
        words = tok.backend.pre_tokenizer.pre_tokenize_str(row)
        word_ends = {end for _, (_, end) in words}
        if reply_ends <= word_ends:
            assert ours == tok.encode(row), row[:60]
            same += 1
        else:
            assert ours != tok.encode(row) and tok.decode(ours) == row, row[:60]
            glued += 1
    assert same >= 3 and glued >= 3  # both cases really occur


def test_guanaco_prompt_is_the_training_prefix(kind):
    tok = load_tokenizer(kind[1])
    conv = parse_guanaco(ROWS[10])  # three exchanges
    ids, labels = encode(conv, tok, None)
    reply_starts = [s for s, _, lab in label_runs(labels) if lab]
    assert len(reply_starts) == 3
    for k, start in enumerate(reply_starts):
        assert encode_prompt(conv[:2 * k + 1], tok) == ids[:start]


# ---------------------------------------------------------------------------------------------------------------
# Streaming decode


def _byte_of_char() -> dict[str, int]:
    """GPT-2's byte <-> printable character table, which ByteLevel uses to spell bytes as tokens (inverted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


STREAM_TEXT = "Sure! 👋🏽 Привет, 你好 — e\u0301 done ✓ 😀."


def test_decoding_a_prefix_ends_in_a_replacement_character_not_garbage(kind):
    tok = load_tokenizer(kind[1])
    byte_of = _byte_of_char()
    ids = tok.encode(STREAM_TEXT, bos=False)
    raw = [bytes(byte_of[c] for c in tok.id_to_piece(i)) for i in ids]
    partial = 0
    for k in range(len(ids) + 1):
        text = tok.decode(ids[:k])
        # The reference: the bytes so far, an unfinished character at the end becoming one U+FFFD.
        assert text == b"".join(raw[:k]).decode("utf-8", errors="replace"), k
        assert STREAM_TEXT.startswith(text.rstrip("\ufffd")) and "\ufffd" not in text.rstrip("\ufffd")
        partial += text.endswith("\ufffd")
    assert partial >= 3  # prefixes that end inside a character really occur


def test_chat_stream_shows_exactly_the_text_with_a_bpe_tokenizer(kind):
    tok = load_tokenizer(kind[1])
    shown = []
    stream = TextStream(tok, write=shown.append)
    for i in tok.encode(STREAM_TEXT, bos=False):
        stream.push(i)
    assert stream.finish() == STREAM_TEXT
    assert "".join(shown) == STREAM_TEXT and not any("\ufffd" in s for s in shown)
