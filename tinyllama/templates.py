"""Chat templates: how a conversation becomes the text a model is trained on and later chats in.

    template = load_template("llama3")                  # a built-in, "model", or a path to a .jinja file
    text = template.render([{"role": "user", "content": "hi"}], add_generation_prompt=True)

A template is Jinja source, rendered exactly as transformers' `apply_chat_template(..., tokenize=False)` renders
it: a sandboxed environment with `trim_blocks` and `lstrip_blocks`, the loop-control extension, a `{% generation
%}` block that renders its body, `raise_exception`, `strftime_now`, a `tojson` that does not escape HTML, and the
variables `messages`, `tools` (none), `documents` (none), `add_generation_prompt` and the tokenizer's
`bos_token`, `eos_token` and `unk_token`. jinja2 comes with torch, so this adds no dependency.

`load_template(spec, model_dir=None, tokenizer=None)`:
- a built-in name (`BUILTINS`): `guanaco` (the project's `### Human: …### Assistant: …</s>`, the default for a
  model without a template), `chatml`, `llama2`, `llama3` (3.0's format, no date block), `zephyr`
  (TinyLlama-1.1B-Chat), `mistral` (Mistral Instruct v0.3 without tools: a system message goes into the last
  user turn, as Mistral's own template puts it);
- `model`: the model folder's own, from `chat_template.jinja` or `tokenizer_config.json`'s `chat_template` (the
  one named `default` where it holds several);
- a path to a `.jinja` file (the adapter's `chat_template.jinja` is one).

`Template.layout` says where each message's content sits in the rendered text (`data.encoding` labels the
replies from it), and `end_of_turn_token` which special token the template ends an assistant turn with (the
label's end, and where generation stops; the export adds it to generation_config.json).

`bind(tokenizer)` fills in the tokenizer's special tokens and, for `guanaco`, writes the start the tokenizer
needs to give the project's guanaco ids: `{{ bos_token }}` only where the tokenizer adds a BOS (SmolLM2's adds none),
followed by a space where SentencePiece would put its dummy prefix (transformers encodes the text after a
special token without one; the space stands for it, so `<s> ### Human:` is BOS, `▁###`, ...).

Deliberately left out: tools and documents (a row with tool messages is refused when loaded), rendering
`continue_final_message`, and templates that need a variable transformers does not pass.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import re
import threading
import time
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .tokenizer import load_tokenizer, read_tokenizer_config

MODEL = "model"
DEFAULT_TIMEOUT = 10.0  # seconds to render one conversation: generous, a real template takes well under 1 ms
ADAPTER_FILE = "chat_template.jinja"  # beside the adapter, as transformers 5 saves a tokenizer's template
# The markers guanaco text splits on; one inside a turn would re-split differently (and teach the model to emit
# it), so the template refuses such a turn.
GUANACO_MARKERS = ("### Human:", "### Assistant:")

_GUANACO_BODY = """\
{%- for message in messages -%}
{%- if '### Human:' in message['content'] or '### Assistant:' in message['content'] -%}
{{- raise_exception('a turn holds a guanaco marker (### Human: or ### Assistant:)') -}}
{%- endif -%}
{%- if message['role'] == 'user' -%}
{{- '### Human: ' + message['content'] -}}
{%- elif message['role'] == 'assistant' -%}
{{- '### Assistant: ' + message['content'] + eos_token -}}
{%- else -%}
{{- raise_exception('the guanaco format has no ' + message['role'] + ' turn') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '### Assistant:' -}}{%- endif -%}
"""

BUILTINS = {
    "guanaco": "{{- bos_token + ' ' }}" + _GUANACO_BODY,  # `bind` adapts the start to the tokenizer
    "chatml": """\
{%- for message in messages -%}
{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
""",
    "llama2": """\
{%- if messages[0]['role'] == 'system' -%}
{%- set system_message = messages[0]['content'] -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
{%- endif -%}
{%- set content = message['content'] -%}
{%- if loop.index0 == 0 and system_message is defined -%}
{%- set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + content -%}
{%- endif -%}
{%- if message['role'] == 'user' -%}
{{- bos_token + '[INST] ' + content.strip() + ' [/INST]' -}}
{%- elif message['role'] == 'assistant' -%}
{{- ' ' + content.strip() + ' ' + eos_token -}}
{%- endif -%}
{%- endfor -%}
""",
    "llama3": """\
{%- for message in messages -%}
{%- if loop.first -%}{{- bos_token -}}{%- endif -%}
{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}{%- endif -%}
""",
    "zephyr": """\
{%- for message in messages -%}
{%- if message['role'] not in ['system', 'user', 'assistant'] -%}
{{- raise_exception('the zephyr format has no ' + message['role'] + ' turn') -}}
{%- endif -%}
{{- '<|' + message['role'] + '|>\\n' + message['content'] + eos_token + '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>\\n' -}}{%- endif -%}
""",
    "mistral": """\
{%- if messages[0]['role'] == 'system' -%}
{%- set system_message = messages[0]['content'] -%}
{%- set loop_messages = messages[1:] -%}
{%- else -%}
{%- set loop_messages = messages -%}
{%- endif -%}
{{- bos_token -}}
{%- for message in loop_messages -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{- raise_exception('After the optional system message, conversation roles must alternate '
                    'user/assistant/user/assistant/...') -}}
{%- endif -%}
{%- if message['role'] == 'user' -%}
{%- if loop.last and system_message is defined -%}
{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' -}}
{%- else -%}
{{- '[INST] ' + message['content'] + '[/INST]' -}}
{%- endif -%}
{%- else -%}
{{- ' ' + message['content'] | trim + eos_token -}}
{%- endif -%}
{%- endfor -%}
""",
}


_SENTINEL = "\ue000{}\ue001"  # private-use characters: no tokenizer or template gives them meaning
_SENTINEL_RE = re.compile("\ue000(\\d+)\ue001")


class TemplateRefused(ValueError):
    """The template's `raise_exception` refused a conversation; `reason` is its message."""

    def __init__(self, message: str):
        super().__init__(f"the chat template refused the conversation: {message}")
        self.reason = message


@dataclasses.dataclass(frozen=True)
class Template:
    """A chat template: its Jinja `source`, its `name` (a built-in, "model" or a path) and the special tokens
    it is rendered with (`bind` sets them from a tokenizer)."""

    name: str
    source: str
    bos_token: str | None = "<s>"
    eos_token: str | None = "</s>"
    unk_token: str | None = "<unk>"
    origin: str | None = None  # the file a model's template was read from
    timeout: float = DEFAULT_TIMEOUT  # seconds one render may take (a template may loop for ever)

    @property
    def stop_strings(self) -> tuple[str, ...]:
        """Text that ends a reply besides the end-of-turn tokens: guanaco's markers (also when the template was
        read back from an adapter's chat_template.jinja)."""
        return GUANACO_MARKERS if _GUANACO_BODY in self.source else ()

    def render(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The text of `messages` ([{"role", "content"}, ...]), as transformers' `apply_chat_template(messages,
        tokenize=False, add_generation_prompt=...)` gives it. Raises TemplateRefused for `raise_exception`."""
        special = {k: v for k in ("bos_token", "eos_token", "unk_token") if (v := getattr(self, k)) is not None}
        template, globals_ = _compiled(self.source)
        context = {**globals_, **special, "messages": messages, "tools": None, "documents": None,
                   "add_generation_prompt": add_generation_prompt}
        _deadline.start(self)
        try:
            # Template.render's work, without merging the environment's globals anew for every conversation.
            return "".join(template.root_render_func(template.environment.context_class(
                template.environment, context, template.name, template.blocks, globals_)))
        except _Raised as e:
            raise TemplateRefused(e.message) from None
        except RenderTimeout:
            raise
        except Exception as e:  # noqa: BLE001 - the template is the user's code: whatever it raises is its error
            hint = ("; the tokenizer names none of it in tokenizer_config.json" if isinstance(e, jinja2.UndefinedError)
                    and "_token" in str(e) else "")
            raise ValueError(f"chat template {self.label} failed to render: {type(e).__name__}: {e}{hint}") from None

    @property
    def label(self) -> str:
        """The template's name for error messages, with the file it came from where the name is not one."""
        return repr(self.name) + (f" ({self.origin})" if self.origin else "")

    def layout(self, messages: list[dict], add_generation_prompt: bool = False):
        """(the rendered text, [(start, end, message index or None)]): the parts of the text in order, each a
        message's text as the template rendered it or text the template wrote around them.

        Found by rendering twice: as it is, and with each content replaced by a sentinel (once per sequence of
        roles, cached); the sentinels say where each content sits, and putting the contents back must give the
        real text exactly. A message's rendered text is its content, or its content with whitespace trimmed at
        either edge or both (Llama 2 and 3.x and Mistral v0.3 trim content: training on what they render needs
        the trimmed text); any other change raises LayoutError. Rendering prefixes would not do: Mistral
        v0.3's template moves the system message into the last user turn, so a prefix renders differently
        from the whole."""
        text = self.render(messages, add_generation_prompt)
        roles = tuple(m["role"] for m in messages)
        layout = _marked_layout(self, roles, add_generation_prompt)
        spans = _fit(layout, messages, text)
        if spans is None:  # a layout that depends on the contents: find it for these
            layout = _marked_layout.__wrapped__(self, roles, add_generation_prompt, messages)
            spans = _fit(layout, messages, text)
        if spans is None:
            raise self._layout_error(layout, messages, add_generation_prompt)
        return text, spans

    def _layout_error(self, layout, messages: list[dict], add_generation_prompt: bool) -> LayoutError:
        """Why the contents do not fit the template's layout: an empty message the template renders otherwise
        than one with text, or a message whose text the template changes (`_fit` names it)."""
        empty = [i for i, m in enumerate(messages) if not m["content"].strip()]
        if empty:
            filled = [{**m, "content": "x"} if i in empty else m for i, m in enumerate(messages)]
            try:
                fits = _fit(layout, filled, self.render(filled, add_generation_prompt)) is not None
            except ValueError:  # refused with text there: not what the empty message explains
                fits = False
            if fits:
                i = empty[0]
                return LayoutError("template renders an empty message differently",
                                   f"message {i + 1} ({messages[i]['role']}) is empty, and the template renders an "
                                   "empty message otherwise than one with text (it leaves out an empty system "
                                   "prompt, say), so where each message sits cannot be found; remove the empty "
                                   "message, or give it text")
        i = _misfit(layout, messages, self.render(messages, add_generation_prompt))
        which = f"message {i + 1} ({messages[i]['role']})" if i is not None else "a message"
        return LayoutError("template changes message text",
                           f"the template's text holds {which} neither as it is nor with whitespace trimmed at its "
                           "edges: the template edits message text (strips reasoning, rewrites it), which cannot be "
                           "trained on exactly; use a template that renders messages as they are")

    def end_of_turn(self, text: str, spans, k: int, pattern) -> tuple[int, int] | None:
        """Where the special token that ends the message of `spans[k]` sits in `text` (the first one the template
        writes right after it, before the next message), or None."""
        if k + 1 >= len(spans) or spans[k + 1][2] is not None or pattern is None:
            return None
        found = pattern.search(text, spans[k + 1][0], spans[k + 1][1])
        return None if found is None else found.span()

    def end_of_turn_token(self, tokenizer) -> str | None:
        """The special token this template ends an assistant turn with for `tokenizer` (</s>, <|eot_id|>,
        <|im_end|>), or None where it writes none the tokenizer has (chatml's <|im_end|> with Llama 2's)."""
        text, spans, k = self._probe(tokenizer)
        end = self.end_of_turn(text, spans, k, special_pattern(tokenizer))
        return None if end is None else text[end[0]:end[1]]

    def text_after_reply(self, tokenizer) -> str:
        """What this template writes right after an assistant reply, up to the next message (`<|im_end|>\\n`):
        where an end-of-turn token would be, for error messages."""
        text, spans, k = self._probe(tokenizer)
        return text[spans[k + 1][0]:spans[k + 1][1]] if k + 1 < len(spans) and spans[k + 1][2] is None else ""

    def _probe(self, tokenizer):
        """The layout of a one-exchange conversation through this template bound to `tokenizer`, and the index of
        the reply's span: (text, spans, k)."""
        probe = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
        text, spans = self.bind(tokenizer).layout(probe)
        k = next((k for k, (_, _, i) in enumerate(spans) if i == 1), None)
        if k is None:
            raise ValueError(f"chat template {self.label} renders no assistant message: a user 'Hi' and an "
                             f"assistant 'Hello' give {text[:80]!r}; use a template that writes each message")
        return text, spans, k

    def end_of_turn_ids(self, tokenizer) -> list[int]:
        """The tokenizer's EOS, and the special token this template ends an assistant turn with where that is
        another (<|eot_id|>, <|im_end|>): generation stops at any of them."""
        token = self.end_of_turn_token(tokenizer)
        end = None if token is None else tokenizer.special_tokens[token]
        return [tokenizer.eos_id] + ([end] if end is not None and end != tokenizer.eos_id else [])

    def bind(self, tokenizer) -> Template:
        """This template with `tokenizer`'s special tokens (and, for guanaco, the start it needs; see above)."""
        source = self.source
        if self.name == "guanaco" and source == BUILTINS["guanaco"]:
            source = _guanaco_start(tokenizer) + _GUANACO_BODY
        return dataclasses.replace(self, source=source, bos_token=tokenizer.bos_token,
                                   eos_token=tokenizer.eos_token, unk_token=tokenizer.unk_token)


@functools.lru_cache(maxsize=256)
def _marked_layout(template: Template, roles: tuple[str, ...], add_generation_prompt: bool,
                   messages: list[dict] | None = None) -> tuple[str | int, ...]:
    """The template's text for messages of these roles with each content a sentinel, as pieces: template text,
    or a message's index. Cached by roles; `Template.layout` checks that it fits each conversation's text and
    renders it anew (with the messages' other keys) where it does not."""
    marked = [{**(messages[i] if messages else {"role": r}), "content": _SENTINEL.format(i)}
              for i, r in enumerate(roles)]
    parts = _SENTINEL_RE.split(template.render(marked, add_generation_prompt))
    return tuple(int(p) if k % 2 else p for k, p in enumerate(parts) if k % 2 or p)


def _renderings(content: str) -> list[str]:
    """What a template may render of a message: its content, else trimmed at both edges, the right, the left
    (Jinja's `trim` and Python's `strip()` trim the same whitespace)."""
    return list(dict.fromkeys((content, content.strip(), content.rstrip(), content.lstrip())))


def _fit(layout, messages: list[dict], text: str, deepest: list | None = None):
    """Spans of `text` (see `Template.layout`) with the pieces of `layout` in order, each message as one of its
    `_renderings`, or None when no choice of them gives `text`. A search with backtracking: the template text
    after a message decides which rendering fits, so it rarely tries more than one. `deepest`, when given,
    receives the index of the furthest piece that failed to fit."""
    pieces = [messages[p]["content"] if isinstance(p, int) else p for p in layout]
    if deepest is None and "".join(pieces) == text:  # every content as it is: the common case, one comparison
        ends = list(itertools.accumulate(map(len, pieces)))
        return [(end - len(x), end, p if isinstance(p, int) else None) for p, x, end in zip(layout, pieces, ends,
                                                                                            strict=True)]
    options = [[p] if isinstance(p, str) else _renderings(messages[p]["content"]) for p in layout]
    n = len(options)
    at, pick, k = [0] * (n + 1), [-1] * n, 0
    while k >= 0:
        if k == n:
            if at[n] == len(text):
                return [(at[j], at[j + 1], p if isinstance(p, int) else None) for j, p in enumerate(layout)]
            k -= 1
            continue
        pick[k] += 1
        if pick[k] == len(options[k]):
            if deepest is not None and (not deepest or k > deepest[0]):
                deepest[:] = [k]
            pick[k], k = -1, k - 1
            continue
        piece = options[k][pick[k]]
        if text.startswith(piece, at[k]):
            at[k + 1] = at[k] + len(piece)
            k += 1
    return None


def _misfit(layout, messages: list[dict], text: str) -> int | None:
    """The index of the message where fitting `text` failed furthest in (or the message before the template
    text that failed there), or None."""
    deepest: list[int] = []
    _fit(layout, messages, text, deepest)
    k = deepest[0] if deepest else 0
    return next((layout[j] for j in range(k, -1, -1) if isinstance(layout[j], int)), None)


def special_pattern(tokenizer) -> re.Pattern | None:
    """One regex for all of the tokenizer's special tokens, longest first (cached on the tokenizer)."""
    cached = tokenizer.__dict__.get("_special_re", False)
    if cached is False:
        tokens = sorted(tokenizer.special_tokens, key=len, reverse=True)
        cached = re.compile("|".join(map(re.escape, tokens))) if tokens else None
        tokenizer._special_re = cached
    return cached


def _guanaco_start(tokenizer) -> str:
    if tokenizer.bos_id is None:
        return ""
    dummy_prefix = tokenizer.encode("a", bos=False) != tokenizer.encode_inside("a")
    return "{{- bos_token + ' ' }}" if dummy_prefix else "{{- bos_token }}"


class LayoutError(ValueError):
    """A template whose text cannot be split back into its messages; `reason` is a short, countable category."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


class _Raised(jinja2.TemplateError):
    pass


class RenderTimeout(ValueError):
    """A render that took longer than its template's `timeout`."""


class _Deadline(threading.local):
    """When the render under way in this thread must end. Jinja has no while loop, so a render that never ends
    spends its time in for loops (nested ones: `range` is capped at 100,000 by the sandbox) or in calls (macros,
    recursive loops): `_timed_loops` makes every loop check the deadline on each item, and `_Sandbox.call`
    on each call. Neither needs a thread or a signal, so rendering stays usable from any thread."""

    until = float("inf")
    template = None

    def start(self, template: Template) -> None:
        self.until, self.template = time.monotonic() + template.timeout, template

    def check(self) -> None:
        if time.monotonic() > self.until:
            t, self.until = self.template, float("inf")  # said once; the error unwinds the render
            raise RenderTimeout(f"chat template {t.label} took longer than {t.timeout:g} s to render one "
                                "conversation (a loop that never ends?): fix the template, or allow more time "
                                "with --template-timeout")


_deadline = _Deadline()


def _timed(iterable):
    for item in iterable:
        _deadline.check()
        yield item


def _timed_loops(tree: jinja2.nodes.Template) -> jinja2.nodes.Template:
    """`tree` with each `{% for x in ITER %}` iterating `ITER|_timed` instead."""
    for loop in tree.find_all(jinja2.nodes.For):
        loop.iter = jinja2.nodes.Filter(loop.iter, "_timed", [], [], None, None, lineno=loop.lineno)
    return tree


def _raise_exception(message):
    raise _Raised(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it to mark assistant text;
    the labels here come from the messages themselves, see data.encoding)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller):
        return caller()


MAX_SIZE = 10_000_000  # characters or items one `*` or `**` may make: a chat template needs far fewer


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, also refusing `*` and `**` that would make a value past MAX_SIZE before making it (`'a' *
    10**10` would otherwise try to allocate 10 GB; jinja2 bounds `range` alone)."""

    intercepted_binops = frozenset({"*", "**"})

    def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
        _deadline.check()
        return super().call(__context, __obj, *args, **kwargs)

    def call_binop(self, context, operator, left, right):
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_SIZE:
                    raise OverflowError(f"{type(seq).__name__} of length {len(seq)} * {n} would be longer than "
                                        f"{MAX_SIZE}")
        elif (isinstance(left, int) and isinstance(right, int) and right > 0
              and abs(left) > 1 and right * abs(left).bit_length() > MAX_SIZE):
            raise OverflowError(f"{left} ** {right} would have more than {MAX_SIZE} bits")
        return super().call_binop(context, operator, left, right)


@functools.cache
def _environment() -> ImmutableSandboxedEnvironment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters["_timed"] = _timed
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


@functools.lru_cache(maxsize=64)
def _compiled(source: str) -> tuple[jinja2.Template, dict]:
    """The compiled template and the globals every render starts from."""
    try:
        env = _environment()
        template = env.from_string(_timed_loops(env.parse(source)))
        return template, dict(template.globals)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat template is not valid Jinja (line {e.lineno}: {e.message})") from None
    except (RecursionError, MemoryError) as e:  # nesting too deep for the parser
        raise ValueError(f"the chat template cannot be compiled: {type(e).__name__}: {e}") from None


def model_template(model_dir) -> str | None:
    """The chat template a model folder ships: `chat_template.jinja` (what transformers 5 writes), else the
    `chat_template` of `tokenizer_config.json` (a string, or a list of {name, template}: the `default` one).
    None when it has neither."""
    folder = Path(model_dir)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8-sig")  # a BOM is not template text
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = read_tokenizer_config(config).get("chat_template")
    if isinstance(template, list):  # named templates: transformers takes the one named "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{config}: chat_template is a list of named templates "
                             f"({', '.join(map(repr, named)) or 'none readable'}) with none named 'default', so "
                             "which to use is not said; pass --chat-template with a .jinja file holding the one "
                             "you want, or a built-in")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{config}: chat_template must be Jinja source (a string), or a list of {{name, "
                         f"template}} with one named 'default'; found {type(template).__name__} {template!r:.60}. "
                         "Correct the file, or pass --chat-template with a built-in or a .jinja file")
    return template or None  # "" or null: the model ships none


def default_spec(model_dir) -> str:
    """`--chat-template`'s default: the model's own template where it has one, else guanaco."""
    return MODEL if model_dir is not None and model_template(model_dir) is not None else "guanaco"


def load_template(spec: str | None = None, model_dir=None, tokenizer=None) -> Template:
    """The template `spec` names: a built-in (`BUILTINS`), `model` (the one `model_dir` ships), or a path to a
    .jinja file; None means `default_spec(model_dir)`. Bound to `tokenizer` (else to `model_dir`'s tokenizer,
    else Llama's <s> and </s>). Raises ValueError naming what to pass instead."""
    spec = default_spec(model_dir) if spec is None else spec
    if spec in BUILTINS:
        template = Template(spec, BUILTINS[spec])
    elif spec == MODEL:
        source = model_template(model_dir) if model_dir is not None else None
        if source is None:
            where = f"{model_dir} has" if model_dir is not None else "no model folder was given, so there is"
            raise ValueError(f"--chat-template model: {where} no chat template (chat_template.jinja, or "
                             f"chat_template in tokenizer_config.json); pick one of {', '.join(BUILTINS)}, or "
                             "pass a .jinja file")
        jinja_file = Path(model_dir) / "chat_template.jinja"
        origin = jinja_file if jinja_file.is_file() else Path(model_dir) / "tokenizer_config.json"
        template = Template(MODEL, source, origin=str(origin))
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            raise ValueError(f"--chat-template {spec!r} is neither a built-in ({', '.join(BUILTINS)}), nor "
                             f"{MODEL!r} (the model's own), nor an existing .jinja file")
        template = Template(str(path), path.read_text(encoding="utf-8-sig"))
    try:
        _compiled(template.source)  # a syntax error is reported now, naming the template
    except ValueError as e:
        raise ValueError(f"chat template {template.label}: {e}") from None
    if tokenizer is None and model_dir is not None and _has_tokenizer(model_dir):
        tokenizer = load_tokenizer(model_dir)
    return template.bind(tokenizer) if tokenizer is not None else template


def adapter_template(spec: str | None, adapter_dir, model_dir, tokenizer) -> Template:
    """The template to chat with an adapter in: `spec` if given, else the adapter's `chat_template.jinja`
    (what its training used), else guanaco for an adapter without one (trained before templates travelled),
    else (no adapter) the model's default (`default_spec`)."""
    if spec is None and adapter_dir is not None:
        recorded = Path(adapter_dir) / ADAPTER_FILE
        spec = str(recorded) if recorded.is_file() else "guanaco"
    return load_template(spec, model_dir, tokenizer)


def _has_tokenizer(folder) -> bool:
    return any((Path(folder) / name).is_file() for name in ("tokenizer.model", "tokenizer.json"))
