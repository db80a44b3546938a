"""``zeroflow`` command line: ``run``, ``sweep``, ``report``, ``replay``.

``run`` also works under ``torchrun`` (data-parallel ZO, docs/distributed.md).

Importing this module is light (argparse only); torch/timm load when a command runs.
Mistakes in what the user gave (options, files, folders) end as ``zeroflow: error: ...``
on stderr with exit code 2, before anything is written.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import sys
import threading
import time
from typing import List, Optional


def _true_false(text: str) -> bool:
    """argparse type of the boolean options: true / false (as in a config file)."""
    value = {"true": True, "false": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false (got {text!r})")
    return value


RUN_FLAGS = (
    # flag, dest, type, help
    ("--method", "method", str, "ease | aper"),
    ("--optimizer", "optimizer", str, "zo_sgd zo_sgd_sign zo_sgd_conserve zo_adam zo_adam_sign "
                                      "zo_adam_conserve forward_grad fo_sgd fo_adam"),
    ("--dataset", "dataset", str, "digits (embedded) | cifar100 | cub | imagenet-a | omnibenchmark"),
    ("--data-root", "data_root", str, "folder holding cifar-100-python/ or <dataset>/{train,test}/"),
    ("--epochs", "epochs", int, "training epochs per trained task"),
    ("--lr", "lr", float, "learning rate (cosine schedule over the epochs of a task); the defaults pick the "
                          "adam rate for the Adam family and zo_sgd_sign, on real data a zo_sgd rate "
                          "(1e-4) for zo_sgd, zo_sgd_conserve and forward_grad, else the sgd rate"),
    ("--batch-size", "batch_size", int, "training batch size"),
    ("--weight-decay", "weight_decay", float, "weight decay"),
    ("--momentum", "momentum", float, "SGD-family momentum, in [0, 1)"),
    ("--q", "q", int, "ZO queries per step"),
    ("--zo-eps", "zo_eps", float, "ZO perturbation scale (> 0)"),
    ("--perturbation", "perturbation", str, "gaussian | rademacher"),
    ("--sparsity", "sparsity", float, "ZO sparse-mask ratio in [0, 1)"),
    ("--history", "history", float, "ZO history mixing alpha in [0, 1)"),
    ("--hybrid-switch", "hybrid_switch", int, "hybrid FO->ZO: FO steps per task before switching to ZO"),
    ("--hybrid-zo-lr", "hybrid_zo_lr", float, "hybrid FO->ZO: lr of the ZO phase (--lr is the FO phase's)"),
    ("--seed", "seed", int, "random seed of the training, in [0, 2^31-1] (the class order follows "
                            "--class-order-seed)"),
    ("--class-order-seed", "class_order_seed", int, "numpy seed of the class order, in [0, 2^31-1] (PILOT's "
                                                    "1993; PILOT ties it to the run seed)"),
    ("--precision", "precision", str, "forward precision of the backbone: fp32 | tf32 | bf16 | fp16 (parameters, "
                                      "loss and ZO finite differences stay fp32; docs/algorithms.md section 10)"),
    ("--baseline", "baseline", str, "untrained | none: also run the protocol with untrained adapters and report "
                                    "what training added (avg_gain, last_gain)"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--backend", "backend", str, "zfkernels backend for the ZO kernels: auto | cpu | cuda | triton | torch"),
    ("--checkpoint", "checkpoint", str, "local ViT weights (.safetensors/.pth/.npz) instead of pretrained=True "
                                        "(real datasets only)"),
    ("--init-cls", "init_cls", int, "classes in the first task"),
    ("--increment", "increment", int, "classes per later task"),
    ("--ease-alpha", "ease_alpha", float, "EASE subspace reweighting alpha (>= 0)"),
    ("--ease-use-init-ptm", "ease_use_init_ptm", _true_false, "EASE: the PTM's own features are one more subspace "
                                                              "(PILOT use_init_ptm; true/false)"),
    ("--ease-beta", "ease_beta", float, "EASE: weight of the PTM subspace in the reweighted inference (PILOT beta)"),
    ("--ease-moni-adam", "ease_moni_adam", _true_false, "EASE: only the first --ease-adapter-num tasks train an "
                                                        "adapter; plain cosine fc (PILOT moni_adam; true/false)"),
    ("--ease-adapter-num", "ease_adapter_num", int, "EASE with --ease-moni-adam: tasks that train an adapter"),
    ("--ease-recalc-sim", "ease_recalc_sim", _true_false, "EASE: recompute every complement at every stage "
                                                          "(PILOT recalc_sim; true/false)"),
    ("--ease-use-reweight", "ease_use_reweight", _true_false, "EASE: subspace-reweighted inference, else the plain "
                                                              "cosine fc (PILOT use_reweight; true/false)"),
    ("--ease-later-lr", "ease_later_lr", float, "EASE on B-N splits: lr of the tasks after the first"),
    ("--ease-later-epochs", "ease_later_epochs", int, "EASE on B-N splits: epochs of the tasks after the first"),
    ("--num-workers", "num_workers", int, "DataLoader workers"),
    ("--threads", "threads", int, "torch CPU threads"),
)


def _help_with_default(dest: str, text: str) -> str:
    from .continual.defaults import describe_default

    return f"{text} (default: {describe_default(dest)})"


def _add_run_flags(p: argparse.ArgumentParser, sweep: bool = False):
    # default=None everywhere: an option given on the command line beats --config FILE, which
    # beats the built-in default (shown in the help)
    for flag, dest, typ, hlp in RUN_FLAGS:
        if sweep and dest == "optimizer":
            continue
        p.add_argument(flag, dest=dest, type=typ, default=None, help=_help_with_default(dest, hlp))
    p.add_argument("--config", default=None, help="YAML/JSON file of options (defaults < file < flags)")
    p.add_argument("--download", action="store_true", default=None, help="download CIFAR-100 if missing")
    p.add_argument("--record", action="store_true", default=None,
                   help="write a trajectory log per trained task (trajectory/task<k>.zft and task<k>.base.pt in "
                        "the run folder) for zeroflow replay; zo_* optimizers without --hybrid-switch")
    # a sweep passes --force with continue_existing (runner.decide): a run of the same
    # configuration is reused or resumed before --force is looked at
    p.add_argument("--force", action="store_true",
                   help="replace what an optimizer's folder holds when it is not a run of the same configuration: "
                        "a run of another configuration, a damaged one, or a finished one of another results "
                        "version; a run of the same configuration is kept, --force or not (reused if finished, "
                        "resumed if not)" if sweep else
                        "replace a run (finished or not) that the output folder already holds")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _version() -> str:
    from . import __version__

    return f"zeroflow {__version__}"


class _OneLineErrors(argparse.ArgumentParser):
    """argparse's errors as one line, like zeroflow's own (``zeroflow: error: ...``), instead of
    the usage screen and ``zeroflow run: error: ...``; exit status 2 as before."""

    def error(self, message):
        self.exit(2, f"zeroflow: error: {message} (see {self.prog} --help)\n")

    def parse_args(self, args=None, namespace=None):
        """argparse leaves unknown arguments to the top parser, whose help lists no run flags:
        they are reported by the subcommand's parser, which points to its own help."""
        a, extra = self.parse_known_args(args, namespace)
        if extra:
            getattr(self, "subcommands", {}).get(getattr(a, "cmd", None), self).error(
                f"unrecognized arguments: {' '.join(extra)}")
        return a


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineErrors(prog="zeroflow", description="ZeroFlow continual-learning benchmark "
                                "(EASE / APER with forward-pass optimizers). See docs/continual.md in the "
                                "source repository.")
    p.add_argument("--version", action="version", version=_version())
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="one run (no arguments: EASE + ZO-Adam on the embedded digits)")
    _add_run_flags(r)
    r.add_argument("--out", default=None, help="run folder (default: a fresh runs/<time>_...)")
    r.add_argument("--resume", action="store_true", help="continue the unfinished run in --out (with the "
                   "configuration saved there; only where its device, data and weights are and how its data is "
                   "loaded may change: --device, --data-root, --checkpoint, --num-workers, --download)")
    r.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many finished tasks (continue later with --resume)")
    s = sub.add_parser("sweep", help="run a list of optimizers for one method/dataset")
    _add_run_flags(s, sweep=True)
    s.add_argument("--optimizers", default="zo_sgd,zo_adam,fo_sgd,fo_adam",
                   help="comma-separated optimizer list, or 'all' (default: zo_sgd,zo_adam,fo_sgd,fo_adam)")
    s.add_argument("--seeds", default=None, help="comma-separated --seed values, e.g. 1993,1,2: every optimizer "
                   "runs once per seed (folders <method>_<optimizer>_<dataset>_seed<k>) and the table shows "
                   "mean ± std over the seeds")
    s.add_argument("--out", default=None, help="parent folder of the runs (default: runs/sweep_<time>); a run "
                   "already there with the same configuration is reused (finished) or resumed (unfinished)")
    sub.add_parser("replay", help="rebuild trained weights from a base checkpoint and a ZO trajectory log "
                   "(zeroflow replay BASE LOG --out WEIGHTS; see docs/distributed.md)", add_help=False)
    rep = sub.add_parser("report", help="markdown tables (Table 1 / Table 2 style) from run folders")
    rep.add_argument("runs", nargs="+", help="run folders, or folders searched for runs (recursively)")
    rep.add_argument("--output", default=None, help="also write the markdown to this file")
    p.subcommands = {"run": r, "sweep": s, "report": rep}
    return p


