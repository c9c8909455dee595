"""Crash-safe checkpoint files.

`save_atomic` never leaves a half-written file at `path`: it writes a temporary file in the
same folder (so that the final rename stays on one file system), flushes and fsyncs it, and
then `os.replace`s it over the target, which POSIX and Windows both do atomically. A process
killed at any moment therefore leaves either the previous checkpoint or the new one, never a
truncated mix, and a resumed run can trust whatever it finds.

`write_atomic` does the same for text and bytes: every file graphsearch writes (checkpoints,
state, reports, plots) goes through this one writer. Under `torchrun` only rank 0 writes;
`is_main` and `barrier` let callers keep the other ranks waiting until a file is there.

A write that the file system refuses (disk full, quota, read-only, no permission) raises
`WriteError`: a `UserError` (the CLI prints one line and exits 2) that is still an `OSError`
(callers that tolerate a failed write, such as the data cache, go on catching it).

`hold_folder` makes one run at a time own an output folder: a lock file `FOLDER/.lock` that
holds the owner's pid, taken atomically (an exclusive `flock`, which the kernel frees when the
owner dies in any way), freed at exit; a lock file left by a dead process is taken over.

`load` reads such a file back onto the CPU with `weights_only=True`: checkpoints written by
`graphsearch.train` hold only tensors, numbers, strings and containers of them, and refusing
anything else means a checkpoint file cannot run code when it is read.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import UserError

__all__ = ["save_atomic", "write_atomic", "write_json", "write_streamed", "load", "rank",
           "cache_root", "is_main", "barrier", "WriteError", "hold_folder", "FolderBusy"]


class WriteError(UserError, OSError):
    """A file could not be written for a reason of the machine, not of graphsearch: the
    message names the file, the reason and what to do."""


class FolderBusy(UserError):
    """Another live process holds the output folder."""


# The errors a user fixes (space, quota, permissions, a read-only or missing folder).
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EFBIG}


def _write_error(path: Path, exc: OSError) -> OSError:
    """`exc` (raised writing `path`) as a WriteError when the user can fix it, else as is."""
    if exc.errno not in _USER_ERRNOS:
        return exc
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        todo = (f"free space on the disk of {path.parent} (or choose another --out); the files "
                "already there are intact, and --resume continues from the last finished stage")
    else:
        todo = (f"make {path.parent} writable or choose another --out; the files already "
                "there are intact")
    err = WriteError(exc.errno, f"cannot write {path}: {reason}; {todo}")
    err.filename = str(path)
    return err


# ---------------------------------------------------------------- processes under torchrun


def rank() -> int:
    """This process's rank under torch.distributed (0 when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


