"""Bad input ends `train.py` and the chat with one line saying what was expected, what was found and what to do,
and a non-zero exit, never a Python traceback (unless asked for with --debug / TRAIN_DEBUG=1)."""

from __future__ import annotations

import gzip
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

import chat
import train
from helpers import GUANACO_SAMPLE, TOKENIZER_PATH, hf_checkpoint
from training.run_folder import Totals

pytest.importorskip("transformers")


def fails(argv) -> str:
    """The message `python train.py ARGV` exits with (asserted one line, not a traceback)."""
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    message = str(e.value.code)
    assert e.value.code not in (0, None)
    assert "\n" not in message.strip(), message
    return message


def args(model, tmp_path, data=GUANACO_SAMPLE, *extra) -> list[str]:
    return ["--model", str(model), "--data", str(data), "--eval-data", "none", "--rank", "4", "--steps", "1",
            "--batch-size", "2", "--max-len", "128", "--no-samples", "--out", str(tmp_path / "run"), *extra]


def model_copy(tiny_ckpt, tmp_path, *skip) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_ckpt, folder, ignore=shutil.ignore_patterns(*skip))
    return folder


# ---- data ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("content,expected", [
    ("", "no rows (the file is empty or holds only blank lines)"),
    ("\n\n   \n", "no rows (the file is empty or holds only blank lines)"),
    (json.dumps([{"text": "### Human: hi### Assistant: hello"}]), "holds a JSON array; expected JSON Lines"),
    (json.dumps([{"text": "### Human: hi### Assistant: hello"}], indent=2), "holds a JSON array"),
    ("\n".join(GUANACO_SAMPLE.read_text().splitlines()[:1]) + "\n", "do not fill one optimizer step"),
])
def test_bad_data_files(tmp_path, tiny_ckpt, content, expected):
    data = tmp_path / "data.jsonl"
    data.write_text(content)
    assert expected in fails(args(tiny_ckpt, tmp_path, data))


def test_a_json_array_gets_advice_that_does_not_empty_the_file(tmp_path, tiny_ckpt):
    # `jq -c '.[]' array.jsonl > array.jsonl`: the shell empties array.jsonl before jq reads it.
    for name in ("array.jsonl", "array.json", "array.jsonl.gz"):
        data = tmp_path / name
        rows = json.dumps([{"text": "### Human: hi### Assistant: hello"}]).encode()
        data.write_bytes(gzip.compress(rows) if name.endswith(".gz") else rows)
        message = fails(args(tiny_ckpt, tmp_path, data))
        target = re.search(r"> ([^\s,]+)", message)[1]
        assert target == "array.lines.jsonl" and "into a new file" in message
        assert ("gunzip -c array.jsonl.gz | jq" if name.endswith(".gz") else f"jq -c '.[]' {name} >") in message


