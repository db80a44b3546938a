"""One continual-learning run: data, backbone, learner, per-task checkpoints, results.

Run folder (``--out DIR`` or a fresh ``runs/<time>_<method>_<optimizer>_<dataset>``):

* ``config.json``, ``environment.json`` (written first)
* ``backbone.pt`` (small backbone only: the base-session pretrained weights)
* ``checkpoint.pt`` (after every task; ``--resume`` continues from it)
* at the end: ``accuracy_matrix.csv``, ``accuracy_per_stage.png``,
  ``accuracy_matrix.png`` and last ``metrics.json``. Every file is written to a temporary
  name and renamed, so a ``metrics.json`` only exists for a finished run.
"""
from __future__ import annotations

import csv
import io
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Dict, Optional

import numpy as np
import torch
import torch.distributed

from .._atomic import atomic_torch_save, atomic_write, atomic_write_bytes
from . import metrics as M
from .errors import ZeroflowError

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.json"
CKPT_VERSION = 1


# ---------------------------------------------------------------- atomic files
def atomic_write_text(path: str, text: str):
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str, obj):
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


# ---------------------------------------------------------------- helpers
def resolve_device(name: str) -> torch.device:
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except Exception as e:
        raise ZeroflowError(f"--device {name!r}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ZeroflowError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return dev


def environment(device: torch.device) -> Dict:
    env = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
           "numpy": np.__version__, "device": str(device), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    for mod in ("timm", "torchvision", "sklearn", "zeroflow"):
        try:
            m = __import__(mod)
            env[mod] = getattr(m, "__version__", "?")
        except Exception:
            env[mod] = None
    try:
        import zfkernels
        env["zfkernels_backends"] = list(zfkernels.available_backends())
    except Exception:
        pass
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


def distributed_setup(cfg: Dict):
    """``(rank, world)`` when launched by torchrun (process group initialised here; world
    may be 1), else ``None``. Data-parallel runs are zeroth-order only: FO baselines need gradient
    all-reduce (use torch DDP for those), so they are refused with that advice."""
    from zeroflow.distributed import init_from_env

    got = init_from_env()
    if got is None:
        return None
    if str(cfg.get("optimizer", "")).startswith("fo_"):
        raise ZeroflowError(f"--optimizer {cfg['optimizer']} under torchrun: data-parallel runs exchange only ZO "
                            "loss scalars, so they need a forward-pass optimizer (zo_* or forward_grad, optionally "
                            "with --hybrid-switch); run first-order baselines in a single process")
    return got


def default_run_dir(cfg: Dict) -> str:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = os.path.join("runs", f"{stamp}_{cfg['method']}_{cfg['optimizer']}_{cfg['dataset']}")
    path, k = base, 1
    while os.path.exists(path):
        k += 1
        path = f"{base}_{k}"
    return path


def load_checkpoint(path: str) -> Dict:
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ZeroflowError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}: {str(e)[:200]}); "
                            f"delete it to restart the run from scratch") from e
    if not isinstance(ck, dict) or ck.get("version") != CKPT_VERSION or "completed" not in ck:
        raise ZeroflowError(f"checkpoint {path} is not a zeroflow run checkpoint (version {CKPT_VERSION}); "
                            f"delete it to restart the run")
    return ck


# ---------------------------------------------------------------- backbone
def build_network(cfg: Dict, data, device: torch.device, run_dir: str, progress: bool):
    from .backbones import AdaptedViT, load_timm_vit, pretrain_small_backbone, build_small_vit

    if cfg["backbone"] == "small":
        path = os.path.join(run_dir, "backbone.pt") if run_dir else None   # None: a rank > 0 (writes nothing)
        if path and os.path.isfile(path):
            vit = build_small_vit(data.in_chans, data.img_size, cfg.get("small_vit"))
            try:
                vit.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            except Exception as e:
                raise ZeroflowError(f"{path} is corrupt ({type(e).__name__}); delete it and rerun") from e
        else:
            vit = pretrain_small_backbone(
                data, vit_cfg=cfg.get("small_vit"), epochs=int(cfg["pretrain_epochs"]),
                lr=float(cfg["pretrain_lr"]), batch_size=int(cfg["pretrain_batch_size"]), seed=int(cfg["seed"]),
                device=device, progress=progress)
            if path:
                atomic_torch_save(vit.state_dict(), path)
    else:
        vit = load_timm_vit(cfg["backbone"], checkpoint=cfg.get("checkpoint"), pretrained=True,
                            model_kwargs=cfg.get("model_kwargs"))
    net = AdaptedViT(vit, int(cfg["adapter_dim"]))
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


