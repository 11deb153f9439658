"""eval.py and evaluation.harness against lm-eval's own `hf` model given the same weights (transformers + PEFT,
float32, CPU): the same token ids, loglikelihoods within 2e-4, the same greedy generations cut at the same stop
strings, the same prompts with the chat template and few-shot examples, the same metrics. For a LoRA adapter,
a DoRA adapter, an NF4 base (against the same weights dequantised) and an adapter trained by train.py.

The tasks are local YAMLs over JSON files in tests/assets/eval_tasks: multiple choice (with a few-shot split),
rolling loglikelihood (one text longer than the model's 256 positions, so it is scored in windows) and
generate-until. No network: lm-eval reads the JSON through `datasets`, offline.
"""

from __future__ import annotations

import functools
import json
import shutil
from pathlib import Path

import pytest
import torch

import lora
from helpers import ROOT, TOKENIZER_PATH, hf_checkpoint, randomize_lora_b, run

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is the [eval] extra: pip install -e .[eval]")

from lm_eval.api.instance import Instance  # noqa: E402

import eval as eval_cmd  # noqa: E402 - after the extra is known to be there
from evaluation.harness import HarnessLM  # noqa: E402
from tinyllama.checkpoint import load_model  # noqa: E402
from tinyllama.templates import BUILTINS, load_template  # noqa: E402
from tinyllama.tokenizer import Tokenizer, load_tokenizer, write_tokenizer_config  # noqa: E402

# lm-eval's hf model beside ours: seconds of imports and reference runs, so `make test` only, not test-fast.
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("no_dataset_fingerprints")]

TASKS_DIR = ROOT / "tests" / "assets" / "eval_tasks"
TASKS = ["tiny_mc", "tiny_ppl", "tiny_gen"]
TOL = 2e-4
TARGETS = ("q_proj", "v_proj", "o_proj", "gate_proj", "down_proj")


@pytest.fixture(autouse=True)
def offline_at_root(monkeypatch):
    """The task YAMLs name their JSON files from the checkout's root; nothing may reach the network."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # simple_evaluate records torch's environment report in every result (`pip list`, compilers, drivers: about a
    # second of subprocesses per call), on both sides alike; no comparison here reads it.
    monkeypatch.setattr("torch.utils.collect_env.get_pretty_env_info", lambda: "(not collected in tests)")


@pytest.fixture(scope="module")
def task_manager():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny random Llama with the real tokenizer, its tokenizer_config.json as TinyLlama ships it (so
    transformers' AutoTokenizer encodes as ours does) and zephyr's chat template (what HFLM's tokenizer renders)."""
    path = hf_checkpoint(tmp_path_factory.mktemp("eval") / "base", seed=0, vocab_size=32000, hidden_size=32,
                         intermediate_size=64, num_attention_heads=4, num_key_value_heads=2)
    shutil.copy(TOKENIZER_PATH, path / "tokenizer.model")
    write_tokenizer_config(Tokenizer(path / "tokenizer.model"), path, 256)
    (path / "chat_template.jinja").write_text(BUILTINS["zephyr"])
    return path


def _adapter(base: Path, out: Path, *, dora: bool = False) -> Path:
    model = load_model(base, lora_config=lora.LoRAConfig(rank=4, alpha=8, dropout=0.0, targets=TARGETS,
                                                         use_dora=dora))
    randomize_lora_b(model, 0.3, seed=1)  # B = 0 would make the adapter invisible
    if dora:
        with torch.no_grad():
            for layer in lora.lora_layers(model).values():
                layer.lora_magnitude_vector.mul_(1 + 0.2 * torch.rand_like(layer.lora_magnitude_vector))
    lora.save_adapter(model, out, base_model=str(base))
    return out


@pytest.fixture(scope="module")
def lora_adapter(base, tmp_path_factory):
    return _adapter(base, tmp_path_factory.mktemp("eval") / "lora")


@pytest.fixture(scope="module")
def dora_adapter(base, tmp_path_factory):
    return _adapter(base, tmp_path_factory.mktemp("eval") / "dora", dora=True)


