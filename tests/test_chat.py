"""The chat: guanaco prompts as training encoded them, history trimming, stopping at the `### Human:` marker
(with a model rigged to emit it), streaming, and the command line one-shot and interactive."""

from __future__ import annotations

import io
import shutil
import subprocess
import sys

import pytest
import torch

import chat
import lora
from data import encode_prompt
from data.dialogue import answer, conversation, fit_history
from helpers import ROOT, TOKENIZER_PATH, format_prompt, hf_checkpoint, randomize_lora_b, rig_cycle
from lora import LoRAConfig
from tinyllama import Llama, LlamaConfig, load_model, save_model
from tinyllama.generation import StopStrings, generate

# A Llama small enough to be instant but with the real vocabulary, so the real tokenizer fits.
SMALL_32K = dict(vocab_size=32000, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def _pieces(tokenizer, *pieces):
    ids = [tokenizer.sp.piece_to_id(p) for p in pieces]
    assert [tokenizer.id_to_piece(i) for i in ids] == list(pieces)
    return ids


def _hello_model(tokenizer):
    """After the prompt's final ":" it says "Hello!### Human:" and then the same again, forever."""
    cycle = _pieces(tokenizer, ":", "▁Hello", "!", "##", "#", "▁Human")
    return rig_cycle(Llama(LlamaConfig(**SMALL_32K)), cycle)


def test_prompt_is_the_guanaco_text_encoded_as_training_did(tokenizer):
    from data import Turn, encode

    turns = ["What is 2+2?", "4.", "And 3+3?"]
    assert format_prompt(turns) == "### Human: What is 2+2?### Assistant: 4.### Human: And 3+3?### Assistant:"
    assert format_prompt("  hi ") == "### Human: hi### Assistant:"
    ids = encode_prompt(conversation(turns), tokenizer)
    assert ids[0] == tokenizer.bos_id and ids.count(tokenizer.eos_id) == 1  # EOS after the earlier reply
    assert tokenizer.decode(ids) == format_prompt(turns)
    # Exactly what precedes the reply in a training sequence of the same conversation.
    train_ids, _ = encode([Turn("human", turns[0]), Turn("assistant", turns[1]), Turn("human", turns[2]),
                           Turn("assistant", "6.")], tokenizer, max_len=None)
    assert train_ids[:len(ids)] == ids and tokenizer.decode(train_ids[len(ids):]) == "6."
    assert encode_prompt(conversation("hi"), tokenizer) == tokenizer.encode("### Human: hi### Assistant:")
    with pytest.raises(ValueError, match="odd number"):
        format_prompt(["q", "a"])
    with pytest.raises(ValueError, match="guanaco marker"):  # the guanaco template refuses it
        encode_prompt(conversation("hi### Assistant: sure"), tokenizer)


def test_history_is_trimmed_from_the_oldest_exchange(tokenizer):
    turns = ["first question " * 5, "first answer " * 5, "second question", "second answer", "third?"]
    full = len(encode_prompt(conversation(turns), tokenizer))
    kept, ids = fit_history(tokenizer, turns, 10, context_len=full + 10)
    assert kept == [t.strip() for t in turns] and len(ids) == full
    kept, ids = fit_history(tokenizer, turns, 10, context_len=full + 9)
    assert kept == ["second question", "second answer", "third?"] and len(ids) + 10 <= full + 9
    assert ids == encode_prompt(conversation(kept), tokenizer)
    with pytest.raises(ValueError, match="context length"):
        fit_history(tokenizer, turns, 10, context_len=12)


def test_answer_stops_at_the_human_marker(tokenizer):
    model = _hello_model(tokenizer)
    prompt_ids = encode_prompt(conversation("hi"), tokenizer)
    free = generate(model, prompt_ids, 30, eos_id=())  # no stop: the rig really does run on past the marker
    assert tokenizer.decode(free).startswith("Hello!### Human: Hello!### Human:")

    steps = []
    model.lm_head.register_forward_hook(lambda *_: steps.append(1))  # one LM-head call per generated token
    shown = []
    assert answer(model, tokenizer, "hi", max_new_tokens=30, on_text=shown.append) == "Hello!"
    assert len(steps) == 6, "generation did not stop when ':' completed the marker"  # Hello ! ## # Human :
    assert "".join(shown) == "Hello!" and not any("#" in s for s in shown), f"streamed {shown}"


def test_a_marker_starting_inside_a_token_is_cut_exactly(tokenizer):
    # "Hi:### Human:" with the piece ":#": the text is cut at the marker, the ids before the ":#" token.
    cycle = _pieces(tokenizer, ":", "▁Hi", ":#", "##", "▁Human")
    model = rig_cycle(Llama(LlamaConfig(**SMALL_32K)), cycle)
    assert answer(model, tokenizer, "hi", max_new_tokens=30) == "Hi:"
    ids = generate(model, encode_prompt(conversation("hi"), tokenizer), 30, stop=StopStrings(tokenizer, ["### Human:"]))
    assert ids == cycle[1:2]


def _rigged_checkpoint(tmp_path, tokenizer):
    folder = save_model(_hello_model(tokenizer), tmp_path / "hello")
    shutil.copy(TOKENIZER_PATH, folder / "tokenizer.model")
    return folder


def _run_chat(*args, stdin=None):
    return subprocess.run([sys.executable, "chat.py", *map(str, args)], cwd=ROOT, input=stdin,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_one_shot_prints_the_answer_and_stops_at_the_marker(tmp_path, tokenizer):
    folder = _rigged_checkpoint(tmp_path, tokenizer)
    result = _run_chat("--model", folder, "--prompt", "hi", "--max-new-tokens", 40)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "Hello!\n"


def test_cli_one_shot_with_an_adapter_equals_answer(tmp_path, tokenizer, capsys):
    path = hf_checkpoint(tmp_path / "random", seed=11, **SMALL_32K)
    shutil.copy(TOKENIZER_PATH, path / "tokenizer.model")
    model = load_model(path, lora_config=LoRAConfig(rank=4, alpha=16, targets=lora.ALL_TARGETS))
    randomize_lora_b(model, std=1.0, seed=12)
    lora.save_adapter(model, tmp_path / "adapter")
    expected = answer(model, tokenizer, "Tell me a story.", max_new_tokens=12)
    assert expected and expected != answer(load_model(path), tokenizer, "Tell me a story.", max_new_tokens=12)

    capsys.readouterr()
    # In this process (`python chat.py` itself: test_cli_one_shot_prints_the_answer_and_stops_at_the_marker).
    assert chat.main(["--model", str(path), "--adapter", str(tmp_path / "adapter"), "--prompt", "Tell me a story.",
                      "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip() == expected
    with torch.no_grad():
        lora.merge(model)
    assert answer(model, tokenizer, "Tell me a story.", max_new_tokens=12) == expected  # merged: same answer


def test_interactive_chat_keeps_history_and_resets(tmp_path, tokenizer, monkeypatch, capsys):
    folder = _rigged_checkpoint(tmp_path, tokenizer)
    asked = []
    real_answer = chat.answer

    def spy(model, tok, turns, **kw):
        asked.append(list(turns))
        return real_answer(model, tok, turns, **kw)

    monkeypatch.setattr(chat, "answer", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\nhow are you\n\n/reset\nyo\n/exit\nnever read\n"))
    assert chat.main(["--model", str(folder), "--max-new-tokens", "20"]) == 0
    assert capsys.readouterr().out == "Hello!\n" * 3
    assert asked == [["hi"], ["hi", "Hello!", "how are you"], ["yo"]]


def test_cli_errors_are_reported_not_raised(tmp_path, tokenizer, capsys):
    folder = _rigged_checkpoint(tmp_path, tokenizer)
    assert chat.main(["--model", str(folder), "--prompt", "word " * 300]) == 2
    assert "context length" in capsys.readouterr().err
    assert chat.main(["--model", str(folder), "--merge"]) == 2
    assert "--merge needs an --adapter" in capsys.readouterr().err


def test_an_adapter_alone_runs_on_the_base_it_records(tmp_path, tokenizer, monkeypatch, capsys):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        pytest.fail(f"the Hub was asked for {args}: the adapter records a local base")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_hub)
    path = hf_checkpoint(tmp_path / "base", seed=13, **SMALL_32K)
    shutil.copy(TOKENIZER_PATH, path / "tokenizer.model")
    model = load_model(path, lora_config=LoRAConfig(rank=4, alpha=16, targets=lora.ALL_TARGETS))
    randomize_lora_b(model, std=1.0, seed=14)
    lora.save_adapter(model, tmp_path / "adapter", base_model=str(path))
    expected = answer(model, tokenizer, "Tell me a story.", max_new_tokens=12)
    assert expected and expected != answer(load_model(path), tokenizer, "Tell me a story.", max_new_tokens=12)

    assert chat.main(["--adapter", str(tmp_path / "adapter"), "--prompt", "Tell me a story.", "--max-new-tokens",
                      "12", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected + "\n"

    lora.save_adapter(model, tmp_path / "moved", base_model="no/such/base")  # a base that is not there
    assert chat.main(["--adapter", str(tmp_path / "moved"), "--prompt", "hi", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "'no/such/base' is neither an existing folder" in err and "adapter_config.json records" in err
    assert "pass --model" in err


def test_without_the_hub_the_error_names_the_hf_download_command(monkeypatch, capsys):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert chat.main(["--prompt", "hi", "--device", "cpu"]) == 2  # no --model, no --adapter: the default model
    err = capsys.readouterr().err
    assert "could not get 'TinyLlama/TinyLlama_v1.1'" in err and "(OSError: no network)" in err
    assert "`hf download TinyLlama/TinyLlama_v1.1 --local-dir DIR`" in err and "huggingface-cli" not in err
