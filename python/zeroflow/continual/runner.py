"""One continual-learning run: data, backbone, learner, per-task checkpoints, results.

Run folder (``--out DIR`` or a fresh ``runs/<time>_<method>_<optimizer>_<dataset>``), claimed
by one process at a time (``DIR/.lock``, see :mod:`.runfolder`):

* ``config.json``, ``environment.json``, ``backbone.pt`` (small backbone only: its
  self-supervised pretrained weights), written once the data and the network are ready: a run that cannot
  start writes nothing (and removes the folder if it created it)
* ``checkpoint.pt`` (after every task; ``--resume`` continues from it)
* ``trajectory/task<k>.zft`` and ``task<k>.base.pt`` with ``--record`` (one log per trained task)
* at the end: ``accuracy_matrix.csv``, ``accuracy_per_stage.png``,
  ``accuracy_matrix.png`` and last ``metrics.json``. Every file is written to a temporary
  name and renamed, so a ``metrics.json`` only exists for a finished run.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import pickle
import platform
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Dict, Optional, Tuple

import numpy as np
import torch
import torch.distributed

from .._atomic import atomic_torch_save, atomic_write, atomic_write_bytes
from . import metrics as M
from .defaults import COMMON, as_given, flag, init_cls_refusal, lr_entry, validate
from .errors import OutputClosed, WriteFailed, ZeroflowError, refuse_empty_path, the_same_on_every_rank
from .precision import check_run_precision, grad_scaler
from .runfolder import (CHECKPOINT, CONFIG, METRICS, OPERATIONAL_KEYS, RESULTS_VERSION, TRAJECTORY, UNRECORDED,
                        RunFolder, canonical, config_differences, describe_results_version, inside_refusal,
                        inspect, other_results_version, parent_refusal, read_run_config, remove_run_files,
                        results_version, run_above, writing)

if TYPE_CHECKING:
    from .learners import Counters

CKPT_VERSION = 1
BACKBONE = "backbone.pt"


# ---------------------------------------------------------------- atomic files
def atomic_write_text(path: str, text: str):
    with writing(path):
        atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def save_torch(obj, path: str):
    with writing(path):
        atomic_torch_save(obj, path)


def warn_stderr(msg: str):
    try:
        print(f"zeroflow: warning: {msg}", file=sys.stderr, flush=True)
    except BrokenPipeError as e:    # `zeroflow run ... 2>&1 | head -3`: stderr is stdout's closed pipe
        raise OutputClosed() from e


def log_stdout(msg: str):
    # flushed line by line: stdout into a file or pipe (`zeroflow run > run.log`) is
    # block-buffered, and a SIGKILL (the OOM killer, a lease's limit) lost the lines of the
    # tasks already finished; a `tail -f` showed none of them while the run went on
    try:
        print(msg, flush=True)
    except BrokenPipeError as e:    # `zeroflow run ... | head -1`: not a broken pipe of a DataLoader's workers
        raise OutputClosed() from e


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C / SIGTERM during a run: where it stopped and whether ``--resume`` can continue it.
    ``rank``: the torchrun rank it stopped on; only rank 0 knows what was written (``resumable``
    is rank 0's alone), so only rank 0 says it."""

    def __init__(self, run_dir: str, completed: int, n_tasks: Optional[int], resumable: bool, rank: int = 0):
        super().__init__(run_dir)
        self.run_dir, self.completed, self.n_tasks, self.resumable = run_dir, completed, n_tasks, resumable
        self.rank = rank


# ---------------------------------------------------------------- helpers
def resolve_device(name: Optional[str]) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except Exception as e:
        raise ZeroflowError(f"--device {name!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ZeroflowError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ZeroflowError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type not in ("cpu", "cuda"):
        raise ZeroflowError(f"--device {name}: zeroflow runs on cpu or cuda devices")
    return dev


def check_backend(backend: Optional[str], device: torch.device) -> None:
    """``--backend`` must name a zfkernels backend that can run this run's tensors here."""
    import zfkernels

    if backend in (None, "", "auto"):
        return
    if backend not in zfkernels.BACKENDS:
        raise ZeroflowError(f"unknown backend {backend!r}; valid: auto, {', '.join(zfkernels.BACKENDS)}")
    try:
        zfkernels.resolve_backend(backend, device)
    except (ValueError, RuntimeError) as e:
        # zfkernels' advice is the Python API's (use backend='auto'): the CLI's user types the flag
        why = str(e).replace("; use backend='auto'", "")
        raise ZeroflowError(f"--backend {backend} cannot run on {device} here: {why} (use --backend auto)") from e


def check_backbone(cfg: Dict) -> None:
    """The weights file exists, and the timm backbone builds from ``model_kwargs`` and runs
    on the run's images (:func:`.backbones.check_timm_backbone`)."""
    ck = cfg.get("checkpoint")
    if ck and not os.path.isfile(ck):
        raise ZeroflowError(f"--checkpoint {ck}: no such file")
    if cfg["backbone"] != "small":
        from .backbones import check_timm_backbone
        check_timm_backbone(cfg["backbone"], cfg.get("model_kwargs"), int(cfg["adapter_dim"]), int(cfg["img_size"]))


def _version(dist: str):
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def environment(device: torch.device, backend: Optional[str]) -> Dict:
    """Versions and hardware. Package versions come from their metadata: importing timm,
    torchvision and scikit-learn only to read ``__version__`` took seconds."""
    import zfkernels

    from .. import __version__

    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "numpy": np.__version__, "device": str(device), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "timm": _version("timm"), "torchvision": _version("torchvision"),
           "sklearn": _version("scikit-learn"), "zeroflow": __version__,
           "zfkernels_backends": list(zfkernels.available_backends(device)),
           "zfkernels_backend": zfkernels.resolve_backend(backend or "auto", device)}
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def task_seed(seed: int, t: int) -> int:
    return (int(seed) * 1000 + 17 * t + 1) % (2 ** 31 - 1)


def seed_everything(s: int):
    torch.manual_seed(s)
    np.random.seed(s % (2 ** 32))


@dataclass
class TaskContext:
    seed: int
    n_tasks: int
    counters: "object"
    timer: "object"
    progress: bool
    shard: Optional[tuple] = None     # (rank, world) under torchrun, else None
    record_dir: Optional[str] = None  # --record (rank 0): the run's trajectory/ folder
    mem: Optional[object] = None      # the run's MemoryMeter: training peaks (metrics.MemoryMeter.section)
    scaler: Optional[object] = None   # the run's GradScaler: fp16 first-order steps (precision.grad_scaler)

    def record_stem(self, t: int) -> Optional[str]:
        """Path stem of task ``t``'s trajectory log (1-based, as printed), or None."""
        return os.path.join(self.record_dir, f"task{t + 1}") if self.record_dir else None


def distributed_setup(cfg: Dict):
    """``(rank, world)`` when launched by torchrun (process group initialised here; world
    may be 1), else ``None``. Data-parallel runs are zeroth-order only: FO baselines need gradient
    all-reduce (use torch DDP for those), so they are refused with that advice."""
    from zeroflow.distributed import init_from_env

    got = init_from_env()
    if got is None:
        return None
    refuse_first_order(cfg)
    return got


def refuse_first_order(cfg: Dict) -> None:
    """Under torchrun: a first-order optimizer is refused (:func:`distributed_setup`)."""
    with the_same_on_every_rank():      # the option, which every rank gets alike
        if str(cfg.get("optimizer", "")).startswith("fo_"):
            raise ZeroflowError(f"--optimizer {cfg['optimizer']} under torchrun: data-parallel runs exchange only "
                                "ZO loss scalars, so they need a forward-pass optimizer (zo_* or forward_grad, "
                                "optionally with --hybrid-switch); run first-order baselines in a single process")


