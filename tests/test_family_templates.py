"""The chat templates and tokenizers of Qwen3, Gemma 2 and 3, Phi-3 / Phi-3.5 and Phi-4-mini, against
transformers: each real template (tests/assets/chat_templates, sources in SOURCES.md) renders as
`apply_chat_template` does, and `data.encoding`'s ids and labels are transformers' ids of that text and the
labels found independently from its offsets (`helpers.assert_encodes_as_transformers`).

Tokenizers: Phi-3's is the real Llama 2 `tokenizer.model` (the fixture) with Phi-3's added tokens written into
the files its Hub repository holds (tokenizer_config.json's added_tokens_decoder, added_tokens.json,
tokenizer.json), read by `load_tokenizer` as transformers reads them. Gemma's templates are also tested with a
tokenizer.model shaped like Gemma's (no dummy prefix, "\n\n" a piece), trained here. The others are small
byte-level BPE tokenizer.json files trained here on the guanaco rows, carrying each family's special tokens (no
real vocabulary is available offline)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from test_chat_templates import CONVERSATIONS as CHAT_TEMPLATE_CONVERSATIONS

from data import IGNORE_INDEX, BadRow, encode_all, encode_messages, load_template
from data.encoding import SYSTEM_NOT_RENDERED, end_of_turn_ids
from helpers import TOKENIZER_PATH, assert_encodes_as_transformers, chat_family_tokenizer
from tinyllama.tokenizer import Tokenizer, load_tokenizer, write_tokenizer_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ASSETS = Path(__file__).parent / "assets" / "chat_templates"

# Phi-3's added tokens, as microsoft/Phi-3-mini-4k-instruct's and Phi-3.5-mini-instruct's tokenizer_config.json
# list them (ids 32000-32010; the model's embedding is padded to 32064): every one but <|endoftext|> has
# rstrip, and so has </s>, which is not special there.
PHI3_ADDED = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
              "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]


def _entry(content: str, rstrip: bool, special: bool = True) -> dict:
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": rstrip, "single_word": False,
            "special": special}


PHI3_DECODER = {"0": _entry("<unk>", False), "1": _entry("<s>", False), "2": _entry("</s>", True, special=False),
                **{str(32000 + k): _entry(t, t != "<|endoftext|>") for k, t in enumerate(PHI3_ADDED)}}
PHI3_CONFIG = {"add_bos_token": False, "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
               "unk_token": "<unk>", "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
               "legacy": False, "model_max_length": 4096, "padding_side": "left", "sp_model_kwargs": {},
               "tokenizer_class": "LlamaTokenizer", "use_default_system_prompt": False}
# Each family's BPE stand-in: its special tokens, the BOS its post-processor adds and the EOS its
# tokenizer_config.json names (Qwen3's instruct models end a text with <|im_end|>).
FAMILIES = {
    "qwen3": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"], bos=None,
                  eos="<|im_end|>"),
    "gemma": dict(special=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], bos="<bos>",
                  eos="<eos>", unk="<unk>"),
    "phi4": dict(special=["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>",
                          "<|/tool|>"], bos=None, eos="<|endoftext|>"),
}
# Each real template and the tokenizer it is tested with.
TEMPLATES = {"qwen3-0.6b": "qwen3", "gemma-2-2b-it": "gemma", "gemma-3-1b-it": "gemma",
             "phi-3-mini-4k-instruct": "phi3-hub", "phi-3.5-mini-instruct": "phi3-hub",
             "phi-4-mini-instruct": "phi4"}
# The end of an assistant turn in each template, labelled with the reply.
END_OF_TURN = {"qwen3-0.6b": "<|im_end|>", "gemma-2-2b-it": "<end_of_turn>", "gemma-3-1b-it": "<end_of_turn>",
               "phi-3-mini-4k-instruct": "<|end|>", "phi-3.5-mini-instruct": "<|end|>",
               "phi-4-mini-instruct": "<|end|>"}

CONVERSATIONS = {
    **CHAT_TEMPLATE_CONVERSATIONS,
    "edge whitespace": [
        {"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "\nWhat is 2+2 "},
        {"role": "assistant", "content": " It is four\n"}, {"role": "user", "content": "\tAnd 3+3?\n\n"},
        {"role": "assistant", "content": "Six, of course \t"}],
}
# Qwen3's template keeps the reasoning of the replies after the last user turn and drops it from earlier ones.
REASONING = "<think>\nAdd the two.\n</think>\n\n"
REASONED_LAST = [{"role": "user", "content": "What is 2+2"}, {"role": "assistant", "content": REASONING + "Four"}]
REASONED_EARLIER = [{"role": "user", "content": "What is 2+2"}, {"role": "assistant", "content": REASONING + "Four"},
                    {"role": "user", "content": "And 3+3"}, {"role": "assistant", "content": "Six"}]


def _phi3_folder(folder: Path, config: dict, files: dict[str, str]) -> Path:
    folder.mkdir(parents=True)
    shutil.copyfile(TOKENIZER_PATH, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    for name, text in files.items():
        (folder / name).write_text(text)
    return folder


def _gemma_sentencepiece(folder: Path) -> Path:
    """A tokenizer.model shaped like Gemma's, trained on the guanaco rows: BPE with byte fallback and no dummy
    prefix, <pad> <eos> <bos> <unk> at 0-3, the turn tokens as control pieces, and runs of one to three newlines
    as pieces of their own, as in Gemma's vocabulary (SentencePiece's trainer reads text line by line, so they
    are added to the model afterwards)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    from helpers import GUANACO_SAMPLE

    folder.mkdir(parents=True)
    rows = [json.loads(line)["text"] for line in GUANACO_SAMPLE.read_text(encoding="utf-8").splitlines()]
    (folder / "corpus.txt").write_text("\n".join(rows), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(folder / "corpus.txt"), model_prefix=str(folder / "tokenizer"), vocab_size=1000, model_type="bpe",
        add_dummy_prefix=False, byte_fallback=True, pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
        eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>", control_symbols=["<start_of_turn>", "<end_of_turn>"],
        remove_extra_whitespaces=False, normalization_rule_name="identity", split_digits=True,
        character_coverage=1.0, minloglevel=2)
    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString((folder / "tokenizer.model").read_bytes())
    for k, piece in enumerate(("\n", "\n\n", "\n\n\n")):
        model.pieces.add(piece=piece, score=-k * 0.1, type=sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL)
    (folder / "tokenizer.model").write_bytes(model.SerializeToString())
    for name in ("corpus.txt", "tokenizer.vocab"):
        (folder / name).unlink()
    decoder = {str(i): _entry(t, False) for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>",
                                                             "<end_of_turn>"])}
    config = {"add_bos_token": True, "add_eos_token": False, "added_tokens_decoder": decoder, "bos_token": "<bos>",
              "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>",
              "clean_up_tokenization_spaces": False, "spaces_between_special_tokens": False,
              "model_max_length": 8192, "tokenizer_class": "GemmaTokenizer"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """kind -> tokenizer folder. "phi3-hub": tokenizer.model with every file Phi-3's Hub repository has beside
    it; "phi3-added-json": only added_tokens.json names the added tokens (no flags); "phi3-tokenizer-json": only
    tokenizer.json does (with their flags). The BPE stand-in of each of FAMILIES, and "gemma-sp", a Gemma-shaped
    tokenizer.model."""
    root = tmp_path_factory.mktemp("family_tokenizers")
    plain = dict(PHI3_CONFIG)
    added_json = json.dumps({t: 32000 + k for k, t in enumerate(PHI3_ADDED)}, indent=2)
    hub = _phi3_folder(root / "phi3-hub", {**PHI3_CONFIG, "added_tokens_decoder": PHI3_DECODER},
                       {"added_tokens.json": added_json})
    # The Hub's tokenizer.json is the converted tokenizer.model with the added tokens: what transformers saves.
    transformers.AutoTokenizer.from_pretrained(hub).save_pretrained(root / "saved")
    tokenizer_json = (root / "saved" / "tokenizer.json").read_text()
    (hub / "tokenizer.json").write_text(tokenizer_json)
    out = {"phi3-hub": hub,
           "phi3-added-json": _phi3_folder(root / "phi3-added-json", plain, {"added_tokens.json": added_json}),
           "phi3-tokenizer-json": _phi3_folder(root / "phi3-tokenizer-json", plain,
                                               {"tokenizer.json": tokenizer_json})}
    for family, spec in FAMILIES.items():
        out[family] = chat_family_tokenizer(root / family, family, spec)
    out["gemma-sp"] = _gemma_sentencepiece(root / "gemma-sp")
    return out


@pytest.fixture(scope="module")
def tokenizers(folders):
    return {kind: (load_tokenizer(f), transformers.AutoTokenizer.from_pretrained(f)) for kind, f in folders.items()}


def _template(name: str, tokenizer):
    return load_template(str(ASSETS / f"{name}.jinja"), tokenizer=tokenizer)


def _labelled_text(tokenizer, ids, labels) -> str:
    """The labelled tokens as text, special tokens written out (each run of other tokens decoded whole, as
    SentencePiece's spaces need)."""
    special, out, run = set(tokenizer.special_tokens.values()), [], []
    for i in [i for i, x in zip(ids, labels, strict=True) if x != IGNORE_INDEX] + [None]:
        if i is None or i in special:
            out.append(tokenizer.decode(run) + (tokenizer.id_to_piece(i) if i is not None else ""))
            run = []
        else:
            run.append(i)
    return "".join(out)


@pytest.mark.parametrize("kind", ["phi3-hub", "phi3-added-json", "phi3-tokenizer-json"])
def test_phi3_added_tokens_are_read_as_transformers_reads_them(kind, tokenizers):
    """Llama 2's tokenizer.model knows none of Phi-3's chat tokens: they are single ids only through the files
    beside it, with the flags and the EOS transformers takes from them."""
    tokenizer, hf = tokenizers[kind]
    assert isinstance(tokenizer, Tokenizer)
    assert tokenizer.vocab_size == len(hf) == 32011
    assert tokenizer.eos_id == hf.eos_token_id == 32000 and tokenizer.eos_token == "<|endoftext|>"
    assert {t: tokenizer.special_tokens[t] for t in PHI3_ADDED} == {t: hf.convert_tokens_to_ids(t) for t in PHI3_ADDED}
    assert tokenizer.special_strip == {t.content: (t.lstrip, t.rstrip) for t in hf.added_tokens_decoder.values()
                                       if t.lstrip or t.rstrip}
    assert ("<|end|>" in tokenizer.special_strip) == (kind != "phi3-added-json")  # added_tokens.json has no flags
    assert tokenizer.id_to_piece(32007) == "<|end|>"
    # decode drops special tokens, and added_tokens.json's are not special (transformers' special=False).
    shown = "<|user|>Hello<|end|>" if kind == "phi3-added-json" else "Hello"
    assert tokenizer.decode([32010, 15043, 32007, 32000]) == shown  # <|endoftext|>, the EOS, is special in all
    for name in ("phi-3-mini-4k-instruct", "phi-3.5-mini-instruct"):
        template = _template(name, tokenizer)
        assert assert_encodes_as_transformers(tokenizer, hf, template, CONVERSATIONS.values()) == len(CONVERSATIONS)


def test_phi3_hub_files_decide_as_in_transformers(folders, tmp_path):
    """Where tokenizer_config.json has an added_tokens_decoder, it is the whole list of added tokens: a token only
    added_tokens.json or tokenizer.json names is not one, its flags are the decoder's, not tokenizer.json's."""
    folder = tmp_path / "phi3"
    shutil.copytree(folders["phi3-hub"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    for entry in config["added_tokens_decoder"].values():
        entry["rstrip"] = False
    del config["added_tokens_decoder"]["32010"]  # <|user|>
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "added_tokens.json").write_text(json.dumps({"<|user|>": 32010, "<|extra|>": 32011}))
    tokenizer, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.vocab_size == len(hf) == 32010
    assert "<|user|>" not in tokenizer.special_tokens and "<|extra|>" not in tokenizer.special_tokens
    assert tokenizer.special_strip == {}
    text = "<|user|>\nHi<|end|>\n<|assistant|>\nYo<|end|>\n<|endoftext|>"
    from data import encode_rendered
    assert encode_rendered(text, tokenizer) == hf(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def phi3_tokenizer_json_with_bos(tmp_path_factory) -> str:
    """The tokenizer.json transformers writes for Phi-3's tokenizer.model under add_bos_token: true (its
    post-processor puts <s> first; the Hub folder's, written under false, puts nothing)."""
    root = tmp_path_factory.mktemp("phi3_bos")
    source = _phi3_folder(root / "source", {**PHI3_CONFIG, "add_bos_token": True,
                                            "added_tokens_decoder": PHI3_DECODER}, {})
    transformers.AutoTokenizer.from_pretrained(source).save_pretrained(root / "saved")
    return (root / "saved" / "tokenizer.json").read_text()


@pytest.mark.parametrize("tokenizer_json", ["none", "without BOS", "with BOS"])
@pytest.mark.parametrize("add_bos_token", [False, True])
def test_the_bos_of_a_text_is_decided_as_in_transformers(folders, phi3_tokenizer_json_with_bos, tmp_path,
                                                         tokenizer_json, add_bos_token):
    """Phi-3's tokenizer_config.json says add_bos_token: false. transformers 5 follows it for a tokenizer.model
    alone; where a tokenizer.json sits beside, its post-processor decides instead. bos_token stays <s> either
    way. Plain text, preference-pair text and guanaco rows start as `tokenizer(text)` starts them."""
    from data import encode as encode_conversation
    from data import parse_guanaco
    from data.pairs import encode_text
    from helpers import GUANACO_SAMPLE

    folder = tmp_path / "phi3"
    shutil.copytree(folders["phi3-hub"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": add_bos_token}))
    if tokenizer_json == "none":
        (folder / "tokenizer.json").unlink()
    elif tokenizer_json == "with BOS":
        (folder / "tokenizer.json").write_text(phi3_tokenizer_json_with_bos)
    tokenizer, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.bos_token == hf.bos_token == "<s>" and tokenizer.special_tokens["<s>"] == hf.bos_token_id
    with_bos = hf("Hi")["input_ids"][0] == hf.bos_token_id
    assert with_bos == (add_bos_token if tokenizer_json == "none" else tokenizer_json == "with BOS")
    assert tokenizer.bos_id == (hf.bos_token_id if with_bos else None)
    rows = [json.loads(line)["text"] for line in GUANACO_SAMPLE.read_text(encoding="utf-8").splitlines()[:5]]
    for text in ["Hello world", "", *rows]:
        assert tokenizer.encode(text) == hf(text)["input_ids"], text[:40]
    for text in ["<|user|>\nHi<|end|>\n", "<s> twice?", *rows]:
        assert encode_text(text, tokenizer) == hf(text)["input_ids"], text[:40]
    for row in rows:
        ids, _ = encode_conversation(parse_guanaco(row), tokenizer, None)
        assert ids[:3] == hf(row)["input_ids"][:3], row[:40]


def test_the_config_written_for_a_sentencepiece_model_keeps_its_added_tokens(folders, tmp_path):
    """The export writes tokenizer_config.json beside a tokenizer.model that came without one; its
    added_tokens_decoder is then the whole list to transformers, so the added tokens must be in it."""
    folder = tmp_path / "export"
    folder.mkdir()
    for name in ("tokenizer.model", "tokenizer.json"):
        shutil.copyfile(folders["phi3-tokenizer-json"] / name, folder / name)
    tokenizer = load_tokenizer(folder)
    write_tokenizer_config(tokenizer, folder, 4096)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert len(hf) == tokenizer.vocab_size == 32011
    assert {t.content: t.rstrip for t in hf.added_tokens_decoder.values()} == {
        e["content"]: e["rstrip"] for e in PHI3_DECODER.values()}


@pytest.mark.parametrize("name, kind", [*TEMPLATES.items(), ("gemma-2-2b-it", "gemma-sp"),
                                        ("gemma-3-1b-it", "gemma-sp")])
def test_family_templates_render_encode_and_label_as_transformers(name, kind, tokenizers):
    tokenizer, hf = tokenizers[kind]
    template = _template(name, tokenizer)
    checked = assert_encodes_as_transformers(tokenizer, hf, template, CONVERSATIONS.values())
    # Gemma 2 refuses a system message; every other conversation is trained on.
    assert checked == len(CONVERSATIONS) - 2 * (name == "gemma-2-2b-it")
    messages = CONVERSATIONS["three exchanges, code and languages"]
    expected = hf.apply_chat_template(messages, chat_template=template.source, tokenize=True, return_dict=True)
    ids, labels = encode_messages(messages, tokenizer, template)
    assert ids == expected["input_ids"]
    end = END_OF_TURN[name]
    assert template.end_of_turn_token(tokenizer) == end
    end_id = tokenizer.special_tokens[end]  # generation stops at EOS and there (Qwen3's EOS is its end of turn)
    assert end_of_turn_ids(tokenizer, template) == [tokenizer.eos_id] + [end_id] * (end_id != tokenizer.eos_id)
    replies = "".join(m["content"] + end for m in messages if m["role"] == "assistant")
    assert _labelled_text(tokenizer, ids, labels) == replies


def test_gemma2_refuses_a_system_message_and_the_refusal_is_counted(tokenizers):
    tokenizer, _ = tokenizers["gemma"]
    template = _template("gemma-2-2b-it", tokenizer)
    with pytest.raises(BadRow, match="System role not supported"):
        encode_messages(CONVERSATIONS["system and two exchanges"], tokenizer, template)
    examples, report = encode_all(CONVERSATIONS.values(), tokenizer, None, template)
    assert len(examples) == 2 and report.skipped == {
        "refused by the chat template (System role not supported)": 2}


def test_gemma3_writes_the_system_message_into_the_first_user_turn(tokenizers):
    """Gemma 3 has no system turn: the system text opens the first user turn. It is rendered (so not counted
    as left out), and unlabelled."""
    tokenizer, _ = tokenizers["gemma"]
    template = _template("gemma-3-1b-it", tokenizer)
    messages = CONVERSATIONS["system and two exchanges"]
    assert template.render(messages).startswith(
        "<bos><start_of_turn>user\nYou are a terse assistant\n\nWhat is 2+2<end_of_turn>\n<start_of_turn>model\n")
    examples, report = encode_all([messages], tokenizer, None, template)
    assert report.examples == 1 and SYSTEM_NOT_RENDERED not in report.notes
    ids, labels = examples[0].input_ids.tolist(), examples[0].labels.tolist()
    assert _labelled_text(tokenizer, ids, labels) == "It is four<end_of_turn>Six, of course<end_of_turn>"


def test_qwen3_reasoning_that_the_template_edits_is_refused_and_counted(tokenizers):
    """Qwen3's template keeps the reasoning of the last reply (re-spaced) and drops it from earlier ones: what
    it renders of such a reply is not the reply, so that conversation is refused, counted, never trained on
    with labels in the wrong place. A conversation without reasoning is trained on; the empty think block the
    template writes before the last reply is template text, unlabelled, as transformers' ids have it."""
    tokenizer, hf = tokenizers["qwen3"]
    template = _template("qwen3-0.6b", tokenizer)
    kept = template.render(REASONED_LAST)
    assert kept == hf.apply_chat_template(REASONED_LAST, chat_template=template.source, tokenize=False)
    assert kept.endswith("<|im_start|>assistant\n" + REASONING + "Four<|im_end|>\n")
    dropped = template.render(REASONED_EARLIER)
    assert "Add the two" not in dropped and "<|im_start|>assistant\nFour<|im_end|>" in dropped
    for messages in (REASONED_LAST, REASONED_EARLIER):
        with pytest.raises(BadRow) as e:
            encode_messages(messages, tokenizer, template)
        assert e.value.reason == "template changes message text"
    plain = CONVERSATIONS["system and two exchanges"]
    examples, report = encode_all([REASONED_LAST, plain, REASONED_EARLIER], tokenizer, None, template)
    assert report.examples == 1 and report.skipped == {"template changes message text": 2}
    text = template.render(plain)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\nSix, of course<|im_end|>\n")
    assert "<|im_start|>assistant\nIt is four<|im_end|>" in text  # no think block before the last user turn
    ids, labels = examples[0].input_ids.tolist(), examples[0].labels.tolist()
    assert ids == hf(text, add_special_tokens=False)["input_ids"]
    assert _labelled_text(tokenizer, ids, labels) == "It is four<|im_end|>Six, of course<|im_end|>"
