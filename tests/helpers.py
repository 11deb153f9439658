"""What the tests share: paths to the shipped assets, adversarial guanaco rows, the house tiny config, reference
checkpoints saved by `transformers` and the reference model loaded from them, random LoRA B weights, a model
rigged to replay a token cycle, the guanaco text of a prompt, short runs of the real `train.train` with what
they wrote, byte-level BPE tokenizers carrying a chat family's special tokens, and the check that a chat template's
text, ids and labels are transformers'."""

from __future__ import annotations

import atexit
import json
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import lora
from data.dialogue import conversation
from data.guanaco import ASSISTANT, MARKERS, render

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"  # copies of ../shared/fixtures, so a plain clone can test
TOKENIZER_PATH = ASSETS / "tokenizer.model"
GUANACO_SAMPLE = ASSETS / "guanaco_sample.jsonl"
OASST_SAMPLE = ASSETS / "oasst_trees_sample.jsonl"

H, A = "human", "assistant"  # the roles of a data.Turn
# Guanaco rows built to trip a parser (name: (row, [(role, text), ...] as parsed)); rendered back, they must
# also encode and decode exactly.
ADVERSARIAL = {
    "markdown headings in a reply": (
        "### Human: How do I bake bread?### Assistant: ### Step 1\nMix flour and water.\n\n### Step 2\nBake it.",
        [(H, "How do I bake bread?"), (A, "### Step 1\nMix flour and water.\n\n### Step 2\nBake it.")]),
    "'Assistant:' and 'Human:' in the human text": (
        "### Human: Reply as 'Assistant: yes' and never as Human: no.### Assistant: Assistant: yes",
        [(H, "Reply as 'Assistant: yes' and never as Human: no."), (A, "Assistant: yes")]),
    "markers without colon or with other heading levels are content": (
        "### Human: What is `### Human` in guanaco?## Assistant: not this### Assistant: A marker; "
        "`## Assistant:` and `### Assistant` are not.",
        [(H, "What is `### Human` in guanaco?## Assistant: not this"),
         (A, "A marker; `## Assistant:` and `### Assistant` are not.")]),
    "code with # comments": (
        "### Human: Comment this### Assistant: ```python\n### setup\nx = 1  # one\nprint('### Human')\n```",
        [(H, "Comment this"), (A, "```python\n### setup\nx = 1  # one\nprint('### Human')\n```")]),
    "a reply ending in '#' glued to the next marker": (
        "### Human: Best language for Unity?### Assistant: Use C#"
        "### Human: And for Godot?### Assistant: GDScript or C#",
        [(H, "Best language for Unity?"), (A, "Use C#"), (H, "And for Godot?"), (A, "GDScript or C#")]),
    "leading and trailing whitespace": (
        "  \n### Human:   hi there \n### Assistant:\n\n  hello!  \n\n",
        [(H, "hi there"), (A, "hello!")]),
    "a trailing ### Human: with no answer": (
        "### Human: Name a prime.### Assistant: 7.### Human:",
        [(H, "Name a prime."), (A, "7.")]),
    "a trailing human question with no answer": (
        "### Human: Name a prime.### Assistant: 7.### Human: And another?",
        [(H, "Name a prime."), (A, "7.")]),
    "unicode: emoji, RTL, CJK, combining marks, zero-width joiner": (
        "### Human: مرحبا 👋🏽 — ça va? e\u0301### Assistant: 你好！👨\u200d👩\u200d👧 Ελληνικά ✓",
        [(H, "مرحبا 👋🏽 — ça va? e\u0301"), (A, "你好！👨\u200d👩\u200d👧 Ελληνικά ✓")]),
}

