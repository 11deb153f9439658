"""The template travels: a run trained with each built-in chat template on conversational (`messages`) data saves
it beside the adapter; chat uses it; the export writes it into tokenizer_config.json, so transformers'
`apply_chat_template` gives the project's own prompt ids on held-out messages, and generation_config.json ends
generation at the template's end-of-turn token, as the pipeline then does."""

from __future__ import annotations

import json
import shutil

import pytest

import chat
import lora
from data import encode_prompt, end_of_turn_ids, load_template
from data.dialogue import answer
from helpers import CHAT_FAMILIES, TOKENIZER_PATH, chat_family_tokenizer, hf_checkpoint, randomize_lora_b, run
from tinyllama import load_model, load_tokenizer
from tinyllama.export import export_merged
from tinyllama.templates import ADAPTER_FILE

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
# Each built-in, and the tokenizer family that has its special tokens (None: the real SentencePiece one).
FAMILY = {"guanaco": None, "llama2": None, "zephyr": None, "mistral": "mistral", "chatml": "chatml",
          "llama3": "llama3"}
HELD_OUT = [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"},
            {"role": "user", "content": "Another one"}]


def _model_folder(root, family):
    """A tiny random checkpoint with the family's tokenizer files beside it."""
    if family is None:
        folder = hf_checkpoint(root / "sp-model", seed=3, vocab_size=32000, **SMALL)
        shutil.copy(TOKENIZER_PATH, folder / "tokenizer.model")
        return folder
    tokenizer_folder = chat_family_tokenizer(root / f"{family}-tokenizer", family)
    tokenizer = load_tokenizer(tokenizer_folder)
    folder = hf_checkpoint(root / f"{family}-model", seed=3, vocab_size=tokenizer.vocab_size,
                           bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id, **SMALL)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_folder / name, folder / name)
    return folder


def _messages_file(path, system: bool):
    rows = []
    for i in range(12):
        messages = [{"role": "system", "content": "Be brief"}] if system and i % 2 else []
        messages += [{"role": "user", "content": f"What is {i} plus {i}"},
                     {"role": "assistant", "content": f"It is {2 * i}"},
                     {"role": "user", "content": "Thanks"}, {"role": "assistant", "content": "You are welcome"}]
        rows.append(json.dumps({"messages": messages}))
    path.write_text("\n".join(rows) + "\n")
    return path


def _hf_ids(hf, messages):
    out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FAMILY))
def test_a_run_with_each_builtin_exports_its_template(tmp_path, name):
    folder = _model_folder(tmp_path, FAMILY[name])
    tokenizer = load_tokenizer(folder)
    template = load_template(name, tokenizer=tokenizer)
    data = _messages_file(tmp_path / "chats.jsonl", system=name not in ("guanaco", "mistral"))
    summary, _ = run(tmp_path, folder, data=str(data), chat_template=name, steps=2)
    assert summary["last_loss"] > 0
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / ADAPTER_FILE).read_text() == template.source
    assert "chat_template" not in json.loads((adapter / "adapter_config.json").read_text())  # PEFT's keys only

    out = export_merged(adapter, tmp_path / "merged")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["chat_template"] == template.source == (out / ADAPTER_FILE).read_text()
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert _hf_ids(hf, HELD_OUT) == encode_prompt(HELD_OUT, tokenizer, template)
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    ends = end_of_turn_ids(tokenizer, template)
    assert set(ends) <= set([eos] if isinstance(eos, int) else eos)
    end_token = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}.get(name, CHAT_FAMILIES["llama2"]["eos"])
    assert ends[0] == tokenizer.eos_id and set(ends) == {tokenizer.eos_id, tokenizer.special_tokens[end_token]}
    assert len(ends) == (2 if name in ("chatml", "llama3") else 1)  # their own end-of-turn token joins EOS


