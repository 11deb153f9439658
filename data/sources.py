"""Where conversations come from: the guanaco dataset on the Hugging Face Hub, local files, and lists of both.

`load_conversations("train" | "test" | "eval" | PATH)` returns the conversations of one source and never loses a
row quietly: every row is either used or skipped with a counted reason, and the counts are printed as one line
(`N rows read, K skipped (reason: count, ...)`) and kept on the result as `.report`. With `strict=True` the
first bad row raises instead, naming its file and row.

Local files: `.jsonl` (or `.jsonl.gz`), one format per file, detected from its first row: guanaco `text` rows,
OASST1 message trees (see `data.oasst`), `messages` (trl / OpenAI), ShareGPT `conversations`, Alpaca
`instruction`/`output`, or `prompt`/`completion` rows (see `data.formats`, which parses a row of each).
`.parquet` (how the Hub serves datasets converted to Parquet): the same formats but OASST trees, detected from
the columns (`text`, `messages`, `conversations`, `instruction` + `output`, `prompt` + `completion`), of which
only those are read, in row batches through pyarrow, the optional extra `pip install -e .[parquet]`; each row
goes through the same parsing and counting as a `.jsonl` row. `report.format` names the format.

`load_train_eval(data, eval_data, ...)` is `train.py`'s `--data` / `--eval-data`: comma-separated sources, each
optionally weighted (`a.jsonl:2,train`), encoded into training examples; and the evaluation examples, by
default (`auto`) a held-out share of each local file's conversations plus the guanaco test split when a split
is trained on. The held-out conversations are a function of `--seed` and the data alone, so every
data-parallel rank and every resumed leg of a run holds out the same ones.

Deliberately left out: the `datasets` library (one `hf_hub_download` per file is all the Hub part needs),
streaming, reading from URLs, OASST trees in Parquet, several formats in one file, and formats other than
these.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import gzip
import json
import math
import os
import sys
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tinyllama.checkpoint import HubUnavailable

from . import formats, oasst
from .encoding import ASSISTANT_ONLY, encode_all
from .guanaco import BadRow, Turn
from .synthetic import random_examples

HUB_REPO = "timdettmers/openassistant-guanaco"
SPLIT_FILES = {
    "train": "openassistant_best_replies_train.jsonl",  # 9,846 rows
    "test": "openassistant_best_replies_eval.jsonl",  # 518 rows; the Hub calls this split `test`
    "eval": "openassistant_best_replies_eval.jsonl",
}
AUTO, NONE = "auto", "none"  # the --eval-data values that are not sources
HOLDOUT_PERCENT, HOLDOUT_MAX = 2, 500  # `--eval-data auto` holds out 2% of a file, at least 1, at most 500
RANDOM_EVAL = 64  # `--eval-data random`: the first 64 training examples
PARQUET_BATCH_ROWS = 1024


@dataclass
class LoadReport:
    source: str = ""
    format: str = ""  # one of data.formats.FORMATS: "guanaco", "oasst", "messages", "sharegpt", ...
    rows: int = 0  # non-blank lines (or Parquet rows) read
    conversations: int = 0
    skipped: Counter = field(default_factory=Counter)  # reason -> rows skipped
    notes: Counter = field(default_factory=Counter)  # fix-up -> rows kept after that fix-up

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def __str__(self) -> str:
        def counts(c):
            return ", ".join(f"{k}: {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))
        s = f"{self.source}: {self.rows} rows read, {self.n_skipped} skipped"
        if self.skipped:
            s += f" ({counts(self.skipped)})"
        s += f"; {self.conversations} conversations ({self.format})"
        if self.notes:
            s += f"; kept after fix-up: {counts(self.notes)}"
        return s


class Conversations(list):
    """A plain list of conversations (each a list of Turn) that also carries its `LoadReport`."""

    def __init__(self, items=(), report: LoadReport | None = None):
        super().__init__(items)
        self.report = report or LoadReport()


def hub_file(split: str, *, cache_dir=None, local_files_only: bool = False) -> Path:
    """Download (or find in the Hugging Face cache) the guanaco file of a split; returns its local path."""
    filename = SPLIT_FILES[split]
    try:
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(HUB_REPO, filename, repo_type="dataset", cache_dir=cache_dir,
                                    local_files_only=local_files_only))
    except Exception as e:  # offline, missing cache, auth, HTTP: all end the same way for the user
        raise HubUnavailable(
            f"could not get split {split!r} of the guanaco dataset: downloading {filename} from the Hugging Face "
            f"dataset {HUB_REPO} failed ({type(e).__name__}: {e}). Without network access, pass a local file "
            f"instead: a .jsonl or .parquet of {formats.ACCEPTED}, or put the file "
            "in the Hugging Face cache beforehand (HF_HOME) on a machine that has access; HF_HUB_OFFLINE=1 "
            "then uses the cache without network retries.") from e


def require_pyarrow():
    """`pyarrow.parquet`, or an ImportError that names the extra to install."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError("reading .parquet files needs pyarrow: pip install -e .[parquet]") from None
    return pq


