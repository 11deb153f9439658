"""Inputs with no bound or no time limit, and inputs that were taken silently (issue 32, items 17-22): each is
refused in seconds with one line naming what was wrong, or read as its writer meant."""

from __future__ import annotations

import codecs
import dataclasses
import gzip
import json
import shutil
import time
from collections import Counter

import pytest
from test_errors import args, fails

import train
from data import load_conversations
from data.sources import source_problems
from helpers import GUANACO_SAMPLE
from tinyllama.checkpoint import load_model, model_config
from tinyllama.templates import BUILTINS, RenderTimeout, Template, load_template
from tinyllama.tokenizer import read_tokenizer_config
from training.settings import TrainConfig, rank_warning

NEVER_ENDS = "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}"
HI = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


# ---- 17: a render that never ends ----------------------------------------------------------------------------

@pytest.mark.parametrize("source", [NEVER_ENDS, NEVER_ENDS.replace("x", ""),  # a loop that writes nothing
                                    "{% macro f(n) %}{% for i in range(100000) %}{{ f(n + 1) if n < 2 else '' }}"
                                    "{% endfor %}{% endmacro %}{{ f(0) }}"],
                         ids=["nested loops", "silent loops", "macro"])
def test_a_render_that_takes_too_long_is_stopped_naming_the_template(source):
    template = Template("loops.jinja", source, timeout=0.3)
    start = time.monotonic()
    with pytest.raises(RenderTimeout, match=r"^chat template 'loops.jinja' took longer than 0.3 s to render one "
                                            r"conversation .*--template-timeout$"):
        template.render(HI)
    assert time.monotonic() - start < 1.5
    assert Template("ok", "{% for m in messages %}{{ m['content'] }}{% endfor %}", timeout=0.3).render(HI) \
        == "hihello"  # the deadline is per render: the next one starts afresh


def test_train_stops_on_a_template_that_never_ends(tmp_path, tiny_ckpt):
    jinja = tmp_path / "loops.jinja"
    jinja.write_text(NEVER_ENDS)
    message = fails(args(tiny_ckpt, tmp_path, GUANACO_SAMPLE, "--chat-template", str(jinja),
                         "--template-timeout", "0.3"))
    assert message == (f"train.py: error: chat template {str(jinja)!r} took longer than 0.3 s to render one "
                       "conversation (a loop that never ends?): fix the template, or allow more time with "
                       "--template-timeout")
    assert "--template-timeout must be a finite number of seconds > 0, got 0.0" in fails(
        args(tiny_ckpt, tmp_path, GUANACO_SAMPLE, "--template-timeout", "0"))


# ---- 18: a config.json that claims more layers than the weights hold -----------------------------------------

def test_a_config_claiming_more_layers_than_the_weights_fails_in_seconds(tmp_path, tiny_ckpt):
    model = tmp_path / "model"
    shutil.copytree(tiny_ckpt, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 100000}))
    start = time.monotonic()
    message = fails(args(model, tmp_path))
    assert time.monotonic() - start < 10  # building 100,000 layers took minutes
    assert message == (f"train.py: error: checkpoint {model} does not fit its config.json: num_hidden_layers is "
                       "100000, but the weights hold 2 layers (model.layers.0 to model.layers.1); set "
                       f"num_hidden_layers to 2 in {model / 'config.json'}, or use the weights written with this "
                       "config (--debug shows where it was raised)")
    with pytest.raises(ValueError, match=r"num_hidden_layers is 100000, but the weights hold 2 layers"):
        load_model(model)


# ---- 19: counts that do not fit their use ----------------------------------------------------------------------

