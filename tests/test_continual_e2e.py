"""EASE and APER end-to-end on the embedded digits (short runs), resume, EASE formulas."""
import csv
import json
import os

import pytest
import torch

from zeroflow.continual.errors import ZeroflowError

# Short but real: the default small-ViT pretraining (built once per module, cached in a tmp
# ZEROFLOW_CACHE), 2 epochs per task instead of 10.
FAST = dict(epochs=2)
CHANCE_AVG = 100 * sum(1 / k for k in (2, 4, 6, 8, 10)) / 5   # 22.8 %: chance level of Avg on B2-Inc2


pytestmark = pytest.mark.usefixtures("zf_cache")   # tests/conftest.py


def _run(out, **kw):
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import run
    cfg = resolve(dict(FAST, **kw))
    return run(cfg, str(out), progress=False, log=lambda *a: None), cfg


@pytest.mark.parametrize("method,optimizer", [("ease", "zo_adam"), ("ease", "fo_sgd"),
                                              ("aper", "zo_sgd"), ("aper", "fo_adam"), ("ease", "forward_grad")])
def test_end_to_end_digits(tmp_path, method, optimizer):
    m, cfg = _run(tmp_path / "r", method=method, optimizer=optimizer)
    assert m["avg"] > 2 * CHANCE_AVG, m["avg"]
    assert m["last"] > 30.0                     # chance on 10 classes: 10 %
    files = set(os.listdir(tmp_path / "r"))
    for f in ("metrics.json", "config.json", "environment.json", "accuracy_matrix.csv",
              "accuracy_per_stage.png", "accuracy_matrix.png", "checkpoint.pt", "backbone.pt"):
        assert f in files, f
    assert not [f for f in files if f.startswith(".tmp-") or ".tmp." in f]   # no temporary file left
    with open(tmp_path / "r" / "metrics.json") as f:
        saved = json.load(f)
    for k in ("avg", "last", "fgt", "accuracy_matrix", "peak_memory_bytes", "forward_passes", "seconds", "config"):
        assert k in saved, k
    assert saved["config"]["optimizer"] == optimizer and saved["config"]["method"] == method
    A = saved["accuracy_matrix"]
    assert len(A) == 5 and all(A[g][s] is None for g in range(5) for s in range(g))
    assert saved["peak_memory_bytes"] > 0 and saved["seconds"] > 0
    # Table 2's memory: the training loops' peak, recorded per task that trains (CPU: RSS so far)
    trained = [t["train_peak_memory_bytes"] for t in saved["tasks"] if t["iterations"]]
    assert trained and all(v > 0 for v in trained)
    assert saved["train_peak_memory_bytes"] == max(trained) <= saved["peak_memory_bytes"]
    steps = sum(t["iterations"] for t in saved["tasks"])
    per_step = 2 if optimizer.startswith("zo_") else 1          # q=1 two-sided SPSA; FO and jvp: 1
    assert saved["forward_passes"] == steps * per_step
    if method == "aper":
        assert [t["iterations"] for t in saved["tasks"]][1:] == [0, 0, 0, 0]   # APER trains stage 0 only
    with open(tmp_path / "r" / "accuracy_matrix.csv") as f:
        rows = list(csv.reader(f))
    # tasks and stages are 1-based as in the plots; the cells are the JSON matrix
    assert rows[0] == ["task"] + [f"after_stage_{s}" for s in range(1, 6)]
    assert [r[0] for r in rows[1:]] == ["1", "2", "3", "4", "5"]
    assert all((c == "") == (v is None) and (v is None or abs(float(c) - v) < 1e-4)
               for r, row in zip(rows[1:], A) for c, v in zip(r[1:], row))
    with open(tmp_path / "r" / "accuracy_per_stage.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_training_changes_adapters_and_zo_dropout_off(tmp_path):
    """ZO training moves the adapters (learning happens) and runs in eval mode."""
    from zeroflow.continual.runner import load_checkpoint
    _run(tmp_path / "r", method="ease", optimizer="zo_sgd")
    ck = load_checkpoint(str(tmp_path / "r" / "checkpoint.pt"))
    ups = [v for k, v in ck["learner"]["adapters"].items() if k.endswith("up.weight")]
    assert ups and all(float(u.abs().sum()) > 0 for u in ups)   # init is exactly zero


def test_resume_gives_identical_metrics(tmp_path):
    full, _ = _run(tmp_path / "full", method="ease", optimizer="zo_adam")
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import run
    cfg = resolve(dict(FAST, method="ease", optimizer="zo_adam"))
    part = run(cfg, str(tmp_path / "part"), progress=False, stop_after=2, log=lambda *a: None)
    assert part == {"stopped_after": 2, "run_dir": str(tmp_path / "part")}
    assert not (tmp_path / "part" / "metrics.json").exists()       # nothing looks finished
    with pytest.raises(ZeroflowError, match="--resume"):
        run(cfg, str(tmp_path / "part"), progress=False, log=lambda *a: None)
    logs = []
    res = run({"device": "auto"}, str(tmp_path / "part"), resume=True, progress=False, log=logs.append)
    assert any("after task 2/5" in s for s in logs)
    for k in ("avg", "last", "fgt", "accuracy_matrix", "accuracy_curve", "forward_passes", "iterations"):
        assert res[k] == full[k], k
    assert [t["iterations"] for t in res["tasks"]] == [t["iterations"] for t in full["tasks"]]
    with pytest.raises(ZeroflowError, match="finished run"):
        run(cfg, str(tmp_path / "part"), progress=False, log=lambda *a: None)


def test_corrupt_run_checkpoint(tmp_path):
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import run
    cfg = resolve(dict(FAST, method="aper", optimizer="fo_sgd"))
    run(cfg, str(tmp_path / "r"), progress=False, stop_after=1, log=lambda *a: None)
    (tmp_path / "r" / "checkpoint.pt").write_bytes(b"truncated")
    with pytest.raises(ZeroflowError, match="corrupt"):
        run({}, str(tmp_path / "r"), resume=True, progress=False, log=lambda *a: None)
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_a_run_gives_the_callers_thread_count_back(tmp_path):
    """run() set torch's thread count to 1 (the small backbone's best) for the rest of the
    process: code after an in-process run (a notebook, the next tests) ran single-threaded,
    also when the run failed."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import run
    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        cfg = resolve(dict(FAST, method="aper", optimizer="fo_sgd"))
        run(cfg, str(tmp_path / "r"), progress=False, stop_after=1, log=lambda *a: None)
        assert torch.get_num_threads() == 3
        (tmp_path / "r" / "checkpoint.pt").write_bytes(b"truncated")
        with pytest.raises(ZeroflowError, match="corrupt"):
            run({}, str(tmp_path / "r"), resume=True, progress=False, log=lambda *a: None)
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------- EASE formulas
class _Net:
    def __init__(self, n):
        self.adapters = [None] * n


def test_ease_complement_and_reweighting_hand_computed():
    from zeroflow.continual.ease import EASE
    e = EASE(_Net(2), {"ease_alpha": 0.1}, torch.device("cpu"))
    d = 2
    # task 0: class 0; task 1: classes 1, 2. Subspace 0 protos for all; subspace 1 only task 1.
    P = torch.zeros(3, 2, d)
    P[0, 0] = torch.tensor([1.0, 0.0])
    P[1, 0] = torch.tensor([1.0, 0.0])     # cos 1 with class 0
    P[2, 0] = torch.tensor([0.0, 1.0])     # cos 0 with class 0
    P[1, 1] = torch.tensor([2.0, 0.0])
    P[2, 1] = torch.tensor([0.0, 4.0])
    e.protos, e.task_of_class, e.task_classes = P, [0, 1, 1], [[0], [1, 2]]
    e._complement(1)
    s = torch.softmax(torch.tensor([1.0, 0.0]), 0)
    assert torch.allclose(e.protos[0, 1], s[0] * P[1, 1] + s[1] * P[2, 1])
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])   # [B=1, T=2, d]
    logits = e.logits(x)

    def cos(a, b):
        return float(torch.nn.functional.cosine_similarity(a, b, dim=0))

    w = 0.1 / 1
    exp0 = cos(x[0, 0], e.protos[0, 0]) + w * cos(x[0, 1], e.protos[0, 1])
    exp2 = w * cos(x[0, 0], e.protos[2, 0]) + cos(x[0, 1], e.protos[2, 1])
    assert logits[0, 0].item() == pytest.approx(exp0, abs=1e-6)
    assert logits[0, 2].item() == pytest.approx(exp2, abs=1e-6)
