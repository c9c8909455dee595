"""Crash-safe checkpoint files.

`save_atomic` never leaves a half-written file at `path`: it writes a temporary file in the
same folder (so that the final rename stays on one file system), flushes and fsyncs it, and
then `os.replace`s it over the target, which POSIX and Windows both do atomically. A process
killed at any moment therefore leaves either the previous checkpoint or the new one, never a
truncated mix, and a resumed run can trust whatever it finds.

`write_atomic` does the same for text and bytes: every file graphsearch writes (checkpoints,
state, reports, plots) goes through this one writer. Under `torchrun` only rank 0 writes;
`is_main` and `barrier` let callers keep the other ranks waiting until a file is there.

`load` reads such a file back onto the CPU with `weights_only=True`: checkpoints written by
`graphsearch.train` hold only tensors, numbers, strings and containers of them, and refusing
anything else means a checkpoint file cannot run code when it is read.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["save_atomic", "write_atomic", "write_json", "load", "rank", "is_main", "barrier"]


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


def _replace_atomic(path: Path, write: Callable, every_rank: bool) -> Path:
    if not every_rank and not is_main():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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
    except BaseException:
        # BaseException: a KeyboardInterrupt mid-write must not leave the temporary behind.
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


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
