"""Chat templates rendered and encoded exactly as transformers does, with the real templates of Llama 2 and 3.x,
Mistral, TinyLlama-Chat, SmolLM2 and Qwen2.5 (tests/assets/chat_templates, sources in SOURCES.md), each with the
SentencePiece tokenizer and with a byte-level BPE tokenizer.json carrying the family's special tokens. The labels
are checked against character ranges found independently here, mapped through transformers' own offsets.
(Runs of spaces are left out of the texts: SentencePiece and transformers split them differently, a known
difference unrelated to templates; see docs/models-and-tokenizers.md.)"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data import IGNORE_INDEX, BadRow, encode_all, encode_messages, encode_prompt, encode_rendered, load_template
from data.encoding import SPECIAL_TEXT, end_of_turn_ids
from data.sources import load_train_eval
from helpers import (
    CHAT_FAMILIES,
    TOKENIZER_PATH,
    assert_encodes_as_transformers,
    chat_family_tokenizer,
    expected_labels,
    hf_render,
)
from tinyllama.templates import BUILTINS, Template
from tinyllama.tokenizer import Tokenizer, load_tokenizer, write_tokenizer_config

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

ASSETS = Path(__file__).parent / "assets" / "chat_templates"
# Each real template, and the family whose special tokens it writes.
REAL = {
    "llama-2-chat": "llama2", "llama-3.1-instruct": "llama3", "llama-3.2-instruct": "llama3",
    "mistral-7b-instruct-v0.1": "mistral", "mistral-7b-instruct-v0.3": "mistral",
    "tinyllama-1.1b-chat-v1.0": "llama2", "smollm2-instruct": "chatml", "qwen2.5-instruct": "chatml",
}
BUILTIN_FAMILY = {"guanaco": "llama2", "chatml": "chatml", "llama2": "llama2", "llama3": "llama3",
                  "zephyr": "llama2", "mistral": "mistral"}
SYSTEM = {"role": "system", "content": "You are a terse assistant"}
CONVERSATIONS = {
    "one exchange": [{"role": "user", "content": "Hi there"},
                     {"role": "assistant", "content": "Hello, how can I help"}],
    "system and two exchanges": [
        SYSTEM, {"role": "user", "content": "What is 2+2"}, {"role": "assistant", "content": "It is four"},
        {"role": "user", "content": "And 3+3"}, {"role": "assistant", "content": "Six, of course"}],
    "three exchanges, code and languages": [
        {"role": "user", "content": "Write a loop in Python"},
        {"role": "assistant", "content": "for i in range(3):\n\tprint(i)"},
        {"role": "user", "content": "¿Y en español? 你好"}, {"role": "assistant", "content": "Claro: un bucle"},
        {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome"}],
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """tokenizer folder per kind: "sp" (the real Llama 2 tokenizer.model with TinyLlama's tokenizer_config.json)
    and "bpe-FAMILY"."""
    root = tmp_path_factory.mktemp("chat_tokenizers")
    sp = root / "sp"
    sp.mkdir()
    shutil.copyfile(TOKENIZER_PATH, sp / "tokenizer.model")
    write_tokenizer_config(Tokenizer(sp / "tokenizer.model"), sp, 2048)
    out = {"sp": sp}
    for family in CHAT_FAMILIES:
        out[f"bpe-{family}"] = chat_family_tokenizer(root / family, family)
    return out


@pytest.fixture(scope="module")
def tokenizers(folders):
    return {kind: (load_tokenizer(f), transformers.AutoTokenizer.from_pretrained(f)) for kind, f in folders.items()}


def _cases():
    for name, family in REAL.items():
        for kind in ("sp", f"bpe-{family}"):
            yield pytest.param(str(ASSETS / f"{name}.jinja"), kind, id=f"{name}-{kind}")
    for name, family in BUILTIN_FAMILY.items():
        for kind in ("sp", f"bpe-{family}"):
            yield pytest.param(name, kind, id=f"builtin-{name}-{kind}")


@pytest.mark.parametrize("spec, kind", list(_cases()))
def test_render_ids_and_labels_equal_transformers(spec, kind, tokenizers):
    tokenizer, hf = tokenizers[kind]
    template = load_template(spec, tokenizer=tokenizer)
    # At least the conversations without a system message were trained on.
    assert assert_encodes_as_transformers(tokenizer, hf, template, CONVERSATIONS.values()) >= 2


# Added tokens that swallow the whitespace beside them. Phi-3's tokenizer_config.json sets rstrip on these; its
# template writes '<|role|>\n' + content + '<|end|>\n', so transformers reads no newline at all.
PHI3_STRIPPED = ("</s>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>")
PHI3_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}"
                 "{% endif %}")
# Whitespace at a content's edges meets the whitespace the tokens swallow: a reply's leading space goes with its
# header (rstrip), its trailing newline with its end of turn (lstrip).
EDGE_WHITESPACE = {
    "system and two exchanges, edge whitespace": [
        {"role": "system", "content": " Be brief.\n"}, {"role": "user", "content": "\nWhat is 2+2 "},
        {"role": "assistant", "content": " It is four\n"}, {"role": "user", "content": "\tAnd 3+3?\n\n"},
        {"role": "assistant", "content": "Six, of course \t"}],
    "inner newlines": [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c\n\nd\n"}],
}
# Only where the header's rstrip takes the newline after it: else that newline and the reply's are one piece of
# the whole text and two here, the label-boundary merge the module docstring of data.encoding describes.
LEADING_NEWLINES = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n\nHello there\n"}]
STRIP_FLAGS = {"rstrip": dict(rstrip=True), "lstrip": dict(lstrip=True), "both": dict(lstrip=True, rstrip=True)}


@pytest.fixture(scope="module")
def phi3_folders(folders, tmp_path_factory):
    """flags -> a BPE folder with Llama 2's special tokens and Phi-3's chat tokens, PHI3_STRIPPED carrying those
    flags in tokenizer.json, and "config": none in tokenizer.json, rstrip in tokenizer_config.json's
    added_tokens_decoder (which transformers reads last)."""
    import json

    from tokenizers import AddedToken
    from tokenizers import Tokenizer as Backend

    root = tmp_path_factory.mktemp("phi3")
    out = {}
    for name, flags in {**STRIP_FLAGS, "config": {}}.items():
        folder = root / name
        shutil.copytree(folders["bpe-llama2"], folder)
        backend = Backend.from_file(str(folder / "tokenizer.json"))
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False, **flags) for t in PHI3_STRIPPED])
        backend.save(str(folder / "tokenizer.json"))
        if name == "config":
            config = json.loads((folder / "tokenizer_config.json").read_text())
            config["added_tokens_decoder"] = {
                str(i): {"content": t.content, "lstrip": False, "normalized": False, "rstrip": t.content in
                         PHI3_STRIPPED, "single_word": False, "special": True}
                for i, t in backend.get_added_tokens_decoder().items()}
            (folder / "tokenizer_config.json").write_text(json.dumps(config))
        (folder / "phi3.jinja").write_text(PHI3_TEMPLATE)
        out[name] = folder
    return out


@pytest.mark.parametrize("flags", [*STRIP_FLAGS, "config"])
def test_added_tokens_that_strip_whitespace_encode_as_transformers(flags, phi3_folders):
    folder = phi3_folders[flags]
    tokenizer, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    template = load_template(str(folder / "phi3.jinja"), tokenizer=tokenizer)
    conversations = [*CONVERSATIONS.values(), *EDGE_WHITESPACE.values()] + [LEADING_NEWLINES] * (flags != "lstrip")
    assert assert_encodes_as_transformers(tokenizer, hf, template, conversations) == len(conversations)
    for messages in conversations:  # what apply_chat_template(tokenize=True) gives, too
        expected = hf.apply_chat_template(messages, chat_template=PHI3_TEMPLATE, tokenize=True, return_dict=True)
        assert encode_messages(messages, tokenizer, template)[0] == expected["input_ids"]
    # The example, spelled out: no newline is left in the ids, the labels are the reply and its <|end|>.
    ids, labels = encode_messages(CONVERSATIONS["one exchange"], tokenizer, template)
    decode = lambda xs: tokenizer.backend.decode(xs, skip_special_tokens=False)  # noqa: E731
    if flags in ("rstrip", "config", "both"):
        assert decode(ids) == "<s><|user|>Hi there<|end|><|assistant|>Hello, how can I help<|end|></s>"
    else:  # lstrip: each newline after a header stays; the one before the next token goes
        assert decode(ids) == "<s><|user|>\nHi there<|end|><|assistant|>\nHello, how can I help<|end|></s>"
    assert decode([i for i, x in zip(ids, labels, strict=True) if x != IGNORE_INDEX]) == \
        "Hello, how can I help<|end|>"


def test_the_whitespace_a_token_swallows_is_tokenizers_whitespace(phi3_folders):
    """Unicode White_Space, as tokenizers' `\\s`: not every character Python's isspace() takes."""
    import sys

    from data.encoding import _WHITESPACE

    folder = phi3_folders["both"]
    tokenizer, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    candidates = {chr(c) for c in range(sys.maxunicode + 1) if chr(c).isspace()} | _WHITESPACE | {"\u200b", "\u180e"}
    for c in sorted(candidates):
        for text in (f"a{c}<|end|>{c}b", f"<|end|>{c}{c}\n<|user|>"):
            assert encode_rendered(text, tokenizer) == hf(text, add_special_tokens=False)["input_ids"], hex(ord(c))


@pytest.mark.parametrize("flags", list(STRIP_FLAGS))
def test_sentencepiece_reads_the_strip_flags_of_tokenizer_config(flags, folders, tmp_path):
    """A tokenizer.model has no added tokens of its own: the flags of <s>, </s> and <unk> are in
    tokenizer_config.json's added_tokens_decoder (Phi-3's </s> has rstrip), and transformers honours them."""
    import json

    folder = tmp_path / "sp"
    shutil.copytree(folders["sp"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["2"].update(STRIP_FLAGS[flags])  # </s>
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert tokenizer.special_strip == {"</s>": (flags != "rstrip", flags != "lstrip")}
    # zephyr writes '</s>\n' after every turn, llama2 ' </s>'.
    for spec, conversations in (("zephyr", [*CONVERSATIONS.values(), EDGE_WHITESPACE["inner newlines"]]),
                                ("llama2", CONVERSATIONS.values())):
        template = load_template(spec, tokenizer=tokenizer)
        assert assert_encodes_as_transformers(tokenizer, hf, template, conversations) >= 2, spec
    one = CONVERSATIONS["one exchange"]
    zephyr, _ = encode_messages(one, tokenizer, load_template("zephyr", tokenizer=tokenizer))
    llama2, _ = encode_messages(one, tokenizer, load_template("llama2", tokenizer=tokenizer))
    rstrip, lstrip = "rstrip" in STRIP_FLAGS[flags], "lstrip" in STRIP_FLAGS[flags]
    assert [tokenizer.id_to_piece(i) for i in zephyr].count("<0x0A>") == (2 if rstrip else 4)  # '</s>\n' is one
    tail = ["▁help", "</s>"] if lstrip else ["▁help", "▁", "</s>"]  # ' </s>' is one id with lstrip
    assert [tokenizer.id_to_piece(i) for i in llama2[-len(tail):]] == tail


# Whitespace at message edges: Llama 2, Llama 3.x and Mistral v0.3 trim (some of) it, ChatML and Zephyr keep it.
EDGES = {
    "system and two exchanges": [
        {"role": "system", "content": "\nYou are terse\n"}, {"role": "user", "content": "\nWhat is 2+2 "},
        {"role": "assistant", "content": " It is four\n"}, {"role": "user", "content": "And 3+3?\n\n"},
        {"role": "assistant", "content": "Six, of course\n"}],
    "one exchange": [{"role": "user", "content": "\tHi there \n"},
                     {"role": "assistant", "content": "\tHello, how can I help?\n"}],
}
TRIMMING = ("llama-2-chat", "llama-3.1-instruct", "mistral-7b-instruct-v0.3", "llama2", "llama3", "mistral")


def _edge_cases():
    for name in TRIMMING + ("chatml", "zephyr"):
        family = REAL.get(name) or BUILTIN_FAMILY[name]
        spec = str(ASSETS / f"{name}.jinja") if name in REAL else name
        for kind in ("sp", f"bpe-{family}"):
            yield pytest.param(spec, kind, id=f"{name}-{kind}")


@pytest.mark.parametrize("spec, kind", list(_edge_cases()))
def test_whitespace_at_message_edges_is_encoded_as_the_template_renders_it(spec, kind, tokenizers):
    """A template that trims content is trained on the trimmed text, one that does not on the content as it is;
    either way the ids and labels are transformers'."""
    tokenizer, hf = tokenizers[kind]
    template = load_template(spec, tokenizer=tokenizer)
    specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
    for messages in EDGES.values():
        expected = hf_render(hf, template, messages, False)
        assert template.render(messages) == expected
        hf_ids = hf(expected, add_special_tokens=False, return_offsets_mapping=True)
        ids, labels = encode_messages(messages, tokenizer, template)
        assert ids == hf_ids["input_ids"]
        assert [x != IGNORE_INDEX for x in labels] == expected_labels(
            expected, messages, hf, hf_ids["offset_mapping"], specials)
        reply = messages[-1]["content"]
        assert (reply.strip() if Path(spec).stem in TRIMMING else reply) in expected  # what was trained on
        prompt = messages[:-1]
        assert encode_prompt(prompt, tokenizer, template) == hf(hf_render(hf, template, prompt, True),
                                                                add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("spec, kind", [("chatml", "bpe-chatml"), ("zephyr", "sp"),
                                        (str(ASSETS / "llama-3.1-instruct.jinja"), "bpe-llama3")])
def test_train_py_data_path_trains_on_what_the_template_renders_of_each_row(spec, kind, tokenizers, tmp_path):
    """Through `load_train_eval` (train.py's --data): a file's rows keep the whitespace at their edges, so ChatML
    and Zephyr train on it and Llama 3.1 on its trimmed text, each exactly as transformers renders the row."""
    tokenizer, hf = tokenizers[kind]
    template = load_template(spec, tokenizer=tokenizer)
    path = tmp_path / "edges.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in EDGES.values()))
    log = []
    examples, _ = load_train_eval(str(path), "none", tokenizer, 1024, template=template, log=log.append)
    assert len(examples) == len(EDGES)
    specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
    for example, messages in zip(examples, EDGES.values(), strict=True):
        expected = hf.apply_chat_template(messages, chat_template=template.source, tokenize=False)
        hf_ids = hf(expected, add_special_tokens=False, return_offsets_mapping=True)
        assert example.input_ids.tolist() == hf_ids["input_ids"]
        assert [x != IGNORE_INDEX for x in example.labels.tolist()] == expected_labels(
            expected, messages, hf, hf_ids["offset_mapping"], specials)
    assert not any("fix-up" in str(line) for line in log)  # nothing was changed on the way


def test_the_end_of_turn_token_is_labelled_and_nothing_else_of_the_template(tokenizers):
    tokenizer, _ = tokenizers["bpe-llama3"]
    template = load_template(str(ASSETS / "llama-3.1-instruct.jinja"), tokenizer=tokenizer)
    ids, labels = encode_messages(CONVERSATIONS["system and two exchanges"], tokenizer, template)
    eot = tokenizer.special_tokens["<|eot_id|>"]
    runs = tokenizer.backend.decode([i for i, x in zip(ids, labels, strict=True) if x != IGNORE_INDEX],
                                    skip_special_tokens=False)
    assert runs == "It is four<|eot_id|>Six, of course<|eot_id|>"
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.bos_id) == 1 and labels[0] == IGNORE_INDEX
    assert ids.count(eot) == 5 and [x for x in labels if x == eot] == [eot, eot]  # system, 2 users unlabelled
    # Generation ends at the base's EOS and at the template's end of turn.
    assert end_of_turn_ids(tokenizer, template) == [tokenizer.special_tokens["<|end_of_text|>"], eot]


