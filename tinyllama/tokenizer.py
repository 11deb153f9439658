"""The model's tokenizer: Llama 2 / TinyLlama's SentencePiece model, or a byte-level BPE `tokenizer.json`.

`load_tokenizer(folder)` picks the kind from the files a model folder holds; both classes have one interface
(`encode(text, bos, eos)`, `encode_inside(text)`, `decode(ids)`, `id_to_piece(i)`, `bos_id`, `eos_id`,
`vocab_size`, `path`, and for chat templates `special_tokens`, `special_strip` and
`bos_token`/`eos_token`/`unk_token`), which is all that the data encoding, generation and the commands use.

Text is always encoded as plain text: "</s>" or "<|eot_id|>" written in a message stays characters, so data
cannot smuggle in an end token. Special tokens reach the ids only where a chat template writes them:
`data.encoding` cuts a rendered conversation at the `special_tokens` strings and encodes the text between them
with `encode` (at the start of the text) or `encode_inside` (anywhere after), which together give what
transformers' `tokenizer(rendered, add_special_tokens=False)` gives. `special_strip` names the special tokens
that swallow the whitespace beside them there (added tokens' `lstrip` / `rstrip`: Phi-3's `<|end|>`, `<|user|>`,
`</s>` have `rstrip`), read as transformers reads them: `tokenizer_config.json`'s `added_tokens_decoder`, else
tokenizer.json's `added_tokens`.

A `tokenizer.model` may have tokens added beside it (Phi-3: Llama 2's model, with `<|endoftext|>`, `<|user|>`,
`<|assistant|>`, `<|system|>`, `<|end|>`, `<|placeholder1|>`... at ids 32000-32010 in its Hub files only).
`Tokenizer` reads them as transformers 5 does: `added_tokens_decoder` where tokenizer_config.json has one (then
it is the whole list), else tokenizer.json's `added_tokens` and then `added_tokens.json`; they are special tokens
(single ids where a template writes them), `vocab_size` counts them, `decode` drops the special ones, and
`bos_token`/`eos_token` are tokenizer_config.json's (Phi-3's EOS is `<|endoftext|>`, 32000). `bos_id` is the
BOS a text starts with, or None (Phi-3's `add_bos_token: false`; `_starts_with_bos`), as for a tokenizer.json.

- `Tokenizer`: `tokenizer.model` through `sentencepiece`, a thin, explicit wrapper.
- `BPETokenizer`: `tokenizer.json` (Llama 3, SmolLM2) through the `tokenizers` library, an optional extra
  (`pip install -e .[bpe]`), imported only when such a folder is loaded. BOS is the one its post-processor
  adds (if any), EOS the one `tokenizer_config.json` beside it names.

`write_tokenizer_config` writes the Hugging Face `tokenizer_config.json` and `special_tokens_map.json` that go
beside a SentencePiece `tokenizer.model` (the merged export, `tinyllama.export`, needs them), so transformers
tokenises as `Tokenizer` does.

No pad token is invented: batches pad with any id and mask it out. Deliberately left out: rendering chat
templates (`tinyllama.templates`), token offsets, added tokens' `single_word` and `normalized` flags, and any
tokenizer.json behaviour beyond encoding and decoding plain text and naming its special tokens and their
whitespace flags.
"""

from __future__ import annotations

import json
from pathlib import Path

import sentencepiece as spm

_CONTEXT = "\n"  # see Tokenizer.encode_inside