class LazyModule:
    """A reference library imported when a test first uses it, not when its file is collected: peft and
    bitsandbytes take seconds each to import, which `make test-fast` should not pay for tests it leaves out. A
    missing library skips the test that uses it (pytest.importorskip)."""

    def __init__(self, name: str, reason: str | None = None):
        self._name, self._reason = name, reason

    def __getattr__(self, attr):
        # Collecting a test file, pytest probes each of its names (__test__, __wrapped__, _mock_name, ...): those
        # must not import the library, or collection pays for it after all.
        if attr.startswith("_") and self._name not in sys.modules:
            raise AttributeError(attr)
        return getattr(pytest.importorskip(self._name, reason=self._reason), attr)


# The house tiny config: 2 layers, width 64, 4 heads, 2 KV heads (grouped-query).
TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
            max_position_embeddings=256, tie_word_embeddings=False)


# hf_checkpoint's folders by their arguments, with the global RNG state each left behind: most tests ask for one of
# a few, and building and saving a transformers model costs ~80 ms where copying its files costs ~1 ms.
_HF_CHECKPOINTS: dict[str, tuple[Path, torch.Tensor]] = {}


def hf_checkpoint(path: Path, seed: int = 0, model_type: str = "llama", **overrides) -> Path:
    """Save a random `transformers.LlamaForCausalLM` (or the class of another `model_type`: `MistralForCausalLM`,
    `Qwen2ForCausalLM`, ...; float32, safetensors) to `path` and return it. The same arguments give the same files
    and leave the global RNG in the same state: the first call in a process builds them, later ones copy them."""
    key = json.dumps([seed, model_type, overrides], sort_keys=True, default=repr)
    if key not in _HF_CHECKPOINTS:
        folder = Path(tempfile.mkdtemp(prefix="hf_checkpoint-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        _save_hf_checkpoint(folder, seed, model_type, overrides)
        _HF_CHECKPOINTS[key] = folder, torch.get_rng_state()
    folder, rng_state = _HF_CHECKPOINTS[key]
    shutil.copytree(folder, path, dirs_exist_ok=True)
    torch.set_rng_state(rng_state)
    return Path(path)


def _save_hf_checkpoint(path: Path, seed: int, model_type: str, overrides: dict) -> None:
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **{**TINY, **overrides})
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # HF initialises norms to 1 (Gemma's to 0) and biases to 0; perturb them so a wrong
        for name, p in model.named_parameters():  # norm or a missing bias cannot hide
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)


def hf_model(path, **kwargs):
    """The reference: `transformers.LlamaForCausalLM` (or the class config.json's model_type names) from `path`
    in eval mode (eager attention unless `kwargs` say otherwise; they go to `from_pretrained`)."""
    import transformers

    kwargs = {"attn_implementation": "eager", **kwargs}
    return transformers.AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def randomize_lora_b(model, std: float = 0.1, seed: int | None = None):
    """Draw every LoRA B of `model` (a model, a module or one LoRALinear) from N(0, std): B = 0, the fresh
    adapter, would hide every mistake on the adapter's side. `seed` reseeds the global RNG first."""
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.weight.normal_(0, std)
    return model


def format_prompt(turns) -> str:
    """The guanaco text the model continues (`data.dialogue`): `### Human: q1### Assistant: a1### Human: q2###
    Assistant:`; the model sees it with BOS in front and EOS after each earlier reply (`data.encode_prompt`)."""
    return render(conversation(turns)) + MARKERS[ASSISTANT]


def rig_cycle(model, cycle):
    """Make `model` a bigram table: cycle[i] -> cycle[i + 1] (and the last back to the first), any other
    token -> cycle[0]. Greedy decoding then replays the cycle exactly."""
    assert len(set(cycle)) == len(cycle) < model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()  # every layer adds nothing: the last hidden state is the current token's embedding
        e = torch.eye(model.config.hidden_size)
        model.model.embed_tokens.weight.copy_(e[0].expand_as(model.model.embed_tokens.weight))
        model.lm_head.weight.zero_()
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight[cycle[0], 0] = 1.0
        for i, token in enumerate(cycle):
            model.model.embed_tokens.weight[token] = e[i + 1]
            model.lm_head.weight[cycle[(i + 1) % len(cycle)], i + 1] = 1.0
    return model.eval()


