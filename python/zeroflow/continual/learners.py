"""Shared learner machinery: cosine head, optimizer bridge, training loop, features.

Train/eval semantics (documented in docs/continual.md): first-order steps run the learner
in ``train()`` mode (adapter dropout 0.1 active); zeroth-order steps (and the ZO phase of a
hybrid optimizer) run it in ``eval()`` mode, i.e. adapter dropout is disabled, as the
reference ZO code ran its forward passes. The frozen backbone is always in eval mode.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import WriteFailed, ZeroflowError


class CosineLinear(nn.Module):
    """``sigma * cos(f, w)``; ``sigma`` learnable (init 1), weights uniform(+-1/sqrt(d))."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.sigma = nn.Parameter(torch.ones(1))
        stdv = 1.0 / math.sqrt(in_features)
        nn.init.uniform_(self.weight, -stdv, stdv)

    def forward(self, x):
        return self.sigma * F.linear(F.normalize(x, dim=-1), F.normalize(self.weight, dim=-1))


SGD_LIKE = ("zo_sgd", "zo_sgd_sign", "zo_sgd_conserve", "forward_grad", "fo_sgd")
ZO_KEYS = ("zo_eps", "q", "perturbation", "sparsity", "history", "backend")


def make_optimizer(cfg: Dict, params: List[torch.Tensor], model: nn.Module, seed: int):
    """``zeroflow.optim.create`` with the run configuration (ZO-only options only for ZO methods)."""
    from zeroflow.optim import create

    name = cfg["optimizer"]
    kw = dict(lr=float(cfg["lr"]), weight_decay=float(cfg.get("weight_decay", 0.0)))
    if name in SGD_LIKE:
        kw["momentum"] = float(cfg.get("momentum", 0.0))
    if not name.startswith("fo_"):
        for k in ZO_KEYS:
            if cfg.get(k) is not None:
                kw[k] = cfg[k]
        kw["seed"] = int(seed) & 0x7FFFFFFF
        if kw.get("backend") in (None, ""):
            kw.pop("backend", None)
        hs = cfg.get("hybrid_switch")
        if hs and cfg.get("hybrid_zo_lr") is not None:
            # lr: the FO phase's (and the schedule's base); the ZO phase steps at hybrid_zo_lr
            # (zo_lr_scale = hybrid_zo_lr / lr, kept by the per-epoch schedule)
            kw["fo_lr"], kw["lr"] = kw["lr"], float(cfg["hybrid_zo_lr"])
        return create(name, params, model=model, hybrid_switch=int(hs) if hs else None, **kw)
    return create(name, params, model=model, **kw)


@dataclass
class Counters:
    """Efficiency counters accumulated over a run (saved in every checkpoint)."""

    train_forward_passes: int = 0     # optimizer closure evaluations (queries incl. FO forwards)
    eval_forward_passes: int = 0      # network passes over batches for prototypes and tests
    iterations: int = 0               # optimizer steps
    train_seconds: float = 0.0        # wall time inside optimizer steps

    def as_dict(self):
        return dict(self.__dict__)


def cosine_lr(base: float, epoch: int, epochs: int, schedule: str) -> float:
    if schedule == "constant" or epochs <= 1:
        return base
    return 0.5 * base * (1.0 + math.cos(math.pi * epoch / epochs))