def _overrides(a) -> dict:
    return {dest: getattr(a, dest, None) for _, dest, _, _ in RUN_FLAGS} | {"download": a.download,
                                                                            "record": a.record}


def _say(*args, **kw):
    """``print`` to stdout; its reader gone (``zeroflow report runs | head -1``) is :class:`OutputClosed`,
    as it is in a run (runner.log_stdout), for :func:`main`."""
    from .continual.errors import OutputClosed

    try:
        print(*args, **kw)
    except BrokenPipeError as e:
        raise OutputClosed() from e


def _tell(*args, **kw):
    """``print`` to stderr; its reader gone (``zeroflow run ... 2>&1 | head -3``: stderr is the
    same pipe as stdout) is :class:`OutputClosed`, as stdout's is (:func:`_say`), not a traceback."""
    from .continual.errors import OutputClosed

    try:
        print(*args, file=sys.stderr, flush=True, **kw)
    except BrokenPipeError as e:
        raise OutputClosed() from e


def _print_table(m: dict, run_dir: str, started: float):
    c = m["config"]
    _say()
    _say("| method | optimizer | dataset | Avg | Last | Fgt |")
    _say("|---|---|---|---|---|---|")
    _say(f"| {c['method'].upper()} | {c['optimizer']} | {c['dataset']} | {m['avg']:.2f} | {m['last']:.2f} | "
          f"{m['fgt']:.2f} |")
    _say()
    # a finished run is printed from its metrics.json, which load_metrics checks for the table's
    # entries only: one written by hand or by an older zeroflow may lack the others
    train_peak, seconds = m.get("train_peak_memory_bytes"), m.get("seconds")
    _say(f"forward passes (training): {m['forward_passes']}   peak memory: {m['peak_memory_bytes'] / 2**20:.0f} MiB "
          + (f"(training {train_peak / 2**20:.0f} MiB) " if train_peak is not None else "")
          + f"({m.get('peak_memory_kind', 'kind not recorded')})   time: "
          + (f"{seconds:.1f}s in the tasks, {m.get('setup_seconds', 0):.1f}s setup; " if seconds is not None else "")
          + f"{time.perf_counter() - started:.1f}s since the command started")
    for log in m.get("trajectory_logs", []):
        _say(f"trajectory log: {log} (zeroflow replay {log[:-len('.zft')]}.base.pt {log} --out WEIGHTS)")
    _say(f"run folder: {run_dir}")


