"""Tests of the trajectory log and replay (issue 6): bit-exact rebuild of 50-step ZO-SGD and
ZO-Adam runs on CPU, refusal of another stream version, truncated / corrupt logs, a wrong
BASE, and atomic output (nothing at --out when anything fails)."""
from __future__ import annotations

import json
import math
import os
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import make_data, make_mlp
from zeroflow.optim import create, train_step
from zeroflow.replay import (MAGIC, ReplayError, TrajectoryRecorder, TrajectoryWriteError, read_log, replay,
                             replay_main, save_base)

warnings.filterwarnings("ignore", message="zfkernels: the compiled")
STEPS = 50


def make_model(seed=0):
    return make_mlp(8, 32, 3, seed)


CASES = {
    "zo_sgd_bf16_sr": dict(name="zo_sgd", lr=1e-3, momentum=0.9, zo_eps=1e-2, stochastic_rounding=True),
    "zo_adam_conserve_bf16_sr": dict(name="zo_adam_conserve", lr=1e-4, zo_eps=1e-2, stochastic_rounding=True),
    "zo_sgd": dict(name="zo_sgd", lr=1e-2, momentum=0.9, weight_decay=1e-4, zo_eps=1e-3),
    "zo_adam": dict(name="zo_adam", lr=1e-3, q=2, zo_eps=1e-3),
    "zo_adam_conserve_sparse_history": dict(name="zo_adam_conserve", lr=1e-3, zo_eps=1e-3, sparsity=0.5,
                                            history=0.5, sparse_resample="task", estimator="one_side"),
    "zo_sgd_sign_rademacher_nesterov": dict(name="zo_sgd_sign", lr=1e-3, momentum=0.9, nesterov=True,
                                            perturbation="rademacher", q=3),
}


def train(tmp_path, case, *, nan_at=None, raise_at=None, lr_decay_at=25, dtype=torch.float32, steps=STEPS):
    """Train ``steps`` steps while recording; returns (final state_dict, base path, log path)."""
    kw = dict(CASES[case])
    name = kw.pop("name")
    model = make_model().to(dtype)
    X, Y = make_data(64, 8, 3)
    X, Y = X.to(dtype), Y.to(dtype)
    # two groups (the head at a different lr) to exercise per-group lrs
    groups = [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters()), "lr": kw["lr"] * 2}]
    opt = create(name, groups, seed=1234, backend="cpu", **kw)
    base, log = str(tmp_path / f"{case}.base.pt"), str(tmp_path / f"{case}.zft")
    save_base(base, model)
    with TrajectoryRecorder(log, opt, model=model) as rec:
        for i in range(steps):
            if i == lr_decay_at:
                for g in opt.param_groups:
                    g["lr"] *= 0.3
            if i == 30 and kw.get("sparse_resample") == "task":
                opt.new_task()

            def closure():
                if i == nan_at:
                    return torch.tensor(math.nan)
                if i == raise_at:
                    raise KeyError("boom")
                return F.mse_loss(model(X), Y)

            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", RuntimeWarning)
                    train_step(opt, closure)
            except KeyError:
                pass
    rec.final_bytes = os.path.getsize(log)
    return {k: v.clone() for k, v in model.state_dict().items()}, base, log


@pytest.mark.parametrize("case", list(CASES))
def test_replay_is_bit_exact_on_cpu(tmp_path, case):
    final, base, log = train(tmp_path, case)
    init = torch.load(base, weights_only=True)["model"]
    sd = replay(base, log)
    for k, v in final.items():
        assert not torch.equal(v, init[k]), f"{k} did not move"
        assert torch.equal(sd[k], v), f"{case}: replayed {k} differs (max {float((sd[k] - v).abs().max())})"
    header, records = read_log(log)
    assert header["stream"] == "v1" and header["seed"] == 1234
    assert sum(r[0] == "step" for r in records) == STEPS


def _replay_backends():
    """Every other backend present: the interpreter (CPU tensors), the reference, and on a GPU
    the CUDA kernels, native Triton and the reference on the GPU."""
    import zfkernels as zk

    out = [("torch", "cpu")]
    if zk._triton_usable_on("cpu"):
        out.append(("triton", "cpu"))
    if torch.cuda.is_available():
        out += [(b, "cuda") for b in zk.available_backends("cuda")]
    return out


