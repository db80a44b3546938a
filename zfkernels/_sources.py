"""The digest of the C++/CUDA sources in csrc/: compiled into each extension by setup.py
(``ZF_SOURCES_DIGEST``, read back as ``zfkernels._C.sources_digest``) and recomputed by
:mod:`zfkernels._compiled` from the csrc/ beside the package, so that binaries built before
an edit of csrc/ are named as stale instead of silently running the old kernels.

Standard library only: setup.py loads this file by path, before anything is built."""
from __future__ import annotations

import hashlib
import os

SOURCE_SUFFIXES = (".h", ".cuh", ".cpp", ".cu")


def digest(csrc: str) -> str:
    """``"zf"`` + the first 32 hex digits of the SHA-256 of csrc/'s source files (names and
    contents, in name order). The prefix makes it a C identifier, which the compiler
    stringifies as is (csrc/module_init.h)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(csrc)):
        path = os.path.join(csrc, name)
        if not (name.endswith(SOURCE_SUFFIXES) and os.path.isfile(path)):
            continue
        with open(path, "rb") as f:
            data = f.read()
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return "zf" + h.hexdigest()[:32]
