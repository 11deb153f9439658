"""The output folder of a training run: one writer at a time, nothing of another run lost, every checkpoint whole,
and nothing deleted that this project did not write.

    refuse_model_folder(out, model)            # never a folder holding weights
    with lock(out, log):                       # an OS lock on `out/.lock`, released by the kernel when we die
        check_out(out, checkpoint, overwrite)   # refuses others' files or another run: touches nothing
        ... load the checkpoint, checked (read_state, load_optimizer_state) ...
        begin(out, checkpoint, overwrite, log)  # the first write: stale temporaries, --overwrite, a resume's branch
        save_checkpoint(out, step, ...)         # checkpoint-N written whole, then `latest`, then older ones pruned
        write_dir(out / "adapter", write)       # any folder: written beside, then swapped in

The manifest (`out/.run-manifest.json`) lists every top-level name a run of this project wrote into `out`; a
name is listed before it is first written (`claim`), so a kill never leaves one of ours unlisted, and once
written, what identifies each of its files is recorded (`record`). `--overwrite` and pruning delete listed names
only, and only while they still match their records (the manifest is a file anyone can edit), and a name a run
would write (`config.json`, `checkpoint-N`, `tensorboard`, ...) that exists but is not listed belongs to someone
else: the run refuses the folder rather than write over it. A folder with model weights at its top is never an
output folder.

What holds after any crash or kill: `latest` names a complete checkpoint directly inside `out`; pruning only
ever removes listed checkpoints older than the one just written; a folder being rewritten is either all old or
all new. Checkpoint state is JSON plus tensors that `torch.load(weights_only=True)` reads, checked against the
run's parameters before anything in the folder moves, so a checkpoint someone shares cannot run code or make
the optimizer read out of bounds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import lora
from tinyllama import files

from . import TrainingError

# Everything a run writes into its folder, besides checkpoint-N/ and superseded-*/ (see _run_name).
RUN_FILES = ("adapter", "metrics.jsonl", "summary.json", "config.json", "loss.png", "samples.md", "latest",
             "tensorboard", "trackers.json")
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
STATE = "trainer_state.json"  # step, data position, settings, running totals
OPTIMIZER = "optimizer.pt"  # AdamW state: tensors and numbers only
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")  # lora.save_adapter's (and its README.md)
CHECKPOINT_FILES = (STATE, OPTIMIZER, *ADAPTER_FILES)
LOCK = files.LOCK
MANIFEST = ".run-manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")  # a model folder's, never a run's


# ---- writing without ever leaving half a file ---------------------------------------------------------------
# The primitives are tinyllama.files' (the export writes folders too); here a failure is a TrainingError.

def write_dir(final: Path, write) -> Path:
    """Build `final` with `write(folder)` beside it, then swap it in; a failure leaves `final` as it was. A name
    the manifest lists is recorded (`record`) once written."""
    try:
        files.write_dir(final, write)
    except files.WriteError as e:
        raise TrainingError(str(e)) from e.__cause__
    _record_if_listed(final)
    return final


def write_text(path: Path, text: str) -> None:
    """A whole text file or none; a failure (a full disk) names the file. Recorded as `write_dir`'s are."""
    try:
        files.write_text(path, text)
    except files.WriteError as e:
        raise TrainingError(str(e)) from e.__cause__
    _record_if_listed(path)


def _record_if_listed(path: Path) -> None:
    if path.name != MANIFEST and path.name in listed(path.parent):
        record(path.parent, path.name)


# ---- one writer per folder ----------------------------------------------------------------------------------

@contextlib.contextmanager
def lock(out: Path, log):
    """Hold an exclusive `flock` on `out/.lock` while the block runs (`tinyllama.files.lock`, shared with the
    export); opening it also proves `out` writable."""
    try:
        with files.lock(out, log):
            yield
    except files.LockError as e:
        raise TrainingError(str(e)) from e.__cause__


# ---- which files are the run's: the manifest ------------------------------------------------------------------

