"""Contracts of the trajectory log (zeroflow.replay), of data-parallel ZO (zeroflow.distributed)
and of the ``zeroflow`` command that the other tests left unpinned (found by mutation testing):
what a log holds per step, what a reader refuses, what replay cross-checks, how DataParallelZO
weighs an empty shard and when it checks the ranks, and the sweep's seed list. docs/distributed.md
is cited per test. Everything runs in one process (a two-rank exchange is simulated by a Comm
whose other rank answers locally), tiny models, a few steps: fast."""
from __future__ import annotations

import argparse
import math
import os
import signal
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import differing_entries, make_data, make_mlp, sparse_sgd_recording, train_steps
from zeroflow.optim import ZOFusedSGD, create
from zeroflow.replay import MAGIC, ReplayError, TrajectoryRecorder, read_log, replay, replay_main, save_base


def _records(raw: bytes) -> list[tuple[int, bytes]]:
    """``(offset, payload)`` of each record after the header of a log's bytes."""
    (hn,) = struct.unpack_from("<I", raw, len(MAGIC))
    i, out = len(MAGIC) + 4 + hn + 4, []
    while i < len(raw):
        (n,) = struct.unpack_from("<I", raw, i)
        out.append((i, raw[i + 4:i + 4 + n]))
        i += 8 + n
    return out


def _with_payload(raw: bytes, k: int, payload: bytes) -> bytes:
    """The log with record ``k`` replaced by ``payload`` (its length and crc32 made to match)."""
    at, old = _records(raw)[k]
    return (raw[:at] + struct.pack("<I", len(payload)) + payload + struct.pack("<I", zlib.crc32(payload))
            + raw[at + 8 + len(old):])


@pytest.fixture(scope="module")
def small_log(tmp_path_factory):
    """A 4-step ZO-SGD (q=1 two_side) log, its BASE and the trained weights."""
    d = tmp_path_factory.mktemp("log")
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, momentum=0.9, seed=3, backend="cpu")
    base, log = str(d / "b.pt"), str(d / "r.zft")
    save_base(base, m)
    with TrajectoryRecorder(log, opt, model=m):
        train_steps(opt, lambda: F.mse_loss(m(X), Y), 4)
    return base, log, {k: v.clone() for k, v in m.state_dict().items()}, Path(log).read_bytes()


def _write(tmp_path, raw: bytes) -> str:
    p = str(tmp_path / "edited.zft")
    with open(p, "wb") as f:
        f.write(raw)
    return p


# ---------------------------------------------------------------------------- what a step record holds
def test_lr_task_and_options_are_logged_on_the_step_they_change_only(tmp_path):
    """docs/distributed.md §2: the recorder logs "the per-group lr when it changed, the mask epoch
    when it changed, and an options record when a group option other than lr changed" (+2+8G
    bytes on a step whose lr changed). A recorder that forgot what it had logged repeated them
    on every later step: the log grew, and the Size section's numbers no longer held."""
    m, X, Y, opt, base, log = sparse_sgd_recording(tmp_path)
    loss = lambda: F.mse_loss(m(X), Y)  # noqa: E731
    with TrajectoryRecorder(log, opt, model=m):
        train_steps(opt, loss, 2)
        opt.param_groups[0]["lr"] = 5e-3             # step 2: lr and task change together
        opt.new_task()
        train_steps(opt, loss, 2)
        opt.param_groups[0]["weight_decay"] = 1e-3   # before step 4: an options record
        train_steps(opt, loss, 2)
    _, records = read_log(log)
    steps = [r for r in records if r[0] == "step"]
    assert [r[2] & 4 for r in steps] == [0, 0, 4, 0, 0, 0]          # lr present: step 2 only
    assert [r[2] & 8 for r in steps] == [0, 0, 8, 0, 0, 0]          # task present: step 2 only
    assert steps[2][3] == 1 and steps[2][4] == [5e-3]               # both read back, in their order
    assert [r[0] for r in records].count("options") == 1
    assert differing_entries(replay(base, log), m.state_dict()) == []


def test_an_option_that_is_no_json_is_refused_before_the_step_and_the_recording_goes_on(tmp_path):
    """A group option set mid-recording to a value JSON cannot hold (a set) raised from the step
    hook, after the step had updated the weights: the log lacked that step, and replay refused
    it as inconsistent. The step pre-hook refuses it, naming the group and the option, before
    anything changes; with the option fixed the recording goes on and replays bit-exactly."""
    m, X, Y, opt, base, log = sparse_sgd_recording(tmp_path)
    loss = lambda: F.mse_loss(m(X), Y)  # noqa: E731
    with TrajectoryRecorder(log, opt, model=m) as rec:
        train_steps(opt, loss, 2)
        opt.param_groups[0]["tags"] = {"adapter"}
        before = [p.detach().clone() for p in m.parameters()]
        written = rec.bytes_written
        with pytest.raises(ValueError, match=r"step 2 refused: param group 0's option 'tags' = \{'adapter'\} \(set\) "
                           r"cannot be logged as JSON.*set the option to a JSON value"):
            opt.step(loss)
        assert opt.step_count == 2 and rec.bytes_written == written
        assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
        opt.param_groups[0]["tags"] = ["adapter"]
        train_steps(opt, loss, 2)
    _, records = read_log(log)
    assert [r[0] for r in records].count("options") == 1
    assert differing_entries(replay(base, log), m.state_dict()) == []


def test_an_option_refused_as_no_json_is_the_first_one_found(tmp_path):
    """Two options JSON cannot hold: the refusal names the first in the order the options
    record lists them (group, then option name), not the last one looked at."""
    m, X, Y, opt, base, log = sparse_sgd_recording(tmp_path)
    loss = lambda: F.mse_loss(m(X), Y)  # noqa: E731
    with TrajectoryRecorder(log, opt, model=m):
        train_steps(opt, loss, 1)
        opt.param_groups[0]["tags_b"] = {"second"}
        opt.param_groups[0]["tags_a"] = {"first"}
        with pytest.raises(ValueError, match=r"param group 0's option 'tags_a' = \{'first'\} \(set\) cannot be "
                                             r"logged"):
            opt.step(loss)
        del opt.param_groups[0]["tags_a"], opt.param_groups[0]["tags_b"]

