"""The published EASE variants as options (issue 12): the OmniBenchmark default follows the
EASE repository's config, and every variant option is checked and acts as in PILOT."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zeroflow.cli import main
from zeroflow.continual.errors import ZeroflowError

TINY = dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=2)


# ---------------------------------------------------------------- the published default
def test_omnibenchmark_ease_default_is_the_published_config():
    """EASE repository exps/ease_omni_in21k.json: lr 0.01, batch 16, alpha 1, use_init_ptm, beta 1,
    moni_adam, adapter_num 1 (recalc_sim and use_reweight true; moni_adam uses the plain fc)."""
    from zeroflow.continual.defaults import defaults_for
    d = defaults_for("omnibenchmark", "ease")
    assert (d["lr"], d["batch_size"], d["ease_alpha"], d["ease_beta"]) == (
        {"sgd": 0.01, "zo_sgd": 1e-4, "adam": 1e-3}, 16, 1.0, 1.0)
    assert (d["ease_use_init_ptm"], d["ease_moni_adam"], d["ease_adapter_num"]) == (True, True, 1)
    assert (d["ease_recalc_sim"], d["ease_use_reweight"], d["weight_decay"], d["epochs"]) == (True, True, 5e-4, 20)
    for ds in ("cifar100", "cub", "imagenet-a", "digits"):     # the per-task variant elsewhere
        d = defaults_for(ds, "ease")
        assert (d["ease_use_init_ptm"], d["ease_moni_adam"], d["ease_adapter_num"], d["ease_beta"]) == \
               (False, False, None, 0.0), ds


# ---------------------------------------------------------------- option checks
@pytest.mark.parametrize("over,needle", [
    (dict(method="aper", ease_moni_adam=True), "--ease-moni-adam is an EASE option; this run is --method aper"),
    (dict(ease_moni_adam=True, ease_adapter_num=1), "--ease-moni-adam needs --ease-use-init-ptm true"),
    (dict(ease_moni_adam=True, ease_use_init_ptm=True), "--ease-moni-adam needs --ease-adapter-num"),
    (dict(ease_later_lr=0.1), "--ease-later-lr only acts on B-N splits (--init-cls != --increment)"),
    # PILOT reads 0 as unset (init_lr / init_epochs); zeroflow used to train nothing after task 0
    (dict(init_cls=4, increment=2, ease_later_lr=0.0), "--ease-later-lr is 0, which PILOT reads as unset"),
    (dict(init_cls=4, increment=2, ease_later_epochs=0), "--ease-later-epochs is 0, which PILOT reads as unset"),
    (dict(ease_adapter_num=0, ease_moni_adam=True, ease_use_init_ptm=True), "--ease-adapter-num must be >= 1"),
    (dict(ease_beta=-1.0), "--ease-beta must be >= 0"),
])
def test_ease_options_are_checked(over, needle):
    from zeroflow.continual.defaults import resolve
    with pytest.raises(ZeroflowError) as e:
        resolve(over)
    assert needle in str(e.value)


def test_ease_boolean_flags_on_the_command_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:          # argparse's own error, one line as zeroflow's, exit 2
        main(["run", "--ease-recalc-sim", "maybe", "--out", str(tmp_path / "r")])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("zeroflow: error: argument --ease-recalc-sim: expected true or false (got "
                                       "'maybe') (see zeroflow run --help)\n")
    assert not (tmp_path / "r").exists()
    from zeroflow.cli import _overrides, build_parser
    a = build_parser().parse_args(["run", "--ease-recalc-sim", "False", "--ease-use-reweight", "true"])
    assert (_overrides(a)["ease_recalc_sim"], _overrides(a)["ease_use_reweight"]) == (False, True)


def test_later_lr_and_epochs_train_the_later_tasks_of_b_n_splits():
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.ease import EASE
    cfg = resolve(dict(init_cls=4, increment=2, ease_later_lr=0.5, ease_later_epochs=3))
    e = EASE(_Net(0), cfg, torch.device("cpu"))
    assert (e.task_cfg(0)["lr"], e.task_cfg(0)["epochs"]) == (cfg["lr"], cfg["epochs"])
    assert (e.task_cfg(1)["lr"], e.task_cfg(1)["epochs"]) == (0.5, 3)


# ---------------------------------------------------------------- variant arithmetic, hand-computed
class _Net:
    def __init__(self, n):
        self.adapters = [None] * n


def _cos(a, b):
    return float(F.cosine_similarity(a, b, dim=0))


def test_ptm_subspace_and_beta_in_the_reweighted_inference():
    from zeroflow.continual.ease import EASE
    e = EASE(_Net(2), {"ease_alpha": 0.1, "ease_use_init_ptm": True, "ease_beta": 0.5}, torch.device("cpu"))
    assert e.eval_adapters() == [None, 0, 1]
    P = torch.randn(3, 3, 4)                   # 3 classes x [PTM, adapter 0, adapter 1] x d
    e.protos, e.task_of_class, e.task_classes = P, [0, 1, 1], [[0], [1, 2]]
    x = torch.randn(1, 3, 4)
    logits = e.logits(x)
    # class 0 (task 0): beta * PTM + own subspace (adapter 0) + alpha / t * adapter 1, t = 1
    exp0 = 0.5 * _cos(x[0, 0], P[0, 0]) + _cos(x[0, 1], P[0, 1]) + 0.1 * _cos(x[0, 2], P[0, 2])
    exp2 = 0.5 * _cos(x[0, 0], P[2, 0]) + 0.1 * _cos(x[0, 1], P[2, 1]) + _cos(x[0, 2], P[2, 2])
    assert logits[0, 0].item() == pytest.approx(exp0, abs=1e-6)
    assert logits[0, 2].item() == pytest.approx(exp2, abs=1e-6)


def test_plain_fc_is_one_cosine_over_the_concatenated_subspaces():
    from zeroflow.continual.ease import EASE
    for cfg in ({"ease_use_reweight": False},
                {"ease_use_reweight": True, "ease_moni_adam": True, "ease_adapter_num": 1, "ease_use_init_ptm": True}):
        e = EASE(_Net(1), cfg, torch.device("cpu"))
        assert not e.use_reweight and "plain cosine fc" in e.describe()
        S = len(e.eval_adapters())
        e.protos, e.task_of_class, e.task_classes = torch.randn(4, S, 5), [0, 0, 1, 1], [[0, 1], [2, 3]]
        x = torch.randn(2, S, 5)
        want = F.normalize(x.flatten(1), dim=-1) @ F.normalize(e.protos.flatten(1), dim=-1).T
        assert torch.allclose(e.logits(x), want, atol=1e-6)


def test_recalc_sim_false_keeps_the_complements_of_earlier_stages():
    """PILOT's solve_similarity fills only the newest subspace, with the current task as the
    reference; solve_sim_reset (recalc_sim) recomputes every later subspace with tasks d..t."""
    from zeroflow.continual.ease import EASE
    torch.manual_seed(0)
    P = torch.randn(3, 3, 4)                    # tasks [0], [1], [2]; subspaces 0, 1, 2
    results = {}
    for recalc in (True, False):
        e = EASE(_Net(3), {"ease_recalc_sim": recalc}, torch.device("cpu"))
        e.protos, e.task_of_class, e.task_classes = P.clone(), [0, 1, 2], [[0], [1], [2]]
        e._complement(2)
        results[recalc] = e.protos
    # the newest subspace of task 0 from task 2 alone: a single reference class -> weight 1
    for recalc in (True, False):
        assert torch.allclose(results[recalc][0, 2], P[2, 2]) and torch.allclose(results[recalc][1, 2], P[2, 2])
    # subspace 1 of task 0: recomputed from tasks 1..2 with recalc_sim, untouched without it
    s = torch.softmax(torch.tensor([_cos(P[0, 0], P[1, 0]), _cos(P[0, 0], P[2, 0])]), 0)
    assert torch.allclose(results[True][0, 1], s[0] * P[1, 1] + s[1] * P[2, 1], atol=1e-6)
    assert torch.equal(results[False][0, 1], P[0, 1])


def test_moni_adam_complements_only_existing_subspaces():
    """adapter_num 2: tasks 0 and 1 train adapters; task 2 adds none. Task 0's classes are
    complemented in adapter 1 only; task 1 and 2 have real prototypes everywhere."""
    from zeroflow.continual.ease import EASE
    e = EASE(_Net(2), {"ease_moni_adam": True, "ease_adapter_num": 2, "ease_use_init_ptm": True},
             torch.device("cpu"))
    assert [e.trains(t) for t in range(4)] == [True, True, False, False]
    torch.manual_seed(1)
    P = torch.randn(3, 3, 4)                    # classes of tasks 0, 1, 2 x [PTM, adapter 0, adapter 1]
    e.protos, e.task_of_class, e.task_classes = P.clone(), [0, 1, 2], [[0], [1], [2]]
    e._complement(2)
    s = torch.softmax(torch.tensor([_cos(P[0, 1], P[1, 1]), _cos(P[0, 1], P[2, 1])]), 0)
    assert torch.allclose(e.protos[0, 2], s[0] * P[1, 2] + s[1] * P[2, 2], atol=1e-6)
    assert torch.equal(e.protos[1:], P[1:]) and torch.equal(e.protos[0, :2], P[0, :2])


def test_reweighting_divides_alpha_by_t_past_the_second_task():
    """docs/continual.md: w_ij = alpha / t for j != i, t the 0-based index of the current task.
    At t = 1 alpha / t is alpha, so only a third task tells them apart: a learner weighting
    the other subspaces by alpha itself scores them twice as much here."""
    from zeroflow.continual.ease import EASE
    e = EASE(_Net(3), {"ease_alpha": 0.1}, torch.device("cpu"))
    torch.manual_seed(0)
    P = torch.randn(3, 3, 4)                    # classes of tasks 0, 1, 2 x subspaces 0, 1, 2
    e.protos, e.task_of_class, e.task_classes = P, [0, 1, 2], [[0], [1], [2]]
    x = torch.randn(1, 3, 4)
    logits = e.logits(x)
    w = 0.1 / 2                                 # t = 2
    for c in range(3):
        exp = sum((1.0 if j == c else w) * _cos(x[0, j], P[c, j]) for j in range(3))
        assert logits[0, c].item() == pytest.approx(exp, abs=1e-6), c


def _pilot_fc(real, sizes, ptm, recalc, D):
    """PILOT's EASE bookkeeping, written from the reference facts (continual-reference.md; PILOT
    ``models/ease.py`` ``replace_fc`` / ``solve_sim_reset`` / ``solve_similarity``): one fc matrix
    [classes, subspaces * D] per stage, class rows by [init_cls, inc, ...] ranges, subspace
    columns [PTM?, adapter 0..t]; a new stage copies the old matrix, writes the new classes' real
    prototypes in every subspace, then complements the old classes."""
    starts = np.cumsum([0] + sizes).tolist()
    W = None
    for t in range(len(sizes)):
        n = t + 1 + ptm
        fc = torch.zeros(starts[t + 1], n * D)
        if W is not None:
            fc[:W.shape[0], :-D] = W
        for c in range(starts[t], starts[t + 1]):
            fc[c] = torch.cat([real[c][j] for j in range(n)])
        for i in range(t):
            old = slice(starts[i], starts[i + 1])
            col_i = slice((i + ptm) * D, (i + ptm + 1) * D)
            for d in (range(i + 1, t + 1) if recalc else [t]):
                ref = slice(starts[d] if recalc else starts[t], starts[t + 1])
                col_d = slice((d + ptm) * D, (d + ptm + 1) * D)
                S = torch.softmax(F.normalize(fc[old, col_i], dim=1) @ F.normalize(fc[ref, col_i], dim=1).T, 1)
                fc[old, col_d] = S @ fc[ref, col_d]
        W = fc
    return W


@pytest.mark.parametrize("ptm", [False, True])
@pytest.mark.parametrize("recalc", [True, False])
def test_complement_and_reweighting_equal_pilots_fc_matrix_on_a_b_n_split(ptm, recalc):
    """The prototypes (real + semantic-guided complement) and the reweighted logits of a B3-Inc2
    run equal PILOT's fc matrix and ``forward_reweight`` (logit of class c of task i = beta * cos
    in the PTM block + cos in block i + alpha / t * cos in every other block), with and without
    the PTM subspace and recalc_sim: task i's rows are found by the task, not by init_cls / inc."""
    from zeroflow.continual.ease import EASE
    torch.manual_seed(3)
    D, sizes, alpha, beta = 5, [3, 2, 2, 2], 0.3, 0.7
    T, C = len(sizes), sum(sizes)
    real = torch.randn(C, T + ptm, D)        # real prototype of every class in every subspace
    e = EASE(_Net(0), {"ease_alpha": alpha, "ease_beta": beta, "ease_use_init_ptm": ptm,
                       "ease_recalc_sim": recalc}, torch.device("cpu"))
    starts = np.cumsum([0] + sizes).tolist()
    for t in range(T):                       # what learn_task does after training task t
        e.net.adapters.append(None)
        classes = list(range(starts[t], starts[t + 1]))
        new = real[classes, :t + 1 + ptm]
        if e.protos is not None:
            e.protos = torch.cat([torch.cat([e.protos, torch.zeros(len(e.protos), 1, D)], 1), new])
        else:
            e.protos = new.clone()
        e.task_of_class += [t] * len(classes)
        e.task_classes.append(classes)
        e._complement(t)
    W = _pilot_fc(real, sizes, ptm, recalc, D)
    assert torch.allclose(e.protos.flatten(1), W)
    x = torch.randn(6, T + ptm, D)
    want = torch.zeros(6, C)
    for c in range(C):
        i = e.task_of_class[c]
        for j in range(T + ptm):
            w = beta if (ptm and j == 0) else 1.0 if j == i + ptm else alpha / (T - 1)
            want[:, c] += w * F.cosine_similarity(x[:, j], W[c, j * D:(j + 1) * D].expand(6, D), dim=1)
    assert torch.allclose(e.logits(x), want, atol=1e-6)