def is_parquet(path) -> bool:
    return str(path).lower().endswith(".parquet")


def _jsonl_rows(path: Path):
    """(line number, raw bytes) of each non-blank line: decoding happens per row, so a bad byte costs one counted
    row, not the file."""
    _refuse_json_array(path)
    with _open_rows(path) as f, _unreadable_gzip(path):
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1:  # a byte-order mark (Windows editors write one) is not part of the first row
                raw = raw.removeprefix(codecs.BOM_UTF8)
            if raw.strip():  # blank lines hold no row
                yield lineno, raw


def _open_rows(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


@contextlib.contextmanager
def _unreadable_gzip(path: Path):
    """A `.gz` cut short (EOFError) or not gzip at all (BadGzipFile), as one line naming the file."""
    try:
        yield
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise ValueError(f"{path} is not a readable gzip file ({type(e).__name__}: {e}); it may be cut short or "
                         f"not compressed: check it with gzip -t {path.name}") from None


def _parquet_rows(path: Path):
    """(the file's format, an iterator of (row number, {column: value}) of each row, read a batch of rows at a
    time, with only the columns of that format)."""
    pq = require_pyarrow()
    try:
        file = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's errors name no file
        raise ValueError(f"{path} is not a readable Parquet file ({type(e).__name__}: {e})") from None
    columns = file.schema_arrow.names
    found = formats.parquet_format(columns)
    if found is None:
        raise ValueError(f"{path} has no `text` column (its columns: {', '.join(columns) or 'none'}) nor any other "
                         "conversation column; expected one of: `text` (guanaco rows), `messages`, `conversations` "
                         "(ShareGPT), `instruction` and `output` (Alpaca), `prompt` and `completion`")
    fmt, read = found

    def rows():
        n = 0
        for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=read):
            for row in batch.to_pylist():  # struct columns come back as dicts, list columns as lists
                n += 1
                yield n, row
    return fmt, rows()


def load_conversations(split_or_path, *, strict: bool = False, all_threads: bool = False, verbose: bool = True,
                       cache_dir=None, local_files_only: bool = False) -> Conversations:
    """Conversations of a guanaco split ("train", "test"/"eval", from the Hub) or of a local file.

    A string that is a split name means the Hub split; pass a `Path` to read a local file of that name.
    `strict`: raise on the first row that would be skipped. Fix-ups (a dropped trailing unanswered human turn,
    normalised whitespace) keep the row and are counted in `report.notes` in either mode.
    `all_threads` (OASST trees only): every root-to-leaf thread instead of the best-ranked one.
    """
    if isinstance(split_or_path, str) and split_or_path in SPLIT_FILES:
        path = hub_file(split_or_path, cache_dir=cache_dir, local_files_only=local_files_only)
        source = f"{HUB_REPO}:{split_or_path}"
    else:
        path = Path(split_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"{split_or_path!r} is neither a split name ({', '.join(SPLIT_FILES)}) nor an existing file; "
                f"pass a split name or the path of a .jsonl or .parquet file of {formats.ACCEPTED}")
        source = str(path)
    report = LoadReport(source=source)
    parquet = is_parquet(path)
    if parquet:  # the columns decide the format
        report.format, rows = _parquet_rows(path)
    else:
        rows = _jsonl_rows(path)
    conversations = []
    for number, raw in rows:
        report.rows += 1
        try:
            convs, notes = _row_conversations(raw, report, all_threads)
        except BadRow as e:
            if strict:
                err = BadRow(e.reason, e.detail)
                where = f"{path}: row {number}" if parquet else f"{path}:{number}"
                err.args = (f"{where}: {e} (fix or remove this row, or load without strict=True to skip and "
                            "count bad rows)",)
                err.lineno = number
                raise err from None
            report.skipped[e.reason] += 1
            continue
        conversations.extend(convs)
        report.notes.update(notes)
    report.conversations = len(conversations)
    if report.rows == 0:
        raise ValueError(f"{source}: no rows; expected one conversation per row" if parquet
                         else f"{source}: no rows (the file is empty or holds only blank lines); expected one JSON "
                         "object per line")
    if verbose:
        print(report, file=sys.stderr)
    return Conversations(conversations, report)