def test_a_partly_stateful_optimizer_records_its_state_in_the_header(tmp_path):
    """docs/distributed.md §2: BASE holds the optimizer state when the recording starts with
    one ("+ optimizer if it already has state"). An optimizer whose first group has momentum and
    whose group added since has none yet (one adapter per task) is not fresh: replay must load
    BASE's state, or the momentum is lost and the final checksum fails."""
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    loss = lambda: F.mse_loss(m(X), Y)  # noqa: E731
    opt = ZOFusedSGD(m[0].parameters(), lr=1e-2, momentum=0.9, seed=3, backend="cpu")
    train_steps(opt, loss, 2)
    opt.add_param_group({"params": list(m[2].parameters())})
    base, log = str(tmp_path / "b.pt"), str(tmp_path / "r.zft")
    save_base(base, m, opt)
    with TrajectoryRecorder(log, opt, model=m) as rec:
        assert rec.header["fresh_state"] is False
        train_steps(opt, loss, 3)
    assert differing_entries(replay(base, log), m.state_dict()) == []


def test_a_log_started_mid_run_without_optimizer_state_replays_from_its_start_step(tmp_path):
    """docs/distributed.md §2: the header holds "the start counters" and replay rebuilds the
    optimizer as it was when the log started. ZO-SGD without momentum has no state, so a log
    started after some steps is fresh but starts at step 3: its seeds are those of steps 3.."""
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    loss = lambda: F.mse_loss(m(X), Y)  # noqa: E731
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, seed=3, backend="cpu")
    train_steps(opt, loss, 3)
    base, log = str(tmp_path / "b.pt"), str(tmp_path / "r.zft")
    save_base(base, m)
    with TrajectoryRecorder(log, opt, model=m) as rec:
        assert rec.header["fresh_state"] is True and rec.header["start_step"] == 3
        train_steps(opt, loss, 2)
    assert differing_entries(replay(base, log), m.state_dict()) == []