def train_subspace(net: nn.Module, forward: Callable, modules: Dict[str, nn.Module], loader, cfg: Dict, *,
                   label_offset: int, seed: int, device: torch.device, counters: Counters,
                   timer, progress_desc: str, progress: bool = True, data_parallel: bool = False,
                   record: Optional[str] = None, mem=None, scaler=None) -> Dict:
    """Train ``modules`` (``{name: module}``: an adapter set + a temporary head) with
    cross-entropy on ``forward(x) -> logits`` using the configured factory optimizer.

    ``data_parallel`` (torchrun): ``loader`` yields this rank's shard of each global batch and
    the ZO optimizer is wrapped in :class:`zeroflow.distributed.DataParallelZO` (only the
    loss scalars cross the wire); the parameters are checked bit-identical across ranks at
    the start and at the end of the task.

    ``record`` (``--record``): path stem of this task's trajectory log. ``STEM.base.pt`` gets
    the trained tensors before the first step, named ``<module name>.<parameter name>``, and
    ``STEM.zft`` every step; ``zeroflow replay STEM.base.pt STEM.zft`` rebuilds the trained
    tensors bit-exactly.

    ``mem`` (the run's ``MemoryMeter``): the returned ``train_peak_memory_bytes`` is the peak
    of the training loop alone (the optimizer's memory, the study's Table 2), without the
    prototype and test passes at ``eval_batch_size`` that follow it in the task.

    ``scaler`` (the run's ``torch.amp.GradScaler``, fp16 only: :func:`.precision.grad_scaler`)
    scales the loss of first-order steps; a step it skips (inf/nan gradients) still counts its
    forward pass."""
    names = [f"{mname}.{pname}" for mname, m in modules.items() for pname, _ in m.named_parameters()]
    params = [p for m in modules.values() for p in m.parameters()]
    for p in params:
        p.requires_grad_(True)
    # the module the closure runs (Forward-Grad swaps parameters in it by name)
    inside = {id(m) for m in net.modules()}
    holder = nn.ModuleList([net] + [m for m in modules.values() if id(m) not in inside])
    opt = make_optimizer(cfg, params, holder, seed)
    if data_parallel:
        from zeroflow.distributed import DataParallelZO
        opt = DataParallelZO(opt)
    recorder = start_recording(record, opt, names, params) if record else None
    try:
        with mem.section() if mem is not None else contextlib.nullcontext({}) as section:
            info = _train_loop(net, forward, params, opt, loader, cfg, label_offset, device, counters, timer,
                               progress_desc, progress, scaler)
        if mem is not None and info["steps"]:
            # a loop that took no step (--epochs 0) trained nothing: no training peak (null), as
            # for APER's later tasks; its section held the process's peak so far (CPU RSS)
            info["train_peak_memory_bytes"] = section["peak"]
        if data_parallel:
            opt.check_params(where=f"after {progress_desc}")
            info["bytes_communicated"] = opt.comm.snapshot()
        if recorder is not None:
            recorder.close()      # the end record: the checksum of the weights the task ends with
        return info
    except BaseException as e:
        if recorder is not None:
            # cut short (^C, an error): no end record. With one, the log looked whole and
            # replayed, verified, to the weights of a task trained in part.
            with contextlib.suppress(OSError):
                recorder.abandon()
            from zeroflow.replay import TrajectoryWriteError
            if isinstance(e, TrajectoryWriteError):
                raise WriteFailed(f"cannot write {recorder.path}: {e.strerror}") from e
        raise


def start_recording(stem: str, opt, names: List[str], params: List[torch.Tensor]):
    """Write ``STEM.base.pt`` (the tensors about to be trained) and start ``STEM.zft``."""
    from zeroflow._atomic import atomic_torch_save
    from zeroflow.replay import TrajectoryRecorder

    from .runfolder import writing

    base, log = stem + ".base.pt", stem + ".zft"
    with writing(base):
        os.makedirs(os.path.dirname(base) or ".", exist_ok=True)
        atomic_torch_save({"model": {n: p.detach().cpu().clone() for n, p in zip(names, params)}}, base)
    with writing(log):
        # overwrite: a log left here is this task's from an interrupted run (the run folder is
        # locked by this run), and the task is trained again from its start
        return TrajectoryRecorder(log, opt, names=names, overwrite=True)