def _manifest(out: Path) -> tuple[set[str], dict]:
    """The manifest's top-level names and its records (path inside `out` -> what identifies that file)."""
    path = out / MANIFEST
    if not path.is_file():
        return set(), {}
    try:
        found = json.loads(path.read_text())
        names, records = found["written"], found.get("records", {})
        if isinstance(names, list) and all(isinstance(n, str) and "/" not in n for n in names) and \
                isinstance(records, dict) and all(isinstance(r, dict) for r in records.values()):
            return set(names), records
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    raise TrainingError(f"{path} is not a manifest this project wrote (expected {{\"written\": [names]}}); it lists "
                        "what --overwrite may delete, so the folder is not used. Pick another --out.")


def listed(out: Path) -> set[str]:
    """The top-level names the manifest says a run of this project wrote into `out`."""
    return _manifest(out)[0]


def _write_manifest(out: Path, names: set[str], records: dict) -> None:
    try:
        files.write_text(out / MANIFEST, json.dumps({"written": sorted(names), "records": records}, indent=0,
                                                    sort_keys=True) + "\n")
    except files.WriteError as e:
        raise TrainingError(str(e)) from e.__cause__


def claim(out: Path, *names: str) -> None:
    """List `names` in the manifest before they are first written: a kill never leaves one of ours unlisted."""
    mine, records = _manifest(out)
    if not set(names) <= mine:
        _write_manifest(out, mine | set(names), records)


# A file the run rewrites whole is identified by its size and sha256 (above HASHED_UP_TO bytes, by its size, inode
# and modification time: hashing it at every checkpoint would cost more than the checkpoint); one it appends to
# (metrics.jsonl, TensorBoard's event files) by the size and sha256 of what it held when recorded, which must still
# begin it: a kill after an append, or a copy of the whole folder, leaves it ours.
HASHED_UP_TO = 64 * 2**20
APPENDED = ("metrics.jsonl", "tensorboard")


def record(out: Path, *names: str) -> None:
    """Record what identifies every file now under the top-level `names` of `out`, so --overwrite and pruning can
    tell later that they are still what the run wrote (`_matches`)."""
    mine, records = _manifest(out)
    for name in names:
        records = {k: v for k, v in records.items() if k != name and not k.startswith(name + "/")}
        top = out / name
        found = [top] if top.is_file() and not top.is_symlink() else \
            sorted(p for p in top.rglob("*") if p.is_file() and not p.is_symlink()) if top.is_dir() else []
        for p in found:
            records[p.relative_to(out).as_posix()] = _identity(p, name in APPENDED)
    _write_manifest(out, mine, records)


def _identity(path: Path, appended: bool) -> dict:
    st = path.lstat()
    if appended:
        return {"size": st.st_size, "sha256": sha256(path, st.st_size)}
    if st.st_size > HASHED_UP_TO:
        return {"size": st.st_size, "inode": st.st_ino, "mtime_ns": st.st_mtime_ns}
    return {"size": st.st_size, "sha256": sha256(path)}


def _same(path: Path, appended: bool, record: dict) -> bool:
    """Whether `path` is the file `record` describes; an appended-to file may have grown since."""
    if not appended:
        return _identity(path, False) == record
    size = record.get("size")
    return (isinstance(size, int) and path.lstat().st_size >= size
            and sha256(path, size) == record.get("sha256"))


def _matches(out: Path, name: str, records: dict) -> bool:
    """Whether top-level `name` is still what the run recorded: a file matching its record, or a real folder
    (no symbolic link anywhere in it) whose every file is recorded and matches."""
    top = out / name
    if top.is_symlink():
        return False
    if top.is_file():
        return name in records and _same(top, name in APPENDED, records[name])
    inside = list(top.rglob("*"))
    if any(p.is_symlink() or not (p.is_file() or p.is_dir()) for p in inside):
        return False
    return all((key := p.relative_to(out).as_posix()) in records
               and _same(p, name in APPENDED, records[key]) for p in inside if p.is_file())


def _run_name(name: str) -> bool:
    """A name a run writes at the top of its folder."""
    return name in RUN_FILES or CHECKPOINT.fullmatch(name) is not None or name.startswith("superseded-")