def claim_default_folder(cfg: Dict, warn) -> RunFolder:
    """A new ``runs/<time>_<method>_<optimizer>_<dataset>[_k]``; ``mkdir`` (not an existence
    test) picks the name, so two runs started in the same second get different folders."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"{stamp}_{cfg['method']}_{cfg['optimizer']}_{cfg['dataset']}")
    with writing("runs"):
        os.makedirs("runs", exist_ok=True)
    k = 1
    while True:
        path = base if k == 1 else f"{base}_{k}"
        try:
            with writing(path):
                os.mkdir(path)
        except ZeroflowError as e:
            if not isinstance(e.__cause__, FileExistsError):
                raise
            k += 1
            continue
        folder = RunFolder(path)
        folder.created = True       # made here: removed again if the claim fails
        return folder.claim(warn)


def _first_sentence(text: str) -> str:
    """The first sentence of an exception's text (its whole first line if it has no sentence
    end): torch's "PytorchStreamReader failed reading zip archive: failed finding central
    directory." goes on with a paragraph of advice, which a cut at 200 characters left mid-word."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    end = re.search(r"[.!?](?=\s)", line)
    return line[:end.end()] if end else line


def load_checkpoint(path: str) -> Dict:
    """The run checkpoint at ``path``, read with ``weights_only=True``: it holds tensors and
    plain data only (dicts, lists, numbers, strings), so a file that needs anything else to
    unpickle was not written by zeroflow and is refused before any of its code can run (a
    full unpickler runs whatever a crafted file names)."""
    # a resume without checkpoint.pt trains the run again from its first task, in the same folder
    fix = (f"delete it and continue with: zeroflow run --resume --out {os.path.dirname(path) or '.'} (the run then "
           f"trains again from its first task)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message opens with advice to load with weights_only=False; what it refused
        # is on the "Unsupported global" line (absent for a file that is no pickle at all)
        foreign = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if foreign is None:
            raise ZeroflowError(f"checkpoint {path} is corrupt or unreadable (it does not unpickle as a torch.save "
                                f"file); {fix}") from e
        raise ZeroflowError(f"checkpoint {path} holds objects other than tensors and plain data (it names "
                            f"{foreign.group(1)}); a zeroflow checkpoint never does, so this file was not written "
                            f"by zeroflow run: it is not loaded (loading would run its code); {fix}") from e
    except Exception as e:
        why = _first_sentence(str(e))
        raise ZeroflowError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}{': ' + why if why else ''}"
                            f"); {fix}") from e
    if not isinstance(ck, dict) or ck.get("version") != CKPT_VERSION or "completed" not in ck:
        raise ZeroflowError(f"checkpoint {path} is not a zeroflow run checkpoint (version {CKPT_VERSION}); {fix}")
    return ck


# ---------------------------------------------------------------- backbone
def build_network(cfg: Dict, data, device: torch.device, saved_backbone: Optional[str], progress: bool,
                  warn=None):
    """The adapted ViT. Small backbone: the run's own ``backbone.pt`` when ``saved_backbone``
    exists (a resumed run), else pretrained (or taken from the cache, which ``warn`` says if it
    cannot be written); nothing is written in the run folder."""
    from .backbones import AdaptedViT, build_small_vit, load_timm_vit, pretrain_small_backbone

    if cfg["backbone"] == "small":
        if saved_backbone and os.path.isfile(saved_backbone):
            vit = build_small_vit(data.in_chans, data.img_size, cfg.get("small_vit"))
            try:
                vit.load_state_dict(torch.load(saved_backbone, map_location="cpu", weights_only=True))
            except Exception as e:
                # without it a resume pretrains the small ViT again (or reads $ZEROFLOW_CACHE) and goes
                # on only if that is the backbone the run started with (check_identity: its sha256)
                why, run_dir = _first_sentence(str(e)), os.path.dirname(saved_backbone) or "."
                raise ZeroflowError(
                    f"{saved_backbone} is corrupt or unreadable ({type(e).__name__}{': ' + why if why else ''}); "
                    f"delete it and continue with: zeroflow run --resume --out {run_dir} "
                    f"(the small ViT is then pretrained again, or read from $ZEROFLOW_CACHE, and the run goes on if it "
                    f"is the backbone the run started with)") from e
        else:
            vit = pretrain_small_backbone(
                data, vit_cfg=cfg.get("small_vit"), epochs=int(cfg["pretrain_epochs"]),
                lr=float(cfg["pretrain_lr"]), batch_size=int(cfg["pretrain_batch_size"]), seed=int(cfg["seed"]),
                device=device, progress=progress, warn=warn)
    else:
        vit = load_timm_vit(cfg["backbone"], checkpoint=cfg.get("checkpoint"), pretrained=True,
                            model_kwargs=cfg.get("model_kwargs"))
    net = AdaptedViT(vit, int(cfg["adapter_dim"]))
    net.precision = cfg.get("precision", "fp32")
    return net.to(device)


def make_learner(cfg, net, device):
    if cfg["method"] == "ease":
        from .ease import EASE
        return EASE(net, cfg, device)
    if cfg["method"] == "aper":
        from .aper import APER
        return APER(net, cfg, device)
    from .defaults import METHODS
    raise ZeroflowError(f"unknown method {cfg['method']!r}; valid: {', '.join(METHODS)}")


@torch.no_grad()
def evaluate(learner, data, seen_tasks, device, counters, batch_size, num_workers):
    from .learners import batch_features

    seen = [c for cls in seen_tasks for c in cls]
    loader = data.loader("test", seen, batch_size, num_workers=num_workers)
    preds, targets = [], []
    # batch by batch (a test set's features for every adapter need not fit in memory)
    for f, y in batch_features(learner.net, loader, learner.eval_adapters(), device, counters):
        preds.append(learner.logits(f).argmax(1))
        targets.append(y)
    return M.accuracy_from_predictions(torch.cat(preds), torch.cat(targets), seen_tasks)


# ---------------------------------------------------------------- which run, in which folder
# Options that say where a run's device, data and weights file are, not what it computes: a
# resumed run takes them from the command line when given (the data moved, a relative
# --data-root given in another directory, another machine), and its configuration keeps its
# own. The data and the weights are checked against those the run started with
# (:func:`run_identity`); results are bit-identical across devices by design.
LOCATIONS = ("device", "data_root", "checkpoint")


def resumed_config(out: str, requested: Dict, warn, names: Optional[Dict[str, str]] = None) -> Tuple[Dict, Dict]:
    """``(configuration, locations)``: the configuration saved in ``out`` (checked) and where
    the run finds its device, data and weights now: the ``LOCATIONS`` given in ``requested``
    (``--device``, ``--data-root``, ``--checkpoint``), the saved ones for the others; with
    them, the ``OPERATIONAL_KEYS`` given (``--num-workers``, ``--download``: how the data is
    loaded, which changes no result). The configuration keeps its own (it goes into
    metrics.json as it is in config.json: a run resumed elsewhere is still the same run for
    zeroflow sweep and zeroflow report; the devices it ran on are in metrics.json's ``device``
    and ``tasks``). Any other option in ``requested`` that differs from the saved one is named
    in a warning: a resumed run keeps its configuration. ``names[key]``: how the user gave an
    option of ``requested`` (``epochs in FILE`` for one of a ``--config`` file; default its flag)."""
    names = names or {}

    def name(k):
        return names.get(k, flag(k))

    if not os.path.isdir(out):
        raise ZeroflowError(f"--resume: run folder {out} does not exist")
    saved = read_run_config(out)
    # the digits data ships with scikit-learn: a --data-root given to a digits run is ignored, and named
    movable = [k for k in LOCATIONS + OPERATIONAL_KEYS
               if not (k == "data_root" and saved.get("dataset") == "digits")]
    ignored = []
    for k, v in sorted(requested.items()):
        if k in movable or v is None:
            continue
        have = saved.get(k, COMMON.get(k))
        want = (lr_entry(v, saved["optimizer"], bool(saved.get("hybrid_switch")))
                if k == "lr" and isinstance(v, dict) else v)
        if canonical(want) != canonical(have):
            ignored.append(f"{name(k)} {want} (the run has {have})")
    if ignored:
        warn(f"--resume continues {out} with the configuration in its {CONFIG}; ignoring {', '.join(ignored)}")
    cfg = validate(dict(saved), {k: f"{k} in {os.path.join(out, CONFIG)}" for k in saved})
    locations = {}
    for k in LOCATIONS:
        given = requested.get(k) if k in movable else None
        if given is None:
            locations[k] = cfg.get(k)
            continue
        if not isinstance(given, str) or not given:
            raise ZeroflowError(f"{name(k)} must be a non-empty string (got {given!r})")
        locations[k] = given if k == "device" else os.path.expanduser(given)
    given = {k: requested[k] for k in OPERATIONAL_KEYS if requested.get(k) is not None}
    if given:       # checked as a fresh run's would be (--num-workers -1 is refused, naming the flag)
        locations.update({k: validate(dict(cfg, **given), {j: name(j) for j in given})[k] for k in given})
    if locations["checkpoint"] and not cfg.get("checkpoint"):
        raise ZeroflowError(f"--checkpoint: the run in {out} loads no weights file (its backbone is "
                            f"{cfg['backbone']}{', pretrained by zeroflow' if cfg['backbone'] == 'small' else ''}); "
                            f"drop the option")
    return cfg, locations