def cmd_run(a, started: float) -> int:
    from .continual.defaults import load_config_file, resolve_named
    from .continual.errors import torchrun_rank
    from .continual.runner import run, warn_stderr

    if a.resume:
        # only what the user gave: the run keeps its saved configuration (see runner.resumed_config)
        given = {k: v for k, v in _overrides(a).items() if v is not None}
        file_cfg = load_config_file(a.config) if a.config else {}
        cfg = file_cfg | given
        # the messages name an option of the file as such ("epochs in FILE"), not as a flag never given
        names = {k: f"{k} in {a.config}" for k in file_cfg if k not in given}
    else:
        # a warning of the options (every rank's alike under torchrun) from rank 0 only, as the
        # run's own warnings are (runner._run silences ranks > 0)
        warn = warn_stderr if torchrun_rank() == 0 else (lambda msg: None)
        cfg, names = resolve_named(_overrides(a), a.config, warn=warn)
    m = run(cfg, a.out, resume=a.resume, force=a.force, progress=not a.no_progress, stop_after=a.stop_after,
            names=names)
    if "stopped_after" in m or m.get("rank", 0) != 0:    # ranks > 0 of a torchrun job print nothing
        return 0
    _print_table(m, m["run_dir"], started)
    return 0


def _sweep_optimizers(text: str) -> List[str]:
    from .continual.defaults import OPTIMIZERS, check_choice
    from .continual.errors import ZeroflowError

    names = list(OPTIMIZERS) if text.strip() == "all" else [s.strip() for s in text.split(",") if s.strip()]
    if not names:
        raise ZeroflowError(f"--optimizers {text!r} names no optimizer; give a comma-separated list or 'all'")
    for n in names:
        check_choice("optimizer", n, OPTIMIZERS)
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ZeroflowError(f"--optimizers lists {', '.join(twice)} more than once")
    return names


