"""Run folders through the real CLI (issue 10): one writer per folder, nothing written for a run
that cannot start, finished runs never taken for another configuration, interrupts that say
how to resume, --record logs that zeroflow replay turns into the run's weights, and files
that follow the umask.

Runs are short: 1 epoch per task and a small ViT pretrained for 1 epoch (cached per module)."""
import io
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch

from zeroflow.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = "epochs: 1\npretrain_epochs: 1\n"

# A `zeroflow` process that stops at the start of task 2 (after task 1's checkpoint) until the
# file $ZF_GO exists, having created $ZF_HELD: a run that is deterministically in progress.
HELD_RUN = """
import os, sys, time
import zeroflow.continual.ease as ease
learn_task = ease.EASE.learn_task
def held(self, t, *a, **k):
    if t == 1:
        open(os.environ["ZF_HELD"], "w").close()
        while not os.path.exists(os.environ["ZF_GO"]):
            time.sleep(0.05)
    return learn_task(self, t, *a, **k)
ease.EASE.learn_task = held
from zeroflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """ZEROFLOW_CACHE (this process and subprocesses) and the fast config file."""
    base = tmp_path_factory.mktemp("runfolder")
    old = os.environ.get("ZEROFLOW_CACHE")
    os.environ["ZEROFLOW_CACHE"] = str(base / "cache")
    (base / "fast.yaml").write_text(FAST)
    sub = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]))
    yield {"fast": str(base / "fast.yaml"), "env": sub}
    if old is None:
        os.environ.pop("ZEROFLOW_CACHE", None)
    else:
        os.environ["ZEROFLOW_CACHE"] = old


def zf(capsys, *args):
    """``zeroflow ARGS`` in this process: (exit code, stdout, stderr)."""
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def start_held(env, tmp_path, *args):
    held, go = tmp_path / "held", tmp_path / "go"
    proc = subprocess.Popen([sys.executable, "-c", HELD_RUN, *map(str, args)], text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dict(env["env"], ZF_HELD=str(held), ZF_GO=str(go)))
    deadline = time.time() + 300
    while not held.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"the held run did not reach task 2: {proc.communicate()}")
        time.sleep(0.1)
    return proc, go


def metrics(folder):
    with open(os.path.join(folder, "metrics.json")) as f:
        return json.load(f)


# ---------------------------------------------------------------- one writer per folder
def test_a_second_run_on_a_folder_in_use_is_refused_and_the_first_finishes_intact(env, tmp_path):
    out = tmp_path / "run"
    first, go = start_held(env, tmp_path, "run", "--config", env["fast"], "--seed", 1, "--out", out, "--no-progress")
    try:
        second = subprocess.run([sys.executable, "-m", "zeroflow", "run", "--config", env["fast"], "--seed", "2",
                                 "--out", str(out), "--no-progress"], env=env["env"], capture_output=True, text=True,
                                timeout=300)
        assert second.returncode == 2, second.stderr
        assert f"zeroflow: error: run folder {out} is in use by pid {first.pid}" in second.stderr
        assert "Traceback" not in second.stderr and second.stdout == ""
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert metrics(out)["config"]["seed"] == 1           # the first run's results, complete
    assert sorted(os.listdir(out)) == ["accuracy_matrix.csv", "accuracy_matrix.png", "accuracy_per_stage.png",
                                       "backbone.pt", "checkpoint.pt", "config.json", "environment.json",
                                       "metrics.json"]  # the lock is gone, nothing of the second run


def test_sigterm_stops_cleanly_and_resume_finishes(env, tmp_path, capsys):
    out = tmp_path / "run"
    proc, _ = start_held(env, tmp_path, "run", "--config", env["fast"], "--out", out, "--no-progress")
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130
    assert f"interrupted after task 1/5 (finished tasks are checkpointed in {out}); continue with: " \
           f"zeroflow run --resume --out {out}" in stderr
    assert not (out / ".lock").exists() and not (out / "metrics.json").exists()
    rc, stdout, err = zf(capsys, "run", "--resume", "--out", out, "--no-progress")
    assert rc == 0, err
    assert f"resuming {out} after task 1/5" in stdout and len(metrics(out)["accuracy_curve"]) == 5


def test_a_run_whose_stdout_reader_went_away_stops_like_ctrl_c_without_a_traceback(env, tmp_path, capsys):
    """`zeroflow run ... | head -1`: the next line of the run raised BrokenPipeError, which ended
    in 'stopped on the error below ... once its cause is fixed' over a traceback (exit 1). The run
    stops as on Ctrl-C now: its checkpoint kept, one line on stderr saying how to continue, exit
    141 (128 + SIGPIPE), and nothing written at exit either ('Exception ignored ...')."""
    out = tmp_path / "run"
    proc, go = start_held(env, tmp_path, "run", "--config", env["fast"], "--out", out, "--no-progress")
    proc.stdout.close()         # the reader goes away while task 2 trains
    go.touch()
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=300) == 141, stderr
    assert stderr.splitlines()[-1] == (
        f"zeroflow: stopped (stdout was closed by its reader) after task 2/5 (finished tasks are checkpointed in "
        f"{out}); continue with: zeroflow run --resume --out {out}"), stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr and "warning" not in stderr, stderr
    assert not (out / ".lock").exists() and not (out / "metrics.json").exists()
    rc, stdout, err = zf(capsys, "run", "--resume", "--out", out, "--no-progress")
    assert rc == 0, err
    assert f"resuming {out} after task 2/5" in stdout and len(metrics(out)["accuracy_curve"]) == 5


def test_a_report_whose_stdout_reader_went_away_ends_without_a_traceback(tmp_path):
    """`zeroflow report runs | head -1`: a traceback of BrokenPipeError at exit (exit 120)."""
    _finished_run(tmp_path / "r")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline(); from zeroflow.cli import "
                             "main; sys.exit(main(sys.argv[1:]))", "report", str(tmp_path)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT])))
    proc.stdout.close()         # closed before the report is written: deterministic
    proc.stdin.write("go\n")
    proc.stdin.close()
    stderr = proc.stderr.read()
    proc.stderr.close()
    assert proc.wait(timeout=300) == 141, stderr
    assert stderr == "zeroflow: stopped (stdout was closed by its reader)\n", stderr


@pytest.mark.parametrize("args, runs", [
    # resolve's warning, the first thing written: a BrokenPipeError traceback (exit 1)
    (["run", "--dataset", "digits", "--data-root", "elsewhere", "--epochs", "0", "--no-progress"], None),
    # the refusal itself could not be said: a traceback in main's handler (exit 1)
    (["run", "--dataset", "digits", "--epochs=-1"], None),
    # report's 'skipped' line on stderr (a damaged run), before its table
    (["report"], "damaged"),
    # a Python warning (warnings.warn, torch's) on a closed stderr, the table into a file: the
    # warnings module dropped the error and its line failed at exit ('Exception ignored', exit 120)
    (["warned", "report"], "finished"),
])
def test_a_closed_pipe_of_stdout_and_stderr_ends_the_command_as_a_closed_stdout_does(tmp_path, args, runs):
    """`zeroflow run ... 2>&1 | head -3`: stderr is the pipe stdout is, and a warning or error
    written after its reader went away raised BrokenPipeError, a traceback nobody can read and
    exit 1. Every write to the closed pipe ends the command alike now: exit 141, nothing written
    at exit ('Exception ignored ...', exit 120), and no run folder left behind."""
    out = tmp_path / "out"
    if runs == "damaged":
        (tmp_path / "runs" / "damaged").mkdir(parents=True)
        (tmp_path / "runs" / "damaged" / "config.json").write_text("{")
    elif runs == "finished":
        (tmp_path / "runs").mkdir()
        _finished_run(tmp_path / "runs" / "r")
    args = [*args, str(tmp_path / "runs")] if runs else [*args, "--out", str(out)]
    warned = args[0] == "warned"
    read, write = os.pipe()
    # Python's default buffering (a lease or CI may export PYTHONUNBUFFERED, a user's shell does not)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env["PYTHONPATH"] = os.pathsep.join([os.path.join(ROOT, "python"), ROOT])
    code = ("import sys, warnings; sys.stdin.readline(); from zeroflow import cli\n"
            "if sys.argv[1] == 'warned':\n"
            "    real = cli.cmd_report\n"
            "    cli.cmd_report = lambda a, started: (warnings.warn('late'), real(a, started))[1]\n"
            "    sys.argv.pop(1)\n"
            "sys.exit(cli.main(sys.argv[1:]))")
    with open(tmp_path / "table.md", "w") as table:     # the table of the warned report
        proc = subprocess.Popen([sys.executable, "-c", code, *args], text=True, stdin=subprocess.PIPE,
                                stdout=table if warned else write, stderr=write, cwd=tmp_path, env=env)
    os.close(write)
    os.close(read)          # the reader is gone before anything is written: deterministic
    proc.stdin.write("go\n")
    proc.stdin.close()
    assert proc.wait(timeout=300) == 141
    assert not out.exists()
    if warned:
        assert "### Accuracy (Table 1 style)" in (tmp_path / "table.md").read_text()     # written whole


def test_a_report_whose_stdout_and_stderr_reader_went_away_still_exits_141(tmp_path):
    """`zeroflow report runs 2>&1 | head -0`: stderr is the closed pipe too, so the one line that
    says why it stopped cannot be written either; it ends as a closed stdout does (exit 141), not
    with a BrokenPipeError out of that line."""
    _finished_run(tmp_path / "r")
    proc = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline(); from zeroflow.cli import "
                             "main; sys.exit(main(sys.argv[1:]))", "report", str(tmp_path)], text=True,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT])))
    proc.stdout.close()         # closed before the report is written: deterministic
    proc.stdin.write("go\n")
    proc.stdin.close()
    assert proc.wait(timeout=300) == 141


def test_a_run_killed_outright_keeps_the_lines_of_its_finished_tasks(env, tmp_path):
    """`zeroflow run ... > run.log` then a SIGKILL (the OOM killer, a lease's limit): the
    "task 1/5: accuracy ..." line of the task it had finished never reached the file (stdout
    into a file or pipe is block-buffered and a SIGKILL flushes nothing), nor did it show in a
    `tail -f` while the run went on. Each line of the run's log is flushed as it is printed."""
    proc, _ = start_held(env, tmp_path, "run", "--config", env["fast"], "--out", tmp_path / "run", "--no-progress")
    proc.kill()
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, stderr
    assert "task 1/5: accuracy on " in stdout, stdout


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(env, tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": "h", "since": "then"}))
    # what the dead writer left half-written between its temporary file and the rename: it
    # stayed there for good (a checkpoint-sized file per kill), --resume and --force included
    (out / ".tmp-checkpoint.pt.0a1b2c3d").write_bytes(b"x" * 1000)
    (out / "trajectory").mkdir()
    (out / "trajectory" / ".tmp-task1.base.pt.deadbeef").write_bytes(b"x")
    (out / ".tmp-notes.txt.12345678").write_text("the user's own")     # not a run file: kept
    rc, _, err = zf(capsys, "run", "--config", env["fast"], "--out", out, "--no-progress")
    assert rc == 0, err
    assert f"taking over the lock of {out}: it was left by pid {int(dead.stdout)} on h" in err
    assert "removed the 2 temporary file(s) it left unfinished (.tmp-checkpoint.pt.0a1b2c3d, " \
           "trajectory/.tmp-task1.base.pt.deadbeef)" in err
    assert not (out / ".lock").exists() and (out / "metrics.json").exists()
    assert sorted(p.name for p in out.rglob(".tmp-*")) == [".tmp-notes.txt.12345678"]


def test_a_claim_that_fails_after_taking_the_lock_gives_it_back(tmp_path):
    # Anything failing after the flock (the lock's own write on a full disk, removing a stale
    # temporary file, the warning) left the lock's fd open and locked: the same process could
    # not claim the folder again, told it was "in use by another process" (an audit's find).
    from zeroflow.continual.errors import WriteFailed
    from zeroflow.continual.runfolder import RunFolder
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").write_text(json.dumps({"pid": 1, "host": "h", "since": "then"}))    # a stale holder

    def failing_warn(message):
        raise OSError(28, "No space left on device")
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(WriteFailed, match=r"cannot write .*\.lock: No space left"):
        RunFolder(str(out)).claim(failing_warn)
    assert set(os.listdir("/proc/self/fd")) <= fds
    again = RunFolder(str(out)).claim(lambda message: None)
    again.release()
    assert not (out / ".lock").exists()


def test_temporary_files_of_a_killed_writer_go_also_when_its_lock_file_was_deleted(tmp_path):
    """A killed run leaves .lock and the temporary file of its unfinished write (a checkpoint's
    is checkpoint-sized, one more per kill); the next claim removed them only when it found that
    .lock: after the usual clean-up of a stale lock by hand (rm .lock), they stayed for good.
    Guards: whoever holds the lock removes them, with a warning naming them; other files stay."""
    from zeroflow.continual.runfolder import RunFolder
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / ".tmp-checkpoint.pt.0badf00d").write_bytes(b"x" * 100)
    (out / ".tmp-notes.txt.0badf00d").write_text("mine")        # not a run file's: kept
    said = []
    folder = RunFolder(str(out)).claim(said.append)
    folder.release()
    assert not (out / ".tmp-checkpoint.pt.0badf00d").exists() and (out / ".tmp-notes.txt.0badf00d").exists()
    assert said == [f"{out}: removed the 1 temporary file(s) a killed writer left unfinished "
                    f"(.tmp-checkpoint.pt.0badf00d)"]


def test_run_without_out_inside_a_run_folder_is_refused_before_making_runs(tmp_path, capsys, monkeypatch):
    """zeroflow run without --out writes runs/<time>_... below the current folder; inside a run
    folder that is refused (the report would not see it), but only after runs/ had been made
    there, which stayed in the run folder. Guards: refused before anything is created."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import atomic_write_json
    atomic_write_json(str(tmp_path / "config.json"), resolve({}))
    monkeypatch.chdir(tmp_path)
    rc, _, err = zf(capsys, "run", "--epochs", 1, "--no-progress")
    assert rc == 2 and f"is inside the run folder {tmp_path}" in err
    assert sorted(os.listdir(tmp_path)) == ["config.json"]


def test_a_default_folder_whose_claim_fails_is_removed(tmp_path, monkeypatch):
    """zeroflow run without --out makes runs/<time>_..., then claims it. A claim that failed (a
    filesystem without flock: ENOLCK) left that folder behind, one more per try, with the .lock
    file and its fd left open, though a run that cannot start leaves no folder (docs/continual.md);
    so did --out NEW."""
    import errno
    import fcntl

    from zeroflow.continual.errors import WriteFailed
    from zeroflow.continual.runfolder import RunFolder
    from zeroflow.continual.runner import claim_default_folder

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fcntl, "flock", no_locks)
    fds = set(os.listdir("/proc/self/fd"))
    with pytest.raises(WriteFailed, match="No locks available"):
        claim_default_folder({"method": "ease", "optimizer": "zo_adam", "dataset": "digits"}, lambda m: None)
    assert os.listdir(tmp_path / "runs") == []
    with pytest.raises(WriteFailed, match="No locks available"):       # --out NEW: the same
        RunFolder(str(tmp_path / "new")).claim(lambda m: None)
    assert not (tmp_path / "new").exists()
    assert set(os.listdir("/proc/self/fd")) <= fds          # the lock file's fd is closed


# ---------------------------------------------------------------- a run that cannot start writes nothing
BAD = [
    (["--lr", "-1"], "--lr must be >= 0 (got -1)"),
    (["--zo-eps", "0"], "--zo-eps must be > 0"),
    (["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (["--momentum", "-3"], "--momentum must be in [0, 1)"),
    (["--backend", "nope"], "unknown backend 'nope'; valid: auto, cpu, cuda, triton, torch"),
    (["--device", "cpu", "--backend", "cuda"], "--backend cuda cannot run on cpu"),
    (["--num-workers", "-1"], "--num-workers must be >= 0"),
    (["--q", "0"], "--q must be >= 1"),
    (["--sparsity", "1.5"], "--sparsity must be in [0, 1)"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--epochs", "-1"], "--epochs must be >= 0"),
    (["--ease-alpha", "-5"], "--ease-alpha must be >= 0"),
    (["--stop-after", "0"], "--stop-after must be an integer >= 1"),
    (["--stop-after", "-1"], "--stop-after must be an integer >= 1"),
    (["--threads", "0"], "--threads must be >= 1"),
    (["--seed", "-1"], "--seed must be in [0, 2147483647]"),
    (["--checkpoint", "w.pth"], "--checkpoint is for the ViT backbone"),
    (["--record", "--optimizer", "fo_adam"], "--record: the steps of fo_adam cannot be replayed"),
    (["--device", "nonsense"], "--device 'nonsense'"),
    (["--resume", "--force"], "give one of them"),
    (["--init-cls", "11"], "--init-cls 11 exceeds the 10 classes of digits; give at most 10"),
    (["--dataset", "cifar100", "--data-root", "{tmp}/nodata"], "CIFAR-100 not found"),
    (["--config", "{tmp}/ten.yaml"], "epochs in {tmp}/ten.yaml must be an integer (got 'ten')"),
    (["--config", "{tmp}/broken.yaml"], "{tmp}/broken.yaml: cannot parse it: line 2, column 5"),
    (["--config", "{tmp}/lr.yaml"], "lr in {tmp}/lr.yaml has no 'adam' entry"),
] + ([] if torch.cuda.is_available() else [(["--device", "cuda"], "CUDA is not available")])


@pytest.mark.parametrize("args,needle", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_before_anything_is_written(tmp_path, capsys, args, needle):
    (tmp_path / "ten.yaml").write_text("epochs: ten\n")
    (tmp_path / "broken.yaml").write_text("epochs: [1\n  lr: 2\n")
    (tmp_path / "lr.yaml").write_text("lr: {sgd: 0.1}\n")
    args = [a.format(tmp=tmp_path) for a in args]
    rc, out, err = zf(capsys, "run", "--out", tmp_path / "r", *args)
    assert rc == 2
    assert err.startswith("zeroflow: error: ") and needle.format(tmp=tmp_path) in err, err
    assert "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "r").exists()


def test_triton_backend_without_interpreter_on_cpu_is_refused(env, tmp_path):
    sub = {k: v for k, v in env["env"].items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "zeroflow", "run", "--device", "cpu", "--backend", "triton", "--out",
                          str(tmp_path / "r")], env=sub, capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and res.stderr.startswith("zeroflow: error: --backend triton cannot run on cpu")
    assert not (tmp_path / "r").exists()


def test_a_failure_after_the_folder_is_claimed_removes_it(tmp_path, capsys):
    """Unreadable ViT weights fail while the network is built, after the claim."""
    from PIL import Image
    import numpy as np
    for split in ("train", "test"):
        for c in range(2):
            d = tmp_path / "data" / "cub" / split / f"c{c}"
            d.mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "0.png")
    (tmp_path / "garbage.pth").write_bytes(b"not weights")
    (tmp_path / "tiny.yaml").write_text("model_kwargs: {depth: 1, embed_dim: 32, num_heads: 2}\n")
    rc, _, err = zf(capsys, "run", "--dataset", "cub", "--data-root", tmp_path / "data", "--init-cls", "2",
                    "--increment", "2", "--checkpoint", tmp_path / "garbage.pth", "--config", tmp_path / "tiny.yaml",
                    "--out", tmp_path / "r")
    assert rc == 2 and "could not load backbone weights" in err
    assert not (tmp_path / "r").exists()


def test_unwritable_outputs_say_cannot_write_with_the_users_path(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    if os.geteuid() == 0:       # root writes anywhere a mode allows; sysfs refuses even root
        readonly = "/sys/zeroflow-test-run"
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        readonly = str(tmp_path / "ro" / "run")
    for out, needle in ((tmp_path / "file", f"cannot write run folder {tmp_path / 'file'}: it is a file"),
                        (tmp_path / "file" / "run", f"cannot write {tmp_path / 'file' / 'run'}: Not a directory"),
                        (readonly, f"cannot write {readonly}: ")):
        rc, _, err = zf(capsys, "run", "--out", out)
        assert rc == 2 and err.startswith("zeroflow: error: ") and needle in err, err
        assert ".tmp-" not in err and "Traceback" not in err
    report_ro = "/sys/zeroflow-test-report.md" if os.geteuid() == 0 else str(tmp_path / "ro" / "r.md")
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "metrics.json").write_text(json.dumps({
        "avg": 80.0, "last": 70.0, "fgt": 5.0, "peak_memory_bytes": 1e9, "forward_passes": 900,
        "config": {"method": "ease", "optimizer": "zo_adam", "dataset": "digits"}}))
    rc, _, err = zf(capsys, "report", tmp_path / "done", "--output", report_ro)
    assert rc == 2 and f"zeroflow: error: cannot write {report_ro}: " in err
    rc, _, err = zf(capsys, "report", tmp_path / "done", "--output", tmp_path / "nofolder" / "r.md")
    assert rc == 2 and "its folder does not exist" in err


# ---------------------------------------------------------------- finished runs, --force, --resume
def test_run_refuses_a_finished_run_and_force_replaces_it(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert zf(capsys, "run", "--config", env["fast"], "--out", out, "--no-progress")[0] == 0
    before = metrics(out)
    rc, _, err = zf(capsys, "run", "--config", env["fast"], "--out", out, "--seed", 7)
    assert rc == 2 and f"{out} already holds a finished run with another configuration (seed: 1993 there, 7 " \
                       f"requested)" in err and "--force" in err
    assert metrics(out) == before
    (out / ".tmp-metrics.json.0badf00d").write_text("{")      # a killed writer's, between two runs
    rc, _, err = zf(capsys, "run", "--config", env["fast"], "--out", out, "--seed", 7, "--force", "--no-progress")
    assert rc == 0 and f"--force: deleting the finished run in {out} (seed: 1993 there, 7 requested)" in err
    assert metrics(out)["config"]["seed"] == 7 and not list(out.glob(".tmp-*"))


def _finished_run(out, **metrics):
    """A finished one-epoch digits run folder ``out`` holding a config.json and a metrics.json
    with the entries load_metrics requires (Avg 90, Last 80, Fgt 5) and ``metrics``."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import atomic_write_json
    out.mkdir()
    cfg = resolve({"epochs": 1})
    atomic_write_json(str(out / "config.json"), cfg)
    atomic_write_json(str(out / "metrics.json"), {
        "config": cfg, "avg": 90.0, "last": 80.0, "fgt": 5.0, "forward_passes": 10, "peak_memory_bytes": 2 ** 20,
        "results_version": 2} | metrics)
    return out


def test_resume_of_a_finished_run_that_was_moved_names_the_folder_where_it_is(tmp_path, capsys):
    """zeroflow run --resume --out DIR on a finished run prints its table and "run folder: DIR".
    It printed the run_dir recorded in metrics.json, the folder the run was written in, so a
    run moved (or given by a relative path from another directory) was named where it is not."""
    out = _finished_run(tmp_path / "moved", peak_memory_kind="cpu_peak_rss", seconds=1.0, run_dir="/elsewhere/run")
    rc, stdout, _ = zf(capsys, "run", "--resume", "--out", out, "--no-progress")
    assert rc == 0 and f"run folder: {out}\n" in stdout and "/elsewhere" not in stdout


def test_resume_of_a_finished_run_prints_a_metrics_json_that_records_only_what_the_report_reads(tmp_path, capsys):
    """load_metrics accepts a metrics.json with the report's entries only (by hand, or by an
    older zeroflow); zeroflow run --resume on such a finished run ended in a KeyError traceback
    ('peak_memory_kind', then 'seconds') while printing its table. Guards: printed, the missing
    entries said to be so."""
    out = _finished_run(tmp_path / "old")
    rc, stdout, _ = zf(capsys, "run", "--resume", "--out", out, "--no-progress")
    assert rc == 0 and "| 90.00 | 80.00 | 5.00 |" in stdout
    assert "peak memory: 1 MiB (kind not recorded)   time: " in stdout and "in the tasks" not in stdout


def test_a_pretraining_cache_that_cannot_be_written_is_said_once(env, tmp_path, capsys, monkeypatch):
    """$ZEROFLOW_CACHE not writable (read-only, or under a file as here, which root cannot
    write either): the pretrained small ViT was not cached without a word, and every run
    pretrained it again. A warning names the folder, the variable and the OSError, once."""
    from zeroflow.continual import backbones
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "cache"
    monkeypatch.setenv("ZEROFLOW_CACHE", str(cache))
    monkeypatch.setattr(backbones, "_UNWRITABLE_CACHES", set(), raising=False)   # warned by another test
    rc, _, err = zf(capsys, "run", "--config", env["fast"], "--out", tmp_path / "a", "--stop-after", 1, "--no-progress")
    assert rc == 0, err
    assert f"zeroflow: warning: the pretrained small ViT could not be cached in {cache} ($ZEROFLOW_CACHE): " \
           f"NotADirectoryError: " in err and "the next run will pretrain it again" in err, err
    rc, _, err = zf(capsys, "run", "--config", env["fast"], "--out", tmp_path / "b", "--stop-after", 1, "--no-progress")
    assert rc == 0 and "could not be cached" not in err, err         # once per process (a sweep's runs)


def test_a_fresh_run_neither_loads_nor_keeps_a_backbone_pt_another_run_left(env, tmp_path, capsys):
    """Only a resumed run's backbone.pt is its own. A fresh run loaded any backbone.pt it found
    in --out (left by a --force cut short, or by a run whose other files were deleted by hand:
    the folder then holds no run) and kept it, so it ran on another run's pretrained small ViT
    (another seed's, or a broken one) instead of pretraining its own."""
    from zeroflow.continual.backbones import build_small_vit
    out = tmp_path / "run"
    out.mkdir()
    planted = {k: torch.zeros_like(v) for k, v in build_small_vit(1, 8, None).state_dict().items()}
    torch.save(planted, out / "backbone.pt")
    rc, _, _ = zf(capsys, "run", "--config", env["fast"], "--out", out, "--stop-after", 1, "--no-progress")
    assert rc == 0
    written = torch.load(out / "backbone.pt", weights_only=True)
    assert any(v.abs().sum() > 0 for v in written.values())


# (file, what the error calls it, the fix's start, the task a resume then trains first)
CORRUPT_RUN_FILES = [
    ("checkpoint.pt", "checkpoint {f}", "the run then trains again from its first task)", 1),
    ("backbone.pt", "{f}", "the small ViT is then pretrained again, or read from $ZEROFLOW_CACHE", 2),
]


@pytest.mark.parametrize("name, called, then, first_task", CORRUPT_RUN_FILES, ids=[c[0] for c in CORRUPT_RUN_FILES])
def test_a_corrupt_run_file_is_named_in_whole_sentences_with_the_fix_that_works(env, tmp_path, capsys, name, called,
                                                                                   then, first_task):
    """A truncated checkpoint.pt: torch's text was cut at 200 characters ("... there is a high
    likelihood that your checkpoint file is); delete it to restart the run from scratch"); a
    truncated backbone.pt said "is corrupt (RuntimeError); delete it and rerun". Neither said
    how to continue. Each gives torch's first sentence now, and the fix, which works: a resume
    without the checkpoint trains the run again from its first task; without the backbone it
    takes the small ViT again (from the cache: the one the run started with) and goes on."""
    out = tmp_path / "run"
    rc, _, err = zf(capsys, "run", "--config", env["fast"], "--out", out, "--stop-after", 1, "--no-progress")
    assert rc == 0, err
    f = out / name
    f.write_bytes(f.read_bytes()[:3000])
    rc, _, err = zf(capsys, "run", "--resume", "--out", out, "--no-progress")
    head = f"zeroflow: error: {called.format(f=f)} is corrupt or unreadable (RuntimeError: "
    fix = f"); delete it and continue with: zeroflow run --resume --out {out} ({then}"
    assert rc == 2 and err.startswith(head) and fix in err, err
    why = err[len(head):err.index(fix)]
    assert why.endswith(".") and why.count(". ") == 0, why       # one whole sentence of torch's
    f.unlink()
    rc, stdout, err = zf(capsys, "run", "--resume", "--out", out, "--stop-after", first_task, "--no-progress")
    assert rc == 0 and f"task {first_task}/5: accuracy" in stdout, err
    assert f"task {first_task - 1}/5: accuracy" not in stdout, stdout


def test_an_error_s_first_sentence_is_whole_and_from_its_first_line():
    """The "why" of a corrupt run file: the first sentence of torch's text, ended by a '.', '!'
    or '?' before a space (a dotted name such as blocks.0.attn.qkv.weight or checkpoint.pt ends
    none), else its whole first line; never a later line."""
    from zeroflow.continual.runner import _first_sentence
    assert _first_sentence("size mismatch for blocks.0.attn.qkv.weight in run/backbone.pt. Check the "
                           "shapes.") == "size mismatch for blocks.0.attn.qkv.weight in run/backbone.pt."
    assert _first_sentence("Error(s) in loading state_dict for VisionTransformer:\n\tMissing key(s). "
                           "More.") == "Error(s) in loading state_dict for VisionTransformer:"
    assert _first_sentence("  \n") == ""


class _NamesAGlobal:
    """Pickled by reference to this module: a checkpoint naming it holds more than plain data."""


@pytest.mark.parametrize("damage, why", [("another dict", "is not a zeroflow run checkpoint"),
                                         ("no pickle", "does not unpickle as a torch.save file"),
                                         ("a foreign object", "_NamesAGlobal")])
def test_each_refused_checkpoint_says_how_to_continue(tmp_path, damage, why):
    """Each refusal of a checkpoint.pt (not zeroflow's, not a torch.save file, naming code to run)
    ends with the fix that works (tested above for a truncated one), not only the truncated
    one's: delete it and continue with zeroflow run --resume --out DIR."""
    from zeroflow.continual.errors import ZeroflowError
    from zeroflow.continual.runner import load_checkpoint
    path = tmp_path / "r" / "checkpoint.pt"
    path.parent.mkdir()
    if damage == "no pickle":
        path.write_bytes(b"\x80\x02 no pickle")       # a protocol-2 header, then no opcode pickle knows
    else:
        torch.save({"version": -1} if damage == "another dict" else {"x": _NamesAGlobal()}, path)
    with pytest.raises(ZeroflowError) as e:
        load_checkpoint(str(path))
    fix = f"; delete it and continue with: zeroflow run --resume --out {path.parent} (the run then trains again "
    assert why in str(e.value) and str(e.value).endswith(fix + "from its first task)"), e.value


def test_a_refused_checkpoint_in_the_current_folder_says_out_dot(tmp_path, monkeypatch):
    """load_checkpoint("checkpoint.pt") (a path with no folder, from the current one): the fix
    says --out ., not an empty --out."""
    from zeroflow.continual.errors import ZeroflowError
    from zeroflow.continual.runner import load_checkpoint
    monkeypatch.chdir(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    with pytest.raises(ZeroflowError, match=r"; delete it and continue with: zeroflow run --resume --out \. \("):
        load_checkpoint("checkpoint.pt")


@pytest.mark.parametrize("damage", ['{"avg": 1,', "{}", "[1, 2]"])
def test_a_corrupt_metrics_json_is_named_and_can_be_rewritten(env, tmp_path, capsys, damage):
    out = tmp_path / "run"
    assert zf(capsys, "run", "--config", env["fast"], "--method", "aper", "--out", out, "--no-progress")[0] == 0
    before = metrics(out)
    (out / "metrics.json").write_text(damage)
    rc, _, err = zf(capsys, "run", "--resume", "--out", out)
    assert rc == 2 and f"cannot resume {out}: {out / 'metrics.json'}: corrupt (" in err and "Traceback" not in err
    assert "delete it and run --resume again" in err
    rc, _, err = zf(capsys, "run", "--config", env["fast"], "--method", "aper", "--out", out)
    assert rc == 2 and f"{out} holds a damaged run ({out / 'metrics.json'}: corrupt" in err
    (out / "metrics.json").unlink()
    assert zf(capsys, "run", "--resume", "--out", out, "--no-progress")[0] == 0      # rewritten from checkpoint.pt
    for k in ("avg", "last", "fgt", "accuracy_matrix", "forward_passes", "config"):
        assert metrics(out)[k] == before[k], k


def test_resume_names_the_flags_it_ignores(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert zf(capsys, "run", "--config", env["fast"], "--out", out, "--stop-after", 2, "--no-progress")[0] == 0
    rc, _, err = zf(capsys, "run", "--resume", "--out", out, "--optimizer", "fo_sgd", "--lr", 0.5, "--epochs", 3,
                    "--q", 1, "--no-progress")
    assert rc == 0
    assert (f"zeroflow: warning: --resume continues {out} with the configuration in its config.json; ignoring "
            "--epochs 3 (the run has 1), --lr 0.5 (the run has 0.005), --optimizer fo_sgd (the run has "
            "zo_adam)") in err
    assert "--q" not in err                              # given, but equal to the run's
    cfg = metrics(out)["config"]
    assert (cfg["optimizer"], cfg["lr"], cfg["epochs"]) == ("zo_adam", 0.005, 1)


def test_resume_keeps_its_configuration_on_another_device_and_stop_after_counts_finished_tasks(env, tmp_path,
                                                                                                capsys):
    """--stop-after K on a resume with K tasks or more finished trained one task more; --resume
    --device cpu wrote device 'cpu' into metrics.json's config (config.json: 'auto'), so the
    sweep that made the run refused it afterwards as another configuration."""
    parent = tmp_path / "sweep"
    out = parent / "ease_zo_sgd_digits"
    assert zf(capsys, "run", "--config", env["fast"], "--optimizer", "zo_sgd", "--out", out, "--stop-after", 2,
              "--no-progress")[0] == 0
    for k in (1, 2):
        rc, stdout, err = zf(capsys, "run", "--resume", "--out", out, "--stop-after", k, "--no-progress")
        assert rc == 0, err
        assert f"stopped after task 2/5 (finished before this resume); continue with zeroflow run --resume --out " \
               f"{out}" in stdout and "task 3/5" not in stdout
        assert torch.load(out / "checkpoint.pt", weights_only=True)["completed"] == 2
    rc, stdout, err = zf(capsys, "run", "--resume", "--device", "cpu", "--out", out, "--no-progress", "--stop-after", 3)
    assert rc == 0 and "task 3/5" in stdout and "stopped after task 3/5; continue" in stdout and "4/5" not in stdout
    rc, _, err = zf(capsys, "run", "--resume", "--device", "cpu", "--out", out, "--no-progress")
    assert rc == 0, err
    m = metrics(out)
    with open(out / "config.json") as f:
        saved = json.load(f)
    assert saved["device"] == "auto" and m["config"] == saved           # the run's configuration, unchanged
    assert m["device"] == "cpu" and [t["device"] for t in m["tasks"]] == ["cpu"] * 5   # where it ran
    assert m["results_version"] == 2             # runfolder.RESULTS_VERSION, as checkpoint.pt records it
    rc, stdout, err = zf(capsys, "sweep", "--config", env["fast"], "--optimizers", "zo_sgd", "--out", parent)
    assert rc == 0, err
    assert f"run {out} is already finished (same configuration)" in stdout


def test_a_run_started_by_an_older_zeroflow_is_not_resumed_silently(env, tmp_path, capsys):
    """A checkpoint of the augmentation draws before 44287c8 (2026-12-02 18:09) resumed without
    a word: metrics.json then held task 1-4 of one version and task 5 of the other as one run.
    Its checkpoint (no identity: before 2026-12-02 15:01) is refused; one that records no
    version (2026-12-02 15:01 to 2026-12-03, either version) resumes with a warning, its
    metrics.json records no version, and a sweep that reuses it says so."""
    parent = tmp_path / "sweep"
    out = parent / "ease_zo_adam_digits"
    assert zf(capsys, "run", "--config", env["fast"], "--out", out, "--stop-after", 4, "--no-progress")[0] == 0
    path = out / "checkpoint.pt"
    ck = torch.load(path, weights_only=True)
    ck.pop("results_version", None)
    identity = ck.pop("identity")
    torch.save(ck, path)            # as a zeroflow before 2026-12-02 15:01 wrote it
    rc, stdout, err = zf(capsys, "run", "--resume", "--out", out, "--no-progress")
    assert rc == 2 and "task 5/5" not in stdout
    assert err.startswith(f"zeroflow: error: cannot resume {out}: its finished tasks were trained by results "
                          f"version 1 (zeroflow before commit 44287c8 of 2026-12-02 18:09 UTC"), err
    assert not (out / "metrics.json").exists() and "results_version" not in torch.load(path, weights_only=True)
    torch.save(dict(ck, identity=identity), path)
    rc, stdout, err = zf(capsys, "run", "--resume", "--out", out, "--no-progress")
    assert rc == 0 and "task 5/5" in stdout
    assert f"zeroflow: warning: {path} records no results version: " in err
    assert metrics(out)["results_version"] is None
    rc, stdout, err = zf(capsys, "sweep", "--config", env["fast"], "--optimizers", "zo_adam", "--out", parent)
    assert rc == 0 and f"run {out} is already finished (same configuration)" in stdout
    assert f"zeroflow: warning: reusing the finished run in {out}, whose metrics.json records no results version" in err


def test_interrupt_without_out_prints_the_folder_to_resume(env, tmp_path, capsys, monkeypatch):
    import zeroflow.continual.ease as ease
    monkeypatch.chdir(tmp_path)
    learn_task = ease.EASE.learn_task

    def interrupted_in_task_3(self, t, *a, **k):
        if t == 2:
            raise KeyboardInterrupt
        return learn_task(self, t, *a, **k)

    monkeypatch.setattr(ease.EASE, "learn_task", interrupted_in_task_3)
    rc, _, err = zf(capsys, "run", "--config", env["fast"], "--no-progress")
    (folder,) = os.listdir(tmp_path / "runs")
    run_dir = os.path.join("runs", folder)
    assert rc == 130 and f"continue with: zeroflow run --resume --out {run_dir}" in err
    assert "after task 2/5" in err and not os.path.exists(os.path.join(run_dir, ".lock"))

    def interrupted_in_setup(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("zeroflow.continual.runner.make_learner", interrupted_in_setup)
    rc, _, err = zf(capsys, "run", "--config", env["fast"], "--seed", 5, "--out", "setup", "--no-progress")
    assert rc == 130 and "interrupted during setup; nothing was kept" in err
    assert not os.path.exists("setup")


def _assert_run_refused(capsys, env, out, extra, error, folder, listing):
    """``zeroflow run --out out *extra`` exits 2 with exactly ``error``, and ``folder`` still
    holds ``listing`` alone (nothing was written)."""
    rc, stdout, err = zf(capsys, "run", "--config", env["fast"], "--out", out, "--no-progress", *extra)
    assert rc == 2 and stdout == "", err
    assert err == f"zeroflow: error: {error}\n"
    assert sorted(os.listdir(folder)) == listing


def test_a_folder_holding_other_runs_takes_no_run_and_a_run_folder_takes_no_sweep(env, tmp_path, capsys):
    """A run written into a sweep's parent made zeroflow report stop there and hide the sweep's
    runs; a sweep into a run folder did the same from the other side. Both are refused, exit 2,
    before anything is written (--force replaces a run, not the runs below a folder)."""
    sweep = tmp_path / "sweep"
    inner = sweep / "seeds" / "ease_zo_sgd_digits_seed1"       # at any depth
    inner.mkdir(parents=True)
    (inner / "config.json").write_text(json.dumps({"method": "ease", "optimizer": "zo_sgd", "dataset": "digits"}))
    for extra in ([], ["--force"]):
        _assert_run_refused(capsys, env, sweep, extra,
                            f"{sweep} holds other run folders ({inner}); a run written into {sweep} would hide them "
                            f"from zeroflow report, which does not look inside a run folder: choose another --out "
                            f"(e.g. a new folder inside {sweep})", sweep, ["seeds"])
    rc, _, err = zf(capsys, "sweep", "--config", env["fast"], "--optimizers", "zo_sgd", "--out", inner)
    assert rc == 2 and err.startswith(f"zeroflow: error: --out {inner} is a run folder (it holds config.json)")
    assert "choose another --out" in err and sorted(os.listdir(inner)) == ["config.json"]
    # a sweep whose run folder would sit above other runs: named, and --force does not take it
    nested = tmp_path / "s2" / "ease_zo_sgd_digits" / "old"
    nested.mkdir(parents=True)
    (nested / "metrics.json").write_text("{}")
    rc, _, err = zf(capsys, "sweep", "--config", env["fast"], "--optimizers", "zo_sgd", "--out", tmp_path / "s2",
                    "--force")
    assert rc == 2 and f"{tmp_path / 's2' / 'ease_zo_sgd_digits'} holds other run folders ({nested})" in err
    assert err.endswith("; choose another --out\n")


def test_a_folder_inside_a_run_folder_takes_no_run_and_no_sweep(env, tmp_path, capsys):
    """A run written into a folder below a run folder was accepted, and zeroflow report, which
    stops at the run folder above, never listed it. Refused for run (even with --force or
    --resume) and sweep, exit 2, before anything is written."""
    outer = tmp_path / "outer"
    outer.mkdir()
    (outer / "metrics.json").write_text("{}")
    for out in (outer / "sub", outer / "a" / "b"):
        for extra in ([], ["--force"], ["--resume"]):
            _assert_run_refused(capsys, env, out, extra,
                                f"{out} is inside the run folder {outer}; zeroflow report does not look inside a run "
                                f"folder, so a run written there would be hidden from it: choose an --out outside "
                                f"{outer}", outer, ["metrics.json"])
    rc, _, err = zf(capsys, "sweep", "--config", env["fast"], "--optimizers", "zo_sgd", "--out", outer / "sw",
                    "--force")
    assert rc == 2 and (f"{outer / 'sw' / 'ease_zo_sgd_digits'} is inside the run folder {outer}, and zeroflow "
                        f"report does not look inside a run folder; choose another --out") in err
    assert sorted(os.listdir(outer)) == ["metrics.json"]


# ---------------------------------------------------------------- sweep
def test_sweep_reuses_its_own_runs_and_refuses_other_configurations(env, tmp_path, capsys):
    out = tmp_path / "sweep"
    rc, stdout, err = zf(capsys, "sweep", "--config", env["fast"], "--optimizers", "zo_sgd", "--out", out,
                         "--no-progress")
    assert rc == 0, err
    run_dir = out / "ease_zo_sgd_digits"
    first = metrics(run_dir)
    assert f"| EASE | zo_sgd | {first['avg']:.2f} |" in stdout
    # a 10-epoch request over the finished 1-epoch run: refused before anything runs
    rc, stdout, err = zf(capsys, "sweep", "--config", env["fast"], "--epochs", 10, "--optimizers", "zo_sgd",
                         "--out", out)
    assert rc == 2 and f"{run_dir} holds a finished run with another configuration (epochs: 1 there, 10 " \
                       f"requested)" in err and "| EASE" not in stdout
    assert metrics(run_dir) == first
    # the same request: the finished run is this sweep's result
    rc, stdout, err = zf(capsys, "sweep", "--config", env["fast"], "--optimizers", "zo_sgd", "--out", out)
    assert rc == 0 and f"run {run_dir} is already finished (same configuration)" in stdout
    assert metrics(run_dir) == first
    # --force too (as its sweep help says): it replaces only a run of another configuration
    rc, stdout, err = zf(capsys, "sweep", "--config", env["fast"], "--optimizers", "zo_sgd", "--out", out, "--force")
    assert rc == 0 and f"run {run_dir} is already finished (same configuration)" in stdout and "deleting" not in err
    assert metrics(run_dir) == first


def test_sweep_goes_on_after_a_failing_optimizer_and_prints_the_table(env, tmp_path, capsys, monkeypatch):
    from zeroflow.continual import runner
    from zeroflow.continual.errors import ZeroflowError
    make_learner = runner.make_learner

    def zo_sgd_fails(cfg, *a):
        if cfg["optimizer"] == "zo_sgd":
            raise ZeroflowError("zo_sgd broke")
        return make_learner(cfg, *a)

    monkeypatch.setattr(runner, "make_learner", zo_sgd_fails)
    out = tmp_path / "sweep"
    rc, stdout, err = zf(capsys, "sweep", "--config", env["fast"], "--method", "aper", "--optimizers",
                         "zo_sgd,zo_adam", "--out", out, "--no-progress")
    assert rc == 1
    assert "| APER | zo_adam |" in stdout and "| APER | zo_sgd |" not in stdout
    assert "zeroflow: zo_sgd failed: zo_sgd broke" in err
    assert sorted(os.listdir(out)) == ["aper_zo_adam_digits"]     # the failed run left no folder
    for bad, needle in (("", "names no optimizer"), ("zo_sgd,zo_sgd", "lists zo_sgd more than once"),
                        ("zo_sgd,nope", "unknown optimizer 'nope'")):
        rc, _, err = zf(capsys, "sweep", "--optimizers", bad, "--out", tmp_path / "s2")
        assert rc == 2 and needle in err and not (tmp_path / "s2").exists()


def test_sweep_checks_the_checkpoints_it_would_resume_before_the_first_run(tmp_path):
    """docs/continual.md: a sweep checks every folder before its first run, a damaged one
    included. An unfinished run of the sweep's configuration whose checkpoint.pt was damaged (or
    of another configuration) passed the plan and failed only when the sweep reached it, hours
    into a sweep on real data. Guards: the plan loads and checks such a checkpoint, --force too
    (a sweep resumes an unfinished run of its configuration)."""
    from zeroflow.cli import _sweep_plan, build_parser
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.errors import ZeroflowError
    from zeroflow.continual.runner import atomic_write_json
    parent = tmp_path / "sweep"
    d = parent / "ease_zo_adam_digits"
    d.mkdir(parents=True)
    cfg = resolve({"optimizer": "zo_adam", "epochs": 1})
    atomic_write_json(str(d / "config.json"), cfg)
    args = ["sweep", "--out", str(parent), "--optimizers", "zo_adam", "--epochs", "1"]
    assert [p[2] for p in _sweep_plan(build_parser().parse_args(args), ["zo_adam"], str(parent))] == [str(d)]
    (d / "checkpoint.pt").write_bytes(b"damaged")
    for extra in ([], ["--force"]):
        with pytest.raises(ZeroflowError, match=r"checkpoint .*checkpoint\.pt is corrupt"):
            _sweep_plan(build_parser().parse_args(args + extra), ["zo_adam"], str(parent))
    torch.save({"version": 1, "completed": 1, "matrix": [[None]], "results_version": 2,
                "config": dict(cfg, lr=0.5)}, d / "checkpoint.pt")
    with pytest.raises(ZeroflowError, match="lr: 0.5 in checkpoint.pt, 0.005 in config.json.*move .* away"):
        _sweep_plan(build_parser().parse_args(args), ["zo_adam"], str(parent))


def test_sweep_checks_device_and_data_before_the_first_run(tmp_path, capsys):
    """Every run failed on its own (exit 1), and the sweep printed a folder that did not exist."""
    cases = [(["--dataset", "cifar100", "--data-root", tmp_path / "nodata"], "CIFAR-100 not found"),
             (["--device", "cpu", "--backend", "cuda"], "--backend cuda cannot run on cpu")]
    if not torch.cuda.is_available():
        cases.append((["--device", "cuda"], "--device cuda: CUDA is not available on this machine"))
    for args, needle in cases:
        rc, stdout, err = zf(capsys, "sweep", "--optimizers", "zo_sgd,fo_sgd", "--out", tmp_path / "s", *args)
        assert rc == 2 and err.startswith("zeroflow: error: ") and needle in err and err.count("\n") == 1, err
        assert stdout == "" and not (tmp_path / "s").exists()


def test_sweep_record_from_the_config_file_skips_what_cannot_be_recorded(env, tmp_path, capsys):
    """record: true in --config refused fo_sgd (the file's value beat the sweep's per-optimizer
    override); it is now what --record does: the others are recorded, fo_sgd named."""
    rec = tmp_path / "rec.yaml"
    rec.write_text(FAST + "record: true\n")
    rc, _, err = zf(capsys, "sweep", "--config", rec, "--method", "aper", "--optimizers", "zo_sgd,fo_sgd", "--out",
                    tmp_path / "sweep", "--no-progress")
    assert rc == 0, err
    assert "zeroflow: warning: --record: not recording fo_sgd (first-order steps" in err
    assert sorted(os.listdir(tmp_path / "sweep" / "aper_zo_sgd_digits" / "trajectory")) == ["task1.base.pt",
                                                                                             "task1.zft"]
    assert not (tmp_path / "sweep" / "aper_fo_sgd_digits" / "trajectory").exists()
    assert metrics(tmp_path / "sweep" / "aper_fo_sgd_digits")["config"]["record"] is False


# ---------------------------------------------------------------- --record and replay, file modes
def test_record_then_replay_rebuilds_the_trained_adapters_bit_exactly(env, tmp_path, capsys):
    out = tmp_path / "run"
    old_umask = os.umask(0o027)
    try:
        rc, stdout, err = zf(capsys, "run", "--config", env["fast"], "--optimizer", "zo_sgd", "--record", "--out",
                             out, "--no-progress")
    finally:
        os.umask(old_umask)
    assert rc == 0, err
    logs = sorted(os.listdir(out / "trajectory"))
    assert logs == [f"task{k}.{ext}" for k in range(1, 6) for ext in ("base.pt", "zft")]
    assert f"trajectory log: {out / 'trajectory' / 'task1.zft'}" in stdout
    for path, _, files in os.walk(out):                # every file follows the umask (0o027 -> 0o640)
        for f in files:
            assert stat.S_IMODE(os.stat(os.path.join(path, f)).st_mode) == 0o640, f
    trained = torch.load(out / "checkpoint.pt", weights_only=True)["learner"]["adapters"]
    for k in range(1, 6):
        weights = tmp_path / f"w{k}.pt"
        assert main(["replay", str(out / "trajectory" / f"task{k}.base.pt"), str(out / "trajectory" / f"task{k}.zft"),
                     "--out", str(weights)]) == 0
        replayed = torch.load(weights, weights_only=True)
        base = torch.load(out / "trajectory" / f"task{k}.base.pt", weights_only=True)["model"]
        names = [n for n in replayed if n.startswith(f"adapters.{k - 1}.")]
        assert names and any(not torch.equal(replayed[n], base[n]) for n in names)    # training moved them
        for n in names:
            assert torch.equal(replayed[n], trained[n[len("adapters."):]]), n
    # a sweep records what can be replayed and says what it does not record
    rc, _, err = zf(capsys, "sweep", "--config", env["fast"], "--method", "aper", "--optimizers", "zo_adam,fo_sgd",
                    "--record", "--out", tmp_path / "sweep", "--no-progress")
    assert rc == 0 and "not recording fo_sgd" in err
    assert sorted(os.listdir(tmp_path / "sweep" / "aper_zo_adam_digits" / "trajectory")) == ["task1.base.pt",
                                                                                              "task1.zft"]
    assert not (tmp_path / "sweep" / "aper_fo_sgd_digits" / "trajectory").exists()


def test_a_recording_cut_short_has_no_end_record_and_a_full_disk_says_how_to_go_on(env, tmp_path, capsys,
                                                                                     monkeypatch):
    import errno

    import zeroflow.optim
    from zeroflow.replay import ReplayError, TrajectoryRecorder, read_log
    out, log = tmp_path / "run", str(tmp_path / "run" / "trajectory" / "task1.zft")
    real_step, calls = zeroflow.optim.train_step, [0]

    def interrupted_at_the_third_step(*a, **k):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt
        return real_step(*a, **k)

    monkeypatch.setattr(zeroflow.optim, "train_step", interrupted_at_the_third_step)
    rc, _, err = zf(capsys, "run", "--config", env["fast"], "--optimizer", "zo_sgd", "--record", "--out", out,
                    "--no-progress")
    assert rc == 130, err
    # the log of the task cut short has no end record: with one (the checksum of the weights
    # after 2 steps) it looked whole, and replay rebuilt a task trained in part, verified
    with pytest.raises(ReplayError, match="no end record"):
        read_log(log)
    assert len(read_log(log, allow_truncated=True)[1]) == 2
    monkeypatch.setattr(zeroflow.optim, "train_step", real_step)

    real_record, records = TrajectoryRecorder._record, [0]

    def full_disk(self, payload):
        records[0] += 1
        if records[0] == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_record(self, payload)

    monkeypatch.setattr(TrajectoryRecorder, "_record", full_disk)
    rc, _, err = zf(capsys, "run", "--resume", "--out", out, "--no-progress")
    # was a traceback of the OSError out of zeroflow.cli.main
    assert rc == 2 and f"zeroflow: error: cannot write {log}: No space left on device; fix that, then continue the " \
                       f"run with: zeroflow run --resume --out {out} (no task had finished yet)" in err, err
    monkeypatch.setattr(TrajectoryRecorder, "_record", real_record)
    rc, _, err = zf(capsys, "run", "--resume", "--out", out, "--no-progress")
    assert rc == 0, err
    assert read_log(log)[1][-1][0] == "end"


# the last resume runs on the planted all-zero backbone (as an old checkpoint would): a constant
# loss, which the optimizer rightly warns of
@pytest.mark.filterwarnings("ignore:ZOFused.*every loss difference:RuntimeWarning")
def test_resume_refuses_a_backbone_pt_that_is_not_the_runs_own(env, tmp_path, capsys):
    """A resumed small-backbone run loaded whatever backbone.pt its folder held, unchecked: one
    copied in from another run (or replaced) silently changed the ViT under the tasks still to
    train. The checkpoint records the sha256 of the backbone's tensors; a resume on other ones
    is refused before anything is written. A checkpoint written before it recorded the hash
    resumes as before."""
    from zeroflow.continual.backbones import build_small_vit
    out = tmp_path / "run"
    assert zf(capsys, "run", "--config", env["fast"], "--out", out, "--stop-after", 1, "--no-progress")[0] == 0
    own = (out / "backbone.pt").read_bytes()
    planted = {k: torch.zeros_like(v) for k, v in build_small_vit(1, 8, None).state_dict().items()}
    torch.save(planted, out / "backbone.pt")
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    rc, stdout, err = zf(capsys, "run", "--resume", "--out", out, "--no-progress")
    assert rc == 2 and "task 2/5" not in stdout
    assert err.startswith(f"zeroflow: error: cannot resume {out}: its backbone.pt is not the pretrained backbone "
                          f"its finished tasks were trained on (sha256 "), err
    assert f"{out / 'backbone.pt'} now holds weights with sha256 " in err
    assert "Put the run's own backbone.pt back, or start a new run" in err
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before        # nothing written
    (out / "backbone.pt").unlink()            # missing: the one pretrained again is the run's own
    rc, stdout, err = zf(capsys, "run", "--resume", "--out", out, "--no-progress", "--stop-after", 2)
    assert rc == 0 and "task 2/5" in stdout, err
    again = torch.load(out / "backbone.pt", weights_only=True)
    was = torch.load(io.BytesIO(own), weights_only=True)
    assert again.keys() == was.keys() and all(torch.equal(again[k], was[k]) for k in was)
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["identity"]["backbone"]["file"] == "backbone.pt"
    del ck["identity"]["backbone"]            # as written before the hash was recorded
    torch.save(ck, out / "checkpoint.pt")
    torch.save(planted, out / "backbone.pt")
    rc, stdout, err = zf(capsys, "run", "--resume", "--out", out, "--no-progress", "--stop-after", 3)
    assert rc == 0 and "task 3/5" in stdout and "backbone.pt" not in err, err


def test_backbone_sha256_is_of_the_tensors_in_name_order():
    """The backbone's hash in a checkpoint is over its tensors in name order (as the
    checkpoints written before it was computed by zeroflow.replay.weights_sha256 recorded
    it): the order a state dict lists its tensors in does not change it, so those resume."""
    from zeroflow.continual.runner import backbone_sha256
    from zeroflow.replay import weights_sha256
    a, b = torch.arange(3, dtype=torch.float16), torch.ones(2, 2)
    assert backbone_sha256({"b": b, "a": a}) == backbone_sha256({"a": a, "b": b}) == weights_sha256(["a", "b"], [a, b])
    assert backbone_sha256({"a": b, "b": a}) != backbone_sha256({"a": a, "b": b})


def test_identity_with_a_backbone_hash_refuses_a_resume_that_has_none(tmp_path):
    """A checkpoint that records the backbone's hash is not resumed where none can be computed
    now (no ViT of the run's own): refused, not let through unchecked."""
    from zeroflow.continual.errors import ZeroflowError
    from zeroflow.continual.runner import check_identity
    saved = {"class_names": None, "weights": None, "backbone": {"file": "backbone.pt", "sha256": "ab" * 32}}
    check_identity(str(tmp_path), saved, dict(saved))
    with pytest.raises(ZeroflowError, match=f"cannot resume {tmp_path}: its backbone.pt is not the pretrained "
                                            "backbone .*sha256 ababababab.*is missing"):
        check_identity(str(tmp_path), saved, {"class_names": None, "weights": None})


def test_where_it_is_leaves_trajectory_logs_it_cannot_read_as_they_are():
    """A finished run's paths are moved to where the run is now; a trajectory_logs entry that is
    not a path (a metrics.json edited by hand) leaves the list as written, not a TypeError."""
    from zeroflow.continual.runner import _where_it_is
    moved = _where_it_is({"trajectory_logs": ["/old/r/trajectory/task1.zft"]}, "/new/r")
    assert moved == {"trajectory_logs": ["/new/r/trajectory/task1.zft"], "run_dir": "/new/r"}
    odd = {"trajectory_logs": ["/old/r/trajectory/task1.zft", 3]}
    assert _where_it_is(odd, "/new/r") == dict(odd, run_dir="/new/r")


def test_trajectory_logs_sort_by_task_number_and_other_files_after_them():
    """task<k> by k (task10 after task2), and a file of another name after every task's."""
    from zeroflow.continual.runner import _task_order
    names = ["notes.zft", "task10.zft", "task2.zft", "a.zft", "task1.base.pt"]
    assert sorted(names, key=_task_order) == ["task1.base.pt", "task2.zft", "task10.zft", "a.zft", "notes.zft"]