def adapted(base, adapter):
    """Our model with the adapter loaded, unmerged."""
    found = lora.read_adapter_file(adapter)
    model = load_model(base, lora_config=found.config)
    lora.load_adapter(model, found)
    return model


@functools.cache
def hf_tokenizer(folder: str):
    """transformers' tokenizer of a model folder, loaded once: from tokenizer.model it converts the SentencePiece
    vocabulary to its own format, about 0.4 s a load (HFLM restores what it changes: the padding side)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder)


def hf_lm(base, adapter, batch_size=4):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(base), tokenizer=hf_tokenizer(str(base)), peft=str(adapter) if adapter else None,
                dtype="float32", device="cpu", batch_size=batch_size)


def written(out: Path, tasks) -> dict:
    """What lm-eval's EvaluationTracker wrote under `out`: the results and each task's samples."""
    [results_file] = out.rglob("results_*.json")
    results = json.loads(results_file.read_text())
    results["samples"] = {task: [json.loads(line) for line in next(out.rglob(f"samples_{task}_*.jsonl")).open()]
                          for task in tasks}
    return results


def evaluate(lm, task_manager, out: Path, tasks=TASKS, **kwargs) -> dict:
    """lm-eval's `hf` model scored and written as eval.py writes (so both are compared as files)."""
    from lm_eval.loggers import EvaluationTracker

    tracker = EvaluationTracker(output_path=str(out))
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, log_samples=True,
                                      evaluation_tracker=tracker, **kwargs)
    samples = results.pop("samples")
    tracker.save_results_aggregated(results=results, samples=samples)
    for task in tasks:
        tracker.save_results_samples(task_name=task, samples=samples[task])
    return written(out, tasks)


def ours_via_cli(tmp_path, adapter, tasks=TASKS, *extra) -> dict:
    """eval.py run as a user runs it; what lm-eval's EvaluationTracker wrote: the results and the samples."""
    out = tmp_path / "ours"
    code = eval_cmd.main(["--adapter", str(adapter), "--tasks", ",".join(tasks), "--include-path", str(TASKS_DIR),
                          "--device", "cpu", "--batch-size", "3", "--output", str(out), "--log-samples", *extra])
    assert code == 0
    return written(out, tasks)


def _same_answer(x, y) -> bool:
    """One response as the tracker writes it: a loglikelihood and greedy flag, a rolling loglikelihood (numbers
    as strings), or generated text."""
    if isinstance(x, list):
        return len(x) == len(y) and all(_same_answer(a, b) for a, b in zip(x, y, strict=True))
    try:
        return float(x) == pytest.approx(float(y), abs=TOL, rel=1e-6)
    except ValueError:
        return x == y


def assert_same_evaluation(ours: dict, theirs: dict, tasks=TASKS) -> None:
    """Sample for sample: the same prompts and continuations, loglikelihoods within TOL and the same greedy
    flags, the same generated text; then the same metrics (within what TOL moves them)."""
    for task in tasks:
        a = sorted(ours["samples"][task], key=lambda s: s["doc_id"])
        b = sorted(theirs["samples"][task], key=lambda s: s["doc_id"])
        assert [s["doc_id"] for s in a] == [s["doc_id"] for s in b]
        for x, y in zip(a, b, strict=True):
            assert x["arguments"] == y["arguments"], (task, x["doc_id"])
            assert _same_answer(x["resps"], y["resps"]), (task, x["doc_id"], x["resps"], y["resps"])
        metrics_a = {k: v for k, v in ours["results"][task].items() if "stderr" not in k and k != "alias"}
        metrics_b = {k: v for k, v in theirs["results"][task].items() if "stderr" not in k and k != "alias"}
        assert metrics_a.keys() == metrics_b.keys()
        for k, v in metrics_a.items():
            if isinstance(v, float):
                assert v == pytest.approx(metrics_b[k], rel=1e-4, abs=1e-6), (task, k)
            else:
                assert v == metrics_b[k], (task, k)


