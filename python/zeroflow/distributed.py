"""Data-parallel zeroth-order training that communicates only scalars (docs/distributed.md).

Every rank holds the full model and the same optimizer (same base seed, options, stream
version): it perturbs with the same z (regenerated from the shared seed schedule, stream v1
§8), evaluates the loss of *its shard* of the batch, and the ranks combine each loss into the
batch-size-weighted mean before the optimizer sees it. Every rank therefore computes the same
projected-gradient scalars and applies the identical fused update: no gradient, no parameter
and no z ever crosses the wire, only ``2q`` (two_side) floats per step.

Typical use (under ``torchrun``)::

    from zeroflow import distributed as zd
    rank, world = zd.init_from_env()                 # a script started by torchrun
    opt = zd.DataParallelZO(create("zo_adam", model.parameters(), lr=1e-4, seed=0))
    for x, y in loader_of_my_shard:                  # see ShardedBatchSampler
        opt.step(lambda: F.cross_entropy(model(x), y), batch_size=len(x))

``DataParallelZO`` checks at construction that every rank has the same seed, options,
stream version, parameter shapes/dtypes and parameter values, and (``check_every``) that the
parameters stay bit-identical; any difference raises :class:`DistributedMismatchError`.
All collectives go through :class:`Comm`, which counts the bytes handed to them.
"""
from __future__ import annotations

import datetime
import hashlib
import json
import math
import os
from typing import Callable, Iterator, Sequence

import torch
import torch.distributed as dist

__all__ = ["Comm", "DataParallelZO", "DistributedMismatchError", "StepAbandoned", "init_from_env", "shard",
           "ShardedBatchSampler", "describe_optimizer", "param_checksum", "state_checksum", "is_main_process",
           "local_device", "broadcast_module_"]


class DistributedMismatchError(RuntimeError):
    """Ranks disagree (seed / options / stream / shapes / parameter values)."""


class StepAbandoned(RuntimeError):
    """Some rank could not take its part in a step (its batch failed to load) and said so in the
    step's exchange of batch sizes (:meth:`DataParallelZO.abandon_step`): raised on every rank,
    with the same text. ``messages``: the abandoning ranks' texts, by rank."""

    def __init__(self, messages: dict[int, str]):
        self.messages = dict(sorted(messages.items()))
        super().__init__("; ".join(f"rank {r}: {m}" for r, m in self.messages.items()))