@pytest.mark.parametrize("content", [b"not gzip at all\n", "cut"], ids=["not gzip", "cut short"])
def test_an_unreadable_gzip_file_is_one_line_naming_it(tmp_path, tiny_ckpt, content):
    data = tmp_path / "data.jsonl.gz"
    whole = gzip.compress(GUANACO_SAMPLE.read_bytes())
    data.write_bytes(whole[:len(whole) // 2] if content == "cut" else content)
    message = fails(args(tiny_ckpt, tmp_path, data))
    assert f"{data} is not a readable gzip file" in message and "gzip -t data.jsonl.gz" in message


# ---- the model folder -----------------------------------------------------------------------------------------

def test_a_model_folder_without_weights(tmp_path, tiny_ckpt):
    folder = model_copy(tiny_ckpt, tmp_path, "*.safetensors")
    assert "no *.safetensors weights in" in fails(args(folder, tmp_path))
    torch.save({}, folder / "pytorch_model.bin")
    assert "PyTorch pickles ['pytorch_model.bin']; convert them to safetensors" in fails(args(folder, tmp_path))


def test_a_truncated_safetensors_file_is_named(tmp_path, tiny_ckpt):
    folder = model_copy(tiny_ckpt, tmp_path)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert f"{weights} is not a readable safetensors file" in fails(args(folder, tmp_path))


def test_a_tensor_of_the_wrong_shape(tmp_path, tiny_ckpt):
    folder = model_copy(tiny_ckpt, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))
    message = fails(args(folder, tmp_path))
    assert "does not fit its config.json" in message and "mlp.gate_proj.weight: checkpoint (64, 32)" in message


def test_a_refused_config_field(tmp_path, tiny_ckpt):
    folder = model_copy(tiny_ckpt, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": {"type": "yarn", "factor": 2.0}}))
    message = fails(args(folder, tmp_path))
    assert str(folder / "config.json") in message and "rope_scaling" in message and "not supported" in message


def test_no_tokenizer_and_tokenizer_files_that_are_not_what_they_say(tmp_path, tiny_ckpt):
    folder = model_copy(tiny_ckpt, tmp_path, "tokenizer.model")
    message = fails(args(folder, tmp_path))
    assert re.search(r"no tokenizer in .*expected tokenizer\.model .* or tokenizer\.json", message)
    bogus = tmp_path / "tokenizer.model"
    bogus.write_text('{"model": {"type": "BPE"}}')
    message = fails(args(folder, tmp_path, GUANACO_SAMPLE, "--tokenizer", str(bogus)))
    assert f"{bogus} is not a SentencePiece model" in message
    bogus = tmp_path / "tokenizer.json"
    bogus.write_text('{"model": {"type": "BPE"}}')
    message = fails(args(folder, tmp_path, GUANACO_SAMPLE, "--tokenizer", str(bogus)))
    assert str(bogus) in message and "Traceback" not in message


def test_a_model_whose_vocabulary_is_smaller_than_the_tokenizer_is_refused_at_load_time(tmp_path, monkeypatch):
    folder = hf_checkpoint(tmp_path / "small_vocab", vocab_size=128)
    shutil.copy(TOKENIZER_PATH, folder / "tokenizer.model")
    monkeypatch.setattr(train, "load_model", lambda *a, **k: pytest.fail("loaded the model before the check"))
    assert "has 32,000 tokens but the model only 128 embeddings" in fails(args(folder, tmp_path))


def test_max_len_past_the_model_positions_is_refused(tmp_path, tiny_ckpt):
    message = fails(args(tiny_ckpt, tmp_path, GUANACO_SAMPLE, "--max-len", "512"))
    assert "--max-len 512 is longer than the model's max_position_embeddings (256)" in message


def test_out_is_a_file(tmp_path, tiny_ckpt):
    (tmp_path / "run").write_text("not a folder")
    message = fails(args(tiny_ckpt, tmp_path))
    assert f"--out {tmp_path / 'run'} is a file; expected a folder" in message
    assert (tmp_path / "run").read_text() == "not a folder"


# ---- warnings that do not stop the run ------------------------------------------------------------------------

@pytest.mark.slow
def test_alpha_defaults_to_the_rank(tmp_path, tiny_ckpt):
    train.main(args(tiny_ckpt, tmp_path))
    assert json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())["lora_alpha"] == 4.0


@pytest.mark.slow
def test_a_warmup_longer_than_the_run_is_reported(tmp_path, tiny_ckpt, capsys):
    train.main(args(tiny_ckpt, tmp_path, GUANACO_SAMPLE, "--warmup", "50", "--lr", "1e-3"))
    assert "--warmup 50 is longer than the run (1 steps): the learning rate peaks at 2e-05" in capsys.readouterr().out


@pytest.mark.slow
def test_an_infinite_gradient_norm_stops_the_run_before_any_update(tmp_path, tiny_ckpt):
    # alpha 1e30: the loss stays finite (B starts at 0) but the gradient overflows; clipping would make every
    # update zero and the run would end "successfully" having learned nothing.
    with pytest.raises(train.TrainingError, match=r"gradient norm is inf .* at step 1: stopping before the update"):
        train.train(train.parse_args(args(tiny_ckpt, tmp_path, GUANACO_SAMPLE, "--alpha", "1e30", "--steps", "3")))
    assert not (tmp_path / "run" / "adapter").exists()


@pytest.mark.slow
def test_a_run_that_learned_nothing_or_blew_up_its_weights_says_so_in_the_summary(tmp_path, tiny_ckpt, capsys):
    summary = train.main(args(tiny_ckpt, tmp_path, GUANACO_SAMPLE, "--steps", "6", "--lr", "1e8", "--warmup", "0"))
    said = capsys.readouterr().out
    stuck, exploded = summary["warnings"]
    assert re.fullmatch(r"the loss was 10\.3735 on each of the last 5 steps, .*lower --lr \(or --alpha\)", stuck)
    assert exploded.startswith("the largest adapter weight is ") and "lower --lr" in exploded
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["warnings"] == summary["warnings"]
    assert all(f"warning: {w}" in said for w in summary["warnings"])
    # A slow start is not a stuck loss. Steps of 2 rows: with --grad-accum 4 every step would hold 8 of the 11
    # sample rows, whose mean loss under a random model differs by less than the flat-loss tolerance.
    for lr in ("1e-2", "1e-3"):
        healthy = train.main(args(tiny_ckpt, tmp_path / lr, GUANACO_SAMPLE, "--steps", "6", "--lr", lr,
                                  "--grad-accum", "1"))
        assert healthy["warnings"] == []
    from training import report

    assert report.health_warnings(Totals(), largest=float("nan"))[0].startswith("the largest adapter weight is nan")


def test_totals_count_the_steps_in_a_row_whose_loss_did_not_change():
    totals = Totals()
    for loss, flat in ((10.0, 0), (10.0, 1), (9.0, 0), (9.0, 1), (9.00000001, 2), (9.0, 3), (8.9, 0)):
        totals.add({"step_s": 1.0, "tokens": 1, "labelled": 1, "loss": loss})
        assert totals.flat_steps == flat


def test_every_output_folder_flag_says_what_it_keeps_and_deletes(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "0 keeps them all" in text and "only what its manifest (OUT/.run-manifest.json) lists is removed" in text


# ---- the command line: one line, exit 1, no traceback ----------------------------------------------------------

def test_the_command_line_prints_one_line_and_debug_shows_the_traceback(tmp_path, tiny_ckpt):
    """`python train.py` runs `train.main()`: what it raises is what the process prints and exits with. A
    SystemExit with a message prints just that line and exits 1, no traceback; --debug lets the error through."""
    folder = model_copy(tiny_ckpt, tmp_path, "*.safetensors")
    with pytest.raises(SystemExit) as plain:
        train.main(args(folder, tmp_path))
    assert isinstance(plain.value.code, str) and "\n" not in plain.value.code
    assert plain.value.code.startswith("train.py: error: no *.safetensors weights in")
    assert plain.value.__suppress_context__  # raised `from None`: no chained traceback either
    with pytest.raises(FileNotFoundError):
        train.main([*args(folder, tmp_path), "--debug"])


# ---- the chat -----------------------------------------------------------------------------------------------

def chat_fails(argv, capsys) -> str:
    assert chat.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_chat_on_cuda_without_a_gpu(tiny_ckpt, capsys):
    message = chat_fails(["--model", str(tiny_ckpt), "--device", "cuda", "--prompt", "hi"], capsys)
    assert "asked for CUDA, but this machine has no usable GPU" in message


@pytest.mark.slow
def test_chat_with_broken_files_names_them(tmp_path, tiny_ckpt, capsys):
    train.main(args(tiny_ckpt, tmp_path))
    capsys.readouterr()
    adapter = tmp_path / "run" / "adapter"
    weights, config = adapter / "adapter_model.safetensors", adapter / "adapter_config.json"
    base = ["--model", str(tiny_ckpt), "--adapter", str(adapter), "--prompt", "hi", "--max-new-tokens", "2"]
    good = config.read_text()
    config.write_text(good[:20])
    assert f"{config} is not a readable adapter config" in chat_fails(base, capsys)
    config.write_text(good)
    weights.write_bytes(weights.read_bytes()[:100])
    assert f"{weights} is not a readable safetensors file" in chat_fails(base, capsys)
    folder = model_copy(tiny_ckpt, tmp_path)
    (folder / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes()[:1000])
    message = chat_fails(["--model", str(folder), "--prompt", "hi"], capsys)
    assert f"{folder / 'model.safetensors'} is not a readable safetensors file" in message


def test_chat_refuses_a_tokenizer_larger_than_the_model_and_takes_a_padded_embedding_table(tmp_path, capsys):
    small = hf_checkpoint(tmp_path / "small", vocab_size=128)
    padded = hf_checkpoint(tmp_path / "padded", vocab_size=32064)  # rows past the tokenizer's: never produced
    capsys.readouterr()  # transformers' progress bars
    message = chat_fails(["--model", str(small), "--tokenizer", str(TOKENIZER_PATH), "--prompt", "hi"], capsys)
    assert "the tokenizer has 32000 tokens but the model only 128 embeddings" in message
    assert chat.main(["--model", str(padded), "--tokenizer", str(TOKENIZER_PATH), "--prompt", "hi",
                      "--max-new-tokens", "2"]) == 0