def test_lora_equals_the_hf_model_on_every_request_kind(base, lora_adapter, task_manager, tmp_path, capsys):
    theirs = evaluate(hf_lm(base, lora_adapter), task_manager, tmp_path / "hf", num_fewshot=2)
    capsys.readouterr()
    ours = ours_via_cli(tmp_path, lora_adapter, TASKS, "--num-fewshot", "2")
    assert_same_evaluation(ours, theirs)
    table = capsys.readouterr().out  # lm-eval's own table, one row per task and metric
    acc = ours["results"]["tiny_mc"]["acc,none"]
    [row] = [r for r in table.splitlines() if r.split("|")[1:2] == ["tiny_mc "]]
    assert [c.strip() for c in row.split("|")[4:8]] == ["2", "acc", "↑", f"{acc:.4f}"]
    # The cases worth having: a text longer than the context (several windows), answers cut at a stop string
    # (so shorter than 12 tokens would give, and holding none of them) and a few-shot prompt.
    ppl = {s["doc_id"]: s for s in ours["samples"]["tiny_ppl"]}
    assert len(load_tokenizer(base).encode(ppl[2]["doc"]["text"])) > 256
    # Each answer is the stop-free generation cut before its first stop string, and some were cut.
    gen = sorted(ours["samples"]["tiny_gen"], key=lambda s: s["doc_id"])
    unstopped = HarnessLM(adapted(base, lora_adapter), load_tokenizer(base)).generate_until(
        [Instance("generate_until", {}, (s["arguments"]["gen_args_0"]["arg_0"], {"max_gen_toks": 12}), idx=0)
         for s in gen])
    stops = ("\n", ".", "id g", "NSS")  # tiny_gen.yaml's until
    cuts = [min([text.find(stop) for stop in stops if stop in text] + [len(text)]) for text in unstopped]
    assert [s["resps"][0][0] for s in gen] == [text[:cut] for text, cut in zip(unstopped, cuts, strict=True)]
    assert any(cut < len(text) for text, cut in zip(unstopped, cuts, strict=True)) and any(cuts), unstopped
    assert ours["samples"]["tiny_mc"][0]["arguments"]["gen_args_0"]["arg_0"].count("Question:") == 3