def is_main() -> bool:
    """True in the one process that writes files (rank 0, or the only process)."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (nothing to wait for when not distributed)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def cache_root() -> Path:
    """The folder of graphsearch's caches (decoded data, analyses): ``$GRAPHSEARCH_CACHE``
    or ``$XDG_CACHE_HOME/graphsearch`` (``~/.cache/graphsearch``)."""
    env = os.environ.get("GRAPHSEARCH_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "graphsearch"


# ---------------------------------------------------------------- the one atomic writer


def save_atomic(obj: Any, path: str | os.PathLike, *, every_rank: bool = False) -> Path:
    """Write `obj` with `torch.save` to `path` atomically; return the path.

    The parent folder is created if needed. On any error the temporary file is removed and
    the previous content of `path` (if any) is left untouched. Under torch.distributed only
    rank 0 writes (unless `every_rank`); the others return at once, so a caller whose other
    ranks read the file must :func:`barrier` first.
    """
    return _replace_atomic(Path(path), lambda f: torch.save(obj, f), every_rank)


def write_atomic(path: str | os.PathLike, data: str | bytes, *,
                 every_rank: bool = False) -> Path:
    """Write text (UTF-8) or bytes to `path` atomically, like :func:`save_atomic`."""
    blob = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    return _replace_atomic(Path(path), lambda f: f.write(blob), every_rank)


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = None,
               default: Callable | None = None, every_rank: bool = False) -> Path:
    """`obj` as JSON, written atomically like :func:`write_atomic` (state, caches, reports)."""
    return write_atomic(path, json.dumps(obj, indent=indent, default=default),
                        every_rank=every_rank)


def write_streamed(path: str | os.PathLike, write: Callable, *,
                   every_rank: bool = False) -> Path:
    """`write(f)` fills an open binary file (in order, or by seeking, truncating, mapping it)
    that becomes `path` atomically, like :func:`write_atomic`: for content too large to hold
    in memory (the decoded images of a large data set)."""
    return _replace_atomic(Path(path), write, every_rank)


def _replace_atomic(path: Path, write: Callable, every_rank: bool) -> Path:
    if not every_rank and not is_main():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        # mkstemp makes the file private (0600); give it the mode an ordinary new file (or
        # the file it replaces) would have.
        try:
            mode = path.stat().st_mode & 0o777
        except FileNotFoundError:
            mode = 0o644
        os.chmod(tmp, mode)
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        # BaseException: a KeyboardInterrupt mid-write must not leave the temporary behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise _write_error(path, exc) from exc
        raise
    _fsync_dir(path.parent)
    return path


# ---------------------------------------------------------------- one run per folder


LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _lock_owner(lock: Path) -> int:
    try:
        return int(lock.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


@contextlib.contextmanager
def hold_folder(folder: str | os.PathLike, *, enabled: bool = True) -> Iterator[Path]:
    """Own `folder` for the duration of the `with` block (created if missing): one process at
    a time. A second process gets `FolderBusy` naming the holder's pid; a lock file left by a
    dead process (kill -9, power cut) is taken over. On exit the lock file goes, and so does
    the folder if this call created it and it is empty. `enabled=False` does nothing (the
    other ranks under torchrun)."""
    folder = Path(folder)
    if not enabled:
        yield folder
        return
    lock = folder / LOCK_NAME
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder; choose another --out")
    created = not folder.exists()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd = _take_lock(lock)
    except OSError as exc:
        if created:
            _remove_empty(folder)
        raise _write_error(lock, exc) from exc
    except BaseException:
        if created:
            _remove_empty(folder)
        raise
    try:
        yield folder
    finally:
        try:
            lock.unlink()  # while still held: nobody can take a lock that is going away
        except OSError:
            pass
        os.close(fd)
        if created:
            _remove_empty(folder)


def _take_lock(lock: Path) -> int:
    """Open and lock `lock` (our pid written in it); the open descriptor holds the lock."""
    try:
        import fcntl
    except ImportError:  # not POSIX: an exclusive create, a dead owner's file replaced
        return _take_lock_by_create(lock)
    for _ in range(10):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            _busy(lock, _lock_owner(lock))
        except BaseException:
            os.close(fd)
            raise
        # The holder before us may have removed the file between our open and our lock:
        # then we hold a lock on a file nobody else sees; open the one now at the path.
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise OSError(errno.EAGAIN, f"cannot take the lock {lock}")


def _take_lock_by_create(lock: Path) -> int:
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            owner = _lock_owner(lock)
            if _pid_alive(owner) and owner != os.getpid():
                _busy(lock, owner)
            lock.unlink(missing_ok=True)  # a dead process's lock
            continue
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd
    raise OSError(errno.EAGAIN, f"cannot take the lock {lock}")


def _busy(lock: Path, owner: int):
    who = f"process {owner}" if owner else "another process"
    raise FolderBusy(f"{lock.parent} is in use by another graphsearch run ({who} holds "
                     f"{lock}); wait for it to end, or choose another --out")


def _remove_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only if empty
    except OSError:
        pass


def load(path: str | os.PathLike, *, weights_only: bool = True) -> Any:
    """Read an object written by `save_atomic` (or `torch.save`) onto the CPU."""
    return torch.load(Path(path), map_location="cpu", weights_only=weights_only)


def _fsync_dir(folder: Path) -> None:
    # The rename itself is only durable once the directory entry is on disk; without this a
    # power cut right after os.replace could bring back the old file. Not possible on every
    # platform (e.g. Windows cannot open a directory), where it is simply skipped.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