# ---------------------------------------------------------------- run
def run(cfg: Dict, out: Optional[str] = None, *, resume: bool = False, progress: bool = True,
        stop_after: Optional[int] = None, log=print) -> Dict:
    """Run (or resume) one experiment; returns the metrics dict (also in ``<run>/metrics.json``).

    ``stop_after=k``: stop after task ``k`` (1-based count of tasks finished in total) with
    the checkpoint written and no metrics.json, as an interrupted run would.
    """
    from .data import load_dataset
    from .learners import Counters

    shard = distributed_setup(cfg)
    rank, world = shard or (0, 1)
    main = rank == 0     # only rank 0 writes files and logs; every rank trains and evaluates
    if not main:
        log, progress = (lambda *a, **k: None), False
    run_dir = out or default_run_dir(cfg)
    if world > 1 and out is None:
        box = [run_dir]
        torch.distributed.broadcast_object_list(box, src=0)   # rank 0's time-stamped folder for everyone
        run_dir = box[0]
    ck_path = os.path.join(run_dir, CHECKPOINT)
    if resume:
        if not os.path.isdir(run_dir):
            raise ZeroflowError(f"--resume: run folder {run_dir} does not exist")
        cpath = os.path.join(run_dir, "config.json")
        if not os.path.isfile(cpath):
            raise ZeroflowError(f"--resume: {cpath} not found (not a zeroflow run folder)")
        with open(cpath) as f:
            saved = json.load(f)
        if cfg.get("device") not in (None, "auto"):
            saved["device"] = cfg["device"]
        cfg = saved
        if os.path.isfile(os.path.join(run_dir, METRICS)):
            with open(os.path.join(run_dir, METRICS)) as f:
                log(f"run {run_dir} is already finished")
                return json.load(f)
    else:
        if os.path.isfile(os.path.join(run_dir, METRICS)):
            raise ZeroflowError(f"{run_dir} already holds a finished run (metrics.json); choose another --out")
        if os.path.isfile(ck_path):
            raise ZeroflowError(f"{run_dir} holds an unfinished run; continue it with --resume --out {run_dir} "
                                f"or choose another --out")
    if main:
        os.makedirs(run_dir, exist_ok=True)
    if world > 1 and cfg.get("device") in (None, "", "auto"):
        from zeroflow.distributed import local_device
        device = local_device()          # cuda:LOCAL_RANK under NCCL, else cpu
    else:
        device = resolve_device(cfg.get("device"))
    threads = cfg.get("threads")
    if threads is None and device.type == "cpu" and cfg.get("backbone") == "small":
        threads = 1   # the tiny ViT is dominated by threading overhead; 1 thread is fastest
    if threads:
        torch.set_num_threads(int(threads))
    if main:
        if not resume:
            atomic_write_json(os.path.join(run_dir, "config.json"), cfg)
        env = environment(device)
        if world > 1:
            env["world_size"] = world
        atomic_write_json(os.path.join(run_dir, "environment.json"), env)

    t_setup = time.perf_counter()
    seed_everything(int(cfg["seed"]))
    data = load_dataset(cfg["dataset"], cfg["data_root"], int(cfg["init_cls"]), int(cfg["increment"]),
                        download=bool(cfg.get("download")), img_size=int(cfg.get("img_size", 224)))
    # torchrun: rank 0 builds (and caches) the backbone first, the others then load it; rank
    # 0's weights are then broadcast so that every rank runs the identical network
    if world > 1 and not main:
        torch.distributed.barrier()
    net = build_network(cfg, data, device, run_dir if main else None, progress)
    if world > 1:
        from zeroflow.distributed import broadcast_module_
        if main:
            torch.distributed.barrier()
        broadcast_module_(net)
    learner = make_learner(cfg, net, device)
    setup_seconds = time.perf_counter() - t_setup
    T = len(data.tasks)

    counters = Counters()
    matrix = M.empty_matrix(T)
    curve, task_stats = [], []
    completed = 0
    peak = 0
    if resume and os.path.isfile(ck_path):
        ck = load_checkpoint(ck_path)
        learner.load_state_dict(ck["learner"])
        matrix, curve, task_stats = ck["matrix"], ck["curve"], ck["task_stats"]
        counters = Counters(**ck["counters"])
        completed, peak = int(ck["completed"]), int(ck["peak_memory_bytes"])
        log(f"resuming {run_dir} after task {completed}/{T}")

    mem = M.MemoryMeter(device)
    timer = M.Timer(device)
    eval_bs, nw = int(cfg.get("eval_batch_size", 256)), int(cfg.get("num_workers", 0))
    for t in range(completed, T):
        s = task_seed(int(cfg["seed"]), t)
        seed_everything(s)
        mem.reset()
        it0, fp0, ts0 = counters.iterations, counters.train_forward_passes, counters.train_seconds
        t0 = timer.now()
        info = learner.learn_task(t, data.tasks[t], data, TaskContext(s, T, counters, timer, progress, shard))
        overall, per_task = evaluate(learner, data, data.tasks[: t + 1], device, counters, eval_bs, nw)
        seconds = timer.now() - t0
        for g in range(t + 1):
            matrix[g][t] = per_task[g]
        curve.append(overall)
        task_peak = mem.peak()
        peak = max(peak, task_peak)
        iters = counters.iterations - it0
        task_stats.append({
            "task": t, "classes": len(data.tasks[t]), "seconds": seconds, "iterations": iters,
            **({"bytes_communicated": info["bytes_communicated"]["bytes_sent"]} if "bytes_communicated" in info else {}),
            "train_seconds": counters.train_seconds - ts0,
            "seconds_per_iteration": (counters.train_seconds - ts0) / iters if iters else None,
            "forward_passes": counters.train_forward_passes - fp0, "peak_memory_bytes": task_peak,
            "accuracy": overall, "loss_first": info.get("loss_first"), "loss_last": info.get("loss_last"),
        })
        completed = t + 1
        if main:
            atomic_torch_save({"version": CKPT_VERSION, "completed": completed, "learner": learner.state_dict(),
                               "matrix": matrix, "curve": curve, "task_stats": task_stats,
                               "counters": counters.as_dict(), "peak_memory_bytes": peak}, ck_path)
        log(f"task {t + 1}/{T}: accuracy on {sum(len(c) for c in data.tasks[:t + 1])} seen classes "
            f"{overall:.2f}%  ({seconds:.1f}s)")
        if stop_after is not None and completed >= stop_after and completed < T:
            log(f"stopped after task {completed}/{T}; continue with --resume --out {run_dir}")
            return {"stopped_after": completed, "run_dir": run_dir}

    if not main:
        return {"rank": rank, "world_size": world, "accuracy_curve": curve, "run_dir": run_dir}
    res = M.summarize(curve, matrix)
    train_s = counters.train_seconds
    metrics = {
        **res,
        "accuracy_curve": curve,
        "accuracy_matrix": matrix,
        "peak_memory_bytes": peak,
        "peak_memory_kind": mem.kind,
        "forward_passes": counters.train_forward_passes,
        "eval_forward_passes": counters.eval_forward_passes,
        "iterations": counters.iterations,
        "seconds": sum(ts["seconds"] for ts in task_stats),
        "setup_seconds": setup_seconds,
        "seconds_per_iteration": train_s / counters.iterations if counters.iterations else None,
        "seconds_per_task": [ts["seconds"] for ts in task_stats],
        "tasks": task_stats,
        "n_tasks": T,
        "world_size": world,
        "class_order": data.order,
        "config": cfg,
        "run_dir": run_dir,
    }
    write_results(run_dir, metrics)
    return metrics


def write_results(run_dir: str, metrics: Dict):
    matrix = metrics["accuracy_matrix"]
    T = len(matrix)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["task"] + [f"after_stage_{s}" for s in range(T)])
    for g in range(T):
        w.writerow([g] + ["" if v is None else f"{v:.4f}" for v in matrix[g]])
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
    ax.plot(stages, metrics["accuracy_curve"], "o-", lw=2, color="k", label="all seen classes")
    for g in range(T):
        ys = [matrix[g][s] for s in range(g, T)]
        ax.plot(stages[g:], ys, ".--", lw=1, alpha=0.7, label=f"task {g + 1}")
    ax.set_xlabel("stage (tasks learned)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_xticks(stages)
    ax.set_title(f"{title}\nAvg {metrics['avg']:.2f}  Last {metrics['last']:.2f}  Fgt {metrics['fgt']:.2f}")
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
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