def _sweep_seeds(a) -> List[Optional[int]]:
    """The seeds of ``--seeds`` (checked), or ``[None]``: one run per optimizer with --seed."""
    from .continual.defaults import SEED_MAX
    from .continual.errors import ZeroflowError

    if a.seeds is None:
        return [None]
    if a.seed is not None:
        raise ZeroflowError("--seed and --seeds both given: give the seeds of the sweep with --seeds only")
    seeds = []
    for part in a.seeds.split(","):
        try:
            seeds.append(int(part.strip()))
        except ValueError:
            raise ZeroflowError(f"--seeds {a.seeds!r}: {part.strip()!r} is not an integer; give e.g. "
                                f"--seeds 1993,1,2") from None
    bad = [k for k in seeds if not 0 <= k <= SEED_MAX]
    if bad:
        raise ZeroflowError(f"--seeds: {bad[0]} is not in [0, {SEED_MAX}]")
    twice = sorted({k for k in seeds if seeds.count(k) > 1})
    if twice:
        raise ZeroflowError(f"--seeds lists {', '.join(map(str, twice))} more than once")
    return seeds


def _sweep_records(a) -> bool:
    """Whether the sweep records trajectories: ``--record``, or ``record: true`` in --config."""
    from .continual.defaults import load_config_file

    return bool(a.record) or (a.config is not None and load_config_file(a.config).get("record") is True)


def _sweep_plan(a, names: List[str], parent: str) -> list:
    """``(label, config, run folder, names)`` for every optimizer (and every seed of ``--seeds``), all
    checked before the first run starts: options, and what each folder already holds (a run
    with another configuration, a damaged one, or one in progress is refused unless --force)."""
    from .continual.defaults import RECORDABLE, resolve_named
    from .continual.errors import ZeroflowError
    from .continual.runfolder import conflict, lock_holder, run_files_in
    from .continual.runner import check_resumable, warn_stderr

    record = _sweep_records(a)

    here = run_files_in(parent)
    if here:
        raise ZeroflowError(f"--out {parent} is a run folder (it holds {here[0]}); a sweep writes its runs into "
                            f"folders inside --out, and zeroflow report does not look inside a run folder, so "
                            f"they would be hidden: choose another --out")
    plan, seeds = [], _sweep_seeds(a)
    warned = []       # the same warning from each run's configuration: once
    for n, seed in ((n, seed) for n in names for seed in seeds):
        over = _overrides(a) | {"optimizer": n} | ({} if seed is None else {"seed": seed})
        if record and n not in RECORDABLE:
            over["record"] = False      # named in a warning by cmd_sweep; the others are recorded
        cfg, given = resolve_named(over, a.config, warn=lambda m: m in warned or (warned.append(m), warn_stderr(m)))
        suffix = "" if seed is None else f"_seed{seed}"
        d = os.path.join(parent, f"{cfg['method']}_{n}_{cfg['dataset']}{suffix}")
        holder = lock_holder(d)
        if holder:
            raise ZeroflowError(f"{d} is in use by {holder}; wait until it has finished, or choose another --out")
        state, why = conflict(d, cfg)
        if why and state.kind in ("parent", "inside"):   # --force replaces a run, not another run's folders
            raise ZeroflowError(f"{why}; choose another --out")
        if why and not a.force:
            raise ZeroflowError(f"{why}; choose another --out, or add --force to replace it")
        if state.kind == "unfinished" and not why:     # resumed, --force or not: its checkpoint must load
            check_resumable(d, cfg)
        plan.append((n if seed is None else f"{n} seed {seed}", cfg, d, given))
    return plan


