"""Writing files and folders whole or not at all: a crash, a kill or a full disk never leaves half of one.

    write_text(path, text)          # a temporary file beside it, renamed into place
    write_file(path, write)         # the same for any file `write(tmp)` writes (safetensors, ...)
    write_dir(final, write)         # `write(folder)` fills a folder beside `final`, which is then swapped in
    replace_dir(new, final)         # the swap itself: one atomic step on Linux (renameat2 RENAME_EXCHANGE)
    with lock(folder, warn): ...    # one writer per folder: an OS lock on `folder/.lock`

Used by training runs (checkpoints), adapters (`lora.save_adapter`) and the merged-model export. Temporaries are
`.NAME.<pid>.<random>.tmp`, made with O_EXCL (`mkstemp` / `mkdtemp`), so a name the writer did not make (a
user's `.adapter.tmp/`, a planted symbolic link) is never written through or removed. Left out: fsync (a power
cut may still lose what the OS had not written; a killed process cannot).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: writers there go unlocked, with a warning (see lock)
    fcntl = None

LOCK = ".lock"
# What `_temporary` makes; a stale one (its writer was killed) is matched by `is_temporary`.
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: mkstemp/mkdtemp make 0o600/0o700, and what a run writes is as readable as before
TEMPORARY = re.compile(r"\.(.+)\.\d+\.[a-z0-9_]{8}\.(tmp|old)")


class WriteError(RuntimeError):
    """A folder could not be written (disk full, read-only, ...); what was there before is unchanged."""


class LockError(RuntimeError):
    """A folder is locked by another writer, or cannot be locked at all (a file, unwritable, a planted link)."""


@contextlib.contextmanager
def lock(folder: Path, warn, name: str = LOCK):
    """Hold an exclusive `flock` on `folder/.lock` while the block runs; opening it also proves `folder` writable.

    The kernel releases the lock when the process ends, however it ends, so there is no stale lock to take
    over. The file stays (unlinking it would let a second process lock a file no longer in the folder) and holds
    the holder's PID and host, for the refusal message. It is opened with O_NOFOLLOW: a symbolic link planted at
    `.lock` is refused, never truncated through. Where flock is unavailable (Windows, or a filesystem that
    refuses it) the block runs unlocked, after `warn(message)`. `name`: the lock file's (the export, which
    replaces its folder whole, locks `.OUT.lock` beside it).
    """
    if folder.exists() and not folder.is_dir():
        raise LockError(f"--out {folder} is a file; expected a folder (existing or new) for the outputs")
    path = folder / name
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        if os.path.islink(path):
            raise LockError(f"{path} is a symbolic link, which no run or export makes; it is not followed. Remove "
                            f"the link (rm {path}) or pick another --out") from None
        raise LockError(f"cannot write to --out {folder} ({e.strerror or e}); pick a folder you can write to") from e
    try:
        try:
            if fcntl is None:
                raise OSError(0, "no fcntl module on this platform")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "a process that is starting"
            what = folder if name == LOCK else folder / name[1:].removesuffix(".lock")
            raise LockError(f"{what} is in use by another run or export ({holder}; lock {path}); wait for it to "
                            "end or pick another --out") from None
        except OSError as e:
            warn(f"warning: cannot lock {folder} ({e.strerror}): make sure nothing else writes to this folder")
        else:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def is_temporary(name: str) -> str | None:
    """The final name a temporary of this module stands for (`.adapter.123.ab_cd9x1.tmp` -> "adapter"), or None."""
    m = TEMPORARY.fullmatch(name)
    return m.group(1) if m else None


def _prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


def write_text(path: Path, text: str) -> None:
    """Write a whole text file or nothing (see `write_file`)."""
    write_file(path, lambda tmp: tmp.write_text(text))


def write_file(path: Path, write) -> None:
    """Write a whole file or nothing: `write(tmp)` fills a temporary file beside `path`, renamed into place."""
    tmp = None
    try:
        fd, name = tempfile.mkstemp(prefix=_prefix(path), suffix=".tmp", dir=path.parent)  # O_EXCL: a new file
        os.close(fd)
        tmp = Path(name)
        os.chmod(tmp, 0o666 & ~_UMASK)
        write(tmp)
        os.replace(tmp, path)  # a symbolic link at `path` is replaced, never written through
    except OSError as e:  # a full disk's OSError names no file
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise WriteError(f"could not write {path} ({e.strerror or e}). Is the disk full or the folder read-only? "
                         f"What was already in {path.parent} is unchanged.") from e


def write_dir(final: Path, write) -> Path:
    """Build `final` with `write(folder)` beside it, then swap it in; a failure leaves `final` as it was."""
    tmp = None
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=_prefix(final), suffix=".tmp", dir=final.parent))  # new, ours alone
        os.chmod(tmp, 0o777 & ~_UMASK)
        write(tmp)
    except Exception as e:  # disk full (torch.save says "unexpected pos"), read-only, ...: all the same to a user
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise WriteError(f"could not write {final} ({type(e).__name__}: {e}). Is the disk full or the folder "
                         f"read-only? What was already in {final.parent} is unchanged.") from e
    replace_dir(tmp, final)
    return final


def replace_dir(new: Path, final: Path) -> None:
    """Put folder `new` in the place of `final`, in one atomic step where the OS allows it."""
    if not final.exists():
        os.replace(new, final)
        return
    if _exchange(new, final):  # `final` is now the new folder, `new` the old one
        shutil.rmtree(new)
        return
    # No atomic swap here (not Linux, or a filesystem without it): a kill between the two renames leaves the old
    # folder whole under `.NAME.<pid>.<random>.old` and the new one whole under its `.tmp`.
    old = Path(tempfile.mkdtemp(prefix=_prefix(final), suffix=".old", dir=final.parent))
    os.replace(final, old)  # onto the empty folder just made
    os.replace(new, final)
    shutil.rmtree(old)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 with RENAME_EXCHANGE); False where that is not available."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))
