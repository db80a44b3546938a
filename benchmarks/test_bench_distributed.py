"""Distributed suite (issue 6): communication bytes and step time of data-parallel ZO
(``zeroflow.distributed.DataParallelZO``: scalars only) vs DDP with first-order gradients
(``torch.nn.parallel.DistributedDataParallel`` + SGD: a gradient all-reduce per step), on the
same MLP, for 1 and 2 ranks (gloo on CPU).

The pytest process is rank 0 and is the one timed; for 2 ranks a spawned helper process is
rank 1 and runs exactly as many steps (``benchmark.pedantic`` with fixed rounds). Both ranks
use one torch thread (2-core machine). Bytes are counted in the collectives: DataParallelZO's
``Comm`` wrapper, and a DDP comm hook summing the gradient bucket sizes; both are "payload
bytes handed to the collective per rank per step" (a ring all-reduce moves about
2 (W-1)/W times that over each rank's link). ``extra_info``: ``key``, ``suite``
("distributed"), ``method``, ``world``, ``q``, ``params``, ``comm_bytes_per_step``,
``comm_calls_per_step``, ``global_batch``, ``ddp_ref`` (key of the DDP record of the same
world size).
"""
from __future__ import annotations

import datetime
import multiprocessing as pymp
import os
import sys
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from benchmarks import _common as C

GLOBAL_BATCH = int(os.environ.get("BENCH_DIST_BATCH", "512"))


def _dims():
    return (64, 32, 10) if C.FAST else (784, 512, 10)


def _rounds():
    return 2 if C.FAST else 30


def _make_model():
    torch.manual_seed(0)
    i, h, o = _dims()
    return torch.nn.Sequential(torch.nn.Linear(i, h), torch.nn.ReLU(), torch.nn.Linear(h, h), torch.nn.ReLU(),
                               torch.nn.Linear(h, o))


def _data(rank, world):
    g = torch.Generator().manual_seed(1)
    i, _, o = _dims()
    X = torch.randn(GLOBAL_BATCH, i, generator=g)
    Y = torch.randint(0, o, (GLOBAL_BATCH,), generator=g)
    per = GLOBAL_BATCH // world
    return X[rank * per:(rank + 1) * per], Y[rank * per:(rank + 1) * per]


class _Runner:
    """One rank's training loop for ``method`` in ("zo_sgd", "ddp_fo_sgd")."""

    def __init__(self, method, q, rank, world):
        from zeroflow.distributed import DataParallelZO
        from zeroflow.optim import create

        self.method = method
        self.model = _make_model()
        self.x, self.y = _data(rank, world)
        self.bytes = 0
        self.calls = 0
        if method == "zo_sgd":
            opt = create("zo_sgd", list(self.model.parameters()), lr=1e-3, q=q, seed=0)
            self.opt = DataParallelZO(opt)
        else:
            from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

            self.ddp = torch.nn.parallel.DistributedDataParallel(self.model)

            def hook(state, bucket):
                buf = bucket.buffer()
                self.bytes += buf.numel() * buf.element_size()
                self.calls += 1
                return default_hooks.allreduce_hook(dist.group.WORLD, bucket)

            self.ddp.register_comm_hook(None, hook)
            self.opt = torch.optim.SGD(self.ddp.parameters(), lr=1e-3)

    def step(self):
        if self.method == "zo_sgd":
            self.opt.step(lambda: F.cross_entropy(self.model(self.x), self.y), batch_size=len(self.x))
        else:
            self.opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.ddp(self.x), self.y).backward()
            self.opt.step()

    def comm(self):
        if self.method == "zo_sgd":
            return self.opt.comm.bytes_sent, self.opt.comm.calls
        return self.bytes, self.calls


def _helper(rank, world, init, method, q, n_steps):
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=120))
    r = _Runner(method, q, rank, world)
    for _ in range(n_steps):
        r.step()
    dist.barrier()          # rank 0 has finished its steps too
    # Leave without tearing DDP/gloo down: their destructors can abort ("terminate called
    # without an active exception") after a clean run, which would read as a failed rank.
    sys.stdout.flush()
    os._exit(0)


def _cases():
    out = []
    for world in (1, 2):
        for q in (1, 4):
            out.append(("zo_sgd", q, world))
        out.append(("ddp_fo_sgd", 0, world))
    return out


@pytest.mark.parametrize("method,q,world", _cases(), ids=lambda v: str(v))
def test_distributed_step(run_bench, method, q, world):
    if C.ON_GPU:
        pytest.skip("the distributed suite runs on CPU (gloo)")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    rounds, warm = _rounds(), 2
    threads = torch.get_num_threads()
    tmp = tempfile.mkdtemp(prefix="zf-bench-dist-")
    init = os.path.join(tmp, "pg")
    helper = None
    torch.set_num_threads(1)
    try:
        if world > 1:
            ctx = pymp.get_context("spawn")
            helper = ctx.Process(target=_helper, args=(1, world, init, method, q, rounds + warm + 1), daemon=True)
            helper.start()
        dist.init_process_group("gloo", init_method=f"file://{init}", rank=0, world_size=world,
                                timeout=datetime.timedelta(seconds=120))
        r = _Runner(method, q, 0, world)
        r.step()                                   # lazy state / DDP bucket rebuild, not counted
        b0, c0 = r.comm()
        for _ in range(warm):
            r.step()
        b1, c1 = r.comm()
        nparams = sum(p.numel() for p in r.model.parameters())
        key = f"distributed/{method}" + (f"/q{q}" if q else "") + f"/w{world}"
        extra = {"suite": "distributed", "key": key, "method": method, "world": world, "q": q, "params": nparams,
                 "global_batch": GLOBAL_BATCH, "comm_bytes_per_step": (b1 - b0) / warm,
                 "comm_calls_per_step": (c1 - c0) / warm, "ddp_ref": f"distributed/ddp_fo_sgd/w{world}",
                 "elements": nparams, "bytes": 0}
        done = [0]

        def step():
            r.step()
            done[0] += 1

        run_bench(step, extra, rounds=rounds, warmup=False)
        if helper is not None:
            if done[0] > rounds:
                raise RuntimeError(f"run_bench ran {done[0]} steps, the rank-1 helper only {rounds}")
            for _ in range(rounds - done[0]):       # let the helper finish its fixed step count
                r.step()
            dist.barrier()
            helper.join(timeout=120)
            assert helper.exitcode == 0, f"rank 1 helper failed (exit code {helper.exitcode})"
        if method == "zo_sgd":
            # scalars only: 2q losses + the batch-size all_gather, whatever the model size
            assert extra["comm_bytes_per_step"] == 8 * 2 * q + 8
        else:
            assert extra["comm_bytes_per_step"] >= 4 * nparams
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        if helper is not None and helper.is_alive():
            helper.terminate()
        torch.set_num_threads(threads)
