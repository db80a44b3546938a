"""Shared helpers of the benchmark suites: modes, sizes, devices, baselines, memory meters.

Environment:
  BENCH_FAST=1        tiny sizes and few rounds (CI smoke mode: the suites cannot rot)
  BENCH_DEVICE        "cpu" (default) or "cuda" (the GPU subset, used by gpu_check.sh)
  BENCH_BACKENDS      comma list overriding the backends benchmarked (cpu,cuda,triton,torch)
  BENCH_LONG=1        also run the slowest CPU cases (the 86M-list steps that
                      test_bench_optim_step._CPU_86M_DEFAULT leaves out)
  BENCH_PRECISION     forward precision of the end-to-end suite: fp32 (default), tf32, bf16, fp16
"""
from __future__ import annotations

import json
import os
import signal
import threading
import weakref
from dataclasses import dataclass
from typing import Callable

import torch

from zeroflow._atomic import atomic_write_bytes

FAST = os.environ.get("BENCH_FAST", "") not in ("", "0")
LONG = os.environ.get("BENCH_LONG", "") not in ("", "0")
DEVICE = os.environ.get("BENCH_DEVICE", "cpu").strip() or "cpu"
ON_GPU = DEVICE.startswith("cuda")

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DISTS = ("gaussian", "rademacher")

# Skip reasons are reused by the report to say what was not measured.
NO_CUDA = "BENCH_DEVICE=cuda but torch.cuda.is_available() is False"


# Kernel-suite calls per timed round on a GPU (conftest run_bench ``back_to_back``): one call on
# an idle stream counted its host work (33-41 us per zfkernels op, 1.7 us per copy_, measured on
# the CPU) as kernel time, 3-6 % of a 256M fp32 pass and four times that at 64M; back to back it
# overlaps the kernel before it. On the CPU a call is its own work: one. BENCH_BACK_TO_BACK sets it
# (the smoke test runs the GPU's path on the CPU with 2).
KERNEL_BACK_TO_BACK = int(os.environ.get("BENCH_BACK_TO_BACK") or (10 if ON_GPU else 1))


def write_json(path: str, obj) -> None:
    """``obj`` as JSON (indent 1) at ``path``, replacing the last one whole (a kill mid-write
    leaves that one): the scripts that rewrite their JSON after each case use it."""
    atomic_write_bytes(path, json.dumps(obj, indent=1).encode())


class StopSignals:
    """Within it a SIGTERM (``timeout``'s default signal, a device lease's limit) raises
    KeyboardInterrupt as a SIGINT does, so that a script cut off still reports what it measured:
    a SIGTERM ended the process at once, with no report and its buffered stdout lost. ``name``
    is the signal that stopped it, ``exit_status`` the shell's 128 + its number. The previous
    handler is put back on exit; off the main thread (where no handler can be set) it does nothing."""

    def __init__(self):
        self.name, self._old = "SIGINT", None

    @property
    def exit_status(self) -> int:
        return 143 if self.name == "SIGTERM" else 130

    def _on_term(self, signum, frame):
        self.name = "SIGTERM"
        raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
            self._old = None
        return False


def device() -> torch.device:
    return torch.device(DEVICE)


def sync() -> None:
    if ON_GPU:
        torch.cuda.synchronize()


def fmt_numel(n: int) -> str:
    """16777216 -> "16M" (the same labels as the report's tables)."""
    from benchmarks.report import fsize   # report.py is import-light (no torch)

    return fsize(n)


def kernel_sizes() -> list[int]:
    if FAST:
        return [1 << 12]
    if ON_GPU:
        return [1 << 26, 1 << 28]  # 64M, 256M
    return [1 << 20, 1 << 24]  # 1M, 16M


def kernel_backends() -> list[str]:
    """Backends benchmarked on this device. On CPU the Triton backend is the interpreter
    and the torch backend is the slow reference: neither is a performance path, so they are
    only exercised in fast mode (to keep the wiring alive)."""

    env = os.environ.get("BENCH_BACKENDS", "").strip()
    if env:
        return [b.strip() for b in env.split(",") if b.strip()]
    if ON_GPU:
        return ["cuda", "triton"]
    out = ["cpu"]
    if FAST:
        out.append("torch")
        if os.environ.get("TRITON_INTERPRET") == "1":
            out.append("triton")
    return out


