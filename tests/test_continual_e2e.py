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


class _RunsCodeWhenUnpickled:
    """A pickle that creates ``path`` when loaded by a full unpickler."""
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_run_checkpoint_with_foreign_objects_is_refused_unexecuted(tmp_path):
    """--resume read checkpoint.pt with weights_only=False: a checkpoint that came from
    somewhere else ran whatever code its pickle named. It holds tensors and plain data only,
    so it is read with weights_only=True, and a file needing more is refused by name."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import load_checkpoint, run
    cfg = resolve(dict(FAST, method="aper", optimizer="fo_sgd"))
    run(cfg, str(tmp_path / "r"), progress=False, stop_after=1, log=lambda *a: None)
    ck_path = tmp_path / "r" / "checkpoint.pt"
    ck = torch.load(ck_path, weights_only=True)          # what zeroflow writes loads as weights
    ck["task_stats"].append(_RunsCodeWhenUnpickled(str(tmp_path / "ran")))
    torch.save(ck, ck_path)
    # the pickle names open by its __module__: io.open up to Python 3.11, _io.open from 3.12
    with pytest.raises(ZeroflowError, match=r"holds objects other than tensors and plain data \(it names _?io\.open\)"):
        run({}, str(tmp_path / "r"), resume=True, progress=False, log=lambda *a: None)
    with pytest.raises(ZeroflowError, match="not written by zeroflow run"):
        load_checkpoint(str(ck_path))
    assert not (tmp_path / "ran").exists()
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


# ---------------------------------------------------------------- unit-level pins (mutation audit)
# Each test below calls one piece of the runner / learners directly with small fakes, and
# fails on a plausible wrong implementation that the end-to-end runs above let through.
def test_cosine_lr_decays_over_the_epochs_without_reaching_zero():
    """docs/continual.md: "cosine decay over the epochs of a task": epoch e of E gets
    0.5 * lr * (1 + cos(pi * e / E)); a denominator of E - 1 gave the last epoch lr 0 (it
    trained nothing)."""
    import math

    from zeroflow.continual.learners import cosine_lr
    got = [cosine_lr(1.0, e, 4, "cosine") for e in range(4)]
    assert got == pytest.approx([0.5 * (1 + math.cos(math.pi * e / 4)) for e in range(4)])
    assert got[-1] == pytest.approx(0.1464466, abs=1e-6) and got[0] == 1.0
    assert cosine_lr(1.0, 3, 4, "constant") == 1.0 and cosine_lr(0.3, 0, 1, "cosine") == 0.3


@pytest.mark.parametrize("name", ["zo_sgd", "fo_sgd", "forward_grad", "zo_adam", "fo_adam"])
def test_the_run_configuration_reaches_the_optimizer(name):
    """momentum (SGD family) and weight_decay (every optimizer) of the configuration are the
    optimizer's (docs/continual.md: SGD momentum 0.9; weight decay 5e-4 for EASE/APER);
    dropping either in make_optimizer trained with 0 and the runs still learned."""
    from zeroflow.continual.learners import make_optimizer
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer({"optimizer": name, "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
                         list(model.parameters()), model, seed=0)
    g = opt.param_groups[0]
    assert g["lr"] == 0.1 and g["weight_decay"] == 5e-4
    if "sgd" in name or name == "forward_grad":
        assert g["momentum"] == 0.9


def test_the_runs_zo_options_reach_the_optimizer():
    """--zo-eps, --q, --perturbation and --sparsity are the ZO optimizer's (docs/continual.md);
    a key dropped from make_optimizer's list stepped at the optimizer's default silently."""
    from zeroflow.continual.learners import make_optimizer
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer({"optimizer": "zo_sgd", "lr": 0.1, "zo_eps": 3e-3, "q": 2, "perturbation": "rademacher",
                          "sparsity": 0.25}, list(model.parameters()), model, seed=0)
    g = opt.param_groups[0]
    assert (g["zo_eps"], opt.q, g["perturbation"], g["sparsity"]) == (3e-3, 2, "rademacher", 0.25)


@pytest.mark.parametrize("given, used", [(None, "auto"), ("", "auto"), ("auto", "auto"), ("torch", "torch")])
def test_the_runs_backend_reaches_the_optimizer_unset_as_auto(given, used):
    """--backend (a config file's backend: null or "", which check_backend takes as auto) is the
    ZO optimizer's; an empty one handed on was refused by the optimizer ('backend='' must be one
    of ...') after the run had claimed its folder."""
    from zeroflow.continual.learners import make_optimizer
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer({"optimizer": "zo_sgd", "lr": 0.1, "backend": given}, list(model.parameters()), model, seed=0)
    assert opt.backend == used


def test_a_task_steps_at_each_epochs_cosine_lr_and_reports_the_mean_loss_of_its_first_and_last_tenth():
    """docs/continual.md: the lr follows a cosine decay over a task's epochs (cosine_lr of the
    epoch, set on every group at its start); loss_first / loss_last are the mean training loss
    over the first / last tenth of the steps (at least one step), recomputed here from the
    logits each step saw."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from zeroflow.continual.learners import Counters, _train_loop, cosine_lr, make_optimizer
    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.logits = torch.nn.Linear(4, 3), []

        def forward(self, x):
            out = self.lin(x)
            self.logits.append(out.detach().clone())
            return out

    net = Net()
    params = list(net.parameters())
    cfg = {"optimizer": "fo_sgd", "lr": 0.5, "epochs": 3, "schedule": "cosine"}
    opt = make_optimizer(cfg, params, net, seed=0)
    lrs = []
    opt.register_step_pre_hook(lambda o, a, k: lrs.append(o.param_groups[0]["lr"]))
    ys = torch.randint(0, 3, (28,))
    ds = torch.utils.data.TensorDataset(torch.randn(28, 4), ys)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)            # 14 steps an epoch, 42 in all
    info = _train_loop(net, net, params, opt, loader, cfg, 0, torch.device("cpu"), Counters(),
                       SimpleNamespace(now=lambda: 0.0), "task 1/1", False)
    assert info["steps"] == 42 and len(net.logits) == 42
    assert lrs == [cosine_lr(0.5, e, 3, "cosine") for e in range(3) for _ in range(14)]
    assert len(set(lrs)) == 3
    batch_ys = [ys[i:i + 2] for i in range(0, 28, 2)] * 3
    losses = [float(F.cross_entropy(z, y)) for z, y in zip(net.logits, batch_ys)]
    k = 42 // 10
    assert info["loss_first"] == pytest.approx(sum(losses[:k]) / k, rel=1e-6)
    assert info["loss_last"] == pytest.approx(sum(losses[-k:]) / k, rel=1e-6)


class _ModeNet(torch.nn.Module):
    """Records, at every forward, whether it (and its dropout) was in train mode."""

    def __init__(self):
        super().__init__()
        self.lin, self.drop, self.modes = torch.nn.Linear(4, 2), torch.nn.Dropout(0.5), []

    def forward(self, x):
        self.modes.append((self.training, self.drop.training))
        return self.lin(self.drop(x))


@pytest.mark.parametrize("name,train_mode", [("zo_sgd", False), ("zo_adam", False), ("fo_sgd", True)])
def test_zo_steps_run_in_eval_mode_and_fo_steps_in_train_mode(name, train_mode):
    """docs/continual.md "Train / eval mode under zeroth-order optimizers": ZO steps run the
    learner in eval() mode (adapter dropout off: the +eps and -eps passes would see different
    dropout masks), first-order steps in train() mode. A loop calling net.train(True) for
    every step ran ZO with dropout on; the trained adapters still moved."""
    from types import SimpleNamespace

    from zeroflow.continual.learners import Counters, _train_loop, make_optimizer
    torch.manual_seed(0)
    net = _ModeNet()
    params = list(net.parameters())
    cfg = {"optimizer": name, "lr": 0.01, "epochs": 2, "schedule": "cosine"}
    opt = make_optimizer(cfg, params, net, seed=0)
    ds = torch.utils.data.TensorDataset(torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0]))
    loader = torch.utils.data.DataLoader(ds, batch_size=3)
    info = _train_loop(net, net, params, opt, loader, cfg, 0, torch.device("cpu"), Counters(),
                       SimpleNamespace(now=lambda: 0.0), "task 1/1", False)
    assert info["steps"] == 4 and net.modes
    assert set(net.modes) == {(train_mode, train_mode)}
    assert not net.training                     # prototypes and tests follow in eval mode


def test_eval_forward_passes_count_one_backbone_pass_per_adapter_choice():
    """docs/continual.md: eval_forward_passes counts the batch passes for prototypes and tests:
    one per batch and adapter choice (EASE's features run the backbone once per subspace);
    counting one per batch undercounted EASE by the number of subspaces."""
    from zeroflow.continual.learners import Counters, batch_features

    class Net:
        def eval(self):
            pass

        def features(self, x, a):
            return x

    c = Counters()
    loader = [(torch.randn(2, 3), torch.tensor([0, 1])) for _ in range(3)]
    out = list(batch_features(Net(), loader, [None, 0, 1], torch.device("cpu"), c))
    assert len(out) == 3 and out[0][0].shape == (2, 3, 3)
    assert c.eval_forward_passes == 9


class _FakeLearner:
    """Predicts every test image right (its feature is the one-hot of its label)."""

    def __init__(self):
        self.learned, self.seeds, self.torch_seeds = [], [], []
        self.net = self

    def eval(self):
        pass

    def features(self, x, a):
        return x

    def eval_adapters(self):
        return [None]

    def logits(self, f):
        return f[:, 0]

    def learn_task(self, t, classes, data, ctx):
        self.learned.append(t)
        self.seeds.append(ctx.seed)
        self.torch_seeds.append(torch.initial_seed())
        return {}

    def state_dict(self):
        return {"learned": list(self.learned)}

    def load_state_dict(self, sd):
        self.learned = list(sd["learned"])


class _FakeData:
    def __init__(self, tasks):
        self.tasks, self.test_requests = tasks, []

    def loader(self, split, classes, batch_size, num_workers=0, **kw):
        assert split == "test"
        self.test_requests.append(list(classes))
        y = torch.as_tensor(list(classes))
        return [(torch.nn.functional.one_hot(y, 10).float(), y)]


class _FakeMem:
    def __init__(self, peaks):
        self.peaks = list(peaks)

    def reset(self):
        pass

    def peak(self):
        return self.peaks.pop(0)


def _train_tasks_with_fakes(tmp_path, *, peaks=(1, 1, 1), stop_after=None, results=None, seed=7):
    from types import SimpleNamespace

    from zeroflow.continual import metrics as M
    from zeroflow.continual.learners import Counters
    from zeroflow.continual.runner import _Results, _train_tasks
    tmp_path.mkdir(parents=True, exist_ok=True)
    learner, data = _FakeLearner(), _FakeData([[0, 1], [2, 3], [4, 5]])
    results = results or _Results(matrix=M.empty_matrix(3), counters=Counters())
    stopped = _train_tasks(learner, data, {"seed": seed, "eval_batch_size": 8, "num_workers": 0}, results,
                           device=torch.device("cpu"), mem=_FakeMem(peaks), timer=SimpleNamespace(now=lambda: 0.0),
                           run_dir=str(tmp_path), record_dir=None, shard=None, progress=False, stop_after=stop_after,
                           main=True, log=lambda *a: None)
    return stopped, learner, data, results


def test_each_stage_is_tested_on_the_classes_seen_so_far(tmp_path):
    """docs/continual.md: "After stage s the model is tested on the test images of all classes
    seen so far". Testing on every class of the run scored the early stages against classes
    not learned yet (the curve, Avg and the matrix's cells change)."""
    stopped, _, data, results = _train_tasks_with_fakes(tmp_path)
    assert not stopped
    assert data.test_requests == [[0, 1], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    assert results.curve == [100.0, 100.0, 100.0]
    assert results.matrix == [[100.0, 100.0, 100.0], [None, 100.0, 100.0], [None, None, 100.0]]


def test_every_task_is_seeded_from_the_seed_and_the_task(tmp_path):
    """docs/continual.md "Seeds and error bars": every task reseeds torch / numpy / the data
    order / the ZO seed from (seed, task). A task seed from the seed alone gave every task the
    same data order and ZO directions (a resumed run still matched an uninterrupted one)."""
    from zeroflow.continual.runner import task_seed
    _, learner, _, _ = _train_tasks_with_fakes(tmp_path, seed=7)
    assert learner.seeds == [task_seed(7, t) for t in range(3)] == learner.torch_seeds
    assert len(set(learner.seeds)) == 3
    _, other, _, _ = _train_tasks_with_fakes(tmp_path / "b", seed=8)
    assert not set(other.seeds) & set(learner.seeds)


def test_peak_memory_is_the_maximum_over_the_tasks_and_survives_a_resume(tmp_path):
    """docs/continual.md: peak_memory_bytes is the maximum over tasks (CUDA: reset at the start
    of every task, so a later task can peak lower). Keeping the last task's peak, or starting a
    resumed run's peak at 0 instead of the checkpoint's, reported a lower peak than the run had."""
    from zeroflow.continual.runner import _restore_results
    _, learner, _, results = _train_tasks_with_fakes(tmp_path, peaks=(300, 100), stop_after=2)
    assert results.peak == 300 and [ts["peak_memory_bytes"] for ts in results.task_stats] == [300, 100]
    back = _restore_results(str(tmp_path), _FakeLearner(), resume=True, n_tasks=3, log=lambda *a: None,
                            identity=None)
    assert back.completed == 2 and back.peak == 300
    _, _, _, results = _train_tasks_with_fakes(tmp_path, peaks=(50,), results=back)
    assert results.completed == 3 and results.peak == 300


def test_a_resume_refuses_a_checkpoint_of_another_configuration_than_config_json(tmp_path):
    """docs/continual.md --resume: "The run keeps its configuration". A config.json edited by
    hand (or a checkpoint.pt copied from another run) went on under another configuration than
    the finished tasks' (another split: an IndexError mid-run; another lr or epochs: silently,
    with metrics.json naming config.json's for every task). Guards: the checkpoint records the
    configuration and a resume under another is refused, naming the options; where the data,
    device and weights are and the operational options may differ; a checkpoint that records
    none (older zeroflow) is refused when its number of tasks is not the configuration's."""
    import pytest

    from zeroflow.continual import metrics as M
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.errors import ZeroflowError
    from zeroflow.continual.learners import Counters
    from zeroflow.continual.runner import _restore_results, _Results
    cfg = resolve(dict(FAST))
    started = _Results(matrix=M.empty_matrix(3), counters=Counters(), config=cfg)
    _train_tasks_with_fakes(tmp_path, stop_after=1, results=started)

    def resume(config, n_tasks=3):
        return _restore_results(str(tmp_path), _FakeLearner(), resume=True, n_tasks=n_tasks, log=lambda *a: None,
                                identity=None, config=config)

    assert resume(dict(cfg)).completed == 1
    assert resume(dict(cfg, device="cuda:1", data_root="/moved", num_workers=3)).completed == 1
    with pytest.raises(ZeroflowError, match=r"config\.json is not the configuration .*"
                                            r"epochs: 2 in checkpoint\.pt, 7 in config\.json"):
        resume(dict(cfg, epochs=7))
    with pytest.raises(ZeroflowError, match="or move .* away to run it again$"):    # a sweep's --force resumes
        _restore_results(str(tmp_path), _FakeLearner(), resume=True, n_tasks=3, log=lambda *a: None, identity=None,
                         config=dict(cfg, epochs=7), in_sweep=True)
    ck_path = tmp_path / "checkpoint.pt"
    ck = torch.load(ck_path, weights_only=True)
    del ck["config"]                   # as a zeroflow that did not record it wrote it
    torch.save(ck, ck_path)
    assert resume(dict(cfg, epochs=7)).completed == 1      # nothing to compare: as before
    with pytest.raises(ZeroflowError, match="holds a run of 3 tasks, and the configuration in its config.json makes 4"):
        resume(dict(cfg, init_cls=1), n_tasks=4)


def test_a_device_given_with_resume_is_where_the_run_goes_on(tmp_path):
    """docs/continual.md: with --resume only where the run finds its device, data and weights (and
    how it loads its data) may change, and --device is where this process runs; the
    configuration keeps its own device. Returning the saved device ignored --device (unnoticed
    on a CPU-only machine, where the saved 'auto' is the CPU too)."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import atomic_write_json, resumed_config
    cfg = resolve(dict(FAST))
    assert cfg["device"] == "auto"
    out = tmp_path / "r"
    out.mkdir()
    atomic_write_json(str(out / "config.json"), cfg)
    warned = []
    got, where = resumed_config(str(out), {"device": "cuda:1"}, warned.append)
    assert where["device"] == "cuda:1" and got["device"] == "auto" and not warned
    assert resumed_config(str(out), {}, warned.append)[1] == {"device": "auto", "data_root": "data", "checkpoint": None}


def test_download_given_with_resume_is_taken_as_num_workers_is(tmp_path):
    """docs/continual.md (--resume): how the data is loaded may change with a resume,
    --num-workers and --download (runfolder.OPERATIONAL_KEYS). A run resumed with --download
    on a machine without its data fetches it (load_run_data reads the run's ``where``), with
    no warning, and config.json keeps the run's own value. Only --num-workers was checked: a
    resume that took it alone dropped --download without a word."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import atomic_write_json, resumed_config
    cfg = resolve(dict(FAST, download=False))
    out = tmp_path / "r"
    out.mkdir()
    atomic_write_json(str(out / "config.json"), cfg)
    warned = []
    got, where = resumed_config(str(out), {"download": True, "num_workers": 2}, warned.append)
    assert where["download"] is True and where["num_workers"] == 2 and not warned
    assert got["download"] is False and got["num_workers"] == cfg["num_workers"]


def test_num_workers_given_with_resume_loads_the_rest_of_the_run(tmp_path, monkeypatch):
    """num_workers is operational (runfolder.OPERATIONAL_KEYS: it changes no result), so a
    resumed run takes --num-workers from the command line, as it does --device: the loaders
    of the tasks it trains and evaluates use it, and config.json / metrics.json keep the
    run's own. It was ignored with a warning, leaving a resume on a bigger machine at the
    saved worker count. A bad value is refused before anything runs, naming the flag."""
    from zeroflow.continual import data as D
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import run
    cfg = resolve(dict(FAST, method="aper", optimizer="zo_sgd"))
    run(cfg, str(tmp_path / "r"), progress=False, stop_after=4, log=lambda *a: None)
    with pytest.raises(ZeroflowError, match=r"--num-workers must be >= 0 \(got -1\)"):
        run({"num_workers": -1}, str(tmp_path / "r"), resume=True, progress=False, log=lambda *a: None)
    workers, warned, loader = [], [], D.DataLoader

    def counting_loader(*args, **kw):
        workers.append(kw.get("num_workers", 0))
        return loader(*args, **kw)
    monkeypatch.setattr(D, "DataLoader", counting_loader)
    m = run({"num_workers": 1}, str(tmp_path / "r"), resume=True, progress=False, log=lambda *a: None,
            warn=warned.append)
    assert workers and set(workers) == {1} and not warned
    assert m["config"]["num_workers"] == 0
    assert json.loads((tmp_path / "r" / "config.json").read_text())["num_workers"] == 0


def test_run_passes_no_progress_and_prints_fgt(tmp_path, monkeypatch, capsys):
    """zeroflow run --no-progress turns the progress bars off (run(progress=False)), and the
    table it prints ends with Fgt (docs/continual.md, Table 1: Avg / Last / Fgt), not Last twice."""
    from zeroflow.cli import main
    from zeroflow.continual import runner
    seen = []

    def fake_run(cfg, out, **kw):
        seen.append(kw["progress"])
        return {"config": cfg, "avg": 81.25, "last": 62.5, "fgt": 7.75, "forward_passes": 10,
                "peak_memory_bytes": 2**20, "peak_memory_kind": "rss", "seconds": 1.0, "run_dir": out}

    monkeypatch.setattr(runner, "run", fake_run)
    for flag, progress in (["--no-progress"], False), ([], True):
        assert main(["run", "--out", str(tmp_path / "r"), *flag]) == 0
        assert seen[-1] is progress
    assert "| EASE | zo_adam | digits | 81.25 | 62.50 | 7.75 |" in capsys.readouterr().out


@pytest.mark.parametrize("name,hybrid_switch", [("fo_sgd", None), ("fo_adam", None), ("zo_sgd", 100)])
def test_a_first_order_task_leaves_no_gradients_on_the_adapter_it_freezes(name, hybrid_switch):
    """The adapter set a task trains stays in the model, frozen, for the rest of the run: the
    .grad tensors of its last first-order step (a hybrid still in its FO phase too) stayed
    with it, one parameter-sized buffer per finished task in every later task's memory (the
    train_peak_memory_bytes of Table 2 grew with the task index for FO runs only)."""
    from types import SimpleNamespace

    from zeroflow.continual.learners import Counters, _train_loop, make_optimizer
    torch.manual_seed(0)
    net = _ModeNet()
    params = list(net.parameters())
    for p in params:
        p.requires_grad_(True)
    cfg = {"optimizer": name, "lr": 0.01, "epochs": 1, "schedule": "cosine", "hybrid_switch": hybrid_switch}
    opt = make_optimizer(cfg, params, net, seed=0)
    ds = torch.utils.data.TensorDataset(torch.randn(6, 4), torch.tensor([0, 1, 0, 1, 1, 0]))
    info = _train_loop(net, net, params, opt, torch.utils.data.DataLoader(ds, batch_size=3), cfg, 0,
                       torch.device("cpu"), Counters(), SimpleNamespace(now=lambda: 0.0), "task 1/1", False)
    assert info["steps"] == 2 and not opt.zeroth_order
    assert all(p.grad is None and not p.requires_grad for p in params)