def refuse_model_folder(out: Path, model: str) -> None:
    """A model folder (the --model one, or any with weights at its top) is never an output folder; checked before
    the lock, so such a folder does not even get a `.lock`."""
    if Path(model).is_dir() and Path(model).resolve() == out.resolve():
        raise TrainingError(f"--out {out} is the model folder (--model {model}); a run writes into a folder of "
                            "its own: pick another --out")
    weights = sorted(p.name for p in out.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)) \
        if out.is_dir() else []
    if weights:
        raise TrainingError(f"--out {out} holds model weights ({', '.join(weights[:3])}), so it is a model folder, "
                            "not an output folder; pick another --out (a new or empty folder)")


def check_out(out: Path, checkpoint: Path | None, overwrite: bool) -> None:
    """Refuse an output folder a run must not write into (under the lock, before anything is loaded or written).

    Never one holding a run's names that the manifest does not list (another tool's `checkpoint-500/`, a user's
    `tensorboard/`, a model's `config.json`), even with --overwrite; and, unless the run continues there
    (--resume) or replaces it (--overwrite), never one holding another run.
    """
    mine = listed(out)
    foreign = sorted(p.name for p in out.iterdir() if _run_name(p.name) and p.name not in mine)
    if foreign and not continues_in(checkpoint, out):
        raise TrainingError(f"{out} holds {', '.join(foreign[:6])}{', ...' if len(foreign) > 6 else ''}, which a "
                            f"run would write but no run of this project wrote there (its {MANIFEST} does not list "
                            "them), so nothing is written there, --overwrite or not: move them, or pick another --out")
    found = sorted(p.name for p in out.iterdir() if p.name in mine)
    changed = _unverified(out) if overwrite and not continues_in(checkpoint, out) else []
    if changed:
        raise TrainingError(f"--overwrite: {_few(changed)} in {out} is listed in {MANIFEST} but is not what the run "
                            "recorded there (changed since, or written before records were kept), and the run would "
                            "write over it; nothing was removed. Move it yourself, or pick another --out")
    if found and not overwrite and not continues_in(checkpoint, out):
        resume = f"--resume {out} to continue it, " if _has_checkpoint(out) else ""
        raise TrainingError(f"{out} already holds a run ({_few(found)})"
                            f"{'' if resume else ' with no checkpoint to resume'}; pass {resume}--overwrite to "
                            f"replace it (that deletes only what {out / MANIFEST} lists), or another --out")


def _few(names: list[str]) -> str:
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


def _has_checkpoint(out: Path) -> bool:
    try:
        return find_checkpoint(out) is not None
    except TrainingError:
        return False


def begin(out: Path, checkpoint: Path | None, overwrite: bool, log) -> None:
    """The run's first write into `out`, once `check_out` passed and the checkpoint was loaded and checked:
    remove temporaries a killed writer left, the earlier run (--overwrite), or start a resume's branch."""
    mine = listed(out)
    for p in out.glob(".*"):  # `.NAME.<pid>.<random>.tmp` / `.old` of files.write_text and files.write_dir
        name = files.is_temporary(p.name)
        if name is not None and (name in mine or name == MANIFEST):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if overwrite and not continues_in(checkpoint, out):
        clear(out, log)
    if checkpoint is not None:
        start_resume(out, checkpoint, log)
    claim(out, "config.json", "metrics.jsonl")


def clear(out: Path, log) -> None:
    """Remove what earlier runs wrote into `out` (--overwrite): the names the manifest lists, each only while it
    is still what the run recorded (`_matches`), and nothing else. A listed name that no longer matches is left
    in place, named in one line (`check_out` has already refused the folder when such a name is one the run
    would write over)."""
    mine, records = _manifest(out)
    found = sorted(p for p in out.iterdir() if p.name in mine)
    links = [p.name for p in found if p.is_symlink()]
    if links:
        raise TrainingError(f"--overwrite: {', '.join(links)} in {out} is now a symbolic link, which no run "
                            "writes; nothing was removed. Remove the link yourself, or pick another --out")
    kept = [p.name for p in found if not _matches(out, p.name, records)]
    removed = [p for p in found if p.name not in kept]
    for p in removed:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    _write_manifest(out, set(), {})
    if removed:
        log(f"--overwrite: removed the earlier run in {out} ({len(removed)} files and folders it had written)")
    if kept:
        log(f"--overwrite: left {', '.join(kept)} in {out}: listed in {MANIFEST}, but not what the run recorded "
            "there (changed since, or listed by hand)")


