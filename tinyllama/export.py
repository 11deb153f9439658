"""Merge a trained LoRA adapter into its base model: one folder that other tools open as it is.

    python -m tinyllama.export --adapter runs/rank64/adapter --out runs/rank64/merged
    make export ADAPTER=runs/rank64/adapter OUT=runs/rank64/merged        # OVERWRITE=1: --overwrite

The folder is a Hugging Face checkpoint of the base's family (Llama, Mistral, Qwen 2.5/3, Gemma 2/3, Phi-3: its
`model_type`, `architectures` and tensor names; the base's `pad_token_id` kept): `config.json`,
`generation_config.json`, the merged weights (`model.safetensors`, or shards and `model.safetensors.index.json`
above `--max-shard-size`) and the tokenizer files. `transformers` (AutoModelForCausalLM, AutoTokenizer,
pipeline), llama.cpp's `convert_hf_to_gguf.py` and `chat.py --model OUT` read it with no other file or flag.

- The base is `--model`, else the one the adapter records (`base_model_name_or_path` in adapter_config.json).
- The merge is computed in float32 (`W + s B A`, rounded once), then written in `--dtype`: by default the dtype
  the base's config.json records (`torch_dtype`, or transformers 5's `dtype`), else float32, which rounds
  nothing.
- Tokenizer: the base's own files, copied byte for byte; generation settings: the base's generation_config.json,
  else its BOS and EOS ids.
  A base with a `tokenizer.model` but no `tokenizer_config.json` (what `save_model`
  writes, or an older download) gets `tokenizer_config.json` and `special_tokens_map.json` written as TinyLlama
  ships them: `LlamaTokenizer`, BOS added, no EOS, `legacy=False`. Without them transformers 5 builds a tokenizer
  that adds no BOS, and its ids are not the ones the model was trained on.
- Chat template: the one the adapter was trained with (its `chat_template.jinja`; guanaco for an adapter without
  one), written as `chat_template` into `tokenizer_config.json` and as `chat_template.jinja`, so
  `apply_chat_template`, `pipeline` given messages and llama.cpp's converter (which stores it in the GGUF for
  `llama-server`'s chat endpoint) render conversations as training did. The template's end-of-turn token joins
  `eos_token_id` in generation_config.json, so generation stops where training ended a turn.
- One export at a time: it holds the training run's lock (`tinyllama.files.lock`) on `.OUT.lock` beside OUT, and
  a second export to the same OUT is refused with the holder's process id.
- Written whole or not at all: built in `.OUT.<pid>.<random>.tmp` beside OUT, then swapped in. OUT must be new,
  empty, or (with `--overwrite`) hold only files an export writes: `config.json`, `generation_config.json`,
  `model.safetensors`, `model-NNNNN-of-NNNNN.safetensors` shards, `model.safetensors.index.json` and the tokenizer files
  (`checkpoint.TOKENIZER_FILES`). A folder holding anything else is refused, even with `--overwrite`, and left
  as it was; so is a symbolic link, `/`, the home folder, the current directory, this project's checkout, any
  folder with a `.git`, and the adapter or the base (or a folder above them).

Left out: quantised formats (GGUF is llama.cpp's converter, run on this folder; see README: Export a merged
model), pushing to the Hub, merging several adapters into one model.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch

import lora

from .checkpoint import (
    MAX_SHARD_SIZE,
    TOKENIZER_FILES,
    WEIGHTS_INDEX,
    HubUnavailable,
    default_generation_config,
    load_model,
    resolve_checkpoint,
    save_model,
)
from .files import lock, write_dir
from .model import Llama
from .runtime import DTYPES
from .settings_file import add_config_flag, parse_with_file
from .templates import ADAPTER_FILE, adapter_template
from .tokenizer import Tokenizer, load_tokenizer, read_tokenizer_config, write_tokenizer_config

GENERATION_CONFIG = "generation_config.json"
# Every file an export writes, and so all that --overwrite may replace: OUT is swapped in whole, so a folder
# holding anything else would lose it.
EXPORT_FILES = frozenset({"config.json", GENERATION_CONFIG, "model.safetensors", WEIGHTS_INDEX, *TOKENIZER_FILES})
# The base's config.json keys an export keeps as they are: read by transformers, not by LlamaConfig.
KEPT_KEYS = ("pad_token_id",)
SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")
# The checkout this code runs from (the folder holding train.py and .git): an export must never replace it.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def export_merged(adapter_dir: str | os.PathLike, out_dir: str | os.PathLike, base: str | os.PathLike | None = None,
                  *, dtype: torch.dtype | None = None, max_shard_size: int | str = MAX_SHARD_SIZE,
                  overwrite: bool = False, log=None) -> Path:
    """Write the base with the adapter merged in to `out_dir` (see the module docstring); returns `out_dir`.

    `base`: a checkpoint folder or Hub id, default the adapter's recorded base. `dtype`: default the base's
    recorded dtype, else float32. `max_shard_size`: bytes or "5GB"-style. `log`: where progress lines go.
    """
    log = log or (lambda message: None)
    adapter_dir, out = Path(adapter_dir), Path(out_dir)
    adapter = lora.read_adapter_file(adapter_dir)
    _refuse_out(out, overwrite, adapter_dir)  # before anything is downloaded or read, or the lock made
    base, folder = resolve_base(adapter, base)
    _refuse_replacing(out, folder)
    # OUT is replaced whole, so its lock lives beside it, where the next export to OUT looks for it.
    with lock(out.parent, log, name=f".{out.name}.lock"):
        _refuse_out(out, overwrite, adapter_dir)  # again: an export that just ended may have filled it
        return _export(adapter, adapter_dir, out, base, folder, dtype, max_shard_size, log)


def _export(adapter, adapter_dir: Path, out: Path, base: str, folder: Path, dtype, max_shard_size, log) -> Path:
    tokenizer_files = _tokenizer_files(folder)
    # Read now, so a broken tokenizer.model is reported as such, not as a failed write.
    sentencepiece = None if "tokenizer_config.json" in tokenizer_files else Tokenizer(folder / "tokenizer.model")
    tokenizer = sentencepiece or load_tokenizer(folder)
    template = adapter_template(None, adapter_dir, folder, tokenizer)
    dtype = dtype or default_dtype(folder)

    config = adapter.config
    log(f"merging {adapter_dir} into {base} ({'DoRA, ' if config.use_dora else ''}r={config.rank}, "
        f"alpha={config.alpha:g}, {', '.join(config.targets)})")
    model = load_adapted(folder, adapter, merge=True, dtype=torch.float32)
    generation_path = folder / GENERATION_CONFIG
    generation_config = (json.loads(generation_path.read_text(encoding="utf-8")) if generation_path.is_file()
                         else default_generation_config(model.config))
    generation_config = _with_end_ids(generation_config, template.end_of_turn_ids(tokenizer))
    log(f"chat template: {template.name}; generation ends at ids {generation_config.get('eos_token_id')}")

    def write(tmp: Path) -> None:
        save_model(model, tmp, dtype, max_shard_size=max_shard_size, generation_config=generation_config)
        for name in tokenizer_files:
            shutil.copyfile(folder / name, tmp / name)
        if sentencepiece is not None:
            write_tokenizer_config(sentencepiece, tmp, model.config.max_position_embeddings)
        _write_chat_template(tmp, template.source)
        _keep_base_keys(folder, tmp)

    write_dir(out, write)
    log(f"wrote {out} ({str(dtype).removeprefix('torch.')}): {', '.join(sorted(p.name for p in out.iterdir()))}")
    return out


def _keep_base_keys(base: Path, out: Path) -> None:
    """Copy into OUT's config.json the base's `KEPT_KEYS` that `LlamaConfig` does not hold: they change no
    logits, but transformers builds from them, and its class default may not fit the model (Phi-3's
    pad_token_id is 32000, past the vocabulary of a Phi-3 with 32000 ids: nn.Embedding refuses it)."""
    path, base_config = out / "config.json", json.loads((base / "config.json").read_text(encoding="utf-8-sig"))
    config = json.loads(path.read_text(encoding="utf-8"))
    config.update({k: base_config[k] for k in KEPT_KEYS if k in base_config})
    path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def _with_end_ids(generation_config: dict, end_ids: list[int]) -> dict:
    """`generation_config` with every id of `end_ids` among its `eos_token_id`s (an int stays an int when
    nothing is added)."""
    eos = generation_config.get("eos_token_id")
    have = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    ids = have + [i for i in end_ids if i not in have]
    return {**generation_config, "eos_token_id": ids[0] if len(ids) == 1 else ids}


def _write_chat_template(folder: Path, source: str) -> None:
    """The template into tokenizer_config.json (what transformers 4 and llama.cpp's converter read) and
    chat_template.jinja (what transformers 5 writes and reads first), the same text in both."""
    path = folder / "tokenizer_config.json"
    config = read_tokenizer_config(path)
    config["chat_template"] = source
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / ADAPTER_FILE).write_text(source, encoding="utf-8")


def resolve_base(adapter: lora.AdapterFile, base: str | os.PathLike | None = None) -> tuple[str, Path]:
    """The base an adapter (`lora.read_adapter_file`) goes onto, `base` (a folder or Hub id) or else the one the
    adapter records, and its checkpoint folder (downloaded if a Hub id). A recorded base that cannot be found
    says where it came from."""
    if base is not None:
        return str(base), resolve_checkpoint(base)
    if not adapter.base_model:
        raise ValueError(f"{adapter.path} records no base_model_name_or_path: pass the base model with --model")
    try:
        return adapter.base_model, resolve_checkpoint(adapter.base_model)
    except (FileNotFoundError, HubUnavailable) as e:
        raise type(e)(f"{e}. This is the base that {adapter.path} records; pass --model with another copy of "
                      "it") from e


def load_adapted(folder: Path, adapter: lora.AdapterFile | None, *, merge: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> Llama:
    """The model of checkpoint `folder` in `dtype` on `device`, with `adapter` (`lora.read_adapter_file`; None:
    none) loaded into it and, with `merge`, folded into its weights (`lora.merge`). Used by the export and by
    `chat.py`."""
    model = load_model(folder, dtype=dtype, device=device, lora_config=adapter.config if adapter else None)
    if adapter is not None:
        lora.load_adapter(model, adapter)
        if merge:
            with torch.no_grad():
                lora.merge(model)
    return model


def default_dtype(folder: Path) -> torch.dtype:
    """The dtype the base's config.json records its weights in, else float32 (which rounds nothing)."""
    path = folder / "config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}  # load_model says it is missing
    return DTYPES.get(config.get("torch_dtype") or config.get("dtype"), torch.float32)


def _refuse_out(out: Path, overwrite: bool, keep: Path) -> None:
    """Refuse an OUT the export may not replace (see the module docstring) before anything is read or written:
    swapping the new folder in replaces all of OUT, so OUT may hold nothing but an earlier export."""
    _refuse_protected(out)
    _refuse_replacing(out, keep)
    if out.is_symlink():  # swapping would replace the link, and rmtree refuses links
        raise ValueError(f"--out {out} is a symbolic link (to {out.resolve()}); pass a real folder (new, empty, or "
                         "an earlier export) as --out")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} is a file; pass a folder (new, or empty) for the merged model")
    found = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    foreign = [name for name in found if not _is_export_file(out / name)]
    if foreign:
        raise FileExistsError(f"--out {out} holds files an export does not write ({_names(foreign)}), which "
                              "--overwrite would delete; it replaces only an earlier export (config.json, "
                              "generation_config.json, model*.safetensors, tokenizer files): pick a new or empty "
                              "--out, or move those files elsewhere")
    if found and not overwrite:
        raise FileExistsError(f"--out {out} already holds an export ({_names(found)}); pass --overwrite (make "
                              "export: OVERWRITE=1) to replace it, or pick another --out")