# ---------------------------------------------------------------------------- launching
def init_from_env(backend: str | None = None, timeout_s: float = 1800.0) -> tuple[int, int] | None:
    """Initialise ``torch.distributed`` from the variables ``torchrun`` sets (``RANK``,
    ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``, ``LOCAL_RANK``).

    Returns ``(rank, world_size)``, or ``None`` when the process was not launched by torchrun
    (no ``RANK``/``WORLD_SIZE``) and no process group exists. Already initialised: returns
    the existing group's rank and size. ``backend`` defaults to ``nccl`` when CUDA is
    available (and selects ``cuda:LOCAL_RANK``), else ``gloo``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    if not dist.is_available():
        raise RuntimeError("launched by torchrun but this torch build has no torch.distributed")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(env.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """True on rank 0 or when not distributed (only the main process writes outputs)."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` under an NCCL group, else cpu."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def broadcast_module_(module: torch.nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers (the whole state_dict, frozen parts
    included) to every rank, in place."""
    with torch.no_grad():
        for t in module.state_dict().values():
            if isinstance(t, torch.Tensor) and t.numel():
                dist.broadcast(t, src=src)


def shard(dataset_indices: Sequence[int], rank: int, world: int) -> list:
    """Rank ``rank``'s share of ``dataset_indices``: every ``world``-th element starting at
    ``rank`` (disjoint, covers all, sizes differ by at most one). A DataLoader per rank over
    it can give the ranks different numbers of batches (the extra step of one waits in its
    first collective): :class:`ShardedBatchSampler` gives every rank the same number."""
    if not (0 <= rank < world):
        raise ValueError(f"rank={rank} must be in [0, world={world})")
    return list(dataset_indices)[rank::world]


class ShardedBatchSampler:
    """Batch sampler giving rank ``rank`` its slice of each *global* batch.

    The global order is one permutation per epoch drawn from ``seed + epoch`` (identical on
    every rank; or the identity with ``shuffle=False``); global batch k is
    ``order[k*B:(k+1)*B]`` and this rank gets ``batch[rank::world]``. So the union of the
    ranks' step-k batches is exactly the single-process step-k batch, and with
    :class:`DataParallelZO` (``batch_size=len(x)``) the run equals the single-process run on
    that batch up to fp32 rounding. Every rank yields the same number of batches; a final
    global batch with fewer than ``world`` samples is dropped (so no rank gets an empty
    batch); ``n < world`` (no batch at all: nothing would train) raises. Use as
    ``DataLoader(ds, batch_sampler=ShardedBatchSampler(len(ds), B, rank, world, seed=s))``
    and call ``set_epoch(e)`` each epoch."""

    def __init__(self, n: int, global_batch_size: int, rank: int, world: int, *, shuffle: bool = True,
                 seed: int = 0):
        from zeroflow.optim.zo import counter

        # counts, not numbers: int(4.5) made a global batch of 4 without a word, and every rank
        # then stepped on other samples than the run was given
        n, global_batch_size = counter(n, "n (the dataset's length)"), counter(global_batch_size, "global_batch_size")
        rank, world = counter(rank, "rank"), counter(world, "world")
        if global_batch_size < world:
            raise ValueError(f"global batch size {global_batch_size} < world size {world}: some rank would get "
                             "an empty batch")
        if not (0 <= rank < world):
            raise ValueError(f"rank={rank} must be in [0, world={world})")
        if n < world:
            # the only global batch has fewer samples than ranks and is dropped (see above): every
            # rank yielded no batch, and the run trained nothing without a word
            raise ValueError(f"n={n} samples < world size {world}: the only global batch would be dropped (some "
                             "rank would get no sample), so every rank would yield no batch and train nothing. "
                             f"Give at least {world} samples, or run on fewer ranks")
        self.n, self.B, self.rank, self.world = n, global_batch_size, rank, world
        self.shuffle, self.seed, self.epoch = shuffle, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        order = self._order()
        for k in range(len(self)):
            yield order[k * self.B:(k + 1) * self.B][self.rank::self.world]

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.B)
        return full + (1 if rest >= self.world else 0)


# ---------------------------------------------------------------------------- collectives
class Comm:
    """Thin counting wrapper around the ``torch.distributed`` collectives.

    ``bytes_sent``: payload bytes this rank hands to collectives (the input tensor; what
    an all-reduce of the same tensor would carry, and the unit in which DDP's gradient
    all-reduce is counted: its bucket sizes). ``bytes_received``: output payload (all_gather:
    world x input). ``calls``: number of collectives. Per-op counts in ``by_op``."""

    def __init__(self, group=None):
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("torch.distributed is not initialised (call zeroflow.distributed.init_from_env() "
                               "or dist.init_process_group first)")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        self.device = local_device() if dist.get_backend(group) == "nccl" else torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        self.bytes_sent = 0
        self.bytes_received = 0
        self.calls = 0
        self.by_op: dict[str, list[int]] = {}

    def _count(self, op: str, sent: int, received: int) -> None:
        self.bytes_sent += sent
        self.bytes_received += received
        self.calls += 1
        c = self.by_op.setdefault(op, [0, 0])
        c[0] += 1
        c[1] += sent

    def snapshot(self) -> dict:
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received, "calls": self.calls,
                "by_op": {k: {"calls": v[0], "bytes_sent": v[1]} for k, v in self.by_op.items()}}

    @staticmethod
    def _nbytes(t: torch.Tensor) -> int:
        return t.numel() * t.element_size()

    def all_reduce_(self, t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        dev = t.device
        x = t.to(self.device)
        dist.all_reduce(x, op=op, group=self.group)
        if x is not t:
            t.copy_(x.to(dev))
        self._count("all_reduce", self._nbytes(t), self._nbytes(t))
        return t

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """``[world, *t.shape]`` on t's device, rank order."""
        x = t.to(self.device).contiguous()
        outs = [torch.empty_like(x) for _ in range(self.world)]
        dist.all_gather(outs, x, group=self.group)
        self._count("all_gather", self._nbytes(x), self._nbytes(x) * self.world)
        return torch.stack(outs).to(t.device)

    def broadcast_(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """``t`` (in place) from the group's rank ``src``."""
        dev = t.device
        x = t.to(self.device)
        # dist.broadcast names src by its global rank
        dist.broadcast(x, src=src if self.group is None else dist.get_global_rank(self.group, src), group=self.group)
        if x is not t:
            t.copy_(x.to(dev))
        self._count("broadcast", self._nbytes(t) if self.rank == src else 0, self._nbytes(t))
        return t

    def all_gather_bytes(self, data: bytes, size: int) -> list[bytes]:
        """Fixed-size byte strings from every rank."""
        if len(data) != size:
            raise ValueError("all ranks must gather the same number of bytes")
        t = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        g = self.all_gather(t)
        return [bytes(g[r].tolist()) for r in range(self.world)]

    def all_gather_object(self, obj) -> list:
        """Variable-size JSON-able objects (used only to explain a mismatch)."""
        raw = json.dumps(obj, sort_keys=True, default=str).encode()
        n = self.all_gather(torch.tensor([len(raw)], dtype=torch.int64))
        size = int(n.max())
        padded = raw + b"\0" * (size - len(raw))
        parts = self.all_gather_bytes(padded, size)
        return [json.loads(p[: int(n[r])].decode()) for r, p in enumerate(parts)]


# ---------------------------------------------------------------------------- fingerprints
def _zo_of(optimizer):
    """(zo optimizer, hybrid or None) of a ZO optimizer or a HybridFOZO."""
    from zeroflow.optim.hybrid import HybridFOZO
    from zeroflow.optim.zo import _ZOBase

    if isinstance(optimizer, HybridFOZO):
        return optimizer.zo, optimizer
    if isinstance(optimizer, _ZOBase):
        return optimizer, None
    raise TypeError(f"expected a zeroflow ZO optimizer (ZOFusedSGD/ZOFusedAdam) or HybridFOZO, got "
                    f"{type(optimizer).__name__}")


def _jsonable(v):
    """``v`` as a JSON value, exactly: a one-element tensor or a numpy scalar (the optimizers
    accept ``numpy.float32(2e-3)`` and ``torch.tensor(2e-3)`` as options) becomes the Python
    number of the same value and kind (float32 -> float is exact), a tuple a list; a non-finite
    float its repr."""
    if isinstance(v, torch.Tensor):
        v = v.item() if v.numel() == 1 else v.tolist()
    elif type(v).__module__ == "numpy":     # numpy scalars and arrays, without importing numpy
        v = v.tolist()                      # Python int / float / bool (or nested lists), exact
        if type(v).__module__ == "numpy":   # numpy.longdouble stays itself
            v = float(v)
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return repr(v)
    return v


def group_options(g: dict, *, with_lr: bool = True) -> dict:
    """A param group's options as JSON-able values (no params)."""
    return {k: _jsonable(v) for k, v in sorted(g.items())
            if k not in ("params", "param_names") and (with_lr or k != "lr")}


def zo_options(zo) -> dict:
    """A ZO optimizer's optimizer-wide options (``global``) and the zfkernels backend it
    resolves to on each kind of device its parameters are on (``resolved_backend``: keyed
    by device type, not index: under NCCL rank r's parameters are on cuda:LOCAL_RANK, and a
    key ``cuda:0`` against ``cuda:1`` refused every multi-GPU setup as a mismatch)."""
    import zfkernels

    devs = sorted({p.device for g in zo.param_groups for p in g["params"]}, key=str)
    return {"global": {"q": zo.q, "estimator": zo.estimator, "conserve": zo.conserve,
                       "sparse_resample": zo.sparse_resample, "backend": zo.backend},
            "resolved_backend": {d.type: zfkernels.resolve_backend(zo.backend, d) for d in devs}}


def param_layout(params: Sequence[torch.Tensor]) -> dict:
    """Shapes and dtypes of ``params``, in order, as JSON-able lists."""
    return {"shapes": [list(p.shape) for p in params],
            "dtypes": [str(p.dtype).replace("torch.", "") for p in params]}


def describe_optimizer(optimizer) -> dict:
    """Everything that must agree across ranks: stream version, class, base seed, step and
    mask-epoch counters, optimizer-wide and per-group options, resolved backend, parameter
    shapes and dtypes (in optimizer order), and the parameters' tensor ids (and the next one
    to give), which pick each parameter's z: an optimizer that had a group dropped and
    another added holds ids [0, 2] where a fresh one holds [0, 1], and the same seed then
    perturbs and updates the second parameter with another z on each rank."""
    from zfkernels.stream import STREAM_VERSION

    zo, hybrid = _zo_of(optimizer)
    desc = {
        "stream": STREAM_VERSION,
        "class": type(zo).__name__,
        "seed": zo.seed,
        "step": zo.step_count,
        "task": zo._task,
        # None: a tensor appended to g["params"] by hand, which the step refuses by name
        "tensor_ids": [zo._tid.get(id(p)) for g in zo.param_groups for p in g["params"]],
        "next_tensor_id": zo._next_tid,
        **zo_options(zo),
        "groups": [dict(group_options(g), **param_layout(g["params"])) for g in zo.param_groups],
    }
    if hybrid is not None:
        desc["hybrid"] = {"switch": hybrid.switch, "steps": hybrid._steps, "fo": type(hybrid.fo).__name__,
                          "fo_groups": [group_options(g) for g in hybrid.fo.param_groups]}
    return desc


def _digest(obj) -> bytes:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).digest()


def param_checksum(params: Sequence[torch.Tensor]) -> bytes:
    """32-byte checksum of the parameters' exact bits. CPU tensors: sha256 of the bytes.
    Other devices: per tensor the int64 sums of the raw bit patterns (all / even / odd
    positions), computed on the device, hashed together (detects any realistic drift without
    copying the parameters to the host)."""
    h = hashlib.sha256()
    for p in params:
        t = p.detach().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        if t.device.type == "cpu":
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            iv = t.reshape(-1).view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])
            s = torch.stack([iv.sum(dtype=torch.int64), iv[0::2].sum(dtype=torch.int64),
                             iv[1::2].sum(dtype=torch.int64)]).cpu()
            h.update(s.numpy().tobytes())
    return h.digest()