def test_close_and_abandon_fsync_the_log(tmp_path, monkeypatch):
    """The end record is made durable (flush + fsync) when the recorder closes, and what a
    recording cut short holds when it is abandoned (docs/distributed.md §2: a log whose process
    was killed replays its complete records): a log that looks closed must survive a crash."""
    import zeroflow.replay as zr

    synced = []
    real = os.fsync
    monkeypatch.setattr(zr.os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    for how in ("close", "abandon"):
        opt = ZOFusedSGD(m.parameters(), lr=1e-2, seed=3, backend="cpu")
        rec = TrajectoryRecorder(str(tmp_path / f"{how}.zft"), opt, model=m)
        train_steps(opt, lambda: F.mse_loss(m(X), Y), 1)
        fd = rec._f.fileno()
        synced.clear()
        getattr(rec, how)()
        assert fd in synced, how


def test_forward_grad_is_refused_by_the_recorder(tmp_path):
    """docs/distributed.md §2 "Not replayable": forward_grad (the recorder refuses it: replaying
    its steps would still run the jvps), before any file is written."""
    m = make_mlp(5, 8, 2)
    opt = create("forward_grad", list(m.parameters()), model=m, lr=1e-2, seed=3, backend="cpu")
    with pytest.raises(ValueError, match="forward_grad"):
        TrajectoryRecorder(str(tmp_path / "fg.zft"), opt, model=m)
    assert not os.path.exists(tmp_path / "fg.zft")


# ---------------------------------------------------------------------------- what a reader refuses
def test_another_log_format_in_the_magic_is_refused(tmp_path, small_log):
    """docs/distributed.md §2 Refused: "another log format" (magic ZFTRAJ\\0\\2 is not this
    reader's ZFTRAJ\\0\\1), named as such, not read as format 1."""
    raw = small_log[3]
    bad = _write(tmp_path, raw[:6] + b"\x00\x02" + raw[8:])
    with pytest.raises(ReplayError, match="trajectory log format 0002 is not supported"):
        read_log(bad)


def test_a_step_record_with_bytes_after_its_scalars_is_corrupt(tmp_path, small_log):
    """docs/distributed.md §2 Format/Refused: a step record is exactly kind, step, flags, [task],
    [lrs], m and m scalars; anything else is "a malformed record" (crc recomputed: another writer)."""
    raw = small_log[3]
    _, p = _records(raw)[1]
    with pytest.raises(ReplayError, match=r"corrupt log \(record 1 malformed"):
        read_log(_write(tmp_path, _with_payload(raw, 1, p + b"\0" * 8)))


def test_an_end_record_of_another_length_is_corrupt(tmp_path, small_log):
    """The end record is kind, u64 steps, u64 next step and a 32-byte sha256 (49 bytes)."""
    raw = small_log[3]
    k = len(_records(raw)) - 1
    _, p = _records(raw)[k]
    with pytest.raises(ReplayError, match=rf"corrupt log \(record {k} malformed"):
        read_log(_write(tmp_path, _with_payload(raw, k, p + b"\0")))


@pytest.mark.parametrize("allow_truncated", [False, True])
def test_a_record_of_no_bytes_is_corrupt_not_an_index_error(tmp_path, small_log, capsys, allow_truncated):
    """Zeros where records should be (a file extended by a crash before its data reached the
    disk, as some filesystems leave it): a record of length 0 whose crc32 is 0, which is the
    crc32 of no bytes. Reading its kind raised IndexError, a traceback from zeroflow replay,
    with or without --allow-truncated."""
    raw = small_log[3]
    cut = _write(tmp_path, raw[:_records(raw)[2][0]] + b"\0" * 16)
    with pytest.raises(ReplayError, match=r"corrupt log \(record 2 malformed: empty"):
        read_log(cut, allow_truncated=allow_truncated)
    out = str(tmp_path / "w.pt")
    args = [small_log[0], cut, "--out", out] + (["--allow-truncated"] if allow_truncated else [])
    assert replay_main(args) == 2
    assert "record 2 malformed: empty" in capsys.readouterr().err and not os.path.exists(out)


def test_an_end_record_counting_other_steps_is_corrupt(tmp_path, small_log):
    """docs/distributed.md §2 Refused: "step count mismatch" between the end record and the
    step records the log holds."""
    raw = small_log[3]
    k = len(_records(raw)) - 1
    _, p = _records(raw)[k]
    bad = p[:1] + struct.pack("<Q", 5) + p[9:]
    with pytest.raises(ReplayError, match=r"end record says 5 steps, found 4"):
        read_log(_write(tmp_path, _with_payload(raw, k, bad)))


# ---------------------------------------------------------------------------- what replay cross-checks
def test_a_step_record_numbered_out_of_sequence_is_refused(tmp_path, small_log):
    """A log holds consecutive steps (docs/distributed.md §2): a record whose step number is not
    the optimizer's next step is an inconsistent log, even though the scalars would replay."""
    base, _, _, raw = small_log
    _, p = _records(raw)[1]
    bad = p[:1] + struct.pack("<Q", 7) + p[9:]
    with pytest.raises(ReplayError, match="record for step 7 where step 1 was expected"):
        replay(base, _write(tmp_path, _with_payload(raw, 1, bad)))


def test_a_step_record_with_more_scalars_than_the_step_consumes_is_refused(tmp_path, small_log):
    """Replay plays each step's logged scalars back; a step that leaves some unconsumed is an
    inconsistent log (the weights would still pass the checksum, the log does not describe them)."""
    base, _, _, raw = small_log
    _, p = _records(raw)[1]
    (m,) = struct.unpack_from("<H", p, 10)
    bad = p[:10] + struct.pack("<H", m + 1) + p[12:] + struct.pack("<d", 1.0)
    with pytest.raises(ReplayError, match=rf"step 1 consumed {m} of {m + 1} scalars"):
        replay(base, _write(tmp_path, _with_payload(raw, 1, bad)))


def test_an_end_record_whose_next_step_is_not_where_replay_ends_is_refused(tmp_path, small_log):
    """The end record's next step (docs/distributed.md §2 Format) must be where playback ends."""
    base, _, _, raw = small_log
    k = len(_records(raw)) - 1
    _, p = _records(raw)[k]
    bad = p[:9] + struct.pack("<Q", 9) + p[17:]
    with pytest.raises(ReplayError, match="replay ended at step 4, the log at 9"):
        replay(base, _write(tmp_path, _with_payload(raw, k, bad)))


def test_the_replay_command_verifies_unless_no_verify(tmp_path, small_log, capsys):
    """docs/distributed.md §2: replay checks the final weights against the end record;
    ``zeroflow replay`` exits 2 with nothing at --out on a mismatch, and ``--no-verify`` skips
    the check. The end record's checksum is altered here (crc recomputed)."""
    base, _, final, raw = small_log
    k = len(_records(raw)) - 1
    _, p = _records(raw)[k]
    bad = _write(tmp_path, _with_payload(raw, k, p[:-1] + bytes([p[-1] ^ 1])))
    out = str(tmp_path / "w.pt")
    assert replay_main([base, bad, "--out", out]) == 2
    assert "checksum mismatch" in capsys.readouterr().err and not os.path.exists(out)
    assert replay_main([base, bad, "--out", out, "--no-verify"]) == 0
    assert differing_entries(torch.load(out, weights_only=True), final) == []


def test_python_m_zeroflow_replay_is_the_replay_command(tmp_path, small_log):
    """``python -m zeroflow.replay BASE LOG --out W`` (cli.py: "shared with python -m
    zeroflow.replay") ran nothing and exited 0: no weights and no error, read as a replay done."""
    import subprocess
    import sys

    from conftest import child_env

    base, log, trained, _ = small_log
    out = tmp_path / "w.pt"
    r = subprocess.run([sys.executable, "-m", "zeroflow.replay", base, log, "--out", str(out)], env=child_env(),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "4 steps of ZOFusedSGD" in r.stdout, (r.stdout, r.stderr)
    sd = torch.load(out, weights_only=True)
    assert all(torch.equal(sd[k], v) for k, v in trained.items())
    r = subprocess.run([sys.executable, "-m", "zeroflow.replay", base, str(tmp_path / "none.zft"), "--out",
                        str(tmp_path / "x.pt")], env=child_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot read LOG" in r.stderr, (r.stdout, r.stderr)


@pytest.mark.parametrize("stderr_too", [False, True])
def test_a_replay_whose_output_reader_went_away_ends_as_every_command_does(tmp_path, small_log, stderr_too):
    """`zeroflow replay BASE LOG --out W | head -0`: the weights were written, and the summary line,
    buffered, failed at exit: 'Exception ignored ... BrokenPipeError' and exit 120. It ends as a
    closed output ends every zeroflow command now: exit 141 and one line on stderr (none when
    stderr is the same closed pipe)."""
    import os
    import subprocess
    import sys

    from conftest import child_env

    base, log, trained, _ = small_log
    out = tmp_path / "w.pt"
    read, write = os.pipe()
    err = subprocess.PIPE
    if stderr_too:
        err = write
    p = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline(); from zeroflow.replay import "
                          "replay_main; sys.exit(replay_main(sys.argv[1:]))", base, log, "--out", str(out)],
                         stdin=subprocess.PIPE, stdout=write, stderr=err, env=child_env(), text=True)
    os.close(write)
    os.close(read)          # the reader is gone before anything is written: deterministic
    p.stdin.write("go\n")
    p.stdin.close()
    said = "" if stderr_too else p.stderr.read()
    assert p.wait(timeout=300) == 141, said
    if not stderr_too:
        p.stderr.close()
        assert said == f"zeroflow replay: stdout was closed by its reader; {out} was written\n", said
    sd = torch.load(out, weights_only=True)
    assert all(torch.equal(sd[k], v) for k, v in trained.items())


@pytest.mark.parametrize("extra,needle", [
    # "the log's options are refused by ZOFusedSGD: backend='gpu' ..." (the log was fine)
    (["--backend", "gpu"], "--backend 'gpu' cannot replay on cpu"),
    (["--backend", "cuda"], "--backend 'cuda' cannot replay on cpu"),
    # torch's "Expected one of cpu, cuda, ipu, ..." naming no option; meta failed after BASE was read
    (["--device", "gpu"], "--device 'gpu' is not a device"),
    (["--device", "meta"], "--device 'meta': replay runs on cpu or cuda devices"),
    ([], "cannot read LOG"),               # "[Errno 2] No such file or directory: '...'"
    (["--out", "/nonexistent-folder/w.pt"], "its folder /nonexistent-folder does not exist")])
def test_the_replay_command_names_the_argument_it_cannot_use(tmp_path, small_log, capsys, extra, needle):
    base, log, _, _ = small_log
    if not extra:
        log = str(tmp_path / "missing.zft")
    out = str(tmp_path / "w.pt")
    argv = [base, log, "--out", out] + extra
    assert replay_main(argv) == 2
    assert needle in capsys.readouterr().err
    assert not os.path.exists(out)
    if extra[:1] in (["--backend"], ["--device"]):       # the API names its keywords
        kw = {extra[0][2:]: extra[1]}
        with pytest.raises(ReplayError, match=f"{extra[0][2:]}='{extra[1]}'"):
            replay(base, log, **kw)


@pytest.mark.parametrize("device", [3.5, None])
def test_a_device_of_the_wrong_type_is_named(small_log, device):
    # torch.device's TypeError ("device() received an invalid combination of arguments")
    base, log, _, _ = small_log
    with pytest.raises(ReplayError, match=f"device={device!r} is not a device"):
        replay(base, log, device=device)


def test_a_backend_that_cannot_replay_here_is_fixed_in_the_caller_s_spelling(tmp_path, small_log, capsys):
    """`zeroflow replay ... --backend cuda` on cpu said "use backend='auto'", the Python API's
    spelling, which the command line does not take: it names the flag now (the API its keyword)."""
    base, log, _, _ = small_log
    out = str(tmp_path / "w.pt")
    assert replay_main([base, log, "--out", out, "--device", "cpu", "--backend", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "use --backend auto, or leave --backend out" in err and "backend='auto'" not in err, err
    with pytest.raises(ReplayError, match=r"use backend='auto' or None"):
        replay(base, log, device="cpu", backend="cuda")


def test_a_run_backend_that_cannot_run_here_names_the_flag_not_the_keyword():
    """`zeroflow run --device cpu --backend cuda` said "...; use backend='auto'" and, since that
    advice holds 'auto', not the flag's "(use --backend auto)"."""
    from zeroflow.continual.errors import ZeroflowError
    from zeroflow.continual.runner import check_backend
    with pytest.raises(ZeroflowError) as e:
        check_backend("cuda", torch.device("cpu"))
    assert str(e.value).endswith("(use --backend auto)") and "backend='auto'" not in str(e.value), str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal of cuda where CUDA is not available")
def test_a_cuda_device_without_cuda_is_named_before_base_is_read(tmp_path, small_log, capsys):
    _, log, _, _ = small_log
    base = str(tmp_path / "no-base.pt")           # never read: the device is refused first
    with pytest.raises(ReplayError, match="device='cuda': CUDA is not available here; replay on cpu"):
        replay(base, log, device="cuda")
    out = str(tmp_path / "w.pt")
    assert replay_main([base, log, "--out", out, "--device", "cuda:0"]) == 2
    assert "--device 'cuda:0': CUDA is not available here" in capsys.readouterr().err and not os.path.exists(out)


# ---------------------------------------------------------------------------- data-parallel ZO, one process
def _two_ranks(peer):
    """A Comm of rank 0 in a world of 2 whose other rank answers ``peer(tensor)`` to every
    all_gather (default: the same tensor, an identical rank)."""
    from zeroflow.distributed import Comm

    class TwoRanks(Comm):
        def __init__(self):      # no process group: the exchange is simulated
            self.group, self.rank, self.world, self.device = None, 0, 2, torch.device("cpu")
            self.reset()

        def all_gather(self, t):
            self._count("all_gather", self._nbytes(t), 2 * self._nbytes(t))
            return torch.stack([t, peer(t)])

        def all_reduce_(self, t, op=dist.ReduceOp.SUM):
            other = peer(t)
            self._count("all_reduce", self._nbytes(t), self._nbytes(t))
            # each op as torch.distributed does it (an op mapped to another would hide a wrong op)
            if op == dist.ReduceOp.MAX:
                return torch.maximum(t, other, out=t)
            if op == dist.ReduceOp.MIN:
                return torch.minimum(t, other, out=t)
            if op == dist.ReduceOp.SUM:
                return t.add_(other)
            raise NotImplementedError(f"simulated all_reduce_: op {op}")

    return TwoRanks()


def test_a_rank_with_an_empty_shard_does_not_spoil_the_loss():
    """docs/distributed.md §1: each loss becomes sum_r n_r L_r / N. A rank whose shard is empty
    (n_r = 0; the mean loss of no samples is NaN) weighs 0: the step sees the other rank's loss,
    it is not skipped as non-finite, nor refused as "no batch size"."""
    from zeroflow.distributed import DataParallelZO

    def peer(t):     # the other rank: 4 samples, losses 0.25 / 0.75 alternately
        if t.dtype == torch.int64:          # the batch sizes
            return torch.tensor([4])
        if t.dtype != torch.float64:        # setup digests and checksums: an identical rank
            return t.clone()
        peer.k += 1
        return torch.tensor([0.25 if peer.k % 2 else 0.75], dtype=torch.float64)
    peer.k = 0
    m = make_mlp(5, 8, 2)
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, seed=3, backend="cpu")
    seen = []
    dp = DataParallelZO(opt, comm=_two_ranks(peer))
    opt.step_hook = lambda o, info: seen.append(info)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)       # a skipped step warns
        dp.step(lambda: torch.tensor(math.nan), batch_size=0)
    assert seen[0]["status"] == "ok" and seen[0]["scalars"] == [0.25, 0.75]


def _hybrid_with_an_unused_layer(seed=0):
    """A hybrid ZO-SGD in its FO phase (momentum, weight decay) over an MLP and a layer the loss
    never reaches."""
    m, extra = make_mlp(5, 8, 2, seed), torch.nn.Linear(5, 2)
    h = create("zo_sgd", list(m.parameters()) + list(extra.parameters()), lr=1e-2, momentum=0.9,
               weight_decay=1e-2, seed=3, backend="cpu", hybrid_switch=5)
    return m, extra, h


def test_a_parameter_no_rank_has_a_gradient_for_is_left_alone_in_the_fo_phase():
    """docs/distributed.md §1 (Hybrid FO -> ZO): the FO phase steps with the gradients all-reduced,
    as one process would on the concatenated batch. A parameter with no .grad on any rank got a
    zero gradient: the FO optimizer then decayed it and started its momentum, where one process
    skips it (torch.optim skips a None .grad). Ranks identical to this one (a simulated peer):
    the data-parallel run is the one-process run, bit for bit, and the unused layer keeps no grad."""
    from zeroflow.distributed import DataParallelZO
    from zeroflow.optim import train_step

    X, Y = make_data(16, 5, 2)
    runs = []
    for wrap in (False, True):
        m, extra, h = _hybrid_with_an_unused_layer()
        opt = DataParallelZO(h, comm=_two_ranks(lambda t: t.clone())) if wrap else h
        for _ in range(3):
            train_step(opt, lambda m=m: F.mse_loss(m(X), Y))
        assert extra.weight.grad is None and not h.fo.state.get(extra.weight)
        runs.append([p.detach().clone() for p in list(m.parameters()) + list(extra.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_closure_without_backward_in_the_fo_phase_warns_as_in_one_process():
    """HybridFOZO warns when an FO step finds no .grad (a ZO-style closure: it trains nothing).
    Under DataParallelZO the zero gradients it made hid that warning on every rank."""
    from zeroflow.distributed import DataParallelZO

    X, Y = make_data(16, 5, 2)
    m, _, h = _hybrid_with_an_unused_layer()
    dp = DataParallelZO(h, comm=_two_ranks(lambda t: t.clone()))
    with pytest.warns(RuntimeWarning, match="found no .grad and moved nothing"):
        dp.step(lambda: F.mse_loss(m(X), Y), batch_size=16)


def test_a_parameter_with_a_gradient_on_another_rank_only_gets_that_ranks_share():
    """A .grad present on some ranks only (their shards reach the parameter): zeros stand in for
    it on the others, and every rank steps with the reduced gradient."""
    from zeroflow.distributed import DataParallelZO

    def peer(t):        # the other rank: a gradient of 2.0 everywhere (weighted), present for all
        return torch.ones_like(t) if t.dtype == torch.uint8 else t.clone() if t.dtype == torch.int64 \
            else torch.full_like(t, 2.0)

    m, extra, h = _hybrid_with_an_unused_layer()
    dp = DataParallelZO(h, comm=_two_ranks(lambda t: t.clone()))
    dp.comm = _two_ranks(peer)
    dp.sync_grads()
    assert torch.equal(extra.weight.grad, torch.full_like(extra.weight, 2.0))


def test_which_parameters_hold_a_gradient_is_reduced_by_max_not_sum():
    """The one byte per parameter that says some rank holds a .grad is a uint8: summed over 256
    ranks that all hold one it wraps to 0, and every gradient would be left unreduced. 256
    simulated ranks, each holding a gradient: every .grad is reduced (the others' weighted
    gradients add 255.0 here)."""
    from zeroflow.distributed import DataParallelZO

    class Ranks256(type(_two_ranks(lambda t: t.clone()))):
        def all_reduce_(self, t, op=dist.ReduceOp.SUM):
            self._count("all_reduce", self._nbytes(t), self._nbytes(t))
            if op == dist.ReduceOp.MAX:          # identical ranks: the maximum is this rank's
                return t
            assert op == dist.ReduceOp.SUM, op
            # uint8 wraps as a collective's sum does
            return t.mul_(256) if t.dtype == torch.uint8 else t.add_(255.0)

    X, Y = make_data(16, 5, 2)
    m, extra, h = _hybrid_with_an_unused_layer()
    dp = DataParallelZO(h, comm=_two_ranks(lambda t: t.clone()))
    dp.comm = Ranks256()
    F.mse_loss(m(X), Y).backward()
    F.mse_loss(extra(X), Y).backward()
    params = list(m.parameters()) + list(extra.parameters())
    before = [p.grad.clone() for p in params]
    dp.sync_grads()
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g * dp._weight + 255.0)


def test_gradients_synced_for_a_step_that_did_not_come_are_reduced_again_after_zero_grad_or_a_closure():
    """DataParallelZO.sync_grads: "A zero_grad or a closure given to step voids it". A scaler that
    skipped the step leaves the sync standing; gradients computed after a zero_grad (or by the
    closure) and then stepped without that void would step with this rank's own gradient."""
    from zeroflow.distributed import DataParallelZO

    X, Y = make_data(16, 5, 2)
    m, _, h = _hybrid_with_an_unused_layer()
    dp = DataParallelZO(h, comm=_two_ranks(lambda t: t.clone()))

    def backward():
        F.mse_loss(m(X), Y).backward()

    backward()
    dp.sync_grads()                     # ... and the scaler skipped the step
    reduces = dp.comm.by_op["all_reduce"][0]
    dp.zero_grad()
    backward()
    dp.step()
    assert dp.comm.by_op["all_reduce"][0] > reduces
    backward()
    dp.sync_grads()
    reduces = dp.comm.by_op["all_reduce"][0]

    def closure():
        dp.zero_grad()
        loss = F.mse_loss(m(X), Y)
        loss.backward()
        return loss
    dp.step(closure)
    assert dp.comm.by_op["all_reduce"][0] > reduces


def test_sync_grads_weighs_the_gradients_by_this_steps_batch_sizes():
    """sync_grads() exchanges the batch sizes before the gradients: rank 0's 8 samples of 32 in
    all weigh its gradient by 1/4 (the other rank, here with the same gradient, adds its 1/4),
    not by a weight left from no exchange or an earlier step."""
    from zeroflow.distributed import DataParallelZO

    X, Y = make_data(16, 5, 2)
    m, _, h = _hybrid_with_an_unused_layer()
    dp = DataParallelZO(h, comm=_two_ranks(lambda t: torch.full_like(t, 24) if t.dtype == torch.int64
                                           else t.clone()))
    F.mse_loss(m(X), Y).backward()
    own = [p.grad.clone() for p in m.parameters()]
    dp.set_batch_size(8)
    dp.sync_grads()
    assert all(torch.equal(p.grad, g * 0.5) for p, g in zip(m.parameters(), own))

def test_every_rank_reporting_an_empty_batch_is_a_value_error():
    """A step where every rank gave batch_size=0 has no loss to weigh: ValueError, before the step."""
    from zeroflow.distributed import DataParallelZO

    m = make_mlp(5, 8, 2)
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, seed=3, backend="cpu")
    dp = DataParallelZO(opt, comm=_two_ranks(lambda t: t.clone()))
    with pytest.raises(ValueError, match="every rank reported batch_size=0"):
        dp.step(lambda: torch.tensor(1.0), batch_size=0)
    assert opt.step_count == 0


def test_a_step_through_a_detached_wrapper_is_refused_before_anything_changes():
    """DataParallelZO.detach() hands the optimizer back to single-process use. A step through
    the wrapper after it still exchanged the batch sizes, then stepped on this rank's loss alone
    (no hook combined it): each rank applied another update, silently. It raises, naming
    detach and what to do, before any exchange, step or change; the optimizer stepped
    directly (the intended use of detach) runs alone, and wrapping it again works."""
    from zeroflow.distributed import DataParallelZO

    m = make_mlp(5, 8, 2)
    X, Y = make_data(8, 5, 2)
    loss = lambda: F.mse_loss(m(X), Y)  # noqa: E731
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, seed=3, backend="cpu")
    dp = DataParallelZO(opt, comm=_two_ranks(lambda t: t.clone()))
    dp.detach()
    before = [p.detach().clone() for p in m.parameters()]
    for call in (lambda: dp.step(loss, batch_size=8), lambda: dp.step(loss)):
        with pytest.raises(RuntimeError, match=r"detached \(dp\.detach\(\).*Step the wrapped optimizer directly "
                           r"\(dp\.optimizer\.step.*or do not detach"):
            call()
    assert dp.comm.calls == 0 and opt.step_count == 0 and dp._dp_steps == 0
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    dp.optimizer.step(loss)                       # single-process behaviour: no collective
    assert opt.step_count == 1 and dp.comm.calls == 0
    dp2 = DataParallelZO(opt, comm=_two_ranks(lambda t: t.clone()))
    dp2.step(loss, batch_size=8)
    assert opt.step_count == 2 and dp2.comm.calls > 0


def test_a_step_through_a_wrapper_whose_hook_another_replaced_is_refused():
    """Another scalar hook set on the optimizer after the wrapper (a second wrapper, a user's
    hook) takes the combining away from it just as detach() does: refused the same way."""
    from zeroflow.distributed import DataParallelZO

    m = make_mlp(5, 8, 2)
    X, Y = make_data(8, 5, 2)
    loss = lambda: F.mse_loss(m(X), Y)  # noqa: E731
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, seed=3, backend="cpu")
    dp = DataParallelZO(opt, comm=_two_ranks(lambda t: t.clone()))
    opt.scalar_hook = lambda *a, **k: pytest.fail("the other hook was called")
    with pytest.raises(RuntimeError, match=r"DataParallelZO.step: this wrapper was detached \(dp\.detach\(\), or "
                                           r"another hook replaced it\)"):
        dp.step(loss, batch_size=8)
    assert dp.comm.calls == 0 and opt.step_count == 0