def _refuse_protected(out: Path) -> None:
    """Refuse the folders no export may ever replace, whatever they hold."""
    where = out.resolve()
    try:
        home = Path.home().resolve()
    except RuntimeError:  # no HOME and no passwd entry (some containers): there is no home folder to protect
        home = None
    protected = [(Path(where.anchor), "the filesystem root"), (home, "your home folder"),
                 (PROJECT_ROOT, "this project's checkout"), (Path.cwd().resolve(), "the current directory")]
    what = next((what for path, what in protected if where == path), None)
    if what is None and os.path.lexists(where / ".git"):
        what = "a git checkout (it holds .git)"
    if what is not None:
        raise ValueError(f"--out {out} is {what} ({where}); the export replaces its --out folder whole, so pass a "
                         "folder of its own, e.g. runs/NAME/merged")


def _refuse_replacing(out: Path, keep: Path) -> None:
    """Refuse an OUT that is (or holds) `keep`, the adapter or the base."""
    if out.resolve() == keep.resolve() or out.resolve() in keep.resolve().parents:
        raise ValueError(f"--out {out} would replace {keep}, which the export reads; pick another --out")


def _is_export_file(path: Path) -> bool:
    return path.is_file() and (path.name in EXPORT_FILES or SHARD_NAME.fullmatch(path.name) is not None)


