"""Atomic file writes: a temporary file in the target's directory (``.tmp-<name>.<random>``),
flushed and fsynced, then renamed over the target, and then the directory is fsynced so that
the rename itself survives a power loss (POSIX; where ``os.O_DIRECTORY`` is missing, as on
Windows, or the process may not read the directory (mode -wx), it cannot be opened to sync it,
and the write stands without that sync). On any failure the temporary file is
removed and the target is untouched, so a reader never sees a half-written file (a failed
directory sync is raised too, though the target then already holds the new content).

The temporary file is created with mode 0o666 like any ``open(path, "w")``, so the
process umask applies and the renamed file gets the same permissions as a plain write
would give it (``tempfile.mkstemp`` would make every file 0600). An ``OSError`` names the
target path, not the temporary one: that is the path the caller knows."""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
from typing import BinaryIO, Callable

_TEMP_NAME = re.compile(r"^\.tmp-(?P<name>.+)\.[0-9a-f]{8}$")     # what _create_temp names


def temp_target(entry: str) -> str | None:
    """The target's name if ``entry`` (a file name) is one of this module's temporary files,
    else None: a writer killed between creating and renaming one leaves it behind."""
    m = _TEMP_NAME.match(entry)
    return m["name"] if m else None


def _create_temp(path: str) -> tuple[int, str]:
    """A new, exclusively created file beside ``path``: (fd, its path)."""
    folder, name = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        tmp = os.path.join(folder, f".tmp-{name}.{secrets.token_hex(4)}")     # 8 hex digits: _TEMP_NAME
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue      # 32 random bits collided with another writer's file: draw again


def _naming(path: str, err: OSError) -> OSError:
    """``err`` (same type and errno) with ``path`` as its filename."""
    return type(err)(err.errno, err.strerror or str(err), path)


def _sync_directory(folder: str) -> None:
    """fsync ``folder`` so that a rename in it is on the disk: until then a power loss can
    bring back the old file (or none) even though the new file's data was synced."""
    if not hasattr(os, "O_DIRECTORY"):
        return      # Windows: no way to open a directory; NTFS journals the rename itself
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except PermissionError:
        # a folder this process may write in but not read (mode -wx, a drop-box): the file was
        # written and renamed, and raising said the write had failed; such a folder cannot be
        # opened to sync it, by this process or any of its rights
        return
    try:
        os.fsync(fd)
    except OSError as e:
        # EINVAL / ENOTSUP: this filesystem has no sync for a directory (some FUSE and network
        # ones), so there is nothing more to do; any other error (EIO) is a failed sync.
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[BinaryIO], object]) -> None:
    """``write(f)`` into a temporary file, then rename it to ``path`` (what ``write`` returns,
    e.g. ``f.write``'s byte count, is ignored)."""
    try:
        fd, tmp = _create_temp(path)
    except OSError as e:
        raise _naming(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _sync_directory(os.path.dirname(os.path.abspath(path)))
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename != path:
            raise _naming(path, e) from e
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_torch_save(obj, path: str) -> None:
    import torch

    atomic_write(path, lambda f: torch.save(obj, f))
