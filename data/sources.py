"""Where conversations come from: the guanaco dataset on the Hugging Face Hub, or a local `.jsonl` file.

`load_conversations("train" | "test" | "eval" | PATH)` returns the conversations and never loses a row quietly:
every row is either used or skipped with a counted reason, and the counts are printed as one line
(`N rows read, K skipped (reason: count, ...)`) and kept on the result as `.report`. With `strict=True` the
first bad row raises instead, naming its file and line.

Local files are detected by content: rows with a `text` field are guanaco rows; rows with a `prompt` message
object are OASST1 message trees (see `data.oasst`). `.jsonl.gz` is read as well.

Deliberately left out: the `datasets` library (one `hf_hub_download` per file is all the Hub part needs),
streaming, and formats other than these two.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from . import oasst
from .guanaco import BadRow, Turn, parse_row

HUB_REPO = "timdettmers/openassistant-guanaco"
SPLIT_FILES = {
    "train": "openassistant_best_replies_train.jsonl",  # 9,846 rows
    "test": "openassistant_best_replies_eval.jsonl",  # 518 rows; the Hub calls this split `test`
    "eval": "openassistant_best_replies_eval.jsonl",
}


@dataclass
class LoadReport:
    source: str = ""
    format: str = ""  # "guanaco" or "oasst"
    rows: int = 0  # non-blank lines read
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
        from tinyllama.checkpoint import HubUnavailable

        raise HubUnavailable(
            f"could not get split {split!r} of the guanaco dataset: downloading {filename} from the Hugging Face "
            f"dataset {HUB_REPO} failed ({type(e).__name__}: {e}). Without network access, pass a local file "
            f"instead: a guanaco .jsonl (one {{\"text\": ...}} per line) or an OASST trees .jsonl, or put the file "
            "in the Hugging Face cache beforehand (HF_HOME) on a machine that has access; HF_HUB_OFFLINE=1 "
            "then uses the cache without network retries.") from e


def _read_lines(path: Path):
    """(line number, raw bytes): decoding happens per row, so a bad byte costs one counted row, not the file."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        yield from enumerate(f, start=1)


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
                "pass a split name or the path of a guanaco / OASST trees .jsonl file")
        source = str(path)
        _refuse_json_array(path)
    report = LoadReport(source=source)
    conversations = []
    for lineno, raw in _read_lines(path):
        if not raw.strip():
            continue  # blank lines hold no row
        report.rows += 1
        try:
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise BadRow("invalid UTF-8", str(e)) from None
            convs, notes = _parse_line(line, report, all_threads)
        except BadRow as e:
            if strict:
                err = BadRow(e.reason, e.detail)
                err.args = (f"{path}:{lineno}: {e} (fix or remove this row, or load without strict=True to "
                            "skip and count bad rows)",)
                err.lineno = lineno
                raise err from None
            report.skipped[e.reason] += 1
            continue
        conversations.extend(convs)
        report.notes.update(notes)
    report.conversations = len(conversations)
    if report.rows == 0:
        raise ValueError(f"{source}: no rows (the file is empty or holds only blank lines); expected one JSON "
                         "object per line")
    if verbose:
        print(report, file=sys.stderr)
    return Conversations(conversations, report)


def load_examples(source: str, tokenizer, max_len: int, *, vocab_size: int | None = None, seed: int = 0,
                  n_random: int = 64, log=print) -> list:
    """Training examples of `source`: a split or file (conversations, encoded with loss masks), or the benchmark
    workload `random[:N]` (N sequences of max_len random ids, every position labelled; needs `vocab_size`)."""
    from .encoding import encode_all
    from .synthetic import random_examples

    if source == "random" or source.startswith("random:"):
        return random_examples(int(source.split(":")[1]) if ":" in source else n_random, max_len, vocab_size, seed)
    conversations = load_conversations(source)
    examples, encoded = encode_all(conversations, tokenizer, max_len)
    log(f"data {source}: {len(conversations)} conversations -> {len(examples)} examples ({encoded})")
    if not examples:
        raise ValueError(f"no usable training examples in {source!r} (see the report above)")
    return examples


def _refuse_json_array(path: Path) -> None:
    """A `.json` array (what `json.dump(rows)` writes) is not JSON Lines: say so, rather than skip every row."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):
        raise ValueError(f"{path} holds a JSON array; expected JSON Lines, one object per line. Convert it, "
                         f"e.g. jq -c '.[]' {path.name} > {path.stem}.jsonl")


def _parse_line(line: str, report: LoadReport, all_threads: bool) -> tuple[list[list[Turn]], list[str]]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRow("invalid JSON", str(e)) from None
    if not report.format:  # the first valid object decides the format of the file
        report.format = "oasst" if oasst.is_tree(obj) else "guanaco"
        if not oasst.is_tree(obj) and isinstance(obj, dict) and "parent_id" in obj and "text" in obj:
            raise ValueError(
                f"{report.source} looks like the flat OASST message export (messages linked by parent_id); "
                "only the nested trees export (*.trees.jsonl) is supported")
    if all_threads and report.format != "oasst":
        raise ValueError(f"{report.source}: all_threads=True applies to OASST message trees, but this file "
                         "holds guanaco rows (one conversation each)")
    if report.format == "oasst":
        if all_threads:
            return oasst.all_threads(obj)
        conv, notes = oasst.best_thread(obj)
        return [conv], notes
    if not isinstance(obj, dict) or "text" not in obj:
        raise BadRow("missing text field", f"expected an object with a `text` field, got {_short(obj)}")
    conv, notes = parse_row(obj["text"])
    return [conv], notes


def _short(obj) -> str:
    s = json.dumps(obj, ensure_ascii=False)
    return s if len(s) <= 60 else s[:57] + "..."
