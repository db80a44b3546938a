"""Test configuration and helpers shared by every suite.

The Triton interpreter must be switched on before any ``@triton.jit`` function is
defined, so this happens at import time of conftest, before the test modules load.
Test modules import the helpers (``from conftest import make_mlp``): processes that the
tests spawn import them the same way.
"""
import os
import warnings

os.environ.setdefault("TRITON_INTERPRET", "1")
# A child process (child_env, or any test's dict(os.environ)) must buffer its output as a
# user's does (block-buffered into a pipe or a file): with PYTHONUNBUFFERED=1, as this
# machine and CI set it, a test that kills a child could not see a line it never flushed.
# Python read it at this process's start: removing it here changes children only.
os.environ.pop("PYTHONUNBUFFERED", None)

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_INCLUDE = os.path.join(os.environ.get("CUDA_HOME") or "/usr/local/cuda", "include")


def load_cuda_emulation(build_dir: str) -> None:
    """Builds tests/cuda_emu/cuda_emu.cpp in ``build_dir`` and loads it into this process: the
    CPU kernels of perturb_, zo_sgd_update_ and zo_adam_update_ become the CUDA backend's
    kernels emulated on the CPU, for every test of the "cpu" backend. Only in a child pytest
    (tests/test_cuda_emulation.py sets ZF_EMULATE_CUDA_KERNELS): it replaces kernels for
    the whole process."""
    import zfkernels  # noqa: F401 - zfkernels._C first: the library replaces the kernels it registered
    from torch.utils.cpp_extension import load

    os.makedirs(build_dir, exist_ok=True)
    load(name="zf_cuda_emu", sources=[os.path.join(ROOT, "tests", "cuda_emu", "cuda_emu.cpp")],
         extra_include_paths=[os.path.join(ROOT, "csrc"), CUDA_INCLUDE],
         # the CUDA build's float discipline on the host (setup.py): no contraction, no fast-math
         extra_cflags=["-O2", "-std=c++20", "-ffp-contract=off", "-fno-fast-math"],
         build_directory=build_dir, is_python_module=False)


def triton_package_or_skip():
    """zfkernels.triton, or a skip that says why it does not import. Its import raises where the
    interpreter cannot run the kernels (Triton 3.6 with numpy >= 2.4, the device image's versions,
    under TRITON_INTERPRET=1); for tests of its host-side code, which run no kernel."""
    import zfkernels as zk

    pytest.importorskip("triton")
    zt, why = zk._triton_module()
    if zt is None:
        pytest.skip(why)
    return zt


def backend_params(*, reference_on_cpu: bool) -> list:
    """The (backend, device) pairs present on this machine, as pytest params, each backend on
    its own device: ``cpu`` (compiled), ``cuda`` (compiled) and native Triton with a GPU, else
    Triton in its interpreter on CPU tensors, the reference (``torch``) on the GPU, and on
    the CPU when ``reference_on_cpu`` (test_parity compares every other backend with it)."""
    import zfkernels as zk
    from zfkernels import _compiled

    gpu, interp = torch.cuda.is_available(), os.environ.get("TRITON_INTERPRET") == "1"
    out = [pytest.param(("torch", "cpu"), id="torch-cpu")] if reference_on_cpu else []
    # A backend that should be here but cannot run is a skipped param that says why, not a
    # missing one: the image venv's Triton 3.6 interpreter (numpy >= 2.4) dropped 146 cases
    # from the table without a line in the summary.
    out.append(pytest.param(("cpu", "cpu"), id="cpu", marks=() if _compiled.cpu_available() else pytest.mark.skip(
        reason=f"the compiled CPU kernels do not load: {_compiled._errors.get('cpu')}")))
    if gpu and _compiled.cuda_available():
        out.append(pytest.param(("cuda", "cuda"), id="cuda"))
    if gpu and zk._triton_usable_on("cuda") and not interp:
        out.append(pytest.param(("triton", "cuda"), id="triton-cuda"))
    elif interp:       # TRITON_INTERPRET=0 opts out (a GPU run): then no triton-interp entry
        skip = () if zk._triton_usable_on("cpu") else pytest.mark.skip(reason=zk._triton_module()[1])
        out.append(pytest.param(("triton", "cpu"), id="triton-interp", marks=skip))
    if gpu:
        out.append(pytest.param(("torch", "cuda"), id="torch-cuda"))
    return out


if os.environ.get("ZF_EMULATE_CUDA_KERNELS"):
    load_cuda_emulation(os.environ["ZF_EMULATE_CUDA_KERNELS"])

    def pytest_sessionfinish(session, exitstatus):
        """The number of emulated kernel launches, for the parent test to check."""
        with open(os.environ["ZF_EMULATION_REPORT"], "w") as f:
            f.write(str(torch.ops.zf_cuda_emu.launches()))


if os.environ.get("ZF_CPU_CAPABILITY_REPORT"):
    def pytest_sessionfinish(session, exitstatus):  # a child pytest of test_cpu_capability.py only
        """The CPU capability the session ran, for tests/test_cpu_capability.py to check."""
        import zfkernels

        with open(os.environ["ZF_CPU_CAPABILITY_REPORT"], "w") as f:
            f.write(zfkernels.cpu_capability())


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