class Tokenizer:
    """A SentencePiece `tokenizer.model` (Llama 2, TinyLlama, Phi-3) and the tokens added beside it (see the
    module docstring): BOS and EOS are the ones tokenizer_config.json names, else the model's own."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(
                f"no SentencePiece model at {path}: pass a tokenizer.model file or a folder holding one "
                "(a Hugging Face checkpoint folder of TinyLlama has it)")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except RuntimeError as e:  # sentencepiece says "could not parse ModelProto"
            raise ValueError(f"{path} is not a SentencePiece model ({e}); pass the tokenizer.model that came "
                             "with the model") from None
        config_path = path.parent / "tokenizer_config.json"
        config = read_tokenizer_config(config_path) if config_path.is_file() else {}
        # Tokens added beside the SentencePiece model (Phi-3's <|user|>, <|end|>, ... at 32000 and up): id ->
        # (content, lstrip, rstrip, special).
        own_json = _own_tokenizer_json(path.parent, self.sp)
        self.added: dict[int, tuple[str, bool, bool, bool]] = _sentencepiece_added(path.parent, config, self.sp,
                                                                                   own_json)
        self._extra = {i: t for i, t in self.added.items() if i >= self.sp.get_piece_size()}
        self.vocab_size: int = max([self.sp.get_piece_size(), *(i + 1 for i in self._extra)])
        # What a chat template sees as bos_token etc.: tokenizer_config.json's (Phi-3's EOS is <|endoftext|>),
        # else the model's own pieces.
        self.bos_token, self.eos_token, self.unk_token = (
            _token_text(config.get(k)) or self._piece(i) for k, i in
            (("bos_token", self.sp.bos_id()), ("eos_token", self.sp.eos_id()), ("unk_token", self.sp.unk_id())))
        # The BOS a text starts with, or None where the tokenizer starts a text with none (Phi-3's).
        bos_id = self._token_id(self.bos_token, "bos_token", config_path)
        self.bos_id: int | None = bos_id if bos_id >= 0 and _starts_with_bos(own_json, config,
                                                                                self.bos_token) else None
        self.eos_id: int = self._token_id(self.eos_token, "eos_token", config_path)
        # The tokens transformers matches in a rendered chat: the added ones, which without an
        # added_tokens_decoder include the control pieces <unk>, <s>, </s> its converter adds.
        self.special_tokens: dict[str, int] = {} if "added_tokens_decoder" in config else {
            self.sp.id_to_piece(i): i for i in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) if i >= 0}
        self.special_tokens.update({content: i for i, (content, *_) in sorted(self.added.items())})
        self.special_strip: dict[str, tuple[bool, bool]] = {
            content: (left, right) for content, left, right, _ in self.added.values() if left or right}
        self._inside_prefix = self.sp.encode(_CONTEXT, out_type=int)
        # Llama 2's model puts a space (its dummy prefix) before a text; Gemma's puts none, and has "\n\n" as a
        # piece, so the context trick of encode_inside would merge there, and is not needed.
        first = self.sp.encode("a", out_type=str)[:1]
        self._dummy_prefix = bool(first) and first[0].startswith("▁")

    def _piece(self, i: int) -> str | None:
        return self.sp.id_to_piece(i) if i >= 0 else None

    def _token_id(self, token: str | None, name: str, config_path: Path) -> int:
        if token is None:  # a model without that piece, and no config naming one
            return -1
        added = next((i for i, (content, *_) in self.added.items() if content == token), None)
        if added is not None:
            return added
        i = self.sp.piece_to_id(token)
        if self.sp.id_to_piece(i) != token:  # piece_to_id gives <unk>'s id for a piece it lacks
            raise ValueError(f"{config_path} names {name} {token!r}, which neither {self.path} nor the added tokens "
                             "beside it have; pass the tokenizer files that came with the model")
        return i

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """The ids of `text`, after the BOS with `bos` where the tokenizer starts a text with one (`bos_id`)."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode takes one str, got {type(text).__name__}; encode a list item by item")
        ids = self.sp.encode(text, out_type=int)
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + ([self.eos_id] if eos else [])

    def encode_inside(self, text: str) -> list[int]:
        """The ids of `text` as it is tokenized after other text or a special token: without the dummy-prefix
        space SentencePiece puts at the start of a text (what transformers' LlamaTokenizer does with
        `legacy=False`, as TinyLlama ships it). Encodes "\n" + text and drops the "\n": a byte-fallback piece
        that merges with nothing, so what follows it is tokenized as after any other character. A model
        without a dummy prefix (Gemma's) tokenizes text alike anywhere: `encode(text, bos=False)`."""
        return self.encode_inside_all([text])[0]

    def encode_inside_all(self, texts: list[str]) -> list[list[int]]:
        """`encode_inside` of each text."""
        if not self._dummy_prefix:
            return [self.sp.encode(t, out_type=int) for t in texts]
        n = len(self._inside_prefix)
        # One text at a time: SentencePiece's batch call starts threads, slower for the few short pieces here.
        out = [self.sp.encode(_CONTEXT + t, out_type=int) for t in texts]
        for ids, text in zip(out, texts, strict=True):
            if ids[:n] != self._inside_prefix:
                raise ValueError(f"{self.path} merged {_CONTEXT!r} with the text that follows it ({text[:20]!r}); "
                                 "encode_inside assumes it never does")
        return [ids[n:] for ids in out]

    def decode(self, ids) -> str:
        """The text of `ids`, without special tokens (added ones included, as BPETokenizer drops them); an added
        token that is not special is its text."""
        out, run = [], []
        for i in map(int, ids):
            if i in self._extra:
                out.append(self.sp.decode(run))
                run = []
                content, _, _, special = self._extra[i]
                out.append("" if special else content)
            else:
                run.append(i)
        return "".join(out) + self.sp.decode(run)

    def id_to_piece(self, i: int) -> str:
        return self._extra[int(i)][0] if int(i) in self._extra else self.sp.id_to_piece(int(i))