def backend_skip_reason(backend: str) -> str | None:
    """None when ``backend`` can run tensors on this benchmark device, else why not."""
    import zfkernels as zk

    if ON_GPU and not torch.cuda.is_available():
        return NO_CUDA
    try:
        zk.resolve_backend(backend, device())
    except Exception as exc:  # noqa: BLE001 - the message is the skip reason
        return f"backend {backend!r} unavailable: {exc}"
    return None


# ---------------------------------------------------------------- parameter lists
def vit_b_shapes() -> list[tuple[int, ...]]:
    """Parameter shapes of timm ``vit_base_patch16_224`` (86.6M parameters, 152 tensors)."""
    d, mlp, depth = 768, 3072, 12
    shapes: list[tuple[int, ...]] = [(1, 1, d), (1, 197, d), (d, 3, 16, 16), (d,)]
    for _ in range(depth):
        shapes += [(d,), (d,), (3 * d, d), (3 * d,), (d, d), (d,), (d,), (d,), (mlp, d), (mlp,), (d, mlp), (d,)]
    shapes += [(d,), (d,), (1000, d), (1000,)]
    return shapes


def ease_shapes() -> list[tuple[int, ...]]:
    """An EASE adapter set: 12 blocks x 4 task adapters, each down 768->16 and up 16->768
    with biases: 1.22M parameters in 192 tensors."""
    d, r = 768, 16
    shapes: list[tuple[int, ...]] = []
    for _ in range(12 * 4):
        shapes += [(r, d), (r,), (d, r), (d,)]
    return shapes


def vit_b_layout_tiny_shapes() -> list[tuple[int, ...]]:
    """The ViT-B list's layout (its 152 tensors, in order) with 1-4 elements a tensor: the
    kernels cost ~nothing, so a step's time is its host work (test_bench_optim_step's
    test_host_*, step_timeline.py's vit_b_tiny layout)."""
    return [(1 + k % 4,) for k in range(len(vit_b_shapes()))]


def tiny_shapes() -> list[tuple[int, ...]]:
    return [(64, 32), (32,), (16, 64), (64,), (8, 8, 4)]


PARAM_SETS = {
    "vit_b_86m": vit_b_shapes,
    "ease_1.2m": ease_shapes,
}


def param_sets() -> dict[str, Callable[[], list[tuple[int, ...]]]]:
    if FAST:
        return {"tiny": tiny_shapes}
    return PARAM_SETS


def make_params(shapes, dtype=torch.float32, dev=None, requires_grad=False) -> list[torch.Tensor]:
    dev = dev or device()
    g = torch.Generator(device=dev).manual_seed(0)
    out = []
    for s in shapes:
        t = torch.randn(s, generator=g, device=dev).mul_(0.02).to(dtype)
        out.append(t.requires_grad_(requires_grad))
    return out


def trivial_closure(params, grad: bool):
    """A trivial closure. Zeroth-order (``grad=False``): one element of the first parameter,
    a real function of the perturbed weights that costs ~nothing, so the step time is the
    optimizer's own cost (forwards excluded), for zeroflow and MeZO alike. First-order
    (``grad=True``): one element of *every* parameter, so that backward still writes a
    full-size gradient for each tensor, as a real backward does (an FO step cannot exclude
    its backward)."""
    probe = [1e-3 * (k % 7 - 3) for k in range(len(params))]
    if not grad:
        first = params[0].reshape(-1)

        def zo_closure():
            return first[0] * probe[0]

        return zo_closure

    def closure():
        with torch.set_grad_enabled(grad):
            loss = params[0].reshape(-1)[0] * probe[0]
            for p, w in zip(params[1:], probe[1:]):
                loss = loss + p.reshape(-1)[0] * w
            return loss

    return closure


def numel_of(tensors) -> int:
    return sum(t.numel() for t in tensors)