@pytest.mark.parametrize("backend,device", _replay_backends())
@pytest.mark.parametrize("case", ["zo_sgd", "zo_adam_conserve_sparse_history", "zo_sgd_sign_rademacher_nesterov"])
def test_replay_on_another_backend_verifies_the_checksum(tmp_path, case, backend, device, recwarn):
    """Recorded with backend 'cpu', replayed elsewhere: the end record's checksum is verified
    (bit-exact, no tolerance, no warning), Gaussian runs included."""
    final, base, log = train(tmp_path, case, steps=12, lr_decay_at=5)
    sd = replay(base, log, backend=backend, device=device)      # raises ReplayError on any bit difference
    for k, v in final.items():
        assert torch.equal(sd[k].cpu(), v), k
    assert not [w for w in recwarn if "backend" in str(w.message)]


def test_replay_cli_other_backend(tmp_path, capsys):
    final, base, log = train(tmp_path, "zo_adam", steps=10)
    out = str(tmp_path / "w.pt")
    assert replay_main([base, log, "--out", out, "--backend", "torch"]) == 0
    sd = torch.load(out, weights_only=True)
    assert all(torch.equal(sd[k], v) for k, v in final.items())


def test_replay_detects_a_tampered_scalar_on_another_backend(tmp_path):
    """The checksum is checked on every backend: one changed loss bit in the log is caught."""
    final, base, log = train(tmp_path, "zo_sgd", steps=6)
    header, records = read_log(log)
    raw = bytearray(Path(log).read_bytes())
    # change the last loss of the first step by 2^-20 of itself (bit 32 of the float64): far below
    # any tolerance, but it changes the fp32 projected gradient and so the weights' bits
    first = next(r for r in records if r[0] == "step")
    needle = struct.pack("<d", first[5][-1])
    raw[raw.index(needle) + 4] ^= 1
    bad = str(tmp_path / "bad.zft")
    with open(bad, "wb") as f:
        f.write(_recrc(bytes(raw)))
    with pytest.raises(ReplayError, match="checksum mismatch"):
        replay(base, bad, backend="torch")


def _recrc(raw: bytes) -> bytes:
    """Recompute every crc32 of a log (header and records), so an edited payload still parses."""
    out = bytearray(raw[:len(MAGIC)])
    i = len(MAGIC)
    while i < len(raw):
        n = struct.unpack_from("<I", raw, i)[0]
        payload = raw[i + 4:i + 4 + n]
        out += struct.pack("<I", n) + payload + struct.pack("<I", zlib.crc32(payload))
        i += 8 + n
    return bytes(out)


def test_replay_cli_writes_weights_and_reports(tmp_path, capsys):
    final, base, log = train(tmp_path, "zo_adam")
    out = str(tmp_path / "w.pt")
    assert replay_main([base, log, "--out", out]) == 0
    sd = torch.load(out, weights_only=True)
    assert all(torch.equal(sd[k], v) for k, v in final.items())
    assert "50 steps of ZOFusedAdam" in capsys.readouterr().out
    # the same through the `zeroflow` console script's entry point: zeroflow replay BASE LOG --out W
    from zeroflow.cli import main
    out2 = str(tmp_path / "w2.pt")
    assert main(["replay", base, log, "--out", out2]) == 0
    sd2 = torch.load(out2, weights_only=True)
    assert all(torch.equal(sd2[k], v) for k, v in final.items())
    assert main(["replay", base, log + ".missing", "--out", str(tmp_path / "w3.pt")]) == 2
    assert not os.path.exists(tmp_path / "w3.pt")


def test_replay_of_skipped_and_aborted_steps_and_bf16(tmp_path):
    final, base, log = train(tmp_path, "zo_sgd", nan_at=7, raise_at=12, dtype=torch.bfloat16, steps=20)
    _, records = read_log(log)
    flags = [r[2] for r in records if r[0] == "step"]
    assert flags[7] & 1 and flags[12] & 2                  # skipped / aborted recorded
    sd = replay(base, log)
    assert all(torch.equal(sd[k], v) for k, v in final.items())


@pytest.mark.parametrize("case", ["zo_sgd_bf16_sr", "zo_adam_conserve_bf16_sr"])
def test_replay_of_stochastically_rounded_bf16_run(tmp_path, case):
    """Stream §9: the rounding bits come from the seed schedule, so a bf16 run with stochastic
    rounding (conserve's moves included) replays bit-exactly, on another backend too."""
    final, base, log = train(tmp_path, case, dtype=torch.bfloat16, steps=15)
    init = torch.load(base, weights_only=True)["model"]
    assert any(not torch.equal(v, init[k]) for k, v in final.items())
    for backend in ("cpu", "torch"):
        sd = replay(base, log, backend=backend)
        assert all(torch.equal(sd[k], v) for k, v in final.items()), backend


