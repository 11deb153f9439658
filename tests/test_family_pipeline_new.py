"""The whole pipeline on Qwen 2.5 and 3, Gemma 2 and 3 (text) and Phi-3: a tiny random checkpoint of each (odd
widths, an explicit head_dim where the family has one, a sliding window shorter than the rows) with a tokenizer
beside it (a Qwen-like byte-level BPE, the Llama 2 SentencePiece model for the others) trains with
`train.py` on the guanaco sample with the held-out eval, chats (`chat.py` = `data.dialogue.answer`) and exports
to a folder transformers opens as the same family: its class, its tensor names (biases, q/k norms, Gemma's extra
norms, Phi-3's fused projections, no lm_head where tied), no missing or unexpected weight, our ids and our greedy
tokens. One trained run per family is shared by the module's tests."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors import safe_open

import chat
import lora
from data import encode_all, eval_batches, load_conversations
from data.dialogue import answer, fit_history
from data.sources import hold_out
from helpers import GUANACO_SAMPLE, TOKENIZER_PATH, hf_checkpoint, hf_greedy, qwen_like_tokenizer, run
from tinyllama import generate, load_tokenizer
from tinyllama.export import export_merged, load_adapted
from tinyllama.runtime import RuntimePlan
from tinyllama.templates import adapter_template
from training.step import evaluate

transformers = pytest.importorskip("transformers")

WINDOW = 8  # the rows are far longer: every sliding layer masks
# hf_checkpoint arguments; tied embeddings as the small Qwens and every Gemma have them. pad_token_id 0 on Phi-3:
# its class default (32000) is past a 32000-id vocabulary, so an export that dropped the base's value would not
# load in transformers.
FAMILY_CONFIGS = {
    "qwen2": dict(model_type="qwen2", hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, use_sliding_window=True,
                  sliding_window=WINDOW, max_window_layers=1),
    "qwen3": dict(model_type="qwen3", hidden_size=40, head_dim=16, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, attention_bias=True, tie_word_embeddings=True,
                  use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    "gemma2": dict(model_type="gemma2", hidden_size=40, head_dim=16, intermediate_size=72, num_hidden_layers=3,
                   num_attention_heads=4, num_key_value_heads=2, query_pre_attn_scalar=20,
                   attn_logit_softcapping=5.0, final_logit_softcapping=3.0, sliding_window=WINDOW, pad_token_id=0,
                   bos_token_id=1, eos_token_id=2, tie_word_embeddings=True),
    "gemma3_text": dict(model_type="gemma3_text", hidden_size=40, head_dim=16, intermediate_size=72,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, query_pre_attn_scalar=12,
                        sliding_window=WINDOW, sliding_window_pattern=2, rope_theta=1e6, rope_local_base_freq=1e4,
                        rope_scaling={"rope_type": "linear", "factor": 8.0}, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, tie_word_embeddings=True),
    "phi3": dict(model_type="phi3", hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=WINDOW, pad_token_id=0,
                 bos_token_id=1, eos_token_id=2),
}
CLASSES = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "gemma2": "Gemma2ForCausalLM",
           "gemma3_text": "Gemma3ForCausalLM", "phi3": "Phi3ForCausalLM"}
# Tensors of layer 0 that only some families have: the export must write each under the family's own name.
OWN_TENSORS = {
    "qwen2": ["self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"],
    "qwen3": ["self_attn.q_norm.weight", "self_attn.k_norm.weight", "self_attn.q_proj.bias", "self_attn.o_proj.bias"],
    "gemma2": ["pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"],
    "gemma3_text": ["self_attn.q_norm.weight", "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight"],
    "phi3": ["self_attn.qkv_proj.weight", "mlp.gate_up_proj.weight"],
}
ROWS = [json.loads(line)["text"] for line in GUANACO_SAMPLE.read_text(encoding="utf-8").splitlines()]
PROMPT = "Tell me a story."


def _model_folder(root, family: str):
    """A tiny random checkpoint of `family` with its tokenizer files beside it."""
    config = dict(FAMILY_CONFIGS[family])
    if family.startswith("qwen"):  # Qwen's tokenizer.json: byte-level BPE, no BOS, <|endoftext|> its EOS
        tokenizer_folder = qwen_like_tokenizer(root / "tokenizer")
        tokenizer = load_tokenizer(tokenizer_folder)
        config.update(vocab_size=tokenizer.vocab_size, eos_token_id=tokenizer.eos_id)
    else:
        config["vocab_size"] = 32000
    folder = hf_checkpoint(root / family, seed=3, **config)
    if family.startswith("qwen"):
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_folder / name, folder / name)
    else:
        shutil.copy(TOKENIZER_PATH, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module", params=sorted(FAMILY_CONFIGS))
def trained(request, tmp_path_factory):
    """(family, checkpoint folder, run folder, export folder): trained on every projection, then exported."""
    family = request.param
    root = tmp_path_factory.mktemp(family)
    folder = _model_folder(root, family)
    template = "chatml" if family.startswith("qwen") else None  # None: guanaco (the model ships none)
    summary, rows = run(root, folder, steps=2, eval_data="auto", eval_every=2, lr=2e-2, targets="all",
                        chat_template=template, max_len=96)
    out = export_merged(root / "run" / "adapter", root / "merged")
    return family, folder, root / "run", out, summary


@pytest.mark.slow
def test_the_run_evaluates_on_the_held_out_conversation(trained):
    family, folder, run_dir, _, summary = trained
    trained_rows, held = hold_out(load_conversations(str(GUANACO_SAMPLE)), seed=0)
    assert len(held) == 1 and held[0] not in trained_rows
    adapter = run_dir / "adapter"
    model = load_adapted(folder, lora.read_adapter_file(adapter))
    tokenizer = load_tokenizer(folder)
    template = adapter_template(None, adapter, folder, tokenizer)
    examples, _ = encode_all(held, tokenizer, 96, template=template)
    loss, _ = evaluate(model, eval_batches(examples, 4, 96), RuntimePlan())
    assert summary["eval_loss"] == pytest.approx(loss, abs=1e-5)
    config = model.config
    targets = set(config.attention_projections + config.mlp_projections)  # --targets all, by the family's names
    assert set(json.loads((adapter / "adapter_config.json").read_text())["target_modules"]) == targets


@pytest.mark.slow
def test_chat_py_answers_as_data_dialogue_answer(trained, capsys):
    family, folder, run_dir, _, _ = trained
    adapter = run_dir / "adapter"
    model = load_adapted(folder, lora.read_adapter_file(adapter)).eval()
    tokenizer = load_tokenizer(folder)
    template = adapter_template(None, adapter, folder, tokenizer)
    expected = answer(model, tokenizer, PROMPT, max_new_tokens=8, template=template)
    assert chat.main(["--adapter", str(adapter), "--prompt", PROMPT, "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.strip() == expected


@pytest.mark.slow
def test_the_export_is_the_same_family_with_the_same_tensor_names(trained):
    family, folder, _, out, _ = trained
    base, exported = (json.loads((f / "config.json").read_text()) for f in (folder, out))
    assert (exported["model_type"], exported["architectures"]) == (family, [CLASSES[family]])
    assert exported["pad_token_id"] == base["pad_token_id"]
    names = [_tensor_names(f) for f in (folder, out)]
    assert names[1] == names[0]  # the names transformers saved, biases and norms included; none added or lost
    assert {f"model.layers.0.{name}" for name in OWN_TENSORS[family]} <= names[1]
    assert ("lm_head.weight" in names[1]) == (family == "phi3")
    # transformers reads the export's config.json as the base's: every setting, derived ones included
    # (max_window_layers, sliding_window_pattern: what readers without layer_types go by).
    hf_base, hf_out = (transformers.AutoConfig.from_pretrained(f).to_dict() for f in (folder, out))
    differ = {k for k in hf_base.keys() | hf_out.keys() if hf_base.get(k) != hf_out.get(k)}
    assert differ - {"_name_or_path", "head_dim"} == set()
    assert hf_base.get("head_dim") in (None, hf_out["head_dim"])  # written where hidden / heads implies it
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(hf).__name__ == CLASSES[family]
    assert {k: v for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched weight
    tokenizer = load_tokenizer(folder)
    template = adapter_template(None, out, out, tokenizer)  # the template the export carries
    assert template.source == (folder.parent / "run" / "adapter" / "chat_template.jinja").read_text()
    eos = json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    eos = [eos] if isinstance(eos, int) else eos
    assert eos == template.end_of_turn_ids(tokenizer)  # the base's EOS, then the template's end of turn
    if family.startswith("qwen"):  # ChatML ends a turn with <|im_end|>, not the base's EOS
        assert len(eos) == 2


@pytest.mark.slow
def test_transformers_greedy_tokens_from_the_export_equal_ours(trained):
    family, folder, run_dir, out, _ = trained
    adapter = run_dir / "adapter"
    model = load_adapted(folder, lora.read_adapter_file(adapter)).eval()  # unmerged: the adapter as trained
    tokenizer = load_tokenizer(folder)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    for row in ROWS[:4]:
        assert hf_tokenizer(row)["input_ids"] == tokenizer.encode(row), row[:40]
    template = adapter_template(None, adapter, folder, tokenizer)
    _, prompt = fit_history(tokenizer, PROMPT, 16, model.config.context_length, template)
    rendered = hf_tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                                tokenize=False)
    assert hf_tokenizer(rendered, add_special_tokens=False)["input_ids"] == prompt  # the template travelled
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert len(prompt) + 16 > 2 * WINDOW  # decoding goes past the window
    assert hf_greedy(hf, prompt, 16, eos=-1) == generate(model, prompt, 16, eos_id=[])


def _tensor_names(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return set(f.keys())