# ---- lists of sources: --data and --eval-data ---------------------------------------------------------------

@dataclass(frozen=True)
class Source:
    """One comma-separated item of `--data`: a guanaco split name or a local file, and its weight: how many
    times its examples are used per epoch (2: twice; 0.5: a seeded half of them; 1.5: all once, half twice)."""

    name: str
    weight: float = 1.0

    @property
    def is_split(self) -> bool:
        return self.name in SPLIT_FILES

    def __str__(self) -> str:
        return self.name if self.weight == 1 else f"{self.name}:{self.weight:g}"


def is_random(spec: str) -> bool:
    """`random` or `random:N`: the benchmark workload, not a file."""
    return spec == "random" or spec.startswith("random:")


def parse_sources(spec: str, *, weights: bool = True) -> list[Source]:
    """`a.jsonl,b.parquet:2,train:0.5` -> Sources. Commas separate sources; a last `:NUMBER` is a weight (so a
    path that itself ends in `:NUMBER` cannot be named). Raises ValueError naming the item at fault; whether the
    files exist is `source_problems`'s business."""
    sources = []
    for item in spec.split(","):
        item = item.strip()
        if not item:
            raise ValueError(f"an empty source in {spec!r} (two commas in a row, or a comma at either end); "
                             "commas separate sources")
        if is_random(item):
            raise ValueError(f"{item!r}: random[:N] (the benchmark workload) stands alone, not in a list")
        name, weight = item, 1.0
        head, _, tail = item.rpartition(":")
        if head and _is_number(tail):
            name, weight = head, float(tail)
            if not weights:
                raise ValueError(f"{item!r}: weights apply to training sources (--data) only")
            if not (math.isfinite(weight) and weight > 0):
                raise ValueError(f"{item!r}: a weight must be a number > 0 (2: twice, 0.5: half), got {tail}")
        if any(s.name == name for s in sources):
            raise ValueError(f"{name!r} is named twice; name it once, with a weight (e.g. {name}:2) to use it more")
        sources.append(Source(name, weight))
    return sources


def source_problems(spec: str, flag: str = "--data") -> list[str]:
    """What is wrong with a `--data` (or, with flag="--eval-data", an `--eval-data`) value, one line per problem,
    checked without reading the files: syntax, splits or existing files, pyarrow for Parquet."""
    evaluating = flag == "--eval-data"
    if evaluating and spec.lower() in (AUTO, NONE):
        return []
    if is_random(spec):
        n = spec.partition(":")[2]
        ok = spec == "random" or (n.isdigit() and int(n) > 0)
        return [] if ok else [f"{flag} {spec!r}: write random or random:N with N >= 1"]
    try:
        sources = parse_sources(spec, weights=not evaluating)
    except ValueError as e:
        return [f"{flag}: {e}"]
    problems = []
    files = []
    for source in sources:
        if source.is_split:
            continue
        files.append(source.name)
        if not Path(source.name).expanduser().is_file():
            problems.append(f"{flag} {source.name!r} is neither a split name ({', '.join(SPLIT_FILES)}) nor an "
                            f"existing file (a .jsonl or .parquet of {formats.ACCEPTED}); commas separate "
                            "sources")
        elif is_parquet(source.name):
            try:
                require_pyarrow()
            except ImportError as e:
                problems.append(f"{flag} {source.name}: {e}")
    problems += _same_file_problems(files, flag)
    return problems


def _same_file_problems(names: list[str], flag: str) -> list[str]:
    """A file named twice through different paths (`a.jsonl,../x/a.jsonl`, a link) would be trained on and held
    out from twice: a line for each second name."""
    existing = [(name, Path(name).expanduser()) for name in names if Path(name).expanduser().is_file()]
    problems = []
    for j, (name, path) in enumerate(existing):
        first = next((earlier for earlier, other in existing[:j] if os.path.samefile(other, path)), None)
        if first is not None:
            problems.append(f"{flag}: {first!r} and {name!r} are the same file; name it once, with a weight "
                            f"(e.g. {first}:2) to use it more")
    return problems