def test_train_on_last_labels_the_final_reply_only(tokenizers):
    tokenizer, _ = tokenizers["sp"]
    template = load_template("zephyr", tokenizer=tokenizer)
    messages = CONVERSATIONS["three exchanges, code and languages"]
    ids, every = encode_messages(messages, tokenizer, template)
    _, last = encode_messages(messages, tokenizer, template, train_on="last")
    labelled = [i for i, x in enumerate(last) if x != IGNORE_INDEX]
    assert tokenizer.decode([ids[i] for i in labelled]) == "You are welcome"
    assert ids[labelled[-1]] == tokenizer.eos_id and labelled == list(range(labelled[0], len(ids) - 1))
    assert every[labelled[0]:] == last[labelled[0]:]  # the final reply is labelled alike
    earlier = tokenizer.decode([ids[i] for i, x in enumerate(every[:labelled[0]]) if x != IGNORE_INDEX])
    assert earlier == "for i in range(3):\n\tprint(i)Claro: un bucle"  # and only there do they differ


def test_mistral_v03_moves_the_system_message_and_the_labels_follow(tokenizers):
    """Rendering prefixes would put the system message elsewhere: the layout comes from the whole conversation."""
    tokenizer, hf = tokenizers["bpe-mistral"]
    template = load_template(str(ASSETS / "mistral-7b-instruct-v0.3.jinja"), tokenizer=tokenizer)
    messages = CONVERSATIONS["system and two exchanges"]
    prompt = template.render(messages[:-1], add_generation_prompt=True)
    assert "[INST] You are a terse assistant\n\nAnd 3+3[/INST]" in prompt  # in the last user turn
    assert SYSTEM["content"] not in template.render(messages)  # dropped when an assistant turn ends it
    ids, labels = encode_messages(messages, tokenizer, template)
    text = tokenizer.backend.decode([i for i, x in zip(ids, labels, strict=True) if x != IGNORE_INDEX],
                                    skip_special_tokens=False)
    assert text == " It is four</s> Six, of course</s>"


