"""--config FILE: YAML or JSON keyed by the flags' names, flags on the line win, a run's config.json trains the same
adapter bit for bit, --print-config is a --config of the resolved settings, every file in configs/ reads, bad files
are refused in one line before anything is made; export and chat take --config too."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import subprocess

import pytest
import torch
import yaml

import chat
import train
from helpers import ROOT, adapter_weights, metrics
from tinyllama import export
from training.settings import TrainConfig, validate, with_init_adapter, with_machine_defaults

CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def printed(capsys, argv) -> dict:
    capsys.readouterr()  # what came before (a training run's log)
    with pytest.raises(SystemExit) as e:
        train.parse_args([*argv, "--print-config"])
    assert e.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)


def refusal(capsys, argv, parse=train.parse_args) -> str:
    """The one line a bad file is refused with (status 2, as argparse refuses a bad flag)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        parse(argv)
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_keys_take_dashes_or_underscores_and_flags_override_the_file(tmp_path):
    (tmp_path / "run.yaml").write_text("rank: 8\ngrad-accum: 2\ngrad_clip: 0.5\nlr: 1e-4\ndora: true\n"
                                       "alpha: null\npacking: false\n")
    cfg = train.parse_args(["--config", str(tmp_path / "run.yaml"), "--rank", "16", "--no-dora"])
    assert (cfg.rank, cfg.grad_accum, cfg.grad_clip, cfg.lr, cfg.dora, cfg.alpha, cfg.packing) == \
        (16, 2, 0.5, 1e-4, False, None, False)  # PyYAML's `1e-4` is a string: read as the flag reads it
    assert cfg.batch_size == TrainConfig.batch_size  # what the file leaves out keeps its default
    (tmp_path / "run.json").write_text(json.dumps({"rank": 4, "targets": "all"}))
    assert dataclasses.asdict(train.parse_args(["--config", str(tmp_path / "run.json")])) == \
        dataclasses.asdict(TrainConfig(rank=4, targets="all"))


def test_every_field_of_trainconfig_can_be_set_in_a_file(tmp_path):
    """The file's keys are the dataclass's fields, whatever fields it gains: every one set to a non-default value
    comes back as set."""
    values = {}
    for f in dataclasses.fields(TrainConfig):
        kind = f.type.removesuffix(" | None")
        values[f.name] = {"bool": not f.default, "int": 7, "float": 0.25}.get(kind, f"x-{f.name}")
    (tmp_path / "all.yaml").write_text(yaml.safe_dump(values))
    assert dataclasses.asdict(train.parse_args(["--config", str(tmp_path / "all.yaml")])) == values


def test_print_config_is_the_run_config_json_and_reads_back(tmp_path, capsys, trained_run):
    trained_run(tmp_path / "first", steps=2, save_every=2)  # the run test_run_folder trains too
    saved = json.loads((tmp_path / "first" / "config.json").read_text())
    shown = printed(capsys, ["--config", str(tmp_path / "first" / "config.json")])
    assert shown == saved  # the same values, with what with_machine_defaults decided (packing), no print flag
    assert "print_config" not in shown and shown["packing"] is False
    (tmp_path / "shown.yaml").write_text(yaml.safe_dump(shown))
    assert train.parse_args(["--config", str(tmp_path / "shown.yaml")]) == TrainConfig(**saved)
    assert printed(capsys, ["--rank", "8"])["packing"] == with_machine_defaults(TrainConfig()).packing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "shown.yaml"]  # nothing made


@pytest.mark.slow
def test_a_runs_config_json_trains_the_same_adapter_bit_for_bit(tmp_path, trained_run):
    trained_run(tmp_path / "first", steps=2, save_every=2)  # the run test_run_folder trains too
    cfg = train.parse_args(["--config", str(tmp_path / "first" / "config.json"), "--out", str(tmp_path / "again")])
    train.train(cfg)
    first, again = adapter_weights(tmp_path / "first"), adapter_weights(tmp_path / "again")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert [r["loss"] for r in metrics(tmp_path / "first")] == [r["loss"] for r in metrics(tmp_path / "again")]