def cmd_sweep(a, started: float) -> int:
    """A run that fails does not stop the others: the table covers the finished runs and the
    failures are listed after it (exit 1). Ctrl-C prints the table of what has finished."""
    from .continual.defaults import RECORDABLE, flag
    from .continual.errors import OutputClosed, ZeroflowError, refuse_empty_path
    from .continual.report import render_runs
    from .continual.runfolder import RunFolder
    from .continual.runner import RunInterrupted, check_setup, init_cls_named, run, warn_stderr

    world = os.environ.get("WORLD_SIZE", "1").strip()
    if "RANK" in os.environ and world != "1":
        # every rank claimed the sweep folder: all but one were refused ('in use by pid ...', their
        # sibling) and the one left waited in its first collective until torchrun killed it
        e = ZeroflowError(f"zeroflow sweep does not run under torchrun with several processes (WORLD_SIZE={world}): "
                            f"run each optimizer data-parallel with torchrun ... -m zeroflow run --optimizer NAME "
                            f"--out DIR/<method>_<NAME>_<dataset>, then zeroflow report DIR (a zeroflow sweep "
                            f"--out DIR in one process takes those runs as they are)")
        e.every_rank = True
        raise e
    refuse_empty_path(a.out, "--out", "give the folder the sweep's runs go into, or leave --out out for a fresh "
                                      "runs/sweep_<time>")
    names = _sweep_optimizers(a.optimizers)
    parent = a.out or os.path.join("runs", "sweep_" + time.strftime("%Y%m%d-%H%M%S"))
    plan = _sweep_plan(a, names, parent)
    # device, backend, weights, data: as zeroflow run does (its init_cls named as every run names it)
    with init_cls_named(plan[0][3].get("init_cls", flag("init_cls"))):
        check_setup(cfg for _, cfg, _, _ in plan)
    if _sweep_records(a) and any(n not in RECORDABLE for n in names):
        warn_stderr(f"--record: not recording {', '.join(n for n in names if n not in RECORDABLE)} (first-order "
                    f"steps and forward_grad's jvps cannot be replayed from a trajectory log)")
    sweep_folder = RunFolder(parent).claim(warn_stderr)     # one sweep per folder at a time
    finished, failed = [], []
    said = set()

    def warn_data_once(message):
        # the runs of a sweep share their data: its warnings (a class count unlike the study's,
        # files skipped) were said again by every run. Only those: a warning of a run's own (its
        # zo_eps under its precision, its folder) is said under each run it concerns, even where
        # another run says it alike
        if message not in said:
            said.add(message)
            warn_stderr(message)
    try:
        for n, cfg, d, given in plan:
            _say(f"== {n} -> {d}", flush=True)
            try:
                m = run(cfg, d, force=a.force, continue_existing=True, progress=not a.no_progress,
                        warn_data=warn_data_once, names=given)
            except ZeroflowError as e:
                _tell(f"zeroflow: error: {n}: {e}")
                failed.append((n, str(e)))
                continue
            finished.append(dict(m, _dir=d))
    except KeyboardInterrupt as e:
        # RunInterrupted once a run has claimed its folder; a plain KeyboardInterrupt while it
        # sets up (options, data, backbone) or between runs: the same table and advice
        if finished:
            _say(render_runs(finished, [])[0])
        where = f" in {e.run_dir}" if isinstance(e, RunInterrupted) else ""
        _tell(f"zeroflow: sweep interrupted{where}; run the same command with --out {parent} to continue "
              f"(finished runs are kept, the interrupted one resumes)")
        return 130
    except OutputClosed as e:
        where = f" in {e.run_dir}" if e.run_dir else ""
        return _output_closed(f"zeroflow: sweep stopped{where}: stdout was closed by its reader; run the same command "
                              f"with --out {parent} to continue (finished runs are kept, the stopped one resumes)")
    finally:
        sweep_folder.release()
    if finished:
        _say(render_runs(finished, [])[0])
    if os.path.isdir(parent):        # a sweep whose every run failed before writing leaves none
        _say(f"sweep folder: {parent}")
    for n, msg in failed:
        _tell(f"zeroflow: {n} failed: {msg}")
    return 1 if failed else 0