def test_sync_grads_through_a_detached_wrapper_is_refused_in_the_fo_phase():
    """The hybrid's FO phase: sync_grads() on a detached wrapper exchanged the batch sizes and
    the gradients for a step that the wrapper then refuses; it raises first, exchanging nothing."""
    from zeroflow.distributed import DataParallelZO

    h = _hybrid_with_an_unused_layer()[2]
    dp = DataParallelZO(h, comm=_two_ranks(lambda t: t.clone()))
    assert not dp.zeroth_order
    dp.detach()
    with pytest.raises(RuntimeError, match=r"DataParallelZO\.sync_grads: this wrapper was detached"):
        dp.sync_grads()
    assert dp.comm.calls == 0


def test_a_batch_size_check_every_or_flush_every_that_is_no_count_is_named(tmp_path):
    # set_batch_size(2.5) counted 2 samples, '4' raised "'<' not supported"; check_every='x' and
    # flush_every='x' raised int()'s "invalid literal"; check_every=-1 checked every step
    from zeroflow.distributed import DataParallelZO

    m = make_mlp(5, 8, 2)
    opt = ZOFusedSGD(m.parameters(), lr=1e-2, seed=3, backend="cpu")
    for bad in ("x", -1, 1.5):
        with pytest.raises(ValueError, match="check_every is .*; it must be an int >= 0"):
            DataParallelZO(opt, comm=_two_ranks(lambda t: t.clone()), check_every=bad)
        assert opt.scalar_hook is None
    dp = DataParallelZO(opt, comm=_two_ranks(lambda t: t.clone()))
    for bad in (2.5, "4", -1):
        with pytest.raises(ValueError, match="batch_size \\(this rank's samples in the step's batch\\) is"):
            dp.step(lambda: torch.tensor(1.0), batch_size=bad)
    assert opt.step_count == 0
    log = tmp_path / "r.zft"
    with pytest.raises(ValueError, match="flush_every is 'x'; it must be an int >= 0"):
        TrajectoryRecorder(str(log), ZOFusedSGD(m.parameters(), seed=3), model=m, flush_every="x")
    assert not log.exists()


