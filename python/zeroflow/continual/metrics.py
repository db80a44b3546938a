"""Accuracy matrix, Avg / Last / Fgt (percent) and efficiency measurements.

Notation (docs/continual.md): ``A[g][s]`` = top-1 accuracy (%) on the test images of task
``g``'s classes after training stage ``s`` (defined for ``g <= s``, ``None`` above the
diagonal); ``a_s`` = top-1 accuracy (%) on the test images of all classes seen after stage
``s``.

* Avg  = (1/T) * sum_s a_s
* Last = a_{T-1}
* Fgt  = (1/(T-1)) * sum_{g=0}^{T-2} ( max_{s in [g, T-1]} A[g][s] - A[g][T-1] )   (0 if T == 1)

Fgt is PILOT's (``np.mean((np.max(acctable, axis=1) - acctable[:, T-1])[:T-1])``), whose
numbers the ZeroFlow study reports: the best accuracy over every stage, the last included, so
a task that ends at its best counts 0, never negative. (Until 2026-12-01 the max left the last
stage out, Chaudhry et al.'s form, which counts backward transfer as negative forgetting;
``zeroflow report`` recomputes the Fgt of such runs from their accuracy matrix.)

No torch at import: ``zeroflow report`` computes Fgt with this module.
"""
from __future__ import annotations

import contextlib
import resource
import sys
import time
from typing import TYPE_CHECKING, List, Optional, Sequence

if TYPE_CHECKING:
    import torch

Matrix = List[List[Optional[float]]]


def avg_accuracy(curve: Sequence[float]) -> float:
    if not curve:
        raise ValueError("empty accuracy curve")
    return float(sum(curve) / len(curve))


def last_accuracy(curve: Sequence[float]) -> float:
    if not curve:
        raise ValueError("empty accuracy curve")
    return float(curve[-1])


def forgetting(matrix: Matrix) -> float:
    """Mean over old tasks of (best accuracy at any stage since the task was learned, the
    last included - final accuracy): PILOT's Fgt (module docstring)."""
    T = len(matrix)
    if T <= 1:
        return 0.0
    drops = []
    for g in range(T - 1):
        row = [matrix[g][s] for s in range(g, T)]
        if any(v is None for v in row):
            raise ValueError(f"accuracy matrix row {g} is incomplete")
        drops.append(max(row) - row[-1])
    return float(sum(drops) / len(drops))


def empty_matrix(n_tasks: int) -> Matrix:
    return [[None] * n_tasks for _ in range(n_tasks)]


def summarize(curve: Sequence[float], matrix: Matrix) -> dict:
    return {"avg": avg_accuracy(curve), "last": last_accuracy(curve), "fgt": forgetting(matrix)}


def accuracy_from_predictions(pred: torch.Tensor, target: torch.Tensor, tasks: Sequence[Sequence[int]]):
    """Overall accuracy (%) and per-task accuracies (%) for the tasks whose classes appear.

    ``100 * correct / n`` from integer counts, in double: a float32 mean stored 86 of 89 as
    96.6292142868 instead of 96.6292134831 (the matrix, Avg, Last and Fgt carried the error)."""
    import torch

    pred, target = pred.cpu(), target.cpu()
    overall = 100.0 * int((pred == target).sum()) / len(target) if len(target) else 0.0
    per_task = []
    for classes in tasks:
        mask = torch.isin(target, torch.as_tensor(list(classes)))
        n = int(mask.sum())
        per_task.append(100.0 * int((pred[mask] == target[mask]).sum()) / n if n else None)
    return overall, per_task


# ---------------------------------------------------------------- efficiency
def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB, macOS bytes)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(r if sys.platform == "darwin" else r * 1024)


class MemoryMeter:
    """Peak memory of a stage: CUDA ``max_memory_allocated`` on a GPU, else peak RSS
    (process-wide and never reset, so on CPU it is the running peak of the process).
    :meth:`section` measures a part of the stage (the training loop) on its own."""

    def __init__(self, device: torch.device):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self._before = 0      # the stage's peak before the last section reset the CUDA counter

    def reset(self):
        import torch

        self._before = 0
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)

    def _now(self) -> int:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return peak_rss_bytes()

    def peak(self) -> int:
        """The peak since :meth:`reset`, sections included."""
        return max(self._before, self._now())

    @contextlib.contextmanager
    def section(self):
        """Yields a dict whose ``"peak"`` is, after the block, the peak within it (CUDA: the
        counter is reset at its start, and :meth:`peak` still covers what came before; CPU:
        the process's running peak RSS at its end)."""
        import torch

        self._before = self.peak()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        out = {}
        try:
            yield out
        finally:
            out["peak"] = self._now()

    @property
    def kind(self) -> str:
        return "cuda_max_memory_allocated" if self.cuda else "cpu_peak_rss"


class Timer:
    def __init__(self, device: torch.device):
        import torch

        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"

    def now(self) -> float:
        import torch

        if self.cuda:
            # the run's device, not the current one: a single-process run on --device cuda:1
            # never makes cuda:1 current, and synchronize() waited for cuda:0 only (the training
            # time then counted kernel launches, not kernels; and it made a context on GPU 0)
            torch.cuda.synchronize(self.device)
        return time.perf_counter()
