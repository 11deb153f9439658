"""Writing files and folders whole or not at all: a crash, a kill or a full disk never leaves half of one.

    write_text(path, text)          # a temporary file beside it, renamed into place
    write_file(path, write)         # the same for any file `write(tmp)` writes (safetensors, ...)
    write_dir(final, write)         # `write(folder)` fills a folder beside `final`, which is then swapped in
    replace_dir(new, final)         # the swap itself: one atomic step on Linux (renameat2 RENAME_EXCHANGE)

Used by training runs (checkpoints), adapters (`lora.save_adapter`) and the merged-model export. Left out: fsync
(a power cut may still lose what the OS had not written; a killed process cannot), and locking (see
`training.run_folder`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
from pathlib import Path


class WriteError(RuntimeError):
    """A folder could not be written (disk full, read-only, ...); what was there before is unchanged."""


def write_text(path: Path, text: str) -> None:
    """Write a whole text file or nothing (see `write_file`)."""
    write_file(path, lambda tmp: tmp.write_text(text))


def write_file(path: Path, write) -> None:
    """Write a whole file or nothing: `write(tmp)` fills a temporary file beside `path`, renamed into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except OSError as e:  # a full disk's OSError names no file
        tmp.unlink(missing_ok=True)
        raise WriteError(f"could not write {path} ({e.strerror or e}). Is the disk full or the folder read-only? "
                         f"What was already in {path.parent} is unchanged.") from e


def write_dir(final: Path, write) -> Path:
    """Build `final` with `write(folder)` beside it, then swap it in; a failure leaves `final` as it was."""
    tmp = final.with_name(f".{final.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by a writer killed mid-write
    try:
        tmp.mkdir(parents=True)
        write(tmp)
    except Exception as e:  # disk full (torch.save says "unexpected pos"), read-only, ...: all the same to a user
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
    # folder whole under `.NAME.old` and the new one whole under `.NAME.tmp`.
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    os.replace(final, old)
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