def _refusal(out: str, kind: str, problem: str, diffs) -> str:
    other = f"with another configuration ({'; '.join(diffs)})" if diffs else "of this configuration"
    if kind == "finished":
        return (f"{out} already holds a finished run {other} (metrics.json); choose another --out, or add --force to "
                f"{'replace it' if diffs else 'run it again'} (its files are deleted first)")
    if kind == "unfinished":
        return (f"{out} holds an unfinished run {other}; continue it with zeroflow run --resume --out {out}, choose "
                f"another --out, or add --force to {'replace it' if diffs else 'start it over'}")
    return f"{out} holds a damaged run ({problem}); choose another --out, or add --force to replace it"


def decide(out: str, cfg: Dict, *, resume: bool, force: bool, continue_existing: bool, log, warn):
    """Under the folder's lock: ``("fresh" | "resume" | "finished", metrics or None)``.

    A finished run is one with a readable ``metrics.json`` whose config matches the request:
    ``continue_existing`` (sweep) takes it as it is, and resumes an unfinished run of the same
    configuration; anything else already in the folder is refused, naming the differing
    options, unless ``force`` (its run files are deleted first, with a warning). A folder that
    holds other run folders below it is refused even with ``force``: the run would hide them
    from ``zeroflow report``; so is a folder inside a run folder, even with ``resume``."""
    state = inspect(out)
    if state.kind == "inside":          # no option helps: the run folder above is another run's
        raise ZeroflowError(inside_refusal(out, state.problem))
    if resume:
        if state.kind == "finished":
            log(f"run {out} is already finished")
            return "finished", state.metrics
        if state.kind == "corrupt":
            hint = ""
            if METRICS in state.problem and os.path.isfile(os.path.join(out, CHECKPOINT)):
                hint = (f"; {METRICS} is written last, from {CHECKPOINT}: delete it and run --resume again to "
                        f"write it anew")
            raise ZeroflowError(f"cannot resume {out}: {state.problem}{hint}")
        return "resume", None
    if state.kind in ("absent", "empty"):
        return "fresh", None
    if state.kind == "parent":          # --force cannot help: those runs are not this folder's
        raise ZeroflowError(parent_refusal(out, state.problem))
    diffs = config_differences(state.config, cfg) if state.config is not None else []
    older = other_results_version(out, state.metrics) if state.kind == "finished" and not diffs else ""
    if continue_existing and state.kind in ("finished", "unfinished") and not diffs and not older:
        if state.kind == "finished":
            log(f"run {out} is already finished (same configuration)")
            if results_version(state.metrics, os.path.join(out, METRICS)) is None:
                warn(f"reusing the finished run in {out}, whose {METRICS} records {UNRECORDED}. The sweep's table "
                     f"and zeroflow report list it apart from runs that record their version; to compute it again, "
                     f"move it away")
            return "finished", state.metrics
        log(f"resuming the unfinished run in {out} (same configuration)")
        return "resume", None
    if force:
        warn(f"--force: deleting the {state.kind} run in {out}" + (f" ({'; '.join(diffs)})" if diffs else ""))
        remove_run_files(out)
        return "fresh", None
    if continue_existing and older:
        raise ZeroflowError(f"{older}; move it away, or add --force to run it again")
    raise ZeroflowError(_refusal(out, state.kind, state.problem, diffs))


def _on_rank0(world: int, main: bool, fn: Callable):
    """``fn()`` on rank 0; its result, or its ZeroflowError, on every rank (no rank is left
    waiting in a collective for a rank that gave up)."""
    result, error = None, None
    if main:
        try:
            result = fn()
        except ZeroflowError as e:
            if world == 1:
                raise
            error = str(e)
    if world > 1:
        box = [result, error]
        torch.distributed.broadcast_object_list(box, src=0)
        result, error = box
        if error is not None:
            with the_same_on_every_rank():      # rank 0's text, on every rank
                raise ZeroflowError(error)
    return result


def _agreed(world: int, fn: Callable):
    """``fn()`` on every rank; under a torchrun group, the ranks then tell each other whether
    it refused the run (one all_gather of the texts), so that an error every rank hit alike is
    said once (rank 0; ``every_rank``), one that some ranks hit is said by those ranks, and a
    rank that hit none stops too (rank 0 names the ranks that refused; no rank is left waiting
    in a later collective for ranks that gave up)."""
    result, error = None, None
    try:
        result = fn()
    except ZeroflowError as e:
        if world == 1 or not torch.distributed.is_initialized():
            raise
        error = e
    if world > 1 and torch.distributed.is_initialized():
        texts = [None] * world
        torch.distributed.all_gather_object(texts, None if error is None else str(error))
        failed = [r for r, text in enumerate(texts) if text is not None]
        if error is not None:
            error.every_rank = len(failed) == world and len(set(texts)) == 1
            raise error
        if failed:
            with the_same_on_every_rank():
                raise ZeroflowError(f"rank(s) {', '.join(map(str, failed))} of this torchrun job refused the run "
                                    f"(their message is above); every rank stops")
    return result


# ---------------------------------------------------------------- run
def run(cfg: Dict, out: Optional[str] = None, *, resume: bool = False, force: bool = False,
        continue_existing: bool = False, progress: bool = True, stop_after: Optional[int] = None,
        log=log_stdout, warn=warn_stderr, warn_data=None, names: Optional[Dict[str, str]] = None) -> Dict:
    """Run (or resume) one experiment; returns the metrics dict (also in ``<run>/metrics.json``).

    ``cfg``: the run configuration (``defaults.resolve``); checked again here. With
    ``resume=True`` it holds only the options the user gave: the run keeps the configuration
    saved in ``out``, runs on ``device`` when given (the configuration, metrics.json's
    included, keeps its own), and any other given option that differs is named in a warning.
    ``force``: replace whatever run ``out`` holds. ``continue_existing`` (sweep): a finished
    run of the same configuration is returned, an unfinished one resumed.
    ``stop_after=k``: stop after task ``k`` (1-based count of tasks finished in total; a
    resumed run with ``k`` or more finished trains none) with the checkpoint written and no
    metrics.json, as an interrupted run would. ``names``: how the user gave the options of
    ``cfg`` (``epochs in FILE``; default their flags), for the messages. ``warn_data``: says the
    warnings of the run's data (files skipped, a class count unlike the study's; default
    ``warn``), which the runs of a sweep share: it says them once.

    Everything that can be checked (options, device, backend, weights file, data) is checked
    before the folder is claimed; a run that fails before its ``config.json`` is written
    leaves no folder behind. Ctrl-C raises :class:`RunInterrupted`.
    """
    threads = torch.get_num_threads()
    try:
        return _run(cfg, out, resume=resume, force=force, continue_existing=continue_existing, progress=progress,
                    stop_after=stop_after, log=log, warn=warn, warn_data=warn_data or warn, names=names)
    finally:       # the run's thread count (threads=, 1 for the small backbone) stays the run's
        torch.set_num_threads(threads)