class BPETokenizer:
    """A `tokenizer.json` through the `tokenizers` library, with `Tokenizer`'s interface.

    - `bos_id` is the token tokenizer.json's post-processor puts before a text (Llama 3's TemplateProcessing
      adds <|begin_of_text|>), or None when it puts none (SmolLM2 names a bos_token but never adds it). That is
      what transformers' `AutoTokenizer` adds: it ignores `add_bos_token` / `add_eos_token` in
      tokenizer_config.json when there is a tokenizer.json, and so do we. The post-processor itself never runs:
      `encode` adds BOS only when `bos` is true, exactly once, so `encode(text)` gives AutoTokenizer's ids.
    - `eos_id` is tokenizer_config.json's `eos_token` (required: replies end with it); `encode` appends it only
      when `eos` is true (a post-processor that appends EOS to every text is not followed).
    - Text that reads like a special token ("<|end_of_text|>") is encoded as plain text, as `Tokenizer` does
      with "</s>", so training data cannot smuggle in an EOS (transformers' `split_special_tokens=True`).
    - `decode` drops special tokens and does no clean-up of spaces, so decode(encode(text)) == text. A prefix
      of the ids of a multi-byte character decodes to a trailing U+FFFD, which streaming output holds back.
    - `vocab_size` counts the added tokens too (transformers' `len(tokenizer)`).
    """

    def __init__(self, path: str | Path):
        path = Path(path)
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(f"{path} is a tokenizer.json, which needs the tokenizers package ({e}); install "
                              "it with pip install -e .[bpe]") from None
        if not path.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {path}: pass a model folder holding one, or the file")
        self.path = path
        try:
            self.backend = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception for a malformed file
            raise ValueError(f"{path} is not a tokenizer.json the tokenizers library can read ({e})") from None
        self.backend.encode_special_tokens = True
        config_path = self.path.parent / "tokenizer_config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no tokenizer_config.json beside {self.path}: it names the EOS token; pass the "
                                    "folder with the tokenizer files that came with the model")
        config = read_tokenizer_config(config_path)
        # What a chat template sees as bos_token etc. (transformers' special_tokens_map), named even where the
        # post-processor adds no BOS (SmolLM2).
        self.bos_token, self.eos_token, self.unk_token = (_token_text(config.get(k)) for k in
                                                          ("bos_token", "eos_token", "unk_token"))
        self.eos_id: int = self._eos_id(config_path)
        self.bos_id: int | None = self._added_bos()
        self.vocab_size: int = self.backend.get_vocab_size(with_added_tokens=True)
        # Every added token, as transformers matches them in a rendered chat (<|eot_id|>, <|im_end|>, ...).
        added = self.backend.get_added_tokens_decoder()
        self.special_tokens: dict[str, int] = {t.content: i for i, t in added.items()}
        self.special_strip = _special_strip(self.special_tokens,
                                            {t.content: (t.lstrip, t.rstrip) for t in added.values()}, config)

    def _eos_id(self, config_path: Path) -> int:
        token = self.eos_token
        if token is None:
            raise ValueError(f"{config_path} names no eos_token; a tokenizer needs one (each reply ends with it and "
                             "generation stops at it)")
        i = self.backend.token_to_id(token)
        if i is None:
            raise ValueError(f"{config_path} names eos_token {token!r}, which {self.path} does not have; pass the "
                             "tokenizer files that came with the model")
        return i

    def _added_bos(self) -> int | None:
        plain = self.backend.encode("a", add_special_tokens=False).ids
        full = self.backend.encode("a", add_special_tokens=True).ids
        start = next((k for k in range(len(full) - len(plain) + 1) if full[k:k + len(plain)] == plain), None)
        if start is None or start > 1:
            pieces = [self.backend.id_to_token(i) for i in full]
            raise ValueError(f"the post-processor of {self.path} makes 'a' {pieces}; only one that puts a single "
                             "BOS in front (or nothing) is supported")
        return full[0] if start == 1 else None

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"BPETokenizer.encode takes one str, got {type(text).__name__}; encode a list item by "
                            "item")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos and self.bos_id is not None else []) + ids + ([self.eos_id] if eos else [])

    def encode_inside(self, text: str) -> list[int]:
        """`encode(text, bos=False)`: byte-level BPE has no dummy prefix, so text is tokenized the same at the
        start and after other text (the pre-tokenizer starts a word at the boundary either way)."""
        return self.encode(text, bos=False)

    def encode_inside_all(self, texts: list[str]) -> list[list[int]]:
        """`encode_inside` of each text, in one call into the tokenizers library."""
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self.backend.id_to_token(int(i))