def free_port() -> int:
    """A TCP port nothing listens on now, for torchrun's --master_port. A fixed port would collide between
    pytest-xdist's workers, and with any other test run on the machine; the kernel hands out a free one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(tmp_path, ckpt, name="run", **overrides) -> tuple[dict, list[dict]]:
    """Train the tiny checkpoint on the guanaco sample (3 steps by default) into tmp_path/name."""
    settings = dict(model=str(ckpt), data=str(GUANACO_SAMPLE), eval_data="none", rank=4, alpha=8.0,
                    dropout=0.0, lr=1e-2, warmup=0, batch_size=4, grad_accum=1, max_len=128, steps=3,
                    group_by_length=False, log_every=1, out=str(tmp_path / name), samples=False, seed=0)
    settings.update(overrides)
    import train

    summary = train.train(train.TrainConfig(**settings))
    out = Path(settings["out"])
    return summary, metrics(out)


def metrics(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def adapter_weights(folder) -> dict[str, torch.Tensor]:
    """The adapter tensors of a run folder (its adapter/) or of an adapter or checkpoint folder."""
    folder = Path(folder)
    folder = folder / "adapter" if (folder / "adapter").is_dir() else folder
    return load_file(str(folder / "adapter_model.safetensors"))


def train_losses(rows):
    return [r["loss"] for r in rows if r["split"] == "train"]


def snapshot(folder) -> dict[str, bytes]:
    """Every file under `folder` (relative path -> bytes): to show that nothing was touched."""
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def rerecord(checkpoint) -> None:
    """Record the sha256 of a checkpoint's files again after a test changed one, as someone who edits a
    checkpoint on purpose could: what the test then shows is the check of the values, not of the checksum."""
    from training import run_folder

    path = Path(checkpoint) / run_folder.STATE
    state = json.loads(path.read_text())
    state["files"] = {name: run_folder.sha256(Path(checkpoint) / name) for name in state["files"]}
    path.write_text(json.dumps(state))


def label_runs(labels):
    """Maximal [start, end, labelled) runs of labelled and unlabelled (IGNORE_INDEX) positions."""
    from data import IGNORE_INDEX

    out, start = [], 0
    for t in range(1, len(labels) + 1):
        if t == len(labels) or (labels[t] == IGNORE_INDEX) != (labels[start] == IGNORE_INDEX):
            out.append((start, t, labels[start] != IGNORE_INDEX))
            start = t
    return out


def assert_labelled_runs_are_the_replies(conv, ids, labels, tokenizer, reply_prefix: str = "") -> None:
    """The masking proof: the labelled runs of an encoded conversation are its replies (each `reply_prefix` +
    text, then EOS), the unlabelled runs the markers and human turns (after the BOS, if any)."""
    spans = label_runs(labels)
    assert [lab for _, _, lab in spans] == [False, True] * (len(conv) // 2)
    for i, (s, e, labelled) in enumerate(spans):
        human, reply = conv[2 * (i // 2)], conv[2 * (i // 2) + 1]
        if labelled:
            assert labels[s:e] == ids[s:e]
            assert ids[e - 1] == tokenizer.eos_id and tokenizer.eos_id not in ids[s:e - 1]
            assert tokenizer.decode(ids[s:e - 1]) == reply_prefix + reply.text
        else:
            first = s + 1 if s == 0 and tokenizer.bos_id is not None else s
            assert tokenizer.decode(ids[first:e]) == f"### Human: {human.text}### Assistant:"


def forward_and_reference(layer, x, seed: int, autocast: bool) -> list[tuple]:
    """`layer.forward` and `layer.reference` (a LoRALinear) on `x` with the same dropout masks (the same seed):
    for each, the output and the gradients of x and of every trainable parameter of the layer, under a fixed
    weighting of the outputs; bf16 autocast when `autocast`, as training runs it."""
    results = []
    for fn in (layer.forward, layer.reference):
        layer.zero_grad()
        x.grad = None
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fn(x)
        (y.float() * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
        results.append((y.detach().float(), x.grad.float(),
                        *(p.grad for p in layer.parameters() if p.requires_grad)))
    return results


# ---- PEFT and transformers references -------------------------------------------------------------------------

def peft_lora_model(path, config, seed=3):
    """PEFT's LoRA of `config` (a LoRAConfig) on transformers' model of `path`, its adapter weights random."""
    import peft

    base = hf_model(path)
    pcfg = peft.LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                           target_modules=list(config.targets), use_rslora=config.use_rslora,
                           task_type="CAUSAL_LM")
    model = peft.get_peft_model(base, pcfg)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model.eval()

def our_name(peft_name: str) -> str:
    name = peft_name.removeprefix("base_model.model.").replace(".default.", ".")
    return name.replace("lora_magnitude_vector.weight", "lora_magnitude_vector")  # DoRA: PEFT's module holds it

def compare_gradients(ref, ours, tol) -> int:
    """Every adapter gradient of `ref` (PEFT) against ours, relative error; returns how many were compared."""
    ours_params = dict(ours.named_parameters())
    compared = 0
    for name, p in ref.named_parameters():
        if "lora_" not in name:
            continue
        g_ref, g = p.grad, ours_params[our_name(name)].grad
        rel = ((g - g_ref).norm() / g_ref.norm()).item()
        assert rel <= tol, f"{name}: relative gradient error {rel}"
        compared += 1
    return compared

def lm_batch(vocab, B=2, T=13, seed=7):
    """(ids, labels) with a prompt that takes no loss and one row's tail unlabelled."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :4] = -100  # a prompt that takes no loss
    labels[1, 9:] = -100
    return ids, labels


