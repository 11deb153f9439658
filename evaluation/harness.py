"""This project's model as an lm-evaluation-harness model (`lm_eval.api.model.TemplateLM`), so `lm_eval` scores
a base model and a LoRA, DoRA or NF4 (QLoRA) adapter as it is held in memory, unmerged.

    lm = HarnessLM(model, tokenizer, template=template, batch_size=16)
    results = lm_eval.simple_evaluate(model=lm, tasks=["hellaswag"])

It computes what lm-eval's `hf` model (`lm_eval.models.huggingface.HFLM`) computes from the same weights, and
gets there the same way where the ids are concerned:
- text is encoded as transformers' tokenizer encodes it (`data.encode_rendered`: special-token text such as a
  chat template's `<s>` or `<|im_end|>` is one id), with BOS in front unless the text already starts with it;
- `TemplateLM` splits context and continuation (trailing spaces of the context move to the continuation; the
  continuation is what encoding the whole adds beyond the context), an empty context is the BOS (else EOS);
- a context and continuation longer than the model's `max_position_embeddings` + 1 lose tokens on the left;
  rolling loglikelihoods cut a text into lm-eval's own disjoint windows;
- generation is greedy unless the request samples, ends at EOS, at a stop string (`until`, and the EOS text)
  or after `max_gen_toks` (256 by default), and the text is cut at the first stop string as `hf` cuts it.

Where it differs is how the work is batched:
- Loglikelihood requests with the same context (the choices of a multiple-choice question) share one forward
  pass of the context: it runs once into a key/value cache, and each continuation runs after it against a
  copy of that cache. `hf` runs context + continuation once per choice (it shares only when every choice is one
  token). `share_context=False` runs every request alone, as `hf` does, for comparison.
- `batch_size` counts the rows of one forward pass: contexts are left-padded (masked, positioned from their
  first token) and continuations right-padded. The longest requests come first.
- Generation is `tinyllama.generation.generate_batch`: the prompts are left-padded into one KV cache.

Deliberately left out: `batch_size="auto"`, several processes or GPUs (one process, one device), sampling
settings beyond temperature, top_k and top_p (others are refused), and lm-eval's `think_end_token`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, has_bos_prefix, normalize_gen_kwargs
from lm_eval.models.utils import postprocess_generated_text as cut_at_stop

from data.encoding import encode_rendered
from tinyllama.generation import generate_batch
from tinyllama.model import KVCache
from tinyllama.templates import Template, special_pattern

MAX_GEN_TOKS = 256  # `hf`'s default for a request that names no max_gen_toks
# The generation settings a request may carry; the ones HFLM passes on to transformers beyond these (beams,
# penalties, ...) have no counterpart in tinyllama.generation.
SAMPLING_KEYS = {"do_sample", "temperature", "top_k", "top_p"}
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "  # transformers' marker for continue_final_message


class HarnessLM(TemplateLM):
    """`model` (a `tinyllama.Llama`, adapter loaded or not, in eval mode) and its `tokenizer` as an lm-eval LM.

    `template`: the chat template for `--apply-chat-template` (None: requests with a chat template are refused).
    `name`: how results name the model (lm-eval's `model_name`, also the tokenizer's name for its cache keys).
    """

    def __init__(self, model, tokenizer, *, template: Template | None = None, batch_size: int = 8,
                 share_context: bool = True, name: str = "tinyllama", max_gen_toks: int = MAX_GEN_TOKS):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.template = template.bind(tokenizer) if template is not None else None
        self._batch_size = batch_size
        self.share_context = share_context
        self.name = name
        self.max_gen_toks = max_gen_toks
        self.max_length = model.config.max_position_embeddings  # what HFLM reads from config.json
        weight = model.model.embed_tokens.weight
        self._device, self.dtype = weight.device, weight.dtype
        # An adapter kept in float32 on a bfloat16 base: autocast meets the dtypes in the middle, as generation does.
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        self._mixed = len(dtypes) > 1
        self._special = special_pattern(tokenizer)

    # -- what TemplateLM and the evaluator ask of a model ------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        """HFLM's: the BOS token's id where the tokenizer names one, whether or not it starts a text with it
        (Phi-3 names <s> and adds none), else the EOS."""
        bos = self.tokenizer.special_tokens.get(self.tokenizer.bos_token) if self.tokenizer.bos_token else None
        return bos if bos is not None else self.tokenizer.eos_id

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.name.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        return self._template().source

    def get_model_info(self) -> dict:
        trainable, total = (sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                            sum(p.numel() for p in self.model.parameters()))
        return {"model_num_parameters": total, "model_trainable_parameters": trainable,
                "model_dtype": str(self.dtype), "model_revision": "", "model_sha": ""}

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        """transformers' `tokenizer.encode(string)`: BOS added unless `add_special_tokens` is False or (when it is
        None) the text starts with the BOS text, as HFLM.tok_encode decides."""
        add = add_special_tokens if add_special_tokens is not None else True
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.bos_token):
            add = False
        ids = self._encode_text(string)
        if add and self.tokenizer.bos_id is not None:
            ids = [self.tokenizer.bos_id] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _encode_text(self, string: str) -> list[int]:
        if self._special is not None and self._special.search(string):
            return encode_rendered(string, self.tokenizer)
        if not string:
            return []
        # transformers' SentencePiece conversion (Metaspace, prepend_scheme "first") puts the dummy-prefix space
        # only before a text that does not already start with one; SentencePiece itself always does, so " blue"
        # would gain a lone "▁". encode_inside is the text without the dummy prefix.
        if string.startswith(" "):
            return self.tokenizer.encode_inside(string)
        return self.tokenizer.encode(string, bos=False)

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        if isinstance(tokens, int):
            tokens = [tokens]
        if not skip_special_tokens and list(tokens) == [self.tokenizer.eos_id]:
            return self.tokenizer.eos_token  # the stop text HFLM adds to every generation's `until`
        return self.tokenizer.decode(tokens)

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The text transformers' `apply_chat_template(chat_history, tokenize=False, add_generation_prompt=...,
        continue_final_message=not add_generation_prompt)` gives, as HFLM calls it."""
        template = self._template()
        if add_generation_prompt:
            return template.render(chat_history, add_generation_prompt=True)
        # Continue the last message: render it with transformers' tag after it and cut the text at the tag.
        if not chat_history:
            raise ValueError("continue_final_message is set but the conversation is empty")
        tagged = [*chat_history[:-1], {**chat_history[-1], "content": chat_history[-1]["content"] + _CONTINUE_TAG}]
        text = template.render(tagged)
        final = chat_history[-1]["content"].strip()
        if final not in text or _CONTINUE_TAG.strip() not in text:
            raise ValueError(f"chat template {template.label} does not render the final message whole, so it "
                             "cannot be continued (a task's gen_prefix needs that)")
        at = text.rindex(_CONTINUE_TAG.strip())
        return text[:at] if text[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else text[:at].rstrip()

    def _template(self) -> Template:
        if self.template is None:
            raise ValueError("a chat template was asked for, but this model was given none")
        return self.template

    # -- loglikelihoods --------------------------------------------------------------------------------------

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """The whole text's loglikelihood, in lm-eval's disjoint windows of at most `max_length` tokens (the first
        predicted from the BOS), each scored as a loglikelihood request."""
        windows, owner = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows), strict=True):
            totals[i] += logprob
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives the continuation) of each
        (request, context ids, continuation ids)."""
        groups: dict[tuple, list[tuple[int, list[int]]]] = {}
        for i, (_, context, continuation) in enumerate(requests):
            if not context or not continuation:
                raise ValueError(f"request {i} has an empty context or continuation; TemplateLM never makes one")
            if len(continuation) > self.max_length:
                raise ValueError(f"a continuation of {len(continuation)} tokens is longer than the model's context "
                                 f"length ({self.max_length})")
            # What HFLM feeds the model: context + continuation cut to max_length + 1 tokens from the left.
            context = list(context)[max(0, len(context) + len(continuation) - self.max_length - 1):]
            key = tuple(context) if self.share_context else (i, *context)
            groups.setdefault(key, []).append((i, list(continuation)))
        # Longest first, as HFLM orders them: the first batch shows at once whether memory suffices.
        order = sorted(groups, key=lambda k: -(len(k) + max(len(c) for _, c in groups[k])))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        batch: list[tuple[list[int], list[tuple[int, list[int]]]]] = []
        rows = 0
        for key in order:
            conts = groups[key]
            if batch and rows + len(conts) > self.batch_size:
                self._score(batch, results)
                batch, rows = [], 0
            batch.append((list(key[1:] if not self.share_context else key), conts))
            rows += len(conts)
        if batch:
            self._score(batch, results)
        for (request, _, _), answer in zip(requests, results, strict=True):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, answer)
        return results

    def _autocast(self):
        return torch.autocast(self._device.type, dtype=self.dtype) if self._mixed else contextlib.nullcontext()

    @torch.inference_mode()
    def _score(self, batch: Sequence[tuple[list[int], list[tuple[int, list[int]]]]], results: list) -> None:
        """Score a batch of contexts, each with its continuations: the contexts run once (left-padded) into a KV
        cache; every continuation but its last token then runs (right-padded) against its context's cache."""
        config, device = self.model.config, self._device
        G, L = len(batch), max(len(ctx) for ctx, _ in batch)
        rows = [(g, i, cont) for g, (_, conts) in enumerate(batch) for i, cont in conts]
        T = max(len(cont) for _, _, cont in rows) - 1  # continuation tokens that are inputs
        ids = torch.zeros(G, L, dtype=torch.long)
        mask = torch.zeros(G, L, dtype=torch.bool)
        for g, (ctx, _) in enumerate(batch):
            ids[g, L - len(ctx):] = torch.tensor(ctx)
            mask[g, L - len(ctx):] = True
        ids, mask = ids.to(device), mask.to(device)
        padded = not bool(mask.all())
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)
        cache = KVCache(config, G, L, device=device, dtype=self.dtype)
        with self._autocast():
            h = self.model.hidden_states(ids, position_ids=positions, cache=cache,
                                         attention_mask=mask if padded else None)
            first = torch.log_softmax(self.model.logits(h[:, -1]).float(), dim=-1)  # [G, vocab]: each cont[0]
            rest = None
            if T > 0:
                which = torch.tensor([g for g, _, _ in rows], device=device)
                row_cache = KVCache(config, len(rows), L + T, device=device, dtype=self.dtype)
                row_cache.k[:, :, :, :L] = cache.k[:, which]
                row_cache.v[:, :, :, :L] = cache.v[:, which]
                row_cache.length = L
                inputs = torch.zeros(len(rows), T, dtype=torch.long)
                for r, (_, _, cont) in enumerate(rows):
                    inputs[r, :len(cont) - 1] = torch.tensor(cont[:-1], dtype=torch.long)
                # Right padding needs no mask of its own: a real token never attends to the padding after it.
                row_mask = torch.cat([mask[which], torch.ones(len(rows), T, dtype=torch.bool, device=device)], 1)
                row_positions = mask.sum(-1)[which, None] + torch.arange(T, device=device)
                h = self.model.hidden_states(inputs.to(device), position_ids=row_positions, cache=row_cache,
                                             attention_mask=row_mask if padded else None)
                rest = torch.log_softmax(self.model.logits(h).float(), dim=-1)  # [rows, T, vocab]
        for r, (g, i, cont) in enumerate(rows):
            logprobs = first[g, None] if rest is None else torch.cat([first[g, None], rest[r, :len(cont) - 1]])
            target = torch.tensor(cont, device=device)
            chosen = logprobs.gather(-1, target[:, None]).squeeze(-1)
            results[i] = (float(chosen.sum()), bool((logprobs.argmax(-1) == target).all()))

    # -- generation ------------------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each request's continuation of its context, cut at the first stop string. Requests with the same
        generation settings are batched, longest first."""
        args = [req.args for req in requests]
        groups: dict[str, list[int]] = {}
        for i, (_, gen_kwargs) in enumerate(args):
            groups.setdefault(json.dumps(gen_kwargs, sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for indices in groups.values():
            indices.sort(key=lambda i: -len(self.tok_encode(args[i][0])))
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                texts = self._generate([args[i][0] for i in chunk], args[chunk[0]][1])
                for i, text in zip(chunk, texts, strict=True):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", args[i], text)
        return out

    def _generate(self, contexts: list[str], gen_kwargs: dict) -> list[str]:
        kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok_decode(self.eot_token_id, False))
        max_gen_toks = kwargs.pop("max_gen_toks")
        unknown = sorted(set(kwargs) - SAMPLING_KEYS)
        if unknown:
            raise ValueError(f"generation settings {unknown} are not supported; this model takes "
                             f"{sorted(SAMPLING_KEYS | {'until', 'max_gen_toks'})}")
        temperature = float(kwargs.get("temperature") or 0.0) if kwargs.get("do_sample") else 0.0
        max_ctx_len = self.max_length - max_gen_toks
        if max_ctx_len <= 0:
            raise ValueError(f"max_gen_toks={max_gen_toks} leaves no room for a prompt in the model's context length "
                             f"({self.max_length})")
        # HFLM's tok_batch_encode: BOS is added to all or none, by whether the first text starts with it.
        add = not has_bos_prefix(contexts[0], self.tokenizer.bos_token)
        prompts = [self.tok_encode(c, add_special_tokens=add, left_truncate_len=max_ctx_len) for c in contexts]
        stop = StopText(self.tokenizer, until)
        new = generate_batch(self.model, prompts, max_gen_toks, temperature=temperature, top_k=kwargs.get("top_k"),
                             top_p=kwargs.get("top_p"), stop=stop)
        return [cut_at_stop(self.tokenizer.decode(ids), until, None) for ids in new]


class StopText:
    """A `stop` for `generate_batch` that ends a row once its text holds one of `strings`, keeping every token:
    the text is cut at the stop string afterwards, to the character, as HFLM cuts it (`tinyllama.generation.
    StopStrings` drops the whole token a stop string starts in)."""

    def __init__(self, tokenizer, strings: Sequence[str]):
        self.tokenizer = tokenizer
        self.strings = tuple(s for s in strings if s)
        # Every token decodes to at least one byte; +2 for the dummy-prefix space a decode may drop.
        self.window = max((len(s.encode("utf-8")) for s in self.strings), default=0) + 2

    def _holds(self, ids) -> bool:
        text = self.tokenizer.decode(ids)
        return any(s in text for s in self.strings)

    def __call__(self, new_ids: list[int]) -> int | None:
        if self.strings and self._holds(new_ids[-self.window:]) and self._holds(new_ids):
            return len(new_ids)
        return None
