"""``--baseline untrained``: the run's protocol once more with untrained adapters.

On the embedded digits data most of the accuracy comes from the prototype classifiers on the
pretrained features: untrained adapters (``--epochs 0``) score about as well as trained ones,
so Avg / Last alone cannot tell whether an optimizer did anything. The baseline runs the same
tasks, class order, prototypes, complement and tests with every adapter left at its
initialisation, and the run reports what training added: ``avg_gain`` = Avg - Avg(untrained),
``last_gain`` = Last - Last(untrained) (percentage points).

It runs after the trained tasks, on the same frozen backbone (shared, not copied) with adapter
sets, counters and random state of its own, so the trained run's numbers, checkpoints and
trajectory logs are exactly those of a run without it. Nothing of it is checkpointed: a resumed
run computes it at its end.
"""
from __future__ import annotations

import time
from typing import Dict

import torch


def untrained_config(cfg: Dict) -> Dict:
    """``cfg`` with no training step anywhere (and nothing recorded)."""
    out = dict(cfg, epochs=0, record=False)
    if out.get("ease_later_epochs") is not None:
        out["ease_later_epochs"] = 0
    return out


def untrained_baseline(cfg: Dict, net, data, device: torch.device) -> Dict:
    """Avg / Last / Fgt, the accuracy curve and matrix of ``cfg``'s protocol with untrained
    adapters on ``net``'s backbone, and the seconds it took."""
    from . import metrics as M
    from .backbones import AdaptedViT
    from .learners import Counters
    from .runner import TaskContext, evaluate, make_learner, task_seed

    t0 = time.perf_counter()
    base_cfg = untrained_config(cfg)
    twin = AdaptedViT(net.vit, net.bottleneck, net.dropout)      # the same frozen backbone, no adapter yet
    twin.precision = net.precision
    counters, timer = Counters(), M.Timer(device)
    T = len(data.tasks)
    matrix, curve = M.empty_matrix(T), []
    eval_bs, nw = int(cfg.get("eval_batch_size", 256)), int(cfg.get("num_workers", 0))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        learner = make_learner(base_cfg, twin, device)
        for t in range(T):
            s = task_seed(int(cfg["seed"]), t)
            torch.manual_seed(s)          # adapter initialisation as in the trained run's task t
            learner.learn_task(t, data.tasks[t], data, TaskContext(s, T, counters, timer, progress=False))
            overall, per_task = evaluate(learner, data, data.tasks[: t + 1], device, counters, eval_bs, nw)
            for g in range(t + 1):
                matrix[g][t] = per_task[g]
            curve.append(overall)
    assert counters.iterations == 0, "the untrained baseline took a training step"
    return {"kind": "untrained", **M.summarize(curve, matrix), "accuracy_curve": curve, "accuracy_matrix": matrix,
            "eval_forward_passes": counters.eval_forward_passes, "seconds": time.perf_counter() - t0}


def gains(metrics: Dict, baseline: Dict) -> Dict:
    """What training added over the baseline, in percentage points."""
    return {"avg_gain": metrics["avg"] - baseline["avg"], "last_gain": metrics["last"] - baseline["last"]}