def holdout_size(n: int) -> int:
    """How many of a file's `n` conversations `--eval-data auto` holds out: 2%, at least 1, at most 500."""
    return min(HOLDOUT_MAX, max(1, n * HOLDOUT_PERCENT // 100))


def hold_out(conversations: list, seed: int, name: str = "the data") -> tuple[list, list]:
    """(training, held out): `holdout_size(n)` conversations drawn with `seed`, both parts in file order. A pure
    function of the seed and the conversations, so every rank and every resumed leg draws the same ones."""
    n = len(conversations)
    if n < 2:
        raise ValueError(f"{name} has {n} conversation{'s' * (n != 1)}: too few to hold one out for evaluation "
                         "and train on the rest; pass --eval-data FILE (or a split name), or --eval-data none")
    held = set(np.random.default_rng([seed, 0]).permutation(n)[:holdout_size(n)].tolist())
    return ([c for i, c in enumerate(conversations) if i not in held],
            [c for i, c in enumerate(conversations) if i in held])


def weighted(examples: list, weight: float, rng: np.random.Generator) -> list:
    """`examples` repeated int(weight) times, plus a sample (drawn with `rng`, without repeats) of the fractional
    part's share of them: weight * n examples in all (rounded half up), each at most ceil(weight) times."""
    whole = int(weight)
    extra = int((weight - whole) * len(examples) + 0.5)
    picked = sorted(rng.choice(len(examples), size=extra, replace=False).tolist()) if extra else []
    return examples * whole + [examples[i] for i in picked]


def load_train_eval(data: str, eval_data: str, tokenizer, max_len: int, *, vocab_size: int | None = None,
                    seed: int = 0, n_random: int = 64, template=None, train_on: str = ASSISTANT_ONLY,
                    log=print) -> tuple[list, list]:
    """(training examples, evaluation examples) for `--data` and `--eval-data`, every step reported to `log`.

    `data`: comma-separated sources (`parse_sources`), or the benchmark workload `random[:N]` (N sequences of
    max_len random ids, every position labelled; needs `vocab_size`). `eval_data`:
      - "auto": `holdout_size` conversations of each local file, held out before weighting (so none of them is
        trained on), plus the guanaco test split when a split is among the sources; for `random[:N]`, as
        "random";
      - "none": no evaluation;  "random": the first 64 training examples;
      - comma-separated sources without weights: those, whole.
    """
    auto = eval_data.lower() == AUTO
    if is_random(data):
        n = int(data.partition(":")[2]) if ":" in data else n_random
        train, held_out = random_examples(n, max_len, vocab_size, seed), None
    else:
        encode = functools.partial(encode_all, tokenizer=tokenizer, max_len=max_len, template=template,
                                   train_on=train_on)
        train, held_out = _training_examples(parse_sources(data), encode, seed, auto, log)
    if eval_data.lower() == NONE:
        return train, []
    if is_random(eval_data) or (auto and held_out is None):
        return train, train[:RANDOM_EVAL]
    conversations = held_out if auto else [c for s in parse_sources(eval_data, weights=False) for c in _load(s, log)]
    examples, encoded = encode_all(conversations, tokenizer, max_len, template, train_on=train_on)
    log(f"eval: {len(conversations)} conversations -> {len(examples)} examples ({encoded})")
    if not examples:
        raise ValueError("no usable evaluation examples (see the report above); pass --eval-data FILE, or "
                         "--eval-data none")
    return train, examples


def _training_examples(sources: list[Source], encode, seed: int, hold: bool, log) -> tuple[list, list]:
    """(training examples of all sources, weighted; the conversations held out for evaluation when `hold`:
    a share of each local file, and the guanaco test split when a split is trained on)."""
    train, held_out = [], []
    for i, source in enumerate(sources):
        conversations = _load(source, log)
        if hold and not source.is_split:
            n = len(conversations)
            conversations, held = hold_out(conversations, seed, source.name)
            held_out += held
            raw = n * HOLDOUT_PERCENT // 100
            bound = ", at least 1" if raw < 1 else f", at most {HOLDOUT_MAX}" if raw > HOLDOUT_MAX else ""
            log(f"eval: held out {len(held)} of {n} conversations of {source.name} ({HOLDOUT_PERCENT}%{bound}, "
                f"seed {seed})")
        examples, encoded = encode(conversations)
        used = weighted(examples, source.weight, np.random.default_rng([seed, 1, i]))
        times = "" if source.weight == 1 else f", weight {source.weight:g} -> {len(used)} examples"
        log(f"data {source.name}: {len(conversations)} conversations -> {len(examples)} examples{times} "
            f"({encoded})")
        train += used
    if not train:
        raise ValueError(f"no usable training examples in {','.join(map(str, sources))!r} (see the report above)")
    if len(sources) > 1:
        log(f"data: {len(train)} training examples from {len(sources)} sources")
    if hold and any(s.is_split for s in sources):
        if any(s.is_split and SPLIT_FILES[s.name] == SPLIT_FILES["test"] for s in sources):
            log("warning: --data trains on the guanaco test split, which --eval-data auto evaluates on; pass "
                "--eval-data FILE or --eval-data none for an evaluation it has not trained on")
        held_out += _load(Source("test"), log)
    return train, held_out


def load_examples(source: str, tokenizer, max_len: int, *, vocab_size: int | None = None, seed: int = 0,
                  n_random: int = 64, log=print) -> list:
    """Training examples of `source` (one or more sources as `--data` takes them, nothing held out), or the
    benchmark workload `random[:N]`; see `load_train_eval`."""
    return load_train_eval(source, NONE, tokenizer, max_len, vocab_size=vocab_size, seed=seed, n_random=n_random,
                           log=log)[0]


def _load(source: Source, log) -> Conversations:
    """One source's conversations, its load report logged (by the main process alone, with train.py's `log`)."""
    conversations = load_conversations(source.name if source.is_split else Path(source.name), verbose=False)
    log(conversations.report)
    return conversations


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def _refuse_json_array(path: Path) -> None:
    """A `.json` array (what `json.dump(rows)` writes) is not JSON Lines: say so, rather than skip every row."""
    with _open_rows(path) as f, _unreadable_gzip(path):
        head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"["):
        stem = path.name.removesuffix(".gz").removesuffix(".jsonl").removesuffix(".json")
        read = f"gunzip -c {path.name} | jq -c '.[]'" if path.suffix == ".gz" else f"jq -c '.[]' {path.name}"
        raise ValueError(f"{path} holds a JSON array; expected JSON Lines, one object per line. Convert it into a "
                         f"new file (never onto itself, which the shell would empty first), e.g. "
                         f"{read} > {stem}.lines.jsonl, and pass that file")


def _row_conversations(raw, report: LoadReport, all_threads: bool) -> tuple[list[list[Turn]], list[str]]:
    """The conversations of one row of a file (raw bytes of a JSON line, or a Parquet row's dict), in the format
    the file's first row decides (`data.formats`), and the fix-ups made."""
    if isinstance(raw, bytes):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRow("invalid UTF-8", str(e)) from None
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadRow("invalid JSON", str(e)) from None
    else:
        obj = raw
    if not report.format:  # the first valid object decides the format of the file
        report.format = formats.detect_format(obj)
        if report.format == formats.GUANACO and isinstance(obj, dict) and "parent_id" in obj and "text" in obj:
            raise ValueError(
                f"{report.source} looks like the flat OASST message export (messages linked by parent_id); "
                "only the nested trees export (*.trees.jsonl) is supported")
    if all_threads:
        if report.format != formats.OASST:
            raise ValueError(f"{report.source}: all_threads=True applies to OASST message trees, but this file "
                             f"holds {report.format} rows (one conversation each)")
        convs, notes = oasst.all_threads(obj)
    else:
        conv, notes = formats.parse_row(report.format, obj)
        convs = [conv]
    for conv in convs:
        _check_unicode(conv)
    return convs, notes


def _check_unicode(conv: list[Turn]) -> None:
    """Refuse a turn holding a lone surrogate (JSON's `\\ud800` with no pair): no UTF-8 spells it, so no tokenizer
    can encode it."""
    for i, turn in enumerate(conv):
        try:
            turn.text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRow("invalid Unicode", f"turn {i + 1} ({turn.role}) holds a lone surrogate "
                         f"{turn.text[e.start]!r} at character {e.start}, which no UTF-8 text can hold") from None