def _unverified(out: Path) -> list[str]:
    """The listed names a run would write over that are no longer what the run recorded."""
    mine, records = _manifest(out)
    return sorted(p.name for p in out.iterdir() if p.name in mine and _run_name(p.name)
                  and not p.is_symlink() and not _matches(out, p.name, records))


def continues_in(checkpoint: Path | None, out: Path) -> bool:
    """True when a resumed run goes on in the folder its checkpoint belongs to."""
    return checkpoint is not None and checkpoint.parent.resolve() == out.resolve()


def is_finished(out: Path, steps: int) -> bool:
    """Whether `out` holds a run's final adapter and the summary of a run of `steps` steps."""
    adapter = out / "adapter"
    complete = all((adapter / name).is_file() for name in ADAPTER_FILES)
    return complete and _json_or_empty(out / "summary.json").get("steps") == steps


def changed_settings(saved: dict, now: dict) -> list[str]:
    """The settings of a resumed run that differ from its checkpoint's, as "name old -> new"."""
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items()
            if k in saved and saved[k] != v and k not in ("resume", "out", "overwrite")]


def start_resume(out: Path, checkpoint: Path, log) -> None:
    """Make `out` hold the history of `checkpoint` only, before the resumed run writes anything.

    Resuming from an earlier checkpoint starts a new branch: what the old branch did after that step (later
    checkpoints, its final adapter and summary, a copy of its metrics) is moved to `out/superseded-<time>/`,
    never deleted. `latest` names `checkpoint` before anything moves, so a kill at any point leaves it naming a
    complete checkpoint. `metrics.jsonl` keeps the rows up to the checkpoint's step, so every step appears once.
    """
    step = read_state(checkpoint)["step"]
    same_folder = continues_in(checkpoint, out)
    if same_folder:
        claim(out, "latest")
        write_text(out / "latest", checkpoint.name)
        later = sorted((int(m.group(1)), p) for p in out.glob("checkpoint-*")
                       if (m := CHECKPOINT.fullmatch(p.name)) and int(m.group(1)) > step)
        summary = out / "summary.json"
        finished_later = summary.is_file() and _json_or_empty(summary).get("steps", 0) > step
        if later or finished_later:
            aside = _new_name(out, f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-after-step-{step}")
            claim(out, aside.name)
            aside.mkdir()
            if (out / "metrics.jsonl").is_file():
                shutil.copy2(out / "metrics.jsonl", aside / "metrics.jsonl")
            for p in [p for _, p in later] + ([out / n for n in ("adapter", "summary.json", "samples.md", "loss.png")]
                                              if finished_later else []):
                if p.exists():
                    os.replace(p, aside / p.name)
            record(out, aside.name)
            log(f"resuming {out} from step {step}: what the run did after it is kept in {aside}")
    source = checkpoint.parent / "metrics.jsonl"
    rows, dropped = [], 0
    if source.is_file():
        for line in source.read_text().splitlines():
            try:
                keep = json.loads(line)["step"] <= step
            except (ValueError, KeyError, TypeError):
                keep = False  # a line cut short by a kill
            if keep:
                rows.append(line)
            else:
                dropped += 1
    claim(out, "metrics.jsonl")
    write_text(out / "metrics.jsonl", "".join(r + "\n" for r in rows))
    if dropped and same_folder:
        log(f"metrics.jsonl: dropped {dropped} rows written after step {step} (they are run again)")


def last_step(out: Path) -> int:
    """The last step `out/metrics.jsonl` holds (0: none): what the trackers of the run there were sent."""
    steps = [0]
    with contextlib.suppress(OSError):
        for line in (out / "metrics.jsonl").read_text().splitlines():
            with contextlib.suppress(ValueError, KeyError, TypeError):  # a line cut short by a kill
                steps.append(int(json.loads(line)["step"]))
    return max(steps)


def _new_name(out: Path, name: str) -> Path:
    """`out/name`, or `out/name-2`, ... when a resume within the same second already took it."""
    path, n = out / name, 1
    while path.exists():
        n += 1
        path = out / f"{name}-{n}"
    return path


def append_metrics(out: Path, row: dict) -> None:
    """One row of metrics.jsonl (opened per row: a killed run leaves at most its last line cut short)."""
    path = out / "metrics.jsonl"
    new = not path.exists()
    try:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if new:  # recorded as it is made, then at every checkpoint (see record)
            record(out, "metrics.jsonl")
    except OSError as e:
        saved = checkpoints(out)
        then = (f"The last checkpoint, {saved[-1][1]}, is unchanged: free space and --resume {out}" if saved else
                f"No checkpoint is saved in {out} yet, so what this run trained (up to step {row.get('step')}) is "
                "lost (--save-every N saves one every N steps): free space and run again")
        raise TrainingError(f"could not write {path} ({e.strerror or e}). Is the disk full or the folder read-only? "
                            + then) from e


def _json_or_empty(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
        return found if isinstance(found, dict) else {}
    except (OSError, ValueError):
        return {}


# ---- checkpoints --------------------------------------------------------------------------------------------

def checkpoints(out: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in `out`, oldest first."""
    found = [(int(m.group(1)), p) for p in out.glob("checkpoint-*") if (m := CHECKPOINT.fullmatch(p.name))]
    return sorted((n, p) for n, p in found if is_checkpoint(p))


def is_checkpoint(path: Path) -> bool:
    return all((path / name).is_file() for name in CHECKPOINT_FILES)


def find_checkpoint(path: str | Path) -> Path | None:
    """`path` itself if it is a checkpoint, else the one its `latest` names; None if neither.

    `latest` must name a `checkpoint-N` folder directly inside `path`: anything else (`../other/checkpoint-4`)
    is refused, since the run would then write where the checkpoint lives."""
    p = Path(path)
    if is_checkpoint(p):
        return p
    latest = p / "latest"
    if not latest.is_file():
        return None
    # What it holds is never echoed: a `latest` linked to another file (/etc/hostname) would print that file.
    name = "" if latest.is_symlink() else latest.read_text(errors="replace").strip()
    if CHECKPOINT.fullmatch(name) is None:
        what = "is a symbolic link, which no run writes" if latest.is_symlink() else "does not hold"
        raise TrainingError(f"{latest} {what} the name of a checkpoint-N folder inside {p}. It is not followed: "
                            f"write the name of one of {p}'s checkpoints into it, or pass that checkpoint folder to "
                            "--resume")
    return p / name if is_checkpoint(p / name) else None


def save_checkpoint(out: Path, step: int, save_adapter, optimizer_state: dict, state: dict, keep: int,
                    adapter: dict[str, torch.Tensor]) -> Path:
    """checkpoint-{step}: adapter (`save_adapter(folder)`, which writes `adapter`'s tensors), optimizer state (a
    full `state_dict()`, gathered under --fsdp) and `state` (JSON, with the sha256 of every other file), written
    whole; then `latest`, then the listed checkpoints past the newest `keep` (0: keep all) that are older than it.

    A non-finite adapter or optimizer value is refused before anything is written: `latest`, and so the "last
    good checkpoint" a stopped run names, only ever names a checkpoint whose values are all finite."""
    refuse_non_finite(out, f"checkpoint-{step}", f"step {step}", adapter, optimizer_state)

    def write(folder: Path) -> None:
        save_adapter(folder)
        torch.save(optimizer_state, folder / OPTIMIZER)
        digests = {p.name: sha256(p) for p in sorted(folder.iterdir()) if p.name != STATE}
        (folder / STATE).write_text(json.dumps({**state, "step": step, "files": digests}, indent=2) + "\n")

    claim(out, f"checkpoint-{step}", "latest")
    final = write_dir(out / f"checkpoint-{step}", write)
    write_text(out / "latest", final.name)
    mine, records = _manifest(out)
    if keep:
        for n, old in [(n, p) for n, p in checkpoints(out) if p.name in mine][:-keep]:
            if n < step and _matches(out, old.name, records):  # never one the newest run has not superseded
                shutil.rmtree(old, ignore_errors=True)
    record(out, *[name for name in APPENDED if name in mine])  # what was appended since
    return final


def resume_problems(resume: str, lora_config: lora.LoRAConfig | None) -> list[str]:
    """Why --resume cannot continue from its checkpoint, checked before anything loads: no checkpoint, a state
    that is not ours, or LoRA settings (`lora_config`, None when invalid) that do not fit its adapter, with the
    flag that makes them fit."""
    try:
        checkpoint = find_checkpoint(resume)
        if checkpoint is None:
            return [f"--resume {resume}: no checkpoint there (expected a checkpoint-N folder or an output "
                    "folder holding one)"]
        read_state(checkpoint)
        saved = lora.read_adapter_config(checkpoint)
    except (TrainingError, ValueError, OSError) as e:
        return [f"--resume {resume}: {e}"]
    if lora_config is None:
        return []
    found = [(saved.rank != lora_config.rank, f"its adapter has rank {saved.rank}: pass --rank {saved.rank}"),
             (set(saved.targets) != set(lora_config.targets),
              f"its adapter targets {','.join(saved.targets)}: pass --targets {','.join(saved.targets)}"),
             (saved.use_dora != lora_config.use_dora, "its adapter is DoRA: add --dora" if saved.use_dora
              else "its adapter is plain LoRA: leave --dora out")]
    return [f"--resume {resume}: {message}" for wrong, message in found if wrong]


# Two steps see different batches, so their losses differ unless the model's output no longer depends on its input.
FLAT_LOSS = 1e-5


@dataclass
class Totals:
    """What the summary reports about the whole run; saved in checkpoints (`trainer_state.json`'s "totals", checked
    by `read_state`), so a resumed run continues them."""
    seconds: float = 0.0
    tokens: int = 0
    labelled: int = 0
    first_loss: float | None = None
    last_loss: float | None = None
    eval_loss: float | None = None
    eval_ppl: float | None = None
    flat_steps: int = 0  # how many of the last steps had the loss of the step before (report.health_warnings)

    def add(self, row: dict) -> None:
        self.seconds += row["step_s"]
        self.tokens += int(row["tokens"])
        self.labelled += int(row["labelled"])
        self.first_loss = row["loss"] if self.first_loss is None else self.first_loss
        flat = self.last_loss is not None and abs(row["loss"] - self.last_loss) <= FLAT_LOSS * abs(self.last_loss)
        self.flat_steps = self.flat_steps + 1 if flat else 0
        self.last_loss = row["loss"]


# What trainer_state.json holds: the key, its type, and whether a checkpoint must have it. "files" (the sha256 of
# every other file of the checkpoint) is missing only from checkpoints written before it was recorded.
STATE_KEYS = {"step": (int, True), "stream": (dict, True), "config": (dict, True), "totals": (dict, False),
              "files": (dict, False)}


def read_state(checkpoint: Path) -> dict:
    """trainer_state.json, checked (types, ranges, required keys) before anything trusts it."""
    path = checkpoint / STATE
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path} is unreadable ({e}); resume from another checkpoint") from e
    problem = _state_problem(state, checkpoint)
    if problem:
        raise TrainingError(f"{path} is not a checkpoint state this project wrote: {problem}; nothing was changed. "
                            "Resume from another checkpoint")
    return state


def _state_problem(state, checkpoint: Path) -> str | None:
    if not isinstance(state, dict):
        return f"expected a JSON object, found {type(state).__name__}"
    for key, (kind, required) in STATE_KEYS.items():
        if key not in state:
            if required:
                return f"no {key!r}"
        elif not isinstance(state[key], kind) or isinstance(state[key], bool):
            return f"{key!r} is {state[key]!r}, expected a {kind.__name__}"
    m = CHECKPOINT.fullmatch(checkpoint.name)
    if state["step"] < 1 or (m and state["step"] != int(m.group(1))):
        return f"step {state['step']} in {checkpoint.name}; expected {m.group(1) if m else 'a step >= 1'}"
    for name, digest in state.get("files", {}).items():
        if not (isinstance(digest, str) and re.fullmatch(r"[0-9a-f]{64}", digest)) or "/" in name \
                or name in (STATE, "", ".", ".."):
            return f"files {name!r} is {digest!r:.80}, expected a file of the checkpoint and its sha256"
    if "files" in state and not set(CHECKPOINT_FILES) - {STATE} <= state["files"].keys():
        return f"files lists {sorted(state['files'])}, expected at least {sorted(set(CHECKPOINT_FILES) - {STATE})}"
    fields = {f.name for f in Totals.__dataclass_fields__.values()}
    for key, value in state.get("totals", {}).items():
        if key not in fields:
            return f"unknown totals entry {key!r} (expected some of {sorted(fields)})"
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value)):
            return f"totals {key!r} is {value!r}, expected a finite number or null"
    return None


