"""What a trajectory log promises beyond the bit-exact replay of test_replay.py: the replayed
weights load back as the trained model with tied weights; a log covers one parameter layout
(add_param_group is refused at the next step, the log stays valid); numpy / tensor group
options are logged exactly; a step that failed in its update is recorded and refused by name
at replay; malformed inputs are a ReplayError (CLI exit 2, nothing at --out), not a traceback."""
from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import differing_entries, make_data, make_mlp, sparse_sgd_recording, train_steps
from zeroflow.distributed import _jsonable
from zeroflow.optim import ZOFusedAdam, ZOFusedSGD, create, train_step
from zeroflow.replay import (MAGIC, ReplayError, TrajectoryRecorder, read_log, replay, replay_main,
                             replay_to_file, save_base)

warnings.filterwarnings("ignore", message="zfkernels: the compiled")




# ---------------------------------------------------------------------------- tied weights
class Tied(torch.nn.Module):
    """A decoder tied to the embedding (two state_dict names, one parameter) and an untied layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(7, 6)
        self.mid = torch.nn.Linear(6, 6)
        self.dec = torch.nn.Linear(6, 7, bias=False)
        self.dec.weight = self.emb.weight

    def forward(self, t):
        return self.dec(torch.tanh(self.mid(self.emb(t))))


@pytest.mark.parametrize("how", ["model", "model_base_untied", "names"])
def test_tied_weights_replay_loads_as_the_trained_model(tmp_path, how):
    """Every name of a replayed tensor holds its final value: model.load_state_dict(replayed)
    gives the trained model. The aliases come from the header (model=), or from BASE itself when
    its entries are the same tensor (names=, or a log without them)."""
    m = Tied()
    g = torch.Generator().manual_seed(1)
    t, y = torch.randint(0, 7, (32,), generator=g), torch.randint(0, 7, (32,), generator=g)
    opt = ZOFusedSGD(m.parameters(), lr=0.1, momentum=0.5, seed=5, backend="cpu")
    base, log, out = (str(tmp_path / f) for f in ("base.pt", "run.zft", "w.pt"))
    if how == "model_base_untied":      # a BASE whose two names are separate copies (re-saved, cloned)
        torch.save({"model": {k: v.clone() for k, v in m.state_dict().items()}}, base)
    else:
        save_base(base, m)
    kw = {"names": [n for n, _ in m.named_parameters()]} if how == "names" else {"model": m}
    with TrajectoryRecorder(log, opt, **kw):
        train_steps(opt, lambda: F.cross_entropy(m(t), y), 6)
    trained = {k: v.clone() for k, v in m.state_dict().items()}
    assert not torch.equal(trained["dec.weight"], torch.load(base, weights_only=True)["model"]["dec.weight"])
    if how == "model":
        assert read_log(log)[0]["aliases"] == {"emb.weight": ["dec.weight"]}
    replay_to_file(base, log, out)
    fresh = Tied()
    with torch.no_grad():
        for p in fresh.parameters():
            p.add_(1.0)                 # nothing of the fresh model's own values may survive
    fresh.load_state_dict(torch.load(out, weights_only=True))
    assert differing_entries(fresh.state_dict(), trained) == []
    assert fresh.dec.weight is fresh.emb.weight


def test_tied_alias_of_another_shape_in_base_refused(tmp_path):
    m = Tied()
    opt = ZOFusedSGD(m.parameters(), lr=0.1, seed=5, backend="cpu")
    base, log = str(tmp_path / "base.pt"), str(tmp_path / "run.zft")
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    t = torch.arange(7)
    with TrajectoryRecorder(log, opt, model=m):
        train_steps(opt, lambda: F.cross_entropy(m(t), t), 2)
    sd["dec.weight"] = torch.zeros(3)
    torch.save(sd, base)
    with pytest.raises(ReplayError, match="'dec.weight'.*another name of 'emb.weight'"):
        replay(base, log)


def test_log_without_aliases_still_replays(tmp_path):
    """Logs written before the header had 'aliases' replay as before."""
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, seed=5, backend="cpu")
    base, log, old = (str(tmp_path / f) for f in ("base.pt", "run.zft", "old.zft"))
    save_base(base, m)
    with TrajectoryRecorder(log, opt, model=m):
        train_steps(opt, lambda: F.mse_loss(m(X), Y), 3)
    _edit_header(log, old, lambda h: h.pop("aliases"))
    assert "aliases" not in read_log(old)[0]
    assert differing_entries(replay(base, old), m.state_dict()) == []


# ---------------------------------------------------------------------------- add_param_group
def test_add_param_group_refused_at_the_next_step_log_stays_valid(tmp_path):
    """The continual 'new head' pattern: the step after add_param_group is refused before it
    runs, naming add_param_group; the log is closed at the step before and replays to the
    weights of then; a new log started after adding the group replays the rest."""
    body, head = make_mlp(5, 8, 2, seed=0), torch.nn.Linear(8, 2)
    full = torch.nn.ModuleDict({"body": body, "head": head})
    X, Y = make_data(16, 5, 2)

    def loss():
        return F.mse_loss(body(X) + head(torch.tanh(body[0](X))), Y)

    opt = ZOFusedAdam(body.parameters(), lr=1e-2, seed=3, backend="cpu")
    base, log = str(tmp_path / "t0.base.pt"), str(tmp_path / "t0.zft")
    save_base(base, full)
    with TrajectoryRecorder(log, opt, model=full):
        train_steps(opt, loss, 3)
        opt.add_param_group({"params": list(head.parameters()), "lr": 1e-2})
        before = {k: v.clone() for k, v in full.state_dict().items()}
        with pytest.raises(RuntimeError, match=r"add_param_group.*1 param group\(s\) of \[4\].*2 of \[4, 2\]"
                                               r".*start a new log after adding the group"):
            train_steps(opt, loss, 1)
    assert opt.step_count == 3                          # the refused step did not run
    assert differing_entries(full.state_dict(), before) == []
    assert opt.step_hook is None and not opt._optimizer_step_pre_hooks   # the recorder let go
    header, records = read_log(log)
    assert records[-1][:3] == ("end", 3, 3)
    assert differing_entries(replay(base, log), before) == []
    # what the message says: a new log from now, with the optimizer's state
    base1, log1 = str(tmp_path / "t1.base.pt"), str(tmp_path / "t1.zft")
    save_base(base1, full, opt)
    with TrajectoryRecorder(log1, opt, model=full):
        train_steps(opt, loss, 3)
    assert differing_entries(replay(base1, log1), full.state_dict()) == []


def test_closing_before_add_param_group_is_fine(tmp_path):
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    opt = ZOFusedSGD(list(m[0].parameters()), lr=1e-2, seed=3, backend="cpu")
    base, log = str(tmp_path / "b.pt"), str(tmp_path / "r.zft")
    save_base(base, m)
    rec = TrajectoryRecorder(log, opt, model=m)
    train_steps(opt, lambda: F.mse_loss(m(X), Y), 2)
    rec.close()
    opt.add_param_group({"params": list(m[2].parameters())})
    train_steps(opt, lambda: F.mse_loss(m(X), Y), 1)         # no recorder left behind to refuse it
    assert opt.step_count == 3


def test_a_log_started_after_a_group_was_dropped_replays_with_the_runs_tensor_ids(tmp_path):
    """A group dropped before recording (del opt.param_groups[0]): the kept parameters keep
    their tensor ids (1 here, not their position 0), which pick their z. With no optimizer state
    (ZO-SGD without momentum) BASE holds no state_dict to bring the ids back, and replay rebuilt
    the optimizer with the positions as ids: other z at every step, a checksum mismatch. The
    header holds the ids the run had."""
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    loss = lambda: F.mse_loss(m(X), Y)                           # noqa: E731
    opt = ZOFusedSGD([{"params": list(m[0].parameters())}, {"params": list(m[2].parameters())}], lr=1e-2, seed=3,
                     backend="cpu")
    train_steps(opt, loss, 1)
    del opt.param_groups[0]
    base, log = str(tmp_path / "b.pt"), str(tmp_path / "r.zft")
    save_base(base, m)
    with TrajectoryRecorder(log, opt, model=m):
        train_steps(opt, loss, 3)
    assert differing_entries(replay(base, log), m.state_dict()) == []
    assert read_log(log)[0]["tensor_ids"] == [2, 3]
    _edit_header(log, str(tmp_path / "old.zft"), lambda h: h.pop("tensor_ids"))    # a log of before: positions
    with pytest.raises(ReplayError, match="checksum mismatch"):
        replay(base, str(tmp_path / "old.zft"))


# ---------------------------------------------------------------------------- option types
def test_jsonable_numpy_and_tensor_scalars_exact():
    v = _jsonable(np.float32(2e-3))
    assert type(v) is float and v == float(np.float32(2e-3)) and np.float32(v) == np.float32(2e-3)
    assert _jsonable(np.float64(0.1)) == 0.1 and type(_jsonable(np.int64(3))) is int
    assert _jsonable(np.bool_(True)) is True and _jsonable(torch.tensor(True)) is True
    assert _jsonable(torch.tensor(2e-3)) == float(torch.tensor(2e-3)) and type(_jsonable(torch.tensor(3))) is int
    assert _jsonable((np.float32(0.5), torch.tensor(0.25))) == [0.5, 0.25]
    assert _jsonable(np.array([1.0, np.inf])) == [1.0, "inf"]
    json.dumps([_jsonable(x) for x in (np.float16(1.5), np.longdouble(0.5), np.uint8(7))])


@pytest.mark.parametrize("optimizer", ["zo_sgd", "zo_adam"])
def test_numpy_and_tensor_group_options_are_recorded_and_replay(tmp_path, optimizer):
    """The optimizers take numpy.float32 options; the recorder logs them as the same numbers
    (the step neither raises after it was applied nor goes missing from the log)."""
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    kw = {"momentum": 0.9} if optimizer == "zo_sgd" else {}
    opt = create(optimizer, m.parameters(), lr=1e-2, zo_eps=1e-3, seed=3, backend="cpu", **kw)
    base, log = str(tmp_path / "b.pt"), str(tmp_path / "r.zft")
    save_base(base, m)
    with TrajectoryRecorder(log, opt, model=m):
        train_steps(opt, lambda: F.mse_loss(m(X), Y), 2)
        g = opt.param_groups[0]
        g["zo_eps"] = np.float32(2e-3)
        g["weight_decay"] = torch.tensor(1e-2)
        if optimizer == "zo_sgd":
            g["momentum"] = np.float64(0.8)
        else:
            g["betas"] = (np.float32(0.8), np.float32(0.99))
        train_steps(opt, lambda: F.mse_loss(m(X), Y), 3)
    _, records = read_log(log)
    assert sum(r[0] == "step" for r in records) == 5
    opts = [r[1] for r in records if r[0] == "options"]
    assert opts and opts[-1][0]["zo_eps"] == float(np.float32(2e-3))
    assert differing_entries(replay(base, log), m.state_dict()) == []


# ---------------------------------------------------------------------------- failed steps
def _record_with_a_failed_step(tmp_path, failed_at, steps=6):
    """A run whose step ``failed_at`` is reported to the recorder as failed in its update (the
    optimizer's status for an update that raised after its forward passes)."""
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, momentum=0.9, seed=3, backend="cpu")
    base, log = str(tmp_path / "b.pt"), str(tmp_path / "r.zft")
    save_base(base, m)
    rec = TrajectoryRecorder(log, opt, model=m)
    hook = opt.step_hook
    opt.step_hook = lambda o, info: hook(o, dict(info, status="failed") if info["step"] == failed_at else info)
    with pytest.warns(RuntimeWarning, match=f"step {failed_at} failed in its update.*cannot be replayed"):
        for _ in range(steps):
            train_step(opt, lambda: F.mse_loss(m(X), Y))
    opt.step_hook = hook
    rec.close()
    return base, log


