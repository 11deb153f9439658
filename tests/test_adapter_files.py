"""Adapter folders as PEFT writes them: adapter_config.json diffed key for key against PEFT's, the README.md
model card's front matter against PEFT's, and PEFT adapters whose target_modules PEFT resolved from
"all-linear" (to names, or to full module paths) loading here with PEFT's logits."""

from __future__ import annotations

import json
import math
import re
import shlex
import warnings

import pytest
import torch

import lora
import train
from helpers import GUANACO_SAMPLE, TINY, LazyModule, hf_checkpoint, hf_model, metrics, run, snapshot
from lora import ALL_TARGETS, ATTENTION_TARGETS, LoRAConfig
from lora.adapter import ModelCard
from tinyllama import Llama, LlamaConfig, load_model

transformers = pytest.importorskip("transformers")
peft = LazyModule("peft")
yaml = pytest.importorskip("yaml")

# Where our adapter_config.json may differ from PEFT's for the same settings, and why (README: Adapter files).
DOCUMENTED_DIFFERENCES = {
    "target_modules": "sorted; PEFT writes them in a set's order",
    "lora_alpha": "an integer when it is one; PEFT writes 16.0 when given 16.0",
}

SETTINGS = {
    "mlp": LoRAConfig(rank=4, alpha=8, dropout=0.05),
    "attention_rslora_alpha_16.0": LoRAConfig(rank=8, alpha=16.0, dropout=0.0, targets=ATTENTION_TARGETS,
                                              use_rslora=True),
    "all_alpha_12.5": LoRAConfig(rank=2, alpha=12.5, dropout=0.1, targets=ALL_TARGETS),
    "dora": LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"), use_dora=True),
}
HUB_ID = "TinyLlama/TinyLlama_v1.1"


def _peft_model(base, config: LoRAConfig, name_or_path: str | None = None, **kwargs):
    """PEFT's model for `config` on the checkpoint `base`; `name_or_path` poses as where the base came from (a Hub
    id, without the Hub), which is what PEFT writes as base_model_name_or_path."""
    hf = hf_model(base)
    if name_or_path is not None:
        hf.config._name_or_path = hf.name_or_path = name_or_path
    settings = dict(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, use_dora=config.use_dora,
                    target_modules=list(config.targets), use_rslora=config.use_rslora, task_type="CAUSAL_LM")
    return peft.get_peft_model(hf, peft.LoraConfig(**{**settings, **kwargs}))


def _front_matter(readme) -> str:
    text = readme.read_text()
    assert text.startswith("---\n")
    return text.split("---\n")[1]


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(SETTINGS))
def test_adapter_config_is_pefts_key_for_key(tmp_path, case):
    config = SETTINGS[case]
    base = hf_checkpoint(tmp_path / "base")
    _peft_model(base, config).save_pretrained(tmp_path / "peft")
    lora.save_adapter(Llama(LlamaConfig(**TINY), lora_config=config), tmp_path / "ours", base_model=str(base))
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours_text = (tmp_path / "ours" / "adapter_config.json").read_text()
    ours = json.loads(ours_text)

    assert sorted(ours) == sorted(theirs)
    differ = {k for k in theirs if ours[k] != theirs[k] or type(ours[k]) is not type(theirs[k])}
    assert differ <= DOCUMENTED_DIFFERENCES.keys(), {k: (ours[k], theirs[k]) for k in differ}
    assert ours["target_modules"] == sorted(theirs["target_modules"])
    assert ours["lora_alpha"] == theirs["lora_alpha"]
    assert isinstance(ours["lora_alpha"], int) == float(config.alpha).is_integer()
    # PEFT's layout too (indent 2, keys sorted, no final newline): the same text, given our documented values.
    fixed = {**theirs, "target_modules": ours["target_modules"], "lora_alpha": ours["lora_alpha"]}
    assert ours_text == json.dumps(fixed, indent=2, sort_keys=True)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PEFT warns about keys its LoraConfig does not have
        read_back = peft.LoraConfig.from_pretrained(tmp_path / "ours").to_dict()
    assert read_back == peft.LoraConfig.from_pretrained(tmp_path / "peft").to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("base_name", ["hub id", "local folder", "local folder YAML must quote"])
def test_base_model_and_card_front_matter_are_pefts(tmp_path, base_name):
    base = hf_checkpoint(tmp_path / "base")
    names = {"hub id": HUB_ID, "local folder": str(base), "local folder YAML must quote": "models/my base: #1"}
    name = names[base_name]
    config = SETTINGS["mlp"]
    _peft_model(base, config, name_or_path=name).save_pretrained(tmp_path / "peft")
    lora.save_adapter(Llama(LlamaConfig(**TINY), lora_config=config), tmp_path / "ours", base_model=name)

    for folder in ("peft", "ours"):
        assert json.loads((tmp_path / folder / "adapter_config.json").read_text())["base_model_name_or_path"] == name
    theirs, ours = _front_matter(tmp_path / "peft" / "README.md"), _front_matter(tmp_path / "ours" / "README.md")
    assert yaml.safe_load(ours) == yaml.safe_load(theirs)
    assert yaml.safe_load(ours)["base_model"] == name
    if base_name != "local folder YAML must quote":  # there the two writers may quote differently
        assert ours == theirs