def _train_loop(net, forward, params, opt, loader, cfg, label_offset, device, counters, timer,
                progress_desc, progress, scaler=None):
    from tqdm.auto import tqdm
    from zeroflow.optim import train_step

    epochs = int(cfg["epochs"])
    losses = []
    skipped = 0          # first-order steps the loss scaler skipped: forwards the optimizer did not count
    bar = tqdm(total=epochs * len(loader), desc=progress_desc, disable=not progress, leave=False,
               dynamic_ncols=True)
    sharded = hasattr(loader.batch_sampler, "set_epoch")
    with _abandoned_as_unreadable():
        for epoch in range(epochs):
            lr = cosine_lr(float(cfg["lr"]), epoch, epochs, cfg.get("schedule", "cosine"))
            for g in opt.param_groups:
                g["lr"] = lr
            if sharded:
                loader.batch_sampler.set_epoch(epoch)
            for x, y in _batches(loader, opt):
                x = x.to(device, non_blocking=True)
                y = (y - label_offset).to(device, non_blocking=True)
                net.train(not opt.zeroth_order)

                def closure():
                    return F.cross_entropy(forward(x), y)

                if hasattr(opt, "set_batch_size"):     # DataParallelZO: weight this shard's loss
                    opt.set_batch_size(len(x))
                t0 = timer.now()
                scale = scaler.get_scale() if scaler is not None and not opt.zeroth_order else None
                loss = train_step(opt, closure, scaler if scale is not None else None)
                skipped += scale is not None and scaler.get_scale() < scale     # lowered: inf/nan found, no step
                counters.train_seconds += timer.now() - t0
                counters.iterations += 1
                if not math.isfinite(loss):
                    raise ZeroflowError(f"training diverged (loss={loss}) at {progress_desc}, epoch {epoch}; "
                                        f"lower --lr or --zo-eps")
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2g}")
    bar.close()
    counters.train_forward_passes += int(opt.forward_passes) + skipped
    net.eval()
    for p in params:
        # frozen from here on, and kept for the rest of the run: the last first-order step's
        # .grad would stay with it, one parameter-sized buffer per finished task
        p.grad = None
        p.requires_grad_(False)
    k = max(1, len(losses) // 10)          # mean loss over the first / last tenth of the steps
    first = sum(losses[:k]) / len(losses[:k]) if losses else None
    last = sum(losses[-k:]) / len(losses[-k:]) if losses else None
    return {"steps": len(losses), "forward_passes": int(opt.forward_passes) + skipped, "loss_first": first,
            "loss_last": last}


def _batches(loader, opt):
    """``loader``'s batches. Under :class:`~zeroflow.distributed.DataParallelZO` (torchrun), a
    batch this rank cannot load (an image its node cannot read) abandons the step in the step's
    exchange of batch sizes, where the other ranks wait: every rank then stops on one
    :class:`UnreadableImage` naming the rank and the image (:func:`_abandoned_as_unreadable`;
    ``every_rank``: rank 0 says it, with the resume command). Raised here alone, it left the
    others waiting until this rank's exit broke their collective (gloo's 'Connection closed by
    peer' traceback)."""
    from .data import UnreadableImage

    batches = iter(loader)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except UnreadableImage as e:
            if not hasattr(opt, "abandon_step") or opt.world == 1:     # no other rank waits for this one
                raise
            opt.abandon_step(str(e))      # raises StepAbandoned, here as on the ranks in opt.step
        yield batch


@contextlib.contextmanager
def _abandoned_as_unreadable():
    """A step some rank abandoned (:func:`_batches`): the same UnreadableImage on every rank."""
    from zeroflow.distributed import StepAbandoned

    from .data import UnreadableImage

    try:
        yield
    except StepAbandoned as e:
        error = UnreadableImage(str(e))
        error.every_rank = True
        raise error from e


def adapters_state(net) -> Dict:
    """The trained part of an ``AdaptedViT`` shared by EASE and APER checkpoints."""
    return {"adapters": net.adapters.state_dict(), "n_adapters": len(net.adapters)}


def load_adapters(net, sd: Dict) -> None:
    """Recreate ``sd["n_adapters"]`` adapter sets, load them, and freeze them."""
    while len(net.adapters) < sd["n_adapters"]:
        net.add_adapter_set()
    net.adapters.load_state_dict(sd["adapters"])
    for p in net.adapters.parameters():
        p.requires_grad_(False)


def batch_features(net, loader, adapters: Sequence[Optional[int]], device: torch.device, counters: Counters):
    """Per batch: fp32 CPU features ``[B, len(adapters), d]`` (one backbone pass per adapter
    choice, counted) and the labels. Callers run it under ``torch.no_grad()``."""
    net.eval()
    for x, y in loader:
        x = x.to(device, non_blocking=True)
        f = torch.stack([net.features(x, a) for a in adapters], dim=1)
        counters.eval_forward_passes += len(adapters)
        yield f.float().cpu(), y


@torch.no_grad()
def extract(net, loader, adapters: Sequence[Optional[int]], device: torch.device, counters: Counters):
    """Features ``[N, len(adapters), d]`` of a whole loader and its labels."""
    feats, labels = [], []
    for f, y in batch_features(net, loader, adapters, device, counters):
        feats.append(f)
        labels.append(y)
    if not feats:
        return torch.empty(0, len(adapters), net.dim), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)


def class_means(feats: torch.Tensor, labels: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    out = []
    for c in classes:
        m = labels == c
        if not bool(m.any()):
            raise ZeroflowError(f"class {c} has no training images")
        out.append(feats[m].mean(0))
    return torch.stack(out)