def _run(cfg: Dict, out: Optional[str], *, resume: bool, force: bool, continue_existing: bool, progress: bool,
         stop_after: Optional[int], log, warn, warn_data, names: Optional[Dict[str, str]] = None) -> Dict:
    """:func:`run`'s body."""
    from .data import UnreadableImage

    t_start = time.perf_counter()
    with the_same_on_every_rank():      # the command line, which every rank of a torchrun job gets alike
        _check_run_flags(out, resume=resume, force=force, stop_after=stop_after)
    if resume:      # the configuration is the run folder's: read below, once the group is up
        from zeroflow.distributed import init_from_env

        shard = init_from_env()
    else:
        with the_same_on_every_rank():
            cfg = validate(cfg, names)
        shard = distributed_setup(cfg)
    rank, world = shard or (0, 1)
    requested = cfg

    def the_folder():
        # files every rank reads for itself, so the ranks agree on their refusals (:func:`_agreed`)
        # and rank 0 alone says the warnings: every rank of torchrun ... --resume said each of them
        # (a folder missing, --checkpoint given to a run without weights, 'ignoring --epochs 3')
        above = run_above(out or "runs")        # no --out: runs/<time>_... (below the current folder)
        if above:       # before the claim, which would create the folders up to --out
            raise ZeroflowError(inside_refusal(out or "runs", above))
        if resume:
            cfg, located = resumed_config(out, requested, warn if rank == 0 else _silent, names)
            if shard is not None:
                # the optimizer of this rank's config.json (another node's copy may differ): refused
                # inside the agreement, or a rank refusing alone left the others waiting in the next
                # collective, which ended in gloo's 'Connection closed by peer' traceback
                refuse_first_order(cfg)
            return cfg, located
        return requested, {k: requested.get(k) for k in LOCATIONS}

    cfg, located = _agreed(world, the_folder)
    device_name = located["device"]
    # the configuration, with where its device, data and weights are now and how the data is loaded
    where = dict(cfg, **located)
    main = rank == 0     # only rank 0 writes files and logs; every rank trains and evaluates
    if not main:
        log, warn, warn_data, progress = _silent, _silent, _silent, False

    def checks():
        # what each rank sees for itself (its device, files, data): another node may see it otherwise
        device = _run_device(device_name, world)
        check_backend(cfg.get("backend"), device)
        check_backbone(where)
        check_run_precision(cfg, device, warn)
        _set_threads(cfg, device)
        seed_everything(int(cfg["seed"]))
        # a resumed run's configuration is its config.json's, whatever the command line gave
        given = {k: f"{k} in {os.path.join(out, CONFIG)}" if resume else (names or {}).get(k, flag(k))
                 for k in ("init_cls", "batch_size")}
        with init_cls_named(given["init_cls"]):
            data = load_run_data(where, warn_data)
        if world > 1:
            check_shards(cfg, data, world, given["batch_size"], resume)
        return device, data

    device, data = _agreed(world, checks)

    folder = None

    def claim():
        nonlocal folder
        folder = RunFolder(out).claim(warn) if out else claim_default_folder(cfg, warn)
        try:
            mode, finished = decide(folder.path, cfg, resume=resume, force=force,
                                    continue_existing=continue_existing, log=log, warn=warn)
        except BaseException:
            folder.release()
            raise
        return folder.path, mode, finished

    run_dir, mode, finished = _on_rank0(world, main, claim)
    written = False     # config.json exists: from here on the folder is a resumable run
    results, T = None, None
    try:
        if mode == "finished":      # where the run is now (it may have been moved since it was written)
            return _where_it_is(finished, run_dir) if main else {"rank": rank, "world_size": world, "run_dir": run_dir}
        written = mode == "resume"
        # only a resumed run's backbone.pt is its own: one in a fresh run's folder was left by another run
        net = _shared_network(where, data, device, os.path.join(run_dir, BACKBONE) if written else None, world, main,
                              progress, warn)
        learner = make_learner(where, net, device)
        if main and hasattr(learner, "describe"):
            log(learner.describe())
        T = len(data.tasks)
        # before anything is written: a resumed run whose data or weights changed is refused
        # every rank reads the checkpoint (each loads the learner's state): a refusal of it (another
        # configuration, data or weights) is said once when every rank hit it alike
        identity = run_identity(data, where, net)
        results = _agreed(world, lambda: _restore_results(
            run_dir, learner, resume=mode == "resume", n_tasks=T, log=log, warn=warn, identity=identity,
            in_sweep=continue_existing, config=cfg))
        if main:
            if mode == "fresh":
                atomic_write_json(os.path.join(run_dir, CONFIG), cfg)
                written = True
            _write_setup_files(run_dir, cfg, net, device, world, fresh=mode == "fresh")
        setup_seconds = time.perf_counter() - t_start

        mem = M.MemoryMeter(device)
        timer = M.Timer(device)
        record_dir = os.path.join(run_dir, TRAJECTORY) if main and cfg["record"] else None
        stopped = _train_tasks(learner, data, where, results, device=device, mem=mem, timer=timer, run_dir=run_dir,
                               record_dir=record_dir, shard=shard, progress=progress, stop_after=stop_after,
                               main=main, log=log)
        if stopped:
            return {"stopped_after": results.completed, "run_dir": run_dir}
        if not main:
            return {"rank": rank, "world_size": world, "accuracy_curve": results.curve, "run_dir": run_dir}
        metrics = _metrics(results, data, cfg, run_dir=run_dir, world=world, device=device, mem=mem,
                           setup_seconds=setup_seconds, record_dir=record_dir)
        if cfg.get("baseline") == "untrained":
            metrics.update(untrained_results(where, net, data, device, metrics, log))
        write_results(run_dir, metrics)
        return metrics
    except KeyboardInterrupt as e:
        raise RunInterrupted(run_dir, results.completed if results else 0, T, written, rank) from e
    except OutputClosed as e:
        # the reader of stdout went away (`zeroflow run ... | head -1`): no error to fix (the warning
        # below said 'once its cause is fixed' over a traceback); the run stops as on Ctrl-C
        raise OutputClosed(run_dir, results.completed if results else 0, T, written, rank) from e
    except (UnreadableImage, WriteFailed) as e:
        if not written:
            raise
        kept = _what_is_kept(results)
        fix = "" if isinstance(e, UnreadableImage) else "; fix that"     # an image's fix is in its message
        raise type(e)(f"{e}{fix}, then continue the run with: zeroflow run --resume --out {run_dir} ({kept})") from e
    except Exception as e:
        # a crash (a bug, CUDA out of memory) ends in a traceback that says nothing of the run
        # folder: what it kept and how to continue once the cause is fixed (a ZeroflowError
        # says what to do itself; before results exist, a resume's own checks refused it)
        if written and results is not None and main and not isinstance(e, ZeroflowError):
            warn(f"the run in {run_dir} stopped on the error below ({_what_is_kept(results)}); once its cause is "
                 f"fixed, continue the run with: zeroflow run --resume --out {run_dir}")
        raise
    finally:
        if folder is not None:
            folder.release()          # removes the folder too if this run created it and wrote nothing


def _what_is_kept(results) -> str:
    """What a run stopped on an error keeps, for the messages that say how to resume it."""
    done = results.completed if results else 0
    return f"its {done} finished task(s) are kept" if done else "no task had finished yet"