def test_an_lr_scheduler_of_the_wrapped_optimizer_sets_the_lr_of_the_wrappers_steps():
    """DataParallelZO's docstring: an lr scheduler takes ``dp.optimizer`` (torch's schedulers
    refuse the wrapper itself, which is no torch.optim.Optimizer; the docstring said they took it)."""
    from zeroflow.distributed import DataParallelZO

    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    dp = DataParallelZO(ZOFusedSGD(m.parameters(), lr=1e-2, seed=3, backend="cpu"),
                        comm=_two_ranks(lambda t: t.clone()))
    with pytest.raises(TypeError, match="DataParallelZO is not an Optimizer"):
        torch.optim.lr_scheduler.StepLR(dp, 1)
    sched = torch.optim.lr_scheduler.StepLR(dp.optimizer, 1, gamma=0.5)
    seen = []
    dp.optimizer.step_hook = lambda o, info: seen.append(o.param_groups[0]["lr"])
    for _ in range(2):
        dp.step(lambda: F.mse_loss(m(X), Y), batch_size=16)
        sched.step()
    assert seen == [1e-2, 5e-3] and dp.param_groups[0]["lr"] == 2.5e-3


def test_check_every_k_checks_after_every_kth_step():
    """docs/distributed.md §1: ``check_every=k`` repeats the parameter/state check every k steps
    (64 bytes per rank per check): after steps k, 2k, ..., not after the others."""
    from zeroflow.distributed import DataParallelZO

    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    dp = DataParallelZO(ZOFusedSGD(m.parameters(), lr=1e-2, seed=3, backend="cpu"),
                        comm=_two_ranks(lambda t: t.clone()), check_every=3)
    checked = []
    real = dp.check_params
    dp.check_params = lambda where="": (checked.append(dp.step_count), real(where))[1]
    for _ in range(7):
        dp.step(lambda: F.mse_loss(m(X), Y), batch_size=16)
    assert checked == [3, 6]