def test_log_size_per_step(tmp_path):
    _, _, log = train(tmp_path, "zo_sgd", lr_decay_at=None)
    header, records = read_log(log)
    hdr_len = len(json.dumps(header, sort_keys=True).encode())
    per_step = (os.path.getsize(log) - 8 - 8 - hdr_len - (4 + 49 + 4)) / STEPS
    assert per_step == 36                # q=1 two_side: 2 losses + step/flags/framing


@pytest.mark.parametrize("name,kw,scalars", [("zo_sgd", {"q": 2}, 4), ("zo_sgd", {"estimator": "one_side"}, 2),
                                             ("zo_sgd", {"q": 3, "estimator": "one_side"}, 4),
                                             ("zo_sgd_conserve", {}, 5),
                                             ("zo_sgd_conserve", {"estimator": "one_side"}, 4)])
def test_log_size_per_step_per_estimator(tmp_path, name, kw, scalars):
    """docs/distributed.md "Size": 20 bytes of step record and framing plus 8 per scalar the
    step consumed: two_side 2q, one_side q + 1, conserve 2 more (one_side) or 3 (two_side,
    which adds L(theta)); the page said +2 for both."""
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 2)
    x, y = torch.randn(16, 8), torch.randint(0, 2, (16,))
    sizes = []
    for steps in (3, 6):
        log = str(tmp_path / f"{steps}.zft")
        opt = create(name, model.parameters(), lr=1e-3, seed=0, **kw)
        with TrajectoryRecorder(log, opt, model=model):
            for _ in range(steps):
                train_step(opt, lambda: F.cross_entropy(model(x), y))
        sizes.append(os.path.getsize(log))
    assert (sizes[1] - sizes[0]) / 3 == 20 + 8 * scalars


def _rewrite_header(log, out, **changes):
    with open(log, "rb") as f:
        data = f.read()
    (n,) = struct.unpack_from("<I", data, 8)
    header = json.loads(data[12:12 + n])
    header.update(changes)
    h = json.dumps(header, sort_keys=True).encode()
    with open(out, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(h)) + h + struct.pack("<I", zlib.crc32(h)) + data[12 + n + 4:])


def test_other_stream_version_refused(tmp_path):
    _, base, log = train(tmp_path, "zo_sgd", steps=5)
    bad = str(tmp_path / "v0.zft")
    _rewrite_header(log, bad, stream="v0")
    with pytest.raises(ReplayError, match=r"recorded with perturbation stream 'v0'.*implements stream 'v1'"):
        replay(base, bad)
    out = str(tmp_path / "w.pt")
    assert replay_main([base, bad, "--out", out]) != 0
    assert not os.path.exists(out)


def _no_output(tmp_path, out):
    assert not os.path.exists(out)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")], "temporary file left behind"


@pytest.mark.parametrize("cut", ["mid_record", "at_record_boundary", "header", "flip_scalar", "flip_header",
                                 "trailing_garbage"])
