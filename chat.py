"""Chat with TinyLlama (and a LoRA adapter) in the guanaco format: a terminal chat, a one-shot answer, `answer()`.

    python chat.py --adapter runs/r64/adapter                     # interactive; /reset, /exit
    python chat.py --adapter runs/r64/adapter --prompt "Hi!"      # one answer on stdout, scriptable

The model is `--model`, else the base the adapter records (`base_model_name_or_path` in its adapter_config.json,
as `make export` reads it), else TinyLlama_v1.1 from the Hub (`DEFAULT_MODEL`).

Each user message becomes `### Human: {message}### Assistant:` after the earlier turns, tokenized exactly as
training tokenized conversations (`data.encode_prompt`: BOS first, EOS after every earlier reply). The
answer streams as it is generated and ends at EOS, at the next `### Human:` (not shown), or after
`--max-new-tokens`. The oldest exchanges are dropped when the conversation and the answer would not fit the
model's context length. Status messages go to stderr, so stdout holds only the answers.

Deliberately left out: system prompts, other chat templates, and keeping the KV cache between turns (each turn
re-reads the kept history: one prefill, cheap next to the answer).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import torch

import lora
from data import encode_prompt
from data.guanaco import ASSISTANT, HUMAN, MARKERS, Turn, render
from tinyllama.checkpoint import DEFAULT_MODEL, load_model, resolve_checkpoint
from tinyllama.export import resolve_base
from tinyllama.generation import StopStrings, generate
from tinyllama.runtime import DTYPES, configure_runtime, resolve_device, resolve_dtype
from tinyllama.tokenizer import load_tokenizer

HUMAN_MARKER, ASSISTANT_MARKER = MARKERS[HUMAN], MARKERS[ASSISTANT]
# A reply ends where the model starts the next human turn. It never holds "### Assistant:" either (training
# conversations cannot: data.guanaco refuses markers inside turns), and one that did could not be kept in the
# history, so that ends a reply too.
STOP_STRINGS = (HUMAN_MARKER, ASSISTANT_MARKER)


def _as_turns(history_or_prompt: str | Sequence[str]) -> list[str]:
    turns = [history_or_prompt] if isinstance(history_or_prompt, str) else list(history_or_prompt)
    if len(turns) % 2 != 1:
        raise ValueError(f"a conversation to answer alternates human, assistant, ..., human: an odd number of "
                         f"turns, got {len(turns)}")
    turns = [t.strip() for t in turns]
    for i, t in enumerate(turns):
        if not t:
            raise ValueError(f"turn {i + 1} is empty")
        for marker in MARKERS.values():
            if marker in t:
                raise ValueError(f"turn {i + 1} contains the marker {marker!r}, which would split it in two")
    return turns


def conversation(turns: str | Sequence[str]) -> list[Turn]:
    """`turns` (alternating human, assistant, ..., human; one string is one human turn) as a guanaco conversation:
    `data.encode_prompt(conversation(turns), tokenizer)` are the ids the model continues."""
    return [Turn(HUMAN if i % 2 == 0 else ASSISTANT, t) for i, t in enumerate(_as_turns(turns))]


def format_prompt(turns: str | Sequence[str]) -> str:
    """The guanaco text the model continues: `### Human: q1### Assistant: a1### Human: q2### Assistant:`.

    The model sees this text with BOS in front and EOS after each earlier reply (`data.encode_prompt`).
    """
    return render(conversation(turns)) + ASSISTANT_MARKER


def fit_history(tokenizer, turns: str | Sequence[str], max_new_tokens: int,
                context_len: int) -> tuple[list[str], list[int]]:
    """Drop the oldest exchanges until the prompt plus `max_new_tokens` fits `context_len`; (turns, ids)."""
    turns = _as_turns(turns)
    while True:
        ids = encode_prompt(conversation(turns), tokenizer)
        if len(ids) + max_new_tokens <= context_len:
            return turns, ids
        if len(turns) == 1:
            raise ValueError(f"the message is {len(ids)} tokens; with max_new_tokens={max_new_tokens} that is "
                             f"more than the context length ({context_len}): shorten it or ask for fewer tokens")
        turns = turns[2:]


class TextStream:
    """Turns tokens into text as they arrive, showing only text that can no longer change.

    Each `push` decodes the whole answer so far (so SentencePiece spaces and multi-byte characters come out
    right) and passes the new suffix to `write`, holding back an incomplete UTF-8 character and any tail that
    could be the start of a stop string. `finish()` returns the final text, cut at the first stop string.
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = STOP_STRINGS,
                 write: Callable[[str], None] | None = None):
        self.tokenizer, self.write = tokenizer, write
        self.stop = StopStrings(tokenizer, stop_strings)
        self.ids: list[int] = []
        self.shown = 0

    def _cut(self, text: str) -> str:
        at = self.stop.find(text)
        return text if at < 0 else text[:at]

    def push(self, token_id: int) -> None:
        self.ids.append(token_id)
        if self.write is None:
            return
        text = self._cut(self.tokenizer.decode(self.ids)).rstrip("\ufffd")
        for n in range(min(len(text), max((len(s) for s in self.stop.strings), default=0)), 0, -1):
            if any(s.startswith(text[-n:]) for s in self.stop.strings):
                text = text[:-n]
                break
        if len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)

    def finish(self) -> str:
        text = self._cut(self.tokenizer.decode(self.ids))
        if self.write is not None and len(text) > self.shown:
            self.write(text[self.shown:])
            self.shown = len(text)
        return text