def hf_greedy(model, prompt, n, eos=2):
    """transformers' greedy continuation of `prompt` by `n` tokens, without the end token."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             pad_token_id=0, eos_token_id=eos, temperature=None, top_p=None, top_k=None)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(eos)] if eos in new else new  # ours does not return the end token


# ---- byte-level BPE tokenizers, trained on the guanaco rows (the [bpe] extra) --------------------------------

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                  r"\s*[\r\n]+|\s+(?!\S)|\s+")
RESERVED = [f"<|reserved_special_token_{k}|>" for k in range(3)]


def _train_bpe(pre_tokenizer, special_tokens: list[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # the [bpe] extra

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizer
    tk.decoder = decoders.ByteLevel()
    # Every byte in the vocabulary, so any text encodes (a character never seen becomes its UTF-8 bytes).
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rows = [json.loads(line)["text"] for line in GUANACO_SAMPLE.read_text(encoding="utf-8").splitlines()]
    tk.train_from_iterator(rows + [row for row, _ in ADVERSARIAL.values()], trainer)
    return tk


def llama3_like_tokenizer(folder):
    """A byte-level BPE tokenizer folder shaped like Llama 3's (its pre-tokenizer regex, a post-processor that
    adds <|begin_of_text|>, reserved special tokens after the vocabulary), trained on the guanaco rows."""
    from tokenizers import AddedToken, Regex, pre_tokenizers, processors  # the [bpe] extra

    tk = _train_bpe(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                ["<|begin_of_text|>", "<|end_of_text|>"])
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in RESERVED])
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A:0",
                                      pair="<|begin_of_text|> $A:0 <|begin_of_text|> $B:1",
                                      special_tokens=[("<|begin_of_text|>", bos)])])
    return _save_tokenizer(folder, tk, {"bos_token": "<|begin_of_text|>", "eos_token": "<|end_of_text|>",
                              "clean_up_tokenization_spaces": False, "model_max_length": 131072,
                              "tokenizer_class": "PreTrainedTokenizerFast"})


def smollm2_like_tokenizer(folder):
    """One shaped like SmolLM2's: GPT-2 regex with single digits, no BOS added although tokenizer_config.json
    names a bos_token."""
    from tokenizers import pre_tokenizers, processors  # the [bpe] extra

    tk = _train_bpe(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
                ["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return _save_tokenizer(folder, tk, {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
                              "unk_token": "<|endoftext|>", "add_prefix_space": False,
                              "clean_up_tokenization_spaces": False, "model_max_length": 8192,
                              "tokenizer_class": "GPT2Tokenizer"})


def _save_tokenizer(folder, tk, config: dict):
    folder.mkdir(parents=True)
    tk.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return folder


# Special tokens of each family's tokenizer.json, as the chat templates in tests/assets/chat_templates write them.
# EOS as the base models name it: Llama 3's and Qwen's end a text with a token their instruct templates do not
# end a turn with (<|eot_id|>, <|im_end|>), so the export has to add the template's to generation's end ids.
CHAT_FAMILIES = {
    "llama2": dict(special=["<unk>", "<s>", "</s>"], bos="<s>", eos="</s>", unk="<unk>"),
    "llama3": dict(special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                            "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"], bos="<|begin_of_text|>",
                   eos="<|end_of_text|>"),
    "chatml": dict(special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"], bos=None, eos="<|endoftext|>"),
    "mistral": dict(special=["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]",
                             "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]"],
                    bos="<s>", eos="</s>", unk="<unk>"),
}


def chat_family_tokenizer(folder, family: str, spec: dict | None = None):
    """A byte-level BPE tokenizer.json (Llama 3's pre-tokenizer) carrying `family`'s special tokens
    (`CHAT_FAMILIES`, or `spec` in the same form), a BOS added by its post-processor where the family has one,
    and a tokenizer_config.json naming them as the family's does."""
    from tokenizers import Regex, pre_tokenizers, processors  # the [bpe] extra

    spec = spec or CHAT_FAMILIES[family]
    tk = _train_bpe(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
                                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                    spec["special"])
    steps = [processors.ByteLevel(trim_offsets=False)]
    if spec["bos"]:
        bos = tk.token_to_id(spec["bos"])
        steps.append(processors.TemplateProcessing(single=f"{spec['bos']} $A:0",
                                                   pair=f"{spec['bos']} $A:0 {spec['bos']} $B:1",
                                                   special_tokens=[(spec["bos"], bos)]))
    tk.post_processor = processors.Sequence(steps)
    config = {"bos_token": spec["bos"], "eos_token": spec["eos"], "clean_up_tokenization_spaces": False,
              "model_max_length": 4096, "tokenizer_class": "PreTrainedTokenizerFast"}
    if spec.get("unk"):
        config["unk_token"] = spec["unk"]
    return _save_tokenizer(folder, tk, config)


QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                 r"\s*[\r\n]+|\s+(?!\S)|\s+")