def state_checksum(optimizer) -> bytes:
    """32-byte checksum of the optimizer's state (momentum, Adam moments and step, history;
    a hybrid's FO state too), per parameter position and entry name, each tensor as in
    :func:`param_checksum`: ranks with equal counters and options can still hold different
    buffers (a state loaded on one rank only), and then drift apart step by step."""
    zo, hybrid = _zo_of(optimizer)
    h = hashlib.sha256()
    for opt in [zo] + ([hybrid.fo] if hybrid is not None else []):
        for i, p in enumerate(p for g in opt.param_groups for p in g["params"]):
            st = opt.state.get(p, {})
            for k in sorted(st):
                v = st[k]
                h.update(f"{i}.{k}|".encode())
                h.update(param_checksum([v]) if isinstance(v, torch.Tensor) else repr(v).encode())
    return h.digest()


def _diff_keys(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and any(isinstance(x, dict) for x in a):
        out = []
        for i, (x, y) in enumerate(zip(a, b)):
            out += _diff_keys(x, y, f"{prefix}[{i}]")
        return out
    return [] if a == b else [f"{prefix}: {a!r} vs {b!r}"]


# ---------------------------------------------------------------------------- the wrapper
class DataParallelZO:
    """Data-parallel wrapper of a ZO optimizer (``ZOFusedSGD`` / ``ZOFusedAdam``, any
    estimator, conserve) or a :class:`~zeroflow.optim.HybridFOZO`.

    ``step(closure, batch_size=n)``: the closure evaluates this rank's shard (n samples) and
    returns its mean loss; each value the optimizer consumes becomes
    ``sum_r n_r L_r / sum_r n_r`` (the loss of the concatenated batch when the loss is a
    mean). ``batch_size`` omitted (and never set with :meth:`set_batch_size`): plain mean
    over ranks (on every rank or on none; a mix raises). Communication per step: one
    8-byte all_gather of the batch sizes + one all_gather of 8 bytes per consumed scalar
    (2q two_side, q+1 one_side; conserve +2 one_side, +3 two_side, which also evaluates
    L(theta)); forward_grad: one all_gather of its 2 scalars (loss, grad.v) per query. The
    combination is summed in rank order locally, so every rank gets bit-identical scalars
    whatever the collective's reduction order.

    Hybrid FO phase: the gradients (``.grad``, set by the caller's backward, or by the
    closure's: it runs first, as torch.optim runs it) are all-reduced (weighted the same way)
    before the FO step -- that phase costs a full gradient all-reduce per step, as DDP does
    (plus one byte per parameter tensor: a ``.grad`` that no rank has stays None).

    ``check_every=k``: every k steps all-gather checksums of the parameters and of the
    optimizer state (32 bytes each) and raise
    :class:`DistributedMismatchError` if any rank differs. ``broadcast_params=True``: copy
    rank 0's parameters to every rank at construction (otherwise they are only checked).
    The optimizer's other attributes (``param_groups``, ``state_dict``, counters) are
    reachable through the wrapper, so ``zeroflow.optim.train_step`` and a GradScaler work. An
    lr scheduler takes the wrapped optimizer, ``StepLR(dp.optimizer, ...)`` (torch's schedulers
    refuse anything but a ``torch.optim.Optimizer``: "DataParallelZO is not an Optimizer"); it
    sets the lr of the same param groups that the wrapper's steps use."""

    def __init__(self, optimizer, *, group=None, comm: Comm | None = None, check_every: int = 0,
                 broadcast_params: bool = False):
        from zeroflow.optim.zo import counter

        zo = _zo_of(optimizer)[0]
        check_every = counter(check_every, "check_every")   # int('x'); -1 checked every step
        if zo.scalar_hook is not None:
            raise RuntimeError("this optimizer already has a scalar hook (wrapped twice, or being replayed)")
        self.optimizer = optimizer
        self._zo = zo
        self.comm = comm if comm is not None else Comm(group)
        self.rank, self.world = self.comm.rank, self.comm.world
        self.check_every = int(check_every)
        self._n_local: int | None = None
        self._weight = 1.0 / self.world
        self._dp_steps = 0
        self._grads_synced = False      # sync_grads() ran for the coming FO step
        self.verify_same_setup()
        if broadcast_params:
            with torch.no_grad():
                for p in self._params():
                    self.comm.broadcast_(p.data, src=0)
        self.check_params(where="at construction")
        zo.scalar_hook = self._combine
        self.comm.reset()   # setup traffic is not per-step traffic

    # ----- delegation
    def __getattr__(self, name):
        if name in ("optimizer", "_zo"):
            raise AttributeError(name)
        return getattr(self.optimizer, name)

    @property
    def zeroth_order(self) -> bool:
        return bool(getattr(self.optimizer, "zeroth_order", True))

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, sd):
        self.optimizer.load_state_dict(sd)
        self.verify_same_setup()
        self.check_params(where="after load_state_dict")

    def zero_grad(self, set_to_none: bool = True):
        self._grads_synced = False
        if hasattr(self.optimizer, "zero_grad"):
            self.optimizer.zero_grad(set_to_none=set_to_none)

    def detach(self) -> None:
        """Remove the hook (the optimizer goes back to single-process behaviour: step
        ``dp.optimizer`` itself, or wrap it again). The wrapper's own ``step`` and
        ``sync_grads`` refuse to run after it."""
        if self._zo.scalar_hook == self._combine:
            self._zo.scalar_hook = None

    def _require_attached(self, what: str) -> None:
        """A detached wrapper (or one whose hook another took) still exchanged the batch sizes,
        then stepped on this rank's loss alone: every rank applied another update and the
        replicas drifted apart without an error (until a checksum, if any)."""
        if self._zo.scalar_hook != self._combine:
            raise RuntimeError(
                f"DataParallelZO.{what}: this wrapper was detached (dp.detach(), or another hook replaced it), so "
                "it no longer combines the ranks' losses and a step through it would drift the ranks apart. Step "
                "the wrapped optimizer directly (dp.optimizer.step(...), single-process behaviour), or do not "
                "detach (wrap the optimizer again with DataParallelZO for data-parallel steps)")

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self._zo.param_groups for p in g["params"]]

    # ----- checks
    def verify_same_setup(self) -> None:
        """All-gather a digest of :func:`describe_optimizer` and ``check_every`` (it decides
        after which steps a rank joins the checksum exchange); on mismatch gather the
        descriptions and raise naming the fields that differ (on every rank)."""
        desc = dict(describe_optimizer(self.optimizer), check_every=self.check_every)
        digests = self.comm.all_gather_bytes(_digest(desc), 32)
        if len(set(digests)) == 1:
            return
        descs = self.comm.all_gather_object(desc)
        lines = []
        for r in range(1, self.world):
            for d in _diff_keys(descs[0], descs[r]):
                lines.append(f"rank 0 vs rank {r}: {d}")
        raise DistributedMismatchError(
            "data-parallel ZO needs the same seed, options, stream version and parameter shapes on every "
            "rank; they differ:\n  " + "\n  ".join(lines[:20] or ["(descriptions differ)"]))

    def check_params(self, where: str = "") -> None:
        """Raise :class:`DistributedMismatchError` unless every rank's parameters and
        optimizer state are bit-identical (one all-gather of two 32-byte checksums)."""
        sums = self.comm.all_gather_bytes(param_checksum(self._params()) + state_checksum(self.optimizer), 64)
        when = where or f"after step {self._zo.step_count}"
        bad = [r for r in range(self.world) if sums[r][:32] != sums[0][:32]]
        if bad:
            raise DistributedMismatchError(
                f"parameters differ across ranks {when}: rank(s) {bad} "
                "disagree with rank 0 (different initial weights, a non-deterministic backend, or a rank that "
                "ran different steps). Use broadcast_params=True to start from rank 0's weights.")
        bad = [r for r in range(self.world) if sums[r] != sums[0]]
        if bad:
            raise DistributedMismatchError(
                f"optimizer state (momentum, Adam moments, history) differs across ranks {when}: rank(s) {bad} "
                "disagree with rank 0, so their parameters would drift apart at the next steps. Load the same "
                "state_dict on every rank (or none).")

    # ----- step
    def set_batch_size(self, n: int) -> None:
        """This rank's number of samples in the current batch (used for the weighted mean)."""
        from zeroflow.optim.zo import counter

        # int(2.5) counted 2 samples; '4' raised "'<' not supported"
        self._n_local = counter(n, "batch_size (this rank's samples in the step's batch)")

    def abandon_step(self, message: str) -> None:
        """This rank cannot take its part in the coming step (its batch failed to load: an
        unreadable file): instead of leaving the other ranks waiting in the step's first
        collective until the group's timeout (or its own exit breaks it), it joins that
        collective, the exchange of batch sizes, saying so. Every rank, this one included, then
        raises :class:`StepAbandoned` with every abandoning rank's ``message`` (one more
        exchange, on this path only: a step that nobody abandons costs nothing more)."""
        self._require_attached("abandon_step")
        self._begin_step(abandon=str(message))

    def _begin_step(self, abandon: str | None = None) -> None:
        """Every rank's batch size (-1: never set; -2: the rank abandons the step), gathered
        every step, even when no rank weights: a rank that skipped the collective would pair its
        next one (a loss scalar's all_gather) with another rank's batch-size exchange and hang
        or mix numbers. A mix of ranks with and without a batch size raises on every rank,
        before the step; so does a step that some rank abandoned (:meth:`abandon_step`)."""
        n = -2 if abandon is not None else -1 if self._n_local is None else self._n_local
        sizes = self.comm.all_gather(torch.tensor([n], dtype=torch.int64))[:, 0].tolist()
        if -2 in sizes:
            said = self.comm.all_gather_object(abandon)
            raise StepAbandoned({r: said[r] for r, s in enumerate(sizes) if s == -2})
        unset = [r for r, s in enumerate(sizes) if s < 0]
        if len(unset) == self.world:
            self._weight = 1.0 / self.world
            return
        if unset:
            raise DistributedMismatchError(
                f"rank(s) {unset} gave no batch_size while rank(s) "
                f"{[r for r in range(self.world) if r not in unset]} did: pass step(closure, batch_size=n) "
                "(or set_batch_size(n)) on every rank, or on none for a plain mean over ranks")
        total = sum(sizes)
        if total <= 0:
            raise ValueError("every rank reported batch_size=0")
        self._weight = self._n_local / total

    def _combine(self, values: list[float]) -> list[float]:
        w = self._weight
        local = torch.tensor([w * v if w != 0.0 else 0.0 for v in values], dtype=torch.float64)
        g = self.comm.all_gather(local).tolist()
        out = []
        for j in range(len(values)):
            acc = 0.0
            for r in range(self.world):     # fixed rank order: identical bits on every rank
                acc += g[r][j]
            out.append(acc)
        return out

    def step(self, closure: Callable | None = None, batch_size: int | None = None):
        self._require_attached("step")
        if batch_size is not None:
            self.set_batch_size(batch_size)
        # sync_grads() ran: the batch sizes and the gradients are exchanged already (unless a
        # closure, which computes new gradients, is given)
        synced = self._grads_synced and closure is None and not self.zeroth_order
        self._grads_synced = False
        if not synced:
            self._begin_step()
        if self.zeroth_order:
            loss = self.optimizer.step(closure)
        else:
            # torch.optim's closure (it calls backward) runs here, once, as the FO optimizer would
            # run it, so that the gradients it sets are the ones all-reduced
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            if not synced:
                self._allreduce_grads()
            self.optimizer.step()
        self._dp_steps += 1
        if self.check_every and self._dp_steps % self.check_every == 0:
            self.check_params()
        return loss

    def sync_grads(self) -> None:
        """FO phase with a ``torch.amp.GradScaler``: all-reduce the (scaled) gradients now,
        before ``scaler.step(opt)`` looks for inf/nan in them; the ``step`` that follows does not
        all-reduce them again. Without it each rank's scaler checked only its own shard's
        gradients: a rank whose shard overflowed skipped the step (and its collectives) while
        the others stepped, so the replicas drifted apart, their scales differed, and the
        ranks' collectives went out of step (a hang). The reduced gradients are the same on
        every rank, so every rank skips the same steps. :func:`zeroflow.optim.train_step` with a
        scaler calls it. A ``zero_grad`` or a closure given to ``step`` voids it."""
        if self.zeroth_order:
            return
        self._require_attached("sync_grads")
        self._begin_step()
        self._allreduce_grads()
        self._grads_synced = True

    def _allreduce_grads(self) -> None:
        """Hybrid FO phase: weighted all-reduce of the gradients (a full gradient per step).

        First one byte per parameter says which ones hold a ``.grad`` on some rank. A parameter
        without one on every rank (the loss does not reach it, or the closure ran no backward)
        keeps ``.grad = None``, as in one process, where the FO optimizer skips it (no weight
        decay, no momentum or Adam state) and the hybrid warns that a step found no gradient.
        Zeros there made every rank decay it and start its state, and hid that warning. A
        parameter with a gradient on some ranks only gets zeros on the others."""
        params = self._params()
        held = torch.tensor([p.grad is not None for p in params], dtype=torch.uint8)
        self.comm.all_reduce_(held, op=dist.ReduceOp.MAX)
        for p, some in zip(params, held.tolist()):
            if not some:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            p.grad.mul_(self._weight)
            self.comm.all_reduce_(p.grad)