def make_mlp(n_in: int, hidden: int, n_out: int, seed: int = 0) -> torch.nn.Sequential:
    """Linear - Tanh - Linear, initialised from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(n_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, n_out))


def gloo_rank_with_shard(rank: int, world: int, init_file: str, split: tuple, timeout_s: int):
    """A spawned test rank's setup: one thread, warnings off, the gloo group joined through
    ``init_file``; returns ``(X, Y, Xr, Yr)``: the :func:`make_data` set of ``sum(split)`` rows
    and this rank's shard of it (``split[rank]`` rows)."""
    import datetime
    import warnings

    import torch.distributed as dist

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    X, Y = make_data(sum(split), 6)
    lo = sum(split[:rank])
    return X, Y, X[lo:lo + split[rank]], Y[lo:lo + split[rank]]


# A multi-rank test's bound on its ranks (tests/test_distributed*.py, test_continual_distributed.py):
# the slowest healthy launch here (the 2-rank digits run of test_continual_distributed.py) took
# 24 s on 2 cores. A rank that stops before a collective (a regression, a mutant) left
# the others waiting in it until gloo's timeout (30 minutes under init_from_env; a mutant once
# held CI 13 minutes): past this bound the ranks are killed and the test fails, saying so.
RANKS_TIMEOUT_S = 300.0


def run_ranks(fn, args: tuple = (), nprocs: int = 2, timeout_s: float = RANKS_TIMEOUT_S) -> None:
    """``fn(rank, *args)`` in ``nprocs`` spawned processes (``torch.multiprocessing.start_processes``),
    joined as ``join=True`` joins them (a rank that raised or exited non-zero fails the caller,
    the others are stopped), but at most ``timeout_s`` seconds: then every rank still running
    is killed and the test fails naming them. Their output (inherited stdout and stderr) is in
    the test's captured output."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.0, deadline - time.monotonic())):
            if time.monotonic() >= deadline:
                break
        else:
            return
    except BaseException:
        _kill_ranks(ctx)
        raise
    stuck = [r for r, p in enumerate(ctx.processes) if p.is_alive()]
    _kill_ranks(ctx)
    pytest.fail(f"rank(s) {stuck} of {nprocs} still running after {timeout_s:g} s (a rank left the others waiting "
                f"in a collective?): killed; their output is in the captured stdout/stderr", pytrace=False)


def _kill_ranks(ctx) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.kill()
    for p in ctx.processes:
        p.join()


def make_data(n: int, n_in: int, n_out: int = 1, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` Gaussian inputs and a smooth target: ``Y = sin(2 X[:, :n_out]) + X[:, n_out]``."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, n_in, generator=g)
    return X, torch.sin(2 * X[:, :n_out]) + X[:, n_out:n_out + 1]


def sparse_sgd_recording(tmp_path):
    """A setup the replay tests record: ``(model, X, Y, opt, base, log)``, a small MLP and its
    data, ZO-SGD with momentum and a per-task sparse mask (lr, options and mask epoch all
    loggable), BASE saved at ``base``, the log's path ``log`` (not started)."""
    from zeroflow.optim import ZOFusedSGD
    from zeroflow.replay import save_base

    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, momentum=0.9, seed=3, backend="cpu", sparsity=0.5,
                     sparse_resample="task")
    base, log = str(tmp_path / "b.pt"), str(tmp_path / "r.zft")
    save_base(base, m)
    return m, X, Y, opt, base, log


def train_steps(opt, closure, n: int) -> None:
    """``n`` steps of ``zeroflow.optim.train_step(opt, closure)``, their RuntimeWarnings
    (skipped steps, zero estimates) silenced."""
    from zeroflow.optim import train_step

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(n):
            train_step(opt, closure)


def differing_entries(a: dict, b: dict) -> list[str]:
    """The state_dict entries that differ (or are missing) between a and b."""
    return [k for k in set(a) | set(b) if k not in a or k not in b or not torch.equal(a[k], b[k])]


def child_env(without: tuple[str, ...] = (), **overrides: str) -> dict[str, str]:
    """The environment of a child Python process that a test runs (a benchmark suite's
    pytest, a compiling census): this one, with the repository on PYTHONPATH, without the
    variables named in ``without`` and without those of an xdist worker (pytest-benchmark
    >= 5 reads PYTEST_XDIST_WORKER and then silently writes no JSON), plus ``overrides``.
    Never PYTHONUNBUFFERED (even if a test set it again): a child's output is buffered as a
    user's is, so a missing flush before a kill shows."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PYTEST_XDIST_") and k not in without and k != "PYTHONUNBUFFERED"}
    env.update(overrides)
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "python"), ROOT, env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def zf_cache(tmp_path_factory):
    """A fresh ZEROFLOW_CACHE (pretrained backbones, datasets) for one test module; the
    caller's value is restored after it."""
    old = os.environ.get("ZEROFLOW_CACHE")
    os.environ["ZEROFLOW_CACHE"] = str(tmp_path_factory.mktemp("zfcache"))
    yield
    if old is None:
        os.environ.pop("ZEROFLOW_CACHE", None)
    else:
        os.environ["ZEROFLOW_CACHE"] = old


def logged_loss_class(log: list):
    """A ``torch.Tensor`` subclass for a closure's loss that appends "read" to ``log`` at each
    read back to the host (``.item()``, ``float()``): the benchmark tests check when the MeZO
    recipes read their losses (once per query, after both forwards)."""

    class Loss(torch.Tensor):
        def item(self):
            log.append("read")
            return super().item()

        def __float__(self):
            log.append("read")
            return super().__float__()

    return Loss