def read_tokenizer_config(path: Path) -> dict:
    """A tokenizer_config.json as a dict; ValueError naming the file when it is not a JSON object."""
    try:
        config = json.loads(path.read_text(encoding="utf-8-sig"))  # a byte-order mark is not JSON
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); pass the tokenizer_config.json that came with the "
                         "model") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a {type(config).__name__}, expected a JSON object; pass the "
                         "tokenizer_config.json that came with the model")
    return config


def _special_strip(special_tokens: dict[str, int], flags: dict[str, tuple[bool, bool]],
                   config: dict) -> dict[str, tuple[bool, bool]]:
    """(lstrip, rstrip) of each special token that swallows the whitespace on its left or right when it is
    matched in a text. `flags` are the tokenizer's own (tokenizer.json's `added_tokens`); an entry of
    tokenizer_config.json's `added_tokens_decoder` replaces them, as transformers re-adds those tokens last."""
    flags = dict(flags)
    decoder = config.get("added_tokens_decoder")
    for entry in decoder.values() if isinstance(decoder, dict) else ():
        if isinstance(entry, dict) and entry.get("content") in special_tokens:
            flags[entry["content"]] = (bool(entry.get("lstrip")), bool(entry.get("rstrip")))
    return {token: (left, right) for token, (left, right) in flags.items()
            if token in special_tokens and (left or right)}


