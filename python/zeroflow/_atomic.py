"""Atomic file writes: a temporary file in the target's directory (``.tmp-<name>.<random>``),
flushed and fsynced, then renamed over the target. On any failure the temporary file is
removed and the target is untouched, so a reader never sees a half-written file."""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import BinaryIO, Callable


def atomic_write(path: str, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` into a temporary file, then rename it to ``path``."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path) + ".", dir=d)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path: str) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
