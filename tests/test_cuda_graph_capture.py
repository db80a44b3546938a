"""The CUDA kernels under CUDA-graph capture (torch.cuda.graph): the launch-table cache of
csrc/table_cache.h on the device. Needs a GPU and the CUDA extension; skipped elsewhere. The
cache's logic (held tables, pinning, no allocation under capture) is checked without a GPU by
tests/cpp/test_table_cache.cpp (tests/test_cpp_ctest.py); these check that the CUDA policy
reads the capture state of the real stream and that a captured graph keeps its tables.

- A call whose table is not on the device yet, made during a capture, raises the warm-up
  message (it used to fail inside cudaMalloc / cudaStreamSynchronize with a CUDA error that
  also invalidated the capture), writing nothing.
- After torch's warm-up the captured graph replays bit for bit like eager calls of the CPU
  kernel.
- A call with more than 16 query seeds is refused during a capture (they go through a host
  buffer freed after the call, which a replay would read), writing nothing.
- A table baked into a graph is never evicted: after more layouts than the cache holds
  (1024) went through it, the graph still reads its own table (it used to be freed and its
  address handed to another layout's table, so the replay perturbed with that one's ids)."""
from __future__ import annotations

import pytest
import torch

import zfkernels

GPU = torch.cuda.is_available() and "cuda" in zfkernels.available_backends("cuda")
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not GPU, reason="needs a GPU and the CUDA extension (zfkernels._C_cuda)")]

CAPACITY = 1024  # csrc/table_cache.h: TableCache::kDefaultCapacity
SEED, SCALE = 1234, 0.25


def _perturb(x: torch.Tensor, tid: int, backend: str) -> None:
    zfkernels.perturb_([x], SEED, SCALE, "rademacher", tensor_ids=[tid], backend=backend)


def _fresh(n: int = 4096, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def _warm_up(x: torch.Tensor, tid: int) -> None:
    """torch's documented warm-up before a capture: the step once on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        _perturb(x, tid, "cuda")
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()


def test_capture_without_warm_up_raises_the_warm_up_message():
    x = _fresh().cuda()
    before = x.clone()
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="Run the step once before capturing"):
        with torch.cuda.graph(g):
            _perturb(x, 777_001, "cuda")  # an id no other test uses: a layout not cached yet
    torch.cuda.synchronize()
    assert torch.equal(x, before)
    _perturb(x, 777_001, "cuda")  # the device and the cache still work
    ref = before.cpu()
    _perturb(ref, 777_001, "cpu")
    assert torch.equal(x.cpu(), ref)


def _captured(x: torch.Tensor, tid: int) -> torch.cuda.CUDAGraph:
    _warm_up(x, tid)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        _perturb(x, tid, "cuda")
    return g


def test_captured_graph_replays_like_eager_calls():
    ref = _fresh(seed=1)
    x = ref.cuda()
    g = _captured(x, 777_002)
    _perturb(ref, 777_002, "cpu")  # the warm-up
    for _ in range(3):
        g.replay()
        _perturb(ref, 777_002, "cpu")
    torch.cuda.synchronize()
    assert torch.equal(x.cpu(), ref)


def test_a_graphs_table_survives_more_layouts_than_the_cache_holds():
    ref = _fresh(seed=2)
    x = ref.cuda()
    g = _captured(x, 777_003)
    _perturb(ref, 777_003, "cpu")
    y = torch.zeros(4096, device="cuda")  # tables of the same size as x's: its address is reused if freed
    for k in range(CAPACITY + 64):
        _perturb(y, 900_000 + k, "cuda")
    torch.cuda.synchronize()
    g.replay()
    _perturb(ref, 777_003, "cpu")
    torch.cuda.synchronize()
    assert torch.equal(x.cpu(), ref)


def test_capture_of_a_call_with_more_than_16_queries_is_refused():
    """q > 16 (kInlineQ) stages the seeds in pinned host memory freed after the call: a graph
    would replay the copy from the freed buffer. Refused during the capture, nothing written;
    the same call runs eagerly."""
    q = 17
    seeds, coeffs = list(range(1, q + 1)), [1e-3] * q
    x = _fresh(seed=3).cuda()
    before = x.clone()
    s = torch.cuda.Stream()              # warm-up: the layout's table is cached, only q is left to refuse
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        zfkernels.zo_sgd_update_([x], seeds, coeffs, lr=0.0, dist="rademacher", tensor_ids=[777_004], backend="cuda")
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    assert torch.equal(x, before)        # lr 0: the warm-up moved nothing
    g = torch.cuda.CUDAGraph()
    with pytest.raises(RuntimeError, match="capture calls with q <= 16"):
        with torch.cuda.graph(g):
            zfkernels.zo_sgd_update_([x], seeds, coeffs, lr=0.1, dist="rademacher", tensor_ids=[777_004],
                                     backend="cuda")
    torch.cuda.synchronize()
    assert torch.equal(x, before)
    zfkernels.zo_sgd_update_([x], seeds, coeffs, lr=0.1, dist="rademacher", tensor_ids=[777_004], backend="cuda")
    ref = before.cpu()
    zfkernels.zo_sgd_update_([ref], seeds, coeffs, lr=0.1, dist="rademacher", tensor_ids=[777_004], backend="cpu")
    assert torch.equal(x.cpu(), ref)