def _own_tokenizer_json(folder: Path, sp) -> dict | None:
    """The tokenizer.json beside a tokenizer.model, or None where there is none or it is another model's: one
    whose added tokens contradict the model's pieces, over which the SentencePiece model wins (see
    `load_tokenizer`; test_sentencepiece_wins_when_a_folder_has_both)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        listed = [e for e in data.get("added_tokens") or () if isinstance(e, dict)]
    except (UnicodeDecodeError, json.JSONDecodeError, AttributeError, TypeError) as e:
        raise ValueError(f"{path} is not a tokenizer.json ({e}); pass the tokenizer files that came with the "
                         "model") from None
    return data if all(_fits(sp, e.get("id"), e.get("content")) for e in listed) else None


def _sentencepiece_added(folder: Path, config: dict, sp, own_json: dict | None
                         ) -> dict[int, tuple[str, bool, bool, bool]]:
    """The tokens added beside a tokenizer.model, id -> (content, lstrip, rstrip, special), as transformers 5
    reads them: tokenizer_config.json's `added_tokens_decoder` where it has one (then it is the whole list: the
    added tokens of tokenizer.json and added_tokens.json are not read), else the `added_tokens` of its own
    tokenizer.json (`_own_tokenizer_json`) and then added_tokens.json's ({content: id}, no flags) for the
    contents not already there."""
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        entries = [(k, e) for k, e in decoder.items() if isinstance(e, dict)]
    else:
        entries = [(e.get("id"), e) for e in (own_json or {}).get("added_tokens") or () if isinstance(e, dict)]
        if (folder / "added_tokens.json").is_file():
            have = {e.get("content") for _, e in entries}
            extra = read_tokenizer_config(folder / "added_tokens.json")
            # Special only where tokenizer_config.json names it (Phi-3's eos_token <|endoftext|>), as transformers.
            named = {_token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
            entries += [(i, {"content": c, "special": c in named}) for c, i in extra.items() if c not in have]
    out = {}
    for key, entry in entries:
        content = entry.get("content")
        try:
            i = int(key)
        except (TypeError, ValueError):
            i = -1
        if not isinstance(content, str) or i < 0:
            raise ValueError(f"an added token beside {folder / 'tokenizer.model'} is {key!r}: {entry!r}; expected an "
                             "id and a content; pass the tokenizer files that came with the model")
        if i < sp.get_piece_size() and sp.id_to_piece(i) != content:
            raise ValueError(f"the added token {content!r} has id {i}, which is {sp.id_to_piece(i)!r} in "
                             f"{folder / 'tokenizer.model'}; the tokenizer files do not belong together")
        out[i] = (content, bool(entry.get("lstrip")), bool(entry.get("rstrip")), bool(entry.get("special", True)))
    return out


def _starts_with_bos(own_json: dict | None, config: dict, bos_token: str | None) -> bool:
    """Whether transformers 5 puts the BOS before a text of a tokenizer.model: its own tokenizer.json
    (`_own_tokenizer_json`) decides where there is one (its post-processor's template starts with the BOS, or
    not; add_bos_token is then not read), else tokenizer_config.json's `add_bos_token` (Phi-3's is false).
    With neither, true: Llama 2's convention, where transformers 5 would put none."""
    if own_json is None:
        return bool(config.get("add_bos_token", True))
    processor = own_json.get("post_processor")
    if isinstance(processor, dict) and processor.get("type") == "Sequence":
        processor = next((p for p in processor.get("processors") or () if isinstance(p, dict)
                          and p.get("type") == "TemplateProcessing"), None)
    if not isinstance(processor, dict) or processor.get("type") != "TemplateProcessing":
        return False
    first = (processor.get("single") or [None])[0]
    special = first.get("SpecialToken") if isinstance(first, dict) else None
    return isinstance(special, dict) and special.get("id") == bos_token


def _fits(sp, i, content) -> bool:
    """Whether an added token (id, content) can belong to `sp`: past its pieces, or one of them."""
    return isinstance(i, int) and (i >= sp.get_piece_size() or (i >= 0 and sp.id_to_piece(i) == content))