def test_failed_step_recorded_and_refused_by_name(tmp_path, capsys):
    base, log = _record_with_a_failed_step(tmp_path, failed_at=3)
    _, records = read_log(log)
    assert [r[2] for r in records if r[0] == "step"] == [0, 0, 0, 16, 0, 0]
    with pytest.raises(ReplayError, match=r"step 3 failed in its update during the recorded run.*"
                                          r"cannot reproduce; the log is valid up to step 2") as e:
        replay(base, log)
    assert "checksum" not in str(e.value) and "does not belong" not in str(e.value)
    out = str(tmp_path / "w.pt")
    assert replay_main([base, log, "--out", out]) == 2
    assert "step 3 failed in its update" in capsys.readouterr().err
    assert not os.path.exists(out)


def test_failed_first_step(tmp_path):
    base, log = _record_with_a_failed_step(tmp_path, failed_at=0, steps=2)
    with pytest.raises(ReplayError, match="step 0 failed in its update.*log's first step"):
        replay(base, log)


def test_update_that_fails_on_a_bad_state_buffer(tmp_path):
    """The real thing (docs/algorithms.md §7): a state buffer of the wrong shape put in between
    steps makes the update fail after the forward passes; training goes on after it is put back.
    Needs the optimizer to report such a step as status 'failed' (skipped before it does)."""
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    ps = list(m.parameters())
    opt = ZOFusedSGD([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2, momentum=0.9, seed=3, backend="cpu")
    base, log = str(tmp_path / "b.pt"), str(tmp_path / "r.zft")
    save_base(base, m)
    with TrajectoryRecorder(log, opt, model=m), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        train_steps(opt, lambda: F.mse_loss(m(X), Y), 3)
        good = opt.state[ps[2]]["momentum_buffer"]
        opt.state[ps[2]]["momentum_buffer"] = torch.zeros(3)
        with pytest.raises(Exception):
            train_steps(opt, lambda: F.mse_loss(m(X), Y), 1)
        opt.state[ps[2]]["momentum_buffer"] = good
        train_steps(opt, lambda: F.mse_loss(m(X), Y), 2)
    steps = [r for r in read_log(log)[1] if r[0] == "step"]
    assert [r[1] for r in steps] == list(range(6))     # the failed step is in the log
    flags = [r[2] for r in steps]
    if not flags[3] & 16:
        pytest.skip(f"the optimizer reports this step with flags {flags[3]}, not status 'failed'")
    with pytest.raises(ReplayError, match="step 3 failed in its update.*valid up to step 2"):
        replay(base, log)


# ---------------------------------------------------------------------------- malformed inputs
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, seed=3, backend="cpu")
    base, log = str(d / "b.pt"), str(d / "r.zft")
    save_base(base, m)
    with TrajectoryRecorder(log, opt, model=m):
        train_steps(opt, lambda: F.mse_loss(m(X), Y), 3)
    return base, log