def qwen_like_tokenizer(folder):
    """One shaped like Qwen 2.5's and 3's tokenizer.json: NFC, Qwen's regex (single digits), byte-level, no BOS,
    ChatML's special tokens. transformers 5 reads a qwen2/qwen3 folder's tokenizer as `Qwen2Tokenizer`, which
    sets that normalizer and regex whatever tokenizer.json says, so a Qwen tokenizer must have them."""
    from tokenizers import Regex, normalizers, pre_tokenizers, processors  # the [bpe] extra

    tk = _train_bpe(pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
                                             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
                    CHAT_FAMILIES["chatml"]["special"])
    tk.normalizer = normalizers.NFC()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    return _save_tokenizer(folder, tk, {"bos_token": None, "eos_token": "<|endoftext|>",
                                        "pad_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
                                        "model_max_length": 32768, "tokenizer_class": "Qwen2Tokenizer"})


# ---- chat templates against transformers' apply_chat_template -------------------------------------------------

def hf_render(hf, template, messages, add_generation_prompt):
    """transformers' `apply_chat_template` text of `messages` through `template`, or the exception it raised."""
    try:
        return hf.apply_chat_template(messages, chat_template=template.source, tokenize=False,
                                      add_generation_prompt=add_generation_prompt)
    except Exception as e:  # jinja2's TemplateError from raise_exception
        return e