def answer(model, tokenizer, history_or_prompt: str | Sequence[str], max_new_tokens: int = 256, *,
           temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
           seed: int | None = None, on_text: Callable[[str], None] | None = None) -> str:
    """The model's reply to a prompt (or to the last human turn of `[human, assistant, ..., human]`).

    Greedy by default. Stops at EOS, at `### Human:` (cut off, not returned) or after `max_new_tokens`; the
    oldest exchanges are dropped if the conversation would not fit the context. `on_text` receives the reply
    piece by piece as it is generated. Returns the reply with surrounding whitespace stripped.
    """
    _, ids = fit_history(tokenizer, history_or_prompt, max_new_tokens, model.config.context_length)
    stream = TextStream(tokenizer, STOP_STRINGS, on_text)
    generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
             stop=stream.stop, eos_id=tokenizer.eos_id, on_token=stream.push)
    return stream.finish().strip()


# ---- command line ---------------------------------------------------------------------------------------


def load(model: str | None = None, adapter: str | None = None, merge: bool = False, device: str = "cpu",
         dtype: torch.dtype = torch.float32):
    """The model with its adapter (if any) loaded, merged if asked, in eval mode; and the checkpoint folder.

    `model`: a checkpoint folder or Hub id; None is the base the adapter records, or DEFAULT_MODEL without one.
    """
    if merge and adapter is None:
        raise ValueError("--merge needs an --adapter to merge")
    config = lora.read_adapter_config(adapter) if adapter else None  # first: it says what is wrong with the folder
    folder = resolve_base(adapter, model)[1] if adapter else resolve_checkpoint(model or DEFAULT_MODEL)
    llama = load_model(folder, dtype=dtype, device=device, lora=config)
    if adapter:
        lora.load_adapter(llama, adapter)
        if merge:
            lora.merge(llama)
    return llama.eval(), folder


def _parse(argv):
    p = argparse.ArgumentParser(prog="python chat.py", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="checkpoint folder or Hub id (default: the base the adapter records, "
                   f"base_model_name_or_path in its adapter_config.json; without --adapter, {DEFAULT_MODEL})")
    p.add_argument("--adapter", help="LoRA adapter folder (adapter_config.json + adapter_model.safetensors)")
    p.add_argument("--merge", action="store_true", help="fold the adapter into the weights (faster)")
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json, or a folder holding one "
                   "(default: the model folder's)")
    p.add_argument("--prompt", help="answer this one message and exit, instead of chatting")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (temperature > 0)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="auto: bfloat16 on CUDA, float32 on CPU")
    return p.parse_args(argv)


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
    except (ValueError, OSError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if tokenizer.vocab_size > model.config.vocab_size:  # a larger embedding table (padded) is fine
        print(f"error: the tokenizer has {tokenizer.vocab_size} tokens but the model only {model.config.vocab_size} "
              "embeddings; pass the model's own tokenizer with --tokenizer", file=sys.stderr)
        return 2
    runtime = configure_runtime(model, device, dtype)  # this machine's attention kernels, as in training
    sampling = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                    top_p=args.top_p, seed=args.seed)
    context = model.config.context_length

    if args.prompt is not None:
        try:
            with runtime.forward():
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
            turns, _ = fit_history(tokenizer, history + [message], args.max_new_tokens, context)
            dropped = (len(history) + 1 - len(turns)) // 2
            if dropped:
                print(f"(dropped the {dropped} oldest exchange(s) to fit the context)", file=sys.stderr)
            with runtime.forward():
                reply = answer(model, tokenizer, turns, on_text=_write, **sampling)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            continue
        except KeyboardInterrupt:
            _write("\n")
            print("(interrupted; this exchange is not kept)", file=sys.stderr)
            continue
        _write("\n")
        # An empty reply cannot be a turn of a guanaco conversation; such an exchange is not kept.
        history = turns + [reply] if reply else turns[:-1]
    return 0


if __name__ == "__main__":
    sys.exit(main())
