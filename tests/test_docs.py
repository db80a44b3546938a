"""Every path into the repository written in README.md and docs/*.md exists: a reader who
follows one finds the file (issue 11). Checked: markdown links (relative to the page, as a
browser resolves them) and every path that starts with one of the repository's source
folders (relative to the repository root, as the pages write them); `<name>` and `*` are
wildcards that must match at least one file.

The examples a reader copies work: every ```python block of the pages runs as written (the
data-parallel one as a single torchrun rank), every `zeroflow ...` command of a ```bash block
parses, and every `zeroflow <command> --option` written inline names an option of that command.

The defaults a reader looks up are the code's: an option's default that argparse sets is shown
by its --help and written in a page, and docs/continual.md's defaults table is defaults.COMMON."""
from __future__ import annotations

import glob
import os
import re
import shlex
import socket

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


def _pages() -> dict:
    out = {}
    for page in PAGES:
        with open(os.path.join(ROOT, page)) as f:
            out[page] = f.read()
    return out


def fenced_blocks(text: str, lang: str) -> list[tuple[int, str]]:
    """``(line, code)`` of every ```lang block."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1))
            for m in re.finditer(r"^```%s\n(.*?)^```" % lang, text, re.S | re.M)]


PYTHON_EXAMPLES = [pytest.param(code, id=f"{page}:{line}")
                   for page, text in _pages().items() for line, code in fenced_blocks(text, "python")]


@pytest.mark.parametrize("code", PYTHON_EXAMPLES)
def test_python_examples_run(code, tmp_path, monkeypatch):
    """A ```python block runs as written, in an empty folder (it may write files there)."""
    import torch
    import torch.distributed as dist

    monkeypatch.chdir(tmp_path)
    torchrun = "init_from_env()" in code and not dist.is_initialized()
    if torchrun:     # what torchrun sets for one rank
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for k, v in dict(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                         MASTER_PORT=str(port)).items():
            monkeypatch.setenv(k, v)
    try:
        with torch.random.fork_rng(devices=[]):     # an example's manual_seed stays in the example
            exec(compile(code, "<example>", "exec"), {"__name__": "__main__"})
    finally:
        if torchrun and dist.is_initialized():
            dist.destroy_process_group()


def zeroflow_commands(text: str) -> list[tuple[int, list[str]]]:
    """``(line, argv after 'zeroflow')`` of every zeroflow command of the ```bash blocks
    (`zeroflow ...`, `python -m zeroflow ...`, `torchrun ... -m zeroflow ...`)."""
    out = []
    for fence, code in fenced_blocks(text, "bash"):
        lines, i = code.split("\n"), 0
        while i < len(lines):
            start, line = i, lines[i]
            while line.endswith("\\") and i + 1 < len(lines):     # a continued command
                i += 1
                line = line[:-1] + " " + lines[i]
            words = shlex.split(line, comments=True)
            for j, w in enumerate(words):
                if w == "zeroflow" and (j == 0 or words[j - 1] == "-m"):
                    out.append((fence + 1 + start, words[j + 1:]))
            i += 1
    return out


def inline_zeroflow_options(text: str) -> list[tuple[int, str, str]]:
    """``(line, command, --option)`` for every option in an inline `zeroflow <command> ...`."""
    out = []
    for m in re.finditer(r"`(?:[^`]*-m )?zeroflow ((?:[a-z]+ )?[^`]*)`", text):
        words = m.group(1).split()
        cmd = words[0] if words and not words[0].startswith("-") else ""
        for w in words:
            if w.startswith("--") and "..." not in w:
                out.append((text.count("\n", 0, m.start()) + 1, cmd, w.split("=")[0]))
    return out


def _parsers() -> dict:
    from zeroflow.cli import build_parser
    from zeroflow.replay import replay_parser

    top = build_parser()
    return {"": top, "replay": replay_parser(), **top.subcommands}


def test_zeroflow_commands_parse():
    parsers, bad = _parsers(), []
    for page, text in _pages().items():
        for line, argv in zeroflow_commands(text):
            cmd = argv[0] if argv and argv[0] in parsers else ""
            try:
                (parsers[cmd].parse_args(argv[1:]) if cmd == "replay" else parsers[""].parse_args(argv))
            except SystemExit as e:
                if e.code:
                    bad.append(f"{page}:{line}: zeroflow {' '.join(argv)}")
    assert not bad, "commands that zeroflow refuses:\n" + "\n".join(bad)


def test_inline_zeroflow_options_exist():
    parsers, bad = _parsers(), []
    for page, text in _pages().items():
        for line, cmd, opt in inline_zeroflow_options(text):
            p = parsers.get(cmd)
            if p is None:
                bad.append(f"{page}:{line}: no command zeroflow {cmd}")
            elif opt not in p._option_string_actions:
                bad.append(f"{page}:{line}: zeroflow {cmd} has no {opt}")
    assert not bad, "\n".join(bad)


def test_the_example_checks_see_commands_and_options():
    text = ("```bash\nzeroflow run --lr 1 \\\n   --q 2   # x\ntorchrun --nproc-per-node 2 -m zeroflow sweep\n```\n"
            "see `zeroflow run --resume --out runs/...`, `python -m zeroflow ...`, `--ease-...` and\n"
            "`zeroflow run\n--help`, `zeroflow --version`, `zeroflow replay --no-verify`.\n"
            "```python\nprint(1)\n```\n")
    assert zeroflow_commands(text) == [(2, ["run", "--lr", "1", "--q", "2"]), (4, ["sweep"])]
    assert inline_zeroflow_options(text) == [(6, "run", "--resume"), (6, "run", "--out"), (7, "run", "--help"),
                                             (8, "", "--version"), (8, "replay", "--no-verify")]
    assert fenced_blocks(text, "python") == [(9, "print(1)\n")]
    parsers = _parsers()
    assert "--stop-after" in parsers["run"]._option_string_actions
    assert "--stop-after" not in parsers["sweep"]._option_string_actions


# zeroflow.optim.create, zfkernels.reference.SPAN, benchmarks.report: a module, or a name in one;
# a file name (the reference code's zeroflow.py) is no such name
DOTTED = re.compile(r"(?<![\w/.-])((?:zeroflow|zfkernels|benchmarks)(?:\.[A-Za-z_]\w*)+)(?![\w-]*\.\w)")
FILE_SUFFIXES = (".py", ".md", ".json", ".yaml", ".so", ".pt", ".zft")


# present only where built (the extensions) or installed and importable (Triton): setup.py and
# zfkernels/triton/ declare them, the check of a page does not depend on this machine's build
OPTIONAL_MODULES = ("zfkernels._C", "zfkernels._C_cuda", "zfkernels.triton")


def dotted_names(text: str) -> list[str]:
    return sorted({n for n in DOTTED.findall(text) if not n.endswith(FILE_SUFFIXES)
                   and not any(n == m or n.startswith(m + ".") for m in OPTIONAL_MODULES)})


def unresolved(name: str):
    """Why ``name`` (a module, or attributes of one) does not resolve; None when it does."""
    import importlib

    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return f"{'.'.join(parts[:i])} has no {'.'.join(parts[i:])}"
            obj = getattr(obj, attr)
        return None
    return "no such module"


def test_dotted_names_in_the_pages_resolve():
    """Every `zeroflow.x.y` / `zfkernels.x` / `benchmarks.x` a page names is a module or a name
    in one (a renamed function or constant leaves its old name in the prose)."""
    assert dotted_names("zfkernels.reference.SPAN, INFTY zeroflow.py, `zeroflow.optim.create(name)`, "
                        "python -m benchmarks.report. zeroflow.nope zfkernels._C_cuda") == [
        "benchmarks.report", "zeroflow.nope", "zeroflow.optim.create", "zfkernels.reference.SPAN"]
    # a call whose argument holds a dot is still a name (the file-name lookahead stops at "("):
    # `zeroflow.optim.creat(model.parameters())` passed unread
    assert dotted_names("`zeroflow.optim.creat(model.parameters())`") == ["zeroflow.optim.creat"]
    assert unresolved("zeroflow.nope") == "zeroflow has no nope"
    assert unresolved("zfkernels.reference.NOPE") == "zfkernels.reference has no NOPE"
    bad = [f"{page}: {n}: {why}" for page, text in _pages().items() for n in dotted_names(text)
           if (why := unresolved(n))]
    assert not bad, "\n".join(bad)


def unnamed_cli_options(parsers: dict, text: str) -> list:
    """``command --option`` of every option of ``parsers`` that ``text`` names neither as
    ``--option`` nor as its configuration key in backticks (`weight_decay` for
    --weight-decay: the pages describe the run options by key)."""
    out = []
    for cmd, p in parsers.items():
        for action in p._actions:
            for opt in action.option_strings:
                if not opt.startswith("--") or opt == "--help":
                    continue
                if re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(opt), text) or \
                        re.search(r"`%s(?::[^`]*)?`" % re.escape(action.dest), text):
                    continue
                out.append(f"{cmd} {opt}".strip())
    return out


def test_every_cli_option_is_named_in_the_pages():
    """An option of `zeroflow run | sweep | report | replay` that no page names is found by
    reading --help only: `zeroflow report --output` and `--no-progress` were named nowhere."""
    import argparse

    toy = argparse.ArgumentParser()
    toy.add_argument("--weight-decay")
    toy.add_argument("--output")
    toy.add_argument("--seed")
    assert unnamed_cli_options({"x": toy}, "`weight_decay`, --seeds") == ["x --output", "x --seed"]
    parsers = _parsers()
    missing = unnamed_cli_options({cmd: parsers[cmd] for cmd in ("run", "sweep", "report", "replay")},
                                  "\n".join(_pages().values()))
    assert not missing, f"options that no page names (README.md, docs/*.md): {missing}"


def config_only_options_missing(text: str, keys) -> list:
    """The keys that ``text`` never writes in backticks (`key` or `key: ...`)."""
    return [k for k in keys if not re.search(r"`%s(?::[^`]*)?`" % re.escape(k), text)]


def test_every_config_only_option_is_named_in_the_continual_page():
    """The options without a flag (defaults.CONFIG_ONLY) appear in no `--help`: the page is
    where a user learns that they exist. pretrain_epochs / pretrain_lr / pretrain_batch_size
    (the small ViT's pretraining) were named nowhere."""
    from zeroflow.continual.defaults import CONFIG_ONLY

    assert config_only_options_missing("`schedule: constant`, `backbone` and `img_size`", ("schedule", "backbone",
                                       "img_size", "adapter_dim")) == ["adapter_dim"]
    missing = config_only_options_missing(_pages()[os.path.join("docs", "continual.md")], CONFIG_ONLY)
    assert not missing, f"docs/continual.md does not name the config-file options {missing}"


def test_resume_help_names_exactly_the_options_a_resume_takes():
    """`zeroflow run --resume`'s help lists the options a resumed run takes from the command
    line (runner.LOCATIONS and runfolder.OPERATIONAL_KEYS): it kept saying --device,
    --data-root and --checkpoint after --num-workers and --download joined them."""
    from zeroflow.continual.defaults import flag
    from zeroflow.continual.runfolder import OPERATIONAL_KEYS
    from zeroflow.continual.runner import LOCATIONS

    text = _parsers()["run"]._option_string_actions["--resume"].help
    assert set(re.findall(r"--[a-z][\w-]*", text)) - {"--out"} == {flag(k) for k in LOCATIONS + OPERATIONAL_KEYS}


def test_the_performance_page_carries_the_current_notes():
    """docs/performance.md's Analysis is benchmarks/notes.md as `make bench-report` inserts it:
    edits of the notes without the report left the page with an older analysis (two CPU
    sections, a later check of the lease plan and its corrected commands missing)."""
    with open(os.path.join(ROOT, "docs", "performance.md")) as f:
        page = f.read()
    with open(os.path.join(ROOT, "benchmarks", "notes.md")) as f:
        notes = f.read()
    analysis = page.split("\n## Analysis\n\n", 1)[1].split("\n## Results\n", 1)[0]
    assert analysis.strip() == notes.strip(), ("docs/performance.md's Analysis is not benchmarks/notes.md: "
                                               "run make bench-report (or copy the notes into that section)")


# "docs/algorithms.md §7", "docs/algorithms.md §7, §11", "§7-8", "stream §5", "stream v1 §8",
# "docs/distributed.md §2": the numbered sections ("## 7. ...") of the page (stream: the spec).
# Also written out: "docs/algorithms.md section 10", "docs/algorithms.md, section 10".
SECTION_REF = re.compile(r"(docs/[\w-]+\.md|(?<![\w/-])stream(?: v1)?)[,:]?\s+"
                         r"((?:§\s?|sections?\s+)\d+(?:\s*(?:-|/|,|and|or)\s*(?:§\s?)?\d+)*)")
CITING_FILES = ("README.md", "Makefile", "benchmarks", "configs", "csrc", "docs", "python", "tests", "zfkernels")
TEXT_SUFFIXES = (".py", ".md", ".h", ".cpp", ".cu", ".cuh", ".sh", ".yaml", "Makefile")


def section_refs(text: str) -> list[tuple[int, str, str]]:
    """``(line, page, section number)`` of every numbered-section citation in ``text``."""
    out = []
    for m in SECTION_REF.finditer(text):
        page = "docs/perturbation-stream.md" if m.group(1).startswith("stream") else m.group(1)
        out += [(text.count("\n", 0, m.start()) + 1, page, n) for n in re.findall(r"\d+", m.group(2))]
    return out


def numbered_sections(page: str) -> set:
    path = os.path.join(ROOT, page)
    if not os.path.exists(path):
        return set()
    with open(path) as f:
        return set(re.findall(r"^## (\d+)\. ", f.read(), re.M))


def _citing_files() -> list[str]:
    out = []
    for top in CITING_FILES:
        path = os.path.join(ROOT, top)
        walked = [path] if os.path.isfile(path) else [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]
        out += sorted(p for p in walked if p.endswith(TEXT_SUFFIXES))
    return out


def test_cited_sections_exist():
    """Every "docs/<page>.md §N" (and "stream §N") written in the code, tests and pages names a
    numbered section of that page."""
    sections, bad, seen = {}, [], 0
    for path in _citing_files():
        with open(path) as f:
            text = f.read()
        for line, page, n in section_refs(text):
            seen += 1
            if n not in sections.setdefault(page, numbered_sections(page)):
                bad.append(f"{os.path.relpath(path, ROOT)}:{line}: {page} has no section {n}")
    assert seen > 50 and not bad, "\n".join(bad)


def test_the_section_check_sees_citations():
    text = ("(docs/algorithms.md §7 and §11), stream §5, stream v1 §8,\n[docs/algorithms.md §7-8](x) "
            "docs/distributed.md §2 Refused; tests/stream §9 §3 docs/kernel-ops.md § zo_sgd_update_\n"
            "(docs/algorithms.md, section 10) docs/perturbation-stream.md sections 3 and 4 stream section X")
    assert section_refs(text) == [(1, "docs/algorithms.md", "7"), (1, "docs/algorithms.md", "11"),
                                  (1, "docs/perturbation-stream.md", "5"), (1, "docs/perturbation-stream.md", "8"),
                                  (2, "docs/algorithms.md", "7"), (2, "docs/algorithms.md", "8"),
                                  (2, "docs/distributed.md", "2"), (3, "docs/algorithms.md", "10"),
                                  (3, "docs/perturbation-stream.md", "3"), (3, "docs/perturbation-stream.md", "4")]
    assert numbered_sections("docs/algorithms.md") >= {str(n) for n in range(12)}
    assert "12" not in numbered_sections("docs/algorithms.md")
    assert numbered_sections("docs/perturbation-stream.md") == {str(n) for n in range(1, 10)}


def test_the_cli_help_lists_the_choices_the_code_has():
    """The choices `zeroflow run --help` lists are the code's: defaults.METHODS, OPTIMIZERS (the
    factory's zeroflow.optim.METHODS), DATASETS, PERTURBATIONS, PRECISIONS, BASELINES, and
    auto + zfkernels.BACKENDS."""
    import zfkernels
    from zeroflow.cli import RUN_FLAGS
    from zeroflow.continual import defaults as D
    from zeroflow.optim import METHODS

    def listed(text: str) -> tuple:
        text = re.sub(r"\s*\([^)]*\)", "", text)
        found = re.search(r"[\w-]+(?: \| [\w-]+)+", text)
        return tuple(found.group(0).split(" | ")) if found else tuple(text.split())

    helps = {flag: text for flag, _, _, text in RUN_FLAGS}
    want = {"--method": D.METHODS, "--optimizer": D.OPTIMIZERS, "--dataset": D.DATASETS,
            "--perturbation": D.PERTURBATIONS, "--precision": D.PRECISIONS, "--baseline": D.BASELINES,
            "--backend": ("auto",) + tuple(zfkernels.BACKENDS)}
    assert D.OPTIMIZERS == METHODS
    assert {flag: listed(helps[flag]) for flag in want} == want


def test_the_torch_switches_the_pages_name_exist():
    """The `torch.backends...` switches a page names (the TF32 ones the precision modes set) are
    objects of this torch: a misspelt one sends a user to an attribute that is not there."""
    import functools

    import torch

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9: the pages name the TF32 switches of torch >= 2.9")

    names = sorted({n for text in _pages().values()
                    for n in re.findall(r"torch\.backends(?:\.[A-Za-z_]\w*)+", text)})
    assert names, "no torch.backends switch named"
    missing = []
    for n in names:
        try:
            functools.reduce(getattr, n.split(".")[1:], torch)
        except AttributeError:
            missing.append(n)
    assert not missing, f"named in the pages, not in torch {torch.__version__}: {missing}"


def test_no_page_passes_gpu_check_a_setting_as_an_argument():
    """gpu_check.sh takes no arguments (its settings are environment variables) and refuses
    one: a page or the Makefile showing `gpu_check.sh SKIP_BUILD=auto` gives a command that fails."""
    texts = dict(_pages())
    for extra in ("Makefile", os.path.join("benchmarks", "notes.md")):
        with open(os.path.join(ROOT, extra)) as f:
            texts[extra] = f.read()
    bad = [f"{name}: {m.group(0)}" for name, text in texts.items()
           for m in re.finditer(r"gpu_check\.sh[ \t]+[A-Z_]+=\S*", text)]
    assert not bad, "gpu_check.sh takes its settings from the environment (SKIP_BUILD=auto bash " \
                    "benchmarks/gpu_check.sh), not as arguments: " + "; ".join(bad)


def undocumented_defaults(parsers: dict, text: str) -> list:
    """``command --option default`` of every option of ``parsers`` whose argparse default (not
    None / False) its --help does not show, or that ``text`` does not write as the option's
    default: ``--option`` then, within a sentence, "default" and the value in backticks."""
    import argparse

    out = []
    for cmd, p in parsers.items():
        for action in p._actions:
            if not action.option_strings or action.default in (None, False, argparse.SUPPRESS):
                continue
            opt = action.option_strings[-1]
            shown = "default" in (action.help or "")
            written = re.search(r"%s(?![\w-])[^.]{0,120}?default[^`.]{0,20}`%s`"
                                % (re.escape(opt), re.escape(str(action.default))), text)
            if not (shown and written):
                out.append(f"{cmd} {opt} {action.default}".strip())
    return out


def test_the_defaults_the_parsers_set_are_shown_and_written():
    """The options whose default argparse sets (the others' come from the configuration and the
    defaults table) show it in --help, as README.md says --help does, and a page writes it:
    `zeroflow replay --device` (cpu) showed no default and `zeroflow sweep --optimizers`
    (zo_sgd,zo_adam,fo_sgd,fo_adam) was written nowhere."""
    import argparse

    toy = argparse.ArgumentParser()
    toy.add_argument("--a", default="x", help="(default: x)")
    toy.add_argument("--b", default="y")
    toy.add_argument("--c", default="z", help="(default: z)")
    toy.add_argument("--d")
    assert undocumented_defaults({"t": toy}, "`--a` (default `x`); `--b` (default `y`); --c is z") == \
        ["t --b y", "t --c z"]
    parsers = _parsers()
    missing = undocumented_defaults({cmd: parsers[cmd] for cmd in ("run", "sweep", "report", "replay")},
                                    "\n".join(_pages().values()))
    assert not missing, f"defaults not shown by --help or written in the pages: {missing}"


def table_default_mismatches(text: str, defaults: dict) -> list:
    """``key: written vs default`` for the rows of the "| option | default | source |" table
    that name two or more options of ``defaults``: their default cell lists one value per
    option (`, `-separated, outside parentheses; after a `;` come other datasets' values), or
    one for all of them; an entry's first word is the value (unset / none / off / auto: None)."""
    table = text.split("| option | default | source |\n|---|---|---|\n", 1)[1].split("\n\n", 1)[0]

    def same(word: str, value) -> bool:
        word = word.strip("`:").lower()
        if value is None or isinstance(value, bool):
            return word == {None: word if word in ("unset", "none", "off", "auto") else None,
                            True: "true", False: "false"}[value]
        if isinstance(value, (int, float)):
            try:
                return float(word) == value
            except ValueError:
                return False
        return word == str(value).lower()

    out = []
    for row in table.splitlines():
        cells = [c.strip() for c in row.strip("|").split("|")]
        keys = re.findall(r"`(\w+)`", cells[0])
        if len(keys) < 2 or not all(k in defaults for k in keys):
            continue
        entries = [e.strip() for e in re.split(r",\s+(?![^()]*\))", cells[1].split(";")[0])]
        entries = entries * len(keys) if len(entries) == 1 else entries
        if len(entries) != len(keys):
            out.append(f"{', '.join(keys)}: {len(entries)} values for {len(keys)} options")
            continue
        out += [f"{k}: {e!r} vs {defaults[k]!r}" for k, e in zip(keys, entries)
                if not e or not same(e.split()[0], defaults[k])]
    return out


def test_the_defaults_table_of_the_continual_page_is_the_code_s():
    """docs/continual.md's defaults table gives, for its rows of several options, the values of
    defaults.COMMON: the operational row (data_root, device, num_workers, ...) had no values."""
    from zeroflow.continual.defaults import COMMON

    toy = ("| option | default | source |\n|---|---|---|\n| `a`, `b` | 1, unset (x, y); z 2 | s |\n"
           "| `c`, `d` | | s |\n| `e`, `f` | on, 0.5 | s |\n| `g` | 9 | s |\n| `h`, `i` | unset: `g` | s |\n\nafter")
    assert table_default_mismatches(toy, dict(a=1, b=None, c=0, d=0, e="on", f=0.25, g=1, h=None, i=None)) == \
        ["c: '' vs 0", "d: '' vs 0", "f: '0.5' vs 0.25"]
    bad = table_default_mismatches(_pages()[os.path.join("docs", "continual.md")], COMMON)
    assert not bad, f"docs/continual.md's defaults table disagrees with defaults.COMMON: {bad}"