@pytest.mark.slow
def test_chat_uses_the_adapters_template_and_system_prompt(tmp_path, capsys):
    folder = _model_folder(tmp_path, "llama3")
    tokenizer = load_tokenizer(folder)
    model = load_model(folder, lora_config=lora.LoRAConfig(rank=4, alpha=8.0))
    randomize_lora_b(model, std=0.5, seed=4)
    template = load_template("llama3", tokenizer=tokenizer)
    lora.save_adapter(model, tmp_path / "adapter", base_model=str(folder), chat_template=template.source)
    model.eval()
    expected = answer(model, tokenizer, "Tell me a story", max_new_tokens=8, template=template, system="Be brief")
    assert expected != answer(model, tokenizer, "Tell me a story", max_new_tokens=8, system="Be brief",
                              template=load_template("chatml", tokenizer=tokenizer))
    assert chat.main(["--adapter", str(tmp_path / "adapter"), "--prompt", "Tell me a story", "--system",
                      "Be brief", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected

    # The export, through transformers' pipeline given messages: the same greedy reply, ended where chat ends it.
    out = export_merged(tmp_path / "adapter", tmp_path / "merged")
    pipe = transformers.pipeline("text-generation", model=str(out), device="cpu")
    messages = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Tell me a story"}]
    reply = pipe(messages, max_new_tokens=8, do_sample=False)[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and reply["content"].strip() == expected


@pytest.mark.slow
def test_the_model_template_is_the_default(tmp_path):
    folder = _model_folder(tmp_path, "chatml")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = load_template("chatml").source
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    data = _messages_file(tmp_path / "chats.jsonl", system=True)
    _, every = run(tmp_path, folder, data=str(data), steps=1)
    assert (tmp_path / "run" / "adapter" / ADAPTER_FILE).read_text() == config["chat_template"]
    # --train-on last: the same batch of 4 conversations, each labelling only its final reply, "You are welcome"
    # and <|im_end|>.
    _, last = run(tmp_path, folder, "last", data=str(data), steps=1, train_on="last")
    tokenizer = load_tokenizer(folder)
    reply = len(tokenizer.encode("You are welcome", bos=False)) + 1
    assert last[0]["labelled"] == 4 * reply < every[0]["labelled"]


@pytest.mark.slow
def test_a_template_the_tokenizer_cannot_end_a_turn_with_is_refused(tmp_path):
    from training import TrainingError

    folder = _model_folder(tmp_path, None)  # Llama 2's tokenizer: <|im_end|> is text to it
    with pytest.raises(TrainingError, match="never learn where a reply ends"):
        run(tmp_path, folder, chat_template="chatml", steps=1)
    assert not (tmp_path / "run" / "adapter").exists()


def test_the_refusal_names_the_tokenizer_used_and_what_the_template_writes(tmp_path):
    import train
    from training import TrainingError
    from training.settings import TrainConfig

    tokenizer = load_tokenizer(chat_family_tokenizer(tmp_path / "llama3-tokenizer", "llama3"))  # byte-level BPE
    with pytest.raises(TrainingError) as e:
        train.chat_template(TrainConfig(chat_template="chatml"), None, tokenizer, print)
    message = str(e.value)
    assert message.startswith("the chat template chatml ends an assistant turn with '<|im_end|>\\n', which holds "
                              f"no special token of the tokenizer {tmp_path / 'llama3-tokenizer' / 'tokenizer.json'} ")
    assert "Llama 2" not in message
    assert message.endswith("of the built-ins, guanaco, llama2, llama3, zephyr, mistral")  # llama3: its <|eot_id|>


def test_template_settings_are_checked_before_anything_loads(tmp_path):
    from training.settings import TrainConfig, validate

    for settings, message in ((dict(chat_template="chatmll"), "--chat-template 'chatmll' is neither a built-in"),
                              (dict(train_on="all"), "--train-on must be one of assistant, last")):
        with pytest.raises(SystemExit, match=message):
            validate(TrainConfig(model=str(tmp_path), out=str(tmp_path / "out"), **settings))