def test_builtins_render_as_the_real_templates(tokenizers):
    tokenizer, _ = tokenizers["sp"]
    pairs = {"llama2": "llama-2-chat", "zephyr": "tinyllama-1.1b-chat-v1.0", "mistral": "mistral-7b-instruct-v0.3",
             "chatml": "smollm2-instruct"}
    for builtin, real in pairs.items():
        ours = load_template(builtin, tokenizer=tokenizer)
        theirs = load_template(str(ASSETS / f"{real}.jinja"), tokenizer=tokenizer)
        for messages in CONVERSATIONS.values():
            if builtin == "chatml" and messages[0]["role"] != "system":
                continue  # SmolLM2 adds its own default system message
            for generation, msgs in ((False, messages), (True, messages[:-1])):
                assert ours.render(msgs, generation) == theirs.render(msgs, generation), (builtin, msgs)
    llama3, real = load_template("llama3"), load_template(str(ASSETS / "llama-3.1-instruct.jinja"))
    head = "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: " \
           "26 Jul 2024\n\n"
    messages = CONVERSATIONS["one exchange"]
    assert real.render(messages).replace(head + "<|eot_id|>", "") == llama3.render(messages)


def test_guanaco_is_todays_encoding_for_every_tokenizer_kind(tokenizers):
    """The default template gives the ids the project trained on before templates: BOS (where the tokenizer
    adds one), then the guanaco text as one text, EOS after each reply."""
    for kind, (tokenizer, hf) in tokenizers.items():
        template = load_template("guanaco", tokenizer=tokenizer)
        messages = CONVERSATIONS["three exchanges, code and languages"]
        guanaco = "".join(f"### {'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in messages)
        ids, _ = encode_messages(messages, tokenizer, template)
        assert [i for i in ids if i != tokenizer.eos_id] == tokenizer.encode(guanaco), kind
        assert ids.count(tokenizer.eos_id) == 3
        rendered = hf.apply_chat_template(messages, chat_template=template.source, tokenize=False)
        assert hf(rendered, add_special_tokens=False)["input_ids"] == ids, kind


def test_refusals_and_edits_are_counted_not_trained_on(tokenizers):
    tokenizer, _ = tokenizers["sp"]
    messages = CONVERSATIONS["one exchange"]
    out_of_order = [messages[1], messages[0], messages[1]]
    marker = [{"role": "user", "content": "say ### Human: hi"}, messages[1]]
    edits = load_template("llama2").__class__("upper", "{% for m in messages %}{{ m['content'] | upper }}"
                                              "{{ eos_token }}{% endfor %}")
    examples, report = encode_all([messages, out_of_order], tokenizer, None, load_template("llama2"))
    assert len(examples) == 1 and report.skipped == {
        "refused by the chat template (Conversation roles must alternate user/assistant/user/assistant/...)": 1}
    _, report = encode_all([messages, marker], tokenizer, None, load_template("guanaco"))
    assert report.skipped == {
        "refused by the chat template (a turn holds a guanaco marker (### Human: or ### Assistant:))": 1}
    _, report = encode_all([messages], tokenizer, None, edits)
    assert report.skipped == {"template changes message text": 1}
    with pytest.raises(BadRow, match=r"message 1 \(user\) neither as it is nor with whitespace trimmed"):
        encode_messages(messages, tokenizer, edits)
    with pytest.raises(BadRow, match="no assistant turn"):
        encode_messages(messages[:1], tokenizer)


def test_a_template_that_leaves_out_an_empty_system_message_is_refused_saying_so(tokenizers):
    tokenizer, _ = tokenizers["sp"]
    skips = Template("skips", "{% for m in messages %}{% if m['content'] %}{{ m['role'] + ': ' + m['content'] }}"
                              "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endif %}{% endfor %}")
    messages = [{"role": "system", "content": ""}] + CONVERSATIONS["one exchange"]
    with pytest.raises(BadRow) as e:
        encode_messages(messages, tokenizer, skips)
    assert e.value.reason == "template renders an empty message differently"
    assert e.value.detail.startswith("message 1 (system) is empty, and the template renders an empty message "
                                     "otherwise than one with text")
    ids, _ = encode_messages(messages[1:], tokenizer, skips)  # without it, as the loaders give it
    assert tokenizer.decode(ids) == "user: Hi thereassistant: Hello, how can I help"


def test_special_token_text_inside_a_message_stays_text(tokenizers):
    tokenizer, hf = tokenizers["bpe-chatml"]
    template = load_template("chatml", tokenizer=tokenizer)
    messages = [{"role": "user", "content": "What does <|im_end|> mean"}, {"role": "assistant", "content": "A stop"}]
    ids, _ = encode_messages(messages, tokenizer, template)
    end = tokenizer.special_tokens["<|im_end|>"]
    assert ids.count(end) == 2  # the template's two, not the one written in the question
    assert hf(template.render(messages), add_special_tokens=False)["input_ids"].count(end) == 3  # transformers'
    _, report = encode_all([messages], tokenizer, None, template)
    assert report.notes == {SPECIAL_TEXT: 1} and report.examples == 1


def test_generation_blocks_render_their_body(tokenizers):
    tokenizer, hf = tokenizers["bpe-chatml"]
    source = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
              "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}{% else %}"
              "{{ m['content'] + '<|im_end|>' }}{% endif %}{{ '\n' }}{% endfor %}")
    path = Path(hf.name_or_path) / "generation.jinja"
    path.write_text(source)
    template = load_template(str(path), tokenizer=tokenizer)
    messages = CONVERSATIONS["one exchange"]
    assert template.render(messages) == hf.apply_chat_template(messages, chat_template=source, tokenize=False)
    ids, labels = encode_messages(messages, tokenizer, template)
    assert tokenizer.backend.decode([i for i, x in zip(ids, labels, strict=True) if x != IGNORE_INDEX],
                                    skip_special_tokens=False) == "Hello, how can I help<|im_end|>"