def test_model_card_holds_base_lora_settings_and_training(tmp_path):
    config = LoRAConfig(rank=8, alpha=16.0, dropout=0.05, targets=("q_proj", "v_proj"), use_rslora=True)
    card = ModelCard(train_data="timdettmers/openassistant-guanaco (train split)",
                     eval_data="timdettmers/openassistant-guanaco (test split)", steps=1200, train_loss=1.234567,
                     eval_loss=1.5, command="python train.py --rank 8 --alpha 16 --rslora --targets q_proj,v_proj")
    lora.save_adapter(Llama(LlamaConfig(**TINY), lora_config=config), tmp_path, base_model=HUB_ID, card=card)
    lines = (tmp_path / "README.md").read_text().splitlines()
    for line in [
        f"- Base model: {HUB_ID}", "- Rank (r): 8",
        f"- Alpha: 16 (scale alpha / sqrt(r) = {16 / math.sqrt(8):g}, rsLoRA)",
        "- Dropout: 0.05", "- Target modules: q_proj, v_proj, in every layer",
        "- Training data: timdettmers/openassistant-guanaco (train split)",
        "- Evaluation data: timdettmers/openassistant-guanaco (test split)",
        "- Steps: 1,200", "- Final train loss: 1.2346", "- Final eval loss: 1.5000", card.command,
    ]:
        assert line in lines
    llama_cpp = next(line for line in lines if "--lora-scaled" in line)
    # llama.cpp scales by SCALE * alpha / r; trained with alpha / sqrt(r), so SCALE = sqrt(r)
    assert f"`--lora-scaled ADAPTER.gguf:{math.sqrt(8):g}`" in llama_cpp


def test_minimal_model_card_without_training_facts(tmp_path):
    lora.save_adapter(Llama(LlamaConfig(**TINY), lora_config=LoRAConfig(rank=4, alpha=8)), tmp_path, base_model=HUB_ID)
    text = (tmp_path / "README.md").read_text()
    assert "- Rank (r): 4" in text and "- Alpha: 8 (scale alpha / r = 2)" in text
    assert "## Training" not in text and "--lora-scaled" not in text


def test_a_readme_save_adapter_did_not_write_is_never_replaced(tmp_path):
    model = Llama(LlamaConfig(**TINY), lora_config=LoRAConfig(rank=4, alpha=8))
    (tmp_path / "README.md").write_text("# My project\n")
    before = snapshot(tmp_path)
    with pytest.raises(FileExistsError, match="was not written by lora.save_adapter"):
        lora.save_adapter(model, tmp_path)
    assert snapshot(tmp_path) == before

    lora.save_adapter(model, tmp_path / "adapter", card=ModelCard(steps=10))
    lora.save_adapter(model, tmp_path / "adapter", card=ModelCard(steps=20))  # its own card: replaced
    text = (tmp_path / "adapter" / "README.md").read_text()
    assert "- Steps: 20" in text and "- Steps: 10" not in text


def _full_paths(layers: int, targets=ALL_TARGETS) -> set[str]:
    return {f"model.layers.{i}.{'self_attn' if t in ATTENTION_TARGETS else 'mlp'}.{t}"
            for i in range(layers) for t in targets}


def _randomize(peft_model, seed=3):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)  # B = 0 would hide a wrong mapping
    return peft_model.eval()


def _ids(seed=7):
    return torch.randint(0, TINY["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(seed))


def _assert_same_logits(base, adapter, reference):
    ours = load_model(base, lora_config=lora.read_adapter_config(adapter))
    lora.load_adapter(ours, adapter)
    with torch.no_grad():
        logits, ref_logits = ours.eval()(_ids()), reference(input_ids=_ids()).logits
        assert (logits - load_model(base)(_ids())).abs().max() > 1e-3, "the adapter had no effect"
    torch.testing.assert_close(logits, ref_logits, atol=1e-5, rtol=0)


# PEFT writes what "all-linear" resolved to as full module paths below 20 modules (2 layers x 7 projections),
# as the projection names from 20 on (3 layers).
@pytest.mark.slow
@pytest.mark.parametrize("layers,written", [(2, "full paths"), (3, "names")])
def test_peft_all_linear_adapter_loads_with_pefts_logits(tmp_path, layers, written):
    base = hf_checkpoint(tmp_path / "base", num_hidden_layers=layers)
    ref = _randomize(_peft_model(base, LoRAConfig(rank=4, alpha=8, dropout=0.0), target_modules="all-linear"))
    ref.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["target_modules"]
    assert set(saved) == (_full_paths(layers) if written == "full paths" else set(ALL_TARGETS))  # no lm_head
    assert set(lora.read_adapter_config(tmp_path / "adapter").targets) == set(ALL_TARGETS)
    _assert_same_logits(base, tmp_path / "adapter", ref)


def test_hand_written_module_paths_load_as_peft_reads_them(tmp_path):
    """Every form PEFT matches (the name, or any tail of the full path), mixed; PEFT itself loads the same file."""
    base = hf_checkpoint(tmp_path / "base")
    config = LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=("q_proj", "v_proj", "down_proj"))
    _randomize(_peft_model(base, config)).save_pretrained(tmp_path / "adapter")
    path = tmp_path / "adapter" / "adapter_config.json"
    c = json.loads(path.read_text())
    c["target_modules"] = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                           "layers.0.self_attn.v_proj", "1.self_attn.v_proj", "mlp.down_proj"]
    path.write_text(json.dumps(c))
    ref = peft.PeftModel.from_pretrained(hf_model(base), tmp_path / "adapter").eval()
    assert set(lora.read_adapter_config(tmp_path / "adapter").targets) == set(config.targets)
    _assert_same_logits(base, tmp_path / "adapter", ref)