# ---------------------------------------------------------------- MeZO-style recipe
def mezo_z(p: torch.Tensor, dist: str) -> torch.Tensor:
    """z as the MeZO reference code draws it (after torch.manual_seed), per tensor."""
    if dist == "gaussian":
        return torch.normal(mean=0.0, std=1.0, size=p.size(), device=p.device, dtype=p.dtype)
    return torch.randint(0, 2, p.size(), device=p.device, dtype=p.dtype).mul_(2).sub_(1)


def mezo_perturb(params, seed: int, scale: float, dist: str) -> None:
    """MeZO's ``zo_perturb_parameters``: manual_seed, then per tensor draw z and add_."""
    torch.manual_seed(seed)
    for p in params:
        p.data.add_(mezo_z(p, dist), alpha=scale)


# ---------------------------------------------------------------- memory meters
def _storage_ptr(t: torch.Tensor):
    try:
        return t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - no real storage (meta, sparse, functorch wrappers)
        return None


class AllocCounter:
    """Peak bytes of the tensor storages created while active (a TorchDispatchMode):
    every op output whose storage is new counts until the storage is freed.

    Scratch memory that a compiled kernel allocates internally (below the dispatcher) is
    not seen; the ZO kernels allocate none by design (docs/kernel-ops.md), and the RSS
    high-water meter below is the cross-check."""

    def __init__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        meter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                flat_in = tree_flatten((args, kwargs))[0]
                ins = {_storage_ptr(a) for a in flat_in if isinstance(a, torch.Tensor)}
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        meter._track(t, ins)
                return out

        self._mode = _Mode()
        self.cur = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _free(self, key: int, n: int) -> None:
        if self._live.pop(key, None) is not None:
            self.cur -= n

    def _track(self, t: torch.Tensor, ins: set) -> None:
        try:
            st = t.untyped_storage()
            key, n = st.data_ptr(), st.nbytes()
        except Exception:  # noqa: BLE001 - no real storage (meta, sparse, functorch wrappers)
            return
        if n == 0 or key in ins or key in self._live:
            return
        self._live[key] = n
        self.cur += n
        self.peak = max(self.peak, self.cur)
        weakref.finalize(st, self._free, key, n)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


def _proc_status_kib(field: str) -> int | None:
    """A kB field of /proc/self/status (Linux), e.g. VmHWM (RSS high-water) or VmRSS."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _rss_hwm_kib() -> int | None:
    return _proc_status_kib("VmHWM")


def _rss_kib() -> int | None:
    return _proc_status_kib("VmRSS")


def measure_peak_extra(fn) -> dict:
    """Run ``fn()`` once and return the peak extra memory it needed beyond what was live
    before it: on CUDA ``max_memory_allocated``; on CPU the dispatch-level allocation
    counter plus the process RSS high-water delta (Linux) as a cross-check."""
    import gc

    gc.collect()
    if ON_GPU:
        sync()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
        return {"peak_extra_bytes": int(peak), "mem_method": "cuda.max_memory_allocated",
                "peak_total_bytes": int(torch.cuda.max_memory_allocated())}
    rss_delta = None
    try:  # reset the high-water mark (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib()
    except OSError:
        before = None
    with AllocCounter() as c:
        fn()
    if before is not None:
        hwm = _rss_hwm_kib()
        if hwm is not None:
            rss_delta = max(0, hwm - before) * 1024
    out = {"peak_extra_bytes": int(c.peak), "mem_method": "TorchDispatchMode allocation counter"}
    if rss_delta is not None:
        out["rss_hwm_delta_bytes"] = int(rss_delta)
    return out


@dataclass
class Rounds:
    rounds: int
    warmup_rounds: int = 1
    iterations: int = 1


def rounds_for(seconds_per_call_estimate: float, budget_s: float = 1.5, max_rounds: int = 20) -> Rounds:
    """Rounds for ``benchmark.pedantic`` under a time budget (fast mode: 1 round, no warmup)."""
    if FAST:
        return Rounds(rounds=1, warmup_rounds=0)
    n = int(budget_s / max(seconds_per_call_estimate, 1e-6))
    return Rounds(rounds=max(1, min(max_rounds, n)), warmup_rounds=1 if seconds_per_call_estimate < 2 else 0)


def bytes_of(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def key(*parts) -> str:
    """Stable identifier of a measurement (extra_info['key']); baselines refer to it."""
    return "|".join(str(p) for p in parts)
