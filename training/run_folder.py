"""The output folder of a training run: one writer at a time, nothing of another run lost, every checkpoint whole.

    with lock(out, log):                       # `.lock` holds the writer's PID; a dead writer's lock is taken over
        refuse_other_run(out, overwrite)        # a fresh run does not write over another run's files ...
        clear(out, log)                         # ... unless --overwrite, and then they are removed first
        start_resume(out, checkpoint, log)      # later checkpoints moved aside, metrics.jsonl cut at its step
        save_checkpoint(out, step, ...)         # checkpoint-N written whole, then `latest`, then older ones pruned
        write_dir(out / "adapter", write)       # any folder: written beside, then swapped in

What holds after any crash or kill: `latest` names a complete checkpoint; pruning only ever removes checkpoints
older than the one just written; a folder being rewritten is either all old or all new. Checkpoint state is
JSON plus tensors that `torch.load(weights_only=True)` reads, so a checkpoint someone shares cannot run code.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import shutil
import socket
import time
from pathlib import Path

import torch

from tinyllama import files
from tinyllama.files import write_text  # noqa: F401  (train.py writes its text files through run_folder)

from . import TrainingError

# Everything a run writes into its folder; a fresh run refuses a folder holding any of it (see --overwrite).
RUN_FILES = ("adapter", "metrics.jsonl", "summary.json", "config.json", "loss.png", "samples.md", "latest",
             "tensorboard")
CHECKPOINT = re.compile(r"checkpoint-(\d+)")
STATE = "trainer_state.json"  # step, data position, settings, running totals
OPTIMIZER = "optimizer.pt"  # AdamW state: tensors and numbers only
CHECKPOINT_FILES = (STATE, OPTIMIZER, "adapter_config.json", "adapter_model.safetensors")
LOCK = ".lock"


# ---- writing without ever leaving half a file ---------------------------------------------------------------
# The primitives are tinyllama.files' (the export writes folders too); here a failure is a TrainingError.

def write_dir(final: Path, write) -> Path:
    """Build `final` with `write(folder)` beside it, then swap it in; a failure leaves `final` as it was."""
    try:
        return files.write_dir(final, write)
    except files.WriteError as e:
        raise TrainingError(str(e)) from e.__cause__


# ---- one writer per folder ----------------------------------------------------------------------------------

@contextlib.contextmanager
def lock(out: Path, log):
    """Hold `out/.lock` (PID and host) while the block runs; creating it also proves `out` is writable."""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"--out {out} is a file; expected a folder (existing or new) for the run's outputs")
    try:
        out.mkdir(parents=True, exist_ok=True)
        path = out / LOCK
        me = f"{os.getpid()} {socket.gethostname()}"
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except FileExistsError:
                holder = _lock_holder(path)
                if holder is not None:
                    raise TrainingError(
                        f"{out} is in use by another run ({holder}, lock file {path}); wait for it to end or pick "
                        f"another --out. If that process is gone, delete {path}.") from None
                log(f"{out}: taking over the lock of a run that is no longer running ({path})")
                path.unlink(missing_ok=True)
        with os.fdopen(fd, "w") as f:
            f.write(me + "\n")
    except OSError as e:
        raise TrainingError(f"cannot write to --out {out} ({e.strerror or e}); pick a folder you can write "
                            "to") from e
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == me:
                path.unlink()


def _lock_holder(path: Path) -> str | None:
    """Who holds the lock, or None when nobody does (empty file, or a PID on this host that is gone)."""
    try:
        pid, host = path.read_text().split()
        pid = int(pid)
    except (OSError, ValueError):
        return None
    if host != socket.gethostname():
        return f"process {pid} on {host}, which cannot be checked from here"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass  # alive, owned by someone else
    return f"process {pid}"


# ---- fresh runs and resumed runs ----------------------------------------------------------------------------

def run_files(out: Path) -> list[Path]:
    """What a run left in `out`: its files, checkpoints and moved-aside branches."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir()
                  if p.name in RUN_FILES or CHECKPOINT.fullmatch(p.name) or p.name.startswith("superseded-"))