def _rendered(content: str, text: str) -> str | None:
    """How `text` holds a message: its content as it is, else trimmed (Llama 2 and 3.x trim message edges);
    None when not at all."""
    return next((c for c in (content, content.strip(), content.rstrip(), content.lstrip()) if c in text), None)


def expected_labels(text, messages, hf, ids_offsets, special_tokens) -> list[bool]:
    """Per token of transformers' encoding: whether it overlaps a reply (with the spaces right before it) or the
    first special token after it (before the next message's text): found by searching the text here."""
    ranges, at = [], 0
    for i, m in enumerate(messages):
        content = _rendered(m["content"], text[at:])
        if content is None:
            continue  # a template may drop a message (Mistral v0.3 drops the system one)
        start = text.index(content, at)
        end = at = start + len(content)
        if m["role"] != "assistant":
            continue
        while start > 0 and text[start - 1] == " ":
            start -= 1
        rest = [_rendered(x["content"], text[end:]) for x in messages[i + 1:]]
        following = [text.find(x, end) for x in rest if x is not None]
        stop = min(following, default=len(text))
        hits = [(text.find(t, end), t) for t in special_tokens if 0 <= text.find(t, end) < stop]
        if hits:
            first, token = min(hits)
            end = first + len(token)
        ranges.append((start, end))
    return [any(a < e and s < b for s, e in ranges) for a, b in ids_offsets]


def own_offsets(text, ids, offsets, hf):
    """transformers' offsets with each added token's narrowed to its own characters: the whitespace a token with
    lstrip / rstrip swallows is in its offsets there, but belongs to no token (a reply's leading newline taken by
    its header's rstrip must not label the header)."""
    added = {i: t.content for i, t in hf.added_tokens_decoder.items()}
    out = []
    for i, (a, b) in zip(ids, offsets, strict=True):
        if i in added:
            a = text.index(added[i], a, b)
            b = a + len(added[i])
        out.append((a, b))
    return out


def assert_encodes_as_transformers(tokenizer, hf, template, conversations) -> int:
    """Each conversation, whole and as a prompt: rendered, encoded and labelled as transformers would (labels
    from character ranges mapped through its offsets); returns how many were trained on."""
    from data import IGNORE_INDEX, encode_messages, encode_prompt, encode_rendered
    from tinyllama.templates import TemplateRefused

    specials = sorted(tokenizer.special_tokens, key=len, reverse=True)
    checked = 0
    for messages in conversations:
        for generation, msgs in ((False, messages), (True, messages[:-1])):
            expected = hf_render(hf, template, msgs, generation)
            if isinstance(expected, Exception):  # refused by the template: refused here too
                with pytest.raises(TemplateRefused):
                    template.render(msgs, generation)
                continue
            assert template.render(msgs, generation) == expected
            hf_ids = hf(expected, add_special_tokens=False, return_offsets_mapping=True)
            assert encode_rendered(expected, tokenizer) == hf_ids["input_ids"]
            if generation:
                assert encode_prompt(msgs, tokenizer, template) == hf_ids["input_ids"]
                continue
            ids, labels = encode_messages(msgs, tokenizer, template)
            assert ids == hf_ids["input_ids"]  # BOS only where the template writes it, special tokens as one id
            offsets = own_offsets(expected, ids, hf_ids["offset_mapping"], hf)
            assert [x != IGNORE_INDEX for x in labels] == expected_labels(expected, msgs, hf, offsets, specials)
            assert all(x in (IGNORE_INDEX, i) for x, i in zip(labels, ids, strict=True))
            checked += 1
    return checked