def _learn_tasks_untrained(monkeypatch, cfg, tasks, on_train):
    """EASE.learn_task over ``tasks`` (class lists) on a net of adapters only, its training and
    feature extraction faked: ``on_train(modules, cfg)`` is told what each task trains and with
    which configuration; every class gets two random features. Returns ``(EASE, net)``."""
    from types import SimpleNamespace

    from zeroflow.continual import ease as ease_mod

    def fake_train(net, forward, modules, loader, cfg, **kw):
        on_train(modules, cfg)
        return {"steps": 1, "forward_passes": 2}

    def fake_extract(net, loader, adapters, device, counters):
        labels = torch.as_tensor(loader * 2)              # two images per class
        return torch.randn(len(labels), len(adapters), net.dim), labels

    class Net:
        dim = 4

        def __init__(self):
            self.adapters = []

        def add_adapter_set(self):
            self.adapters.append(torch.nn.Linear(1, 1))
            return self.adapters[-1]

    monkeypatch.setattr(ease_mod, "train_subspace", fake_train)
    monkeypatch.setattr(ease_mod, "extract", fake_extract)
    net = Net()
    e = ease_mod.EASE(net, cfg, torch.device("cpu"))
    data = SimpleNamespace(loader=lambda split, classes, *a, **kw: list(classes))
    ctx = SimpleNamespace(seed=0, shard=None, counters=None, timer=None, n_tasks=len(tasks), progress=False, mem=None,
                          record_stem=lambda t: None)
    for t, classes in enumerate(tasks):
        e.learn_task(t, classes, data, ctx)
    return e, net