def _where_it_is(metrics: Dict, run_dir: str) -> Dict:
    """A finished run's ``metrics`` with its paths in ``run_dir``, where the run is now: its
    metrics.json names them where it was written (another folder if it was moved or copied
    since, another current directory for a relative --out), and zeroflow run prints its
    trajectory logs for zeroflow replay."""
    out = dict(metrics, run_dir=run_dir)
    logs = metrics.get("trajectory_logs")
    if isinstance(logs, list) and all(isinstance(p, str) for p in logs):
        out["trajectory_logs"] = [os.path.join(run_dir, TRAJECTORY, os.path.basename(p)) for p in logs]
    return out


@contextmanager
def init_cls_named(given: str):
    """A folder dataset's refusal of an ``init_cls`` above its classes (its loader knows no
    flags: ``init_cls 250 exceeds ...``), naming the option as the user gave it (``given``:
    ``--init-cls``, ``init_cls in FILE``), as :func:`.defaults.validate` does for the others."""
    from .data import InitClsAboveClasses

    try:
        yield
    except InitClsAboveClasses as e:
        raise ZeroflowError(init_cls_refusal(given, e.init_cls, e.n_classes, e.dataset)) from None


def load_run_data(cfg: Dict, warn=None):
    """The run's data (checked: files, labels, every task's splits); ``warn`` says what a run
    should know of it (files skipped, a class count unlike the study's)."""
    from .data import load_dataset

    return load_dataset(cfg["dataset"], cfg["data_root"], int(cfg["init_cls"]), int(cfg["increment"]),
                        download=bool(cfg.get("download")), img_size=int(cfg.get("img_size", 224)),
                        class_order_seed=int(cfg.get("class_order_seed", 1993)), warn=warn)


def backbone_sha256(state: Dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and tensor bytes, in name order. Of the
    tensors, not of backbone.pt's bytes: torch.save's archive layout may differ between torch
    versions, and a resume on another machine must not be refused for the same weights. The
    trajectory logs' hash of the weights (zeroflow.replay.weights_sha256), over the names in order."""
    from zeroflow.replay import weights_sha256

    names = sorted(state)
    return weights_sha256(names, [state[n] for n in names])


def run_identity(data, where: Dict, net=None) -> Dict:
    """What a run's results belong to beyond its configuration: the names of its classes (the
    class order maps positions to them), the bytes of its weights file and (small backbone,
    ``net`` given) the sha256 of the pretrained ViT the run trains on, which it keeps in
    ``backbone.pt``. Stored in every checkpoint; a resumed run whose data, weights file or
    backbone.pt differs is refused (:func:`check_identity`), not continued with adapters and
    prototypes of other classes, or on another backbone than its finished tasks."""
    weights = None
    if where.get("checkpoint"):
        digest = hashlib.sha256()
        with open(where["checkpoint"], "rb") as f:      # ViT-B: 0.35 GB, ~0.3 s once a run
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        weights = {"file": where["checkpoint"], "bytes": os.path.getsize(where["checkpoint"]),
                   "sha256": digest.hexdigest()}
    identity = {"class_names": list(data.class_names) if data.class_names else None, "weights": weights}
    if net is not None and where.get("backbone") == "small":
        identity["backbone"] = {"file": BACKBONE, "sha256": backbone_sha256(net.vit.state_dict())}
    return identity


def check_results_version(run_dir: str, ck: Dict, *, in_sweep: bool = False, warn=None) -> Optional[int]:
    """The results version of the finished tasks in ``run_dir``'s checkpoint ``ck``
    (runfolder.results_version). Another version than this zeroflow's is refused: the tasks
    trained now would be another version's, and metrics.json would combine the two versions'
    results as one run's. A checkpoint that records none (``UNRECORDED``, None) resumes with
    ``warn`` saying so."""
    path = os.path.join(run_dir, CHECKPOINT)
    version = results_version(ck, path)
    again = f"move {run_dir} away" if in_sweep else f"zeroflow run --force --out {run_dir}"
    if version is None:
        if warn is not None:
            warn(f"{path} records {UNRECORDED}. Resumed here, a run started before trains its later tasks under "
                 f"other augmentation draws than its finished ones, and its metrics.json mixes the two: run such a "
                 f"run again from scratch ({again})")
        return None
    if version == RESULTS_VERSION:
        return version
    fresh = (f"move {run_dir} away to run it again with this zeroflow" if in_sweep else
             f"run it again from scratch with this zeroflow ({again}, or another --out)")
    raise ZeroflowError(f"cannot resume {run_dir}: its finished tasks were trained by "
                        f"{describe_results_version(version)}, and this zeroflow computes "
                        f"{describe_results_version(RESULTS_VERSION)}: the tasks it trained now would not be "
                        f"that version's, and metrics.json would combine two versions' results as one run's. Finish "
                        f"the run with the zeroflow that started it, or {fresh}")


def check_identity(run_dir: str, saved: Optional[Dict], now: Dict, *, in_sweep: bool = False, warn=None) -> None:
    """Refuses to resume ``run_dir`` when its data's classes, its weights file or (small
    backbone) the ViT loaded from its ``backbone.pt`` are not those it started with (``saved``:
    the checkpoint's). A checkpoint written before they were recorded has none: ``warn`` says
    that nothing could be checked; one without the backbone's hash resumes unchecked on it. ``in_sweep``: the advice of
    a sweep, where --data-root and --checkpoint are the configuration's and --force resumes."""
    if not saved:
        if warn is not None:
            warn(f"{os.path.join(run_dir, CHECKPOINT)} was written before checkpoints recorded the data's class names "
                 f"and the weights file: whether they changed since the run started is not checked")
        return
    fresh = (f"or move {run_dir} away to run it again on the data as it is now" if in_sweep else
             "or start a new run (zeroflow run with another --out, or --force to replace this one)")
    data_where, weights_where = ("", "") if in_sweep else (" (or pass --data-root DIR where it is)",
                                                           " (or pass --checkpoint FILE where it is)")
    was, is_ = saved.get("class_names"), now.get("class_names")
    if was is not None and was != is_:
        if len(was) != len(is_ or []):
            gone = ", ".join(map(ascii, sorted(set(was) - set(is_ or []))[:5])) or "none"
            added = ", ".join(map(ascii, sorted(set(is_ or []) - set(was))[:5])) or "none"
            what = f"it had {len(was)} classes, the data now has {len(is_ or [])} (gone: {gone}; added: {added})"
        else:
            k = next(i for i, (a, b) in enumerate(zip(was, is_)) if a != b)
            what = f"class {k} of its {len(was)} was {was[k]!r}, the data now has {is_[k]!r} there"
        raise ZeroflowError(f"cannot resume {run_dir}: its data changed since the run started ({what}), and the "
                            f"finished tasks' results belong to the classes as they were; restore the data"
                            f"{data_where}, {fresh}")
    was, is_ = saved.get("weights"), now.get("weights")
    if was is not None and (is_ is None or (was["sha256"], was["bytes"]) != (is_["sha256"], is_["bytes"])):
        now_file = f"{is_['file']} ({is_['bytes']} bytes, sha256 {is_['sha256'][:12]}...)" if is_ else "none"
        raise ZeroflowError(f"cannot resume {run_dir}: its backbone weights file is not the one the run started "
                            f"with ({was['file']}, {was['bytes']} bytes, sha256 {was['sha256'][:12]}...; now "
                            f"{now_file}); restore that file{weights_where}, {fresh}")
    # absent from a checkpoint written before it was recorded (2026-12-03): not checked then
    was, is_ = saved.get("backbone"), now.get("backbone")
    if was is not None and (is_ is None or was["sha256"] != is_["sha256"]):
        path = os.path.join(run_dir, BACKBONE)
        now_what = (f"{path} now holds weights with sha256 {is_['sha256'][:12]}..." if os.path.isfile(path) else
                    f"{path} is missing, and the small ViT pretrained again has sha256 "
                    f"{is_['sha256'][:12] if is_ else '?'}...")
        raise ZeroflowError(f"cannot resume {run_dir}: its {BACKBONE} is not the pretrained backbone its finished "
                            f"tasks were trained on (sha256 {was['sha256'][:12]}... of its tensors; {now_what}): it "
                            f"was replaced, or copied in from another run. Put the run's own {BACKBONE} back, "
                            f"{fresh}")


def check_setup(cfgs, warn=None) -> None:
    """What :func:`run` checks before it claims its folder, beyond the options: the device, the
    backend on it, the backbone, the precision and the data, for every configuration of
    ``cfgs`` (each backbone and data set once). ``zeroflow sweep`` calls it before its first
    run, so that a mistake is one error before anything runs rather than a failure of every run."""
    warn = warn or _silent        # the runs warn themselves
    loaded, built = set(), set()
    for cfg in cfgs:
        device = resolve_device(cfg.get("device"))
        check_backend(cfg.get("backend"), device)
        backbone = json.dumps([cfg.get(k) for k in ("checkpoint", "backbone", "model_kwargs", "adapter_dim",
                                                    "img_size")], default=str, sort_keys=True)
        if backbone not in built:      # a ViT-B's meta build: 0.5 s, once per sweep, not once per run
            check_backbone(cfg)
            built.add(backbone)
        check_run_precision(cfg, device, warn)
        key = json.dumps([cfg.get(k) for k in ("dataset", "data_root", "init_cls", "increment", "download",
                                               "img_size", "class_order_seed")], default=str)
        if key not in loaded:
            load_run_data(cfg, warn)
            loaded.add(key)


def untrained_results(cfg: Dict, net, data, device, res: Dict, log) -> Dict:
    """``--baseline untrained``: the baseline's results and what training added (metrics keys)."""
    from .baseline import gains, untrained_baseline

    base = untrained_baseline(cfg, net, data, device)
    added = gains(res, base)
    log(f"untrained baseline: Avg {base['avg']:.2f}, Last {base['last']:.2f}; training added Avg "
        f"{added['avg_gain']:+.2f}, Last {added['last_gain']:+.2f} ({base['seconds']:.1f}s)")
    return {"baseline": base, **added}


def _silent(*args, **kwargs):
    pass


def check_shards(cfg: Dict, data, world: int, given: Optional[str] = None, resumed: bool = False) -> None:
    """Every rank of a torchrun job gets a sample of every global batch of every task: what
    ShardedBatchSampler (which splits each global batch over the ranks) refuses with a ValueError,
    refused here in the options' words before the run claims its folder (the same on every rank,
    so all of them stop, none waits in a collective). Every task is checked, also one the method
    does not train on (APER trains on the first only): so the refusal does not depend on the method.
    ``given``: how the batch size was given (default its flag); ``resumed``: the run's own (its
    config.json's), which a resume keeps whatever the command line says."""
    batch = int(cfg["batch_size"])
    if batch < world:
        shown = as_given(given or flag("batch_size"), batch)
        fix = (f"a resumed run keeps its batch size: resume it on {batch} rank(s) or fewer" if resumed else
               f"give --batch-size {world} or more, or run on fewer ranks")
        raise ZeroflowError(f"{shown} under torchrun with {world} ranks: every global batch is split over the ranks, "
                            f"so some rank would get no sample; {fix} (torchrun --nproc-per-node)")
    for t, classes in enumerate(data.tasks):
        n = int(np.isin(data.train_targets, np.asarray(list(classes))).sum())
        if n < world:
            raise ZeroflowError(f"task {t + 1} of --dataset {cfg['dataset']} has {n} training image(s), fewer than "
                                f"the {world} ranks of this torchrun job: some rank would get no sample and the task "
                                f"would train nothing; run on fewer ranks (torchrun --nproc-per-node), or give the "
                                f"task at least {world} training images")


def _check_run_flags(out: Optional[str], *, resume: bool, force: bool, stop_after) -> None:
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int) or stop_after < 1):
        raise ZeroflowError(f"--stop-after must be an integer >= 1 (got {stop_after!r})")
    if resume and force:
        raise ZeroflowError("--resume continues the run in --out and --force replaces it: give one of them")
    refuse_empty_path(out, "--out", "give the run folder, or leave --out out for a fresh runs/<time>_... folder")
    if resume and not out:
        raise ZeroflowError("--resume needs --out RUN_FOLDER")