def test_truncated_or_corrupt_log_refused_nothing_written(tmp_path, cut, capsys):
    _, base, log = train(tmp_path, "zo_adam", steps=10)
    with open(log, "rb") as f:
        data = bytearray(f.read())
    rec_len = 4 + 1 + 8 + 1 + 2 + 4 * 8 + 4            # a q=2 two_side step record
    end_len = 4 + 49 + 4
    if cut == "mid_record":
        data = data[:len(data) - end_len - rec_len // 2]
    elif cut == "at_record_boundary":
        data = data[:len(data) - end_len]
    elif cut == "header":
        data = data[:40]
    elif cut == "flip_scalar":
        data[len(data) - end_len - 10] ^= 0x01
    elif cut == "flip_header":
        data[20] ^= 0x20
    else:
        data += b"\0" * 5
    bad = str(tmp_path / "bad.zft")
    with open(bad, "wb") as f:
        f.write(bytes(data))
    with pytest.raises(ReplayError, match="truncated|corrupt"):
        replay(base, bad)
    out = str(tmp_path / "w.pt")
    assert replay_main([base, bad, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "zeroflow replay: error:" in err and ("truncated" in err or "corrupt" in err), err
    _no_output(tmp_path, out)


def test_wrong_base_refused(tmp_path):
    _, base, log = train(tmp_path, "zo_sgd", steps=5)
    other = str(tmp_path / "other.pt")
    save_base(other, make_model(seed=9))
    with pytest.raises(ReplayError, match="not the checkpoint the log starts from"):
        replay(other, log)


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    _, base, log = train(tmp_path, "zo_sgd", steps=5)
    out = str(tmp_path / "w.pt")
    real = torch.save

    def failing_save(obj, f, *a, **k):
        real(obj, f, *a, **k)           # bytes reach the temporary file, then the "disk" fails
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    assert replay_main([base, log, "--out", out]) == 2
    _no_output(tmp_path, out)


def test_the_header_is_on_disk_once_recording_starts_and_an_empty_log_is_named_truncated(tmp_path):
    # A process killed (SIGKILL) before the first flush left a 0-byte log, which replay
    # called "not a zeroflow trajectory log (bad magic)", even with --allow-truncated.
    model = make_model()
    opt = create("zo_sgd", model.parameters(), lr=1e-2, seed=3, backend="cpu")
    log = str(tmp_path / "t.zft")
    rec = TrajectoryRecorder(log, opt, model=model)
    header, records = read_log(log, allow_truncated=True)         # before any step or close
    assert header["optimizer"] == "ZOFusedSGD" and records == []
    rec.close()
    for size in (0, 5):
        with open(log, "wb") as f:
            f.write(MAGIC[:size])
        for allow in (False, True):
            with pytest.raises(ReplayError, match=rf"truncated log \({size} bytes: the recording process stopped "
                                                  r"before its header was written\); nothing to replay"):
                read_log(log, allow_truncated=allow)


class _FullDisk:
    """The recorder's file on a disk that fills up once ``budget`` bytes were written: the
    flush (or close) that would pass the budget fails with ENOSPC and its bytes are lost."""

    def __init__(self, f, budget):
        self.f, self.budget, self.pending = f, budget, b""

    def write(self, b):
        self.pending += b
        return len(b)

    def flush(self):
        import errno
        if len(self.pending) > self.budget:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.budget -= len(self.pending)
        self.f.write(self.pending)
        self.pending = b""
        self.f.flush()

    def close(self):
        try:
            self.flush()
        finally:
            self.f.close()

    def fileno(self):
        return self.f.fileno()


def _zo_sgd_from_a_base(tmp_path):
    """(model, ZO-SGD optimizer, closure, base path, log path), the base saved: ready to record."""
    model = make_model()
    X, Y = make_data(64, 8, 3)
    opt = create("zo_sgd", model.parameters(), lr=1e-2, seed=3, backend="cpu")
    base, log = str(tmp_path / "b.pt"), str(tmp_path / "t.zft")
    save_base(base, model)
    return model, opt, lambda: F.mse_loss(model(X), Y), base, log


def test_a_failed_write_stops_the_recording_and_leaves_a_log_without_an_end_record(tmp_path):
    # Before, the OSError left the recorder attached, and close() wrote an end record whose
    # checksum covered the weights after the unlogged steps: replay refused the log as "not
    # belonging to this run". Now the log is left without one; its complete records replay.
    model, opt, closure, base, log = _zo_sgd_from_a_base(tmp_path)
    rec = TrajectoryRecorder(log, opt, model=model, flush_every=1)
    rec._f = _FullDisk(rec._f, budget=2 * 36 + 10)     # room for two step records of 36 bytes
    train_step(opt, closure)
    train_step(opt, closure)
    after_two = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TrajectoryWriteError, match=r"writing .*t\.zft failed \(No space left on device\) at step 2, "
                                                   r"which ran \(its update is applied; the log does not hold it\)"):
        train_step(opt, closure)
    assert opt.step_count == 3 and opt.step_hook is None       # detached: the next step trains, unrecorded
    train_step(opt, closure)
    rec.close()                                                 # no-op: no end record after a failure
    with pytest.raises(ReplayError, match="no end record"):
        read_log(log)
    sd = replay(base, log, allow_truncated=True)                # steps 0 and 1 reached the disk
    assert all(torch.equal(sd[k], v) for k, v in after_two.items())


def test_a_recorder_never_closed_leaves_its_records_on_disk_and_says_so(tmp_path):
    # The optimizer and its recorder hold each other (hooks), so only the cycle collector freed
    # them, and it finalized the raw file before its buffer: the 5 records below never reached
    # the disk (an audit's find). Now they are flushed, with a warning, and replay truncated.
    import gc
    model, opt, closure, base, log = _zo_sgd_from_a_base(tmp_path)
    rec = TrajectoryRecorder(log, opt, model=model)          # flush_every=100: the steps stay buffered
    for _ in range(5):
        train_step(opt, closure)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(RuntimeWarning, match=r"t\.zft was not closed; the steps it recorded are on disk"):
        del opt, rec
        gc.collect()
    _, records = read_log(log, allow_truncated=True)
    assert [r[1] for r in records] == [0, 1, 2, 3, 4]
    sd = replay(base, log, allow_truncated=True)
    assert all(torch.equal(sd[k], v) for k, v in trained.items())


def test_hybrid_fo_phase_not_recordable_zo_phase_is(tmp_path):
    model = make_model()
    X, Y = make_data(64, 8, 3)
    opt = create("zo_sgd", list(model.parameters()), lr=1e-2, seed=3, backend="cpu", hybrid_switch=2)
    with pytest.raises(ValueError, match="first-order phase.*cannot be replayed"):
        TrajectoryRecorder(str(tmp_path / "h.zft"), opt, model=model)
    for _ in range(2):
        train_step(opt, lambda: F.mse_loss(model(X), Y))
    base, log = str(tmp_path / "switch.pt"), str(tmp_path / "h.zft")
    save_base(base, model)                             # checkpoint at the switch
    with TrajectoryRecorder(log, opt, model=model):
        for _ in range(10):
            train_step(opt, lambda: F.mse_loss(model(X), Y))
    sd = replay(base, log)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_a_hybrid_recorded_in_its_zo_phase_with_state_replays_from_its_own_state_dict(tmp_path):
    """A HybridFOZO recorded after some ZO steps (momentum to carry), BASE saved as the
    recorder's message says, save_base(path, model, optimizer) with the hybrid: BASE holds the
    hybrid's state_dict (both phases' under "hybrid"), which replay loaded into the ZO optimizer
    it rebuilds and refused ("lacks the 'zeroflow' counters"). The log is the ZO optimizer's:
    replay takes the ZO part."""
    model = make_model()
    X, Y = make_data(64, 8, 3)
    opt = create("zo_sgd", list(model.parameters()), lr=1e-2, momentum=0.9, seed=3, backend="cpu",
                 hybrid_switch=2)
    for _ in range(4):
        train_step(opt, lambda: F.mse_loss(model(X), Y))
    base, log = str(tmp_path / "zo.pt"), str(tmp_path / "h.zft")
    save_base(base, model, opt)
    with TrajectoryRecorder(log, opt, model=model):
        for _ in range(5):
            train_step(opt, lambda: F.mse_loss(model(X), Y))
    sd = replay(base, log)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_resume_mid_run_needs_optimizer_state(tmp_path):
    model = make_model()
    X, Y = make_data(64, 8, 3)
    opt = create("zo_adam", list(model.parameters()), lr=1e-3, seed=3, backend="cpu")
    for _ in range(3):
        train_step(opt, lambda: F.mse_loss(model(X), Y))
    base, log = str(tmp_path / "mid.pt"), str(tmp_path / "mid.zft")
    save_base(str(tmp_path / "weights_only.pt"), model)
    save_base(base, model, opt)
    with TrajectoryRecorder(log, opt, model=model):
        for _ in range(5):
            train_step(opt, lambda: F.mse_loss(model(X), Y))
    with pytest.raises(ReplayError, match="non-empty optimizer state"):
        replay(str(tmp_path / "weights_only.pt"), log)
    sd = replay(base, log)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())


def test_a_hybrid_with_a_popped_group_records_and_replays_without_it(tmp_path):
    """hybrid.param_groups.pop(k) (an old task's head) in the ZO phase, then a recorder: the
    recorder listed the ZO optimizer's groups, where the popped one stays until the hybrid's
    next step, so a model without the head was refused ('not parameters of model=') and the
    first step was refused as a change of the groups."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)
    X, Y = make_data(64, 8, 3)
    opt = create("zo_sgd", [{"params": list(a.parameters())}, {"params": list(b.parameters())}], lr=1e-2,
                 seed=3, backend="cpu", hybrid_switch=1)
    for _ in range(2):
        train_step(opt, lambda: F.mse_loss(a(X) + b(X), Y))
    opt.param_groups.pop(1)
    model = torch.nn.ModuleDict({"a": a})
    base, log = str(tmp_path / "zo.pt"), str(tmp_path / "h.zft")
    save_base(base, model)
    with TrajectoryRecorder(log, opt, model=model):
        for _ in range(3):
            train_step(opt, lambda: F.mse_loss(a(X) + b(X), Y))
    sd = replay(base, log)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