def _edit_header(log, out, edit):
    with open(log, "rb") as f:
        data = f.read()
    (n,) = struct.unpack_from("<I", data, 8)
    header = json.loads(data[12:12 + n])
    edit(header)
    h = json.dumps(header, sort_keys=True).encode()
    with open(out, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(h)) + h + struct.pack("<I", zlib.crc32(h)) + data[12 + n + 4:])


def _refused(tmp_path, capsys, base, log, match):
    with pytest.raises(ReplayError, match=match):
        replay(base, log)
    out = str(tmp_path / "w.pt")
    assert replay_main([base, log, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zeroflow replay: error:") and "Traceback" not in err, err
    assert not os.path.exists(out)


@pytest.mark.parametrize("key", ["global", "groups", "seed", "start_step", "start_task", "fresh_state",
                                 "resolved_backend", "base_sha256"])
def test_header_without_a_key_refused(tmp_path, capsys, small_run, key):
    bad = str(tmp_path / "bad.zft")
    _edit_header(small_run[1], bad, lambda h: h.pop(key))
    _refused(tmp_path, capsys, small_run[0], bad, f"malformed log header \\(no '{key}'\\)")


@pytest.mark.parametrize("edit,match", [
    (lambda h: h.update(seed="3"), "'seed' is str"),
    (lambda h: h.update(groups=[]), "no param groups"),
    (lambda h: h["groups"][0].pop("names"), "group 0 has no 'names'"),
    (lambda h: h["groups"][0]["shapes"].pop(), "4 names, 3 shapes"),
    (lambda h: h.update(aliases=["x"]), "'aliases'"),
    (lambda h: h.update(tensor_ids=[0, 1, 1, 2]), "the header's tensor_ids give one id to two parameters"),
    (lambda h: h.update(next_tensor_id=3), "the header's next_tensor_id is 3, not above its tensor ids"),
    # the saved state's rule (check_tensor_ids), which the log's own check lacked: an id outside
    # the stream's [0, 2^32) or a bool passed, and replay failed later, in the ops, without a ReplayError
    (lambda h: h.update(tensor_ids=[0, 1, 2, 2**32], next_tensor_id=2**32 + 1),
     "the header's tensor id is 4294967296; it must be an int >= 0 and below 4294967296"),
    (lambda h: h.update(tensor_ids=[0, 1, 2, True]), "the header's tensor id is True"),
    (lambda h: h["global"].update(q=0), "options are refused by ZOFusedSGD"),
    (lambda h: h["global"].update(bogus=1), "options are refused by ZOFusedSGD"),
])
def test_malformed_header_refused(tmp_path, capsys, small_run, edit, match):
    bad = str(tmp_path / "bad.zft")
    _edit_header(small_run[1], bad, edit)
    _refused(tmp_path, capsys, small_run[0], bad, match)


def test_header_not_an_object_refused(tmp_path, capsys, small_run):
    with open(small_run[1], "rb") as f:
        data = f.read()
    (n,) = struct.unpack_from("<I", data, 8)
    bad = str(tmp_path / "bad.zft")
    for h in (b"[1, 2]", b"\xff{"):
        with open(bad, "wb") as f:
            f.write(MAGIC + struct.pack("<I", len(h)) + h + struct.pack("<I", zlib.crc32(h)) + data[12 + n + 4:])
        _refused(tmp_path, capsys, small_run[0], bad, "corrupt log.*header")


def test_non_tensor_base_entry_refused(tmp_path, capsys, small_run):
    sd = torch.load(small_run[0], weights_only=True)["model"]
    sd["0.weight"] = 3
    base = str(tmp_path / "nontensor.pt")
    torch.save(sd, base)
    _refused(tmp_path, capsys, base, small_run[1], "BASE entry '0.weight' is not a tensor but int")


def test_unknown_step_flags_refused(tmp_path, capsys, small_run):
    """A flag bit this reader does not know (a newer writer's) is refused, not ignored."""
    with open(small_run[1], "rb") as f:
        data = bytearray(f.read())
    (n,) = struct.unpack_from("<I", data, 8)
    first = 12 + n + 4                      # the first record: u32 len, kind, u64 step, u8 flags
    assert data[first + 4] == 1
    data[first + 4 + 9] |= 32
    (m,) = struct.unpack_from("<I", data, first)
    struct.pack_into("<I", data, first + 4 + m, zlib.crc32(bytes(data[first + 4:first + 4 + m])))
    bad = str(tmp_path / "bad.zft")
    with open(bad, "wb") as f:
        f.write(bytes(data))
    _refused(tmp_path, capsys, small_run[0], bad, "corrupt log.*unknown flags 0x20")


# ---------------------------------------------------------------------------- nothing is lost
def _recorded(tmp_path, steps=3, name="r.zft"):
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, momentum=0.9, seed=3, backend="cpu")
    base, log = str(tmp_path / "b.pt"), str(tmp_path / name)
    save_base(base, m)
    with TrajectoryRecorder(log, opt, model=m):
        train_steps(opt, lambda: F.mse_loss(m(X), Y), steps)
    return m, opt, base, log, (lambda: F.mse_loss(m(X), Y))


def test_save_base_over_an_existing_base_is_refused_and_the_finished_log_still_replays(tmp_path):
    """docs/distributed.md §2 "Nothing is overwritten": the recorder refuses an existing log, but
    save_base replaced an existing BASE without a word. A script run again (save_base, then a
    recorder on the same names) replaced the finished log's BASE, then its recorder refused the
    log: the log was kept but replayed no more ("BASE is not the checkpoint the log starts from")."""
    m, opt, base, log, loss = _recorded(tmp_path)
    before = Path(base).read_bytes()
    other = make_mlp(5, 8, 2, seed=9)
    with pytest.raises(FileExistsError, match=r"save_base: .*b\.pt exists.*overwrite=True"):
        save_base(base, other)
    assert Path(base).read_bytes() == before
    assert differing_entries(replay(base, log), m.state_dict()) == []
    save_base(base, other, overwrite=True)
    assert differing_entries(torch.load(base, weights_only=True)["model"], other.state_dict()) == []


def test_a_second_recorder_on_a_log_leaves_it_as_it_was(tmp_path):
    """A recorder opened the file with "wb": a second one on the same name (a resumed script)
    emptied a finished log, and one refused for a non-JSON option emptied it before raising."""
    m, opt, base, log, loss = _recorded(tmp_path)
    before = Path(log).read_bytes()
    with pytest.raises(FileExistsError, match=r"r\.zft exists.*overwrite=True"):
        TrajectoryRecorder(log, opt, model=m)
    opt.param_groups[0]["tag"] = {1, 2}               # not JSON
    with pytest.raises(ValueError, match="cannot be logged as JSON"):
        TrajectoryRecorder(log, opt, model=m, overwrite=True)
    assert Path(log).read_bytes() == before
    assert opt.step_hook is None and not opt._optimizer_step_pre_hooks
    del opt.param_groups[0]["tag"]
    save_base(base, m, opt, overwrite=True)
    with TrajectoryRecorder(log, opt, model=m, overwrite=True):     # what the message offers
        train_steps(opt, loss, 2)
    assert differing_entries(replay(base, log), m.state_dict()) == []


def test_replay_output_never_replaces_base_log_or_a_result(tmp_path, capsys):
    m, opt, base, log, _ = _recorded(tmp_path)
    inputs = {p: Path(p).read_bytes() for p in (base, log)}
    for out in (base, log):
        assert replay_main([base, log, "--out", out, "--overwrite"]) == 2
        assert "give another output path" in capsys.readouterr().err
        with pytest.raises(FileExistsError):
            replay_to_file(base, log, out, overwrite=True)
    assert {p: Path(p).read_bytes() for p in inputs} == inputs
    out = str(tmp_path / "w.pt")
    assert replay_main([base, log, "--out", out]) == 0
    written = Path(out).read_bytes()
    assert replay_main([base, log, "--out", out]) == 2
    assert "exists and is left as it was" in capsys.readouterr().err
    with pytest.raises(FileExistsError, match="overwrite=True"):
        replay_to_file(base, log, out)
    assert Path(out).read_bytes() == written
    assert replay_main([base, log, "--out", out, "--overwrite"]) == 0
    assert differing_entries(torch.load(out, weights_only=True), m.state_dict()) == []


@pytest.mark.parametrize("change", ["scheduler", "weight_decay"])
def test_a_log_started_after_save_base_changed_options_replays(tmp_path, change):
    """save_base(path, model, opt) then a warmup scheduler (it sets lr when built) or a new
    weight_decay: the log's header holds the options the steps ran with, but replay loaded
    BASE's optimizer state over them and failed with a checksum mismatch."""
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    loss = lambda: F.mse_loss(m(X), Y)                           # noqa: E731
    opt = ZOFusedAdam(m.parameters(), lr=1e-3, seed=3, backend="cpu")
    train_steps(opt, loss, 3)                                          # state to carry: Adam moments
    base, log = str(tmp_path / "b.pt"), str(tmp_path / "r.zft")
    save_base(base, m, opt)
    if change == "scheduler":
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 0.1 * (k + 1))
    else:
        opt.param_groups[0]["weight_decay"] = 0.1
    with TrajectoryRecorder(log, opt, model=m):
        for _ in range(4):
            train_steps(opt, loss, 1)
            if change == "scheduler":
                sched.step()
    assert differing_entries(replay(base, log), m.state_dict()) == []