def _run_device(name: Optional[str], world: int) -> torch.device:
    if world > 1 and name in (None, "", "auto"):
        from zeroflow.distributed import local_device
        return local_device()          # cuda:LOCAL_RANK under NCCL, else cpu
    dev = resolve_device(name)
    if world > 1 and dev.type == "cuda" and dev.index is not None:
        # every rank gets the same options: cuda:N put all of them on GPU N, beside the NCCL
        # communicators on cuda:LOCAL_RANK (NCCL refuses two ranks on one GPU when the network
        # is broadcast); a resumed run takes the device saved by a single-process run
        raise ZeroflowError(f"--device {name} under torchrun: every rank would run on GPU {dev.index}; each rank "
                            "runs on its own GPU (cuda:LOCAL_RANK) with --device auto or --device cuda")
    return dev


def _set_threads(cfg: Dict, device: torch.device) -> None:
    threads = cfg.get("threads")
    if threads is None and device.type == "cpu" and cfg.get("backbone") == "small":
        threads = 1   # the tiny ViT is dominated by threading overhead; 1 thread is fastest
    if threads:
        torch.set_num_threads(int(threads))


def _shared_network(cfg: Dict, data, device: torch.device, backbone_path: str, world: int, main: bool,
                    progress: bool, warn=None):
    """:func:`build_network` on every rank. Under torchrun rank 0 builds (and caches) the
    backbone first, the others then load it; rank 0's weights are then broadcast so that
    every rank runs the identical network."""
    if world > 1 and not main:
        torch.distributed.barrier()
    net = build_network(cfg, data, device, backbone_path if main else None, progress, warn)
    if world > 1:
        from zeroflow.distributed import broadcast_module_
        if main:
            torch.distributed.barrier()
        broadcast_module_(net)
    return net


def _write_setup_files(run_dir: str, cfg: Dict, net, device: torch.device, world: int, fresh: bool = True) -> None:
    """``backbone.pt`` (small backbone: by a fresh run, over any left by another run; by a
    resumed run only where it is missing, else it loaded it) and ``environment.json`` (a
    resumed run adds its own environment to the list ``resumed``)."""
    backbone_path = os.path.join(run_dir, BACKBONE)
    if cfg["backbone"] == "small" and (fresh or not os.path.isfile(backbone_path)):
        save_torch(net.vit.state_dict(), backbone_path)
    env = environment(device, cfg.get("backend"))
    if world > 1:
        env["world_size"] = world
    path = os.path.join(run_dir, "environment.json")
    if not fresh:
        # a resume (perhaps on another machine, with other versions) keeps the environment its
        # finished tasks ran in and adds its own: replaced, the first one was lost without a word
        try:
            with open(path) as f:
                first = json.load(f)
        except (OSError, ValueError):       # missing (stopped before it was written) or damaged
            first = None
        if isinstance(first, dict):
            before = first.get("resumed") if isinstance(first.get("resumed"), list) else []
            env = dict(first, resumed=before + [env])
    atomic_write_json(path, env)


