"""Every path into the repository written in README.md and docs/*.md exists: a reader who
follows one finds the file (issue 11). Checked: markdown links (relative to the page, as a
browser resolves them) and every path that starts with one of the repository's source
folders (relative to the repository root, as the pages write them); `<name>` and `*` are
wildcards that must match at least one file."""
from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.join("docs", f) for f in os.listdir(os.path.join(ROOT, "docs"))
                               if f.endswith(".md"))
# The folders under version control; runs/, results/ and build/ are outputs that a page may
# name before they exist.
SOURCE_FOLDERS = (".ci", "benchmarks", "configs", "csrc", "docs", "python", "tests", "zfkernels")
REPO_PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./*<>-]*)" % "|".join(re.escape(f) for f in SOURCE_FOLDERS))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def written_paths(text: str) -> list[str]:
    return sorted({m.rstrip(".,:;") for m in REPO_PATH.findall(text)})


def links(text: str) -> list[str]:
    return sorted({u.split("#")[0] for u in LINK.findall(text)
                   if not re.match(r"[a-z]+:", u) and not u.startswith("#")})


def exists(pattern: str) -> bool:
    pattern = re.sub(r"<[^>]*>", "*", pattern)
    return bool(glob.glob(pattern)) if "*" in pattern else os.path.exists(pattern)


@pytest.mark.parametrize("page", PAGES)
def test_paths_in_the_page_exist(page):
    with open(os.path.join(ROOT, page)) as f:
        text = f.read()
    missing = [p for p in written_paths(text) if not exists(os.path.join(ROOT, p))]
    missing += [u for u in links(text) if not exists(os.path.join(ROOT, os.path.dirname(page), u))]
    assert not missing, f"{page} names paths that do not exist: {missing}"


def test_the_check_sees_paths_and_misses():
    text = ("see zfkernels/triton_*.py, `csrc/ops.cpp`, docs/kernel-ops.md. and [x](perf/a.png) "
            "[w](https://e.org/x) runs/<time>_x configs/<method>_<dataset>.yaml")
    assert written_paths(text) == ["configs/<method>_<dataset>.yaml", "csrc/ops.cpp", "docs/kernel-ops.md",
                                   "zfkernels/triton_*.py"]
    assert links(text) == ["perf/a.png"]
    assert not exists(os.path.join(ROOT, "zfkernels/triton_*.py"))
    assert exists(os.path.join(ROOT, "configs/<method>_<dataset>.yaml"))