@pytest.mark.parametrize("change", ["lr", "weight_decay", "new_task"])
def test_an_option_set_inside_a_closure_is_logged_for_the_step_it_acts_on(tmp_path, change):
    """A closure that sets lr or another group option, or starts a new mask epoch, changes the
    next step, not the running one (docs/algorithms.md §7: a step uses the options as it found
    them). The recorder read the groups and the mask epoch after the step, so it logged the new
    values for the step that ran with the old ones; replay applied them a step early and failed
    its checksum."""
    m, X, Y, opt, base, log = sparse_sgd_recording(tmp_path)
    with TrajectoryRecorder(log, opt, model=m):
        for i in range(4):
            def closure():
                if i == 1:
                    if change == "new_task":
                        opt.new_task()
                    else:
                        opt.param_groups[0][change] = 0.05
                return F.mse_loss(m(X), Y)
            train_step(opt, closure)
    assert differing_entries(replay(base, log), m.state_dict()) == []


def test_a_rollback_while_recording_is_refused_before_the_step(tmp_path):
    """load_state_dict of an earlier state moved the step counter back: the recorder logged
    the steps after it as if they followed, and replay failed on the first of them."""
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    loss = lambda: F.mse_loss(m(X), Y)                           # noqa: E731
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, momentum=0.9, seed=3, backend="cpu")
    base, log = str(tmp_path / "b.pt"), str(tmp_path / "r.zft")
    save_base(base, m)
    with TrajectoryRecorder(log, opt, model=m):
        train_steps(opt, loss, 2)
        earlier = opt.state_dict()
        train_steps(opt, loss, 2)
        at_four = {k: v.clone() for k, v in m.state_dict().items()}
        opt.load_state_dict(earlier)
        with pytest.raises(RuntimeError, match=r"step 2 refused: .*step counter is 2, the log's next step is 4"):
            train_steps(opt, loss, 1)
    assert differing_entries(m.state_dict(), at_four) == []           # the refused step did not run
    assert read_log(log)[1][-1][:3] == ("end", 4, 4)
    assert differing_entries(replay(base, log), at_four) == []