def test_model_template_comes_from_the_folder(folders, tmp_path):
    folder = tmp_path / "chat_model"
    shutil.copytree(folders["bpe-chatml"], folder)
    assert load_template(None, folder).name == "guanaco"  # no template: guanaco
    with pytest.raises(ValueError, match="no chat template"):
        load_template("model", folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    source = (ASSETS / "qwen2.5-instruct.jinja").read_text()
    config["chat_template"] = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": source}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_template(None, folder).source == source and load_template(None, folder).name == "model"
    (folder / "chat_template.jinja").write_text(BUILTINS["chatml"])  # transformers 5's file comes first
    assert load_template("model", folder).source == BUILTINS["chatml"]
    with pytest.raises(ValueError, match="neither a built-in"):
        load_template("chatmll", folder)
    (folder / "broken.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match="not valid Jinja"):
        load_template(str(folder / "broken.jinja"))


HOSTILE = {  # template source -> what the one-line error says went wrong
    "{{ 1/0 }}": "ZeroDivisionError: division by zero",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}": "RecursionError: maximum recursion depth exceeded",
    "{% for m in messages %}{{ m['content'] + 1 }}{% endfor %}": "TypeError: ",
    "{% include 'other.jinja' %}": "TypeError: no loader for this environment specified",
    "{% import 'other.jinja' as x %}": "TypeError: no loader for this environment specified",
    "{% for i in range(10**9) %}{% endfor %}": "OverflowError: Range too big",
    "{{ 'a' * 10**10 }}": "OverflowError: str of length 1 * 10000000000 would be longer than 10000000",
    "{{ 10 ** (10**10) }}": "OverflowError: 10 ** 10000000000 would have more than 10000000 bits",
    "": "renders no assistant message",
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}{% endif %}{% endfor %}":
        "renders no assistant message",
}