@dataclass
class _Results:
    """What the run has produced so far; ``checkpoint.pt`` holds it after every task."""
    matrix: list                                   # accuracy (%) of task g after stage t: matrix[g][t]
    counters: Counters
    curve: list = field(default_factory=list)      # accuracy on all seen classes after each stage
    task_stats: list = field(default_factory=list)
    completed: int = 0                             # tasks finished
    peak: int = 0                                  # peak memory (bytes) over the finished tasks
    identity: Optional[Dict] = None                # run_identity: the classes and weights file
    # the zeroflow results version of the finished tasks (runfolder.RESULTS_VERSION); None: a
    # run resumed from a checkpoint that recorded none (runfolder.UNRECORDED)
    results_version: Optional[int] = RESULTS_VERSION
    config: Optional[Dict] = None                  # the configuration the finished tasks were trained with
    # the state of the run's loss scaler (fp16 first-order runs) after the finished tasks; None: none
    grad_scaler: Optional[Dict] = None

    def checkpoint(self, learner, completed: int) -> Dict:
        return {"version": CKPT_VERSION, "completed": completed, "learner": learner.state_dict(),
                "matrix": self.matrix, "curve": self.curve, "task_stats": self.task_stats,
                "counters": self.counters.as_dict(), "peak_memory_bytes": self.peak, "identity": self.identity,
                "results_version": self.results_version, "config": self.config, "grad_scaler": self.grad_scaler}


def check_checkpoint_config(run_dir: str, ck: Dict, config: Optional[Dict], n_tasks: Optional[int], *,
                            in_sweep: bool = False) -> None:
    """Refuses to resume ``run_dir`` when its ``config.json`` (``config``) is not the
    configuration its checkpoint's finished tasks were trained with (config.json edited by hand,
    or a checkpoint.pt copied from another run): the run would go on under another configuration
    (another split: an IndexError mid-run) while metrics.json named config.json's for every task.
    Where their device, data and weights are (``LOCATIONS``) and the operational options may
    differ. A checkpoint that records no configuration (written before it did) is checked for
    its number of tasks only (``n_tasks``; None: not known yet, not checked). ``in_sweep``: the
    advice of a sweep, where --force resumes."""
    path = os.path.join(run_dir, CHECKPOINT)
    fresh = (f"move {run_dir} away to run it again" if in_sweep else
             "start a new run (another --out, or --force)")
    saved = ck.get("config")
    if isinstance(saved, dict) and config is not None:
        diffs = config_differences(saved, config, ignore=LOCATIONS, where=(f"in {CHECKPOINT}", f"in {CONFIG}"))
        if diffs:
            raise ZeroflowError(f"cannot resume {run_dir}: its {CONFIG} is not the configuration its finished tasks "
                                f"were trained with ({'; '.join(diffs)}); restore {CONFIG}, or {fresh}")
    if n_tasks is None:
        return
    matrix = ck.get("matrix")
    if not isinstance(matrix, list) or len(matrix) != n_tasks or not 0 <= int(ck["completed"]) <= n_tasks:
        raise ZeroflowError(f"cannot resume {run_dir}: {path} holds a run of "
                            f"{len(matrix) if isinstance(matrix, list) else '?'} tasks, and the configuration in its "
                            f"{CONFIG} makes {n_tasks}: its {CONFIG} is not the one its finished tasks were trained "
                            f"with; restore {CONFIG}, or {fresh}")


def check_resumable(run_dir: str, cfg: Dict) -> None:
    """What a resume of the unfinished run in ``run_dir`` by ``cfg`` would refuse on reading its
    checkpoint (damaged, another results version, another configuration), checked by
    ``zeroflow sweep`` before its first run rather than when it reaches this one."""
    ck_path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.isfile(ck_path):
        return
    ck = load_checkpoint(ck_path)
    check_results_version(run_dir, ck, in_sweep=True)
    check_checkpoint_config(run_dir, ck, canonical(cfg), None, in_sweep=True)


def _restore_results(run_dir: str, learner, *, resume: bool, n_tasks: int, log, identity: Dict, warn=None,
                     in_sweep: bool = False, config: Optional[Dict] = None) -> _Results:
    """A resumed run's results (and learner state) from its checkpoint, else empty ones; a
    checkpoint of other data or another weights file is refused (:func:`check_identity`), and
    so is one of another configuration than ``config`` (:func:`check_checkpoint_config`)."""
    from .learners import Counters

    ck_path = os.path.join(run_dir, CHECKPOINT)
    config = canonical(config) if config is not None else None
    if resume and os.path.isfile(ck_path):
        ck = load_checkpoint(ck_path)
        version = check_results_version(run_dir, ck, in_sweep=in_sweep, warn=warn)
        check_identity(run_dir, ck.get("identity"), identity, in_sweep=in_sweep, warn=warn)
        check_checkpoint_config(run_dir, ck, config, n_tasks, in_sweep=in_sweep)
        learner.load_state_dict(ck["learner"])
        results = _Results(matrix=ck["matrix"], counters=Counters(**ck["counters"]), curve=ck["curve"],
                           task_stats=ck["task_stats"], completed=int(ck["completed"]),
                           peak=int(ck["peak_memory_bytes"]), identity=identity, results_version=version,
                           config=config, grad_scaler=ck.get("grad_scaler"))
        log(f"resuming {run_dir} after task {results.completed}/{n_tasks}")
        return results
    return _Results(matrix=M.empty_matrix(n_tasks), counters=Counters(), identity=identity, config=config)


def _train_tasks(learner, data, cfg: Dict, results: _Results, *, device, mem, timer, run_dir: str,
                 record_dir: Optional[str], shard, progress: bool, stop_after: Optional[int], main: bool,
                 log) -> bool:
    """Learn the tasks after the ``results.completed`` finished ones; after each, evaluate on
    every class seen so far, add it to ``results`` and (rank 0) write the checkpoint. True
    when ``stop_after`` stopped the run before its last task: once ``stop_after`` tasks are
    finished in total, counting those a resumed run had already finished (then it trains none)."""
    from .data import UnreadableImage

    T = len(data.tasks)
    first = results.completed
    counters = results.counters
    eval_bs, nw = int(cfg.get("eval_batch_size", 256)), int(cfg.get("num_workers", 0))
    # one loss scaler for the run (fp16 first-order steps), its scale carried from task to task
    # and through a resume: the checkpoint holds its state as it was after the finished tasks
    scaler = grad_scaler(cfg, device)
    if scaler is not None and results.grad_scaler:
        scaler.load_state_dict(results.grad_scaler)
    for t in range(results.completed, T):
        # before the task, not only after one: a resumed run may already have stop_after tasks
        if stop_after is not None and results.completed >= stop_after:
            log(f"stopped after task {results.completed}/{T}"
                f"{' (finished before this resume)' if t == first else ''}; continue with zeroflow run "
                f"--resume --out {run_dir}")
            return True
        s = task_seed(int(cfg["seed"]), t)
        seed_everything(s)
        mem.reset()
        it0, fp0, ts0 = counters.iterations, counters.train_forward_passes, counters.train_seconds
        t0 = timer.now()
        try:
            info = learner.learn_task(t, data.tasks[t], data,
                                      TaskContext(s, T, counters, timer, progress, shard, record_dir, mem, scaler))
            overall, per_task = evaluate(learner, data, data.tasks[: t + 1], device, counters, eval_bs, nw)
        except UnreadableImage as e:
            if shard is None:
                raise
            _stop_together(shard, e)
        seconds = timer.now() - t0
        for g in range(t + 1):
            results.matrix[g][t] = per_task[g]
        results.curve.append(overall)
        task_peak = mem.peak()
        results.peak = max(results.peak, task_peak)
        iters = counters.iterations - it0
        results.task_stats.append({
            "task": t, "classes": len(data.tasks[t]), "device": str(device), "seconds": seconds, "iterations": iters,
            **({"bytes_communicated": info["bytes_communicated"]["bytes_sent"]}
               if "bytes_communicated" in info else {}),
            "train_seconds": counters.train_seconds - ts0,
            "seconds_per_iteration": (counters.train_seconds - ts0) / iters if iters else None,
            "forward_passes": counters.train_forward_passes - fp0, "peak_memory_bytes": task_peak,
            "train_peak_memory_bytes": info.get("train_peak_memory_bytes"),     # None: the task trains nothing
            "accuracy": overall, "loss_first": info.get("loss_first"), "loss_last": info.get("loss_last"),
        })
        results.grad_scaler = scaler.state_dict() if scaler is not None else None
        failure = None
        if main:
            try:
                save_torch(results.checkpoint(learner, completed=t + 1), os.path.join(run_dir, CHECKPOINT))
            except WriteFailed as e:
                if shard is None:
                    raise
                failure = e
        if failure is None:
            results.completed = t + 1
        if shard is not None:
            _stop_together(shard, failure)
        log(f"task {t + 1}/{T}: accuracy on {sum(len(c) for c in data.tasks[:t + 1])} seen classes "
            f"{overall:.2f}%  ({seconds:.1f}s)")
    return False