@pytest.mark.parametrize("option,value", [("q", 2), ("estimator", "one_side"), ("conserve", True)])
def test_an_optimizer_wide_option_changed_while_recording_is_refused(tmp_path, option, value):
    """q / estimator / conserve set on the optimizer mid-log: the log replayed with its header's
    (a scalar-count error at replay, or, without verify, other weights)."""
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    loss = lambda: F.mse_loss(m(X), Y)                           # noqa: E731
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, seed=3, backend="cpu")
    base, log = str(tmp_path / "b.pt"), str(tmp_path / "r.zft")
    save_base(base, m)
    with TrajectoryRecorder(log, opt, model=m):
        train_steps(opt, loss, 2)
        now = {k: v.clone() for k, v in m.state_dict().items()}
        setattr(opt, option, value)
        with pytest.raises(RuntimeError, match=rf"step 2 refused: optimizer-wide options changed.*{option}"):
            train_steps(opt, loss, 1)
    assert differing_entries(m.state_dict(), now) == []
    assert differing_entries(replay(base, log), now) == []


def test_a_log_whose_recorder_was_killed_replays_its_completetrain_steps(tmp_path, capsys):
    """A killed recording process leaves no end record, often a record written in part: the
    log was refused as a whole. allow_truncated replays its complete records, with a warning
    that nothing checks the result; a flipped byte is still refused."""
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    opt = ZOFusedAdam(m.parameters(), lr=1e-2, seed=3, backend="cpu")
    base, log = str(tmp_path / "b.pt"), str(tmp_path / "r.zft")
    save_base(base, m)
    after = []
    with TrajectoryRecorder(log, opt, model=m):
        for _ in range(6):
            train_steps(opt, lambda: F.mse_loss(m(X), Y), 1)
            after.append({k: v.clone() for k, v in m.state_dict().items()})
    data = Path(log).read_bytes()
    end_len = 4 + 49 + 4
    cases = {"at_a_record_boundary": (data[:-end_len], 6), "inside_the_last_record": (data[:-end_len - 5], 5),
             "inside_a_length_field": (data[:-end_len - 2 * 36 + 2], 4)}
    for name, (cut, steps) in cases.items():
        bad = str(tmp_path / f"{name}.zft")
        Path(bad).write_bytes(cut)
        with pytest.raises(ReplayError, match="truncated.*allow_truncated=True"):
            replay(base, bad)
        said = f"no end record.*{steps} complete step records, up to step {steps - 1}"
        with pytest.warns(RuntimeWarning, match=said):
            assert differing_entries(replay(base, bad, allow_truncated=True), after[steps - 1]) == [], name
    out = str(tmp_path / "w.pt")
    assert replay_main([base, str(tmp_path / "inside_the_last_record.zft"), "--out", out, "--allow-truncated"]) == 0
    assert "warning: the log has no end record" in capsys.readouterr().err
    assert differing_entries(torch.load(out, weights_only=True), after[4]) == []
    flipped = bytearray(data[:-end_len])
    flipped[-10] ^= 1
    Path(log + ".flipped").write_bytes(bytes(flipped))
    with pytest.raises(ReplayError, match="corrupt"):
        replay(base, log + ".flipped", allow_truncated=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert differing_entries(replay(base, log, allow_truncated=True), after[5]) == []     # a complete log: verified


def test_the_weights_checksum_covers_the_tensor_names():
    """The header's base_sha256 and the end record's checksum are over (name, dtype, shape,
    bytes) of each tensor (docs/distributed.md): a BASE of another model whose tensors have the
    same bytes under other names must not pass for the recorded one."""
    from zeroflow.replay import weights_sha256
    t = torch.arange(6, dtype=torch.float32)
    ref = weights_sha256(["0.weight"], [t])
    assert weights_sha256(["0.weight"], [t.clone()]) == ref
    assert weights_sha256(["1.weight"], [t]) != ref                      # the name only
    assert weights_sha256(["0.weight"], [t.reshape(2, 3)]) != ref        # the shape only
    assert weights_sha256(["0.weight"], [t.view(torch.int32)]) != ref    # the dtype only
