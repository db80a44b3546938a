"""Run folders: who writes one (the lock), what it holds (finished / unfinished / corrupt),
and whether it holds the run a request asks for (config differences).

* A run folder is claimed by one process at a time: ``DIR/.lock`` holds the writer's pid and
  an exclusive ``flock`` on it. A second writer is refused with the holder's pid. The kernel
  drops the flock when its process dies, so a lock file left behind by a killed run (its
  pid no longer holds the lock) is taken over with a warning.
* A run is *finished* only with a complete, readable ``metrics.json`` (written last). A
  folder with ``config.json`` or ``checkpoint.pt`` but no ``metrics.json`` is *unfinished*
  (``zeroflow run --resume --out DIR`` continues it).
* Two configurations are the same run when every key agrees except the purely operational
  ones (``OPERATIONAL_KEYS``); an option one of them lacks counts at its default
  (``comparable``), so ``small_vit: null`` and no ``small_vit`` are the same.
* A folder that holds run folders below it (a sweep's parent) is no place for a run:
  ``zeroflow report`` does not look inside a run folder, so the runs below would vanish from
  its tables (``inspect`` says ``"parent"``). Nor is a folder inside a run folder, for the
  same reason (``"inside"``).

Light on purpose (no torch): ``zeroflow report`` uses it too.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import socket
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from .._atomic import temp_target
from .errors import WriteFailed, ZeroflowError

LOCK = ".lock"
CONFIG = "config.json"
METRICS = "metrics.json"
CHECKPOINT = "checkpoint.pt"
TRAJECTORY = "trajectory"
# The run files whose presence makes a folder a run folder (run_files_in).
RUN_MARKERS = (METRICS, CONFIG, CHECKPOINT)
# Every file a run writes into its folder (--force deletes exactly these, metrics.json first
# so that the folder never looks finished while the rest is being removed).
RUN_FILES = (METRICS, CHECKPOINT, CONFIG, "environment.json", "backbone.pt", "accuracy_matrix.csv",
             "accuracy_per_stage.png", "accuracy_matrix.png")
# Keys that do not change what a run computes: runs differing only in these are the same run.
# num_workers: a training image's augmentation is drawn from (seed, epoch, index) alone since
# results version 2 (tests/test_augmentation_seeds.py); runs of version 1, where the worker count
# did change the draws, are told apart by their version (RESULTS_VERSION below).
OPERATIONAL_KEYS = ("download", "num_workers")
# What one configuration computes has changed between zeroflow versions (pre-1.0: the package
# version was never bumped); RESULTS_VERSION counts those changes. checkpoint.pt and
# metrics.json record the version that computed them ("results_version"), and results of two
# versions are never combined without a word: a resume refuses another version's checkpoint, a
# sweep does not reuse another version's finished run, zeroflow report does not average them.
RESULTS_VERSION = 2
RESULTS_VERSIONS = {
    1: "zeroflow before commit 44287c8 of 2026-12-02 18:09 UTC: training augmentation from torch's global RNG",
    2: "zeroflow since commit 44287c8: training augmentation drawn per image from (seed, epoch, index)",
}
# A checkpoint or metrics.json written between 2026-12-02 15:01 UTC (42dc415, which added the
# data's class names to both) and the version's recording says neither: version 1 or 2 by its start.
UNRECORDED = ("no results version: a zeroflow of 2026-12-02 15:01 UTC to 2026-12-03 wrote it, and its results are "
              "this version's only if the run started after commit 44287c8 (2026-12-02 18:09 UTC), which changed "
              "every training image's random augmentation")


# ---------------------------------------------------------------- errors naming the user's path
@contextlib.contextmanager
def writing(path: str):
    """Turn an ``OSError`` raised while writing ``path`` into ``cannot write PATH: reason``."""
    try:
        yield
    except OSError as e:
        raise WriteFailed(f"cannot write {path}: {e.strerror or e}") from e


# ---------------------------------------------------------------- the lock
def _describe_holder(text: str) -> str:
    try:
        info = json.loads(text)
        return f"pid {info['pid']} on {info['host']} (since {info['since']})"
    except (ValueError, KeyError, TypeError):
        return "another process" if not text.strip() else f"another process ({text.strip()[:80]})"


def _read_fd(fd: int) -> str:
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 4096).decode(errors="replace")


class RunFolder:
    """``claim()`` creates the folder if needed and takes its lock; ``release()`` gives the
    lock back and, when the folder was created by this claim and nothing but the lock was
    written into it, removes the folder again, and the folders it made above it (a run that
    could not start leaves nothing)."""

    def __init__(self, path: str):
        self.path = path
        self.lock_path = os.path.join(path, LOCK)
        self.created = False
        self._made_above: List[str] = []      # folders above path that claim() made for it, deepest first
        self._fd: Optional[int] = None

    def claim(self, warn: Callable[[str], None]) -> "RunFolder":
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise ZeroflowError(f"cannot write run folder {self.path}: it is a file, not a folder")
        with writing(self.path):
            if not os.path.isdir(self.path):
                above, up = [], os.path.dirname(os.path.abspath(self.path))
                while not os.path.isdir(up) and os.path.dirname(up) != up:
                    above.append(up)
                    up = os.path.dirname(up)
                os.makedirs(self.path)
                self.created, self._made_above = True, above
        try:
            with writing(self.lock_path):
                self._lock(warn)
        except BaseException:
            self.release()      # the lock if it was taken (a write after it failed), the folder if made here
            raise
        return self

    def _lock(self, warn) -> None:
        while True:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(_read_fd(fd))
                os.close(fd)
                raise ZeroflowError(f"run folder {self.path} is in use by {holder} (lock file {self.lock_path}); "
                                    f"wait until it has finished, or choose another --out") from None
            except BaseException:       # no flock here (ENOLCK): nobody holds it; leave no fd, and no file in
                os.close(fd)            # a folder this claim made (release removes that folder)
                if self.created:
                    with contextlib.suppress(OSError):
                        os.unlink(self.lock_path)
                raise
            # the previous holder unlinks the file before unlocking it: if we locked a file
            # that is no longer at lock_path, someone may hold a newer one there; try again
            try:
                current = os.fstat(fd).st_ino == os.stat(self.lock_path).st_ino
            except FileNotFoundError:
                current = False
            if current:
                break
            os.close(fd)
        self._fd = fd       # ours from here: released (closed, unlinked) by claim() if what follows fails
        previous = _read_fd(fd)
        # ours now: no other writer can be in this folder, so a temporary file of a run file is a
        # killed writer's, also where its lock file is gone (deleted by hand after the kill)
        left = stale_temp_files(self.path)
        for path in left:
            with writing(path):
                os.unlink(path)
        names = ', '.join(os.path.relpath(t, self.path) for t in left)
        if previous.strip():
            removed = f"; removed the {len(left)} temporary file(s) it left unfinished ({names})" if left else ""
            # a writer killed before its first checkpoint (or a sweep's, which writes none) kept none
            kept = "; its last checkpoint is kept" if os.path.isfile(os.path.join(self.path, CHECKPOINT)) else ""
            warn(f"taking over the lock of {self.path}: it was left by {_describe_holder(previous)}, which no longer "
                 f"holds it (killed?){kept}{removed}")
        elif left:
            warn(f"{self.path}: removed the {len(left)} temporary file(s) a killed writer left unfinished ({names})")
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode() + b"\n")

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.lock_path)        # before unlocking: see _lock
            os.close(self._fd)
            self._fd = None
        self._remove_if_created()

    def _remove_if_created(self) -> None:
        if self.created:
            with contextlib.suppress(OSError):
                os.rmdir(self.path)             # only succeeds while it is empty
            self.created = os.path.isdir(self.path)
            # and the folders made for it (--out a/b/run, a new): a run that wrote nothing leaves nothing
            while not self.created and self._made_above:
                with contextlib.suppress(OSError):
                    os.rmdir(self._made_above[0])
                if os.path.isdir(self._made_above[0]):
                    break
                self._made_above.pop(0)


def lock_holder(folder: str) -> Optional[str]:
    """Who holds ``folder``'s lock right now (None: nobody)."""
    try:
        fd = os.open(os.path.join(folder, LOCK), os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _describe_holder(_read_fd(fd))
    except OSError:         # no flock on this filesystem (ENOLCK): nobody can hold one
        return None
    finally:
        os.close(fd)
    return None


# ---------------------------------------------------------------- reading run files
def read_json(path: str):
    """The JSON in ``path``; ``ZeroflowError`` naming the file when it cannot be read or parsed."""
    try:
        with open(path) as f:
            return json.load(f)
    except OSError as e:
        raise ZeroflowError(f"{path}: cannot read it ({e.strerror or e})") from e
    except ValueError as e:       # JSONDecodeError, UnicodeDecodeError
        raise ZeroflowError(f"{path}: corrupt ({type(e).__name__}: {e})") from e


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_config(cfg, path: str) -> Dict:
    if not isinstance(cfg, dict):
        raise ZeroflowError(f"{path}: corrupt (the configuration is a {type(cfg).__name__}, not a mapping)")
    for k in ("method", "optimizer", "dataset"):
        if not isinstance(cfg.get(k), str):
            raise ZeroflowError(f"{path}: corrupt (the configuration has no {k})")
    return cfg


def load_metrics(path: str) -> Dict:
    """A finished run's ``metrics.json``, checked for what the report and the CLI read."""
    m = read_json(path)
    if not isinstance(m, dict):
        raise ZeroflowError(f"{path}: corrupt (a {type(m).__name__}, not a mapping of results)")
    missing = [k for k in ("config", "avg", "last", "fgt", "forward_passes", "peak_memory_bytes") if k not in m]
    if missing:
        raise ZeroflowError(f"{path}: corrupt (no {', '.join(missing)})")
    check_config(m["config"], path)
    bad = [k for k in ("avg", "last", "fgt", "forward_passes", "peak_memory_bytes") if not _number(m[k])]
    bad += [k for k in ("seconds_per_iteration", "avg_gain", "last_gain", "train_peak_memory_bytes")
            if m.get(k) is not None and not _number(m[k])]
    if bad:
        raise ZeroflowError(f"{path}: corrupt (not a finite number: {', '.join(bad)})")
    gains = [k for k in ("avg_gain", "last_gain") if m.get(k) is not None]     # the baseline's: both or neither
    if len(gains) == 1:
        raise ZeroflowError(f"{path}: corrupt ({gains[0]} without {({'avg_gain', 'last_gain'} - set(gains)).pop()})")
    results_version(m, path)        # a recorded one is a version number
    return m


def results_version(record: Dict, path: str) -> Optional[int]:
    """The results version (``RESULTS_VERSION``) of a run's ``checkpoint.pt`` or
    ``metrics.json`` (``record``, read from ``path``): the one it records; else 1 where it
    predates the data's class names (a checkpoint without ``identity``, a metrics.json without
    ``class_names``: written before 2026-12-02 15:01 UTC, so before 44287c8); else None, not
    known (``UNRECORDED``). A resumed run whose checkpoint had none records none either."""
    if "results_version" in record:
        v = record["results_version"]
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
            raise ZeroflowError(f"{path}: corrupt (results_version {v!r} is not a version number)")
        return v
    return 1 if ("identity" if os.path.basename(path) == CHECKPOINT else "class_names") not in record else None


def describe_results_version(v: int) -> str:
    """``results version V (what it means)``, for a known version or a newer zeroflow's."""
    return f"results version {v} ({RESULTS_VERSIONS.get(v, 'a zeroflow newer than this one')})"


def read_run_config(folder: str) -> Dict:
    path = os.path.join(folder, CONFIG)
    if not os.path.isfile(path):
        raise ZeroflowError(f"{path} not found: {folder} is not a zeroflow run folder")
    return check_config(read_json(path), path)


# ---------------------------------------------------------------- what a folder holds
@dataclass
class FolderState:
    kind: str                       # "absent" | "empty" | "finished" | "unfinished" | "corrupt" | "parent" | "inside"
    config: Optional[Dict] = None   # the run's configuration (finished / unfinished)
    metrics: Optional[Dict] = None  # finished only
    problem: str = ""               # corrupt: the file and the reason; parent: a run folder below it;
                                    # inside: the run folder above it


def inspect(folder: str) -> FolderState:
    if not os.path.isdir(folder):
        above = run_above(folder)
        return FolderState("inside", problem=above) if above else FolderState("absent")
    try:
        if os.path.exists(os.path.join(folder, METRICS)):
            m = load_metrics(os.path.join(folder, METRICS))
            return FolderState("finished", config=m["config"], metrics=m)
        if os.path.exists(os.path.join(folder, CONFIG)):
            return FolderState("unfinished", config=read_run_config(folder))
    except ZeroflowError as e:
        return FolderState("corrupt", problem=str(e))
    if os.path.exists(os.path.join(folder, CHECKPOINT)):
        return FolderState("corrupt", problem=f"{os.path.join(folder, CHECKPOINT)} without {CONFIG}")
    below = run_below(folder)
    if below:
        return FolderState("parent", problem=below)
    above = run_above(folder)
    if above:
        return FolderState("inside", problem=above)
    return FolderState("empty")


def run_files_in(folder: str) -> List[str]:
    """The run files (metrics, config, checkpoint) that ``folder`` holds: any makes it a run folder."""
    return [f for f in RUN_MARKERS if os.path.exists(os.path.join(folder, f))]


def is_run_folder(folder: str) -> bool:
    return bool(run_files_in(folder))


def walk_folders(top: str):
    """``(folder, subdirs)`` for ``top`` and the folders below it, top-down in sorted order (the
    caller may prune ``subdirs``), following symbolic links to folders (a run linked into a
    collection is one of its runs) but entering no folder twice (a link to a folder above)."""
    entered = set()
    for folder, subdirs, _files in os.walk(top, followlinks=True):
        real = os.path.realpath(folder)
        if real in entered:
            subdirs[:] = []
            continue
        entered.add(real)
        subdirs.sort()
        yield folder, subdirs


def run_below(folder: str) -> Optional[str]:
    """The first run folder strictly below ``folder`` (in sorted order, as ``zeroflow report``
    searches), or None. A run written into ``folder`` would hide it from the report."""
    for path, _subdirs in walk_folders(folder):
        if path != folder and is_run_folder(path):
            return path
    return None


def run_above(folder: str) -> Optional[str]:
    """The nearest run folder strictly above ``folder``, or None. A run written into ``folder``
    would be hidden from ``zeroflow report``, which does not look inside a run folder."""
    path = os.path.abspath(folder)
    while True:
        up = os.path.dirname(path)
        if up == path:
            return None
        path = up
        if is_run_folder(path):
            return path


def inside_refusal(folder: str, above: str) -> str:
    """Why a run cannot be written into ``folder``, which lies inside the run folder ``above``."""
    return (f"{folder} is inside the run folder {above}; zeroflow report does not look inside a run folder, so a "
            f"run written there would be hidden from it: choose an --out outside {above}")


def parent_refusal(folder: str, below: str) -> str:
    """Why a run cannot be written into ``folder``, which holds the run folder ``below``."""
    return (f"{folder} holds other run folders ({below}); a run written into {folder} would hide them from "
            f"zeroflow report, which does not look inside a run folder: choose another --out (e.g. a new "
            f"folder inside {folder})")


def stale_temp_files(folder: str) -> List[str]:
    """The temporary files of a run's files (RUN_FILES, and the trajectory folder's) that a
    killed writer left in ``folder`` (never read; checkpoint.pt's is checkpoint-sized, one
    more per kill); a user's own ``.tmp-*`` files are not among them."""
    found = []
    for where, names in ((folder, set(RUN_FILES)), (os.path.join(folder, TRAJECTORY), None)):
        try:
            entries = sorted(os.listdir(where))
        except OSError:
            continue
        for entry in entries:
            target = temp_target(entry)
            if target and (names is None or target in names) and os.path.isfile(os.path.join(where, entry)):
                found.append(os.path.join(where, entry))
    return found


def remove_run_files(folder: str) -> None:
    """Delete what a run wrote into ``folder`` (``--force``), with the temporary files a killed
    writer left; other files are left alone."""
    for path in [os.path.join(folder, name) for name in RUN_FILES] + stale_temp_files(folder):
        with writing(path):
            if os.path.exists(path):
                os.unlink(path)
    traj = os.path.join(folder, TRAJECTORY)
    if os.path.isdir(traj):
        with writing(traj):
            shutil.rmtree(traj)


# ---------------------------------------------------------------- same run?
def canonical(value):
    """JSON round trip: tuples become lists, as in a config read back from disk."""
    return json.loads(json.dumps(value, default=str))


def comparable(config: Dict) -> Dict:
    """``config`` as two configurations are compared (``config_differences``, and the rows of
    ``zeroflow report``): JSON values, every option it lacks (a run written before the option
    existed) at its default, no null option that has no default (``small_vit: null`` is
    the same as no ``small_vit``), and a digits run's data_root at its default (it never acts)."""
    from .defaults import COMMON

    full = canonical(COMMON) | canonical(config)
    if full.get("dataset") == "digits":
        # the embedded data ships with scikit-learn: a digits run's data_root never acts (its
        # --data-root is ignored with a warning), so runs that differ in it compute the same
        full["data_root"] = COMMON["data_root"]
    return {k: v for k, v in full.items() if not (v is None and k not in COMMON)}


def config_differences(saved: Dict, requested: Dict, *, ignore: Tuple[str, ...] = (),
                       where: Tuple[str, str] = ("there", "requested")) -> List[str]:
    """``key: saved WHERE[0], requested WHERE[1]`` for every key (but the operational ones and
    ``ignore``) that differs."""
    a, b = comparable(saved), comparable(requested)
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if k in OPERATIONAL_KEYS or k in ignore or va == vb:
            continue
        out.append(f"{k}: {va!r} {where[0]}, {vb!r} {where[1]}")
    return out


def conflict(folder: str, cfg: Dict) -> Tuple[FolderState, str]:
    """What ``folder`` holds, and why a run of ``cfg`` cannot take it as its own: ``""`` where
    it can (no run there yet, or a finished or unfinished run of ``cfg``), else "FOLDER holds
    ..." naming the damage or the options that differ. The caller adds what to do about it."""
    state = inspect(folder)
    if state.kind == "corrupt":
        return state, f"{folder} holds a damaged run ({state.problem})"
    if state.kind == "parent":
        return state, (f"{folder} holds other run folders ({state.problem}), which a run written there would hide "
                       f"from zeroflow report")
    if state.kind == "inside":
        return state, (f"{folder} is inside the run folder {state.problem}, and zeroflow report does not look inside "
                       f"a run folder")
    diffs = config_differences(state.config, cfg) if state.config is not None else []
    if diffs:
        article = "an" if state.kind == "unfinished" else "a"
        return state, f"{folder} holds {article} {state.kind} run with another configuration ({'; '.join(diffs)})"
    if state.kind == "finished":
        why = other_results_version(folder, state.metrics)
        if why:
            return state, why
    return state, ""


def other_results_version(folder: str, metrics: Dict) -> str:
    """Why the finished run in ``folder`` (``metrics``) is no result of this zeroflow for its
    configuration: ``""`` where its results version is this one's or not recorded."""
    v = results_version(metrics, os.path.join(folder, METRICS))
    if v is None or v == RESULTS_VERSION:
        return ""
    return (f"{folder} holds a finished run of this configuration computed by {describe_results_version(v)}; this "
            f"zeroflow computes {describe_results_version(RESULTS_VERSION)}, so its numbers do not belong beside "
            f"this version's")