def cmd_report(a, started: float) -> int:
    from ._atomic import atomic_write_bytes
    from .continual.errors import ZeroflowError, refuse_empty_path
    from .continual.report import find_runs, render_runs
    from .continual.runfolder import RUN_FILES, RUN_MARKERS, TRAJECTORY, is_run_folder, writing

    if a.output is not None:     # checked before the runs are read: a bad --output wastes nothing
        refuse_empty_path(a.output, "--output", "give the markdown file to write, e.g. --output report.md, "
                                                "or leave --output out to print the tables only")
        if os.path.isdir(a.output):
            raise ZeroflowError(f"cannot write {a.output}: it is a folder")
        if a.output.endswith(("/", os.sep)):
            raise ZeroflowError(f"cannot write {a.output}: it names a folder; give a file, e.g. "
                                f"{os.path.join(a.output, 'report.md')}")
        if not os.path.isdir(os.path.dirname(os.path.abspath(a.output))):
            raise ZeroflowError(f"cannot write {a.output}: its folder does not exist")
        # the markdown would replace a run's result (e.g. --output runs/r/metrics.json): the run
        # would be lost, and damaged for zeroflow report, sweep and --resume
        folder, name = os.path.split(os.path.abspath(a.output))
        run_dir = (folder if name in RUN_FILES and is_run_folder(folder) else
                   os.path.dirname(folder) if os.path.basename(folder) == TRAJECTORY
                   and is_run_folder(os.path.dirname(folder)) else None)
        if run_dir is not None:
            raise ZeroflowError(f"cannot write {a.output}: it is a file of the run in {run_dir}, which the report "
                                f"would replace; give another file, e.g. "
                                f"{os.path.join(os.path.dirname(run_dir), 'report.md')}")
        # a file of this name makes any folder read as a run folder: --output runs/metrics.json
        # made the folder of runs one damaged run, and zeroflow report then found none of its runs
        if name in RUN_MARKERS:
            raise ZeroflowError(f"cannot write {a.output}: a file named {name} makes {folder} read as a run folder "
                                f"(zeroflow report would take it for a damaged run and skip the runs in it); "
                                f"give another name, e.g. {os.path.join(folder, 'report.md')}")
    runs, skipped = find_runs(a.runs)
    for line in skipped:
        _tell(f"zeroflow: skipped {line}")
    text, _ = render_runs(runs, skipped)
    if a.output is not None:
        with writing(a.output):
            atomic_write_bytes(a.output, text.encode())
    _say(text)
    return 0


def _interrupted_message(e, what: str = "interrupted") -> str:
    """Where a run stopped (:class:`RunInterrupted`, or :class:`OutputClosed` with a ``run_dir``)
    and how to continue it."""
    if getattr(e, "run_dir", None) is None:      # a plain KeyboardInterrupt; the CLI's own output closed
        return f"zeroflow: {what}"
    if not e.resumable:
        return f"zeroflow: {what} during setup; nothing was kept (no run in {e.run_dir})"
    done = f"after task {e.completed}/{e.n_tasks}" if e.completed else "before the first task finished"
    return (f"zeroflow: {what} {done} (finished tasks are checkpointed in {e.run_dir}); continue with: "
            f"zeroflow run --resume --out {e.run_dir}")


# 128 + SIGPIPE, what a shell reports for a process its pipe's reader ended (as 130 is Ctrl-C's)
EXIT_OUTPUT_CLOSED = 141