@pytest.mark.parametrize("flags,expected", [
    (["--grad-accum", "99999999999999999999"], "--grad-accum must be <= 65536, got 99999999999999999999"),
    (["--batch-size", "99999999999999999999"], "--batch-size must be <= 65536, got 99999999999999999999"),
    (["--batch-size", "512", "--grad-accum", "256"],
     "--batch-size 512 x --grad-accum 256 = 131072 rows per optimizer step (per process); at most 65536 are "
     "supported: lower either"),
    (["--max-len", "99999999999999999999"], "--max-len must be <= 1048576, got 99999999999999999999"),
    (["--rank", "99999999999999999999"], "rank must be an integer from 1 to 65536, got 99999999999999999999"),
    (["--steps", "99999999999999999999"], "--steps 99999999999999999999 does not fit in 64 bits"),
], ids=["grad-accum", "batch-size", "rows per step", "max-len", "rank", "steps"])
def test_counts_past_their_use_are_refused(tmp_path, tiny_ckpt, flags, expected):
    with pytest.raises(SystemExit) as e:  # a line per problem: a --max-len this long is past the positions too
        train.main(args(tiny_ckpt, tmp_path, "random", *flags))
    message = str(e.value.code)
    assert message.startswith("train.py: invalid settings:") and expected in message
    assert not (tmp_path / "run").exists()


# ---- 20: one file named through two paths ------------------------------------------------------------------------

def test_one_file_named_through_two_paths_is_refused(tmp_path, monkeypatch):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    data = tmp_path / "x" / "a.jsonl"
    data.write_text(GUANACO_SAMPLE.read_text())
    (tmp_path / "y" / "link.jsonl").symlink_to(data)
    other = tmp_path / "x" / "b.jsonl"
    other.write_text(GUANACO_SAMPLE.read_text())  # equal bytes, another file: allowed
    monkeypatch.chdir(tmp_path / "x")
    assert source_problems("a.jsonl,b.jsonl") == []
    assert source_problems("a.jsonl,../x/a.jsonl:2,b.jsonl,../y/link.jsonl") == [
        "--data: 'a.jsonl' and '../x/a.jsonl' are the same file; name it once, with a weight (e.g. a.jsonl:2) to "
        "use it more",
        "--data: 'a.jsonl' and '../y/link.jsonl' are the same file; name it once, with a weight (e.g. a.jsonl:2) to "
        "use it more"]
    assert source_problems("a.jsonl,../x/a.jsonl", "--eval-data") == [
        "--eval-data: 'a.jsonl' and '../x/a.jsonl' are the same file; name it once, with a weight (e.g. a.jsonl:2) "
        "to use it more"]