@pytest.mark.parametrize("text, expected", [
    ("rnak: 4\n", "unknown setting 'rnak'; did you mean 'rank'?"),
    ("grad-acum: 4\n", "unknown setting 'grad-acum'; did you mean 'grad_accum'?"),
    ("rank: four\n", "rank must be an integer, got 'four' (str)"),
    ("rank: 4.5\n", "rank must be an integer, got 4.5 (float)"),
    ("lr: true\n", "lr must be a number, got True (bool)"),
    ("lr: fast\n", "lr must be a number, got 'fast' (str)"),
    ("dora: 1\n", "dora must be true or false, got 1 (int)"),
    ("data: [a.jsonl, b.jsonl]\n", "data must be a string, got ['a.jsonl', 'b.jsonl'] (list)"),
    ("rank: null\n", "rank must be given (null is not a value for it)"),
    ("rank: 4\nmodel: [unclosed\n", "line 3: not valid YAML"),
    ("rank: 4\n  alpha: 8\n", "line 2: not valid YAML"),
    ("- rank\n", "expected a mapping of setting names to values, found a list"),
])
def test_a_bad_yaml_file_is_refused_in_one_line_naming_it(tmp_path, capsys, text, expected):
    (tmp_path / "bad.yaml").write_text(text)
    line = refusal(capsys, ["--config", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "out")])
    assert line.startswith(f"train.py: error: {tmp_path / 'bad.yaml'}")
    assert expected in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no output folder made


def test_bad_json_and_other_files_are_refused_in_one_line(tmp_path, capsys):
    (tmp_path / "bad.json").write_text('{"rank": 4,\n "lr": }\n')
    line = refusal(capsys, ["--config", str(tmp_path / "bad.json")])
    assert f"{tmp_path / 'bad.json'} line 2: not valid JSON" in line
    (tmp_path / "run.toml").write_text("rank = 4\n")
    assert "expected a .yaml, .yml or .json file" in refusal(capsys, ["--config", str(tmp_path / "run.toml")])
    assert "cannot be read" in refusal(capsys, ["--config", str(tmp_path / "missing.yaml")])
    (tmp_path / "twice.yaml").write_text("grad-accum: 2\ngrad_accum: 4\n")
    assert "'grad_accum' is set twice" in refusal(capsys, ["--config", str(tmp_path / "twice.yaml")])


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_in_configs_reads_and_prints(path, capsys):
    text = path.read_text()
    assert text.startswith("# ") and len(text.split("\n", 1)[0]) > 20  # says what it is for
    shown = printed(capsys, ["--config", str(path)])
    assert shown.keys() == {f.name for f in dataclasses.fields(TrainConfig)}
    for key, value in yaml.safe_load(text).items():
        assert shown[key.replace("-", "_")] == (float(value) if isinstance(shown[key], float) else value), key


# The shape (tinyllama.shapes) of each recipe's model: its settings are validated against it offline.
RECIPE_SHAPES = {"default.yaml": "tinyllama-1.1b", "qlora.yaml": "tinyllama-1.1b", "dora.yaml": "tinyllama-1.1b",
                 "llama-3.2-1b-chat.yaml": "llama-3.2-1b", "fsdp-2gpu.yaml": "llama-2-13b",
                 "qwen2.5-0.5b.yaml": "qwen2.5-0.5b", "dpo.yaml": "tinyllama-1.1b"}
# The settings of a recipe that name files only its user has (a pairs file, an earlier run's adapter): the test
# writes a small one of each kind (`users_file`) and passes it on the command line.
USERS_FILES = {"dpo.yaml": ("data", "init_adapter")}


def users_file(folder, setting: str) -> str:
    if setting == "data":
        path = folder / "prefs.jsonl"
        path.write_text(json.dumps({"prompt": "The sky is", "chosen": " blue.", "rejected": " green."}) + "\n")
    else:  # the adapter_config.json configs/default.yaml's run saves (validation reads no weights)
        default = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
        path = folder / "sft-adapter"
        path.mkdir()
        (path / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "base_model_name_or_path": default["model"], "r": default["rank"],
            "lora_alpha": default["alpha"], "lora_dropout": default["dropout"],
            "target_modules": ["down_proj", "gate_proj", "up_proj"]}))
    return str(path)