def _stop_together(shard, failure: Optional[ZeroflowError]) -> None:
    """Under torchrun, at the end of every task (after rank 0's checkpoint) and wherever a rank
    stops on an image its node cannot read: the ranks tell each other (one all_gather of the
    texts a task) whether they stopped on such an error, or rank 0 on a checkpoint it cannot
    write. One that a rank hit alone after the task's last collective (a prototype or test
    image, the checkpoint) left the others going on, to wait in the next task's first collective
    for a rank that had stopped (gloo's 'Connection closed by peer' traceback) or to finish the
    run. Now every rank raises one error naming each rank's (``rank 1: cannot read image ...``;
    the text alone when every rank hit the same), ``every_rank``: said by rank 0 alone, with the
    resume command (:func:`_run`). A training step that some rank abandoned (an image of its
    shard) arrives here on every rank alike (:func:`.learners._batches`)."""
    from .data import UnreadableImage

    world = shard[1]
    if world == 1:
        if failure is not None:
            raise failure
        return
    texts = [None] * world
    torch.distributed.all_gather_object(texts, None if failure is None else
                                        [isinstance(failure, WriteFailed), str(failure)])
    failed = {r: text for r, text in enumerate(texts) if text is not None}
    if not failed:
        return
    said = {text for _, text in failed.values()}
    if len(failed) == world and len(said) == 1:
        message = said.pop()
    else:
        by_text: Dict[str, list] = {}
        for r, (_, text) in failed.items():
            by_text.setdefault(text, []).append(str(r))
        message = "; ".join(f"rank {', '.join(ranks)}: {text}" for text, ranks in by_text.items())
    error = (WriteFailed if any(w for w, _ in failed.values()) else UnreadableImage)(message)
    error.every_rank = True
    raise error from failure


def _metrics(results: _Results, data, cfg: Dict, *, run_dir: str, world: int, device, mem, setup_seconds: float,
             record_dir: Optional[str]) -> Dict:
    """The contents of ``metrics.json``."""
    counters = results.counters
    task_stats = results.task_stats
    train_s = counters.train_seconds
    metrics = {
        **M.summarize(results.curve, results.matrix),
        "accuracy_curve": results.curve,
        "accuracy_matrix": results.matrix,
        "peak_memory_bytes": results.peak,
        "train_peak_memory_bytes": max((ts["train_peak_memory_bytes"] for ts in task_stats
                                        if ts.get("train_peak_memory_bytes") is not None), default=None),
        "peak_memory_kind": mem.kind,
        "forward_passes": counters.train_forward_passes,
        "eval_forward_passes": counters.eval_forward_passes,
        "iterations": counters.iterations,
        "seconds": sum(ts["seconds"] for ts in task_stats),
        "setup_seconds": setup_seconds,
        "seconds_per_iteration": train_s / counters.iterations if counters.iterations else None,
        "seconds_per_task": [ts["seconds"] for ts in task_stats],
        "tasks": task_stats,
        "n_tasks": len(data.tasks),
        "world_size": world,
        "device": str(device),      # this process's; the configuration keeps the one it was started with
        "class_order": data.order,
        "class_names": data.class_names,     # class_order's entries index this list
        "precision": cfg.get("precision", "fp32"),
        "results_version": results.results_version,     # runfolder.RESULTS_VERSION; None: not known
        "config": cfg,
        "run_dir": run_dir,
    }
    if record_dir and os.path.isdir(record_dir):
        # in task order: sorted as text, task10.zft came before task2.zft
        logs = [f for f in os.listdir(record_dir) if f.endswith(".zft")]
        metrics["trajectory_logs"] = [os.path.join(record_dir, f) for f in sorted(logs, key=_task_order)]
    return metrics


def _task_order(name: str):
    """Sort key of a trajectory file name: ``task<k>.*`` by ``k``, anything else after them."""
    m = re.fullmatch(r"task(\d+)\..*", name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)


def write_results(run_dir: str, metrics: Dict):
    matrix = metrics["accuracy_matrix"]
    T = len(matrix)
    buf = io.StringIO()
    w = csv.writer(buf)
    # tasks and stages counted from 1, as in the plots and the log lines
    w.writerow(["task"] + [f"after_stage_{s + 1}" for s in range(T)])
    for g in range(T):
        w.writerow([g + 1] + ["" if v is None else f"{v:.4f}" for v in matrix[g]])
    atomic_write_text(os.path.join(run_dir, "accuracy_matrix.csv"), buf.getvalue())
    plot_results(run_dir, metrics)
    atomic_write_json(os.path.join(run_dir, METRICS), metrics)   # last: marks the run finished


def plot_results(run_dir: str, metrics: Dict):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = metrics["config"]
    title = f"{cfg['method'].upper()} / {cfg['optimizer']} / {cfg['dataset']}"
    matrix = metrics["accuracy_matrix"]
    T = len(matrix)
    stages = np.arange(1, T + 1)

    fig, ax = plt.subplots(figsize=(6, 4))
    base = metrics.get("baseline")
    if base:     # drawn first and hollow: where training added nothing the two curves coincide
        ax.plot(stages, base["accuracy_curve"], "s--", lw=1.5, ms=10, mfc="none", color="0.5",
                label="all seen classes, untrained adapters")
    ax.plot(stages, metrics["accuracy_curve"], "o-", lw=2, color="k", label="all seen classes")
    for g in range(T):
        ys = [matrix[g][s] for s in range(g, T)]
        ax.plot(stages[g:], ys, ".--", lw=1, alpha=0.7, label=f"task {g + 1}")
    ax.set_xlabel("stage (tasks learned)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(stages)
    gain = f"  (training added {metrics['avg_gain']:+.2f} / {metrics['last_gain']:+.2f})" if base else ""
    ax.set_title(f"{title}\nAvg {metrics['avg']:.2f}  Last {metrics['last']:.2f}  Fgt {metrics['fgt']:.2f}{gain}",
                 fontsize=9 if base else None)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _atomic_fig(fig, os.path.join(run_dir, "accuracy_per_stage.png"))
    plt.close(fig)

    arr = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * T, 0.8 + 0.55 * T))
    im = ax.imshow(arr, vmin=0, vmax=100, cmap="viridis")
    for g in range(T):
        for s in range(T):
            if not np.isnan(arr[g, s]):
                ax.text(s, g, f"{arr[g, s]:.0f}", ha="center", va="center", fontsize=7,
                        color="w" if arr[g, s] < 60 else "k")
    ax.set_xlabel("after stage")
    ax.set_ylabel("task")
    ax.set_xticks(range(T), [str(s + 1) for s in range(T)])
    ax.set_yticks(range(T), [str(g + 1) for g in range(T)])
    ax.set_title(f"accuracy matrix (%)\n{title}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    _atomic_fig(fig, os.path.join(run_dir, "accuracy_matrix.png"))
    plt.close(fig)


def _atomic_fig(fig, path):
    with writing(path):
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