@pytest.mark.parametrize("source", HOSTILE)
def test_a_template_that_fails_to_render_is_one_line_naming_it(source, tmp_path):
    """What train.py and chat.py ask of a template first (its end-of-turn token) fails with a ValueError naming
    the template's file (a .jinja file, an adapter's, a model folder's tokenizer_config.json), never a raw
    traceback; the sandbox refuses a huge string or number before allocating it."""
    from tinyllama.templates import adapter_template
    tokenizer = Tokenizer(TOKENIZER_PATH)
    adapter, model = tmp_path / "adapter", tmp_path / "model"
    adapter.mkdir()
    model.mkdir()
    (adapter / "chat_template.jinja").write_text(source)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": source}))
    (tmp_path / "t.jinja").write_text(source)
    where = {str(tmp_path / "t.jinja"): lambda: load_template(str(tmp_path / "t.jinja"), tokenizer=tokenizer),
             str(adapter / "chat_template.jinja"): lambda: adapter_template(None, adapter, None, tokenizer)}
    if source:  # an empty chat_template in tokenizer_config.json is no template at all
        where[f"'model' ({model / 'tokenizer_config.json'})"] = lambda: load_template("model", model, tokenizer)
    for name, load in where.items():
        with pytest.raises(ValueError) as e:
            load().end_of_turn_token(tokenizer)
        message = str(e.value)
        assert message.startswith(f"chat template {name if name.startswith(chr(39)) else repr(name)} ")
        assert HOSTILE[source] in message and "\n" not in message


def test_an_unreadable_tokenizer_config_is_named(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "x",}')
    with pytest.raises(ValueError, match=rf"^{tmp_path / 'tokenizer_config.json'} is not valid JSON "
                                         r"\(Expecting property name"):
        load_template(None, tmp_path)
