"""Crash-safe file replacement: after a power cut the file is old or new, never torn."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(target: Path, data: bytes, mode: int = 0o644, *, exact_mode: bool = False) -> None:
    """Write to a temporary file, fsync it, rename it over ``target``, fsync the directory.

    ``exact_mode``: ``mode`` whatever the umask (a file another account reads as soon as it appears).

    On any failure (a full partition: ``OSError`` ENOSPC) ``target`` is unchanged, the temporary
    file is gone and the caller gets the one ``OSError`` that stopped the write.
    """
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        # Unbuffered: a buffered file that failed to flush fails again on close, chaining a second error.
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            if exact_mode:
                os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