def _output_closed(message: str) -> int:
    """stdout's reader is gone: Python's recipe (docs of the signal module, "Note on SIGPIPE"),
    stdout onto /dev/null, so that what its buffer still holds is not written again at exit
    ('Exception ignored ... BrokenPipeError'); the message on stderr (which may be closed too)."""
    _onto_devnull(sys.stdout)
    try:
        if message:
            print(message, file=sys.stderr, flush=True)
        else:
            sys.stderr.flush()
    except OSError:     # `2>&1 | head`: nowhere left to say it; and nothing to say at exit either
        _onto_devnull(sys.stderr)
    return EXIT_OUTPUT_CLOSED


def _onto_devnull(stream) -> None:
    """``stream``'s file descriptor onto /dev/null: what its buffer still holds is then not
    written again at exit, where it failed as 'Exception ignored ... BrokenPipeError' (exit 120)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):      # not a file (a test's capture): nothing is flushed at exit
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _said(message: str, rc: int) -> int:
    """``message`` on stderr and ``rc``; stderr's reader gone (``2>&1 | head``), the end of a
    closed output instead, as anywhere else in a command."""
    try:
        print(message, file=sys.stderr, flush=True)
    except BrokenPipeError:
        return _output_closed("")
    return rc


def _terminate_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    started = time.perf_counter()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["replay"]:
        # its own parser (BASE LOG --out WEIGHTS), shared with python -m zeroflow.replay
        from .replay import replay_main
        return replay_main(argv[1:])
    p = build_parser()
    from .continual.errors import torchrun_rank
    if torchrun_rank() != 0:
        # argparse's refusal (usage and 'error: ...', exit 2) of the command line every rank of a
        # torchrun job gets alike: said by rank 0 only, as a refused option is (main's ZeroflowError)
        with contextlib.redirect_stderr(io.StringIO()):
            a = p.parse_args(argv)
    else:
        a = p.parse_args(argv)
    if a.cmd is None:
        p.print_help()
        return 2
    from .continual.errors import OutputClosed, ZeroflowError
    # SIGTERM (kill, a batch scheduler) ends a run like Ctrl-C: the lock is released, the
    # checkpoint of the last finished task is kept, and the message says how to resume
    previous = None
    if a.cmd in ("run", "sweep") and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    group_before = _process_group_up()
    try:
        rc = {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report}[a.cmd](a, started)
        try:        # here, not at exit: a reader gone before the last lines is then said as below
            sys.stdout.flush()
            # a Python warning written to a closed stderr (`2>&1 | head`): the warnings module drops
            # the error, but the line stays buffered and failed at exit ('Exception ignored', exit 120)
            sys.stderr.flush()
        except BrokenPipeError as e:
            raise OutputClosed() from e
        return rc
    except OutputClosed as e:
        # `zeroflow run ... | head -1`: the run stops as on Ctrl-C (checkpoint kept, resume advice
        # on stderr, from rank 0 only), without a traceback
        return _output_closed(_interrupted_message(e, "stopped (stdout was closed by its reader)")
                              if e.rank == 0 else "")
    except ZeroflowError as e:
        # under torchrun an error every rank raised alike (a refused option) is said by rank 0
        # alone, not once per rank; the other ranks end with the same exit code, silently
        # (torchrun's summary lists them); one only some ranks hit is said by each of them
        if not (e.every_rank and torchrun_rank() != 0):
            return _said(f"zeroflow: error: {e}", 2)
        return 2
    except KeyboardInterrupt as e:
        # under torchrun only rank 0 says where the run stopped: another rank, which writes
        # nothing, said 'interrupted during setup; nothing was kept' beside rank 0's resume advice
        if getattr(e, "rank", 0) == 0:
            return _said(_interrupted_message(e), 130)
        return 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        if not group_before and _process_group_up():
            # the group the runs made under torchrun (run and sweep alike), left cleanly: gloo's
            # teardown at interpreter exit can abort a job that finished (tests/test_distributed.py)
            import torch.distributed as dist
            dist.destroy_process_group()


def _process_group_up() -> bool:
    if "torch.distributed" not in sys.modules:      # not imported yet: no group, and no import for --help
        return False
    import torch.distributed as dist
    return dist.is_available() and dist.is_initialized()


if __name__ == "__main__":
    sys.exit(main())
