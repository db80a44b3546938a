"""A run stopped at any write (a full disk, Ctrl-C, a crash) resumes to exactly the result
of an uninterrupted run (docs/continual.md, "Run folder"): the accuracy matrix, the counters
and the final checkpoint (learner state) bit for bit. Short runs: the embedded digits, 1 epoch
per task, 3 tasks, the small ViT pretrained for 1 epoch (cached per module)."""
import errno
import json
import os
import shutil

import pytest
import torch

import zeroflow._atomic as atomic
from zeroflow.continual.errors import WriteFailed
from zeroflow.continual.runner import RunInterrupted, load_checkpoint, run

pytestmark = pytest.mark.usefixtures("zf_cache")   # tests/conftest.py

CFG = dict(method="ease", optimizer="zo_adam", epochs=1, pretrain_epochs=1, init_cls=4, increment=3)
SAME = ("avg", "last", "fgt", "accuracy_matrix", "accuracy_curve", "forward_passes", "eval_forward_passes",
        "iterations", "n_tasks", "class_order", "class_names", "config", "results_version")


def quiet(*a):
    pass


def _cfg():
    from zeroflow.continual.defaults import resolve
    return resolve(dict(CFG))


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    m = run(_cfg(), str(out), progress=False, log=quiet, warn=quiet)
    return m, load_checkpoint(str(out / "checkpoint.pt"))


