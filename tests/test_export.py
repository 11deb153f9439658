"""The merged-model export: transformers (tokenizer, model, pipeline) and chat.py open the folder as it is and
compute what the project's model with its adapter computes; sharding as transformers writes it; the base's own
files carried unchanged; nothing written over without --overwrite, and never half a folder."""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import subprocess
import types

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import chat
import lora
from data import load_template
from data.dialogue import STOP_STRINGS, answer
from helpers import (
    GUANACO_SAMPLE,
    ROOT,
    TOKENIZER_PATH,
    format_prompt,
    hf_checkpoint,
    hf_model,
    randomize_lora_b,
    snapshot,
)
from tinyllama import files, load_model, save_model
from tinyllama.export import export_merged, main
from tinyllama.files import WriteError

transformers = pytest.importorskip("transformers")

# A Llama small enough to be instant but with the real vocabulary, so the real tokenizer and guanaco text fit.
SMALL_32K = dict(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
LORA = lora.LoRAConfig(rank=4, alpha=8, targets=lora.ALL_TARGETS)
PROMPTS = ("Tell me a story.", "What is the capital of France?")


def _rows() -> list[str]:
    return [json.loads(line)["text"] for line in GUANACO_SAMPLE.read_text().splitlines()]


def _base(path, seed):
    """A transformers-saved base with only `tokenizer.model` beside it, as `save_model` leaves one."""
    hf_checkpoint(path, seed=seed, **SMALL_32K)
    shutil.copy(TOKENIZER_PATH, path / "tokenizer.model")
    return path


def _adapted(base, seed):
    """The project's model on `base` with a random adapter (A and B both non-zero), unmerged, in eval mode."""
    model = load_model(base, lora_config=LORA)
    return randomize_lora_b(model, std=0.5, seed=seed).eval()


def _ids(tokenizer, n_rows=2, length=64):
    return torch.tensor([tokenizer.encode(row)[:length] for row in _rows()[:n_rows]])


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A base, an adapter trained on it (random B), and its export with every default."""
    tmp = tmp_path_factory.mktemp("export")
    base = _base(tmp / "base", seed=1)
    model = _adapted(base, seed=2)
    lora.save_adapter(model, tmp / "adapter", base_model=str(base))
    out = export_merged(tmp / "adapter", tmp / "merged")
    return types.SimpleNamespace(base=base, adapter=tmp / "adapter", out=out, model=model)


# ---- transformers opens it as it is -----------------------------------------------------------------------------

def test_the_folder_holds_a_whole_checkpoint_with_the_tokenizer_settings_written(exported):
    assert sorted(p.name for p in exported.out.iterdir()) == [
        "chat_template.jinja", "config.json", "generation_config.json", "model.safetensors",
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    assert (exported.out / "tokenizer.model").read_bytes() == TOKENIZER_PATH.read_bytes()
    # The base's dtype, the default: float32, recorded as such.
    assert json.loads((exported.out / "config.json").read_text())["torch_dtype"] == "float32"
    assert {t.dtype for t in load_file(exported.out / "model.safetensors").values()} == {torch.float32}
    # The base (saved by transformers) has its own generation settings: carried as they are.
    assert json.loads((exported.out / "generation_config.json").read_text()) == json.loads(
        (exported.base / "generation_config.json").read_text())
    left = sorted(p.name for p in exported.out.parent.glob(".merged.*"))
    assert left == [".merged.lock"], "a temporary folder was left behind"  # the lock file stays, as a run's does


@pytest.mark.slow
def test_transformers_tokenizer_gives_the_project_ids_on_every_guanaco_row(exported, tokenizer):
    hf = transformers.AutoTokenizer.from_pretrained(exported.out)
    assert (hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (1, 2, 0) and len(hf) == tokenizer.vocab_size
    rows = _rows()
    assert len(rows) == 11
    for row in rows:
        ids = tokenizer.encode(row)
        assert ids[0] == tokenizer.bos_id
        assert hf(row)["input_ids"] == ids, row[:60]
        assert hf.decode(ids, skip_special_tokens=True) == row


def test_transformers_logits_equal_the_project_model_with_its_adapter_unmerged(exported, tokenizer):
    ids = _ids(tokenizer)
    with torch.no_grad():
        ours = exported.model(ids)
        with lora.disabled(exported.model):
            base = exported.model(ids)
        theirs = hf_model(exported.out)(ids).logits
    assert (ours - base).abs().max() > 1e-2, "the adapter changes nothing: the test would prove nothing"
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


def test_a_dora_adapter_exports_to_the_same_logits(exported, tmp_path, tokenizer):
    model = load_model(exported.base, lora_config=lora.LoRAConfig(rank=4, alpha=8, targets=lora.ALL_TARGETS,
                                                            use_dora=True))
    randomize_lora_b(model, std=0.5, seed=3).eval()
    lora.save_adapter(model, tmp_path / "dora", base_model=str(exported.base))
    lines = []
    out = export_merged(tmp_path / "dora", tmp_path / "merged", log=lines.append)
    targets = ", ".join(sorted(lora.ALL_TARGETS))
    assert lines[0] == f"merging {tmp_path / 'dora'} into {exported.base} (DoRA, r=4, alpha=8, {targets})"
    ids = _ids(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(ids).logits, model(ids), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_pipeline_greedy_text_equals_the_project_chat_answer(exported, tokenizer, prompt):
    expected = answer(exported.model, tokenizer, prompt, max_new_tokens=16)
    pipe = transformers.pipeline("text-generation", model=str(exported.out))
    text = pipe(format_prompt(prompt), max_new_tokens=16, do_sample=False, return_full_text=False)
    text = text[0]["generated_text"]
    for marker in STOP_STRINGS:  # where chat ends a reply; the pipeline knows nothing of guanaco
        text = text.split(marker)[0]
    assert expected and text.strip() == expected


def test_chat_opens_the_export_without_a_tokenizer_flag(exported, tokenizer, capsys):
    expected = answer(exported.model, tokenizer, PROMPTS[0], max_new_tokens=16)
    assert chat.main(["--model", str(exported.out), "--prompt", PROMPTS[0], "--max-new-tokens", "16",
                      "--device", "cpu"]) == 0
    assert capsys.readouterr().out == expected + "\n"


# ---- the base's own files -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_base_with_its_own_tokenizer_files_keeps_them_byte_for_byte(exported, tmp_path, tokenizer):
    # What transformers 5 itself saves for this tokenizer: tokenizer.json and a tokenizer_config.json of its own.
    saved = tmp_path / "saved"
    transformers.AutoTokenizer.from_pretrained(exported.out).save_pretrained(saved)
    base = tmp_path / "base"
    shutil.copytree(exported.base, base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(saved / name, base / name)
    (base / "generation_config.json").unlink()  # and none of these: the config's BOS and EOS ids are written

    out = export_merged(exported.adapter, tmp_path / "merged", base)
    for name in ("tokenizer.model", "tokenizer.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    # tokenizer_config.json gains the adapter's chat template (guanaco: it records none), nothing else changes.
    config, base_config = (json.loads((f / "tokenizer_config.json").read_text()) for f in (out, base))
    assert config == {**base_config, "chat_template": load_template("guanaco", tokenizer=tokenizer).source}
    assert not (out / "special_tokens_map.json").exists()  # the base's tokenizer files are a set: none added
    generation = transformers.GenerationConfig.from_pretrained(out)
    assert (generation.bos_token_id, generation.eos_token_id) == (1, 2)
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for row in _rows():
        assert hf(row)["input_ids"] == tokenizer.encode(row), row[:60]


@pytest.mark.slow
def test_an_export_from_a_hub_base_carries_its_tokenizer_and_generation_files(exported, tmp_path, monkeypatch,
                                                                               tokenizer):
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    repo = tmp_path / "hub" / "TinyLlama-ish"  # a Hub repo as TinyLlama_v1.1 lays it out, and more
    shutil.copytree(exported.base, repo)
    special = {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    (repo / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": {"__type": "AddedToken", **special},
        "clean_up_tokenization_spaces": False, "eos_token": "</s>", "legacy": False, "model_max_length": 2048,
        "pad_token": None, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        "unk_token": "<unk>"}, indent=4))
    (repo / "special_tokens_map.json").write_text('{"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}')
    (repo / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2, "max_length": 2048, '
                                                 '"pad_token_id": 0}')
    (repo / "README.md").write_text("model card")
    (repo / "pytorch_model.bin").write_bytes(b"pickle")
    fetched = tmp_path / "snapshot"

    def snapshot_download(repo_id, allow_patterns):
        assert repo_id == "someone/tinyllama-ish"
        for name in filter_repo_objects(sorted(p.name for p in repo.iterdir()), allow_patterns=allow_patterns):
            fetched.mkdir(exist_ok=True)
            shutil.copy(repo / name, fetched / name)
        return str(fetched)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    adapter = tmp_path / "adapter"
    lora.save_adapter(exported.model, adapter, base_model="someone/tinyllama-ish")
    out = export_merged(adapter, tmp_path / "merged")

    assert sorted(p.name for p in fetched.iterdir()) == sorted(
        p.name for p in repo.iterdir() if p.name not in ("README.md", "pytorch_model.bin"))
    for name in ("tokenizer.model", "special_tokens_map.json"):
        assert (out / name).read_bytes() == (repo / name).read_bytes(), name
    config, base_config = (json.loads((f / "tokenizer_config.json").read_text()) for f in (out, repo))
    assert config == {**base_config, "chat_template": load_template("guanaco", tokenizer=tokenizer).source}
    assert json.loads((out / "generation_config.json").read_text()) == json.loads(
        (repo / "generation_config.json").read_text())
    hf = transformers.AutoTokenizer.from_pretrained(out)
    assert [hf(row)["input_ids"] for row in _rows()] == [tokenizer.encode(row) for row in _rows()]


@pytest.mark.slow
def test_the_default_base_is_the_one_the_adapter_records(exported, tmp_path, tokenizer):
    other = _base(tmp_path / "other", seed=5)
    ids = _ids(tokenizer, n_rows=1)
    recorded = load_model(export_merged(exported.adapter, tmp_path / "recorded")).eval()
    chosen = load_model(export_merged(exported.adapter, tmp_path / "chosen", other)).eval()
    on_other = load_model(other, lora_config=LORA)
    lora.load_adapter(on_other, exported.adapter)
    with torch.no_grad():
        torch.testing.assert_close(recorded(ids), exported.model(ids), atol=1e-5, rtol=0)
        torch.testing.assert_close(chosen(ids), on_other.eval()(ids), atol=1e-5, rtol=0)
        assert (chosen(ids) - recorded(ids)).abs().max() > 1e-2


def test_the_default_dtype_is_the_one_the_base_records(exported, tmp_path):
    base = save_model(load_model(exported.base), tmp_path / "bf16", torch.bfloat16)
    shutil.copy(TOKENIZER_PATH, base / "tokenizer.model")
    out = export_merged(exported.adapter, tmp_path / "merged", base)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert {t.dtype for t in load_file(out / "model.safetensors").values()} == {torch.bfloat16}


# ---- sharding -----------------------------------------------------------------------------------------------

def test_sharded_export_is_laid_out_as_transformers_does_and_loads_in_both(exported, tmp_path, tokenizer):
    limit = 20_000  # bytes: the embeddings get a shard each, the layers are spread over several
    out = export_merged(exported.adapter, tmp_path / "sharded", max_shard_size=limit)
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n >= 4 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads((out / "model.safetensors.index.json").read_text())
    held, sizes, params = {}, {}, 0
    for name in shards:
        with safe_open(str(out / name), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        held.update(dict.fromkeys(tensors, name))
        sizes[name] = sum(t.numel() * t.element_size() for t in tensors.values())
        params += sum(t.numel() for t in tensors.values())
        assert sizes[name] <= limit or len(tensors) == 1, f"{name} holds {sizes[name]} bytes"
    assert index["weight_map"] == held
    assert index["metadata"] == {"total_parameters": params, "total_size": sum(sizes.values())}

    # transformers' own save of the same weights with the same limit: the same index metadata and keys.
    reference = hf_model(out)
    reference.save_pretrained(tmp_path / "reference", max_shard_size=limit)
    theirs = json.loads((tmp_path / "reference" / "model.safetensors.index.json").read_text())
    assert theirs["metadata"] == index["metadata"] and theirs["weight_map"].keys() == index["weight_map"].keys()

    ids = _ids(tokenizer)
    with torch.no_grad():
        expected = exported.model(ids)
        torch.testing.assert_close(reference(ids).logits, expected, atol=1e-5, rtol=0)
        assert torch.equal(load_model(out)(ids), load_model(exported.out)(ids))  # the same weights, exactly


def test_save_model_removes_weight_files_an_earlier_save_left_behind(exported, tmp_path):
    # A stale index would make every loader read the old shards instead of the new model.safetensors.
    merged = load_model(exported.out)
    folder = save_model(merged, tmp_path / "m", max_shard_size=20_000)
    (folder / "notes.txt").write_text("mine")
    assert (folder / "model.safetensors.index.json").is_file()
    save_model(merged, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "generation_config.json",
                                                         "model.safetensors", "notes.txt"]


# ---- the command line, and what it never does -------------------------------------------------------------------

def test_cli_writes_the_dtype_and_shards_asked_for(exported, tmp_path, capsys):
    from tinyllama import export

    out = tmp_path / "bf16"
    # `python -m tinyllama.export` exits with what main() returns.
    assert export.main(["--adapter", str(exported.adapter), "--out", str(out), "--dtype", "bfloat16",
                        "--max-shard-size", "1MB"]) == 0
    # A plain LoRA adapter is named by its settings alone (a DoRA one says DoRA first).
    assert f"merging {exported.adapter} into {exported.base} (r=4, alpha=8, " in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    written = {}
    for shard in sorted(out.glob("model-*.safetensors")):
        written.update(load_file(shard))
    assert len(list(out.glob("model-*.safetensors"))) == 3  # embed_tokens (2 MB), lm_head (2 MB), the rest
    float32 = load_file(exported.out / "model.safetensors")
    assert written.keys() == float32.keys()
    for key, t in float32.items():  # the float32 merge, rounded once
        assert torch.equal(written[key], t.to(torch.bfloat16)), key


def test_a_folder_holding_other_files_is_refused_even_with_overwrite(exported, tmp_path, capsys):
    out = tmp_path / "merged"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "model.safetensors").write_bytes(b"not a model")
    before = snapshot(out)
    for overwrite in ([], ["--overwrite"]):
        assert main(["--adapter", str(exported.adapter), "--out", str(out), *overwrite]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert "holds files an export does not write (notes.txt, sub)" in err and "pick a new or empty --out" in err
        assert snapshot(out) == before

    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["--adapter", str(exported.adapter), "--out", str(empty)]) == 0
    assert snapshot(empty) == snapshot(exported.out)


def test_overwrite_replaces_an_earlier_export_whole_and_the_result_loads(exported, tmp_path, capsys, tokenizer):
    # An earlier sharded export: every one of its files (shards, index) is an export's, so all may go.
    out = export_merged(exported.adapter, tmp_path / "merged", max_shard_size=20_000)
    assert (out / "model.safetensors.index.json").is_file() and len(list(out.glob("model-*.safetensors"))) >= 4
    before = snapshot(out)
    assert main(["--adapter", str(exported.adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "already holds an export (chat_template.jinja, config.json, generation_config.json, model-00001-of-" in err
    assert "pass --overwrite (make export: OVERWRITE=1) to replace it" in err
    assert snapshot(out) == before

    assert main(["--adapter", str(exported.adapter), "--out", str(out), "--overwrite"]) == 0
    assert snapshot(out) == snapshot(exported.out)  # no stale shard or index left to be read instead
    ids = _ids(tokenizer, n_rows=1)
    with torch.no_grad():
        torch.testing.assert_close(load_model(out)(ids), exported.model(ids), atol=1e-5, rtol=0)


# What people keep in folders that an --out typo could name: a home folder, a project checkout.
USER_FILES = {"home": {".bashrc": b"alias ll='ls -l'\n", "docs/thesis.tex": b"\\chapter{Four years}\n"},
              "checkout": {".git/HEAD": b"ref: refs/heads/main\n", "train.py": b"print('mine')\n"}}


@pytest.mark.parametrize("kind", USER_FILES)
def test_overwrite_never_deletes_files_an_export_does_not_write(exported, tmp_path, kind, capsys):
    out = tmp_path / "merged"
    shutil.copytree(exported.out, out)  # an earlier export, and the user's own files beside it
    for name, data in USER_FILES[kind].items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    before = snapshot(out)
    assert main(["--adapter", str(exported.adapter), "--out", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --out ") and err.count("\n") == 1, err
    if kind == "home":
        assert "holds files an export does not write (.bashrc, docs)" in err
    else:
        assert "is a git checkout (it holds .git)" in err and "pass a folder of its own" in err
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged"]  # no temporary folder either


@pytest.fixture
def refused_first(monkeypatch):
    """Reading the base or writing OUT fails the test: the refusals that use it come before both."""
    import tinyllama.export

    def never(*args, **kwargs):
        pytest.fail("the export went on past the check of --out")

    for name in ("resolve_checkpoint", "load_model", "write_dir"):
        monkeypatch.setattr(tinyllama.export, name, never)


@pytest.mark.parametrize("where", [".", "home", "/", "project root", "symbolic link"])
def test_out_may_never_be_a_folder_of_the_user_s_own(exported, tmp_path, monkeypatch, where, capsys, refused_first):
    # Each folder holds only an earlier export (where one can), so only the rule about the path itself refuses it.
    folder = tmp_path / "work"
    shutil.copytree(exported.out, folder)
    expected = {".": "the current directory", "home": "your home folder", "/": "the filesystem root",
                "project root": "this project's checkout", "symbolic link": "is a symbolic link"}[where]
    if where == ".":
        monkeypatch.chdir(folder)
        out = "."
    elif where == "home":
        monkeypatch.setenv("HOME", str(folder))
        out = str(folder)
    elif where == "symbolic link":
        out = str(tmp_path / "link")
        (tmp_path / "link").symlink_to(folder, target_is_directory=True)
    else:
        out = {"/": "/", "project root": str(ROOT)}[where]
    before = snapshot(folder)
    assert main(["--adapter", str(exported.adapter), "--out", out, "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --out {out} ") and err.count("\n") == 1, err
    assert expected in err
    assert snapshot(folder) == before
    assert (ROOT / "train.py").is_file() and (ROOT / "tinyllama" / "export.py").is_file()


@pytest.mark.parametrize("target", ["adapter", "base", "parent of the adapter"])
def test_out_may_never_replace_what_the_export_reads(exported, target, capsys):
    out = {"adapter": exported.adapter, "base": exported.base, "parent of the adapter": exported.adapter.parent}
    before = snapshot(exported.adapter.parent)
    assert main(["--adapter", str(exported.adapter), "--out", str(out[target]), "--overwrite"]) == 2
    assert "which the export reads; pick another --out" in capsys.readouterr().err
    assert snapshot(exported.adapter.parent) == before


def test_a_failed_write_leaves_the_earlier_export_whole(exported, tmp_path, monkeypatch):
    import tinyllama.checkpoint

    out = tmp_path / "merged"
    shutil.copytree(exported.out, out)
    before = snapshot(out)

    def full(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a shard")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tinyllama.checkpoint, "save_file", full)
    with pytest.raises(WriteError, match=r"could not write .*merged .*No space left on device.*disk full"):
        export_merged(exported.adapter, out, overwrite=True)
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".merged.lock", "merged"]  # no temporary folder left


def test_make_export_passes_its_arguments(tmp_path):
    if shutil.which("make") is None:
        pytest.skip("no make on this machine")
    dry = ["make", "--no-print-directory", "-n", "export", "PY=python", "ADAPTER=runs/r/adapter", "OUT=runs/r/merged"]
    result = subprocess.run(dry + ["MODEL=base", "ARGS=--dtype float16"], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == ("python -m tinyllama.export --adapter runs/r/adapter --out "
                                              "runs/r/merged --model base --dtype float16")
    for overwrite, flag in (("OVERWRITE=1", " --overwrite"), ("OVERWRITE=0", "")):
        result = subprocess.run(dry + [overwrite, "ARGS=--dtype float16"], cwd=ROOT, capture_output=True, text=True,
                                timeout=60)
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines()[-1] == ("python -m tinyllama.export --adapter runs/r/adapter --out "
                                                  f"runs/r/merged{flag} --dtype float16")
    result = subprocess.run(dry[:-1], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and "make export needs ADAPTER=<adapter folder> and OUT=" in result.stderr


def test_a_second_export_to_the_same_folder_is_refused_with_the_holder_s_pid(exported, tmp_path, capsys):
    out = tmp_path / "merged"
    with files.lock(tmp_path, print, name=".merged.lock"):  # what a first export, still running, holds
        assert main(["--adapter", str(exported.adapter), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: {out} is in use by another run or export (process {os.getpid()} on "
                   f"{socket.gethostname()}; lock {tmp_path / '.merged.lock'}); wait for it to end or pick another "
                   "--out\n")
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == [".merged.lock"]