def test_train_refuses_one_file_named_twice(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.chdir(GUANACO_SAMPLE.parent)
    message = fails(args(tiny_ckpt, tmp_path, f"{GUANACO_SAMPLE.name},../{GUANACO_SAMPLE.parent.name}/"
                                              f"{GUANACO_SAMPLE.name}"))
    assert message == (f"train.py: invalid settings: --data: {GUANACO_SAMPLE.name!r} and "
                       f"'../{GUANACO_SAMPLE.parent.name}/{GUANACO_SAMPLE.name}' are the same file; name it once, "
                       f"with a weight (e.g. {GUANACO_SAMPLE.name}:2) to use it more")


# ---- 21: a UTF-8 byte-order mark -----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["data.jsonl", "data.jsonl.gz"])
def test_a_byte_order_mark_is_not_part_of_the_first_row(tmp_path, name):
    text = GUANACO_SAMPLE.read_bytes()
    path = tmp_path / name
    body = codecs.BOM_UTF8 + text
    path.write_bytes(gzip.compress(body) if name.endswith(".gz") else body)
    plain = load_conversations(GUANACO_SAMPLE, verbose=False)
    marked = load_conversations(path, verbose=False)
    assert marked.report.skipped == Counter() and list(marked) == list(plain)


def test_a_byte_order_mark_before_a_json_array_still_gets_its_advice(tmp_path):
    path = tmp_path / "array.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps([{"text": "### Human: hi### Assistant: hello"}]).encode())
    with pytest.raises(ValueError, match="holds a JSON array; expected JSON Lines"):
        load_conversations(path, verbose=False)


def test_config_and_template_files_with_a_byte_order_mark(tmp_path, hf_tiny):
    config = hf_tiny / "config.json"
    config.write_bytes(codecs.BOM_UTF8 + config.read_bytes())
    assert model_config(hf_tiny).hidden_size == 64
    jinja = tmp_path / "t.jinja"
    jinja.write_bytes(codecs.BOM_UTF8 + BUILTINS["chatml"].encode())
    assert load_template(str(jinja)).source == BUILTINS["chatml"]
    settings = tmp_path / "tokenizer_config.json"
    settings.write_bytes(codecs.BOM_UTF8 + json.dumps({"chat_template": BUILTINS["zephyr"]}).encode())
    assert read_tokenizer_config(settings) == {"chat_template": BUILTINS["zephyr"]}


# ---- 22: a tokenizer_config.json chat_template of the wrong kind -----------------------------------------------

@pytest.mark.parametrize("value,expected", [
    (5, "chat_template must be Jinja source (a string), or a list of {name, template} with one named 'default'; "
        "found int 5. Correct the file, or pass --chat-template with a built-in or a .jinja file"),
    ({"default": "x"}, "chat_template must be Jinja source (a string), or a list of {name, template} with one "
                       "named 'default'; found dict {'default': 'x'}."),
    ([{"name": "tool_use", "template": "x"}, {"name": "rag", "template": "y"}],
     "chat_template is a list of named templates ('tool_use', 'rag') with none named 'default', so which to use is "
     "not said; pass --chat-template with a .jinja file holding the one you want, or a built-in"),
    ([{"name": "default", "template": ["x"]}], "found list ['x']"),
])
def test_a_chat_template_of_the_wrong_kind_is_refused_naming_the_file(tmp_path, value, expected):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": value}))
    for call in (lambda: load_template(None, tmp_path), lambda: load_template("model", tmp_path)):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value).startswith(f"{config}: ") and expected in str(e.value)
    assert load_template("chatml", tmp_path).name == "chatml"  # the way out the message gives


def test_a_list_of_named_templates_uses_the_default_one(tmp_path):
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({"chat_template": [{"name": "tool_use", "template": "x"},
                                                    {"name": "default", "template": BUILTINS["chatml"]}]}))
    assert load_template(None, tmp_path).source == BUILTINS["chatml"]
    for none in (None, ""):  # the model ships no template: guanaco, as before
        config.write_text(json.dumps({"chat_template": none}))
        assert load_template(None, tmp_path).name == "guanaco"


def test_train_refuses_a_chat_template_of_the_wrong_kind(tmp_path, tiny_ckpt):
    model = tmp_path / "model"
    shutil.copytree(tiny_ckpt, model)
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": 5}))
    assert fails(args(model, tmp_path)) == (
        f"train.py: error: {model / 'tokenizer_config.json'}: chat_template must be Jinja source (a string), or a "
        "list of {name, template} with one named 'default'; found int 5. Correct the file, or pass --chat-template "
        "with a built-in or a .jinja file")


def test_a_rank_past_a_targeted_layer_is_warned_about(tiny_ckpt):
    config = model_config(tiny_ckpt)  # hidden 32, MLP 64, 2 k/v heads of 8
    settings = TrainConfig(model=str(tiny_ckpt), rank=40)
    assert rank_warning(settings, config) == (
        "--rank 40 is larger than gate_proj's smaller side (32 in, 64 out): no LoRA product there can have that "
        "rank, so the rest costs memory and compute for nothing; --rank 32 reaches as far")
    assert rank_warning(dataclasses.replace(settings, targets="q_proj,k_proj"), config).startswith(
        "--rank 40 is larger than k_proj's smaller side (32 in, 16 out)")
    assert rank_warning(dataclasses.replace(settings, rank=32), config) is None