def sha256(path: Path, size: int | None = None) -> str:
    """The sha256 of `path`, or of its first `size` bytes."""
    digest = hashlib.sha256()
    left = math.inf if size is None else size
    with path.open("rb") as f:
        while left > 0 and (block := f.read(int(min(left, 1 << 20)))):
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def verify_files(checkpoint: Path, state: dict, log) -> None:
    """Every file the checkpoint's `state` lists has the sha256 recorded when it was written: a flipped byte in
    a tensor's data is refused here, before any value is read. A checkpoint written before checksums were
    recorded is accepted with a warning: the checks of its values (`optimizer_state_problem`,
    `lora.tensor_problem`, the stream position) still run."""
    if "files" not in state:
        log(f"warning: {checkpoint / STATE} records no checksums (written by an earlier version): its files cannot "
            "be checked for damage, only its values")
        return
    for name, digest in sorted(state["files"].items()):
        path = checkpoint / name
        try:
            found = sha256(path)
        except OSError as e:
            raise TrainingError(f"{path} is unreadable ({e.strerror or e}), but {checkpoint / STATE} lists it "
                                f"(files.{name}); nothing was changed. Resume from another checkpoint") from e
        if found != digest:
            raise TrainingError(f"{path} is not the file that was saved: its sha256 differs from the one "
                                f"{checkpoint / STATE} records (files.{name}), so it was damaged or edited since; "
                                "nothing was changed. Resume from another checkpoint")