def test_later_lr_and_epochs_reach_the_training_of_the_later_tasks(monkeypatch):
    """task_cfg is what the later tasks train with: learn_task must hand it to train_subspace
    (handing it the run's cfg trained every task with --lr / --epochs, and --ease-later-lr /
    --ease-later-epochs did nothing; docs/continual.md, EASE options)."""
    from zeroflow.continual.defaults import resolve
    seen = []
    cfg = resolve(dict(init_cls=4, increment=2, ease_later_lr=0.5, ease_later_epochs=3, num_workers=0))
    assert cfg["lr"] != 0.5 and cfg["epochs"] != 3
    _learn_tasks_untrained(monkeypatch, cfg, ([0, 1, 2, 3], [4, 5], [6, 7]),
                           lambda modules, c: seen.append((c["lr"], c["epochs"])))
    assert seen == [(cfg["lr"], cfg["epochs"]), (0.5, 3), (0.5, 3)]


# ---------------------------------------------------------------- the OmniBenchmark variant end to end
def _omnibenchmark_fixture(root, n_classes=6, per_split=3):
    from PIL import Image
    rng = np.random.RandomState(0)
    for split in ("train", "test"):
        for c in range(n_classes):
            d = os.path.join(root, "omnibenchmark", split, f"c{c:03d}")
            os.makedirs(d)
            for i in range(per_split):
                img = np.clip(rng.normal(40 * c, 20, (36, 36, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(os.path.join(d, f"{i}.png"))


def test_omnibenchmark_variant_on_imagefolder_fixtures(tmp_path, capsys):
    import timm
    import yaml
    from zeroflow.continual.ease import EASE
    from zeroflow.continual.runner import load_checkpoint
    _omnibenchmark_fixture(str(tmp_path / "data"))
    weights = tmp_path / "vit.pth"
    torch.manual_seed(0)
    torch.save(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **TINY).state_dict(), weights)
    cfg_file = tmp_path / "omni.yaml"
    cfg_file.write_text(yaml.safe_dump(dict(
        dataset="omnibenchmark", data_root=str(tmp_path / "data"), checkpoint=str(weights), model_kwargs=TINY,
        img_size=32, adapter_dim=8, init_cls=2, increment=2, epochs=1, batch_size=4, eval_batch_size=8,
        num_workers=0, device="cpu", optimizer="zo_sgd")))
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg_file), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert ("EASE variant: PTM subspace + adapters for the first 1 task(s) only (moni_adam), recalc_sim, plain "
            "cosine fc inference; not acting here: ease_alpha, ease_beta") in printed
    with open(out / "metrics.json") as f:
        m = json.load(f)
    c = m["config"]
    assert (c["ease_moni_adam"], c["ease_adapter_num"], c["ease_use_init_ptm"], c["batch_size"]) == (True, 1, True, 4)
    assert [t["iterations"] > 0 for t in m["tasks"]] == [True, False, False]       # one trained adapter
    learner = load_checkpoint(str(out / "checkpoint.pt"))["learner"]
    assert learner["n_adapters"] == 1
    assert tuple(learner["protos"].shape) == (6, 2, 48)          # [classes, PTM + adapter 0, d]: the PTM subspace
    # the learner of this configuration classifies with the plain fc over [PTM, adapter 0]
    e = EASE(_Net(1), c, torch.device("cpu"))
    assert not e.use_reweight and e.eval_adapters() == [None, 0]
    # the saved configuration round-trips through --config: option for option, and the run folder
    # takes it for the same run (no option named as different)
    from zeroflow.continual.defaults import resolve
    assert resolve({}, str(out / "config.json")) == c
    assert main(["run", "--config", str(out / "config.json"), "--out", str(out)]) == 2
    assert f"{out} already holds a finished run of this configuration" in capsys.readouterr().err


def test_adapter_num_without_moni_adam_leaves_every_task_its_adapter(monkeypatch):
    """PILOT reads adapter_num under moni_adam only. OmniBenchmark's defaults carry
    ease_adapter_num 1; a run there with --ease-moni-adam false is the per-task EASE: every task
    trains an adapter and adds a subspace, the inference is reweighted, and the run's log line
    names ease_adapter_num as not acting. Taking it without moni_adam trained the first task's
    adapter only and classified every later class in the PTM and adapter 0 subspaces."""
    from zeroflow.continual.defaults import resolve
    trained = []
    cfg = resolve(dict(dataset="omnibenchmark", ease_moni_adam=False, init_cls=2, increment=2))
    assert (cfg["ease_adapter_num"], cfg["ease_use_init_ptm"]) == (1, True)
    e, net = _learn_tasks_untrained(monkeypatch, cfg, ([0, 1], [2, 3], [4, 5]),
                                    lambda modules, c: trained.append(sorted(modules)))
    assert trained == [["adapters.0", "head"], ["adapters.1", "head"], ["adapters.2", "head"]]
    assert len(net.adapters) == 3 and e.eval_adapters() == [None, 0, 1, 2]
    assert tuple(e.protos.shape) == (6, 4, 4) and e.use_reweight
    assert e.describe().endswith("reweighted inference (alpha 1); not acting here: ease_adapter_num")


def test_recalc_sim_false_under_moni_adam_keeps_the_complement_of_the_last_adapter_stage():
    """docs/continual.md, ease_recalc_sim false: each stage fills only the newest subspace of
    the old classes and keeps earlier complements. With moni_adam (adapter_num 2) task 1 adds
    the last subspace: stage 1 fills task 0's prototype there (reference: task 1); stage 2 adds
    no subspace and changes nothing (recomputing with the reference tasks 1..2 is recalc_sim)."""
    from zeroflow.continual.ease import EASE
    torch.manual_seed(2)
    P = torch.randn(3, 3, 4)                    # classes of tasks 0, 1, 2 x [PTM, adapter 0, adapter 1]
    cfg = {"ease_moni_adam": True, "ease_adapter_num": 2, "ease_use_init_ptm": True, "ease_recalc_sim": False}
    e = EASE(_Net(2), cfg, torch.device("cpu"))
    e.protos, e.task_of_class, e.task_classes = P[:2].clone(), [0, 1], [[0], [1]]
    e._complement(1)
    assert torch.allclose(e.protos[0, 2], P[1, 2]) and torch.equal(e.protos[1], P[1])   # one reference class
    stage1 = torch.cat([e.protos, P[2:]])
    e.protos, e.task_of_class, e.task_classes = stage1.clone(), [0, 1, 2], [[0], [1], [2]]
    e._complement(2)
    assert torch.equal(e.protos, stage1)