def test_the_setup_description_holds_the_step_and_mask_epoch_counters():
    """docs/distributed.md §1 Checks: the setup digest covers "step and mask-epoch counters":
    ranks at another step (or task) would draw other z from the same seed."""
    from zeroflow.distributed import _diff_keys, describe_optimizer

    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    a = ZOFusedSGD(m.parameters(), lr=1e-2, seed=3, backend="cpu")
    before = describe_optimizer(a)
    train_steps(a, lambda: F.mse_loss(m(X), Y), 1)
    a.new_task()
    assert set(_diff_keys(before, describe_optimizer(a))) == {"step: 0 vs 1", "task: 0 vs 1"}


def test_the_setup_description_holds_the_tensor_ids_that_pick_each_parameters_z():
    """docs/distributed.md §1 Checks: ranks with the same seed, options, shapes and weights
    but other tensor ids (one optimizer had a group dropped and another added: ids [0, 2],
    a fresh one [0, 1]) perturb the second parameter with other z, so their weights part at
    the first step. The setup digest did not hold the ids: construction passed, and without
    check_every nothing noticed."""
    from zeroflow.distributed import _diff_keys, describe_optimizer

    torch.manual_seed(0)
    w, old, h = (torch.nn.Parameter(torch.randn(n)) for n in (4, 3, 3))
    a = ZOFusedSGD([{"params": [w]}, {"params": [old]}], lr=1e-2, seed=3, backend="cpu")
    a.param_groups.pop(1)
    a.add_param_group({"params": [h]})
    w2, h2 = (torch.nn.Parameter(t.detach().clone()) for t in (w, h))
    b = ZOFusedSGD([{"params": [w2]}, {"params": [h2]}], lr=1e-2, seed=3, backend="cpu")
    assert set(_diff_keys(describe_optimizer(a), describe_optimizer(b))) == {
        "tensor_ids: [0, 2] vs [0, 1]", "next_tensor_id: 3 vs 2"}
    # why it matters: the same closure on equal weights moves them apart
    for o, (x, y) in ((a, (w, h)), (b, (w2, h2))):
        o.step(lambda x=x, y=y: (x.sum() * y.sum()) ** 2)
    assert not torch.equal(h, h2)