def refuse_other_run(out: Path, overwrite: bool) -> None:
    found = run_files(out)
    if found and not overwrite:
        names = ", ".join(p.name for p in found[:6]) + (", ..." if len(found) > 6 else "")
        raise TrainingError(f"{out} already holds a run ({names}); pass --resume {out} to continue it, "
                            "--overwrite to replace it, or another --out")


def clear(out: Path, log) -> None:
    """Remove what an earlier run wrote into `out` (--overwrite); other files are left alone."""
    found = run_files(out)
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    if found:
        log(f"--overwrite: removed the earlier run in {out} ({len(found)} files and folders)")


def continues_in(checkpoint: Path | None, out: Path) -> bool:
    """True when a resumed run goes on in the folder its checkpoint belongs to."""
    return checkpoint is not None and checkpoint.parent.resolve() == out.resolve()


def changed_settings(saved: dict, now: dict) -> list[str]:
    """The settings of a resumed run that differ from its checkpoint's, as "name old -> new"."""
    return [f"{k} {saved[k]!r} -> {v!r}" for k, v in now.items()
            if k in saved and saved[k] != v and k not in ("resume", "out", "overwrite")]


def start_resume(out: Path, checkpoint: Path, log) -> None:
    """Make `out` hold the history of `checkpoint` only, before the resumed run writes anything.

    Resuming from an earlier checkpoint starts a new branch: what the old branch did after that step (later
    checkpoints, its final adapter and summary, a copy of its metrics) is moved to `out/superseded-<time>/`,
    never deleted. `metrics.jsonl` keeps the rows up to the checkpoint's step, so every step appears once.
    """
    step = read_state(checkpoint)["step"]
    same_folder = checkpoint.parent.resolve() == out.resolve()
    if same_folder:
        later = [p for n, p in checkpoints(out) if n > step]
        summary = out / "summary.json"
        finished_later = summary.is_file() and _json_or_empty(summary).get("steps", 0) > step
        if later or finished_later:
            aside = out / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-after-step-{step}"
            aside.mkdir()
            for p in later + ([out / n for n in ("adapter", "summary.json", "samples.md", "loss.png")]
                              if finished_later else []):
                if p.exists():
                    os.replace(p, aside / p.name)
            if (out / "metrics.jsonl").is_file():
                shutil.copy2(out / "metrics.jsonl", aside / "metrics.jsonl")
            log(f"resuming {out} from step {step}: what the run did after it is kept in {aside}")
        write_text(out / "latest", checkpoint.name)
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
    write_text(out / "metrics.jsonl", "".join(r + "\n" for r in rows))
    if dropped and same_folder:
        log(f"metrics.jsonl: dropped {dropped} rows written after step {step} (they are run again)")


def append_metrics(out: Path, row: dict) -> None:
    """One row of metrics.jsonl (opened per row: a killed run leaves at most its last line cut short)."""
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")


def _json_or_empty(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
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
    """`path` itself if it is a checkpoint, else the one its `latest` names; None if neither."""
    p = Path(path)
    if is_checkpoint(p):
        return p
    latest = p / "latest"
    if latest.is_file() and is_checkpoint(p / latest.read_text().strip()):
        return p / latest.read_text().strip()
    return None


def save_checkpoint(out: Path, step: int, save_adapter, optimizer, state: dict, keep: int) -> Path:
    """checkpoint-{step}: adapter (`save_adapter(folder)`), optimizer state and `state` (JSON), written whole."""
    def write(folder: Path) -> None:
        save_adapter(folder)
        torch.save(optimizer.state_dict(), folder / OPTIMIZER)
        (folder / STATE).write_text(json.dumps({**state, "step": step}, indent=2) + "\n")

    final = write_dir(out / f"checkpoint-{step}", write)
    write_text(out / "latest", final.name)
    if keep:
        for n, old in checkpoints(out)[:-keep]:
            if n < step:  # never one the newest run has not superseded
                shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / STATE).read_text())
        int(state["step"])
        return state
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TrainingError(f"{checkpoint / STATE} is unreadable ({e}); resume from another checkpoint") from e


def load_optimizer_state(checkpoint: Path) -> dict:
    """The optimizer state, read with weights_only=True: a pickle that would run code is refused."""
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