def _names(names: list[str]) -> str:
    return ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")


def _tokenizer_files(folder: Path) -> list[str]:
    """The base's tokenizer files to copy; refuses a base whose tokenizer the export could not reproduce."""
    found = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if "tokenizer.model" not in found and "tokenizer.json" not in found:
        raise FileNotFoundError(f"the base {folder} has no tokenizer (tokenizer.model or tokenizer.json), so the "
                                "export could not be used to chat; put the model's tokenizer files into that folder")
    if "tokenizer_config.json" not in found and "tokenizer.model" not in found:
        raise FileNotFoundError(f"the base {folder} has a tokenizer.json but no tokenizer_config.json, which names "
                                "its BOS and EOS tokens; put the model's own tokenizer_config.json beside it")
    return found


def _parse(argv):
    p = argparse.ArgumentParser(prog="python -m tinyllama.export", description=__doc__.split("\n")[0])
    p.add_argument("--adapter", required=True, help="LoRA adapter folder (adapter_config.json + "
                   "adapter_model.safetensors), e.g. runs/rank64/adapter")
    p.add_argument("--out", required=True, help="folder for the merged model (new, empty, or an earlier export "
                   "with --overwrite)")
    p.add_argument("--model", help="base checkpoint folder or Hub id (default: the adapter's "
                   "base_model_name_or_path)")
    p.add_argument("--dtype", choices=list(DTYPES), help="dtype of the written weights (default: the base's, as "
                   "its config.json records it, else float32)")
    p.add_argument("--max-shard-size", default=MAX_SHARD_SIZE, type=_size,
                   help="largest weights file, bytes or e.g. 500MB (default %(default)s); above it, shards + index")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out: it may hold only "
                   "files an export writes (config.json, generation_config.json, model.safetensors or "
                   "model-NNNNN-of-NNNNN.safetensors shards and model.safetensors.index.json, tokenizer files); "
                   "anything else is refused and left as it was")
    add_config_flag(p)
    return parse_with_file(p, argv)


def _size(text: str) -> int:
    """Bytes from "123", "500MB" or "5GB" (decimal units, as huggingface_hub and transformers read them)."""
    m = re.fullmatch(r"(\d+)\s*([KMGT]B)?", text.strip(), flags=re.IGNORECASE)
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or e.g. 500MB or 5GB")
    return int(m[1]) * 1000 ** (" KMGT".index(m[2][0].upper()) if m[2] else 0)


def main(argv=None) -> int:
    args = _parse(argv)
    try:
        export_merged(args.adapter, args.out, args.model, dtype=DTYPES[args.dtype] if args.dtype else None,
                      max_shard_size=args.max_shard_size, overwrite=args.overwrite,
                      log=lambda message: print(message, file=sys.stderr))
    except (ValueError, OSError, RuntimeError) as e:  # RuntimeError: files.WriteError, HubUnavailable
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