@pytest.mark.parametrize("name", sorted(RECIPE_SHAPES))
def test_every_recipe_passes_validation_on_its_models_shape(name, tmp_path):
    given = [word for setting in USERS_FILES.get(name, ())
             for word in (f"--{setting.replace('_', '-')}", users_file(tmp_path, setting))]
    cfg = train.parse_args(["--config", str(ROOT / "configs" / name), "--model", RECIPE_SHAPES[name], "--dry-run",
                            "--device", "cpu", *given])
    # As train.py resolves it: an initial adapter's rank, alpha and targets refused if the recipe sets others.
    cfg = with_init_adapter(with_machine_defaults(cfg))
    lora_config = validate(cfg)  # raises SystemExit naming every problem
    assert lora_config.rank == cfg.rank


def test_the_dpo_recipe_continues_the_default_runs_adapter():
    default, dpo = (yaml.safe_load((ROOT / "configs" / name).read_text()) for name in ("default.yaml", "dpo.yaml"))
    assert dpo["init_adapter"] == f"{default['out']}/adapter"
    assert dpo["model"] == default["model"] and dpo["objective"] == "dpo"


def test_the_recipes_are_the_documented_runs_each_validated():
    assert {p.name for p in CONFIGS} == set(RECIPE_SHAPES)  # a new recipe gets a shape to be validated on


def make_n(target, *words) -> list[str]:
    """The command `make TARGET WORDS` runs (without running it)."""
    # Under `make test` the parent make's flags (MAKEFLAGS, MAKELEVEL) would make this one print its directory.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    found = subprocess.run(["make", "--no-print-directory", "-n", target, *words], cwd=ROOT, env=env,
                           capture_output=True, text=True, check=True)
    return found.stdout.strip().splitlines()[-1].split()


def test_make_train_passes_the_config_and_only_the_overrides_given():
    command = functools.partial(make_n, "train")
    assert command("CONFIG=configs/qlora.yaml")[1:] == ["train.py", "--config", "configs/qlora.yaml"]
    assert command("CONFIG=configs/qlora.yaml", "RANK=16")[1:] == ["train.py", "--config", "configs/qlora.yaml",
                                                                    "--rank", "16", "--alpha", "16"]
    assert command("RANK=8")[1:] == ["train.py", "--rank", "8", "--alpha", "8"]


def test_make_eval_scores_a_base_alone_before_any_adapter_exists():
    # The walkthrough's before and after (docs/configs-and-tracking.md): the base by name, then the adapter.
    assert make_n("eval", "MODEL=TinyLlama/TinyLlama_v1.1", "TASKS=hellaswag", "ARGS=--limit 5")[1:] == [
        "eval.py", "--no-adapter", "--tasks", "hellaswag", "--model", "TinyLlama/TinyLlama_v1.1", "--limit", "5"]
    assert make_n("eval", "ADAPTER=runs/rank64/adapter", "TASKS=hellaswag")[1:] == [
        "eval.py", "--adapter", "runs/rank64/adapter", "--tasks", "hellaswag"]


def test_export_and_chat_take_their_own_flags_from_a_file(tmp_path, capsys):
    (tmp_path / "export.yaml").write_text("adapter: runs/a/adapter\nout: runs/a/merged\nmax-shard-size: 5GB\n"
                                          "dtype: bfloat16\n")
    args = export._parse(["--config", str(tmp_path / "export.yaml"), "--out", "elsewhere"])
    assert (args.adapter, args.out, args.max_shard_size, args.dtype) == ("runs/a/adapter", "elsewhere", 5 * 10**9,
                                                                         "bfloat16")
    (tmp_path / "bad-dtype.yaml").write_text("adapter: a\nout: b\ndtype: float8\n")
    assert "dtype must be one of float32, bfloat16, float16" in refusal(
        capsys, ["--config", str(tmp_path / "bad-dtype.yaml")], export._parse)
    (tmp_path / "chat.yaml").write_text("adapter: runs/a/adapter\ntemperature: 0.7\ntop_k: 40\nsystem: Be brief.\n")
    args = chat._parse(["--config", str(tmp_path / "chat.yaml"), "--top-k", "5"])
    assert (args.adapter, args.temperature, args.top_k, args.system) == ("runs/a/adapter", 0.7, 5, "Be brief.")
    (tmp_path / "typo.yaml").write_text("temprature: 0.7\n")
    assert "unknown setting 'temprature'; did you mean 'temperature'?" in refusal(
        capsys, ["--config", str(tmp_path / "typo.yaml")], chat._parse)
