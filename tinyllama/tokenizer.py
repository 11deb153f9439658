"""The Llama 2 / TinyLlama SentencePiece tokenizer: a thin, explicit wrapper over `sentencepiece`.

TinyLlama has no pad token and we do not invent one: batches pad with any id and mask it out.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm


class Tokenizer:
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
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.vocab_size: int = self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode takes one str, got {type(text).__name__}; encode a list item by item")
        ids = self.sp.encode(text, out_type=int)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.sp.id_to_piece(int(i))