def test_the_setup_description_of_a_resumed_optimizer_matches_the_one_it_was_saved_from():
    """An optimizer that had a group dropped and another added (ids [0, 2], next id 3), saved
    and loaded into a fresh one of the same layout: the same description, next id included
    (the id the next added group gets), though the loaded one never saw the dropped group."""
    from zeroflow.distributed import _diff_keys, describe_optimizer

    torch.manual_seed(0)
    w, old, h = (torch.nn.Parameter(torch.randn(n)) for n in (4, 3, 3))
    a = ZOFusedSGD([{"params": [w]}, {"params": [old]}], lr=1e-2, seed=3, backend="cpu")
    a.param_groups.pop(1)
    a.add_param_group({"params": [h]})
    b = ZOFusedSGD([{"params": [torch.nn.Parameter(w.detach().clone())]},
                    {"params": [torch.nn.Parameter(h.detach().clone())]}], lr=1e-2, seed=3, backend="cpu")
    b.load_state_dict(a.state_dict())
    assert describe_optimizer(b)["next_tensor_id"] == 3
    assert _diff_keys(describe_optimizer(a), describe_optimizer(b)) == []

def test_the_setup_description_of_a_tensor_appended_by_hand_holds_none():
    """A tensor appended to a group's params by hand has no tensor id: the description reads
    None for it (the step then refuses it by name) rather than stopping in a KeyError."""
    from zeroflow.distributed import describe_optimizer

    w, extra = torch.nn.Parameter(torch.randn(4)), torch.nn.Parameter(torch.randn(3))
    opt = ZOFusedSGD([w], lr=1e-2, seed=3, backend="cpu")
    opt.param_groups[0]["params"].append(extra)
    d = describe_optimizer(opt)
    assert d["tensor_ids"] == [0, None] and d["next_tensor_id"] == 1


def test_the_state_checksum_covers_a_hybrids_first_order_state():
    """docs/distributed.md §1: the state checksum covers momentum, Adam moments, history (a
    hybrid's FO optimizer state too, state_checksum): ranks whose FO momentum differs drift."""
    from zeroflow.distributed import state_checksum

    m = make_mlp(5, 8, 2)
    X, Y = make_data(16, 5, 2)
    h = create("zo_sgd", list(m.parameters()), lr=1e-2, momentum=0.9, seed=3, backend="cpu", hybrid_switch=5)
    before = state_checksum(h)
    loss = F.mse_loss(m(X), Y)
    loss.backward()
    h.step(lambda: F.mse_loss(m(X), Y))
    assert any(len(s) for s in h.fo.state.values())
    assert state_checksum(h) != before


def test_sharded_batch_sampler_keeps_a_last_batch_of_world_samples_and_a_batch_of_world():
    """docs/distributed.md §1: a last global batch with *fewer* than ``world`` samples is
    dropped: one of exactly ``world`` samples is kept (one per rank); and a global batch size
    equal to the world size is valid (one sample per rank)."""
    from zeroflow.distributed import ShardedBatchSampler

    samplers = [ShardedBatchSampler(19, 8, r, 3, shuffle=False) for r in range(3)]
    assert [len(s) for s in samplers] == [3, 3, 3]
    assert sorted(sum((list(s)[-1] for s in samplers), [])) == [16, 17, 18]
    assert [list(ShardedBatchSampler(6, 3, r, 3, shuffle=False)) for r in range(3)] == [[[0], [3]], [[1], [4]],
                                                                                         [[2], [5]]]


@pytest.mark.parametrize("n, world", [(1, 2), (3, 4), (0, 2), (0, 1)])
def test_sharded_batch_sampler_refuses_fewer_samples_than_ranks(n, world):
    """n < world: the only global batch holds fewer samples than ranks and is dropped, so every
    rank yielded 0 batches and the run trained nothing, without a word. Refused on every rank,
    naming n, the world size and the fix; n == world still gives one sample per rank."""
    from zeroflow.distributed import ShardedBatchSampler

    for rank in range(world):
        with pytest.raises(ValueError, match=f"^n={n} samples < world size {world}: .*train nothing.*Give at "
                           f"least {world} samples, or run on fewer ranks"):
            ShardedBatchSampler(n, 8, rank, world)
    assert [list(ShardedBatchSampler(world, 8, r, world, shuffle=False)) for r in range(world)] == [
        [[i]] for i in range(world)]


@pytest.mark.parametrize("args, name", [((48, 8.5, 0, 2), "global_batch_size"), ((48.0, 8, 0, 2), "n"),
                                        ((-4, 8, 0, 2), "n"), ((48, 8, 1.0, 2), "rank"), ((48, 8, 0, 2.5), "world")])
def test_sharded_batch_sampler_refuses_counts_that_are_not_ints(args, name):
    """ShardedBatchSampler(n, B, rank, world): int() of a float made a global batch of 8 from 8.5
    (other samples per step than the run was given), and a negative n a negative len()."""
    from zeroflow.distributed import ShardedBatchSampler

    with pytest.raises(ValueError, match=f"^{name}\\b.* is .*; it must be an int >= 0"):
        ShardedBatchSampler(*args)


