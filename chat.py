"""Chat with a model (and a LoRA adapter) in the chat template it was trained with: a terminal chat, or a
one-shot answer.

    python chat.py --adapter runs/r64/adapter                     # interactive; /reset, /exit
    python chat.py --adapter runs/r64/adapter --prompt "Hi!"      # one answer on stdout, scriptable
    python chat.py --adapter runs/r64/adapter --system "Answer in French."

The model is `--model`, else the base the adapter records (`base_model_name_or_path` in its adapter_config.json,
as `make export` reads it), else TinyLlama_v1.1 from the Hub (`DEFAULT_MODEL`). The template is
`--chat-template`, else the adapter's `chat_template.jinja` (what training used; an adapter without one was
trained on guanaco), else the model's own template, else guanaco.

Each user message is put after the earlier turns (and `--system`) through the template, tokenized exactly as
training tokenized conversations; the answer streams as it is generated and ends at EOS or the template's end of
turn, at guanaco's `### Human:` (not shown), or after `--max-new-tokens`; the oldest exchanges are dropped when
the conversation and the answer would not fit the model's context length. All of that is `data.dialogue`
(`answer`, `fit_history`); this command parses its arguments, loads the model and runs the terminal. Status
messages go to stderr, so stdout holds only the answers.

Deliberately left out: keeping the KV cache between turns (each turn re-reads the kept history: one prefill,
cheap next to the answer).
"""

from __future__ import annotations

import argparse
import sys

import torch

import lora
from data.dialogue import answer, fit_history
from tinyllama.checkpoint import DEFAULT_MODEL, resolve_checkpoint
from tinyllama.export import load_adapted, resolve_base
from tinyllama.runtime import DTYPES, apply_plan, plan_runtime, resolve_device, resolve_dtype
from tinyllama.settings_file import add_config_flag, parse_with_file
from tinyllama.templates import adapter_template
from tinyllama.tokenizer import load_tokenizer


def load(model: str | None = None, adapter: str | None = None, merge: bool = False, device: str = "cpu",
         dtype: torch.dtype = torch.float32):
    """The model with its adapter (if any) loaded, merged if asked, in eval mode; and the checkpoint folder.

    `model`: a checkpoint folder or Hub id; None is the base the adapter records, or DEFAULT_MODEL without one.
    """
    if merge and adapter is None:
        raise ValueError("--merge needs an --adapter to merge")
    found = lora.read_adapter_file(adapter) if adapter else None  # first: it says what is wrong with the folder
    folder = resolve_base(found, model)[1] if found else resolve_checkpoint(model or DEFAULT_MODEL)
    return load_adapted(folder, found, merge=merge, dtype=dtype, device=device).eval(), folder


def _parse(argv):
    p = argparse.ArgumentParser(prog="python chat.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint folder or Hub id (default: the base the adapter records, "
                   f"base_model_name_or_path in its adapter_config.json; without --adapter, {DEFAULT_MODEL})")
    p.add_argument("--adapter", help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the weights (faster)")
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json, or a folder holding one "
                   "(default: the model folder's)")
    p.add_argument("--prompt", help="answer this one message and exit, instead of chatting")
    p.add_argument("--system", help="a system prompt before the conversation (the template must have a system "
                   "role; guanaco has none)")
    p.add_argument("--chat-template", metavar="SPEC", help="a built-in (guanaco, chatml, llama2, llama3, zephyr, "
                   "mistral), model (the model's own) or a .jinja file (default: the adapter's chat_template.jinja, "
                   "else the model's, else guanaco)")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    add_config_flag(p)
    return parse_with_file(p, argv)


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        device = resolve_device(args.device)
    except RuntimeError as e:
        print(f"error: --device {args.device!r}: {e}", file=sys.stderr)
        return 2
    dtype = resolve_dtype(args.dtype, device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"error: --device {args.device} asked for CUDA, but this machine has no usable GPU "
              "(torch.cuda.is_available() is False); use --device cpu", file=sys.stderr)
        return 2
    try:
        model, folder = load(args.model, args.adapter, args.merge, device, dtype)
        tokenizer = load_tokenizer(args.tokenizer or folder)
        template = adapter_template(args.chat_template, args.adapter, folder, tokenizer)
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokenizer.vocab_size > model.config.vocab_size:  # a larger embedding table (padded) is fine
        print(f"error: the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size} "
              "embeddings; pass the model's own tokenizer with --tokenizer", file=sys.stderr)
        return 2
    plan = plan_runtime(model.config, device, dtype, lora_config=model.lora_config)  # as training runs it
    apply_plan(model, plan)
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed, template=template, system=args.system)
    context = model.config.context_length

    if args.prompt is not None:
        try:
            with plan.forward():
                answer(model, tokenizer, args.prompt, on_text=_write, **sampling)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        _write("\n")
        return 0

    print(f"chatting with {args.model or folder}{' + ' + args.adapter if args.adapter else ''} on {device} ({dtype}). "
          "/reset clears the history, /exit or Ctrl-D quits.", file=sys.stderr)
    history: list[str] = []
    while True:
        sys.stderr.write(">>> ")
        sys.stderr.flush()
        try:
            line = sys.stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:  # EOF
            break
        message = line.strip()
        if not message:
            continue
        if message == "/exit":
            break
        if message == "/reset":
            history = []
            print("(history cleared)", file=sys.stderr)
            continue
        try:
            turns, _ = fit_history(tokenizer, history + [message], args.max_new_tokens, context, template,
                                   args.system)
            dropped = (len(history) + 1 - len(turns)) // 2
            if dropped:
                print(f"(dropped the {dropped} oldest exchange(s) to fit the context)", file=sys.stderr)
            with plan.forward():
                reply = answer(model, tokenizer, turns, on_text=_write, **sampling)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            _write("\n")
            print("(interrupted; this exchange is not kept)", file=sys.stderr)
            continue
        _write("\n")
        # An empty reply cannot be a turn of a conversation; such an exchange is not kept.
        history = turns + [reply] if reply else turns[:-1]
    return 0


if __name__ == "__main__":
    sys.exit(main())