def read_optimizer_state(checkpoint: Path):
    """The optimizer state as saved, read with weights_only=True: a pickle that would run code is refused."""
    path = checkpoint / OPTIMIZER
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TrainingError(f"{path} holds more than tensors and numbers, so it is not loaded (unpickling it "
                            "could run code). It was not written by this train.py; resume from a checkpoint you "
                            "trust.") from e
    except (OSError, RuntimeError, EOFError) as e:
        raise TrainingError(f"{path} is unreadable ({type(e).__name__}: {e}); resume from another "
                            "checkpoint") from e


def load_optimizer_state(checkpoint: Path, optimizer: torch.optim.Optimizer, step: int) -> dict:
    """`read_optimizer_state`, checked against `optimizer`'s parameters and the checkpoint's `step`."""
    saved = read_optimizer_state(checkpoint)
    problem = optimizer_state_problem(saved, optimizer, step)
    if problem:
        raise TrainingError(f"{checkpoint / OPTIMIZER} does not fit this run's optimizer: {problem}. It belongs to "
                            "other LoRA settings or is damaged; nothing was changed. Resume from another checkpoint")
    return saved


def optimizer_state_problem(saved, optimizer: torch.optim.Optimizer, step: int) -> str | None:
    """What is wrong with an AdamW state dict for `optimizer` after `step` steps, or None.

    `load_state_dict` checks little: a wrong-shaped `exp_avg` is loaded as it is, and the fused AdamW kernel
    then reads and writes past its end. Every tensor is checked here: shape and dtype of its parameter, finite
    (and `exp_avg_sq`, a running mean of squares, never negative), the step count equal to the checkpoint's;
    and every hyperparameter the optimizer takes from the saved groups has its type and range (`betas="xx"`
    would otherwise reach the fused kernel as a TypeError).
    """
    if not isinstance(saved, dict) or set(saved) != {"state", "param_groups"}:
        found = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
        return f"expected a dict with 'state' and 'param_groups', found {found}"
    groups, state = saved["param_groups"], saved["state"]
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return f"expected {len(optimizer.param_groups)} parameter group(s), found {groups!r:.60}"
    params = {}
    for g, mine in zip(groups, optimizer.param_groups, strict=True):
        ids = g.get("params") if isinstance(g, dict) else None
        if not isinstance(ids, list) or len(ids) != len(mine["params"]):
            return f"expected a group of {len(mine['params'])} parameters, found {ids!r:.60}"
        params.update(zip(ids, mine["params"], strict=True))
        problem = _hyperparameter_problem(g, mine)
        if problem:
            return problem
    if not isinstance(state, dict) or set(state) != set(params) or len(params) != sum(len(g["params"])
                                                                                      for g in groups):
        return f"expected state for parameters {sorted(params)!r:.60}, found {sorted(state)!r:.60}"
    for i, s in state.items():
        p = params[i]
        if not isinstance(s, dict) or set(s) != {"step", "exp_avg", "exp_avg_sq"}:
            return f"parameter {i}: expected step, exp_avg and exp_avg_sq, found {s!r:.60}"
        for name in ("exp_avg", "exp_avg_sq"):
            t = s[name]
            if not isinstance(t, torch.Tensor) or t.shape != p.shape or t.dtype != p.dtype:
                found = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                return f"parameter {i}: {name} is {found}, expected {tuple(p.shape)} {p.dtype}"
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                return f"parameter {i}: {name} holds {bad} non-finite value(s) (NaN or infinity)"
        if bool((s["exp_avg_sq"] < 0).any()):
            return f"parameter {i}: exp_avg_sq holds negative values (it is a mean of squares)"
        t = s["step"]
        if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.dtype.is_complex or t.dtype == torch.bool \
                or t.item() != step:
            return f"parameter {i}: step is {t!r:.40}, expected {step} (the checkpoint's step)"
    return None


