"""Crash-safe file replacement: after a power cut the file is old or new, never torn."""

from __future__ import annotations

import os
from pathlib import Path


def write_atomically(target: Path, data: bytes, mode: int = 0o644) -> None:
    """Write to a temporary file, fsync it, rename it over ``target``, fsync the directory."""
    temporary = target.with_name(f".{target.name}.tmp")
    try:
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, target)
    except OSError:
        temporary.unlink(missing_ok=True)
        raise
    directory = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)