def _token_text(token) -> str | None:
    """A special token as tokenizer_config.json names it: a string, or {"__type": "AddedToken", "content": ...}."""
    return token.get("content") if isinstance(token, dict) else token


def load_tokenizer(path: str | Path) -> Tokenizer | BPETokenizer:
    """The tokenizer of a model folder, or of a tokenizer.model / tokenizer.json file.

    A folder with `tokenizer.model` gets the SentencePiece `Tokenizer`, even when it also has a tokenizer.json
    (Llama 2 and TinyLlama folders ship both; the SentencePiece model is the original, and the two encode some
    text differently: see README: Tokenizer). A folder with only `tokenizer.json` gets `BPETokenizer`.
    """
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            return Tokenizer(path / "tokenizer.model")
        if (path / "tokenizer.json").is_file():
            return BPETokenizer(path / "tokenizer.json")
        raise FileNotFoundError(f"no tokenizer in {path}: expected tokenizer.model (SentencePiece: Llama 2, "
                                "TinyLlama) or tokenizer.json (byte-level BPE: Llama 3, SmolLM2)")
    if path.suffix == ".json":
        return BPETokenizer(path)
    if not path.exists():
        raise FileNotFoundError(f"no tokenizer at {path}: pass a model folder, or its tokenizer.model or "
                                "tokenizer.json")
    return Tokenizer(path)


# ---- Hugging Face tokenizer files ---------------------------------------------------------------------------

def _added_token(content: str) -> dict:
    """A special token as tokenizer_config.json and special_tokens_map.json spell it."""
    return {"content": content, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}


def _decoder(tokenizer: Tokenizer, control) -> dict:
    """added_tokens_decoder: the control pieces and every token added beside the model (it is the whole list
    to transformers 5, so one left out here would be lost), each with its flags."""
    entries = {i: {**_added_token(tokenizer.id_to_piece(i)), "special": True} for i in control}
    for i, (content, lstrip, rstrip, special) in tokenizer.added.items():
        entries[i] = {**_added_token(content), "lstrip": lstrip, "rstrip": rstrip, "special": special}
    return {str(i): entries[i] for i in sorted(entries)}


def write_tokenizer_config(tokenizer: Tokenizer, folder: Path, model_max_length: int) -> None:
    """tokenizer_config.json and special_tokens_map.json for a SentencePiece `tokenizer.model`, as TinyLlama
    ships them, so transformers (4 and 5) tokenises as `tokenizer` does (README: Tokenizer lists the exceptions)."""
    # The BOS token's id whether or not a text starts with it (a tokenizer.json beside may put none before one).
    bos = tokenizer.special_tokens.get(tokenizer.bos_token, -1) if tokenizer.bos_token else -1
    special = {"bos_token": bos, "eos_token": tokenizer.eos_id, "unk_token": tokenizer.sp.unk_id()}
    missing = [name for name, i in special.items() if i < 0]
    if missing:
        raise ValueError(f"{tokenizer.path} defines no {', '.join(missing)}; a Llama tokenizer has <unk>, <s> and "
                         "</s>")
    pieces = {name: tokenizer.id_to_piece(i) for name, i in special.items()}
    config = {
        "add_bos_token": tokenizer.bos_id is not None, "add_eos_token": False,
        "added_tokens_decoder": _decoder(tokenizer, special.values()),
        **{name: {"__type": "AddedToken", **_added_token(piece)} for name, piece in pieces.items()},
        "pad_token": None, "clean_up_tokenization_spaces": False, "legacy": False,
        "model_max_length": model_max_length, "padding_side": "right", "sp_model_kwargs": {},
        "tokenizer_class": "LlamaTokenizer",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    special_map = {name: _added_token(piece) for name, piece in pieces.items()}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n", encoding="utf-8")