def same_tensors(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_tensors(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same_tensors(x, y) for x, y in zip(a, b))
    return a == b


def assert_as_uninterrupted(full, out):
    m_full, ck_full = full
    m = run({}, str(out), resume=True, progress=False, log=quiet, warn=quiet)
    for k in SAME:
        assert m[k] == m_full[k], k
    for a, b in zip(m["tasks"], m_full["tasks"], strict=True):
        for k in ("iterations", "forward_passes", "accuracy", "loss_first", "loss_last", "classes"):
            assert a[k] == b[k], k
    ck = load_checkpoint(str(out / "checkpoint.pt"))
    for k in ck_full:
        if k not in ("task_stats", "peak_memory_bytes", "counters"):     # measured: seconds, bytes
            assert same_tensors(ck[k], ck_full[k]), k
    assert dict(ck["counters"], train_seconds=0) == dict(ck_full["counters"], train_seconds=0)
    assert not [f for f in os.listdir(out) if f.startswith(".")]     # no lock, no temporary file


def fail_at(monkeypatch, name: str, nth: int, error):
    """The ``nth`` atomic write of the run file ``name`` raises ``error`` (once)."""
    create = atomic._create_temp
    seen = []

    def failing(path):
        if os.path.basename(path) == name:
            seen.append(path)
            if len(seen) == nth:
                raise error()
        return create(path)

    monkeypatch.setattr(atomic, "_create_temp", failing)
    return seen


def enospc():
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


# every write of a run of 3 tasks after the folder's config.json, in order
WRITES = [("backbone.pt", 1), ("environment.json", 1), ("checkpoint.pt", 1), ("checkpoint.pt", 2),
          ("checkpoint.pt", 3), ("accuracy_matrix.csv", 1), ("accuracy_per_stage.png", 1),
          ("accuracy_matrix.png", 1), ("metrics.json", 1)]


@pytest.mark.parametrize("name,nth", WRITES)
@pytest.mark.parametrize("error", [enospc, KeyboardInterrupt, MemoryError], ids=["ENOSPC", "ctrl-c", "crash"])
def test_a_run_stopped_at_any_write_resumes_to_the_uninterrupted_result(full, tmp_path, monkeypatch, name, nth,
                                                                         error):
    out = tmp_path / "run"
    seen = fail_at(monkeypatch, name, nth, error)
    expect = {enospc: WriteFailed, KeyboardInterrupt: RunInterrupted, MemoryError: MemoryError}[error]
    with pytest.raises(expect) as e:
        run(_cfg(), str(out), progress=False, log=quiet, warn=quiet)
    assert len(seen) == nth
    if error is enospc:
        assert f"cannot write {out / name}" in str(e.value) and f"zeroflow run --resume --out {out}" in str(e.value)
    if error is KeyboardInterrupt:
        assert e.value.resumable
    assert not (out / "metrics.json").exists() and not (out / ".lock").exists()
    monkeypatch.undo()
    assert_as_uninterrupted(full, out)


@pytest.mark.parametrize("error", [enospc, KeyboardInterrupt], ids=["ENOSPC", "ctrl-c"])
def test_a_run_stopped_at_its_config_json_leaves_nothing(tmp_path, monkeypatch, error):
    out = tmp_path / "run"
    fail_at(monkeypatch, "config.json", 1, error)
    with pytest.raises((WriteFailed, RunInterrupted)) as e:
        run(_cfg(), str(out), progress=False, log=quiet, warn=quiet)
    assert "--resume" not in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("k", [1, 2])
def test_a_resumed_run_stopped_again_resumes_to_the_uninterrupted_result(full, tmp_path, monkeypatch, k):
    """Interrupted twice: a full disk at the next checkpoint of a resumed run."""
    out = tmp_path / "run"
    run(_cfg(), str(out), progress=False, log=quiet, warn=quiet, stop_after=k)
    fail_at(monkeypatch, "checkpoint.pt", 1, enospc)
    with pytest.raises(WriteFailed, match=f"its {k} finished task"):
        run({}, str(out), resume=True, progress=False, log=quiet, warn=quiet)
    monkeypatch.undo()
    assert_as_uninterrupted(full, out)


def test_a_finished_run_that_was_moved_names_its_trajectory_logs_where_they_are(tmp_path, capsys):
    """metrics.json records the trajectory logs at the path the run was written to; a finished
    run taken again after it moved (--resume, a sweep's reuse) printed those old paths for
    zeroflow replay, where no log is (or another run's is) any more."""
    from zeroflow.cli import _print_table

    first, moved = tmp_path / "first", tmp_path / "moved"
    cfg = dict(_cfg(), record=True)
    m = run(cfg, str(first), progress=False, log=quiet, warn=quiet)
    assert m["trajectory_logs"] == [str(first / "trajectory" / f"task{k}.zft") for k in (1, 2, 3)]
    first.rename(moved)
    again = run({}, str(moved), resume=True, progress=False, log=quiet, warn=quiet)
    assert again["run_dir"] == str(moved)
    assert again["trajectory_logs"] == [str(moved / "trajectory" / f"task{k}.zft") for k in (1, 2, 3)]
    assert all(os.path.isfile(p) for p in again["trajectory_logs"])
    _print_table(again, again["run_dir"], 0.0)
    assert str(first) not in capsys.readouterr().out


def _sweep(capsys, tmp_path, out, *extra):
    from zeroflow.cli import main

    cfg = tmp_path / "fast.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in CFG.items() if k not in ("method", "optimizer")))
    rc = main(["sweep", "--config", str(cfg), "--method", "aper", "--optimizers", "zo_sgd,zo_adam", "--out", str(out),
               "--no-progress", *extra])
    got = capsys.readouterr()
    return rc, got.out, got.err


def _interrupt_second_run(monkeypatch, where):
    """Ctrl-C in the sweep's second run (zo_adam): while it loads its data (before it claims
    its folder), or in its second task."""
    from zeroflow.continual import aper, runner

    if where == "setup":
        load = runner.load_run_data

        def interrupted(cfg, *a, **k):
            if cfg["optimizer"] == "zo_adam":
                raise KeyboardInterrupt
            return load(cfg, *a, **k)

        monkeypatch.setattr(runner, "load_run_data", interrupted)
    else:
        learn = aper.APER.learn_task

        def interrupted(self, t, *a, **k):
            if t == 1 and self.cfg["optimizer"] == "zo_adam":
                raise KeyboardInterrupt
            return learn(self, t, *a, **k)

        monkeypatch.setattr(aper.APER, "learn_task", interrupted)


@pytest.mark.parametrize("where", ["setup", "task"])
def test_an_interrupted_sweep_says_how_to_continue_and_continues_to_the_uninterrupted_results(
        tmp_path, capsys, monkeypatch, where):
    rc, whole, err = _sweep(capsys, tmp_path, tmp_path / "whole")
    assert rc == 0, err
    out = tmp_path / "cut"
    _interrupt_second_run(monkeypatch, where)
    rc, stdout, err = _sweep(capsys, tmp_path, out)
    assert rc == 130, err
    assert "| APER | zo_sgd |" in stdout           # the table of what finished
    assert f"run the same command with --out {out} to continue" in err, err
    # the run folder that was cut, once the run had claimed one (not while it loaded its data)
    cut = f" in {out / 'aper_zo_adam_digits'}" if where == "task" else ""
    assert f"zeroflow: sweep interrupted{cut}; run the same command" in err, err
    assert "Traceback" not in err and not (out / ".lock").exists()
    monkeypatch.undo()
    rc, stdout, err = _sweep(capsys, tmp_path, out)
    assert rc == 0, err
    for n in ("zo_sgd", "zo_adam"):
        a, b = (json.loads((d / f"aper_{n}_digits" / "metrics.json").read_text()) for d in (tmp_path / "whole", out))
        for k in SAME:
            assert a[k] == b[k], (n, k)


@pytest.mark.parametrize("how", ["force", "resume", "sweep-force"])
def test_a_folder_in_use_is_refused_with_force_and_resume_and_nothing_of_it_changes(full, tmp_path, capsys, how):
    """--force deletes a run's files only under the folder's lock: while another process
    holds it (here another open file description of this process: flock is per open file),
    --force, --resume and a sweep's --force are refused and the folder is left as it was."""
    from zeroflow.continual.errors import ZeroflowError
    from zeroflow.continual.runfolder import RunFolder

    parent = tmp_path / "sweep"
    out = parent / "aper_zo_sgd_digits" if how == "sweep-force" else tmp_path / "run"
    cfg = dict(_cfg(), method="aper", optimizer="zo_sgd") if how == "sweep-force" else _cfg()
    run(cfg, str(out), progress=False, log=quiet, warn=quiet, stop_after=1)
    before = {f: (out / f).read_bytes() for f in sorted(os.listdir(out))}
    holder = RunFolder(str(out)).claim(quiet)
    try:
        if how == "sweep-force":
            rc, _, err = _sweep(capsys, tmp_path, parent, "--force")
            assert rc == 2 and f"{out} is in use by pid {os.getpid()}" in err
        else:
            with pytest.raises(ZeroflowError, match=f"run folder {out} is in use by pid {os.getpid()}"):
                run({} if how == "resume" else cfg, str(out), progress=False, log=quiet, warn=quiet,
                    **{how: True})
        assert {f: (out / f).read_bytes() for f in sorted(os.listdir(out)) if f != ".lock"} == before
    finally:
        holder.release()


KILLED_WRITER = """
import os, signal, sys
import zeroflow._atomic as atomic
from zeroflow.continual.defaults import resolve
from zeroflow.continual.runner import run
save, seen = atomic.atomic_torch_save, []
def killed(obj, path):
    seen.append(path)
    if len(seen) == 3:      # backbone.pt, checkpoint 1, then half of checkpoint 2
        def half(f):
            f.write(b"half a checkpoint")
            f.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        atomic.atomic_write(path, half)
    return save(obj, path)
atomic.atomic_torch_save = killed
import zeroflow.continual.runner as runner
runner.atomic_torch_save = killed
run(resolve(dict(CFG)), sys.argv[1], progress=False, log=print)
"""


def test_a_run_killed_while_writing_its_checkpoint_resumes_to_the_uninterrupted_result(full, tmp_path):
    """SIGKILL (the OOM killer, a power cut of the process) leaves its lock file and the
    temporary file of the checkpoint it was writing: the resume takes the lock over, removes
    the temporary file and continues from the last checkpoint to the uninterrupted result."""
    import signal
    import subprocess
    import sys

    out = tmp_path / "run"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(root, "python"), root]))
    killed = subprocess.run([sys.executable, "-c", f"CFG = {CFG!r}\n" + KILLED_WRITER, str(out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    left = sorted(os.listdir(out))
    assert ".lock" in left and any(f.startswith(".tmp-checkpoint.pt.") for f in left), left
    assert load_checkpoint(str(out / "checkpoint.pt"))["completed"] == 1
    copy = tmp_path / "elsewhere" / "copy"        # the folder as it was left, copied (lock and all)
    shutil.copytree(out, copy)
    assert_as_uninterrupted(full, out)
    assert_as_uninterrupted(full, copy)
    assert json.loads((copy / "metrics.json").read_text())["run_dir"] == str(copy)


def test_a_run_stopped_in_its_setup_removes_the_folders_it_created_above_its_own(tmp_path, monkeypatch):
    """--out a/b/run where a does not exist: a run that stops before its config.json (here
    Ctrl-C while its network is built) removed run but left a/b behind, empty."""
    from zeroflow.continual import runner

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "build_network", interrupted)
    (tmp_path / "kept").mkdir()
    for out in (tmp_path / "a" / "b" / "run", tmp_path / "kept" / "c" / "run"):
        with pytest.raises(RunInterrupted) as e:
            run(_cfg(), str(out), progress=False, log=quiet, warn=quiet)
        assert not e.value.resumable
    assert sorted(os.listdir(tmp_path)) == ["kept"] and os.listdir(tmp_path / "kept") == []


def test_a_crash_after_the_first_task_says_what_is_kept_and_how_to_continue(full, tmp_path, monkeypatch):
    """A crash in task 2 (a bug, CUDA out of memory) ended in a bare traceback: nothing said
    that task 1 is checkpointed and the run continues with --resume."""
    from zeroflow.continual import ease

    learn = ease.EASE.learn_task

    def crashes(self, t, *a, **k):
        if t == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return learn(self, t, *a, **k)

    monkeypatch.setattr(ease.EASE, "learn_task", crashes)
    out, warned = tmp_path / "run", []
    with pytest.raises(RuntimeError, match="simulated"):
        run(_cfg(), str(out), progress=False, log=quiet, warn=warned.append)
    assert warned == [f"the run in {out} stopped on the error below (its 1 finished task(s) are kept); once its "
                      f"cause is fixed, continue the run with: zeroflow run --resume --out {out}"]
    monkeypatch.undo()
    assert_as_uninterrupted(full, out)



@pytest.mark.parametrize("task, error", [(0, RuntimeError), (1, "ZeroflowError")])
def test_a_crash_warning_says_when_no_task_was_kept_and_a_zeroflow_error_gets_none(tmp_path, monkeypatch, task,
                                                                                   error):
    """A crash in the first task keeps no task, and says so; a ZeroflowError says what to do
    itself, and gets no warning beside it."""
    from zeroflow.continual import ease
    from zeroflow.continual.errors import ZeroflowError

    error = ZeroflowError if error == "ZeroflowError" else error
    learn = ease.EASE.learn_task

    def crashes(self, t, *a, **k):
        if t == task:
            raise error("stopped (simulated)")
        return learn(self, t, *a, **k)

    monkeypatch.setattr(ease.EASE, "learn_task", crashes)
    out, warned = tmp_path / "run", []
    with pytest.raises(error, match="simulated"):
        run(_cfg(), str(out), progress=False, log=quiet, warn=warned.append)
    assert warned == ([] if error is ZeroflowError else [
        f"the run in {out} stopped on the error below (no task had finished yet); once its cause is fixed, "
        f"continue the run with: zeroflow run --resume --out {out}"])


def test_a_crash_before_config_json_is_written_gets_no_resume_advice(tmp_path, monkeypatch):
    """A fresh run that fails before its config.json exists is no run to resume (its folder is
    removed again): no warning tells to continue it with --resume."""
    from zeroflow.continual import runner

    def fails(path, obj):
        raise RuntimeError("config not written (simulated)")

    monkeypatch.setattr(runner, "atomic_write_json", fails)
    out, warned = tmp_path / "run", []
    with pytest.raises(RuntimeError, match="simulated"):
        run(_cfg(), str(out), progress=False, log=quiet, warn=warned.append)
    assert warned == [] and not out.exists()

@pytest.mark.parametrize("checkpoint", [True, False])
def test_a_stale_lock_taken_over_names_a_kept_checkpoint_only_where_there_is_one(tmp_path, checkpoint):
    """The takeover warning said "its last checkpoint is kept" also for a writer killed in its
    setup, or a sweep's folder, where there is none."""
    from zeroflow.continual.runfolder import RunFolder

    (tmp_path / ".lock").write_text('{"pid": 1, "host": "h", "since": "then"}')
    if checkpoint:
        (tmp_path / "checkpoint.pt").write_bytes(b"x")
    warned = []
    RunFolder(str(tmp_path)).claim(warned.append).release()
    assert len(warned) == 1 and "left by pid 1 on h" in warned[0]
    assert ("its last checkpoint is kept" in warned[0]) == checkpoint


def test_a_resume_keeps_the_environment_the_finished_tasks_ran_in(tmp_path, monkeypatch):
    """A resume (on another machine, other versions) rewrote environment.json with its own
    environment: the one the finished tasks ran in was lost without a word."""
    import json as _json

    from zeroflow.continual import runner

    out = tmp_path / "run"
    run(_cfg(), str(out), progress=False, log=quiet, warn=quiet, stop_after=1)
    first = _json.loads((out / "environment.json").read_text())
    for k in (1, 2):
        monkeypatch.setattr(runner, "environment", lambda device, backend, k=k: {"machine": f"resume {k}"})
        run({}, str(out), resume=True, progress=False, log=quiet, warn=quiet, stop_after=k + 1)
    env = _json.loads((out / "environment.json").read_text())
    assert env == dict(first, resumed=[{"machine": "resume 1"}, {"machine": "resume 2"}])


@pytest.mark.parametrize("left", ["{", "[1]", None])
def test_a_resume_over_a_damaged_or_missing_environment_writes_its_own(tmp_path, monkeypatch, left):
    """environment.json cut short, not an object, or missing (a run stopped before it was
    written) is no reason to refuse the resume: the resume writes its own environment."""
    import json as _json

    from zeroflow.continual import runner

    out = tmp_path / "run"
    run(_cfg(), str(out), progress=False, log=quiet, warn=quiet, stop_after=1)
    if left is None:
        (out / "environment.json").unlink()
    else:
        (out / "environment.json").write_text(left)
    monkeypatch.setattr(runner, "environment", lambda device, backend: {"machine": "resume"})
    run({}, str(out), resume=True, progress=False, log=quiet, warn=quiet, stop_after=2)
    assert _json.loads((out / "environment.json").read_text()) == {"machine": "resume"}


# one class per task: the temporary head's cross-entropy is constant, as the optimizer warns
@pytest.mark.filterwarnings("ignore:ZOFused.*every loss difference:RuntimeWarning")
def test_metrics_lists_the_trajectory_logs_in_task_order(tmp_path):
    """With 10 tasks or more, metrics.json's trajectory_logs were sorted as text (task1, task10,
    task2, ...), so the k-th entry was not task k's log."""
    from zeroflow.continual.defaults import resolve

    out = tmp_path / "run"
    cfg = resolve(dict(CFG, optimizer="zo_sgd", init_cls=1, increment=1, record=True))
    m = run(cfg, str(out), progress=False, log=quiet, warn=quiet)
    assert m["n_tasks"] == 10
    assert m["trajectory_logs"] == [str(out / "trajectory" / f"task{k}.zft") for k in range(1, 11)]
    with open(out / "metrics.json") as f:
        assert json.load(f)["trajectory_logs"] == m["trajectory_logs"]