def _hyperparameter_problem(saved: dict, mine: dict) -> str | None:
    """A saved parameter group's hyperparameter that `load_state_dict` would install but this run cannot train
    with: AdamW's switches (amsgrad, maximize, fused, ...) as this run set them, lr, eps and weight_decay finite
    numbers >= 0, betas two numbers in [0, 1). Keys this torch's AdamW does not have are not used, so not
    checked."""
    for key, value in saved.items():
        if key == "params" or key not in mine:
            continue
        where = f"param_groups {key}"
        if key == "betas":
            if not (isinstance(value, (tuple, list)) and len(value) == 2
                    and all(_number(b) and 0 <= b < 1 for b in value)):
                return f"{where} is {value!r:.40}, expected two numbers in [0, 1)"
        elif _number(mine[key]):
            if not (_number(value) and value >= 0):
                return f"{where} is {value!r:.40}, expected a finite number >= 0"
        elif value is not mine[key]:  # True, False or None
            return f"{where} is {value!r:.40}, expected {mine[key]!r} (as this run's AdamW)"
    return None


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def refuse_non_finite(out: Path, name: str, when: str, adapter: dict[str, torch.Tensor],
                      optimizer_state: dict | None = None) -> None:
    """Raise, naming the last good checkpoint in `out`, before `name` is written with a NaN or infinity in the
    adapter (`lora.tensor_problem`) or the optimizer state: a finite loss does not prove a finite update."""
    problem = next((f"the adapter's {k} {p}" for k, t in sorted(adapter.items())
                    if (p := lora.tensor_problem(t, t.dtype))), None) or _non_finite_optimizer_value(optimizer_state)
    if problem:
        good = None
        with contextlib.suppress(TrainingError):
            good = find_checkpoint(out)
        raise TrainingError(f"{when}: {problem}, so {name} was not written. Last good checkpoint: "
                            f"{good or 'none'}. Try a lower --lr (or --alpha)")


def _non_finite_optimizer_value(optimizer_state: dict | None) -> str | None:
    if optimizer_state is None:
        return None
    for i, s in optimizer_state.get("state", {}).items():
        for name in ("exp_avg", "exp_avg_sq"):
            t = s.get(name)
            if isinstance(t, torch.Tensor) and not bool(torch.isfinite(t).all()):
                return f"the optimizer's parameter {i} {name} holds non-finite values"
    return None