def _with_targets(tmp_path, target_modules, layers=2):
    model = Llama(LlamaConfig(**{**TINY, "num_hidden_layers": layers}), lora_config=LoRAConfig(rank=4, alpha=8))
    lora.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "target_modules": target_modules}))
    return tmp_path


def test_paths_for_some_layers_only_are_refused(tmp_path):
    q_in_layer_0_only = ["model.layers.0.self_attn.q_proj", *_full_paths(2, ["v_proj"])]
    with pytest.raises(ValueError, match=r"adapts q_proj in layers \[0\] only, of layers 0-1"):
        lora.read_adapter_config(_with_targets(tmp_path / "a", q_in_layer_0_only))
    # Every projection in layers 0 and 1 of a 3-layer model: only the model can tell.
    adapter = _with_targets(tmp_path / "b", sorted(_full_paths(2, ["gate_proj", "up_proj", "down_proj"])), layers=2)
    model = Llama(LlamaConfig(**{**TINY, "num_hidden_layers": 3}), lora_config=lora.read_adapter_config(adapter))
    with pytest.raises(ValueError, match="for layers 0-1, but the model has 3 layers"):
        lora.load_adapter(model, adapter)


@pytest.mark.parametrize("entry", ["lm_head", "model.embed_tokens", "model.layers.0.mlp.q_proj", "proj",
                                   "base_model.model.model.layers.0.self_attn.q_proj", "model.layers.01.mlp.up_proj"])
def test_target_modules_naming_something_else_are_refused(tmp_path, entry):
    with pytest.raises(ValueError, match=re.escape(f"target_modules names '{entry}', which is not one of the")):
        lora.read_adapter_config(_with_targets(tmp_path, ["q_proj", entry]))


def test_unresolved_all_linear_means_every_projection(tmp_path):
    assert set(lora.read_adapter_config(_with_targets(tmp_path, "all-linear")).targets) == set(ALL_TARGETS)


@pytest.mark.parametrize("key,value", [
    ("lora_bias", True), ("exclude_modules", ["q_proj"]), ("layers_to_transform", 0), ("layer_replication", [[0, 1]]),
    ("use_qalora", True), ("alora_invocation_tokens", [5, 6]), ("trainable_token_indices", [3]),
    ("target_parameters", ["mlp.experts.down_proj"]), ("fan_in_fan_out", True), ("init_lora_weights", "pissa_niter_4"),
    ("init_lora_weights", "olora"),
])
def test_peft_features_we_do_not_run_are_refused(tmp_path, key, value):
    lora.save_adapter(Llama(LlamaConfig(**TINY), lora_config=LoRAConfig(rank=4, alpha=8)), tmp_path)
    path = tmp_path / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), key: value}))
    with pytest.raises(ValueError, match=re.escape(f"{key}={value!r}")):
        lora.read_adapter_config(tmp_path)


@pytest.mark.slow
def test_a_run_writes_a_card_whose_command_repeats_the_run(tmp_path, tiny_ckpt):
    summary, _ = run(tmp_path, tiny_ckpt, steps=2, eval_data=str(GUANACO_SAMPLE), rank=2, alpha=3.0)
    card = (tmp_path / "run" / "adapter" / "README.md").read_text()
    command = re.search(r"```bash\n(.*)\n```", card).group(1)
    words = shlex.split(command)
    assert words[:2] == ["python", "train.py"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert vars(train.parse_args(words[2:])) == saved  # every setting of the run, nothing else
    evals = [r for r in metrics(tmp_path / "run") if r["split"] == "eval"]
    assert f"{evals[-1]['loss']:.4f}" in card and f"{summary['last_loss']:.4f}" in card
    assert str(GUANACO_SAMPLE) in card and "Steps" in card