# ---------------------------------------------------------------------------- the zeroflow command
def test_sweep_seeds_accept_zero_and_refuse_duplicates():
    """``zeroflow sweep --seeds``: "in [0, 2^31-1]" (the --seed range, 0 included); a seed
    listed twice is refused (its runs would share one folder)."""
    from zeroflow.cli import _sweep_seeds
    from zeroflow.continual.errors import ZeroflowError

    assert _sweep_seeds(argparse.Namespace(seeds="0,1", seed=None)) == [0, 1]
    with pytest.raises(ZeroflowError, match="lists 1 more than once"):
        _sweep_seeds(argparse.Namespace(seeds="1,2,1", seed=None))


def test_boolean_options_take_any_case_and_no_command_exits_2(capsys):
    """The true/false options read as in a config file, any case; ``zeroflow`` without a
    command prints its help and exits 2."""
    from zeroflow.cli import _true_false, main

    assert _true_false(" TRUE ") is True and _true_false("False") is False
    assert main([]) == 2
    assert "usage: zeroflow" in capsys.readouterr().out


def test_the_sigterm_handler_is_restored_after_a_command(tmp_path):
    """``zeroflow run`` turns SIGTERM into an interrupt for its duration only: main() gives the
    caller's handler back, also when the run ends in an error."""
    from zeroflow.cli import main

    mine = lambda *a: None  # noqa: E731
    previous = signal.signal(signal.SIGTERM, mine)
    try:
        assert main(["run", "--optimizer", "no_such", "--out", str(tmp_path / "r")]) == 2
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_ranks_other_than_0_print_nothing(monkeypatch, capsys):
    """docs/distributed.md (CLI under torchrun): only rank 0 writes the run folder and prints."""
    import zeroflow.continual.runner as runner
    from zeroflow.cli import main

    monkeypatch.setattr(runner, "run", lambda *a, **k: {"rank": 1, "run_dir": "x"})
    assert main(["run", "--no-progress"]) == 0
    assert capsys.readouterr().out == ""


def test_an_unknown_option_is_refused_by_the_subcommand(tmp_path, capsys):
    """cli.py: mistakes in what the user gave end as one ``zeroflow: error: ...`` line, exit 2,
    before anything runs; an unknown flag (a typo) is named by the subcommand's parser, not
    silently ignored (``zeroflow run --epochz 3`` would run with the default epochs)."""
    from zeroflow.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", str(tmp_path), "--epochz", "3"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "zeroflow: error: unrecognized arguments: --epochz 3 (see zeroflow report --help)" in err, err


@pytest.mark.parametrize("cmd", ["run", "sweep"])
def test_the_cli_leaves_the_process_group_its_runs_made_and_only_that(cmd, tmp_path, monkeypatch):
    """Under torchrun the runner makes the process group (init_from_env); ``zeroflow run``
    destroyed it, ``zeroflow sweep`` left it to gloo's teardown at exit, which can abort a
    finished job (an audit's find). A group the caller made before main() is the caller's."""
    import torch.distributed as dist

    import zeroflow.continual.runner as runner
    from zeroflow.cli import main
    from zeroflow.continual.errors import ZeroflowError

    store = tmp_path / "store"

    def run(*a, **k):       # what the runner does under torchrun, then a failure
        if not dist.is_initialized():
            dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        raise ZeroflowError("stopped here")

    monkeypatch.setattr(runner, "run", run)
    args = [cmd, "--no-progress", "--out", str(tmp_path / "out")]
    args += ["--optimizers", "zo_sgd"] if cmd == "sweep" else []
    try:
        assert main(args) in (1, 2)
        assert not dist.is_initialized()
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'mine'}", rank=0, world_size=1)
        assert main(args) in (1, 2)
        assert dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["empty", "folder", "folder_overwrite", "slash"])
def test_replay_out_that_is_no_file_is_refused_before_replaying(tmp_path, small_log, capsys, monkeypatch, kind):
    """``--out ""`` or a folder passed every check, the whole log was replayed, and the write
    at the end failed with ``[Errno 2] No such file or directory: ''`` (``--out ""``), or
    ``Is a directory`` (an existing folder with --overwrite): now refused first, saying what
    to give."""
    import zeroflow.replay as R

    (tmp_path / "d").mkdir()
    out = {"empty": "", "folder": str(tmp_path / "d"), "folder_overwrite": str(tmp_path / "d"),
           "slash": str(tmp_path / "new") + os.sep}[kind]
    replayed = []
    monkeypatch.setattr(R, "read_log", lambda *a, **k: replayed.append(1) or read_log(*a, **k))
    args = [small_log[0], small_log[1], "--out", out] + (["--overwrite"] if kind == "folder_overwrite" else [])
    assert replay_main(args) == 2
    err = capsys.readouterr().err
    start = "--out is empty (an unset shell variable?)" if kind == "empty" else "the output "
    assert err.startswith("zeroflow replay: error: " + start) and err.count("\n") == 1, err
    assert ("--out weights.pt" if kind == "empty" else os.path.join(out, "weights.pt")) in err, err
    assert replayed == [] and not (tmp_path / "new").exists()


def test_replay_to_file_refuses_an_empty_out_as_a_file_not_found(tmp_path, small_log):
    """The Python API's empty ``out`` is a FileNotFoundError (what writing to '' raised, and
    what callers catching OSError expect), worded as the CLI's; nothing is read or written."""
    from zeroflow.replay import replay_to_file

    with pytest.raises(FileNotFoundError, match=r"^--out is empty \(an unset shell variable\?\); give the file"):
        replay_to_file(small_log[0], small_log[1], "")


@pytest.mark.parametrize("where", ["read_log", "atomic_torch_save"])
def test_replay_interrupted_is_one_line_and_writes_nothing(tmp_path, small_log, capsys, monkeypatch, where):
    """Ctrl-C during zeroflow replay (reading a long log, replaying, writing) ended in a
    KeyboardInterrupt traceback; now one line and exit 130, as zeroflow run's, and no --out."""
    import zeroflow.replay as R

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(R, where, interrupted)
    out = str(tmp_path / "w.pt")
    assert replay_main([small_log[0], small_log[1], "--out", out]) == 130
    assert capsys.readouterr().err == f"zeroflow replay: interrupted; nothing was written to {out}\n"
    assert not os.path.exists(out)