def test_chat_template_and_few_shot_prompts_equal_the_hf_models(base, lora_adapter, task_manager, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(lora_adapter, adapter)
    shutil.copy(base / "chat_template.jinja", adapter / "chat_template.jinja")  # what training would have saved
    tasks = ["tiny_mc", "tiny_gen"]
    theirs = evaluate(hf_lm(base, adapter), task_manager, tmp_path / "hf", tasks, num_fewshot=1,
                      apply_chat_template=True)
    ours = ours_via_cli(tmp_path, adapter, tasks, "--num-fewshot", "1", "--apply-chat-template")
    assert_same_evaluation(ours, theirs, tasks)
    prompt = ours["samples"]["tiny_mc"][0]["arguments"]["gen_args_0"]["arg_0"]
    assert prompt.startswith("<|user|>\n") and prompt.count("<|assistant|>\n") == 2  # one shot, then the question


def test_dora_equals_the_hf_model(base, dora_adapter, task_manager, tmp_path):
    tasks = ["tiny_mc", "tiny_gen"]
    theirs = evaluate(hf_lm(base, dora_adapter), task_manager, tmp_path / "hf", tasks)
    assert_same_evaluation(ours_via_cli(tmp_path, dora_adapter, tasks), theirs, tasks)


def test_a_trained_adapter_equals_the_hf_model(base, task_manager, tmp_path):
    run(tmp_path, base, "run", steps=1, lr=5e-2, batch_size=2, max_len=64, targets="q_proj,v_proj,gate_proj")
    adapter = tmp_path / "run" / "adapter"
    assert (adapter / "chat_template.jinja").is_file()  # training saves the template it rendered with
    tasks = ["tiny_mc", "tiny_ppl"]
    theirs = evaluate(hf_lm(base, adapter), task_manager, tmp_path / "hf", tasks)
    assert_same_evaluation(ours_via_cli(tmp_path, adapter, tasks), theirs, tasks)


def test_nf4_base_scores_as_the_hf_model_on_the_dequantised_weights(base, lora_adapter, task_manager, tmp_path):
    """QLoRA: the adapter on the NF4 base, unmerged, against transformers given the weights NF4 stands for."""
    from tinyllama.checkpoint import save_model

    quantized = load_model(base, quantize="nf4")
    dense = load_model(base)
    with torch.no_grad():
        for name, module in quantized.named_modules():
            if hasattr(module, "quantized_weight_count"):
                dense.get_submodule(name).weight.copy_(module.dequantize(torch.float32))
    dequantised = tmp_path / "dequantised"
    save_model(dense, dequantised)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(base / name, dequantised / name)
    original = load_model(base).model.layers[0].mlp.down_proj.weight
    assert not torch.equal(dense.model.layers[0].mlp.down_proj.weight, original)  # NF4 did round the weights
    tasks = ["tiny_mc"]
    theirs = evaluate(hf_lm(dequantised, lora_adapter), task_manager, tmp_path / "hf", tasks)
    ours = ours_via_cli(tmp_path, lora_adapter, tasks, "--quantize", "nf4")
    assert_same_evaluation(ours, theirs, tasks)


def test_token_ids_and_context_split_equal_the_hf_models(base, lora_adapter):
    """tok_encode and TemplateLM's context/continuation split, string for string, including BOS already in the
    text, special-token text, trailing spaces and an empty context."""
    hf = hf_lm(base, None)
    ours = HarnessLM(load_model(base), load_tokenizer(base))
    texts = ["Hello world", " leading space", " ", "   three spaces", "<s> starts with BOS", "a </s> inside",
             "<|user|>\nhi</s>\n", "trailing  ", "", "émoji 🙂 and\nnewlines\n\n", "1234.5678"]
    for text in texts:
        assert ours.tok_encode(text) == hf.tok_encode(text), text
        assert ours.tok_encode(text, add_special_tokens=False) == hf.tok_encode(text, add_special_tokens=False)
    pairs = [("Question: why?\nAnswer:", " because"), ("The end ", "of it"), ("x", "y z"), ("<s>Q:", " A")]
    for context, continuation in pairs:
        assert ours._encode_pair(context, continuation) == hf._encode_pair(context, continuation)
    assert ours.prefix_token_id == hf.prefix_token_id and ours.eot_token_id == hf.eot_token_id
    assert ours.max_length == hf.max_length


def test_a_tokenizer_that_puts_no_bos_before_a_text_encodes_as_the_hf_model(base, tmp_path):
    """add_bos_token: false (as Phi-3 ships it): no <s> before a text, yet <s> is still the prefix of an empty
    context (HFLM's prefix_token_id is the BOS token's id whether or not texts start with it)."""
    folder = tmp_path / "no_bos"
    shutil.copytree(base, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    hf = hf_lm(folder, None)
    ours = HarnessLM(load_model(folder), load_tokenizer(folder))
    assert hf.tok_encode("Hello world")[0] != hf.prefix_token_id == 1  # the case this test is about
    for text in ["Hello world", " leading space", "<s> starts with BOS", "a </s> inside", ""]:
        assert ours.tok_encode(text) == hf.tok_encode(text), text
    for context, continuation in [("Question: why?\nAnswer:", " because"), ("The end ", "of it")]:
        assert ours._encode_pair(context, continuation) == hf._encode_pair(context, continuation)
    assert ours.prefix_token_id == hf.prefix_token_id and ours.eot_token_id == hf.eot_token_id


def test_chat_prompts_equal_the_hf_models_including_a_continued_final_message(base):
    """HFLM renders with continue_final_message when a task has a gen_prefix (add_generation_prompt=False)."""
    hf = hf_lm(base, None)
    ours = HarnessLM(load_model(base), load_tokenizer(base), template=load_template("model", base))
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q: 2+2?"},
            {"role": "assistant", "content": "The answer is"}]
    for add_generation_prompt in (True, False):
        messages = chat[:-1] if add_generation_prompt else chat
        assert (ours.apply_chat_template(messages, add_generation_prompt)
                == hf.apply_chat_template(messages, add_generation_prompt))
    assert ours.apply_chat_template(chat, False).endswith("<|assistant|>\nThe answer is")
    assert ours.chat_template(True) == BUILTINS["zephyr"]


def test_generation_settings_it_cannot_honour_are_refused(base):
    ours = HarnessLM(load_model(base), load_tokenizer(base))
    request = Instance("generate_until", {}, ("Q:", {"until": ["\n"], "num_beams": 4}), idx=0)
    with pytest.raises(ValueError, match=r"\['num_beams'\] are not supported"):
        ours.generate_until([request])


def test_sharing_the_context_and_batching_change_no_score(base, lora_adapter):
    """Each context's forward pass shared across its continuations, in batches of padded rows, gives what every
    request scored alone gives (ragged contexts and continuations, one-token continuations among them)."""
    model, tokenizer = adapted(base, lora_adapter), load_tokenizer(base)
    contexts = ["Question: what is it?\nAnswer:", "A", "The weather today is", "Count: one, two, three,"]
    conts = [" yes", " no, not at all", " maybe so", "!"]
    requests = [Instance("loglikelihood", {}, (c, k), idx=0) for c in contexts for k in conts]
    alone = HarnessLM(model, tokenizer, batch_size=1, share_context=False).loglikelihood(requests)
    for batch_size in (1, 3, 16):
        shared = HarnessLM(model, tokenizer, batch_size=batch_size).loglikelihood(requests)
        for (a, ga), (b, gb) in zip(shared, alone, strict=True):
            assert a == pytest.approx(b, abs=1e-5) and ga == gb


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "tiny_mc"], "pass --adapter DIR"),
    (["--no-adapter", "--tasks", "tiny_mc"], "--no-adapter needs --model"),
    (["--adapter", "x", "--tasks", "tiny_mc", "--log-samples"], "pass --output DIR"),
    (["--adapter", "x", "--tasks", "tiny_mc", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["--adapter", "x", "--tasks", "tiny_mc", "--include-path", "no/such/dir"], "is not a folder"),
    (["--adapter", "no/such/adapter", "--tasks", "tiny_mc", "--include-path", str(TASKS_DIR)], "no/such/adapter"),
    (["--adapter", "{adapter}", "--tasks", "tiny_mcq", "--include-path", str(TASKS_DIR)], "unknown task(s) tiny_mcq"),
])
def test_bad_input_is_one_line_error(argv, message, lora_adapter, capsys, monkeypatch):
    from lm_eval import tasks

    # An unknown name is looked for among lm-eval's own tasks too; indexing those takes tens of seconds.
    only_ours = tasks.TaskManager
    monkeypatch.setattr(tasks, "TaskManager", lambda **kw: only_ours(**{**kw, "include_defaults": False}))
    argv = [a.replace("{adapter}", str(lora_adapter)) for a in argv]
    assert eval_cmd.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and message in err, err


def test_no_adapter_scores_the_recorded_base_alone(base, lora_adapter, task_manager, tmp_path):
    """--adapter DIR --no-adapter: the base DIR records, without the adapter (whose B = N(0, 0.3) would move every
    loglikelihood), as lm-eval's hf model scores that base."""
    theirs = evaluate(hf_lm(base, None), task_manager, tmp_path / "hf", ["tiny_mc"])
    assert_same_evaluation(ours_via_cli(tmp_path, lora_adapter, ["tiny_mc"], "--no-adapter"), theirs, ["tiny_mc"])


def test_a_task_whose_data_is_missing_is_one_line_error(lora_adapter, tmp_path, capsys):
    yaml = (TASKS_DIR / "tiny_mc.yaml").read_text().replace("tests/assets/eval_tasks/mc_", str(tmp_path / "gone_"))
    (tmp_path / "tiny_mc.yaml").write_text(yaml)
    assert eval_cmd.main(["--adapter", str(lora_adapter), "--tasks", "tiny_mc", "--include-path", str(tmp_path),
                          "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "gone_" in err, err
