"""The query sweep (benchmarks/bench_query_sweep.py) decides what a point's folder holds the way
``zeroflow sweep`` does: a finished run of the same configuration is reused, an unfinished one
resumed, and a folder holding another configuration or a damaged run is refused, never taken
for the point (it once reused any folder with a metrics.json, whatever its --extra had been).

Everything runs with --dry-run: the plan and the commands, no training."""
from __future__ import annotations

import json
import os
import sys

from benchmarks import bench_query_sweep as S
from zeroflow.continual.runfolder import RESULTS_VERSION


def _finished(folder, config, **more):
    """A finished run of this zeroflow's results version (``more``: other metrics.json keys)."""
    os.makedirs(folder)
    metrics = {"config": config, "avg": 81.5, "last": 70.0, "fgt": 3.0, "forward_passes": 10,
               "peak_memory_bytes": 1, "seconds": 12.5, "results_version": RESULTS_VERSION} | more
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(metrics, f)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)


def _config(opt, q, extra):
    return S.requested_config(S.run_args(opt, q, "unused", extra))


def _sweep(tmp_path, capsys, extra="--epochs 2"):
    rc = S.main(["--qs", "1,2", "--optimizers", "zo_sgd", "--workdir", str(tmp_path), "--extra", extra,
                 "--out", str(tmp_path / "sweep.json"), "--dry-run"])
    out, err = capsys.readouterr()
    return rc, out, err


def test_a_finished_point_of_the_same_configuration_is_reused(tmp_path, capsys):
    _finished(tmp_path / "zo_sgd_q1", _config("zo_sgd", 1, ["--epochs", "2"]))
    rc, out, err = _sweep(tmp_path, capsys)
    assert rc == 0, err
    assert f"reusing {tmp_path / 'zo_sgd_q1'}" in out
    commands = [line for line in out.splitlines() if line.startswith("sweep: ") and "--optimizer" in line]
    assert len(commands) == 1 and "--q 2" in commands[0] and "--resume" not in commands[0]


def test_a_finished_point_of_another_configuration_is_refused_not_reused(tmp_path, capsys):
    folder = tmp_path / "zo_sgd_q1"
    _finished(folder, _config("zo_sgd", 1, ["--epochs", "3"]))     # the sweep asks for 2 epochs
    before = (folder / "metrics.json").read_bytes()
    rc, out, err = _sweep(tmp_path, capsys)
    assert rc == 1
    assert "reusing" not in out
    assert f"refusing a point: {folder} holds a finished run with another configuration (epochs: 3 there, 2 " \
           f"requested); delete {folder}" in err
    assert (folder / "metrics.json").read_bytes() == before


def test_an_unfinished_point_of_the_same_configuration_is_resumed(tmp_path, capsys):
    folder = tmp_path / "zo_sgd_q2"
    os.makedirs(folder)
    (folder / "config.json").write_text(json.dumps(_config("zo_sgd", 2, ["--epochs", "2"])))
    rc, out, err = _sweep(tmp_path, capsys)
    assert rc == 0, err
    q2 = [line for line in out.splitlines() if "--q 2" in line]
    assert len(q2) == 1 and q2[0].endswith("--resume")


def test_a_damaged_point_is_refused_with_its_reason(tmp_path, capsys):
    folder = tmp_path / "zo_sgd_q1"
    os.makedirs(folder)
    (folder / "metrics.json").write_text("{not json")
    rc, out, err = _sweep(tmp_path, capsys)
    assert rc == 1
    assert f"refusing a point: {folder} holds a damaged run" in err and "corrupt" in err


def test_a_bad_extra_option_is_refused_before_any_run(tmp_path, capsys):
    rc, out, err = _sweep(tmp_path, capsys, extra="--batch-size 0")
    assert rc == 2
    assert "--batch-size" in err and "--optimizer" not in out
    assert sorted(os.listdir(tmp_path)) == []


def test_an_extra_that_sets_what_the_sweep_sets_per_point_is_refused(tmp_path, capsys):
    # "--q 2" came after the sweep's own --q, so every point ran q = 2 under its own q's name
    for extra, flag, fix in [("--q 2", "--q", "--qs"), ("--opt zo_adam", "--optimizer", "--optimizers"),
                             ("--out elsewhere", "--out", "--workdir"),
                             ("--stop-after 1", "--stop-after", "per point")]:
        rc, out, err = _sweep(tmp_path, capsys, extra=extra)
        assert rc == 2, extra
        assert f"--extra may not set {flag}" in err and fix in err, err
        assert "--optimizer" not in out
    assert sorted(os.listdir(tmp_path)) == []


def test_an_extra_that_zeroflow_run_rejects_is_named(tmp_path, capsys):
    rc, out, err = _sweep(tmp_path, capsys, extra="--bogus 1")
    assert rc == 2
    assert "sweep: error: --extra '--bogus 1': unrecognized arguments: --bogus 1" in err
    assert "usage:" not in err


def test_a_reused_point_keeps_what_its_metrics_json_says(tmp_path):
    # the sweep once copied keys metrics.json never has ("forgetting", "runtime_s") and so
    # dropped the reused run's time; it now copies metrics.json's own keys
    folder = tmp_path / "zo_sgd_q1"
    config = _config("zo_sgd", 1, [])
    _finished(folder, config)
    point = S.plan_point("zo_sgd", 1, str(tmp_path), [])
    assert point["action"] == "reuse"
    rec = S.run_point(point, [], dry=False, timeout=None)
    assert {k: rec.get(k) for k in ("avg", "last", "fgt", "seconds", "forward_passes", "peak_memory_bytes")} == \
        {"avg": 81.5, "last": 70.0, "fgt": 3.0, "seconds": 12.5, "forward_passes": 10, "peak_memory_bytes": 1}


def test_a_finished_point_of_another_results_version_is_refused_and_an_unrecorded_one_named(tmp_path, capsys):
    """A finished run computed by zeroflow before the 2026-12-02 augmentation draws (its
    metrics.json records version 1, or has no class names: written before 2026-12-02 15:01)
    was reused beside the points this version runs; one that records no version is reused
    with a word."""
    for folder, recorded in ((tmp_path / "a" / "zo_sgd_q1", True), (tmp_path / "b" / "zo_sgd_q1", False)):
        _finished(folder, _config("zo_sgd", 1, []), results_version=1)
        if not recorded:      # nor class names: written before 2026-12-02 15:01, so version 1
            m = json.loads((folder / "metrics.json").read_text())
            (folder / "metrics.json").write_text(json.dumps({k: v for k, v in m.items() if k != "results_version"}))
        point = S.plan_point("zo_sgd", 1, str(folder.parent), [])
        assert point["action"] == "refuse" and point["error"] == (
            f"{folder} holds a finished run of this configuration computed by results version 1 (zeroflow before "
            f"commit 44287c8 of 2026-12-02 18:09 UTC: training augmentation from torch's global RNG); this zeroflow "
            f"computes results version 2 (zeroflow since commit 44287c8: training augmentation drawn per image from "
            f"(seed, epoch, index)), so its numbers do not belong beside this version's; delete {folder} or choose "
            f"another --workdir")
    folder = tmp_path / "c" / "zo_sgd_q1"
    _finished(folder, _config("zo_sgd", 1, []), results_version=None, class_names=["0", "1"])
    point = S.plan_point("zo_sgd", 1, str(folder.parent), [])
    assert point["action"] == "reuse"
    S.run_point(point, [], dry=False, timeout=None)
    assert (f"sweep: reusing {folder} (a finished run of the same configuration, whose metrics.json records no "
            f"results version: ") in capsys.readouterr().out


def test_a_run_points_warnings_are_shown_and_kept(tmp_path, monkeypatch, capsys):
    """A point's `zeroflow run` warns on stderr (runner.warn_stderr; Python warnings) among its
    progress bars: the sweep captured that stderr and kept at most its last line on a failure,
    so a warning qualifying a point's numbers (a precision fallback, an ignored option) was
    dropped without a word. They are now shown as they come and kept in the point's record.
    The child here is a stand-in that writes a finished run of the point's configuration."""
    folder = tmp_path / "zo_sgd_q1"
    made = tmp_path / "made"
    _finished(made, _config("zo_sgd", 1, []))
    child = ("import shutil, sys\n"
             "print('task 1/5 |####|', file=sys.stderr)\n"
             "print('zeroflow: warning: --precision bf16: the CPU has no bf16 matmul; running fp32', "
             "file=sys.stderr)\n"
             "print('/x/y.py:12: UserWarning: a deprecation', file=sys.stderr)\n"
             "print('  warnings.warn(msg)', file=sys.stderr)\n"
             f"shutil.copytree({str(made)!r}, sys.argv[sys.argv.index('--out') + 1])\n")
    monkeypatch.setattr(S, "runner_cmd", lambda: [sys.executable, "-c", child])
    point = S.plan_point("zo_sgd", 1, str(tmp_path), [])
    assert point["action"] == "run"
    rec = S.run_point(point, [], dry=False, timeout=60)
    said = ["zeroflow: warning: --precision bf16: the CPU has no bf16 matmul; running fp32",
            "/x/y.py:12: UserWarning: a deprecation"]
    assert "error" not in rec and rec["avg"] == 81.5 and rec["warnings"] == said
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if line.startswith("sweep: ")] == [f"sweep: {folder}: {w}" for w in said]


def test_a_value_given_twice_or_a_timeout_of_zero_is_refused(tmp_path, capsys):
    """--qs 1,1 planned the folder zo_sgd_q1 twice, both "run" before either ran: the second ran
    again over the first's finished run and the results listed the point twice. --timeout 0 timed
    out every point at once."""
    import pytest

    for argv, says in ((["--qs", "1,2,1"], "--qs lists 1 more than once"),
                       (["--optimizers", "zo_sgd,zo_adam,zo_sgd"], "--optimizers lists zo_sgd more than once"),
                       (["--timeout", "0"], "--timeout must be > 0 seconds (got 0")):
        with pytest.raises(SystemExit):
            S.main(argv + ["--workdir", str(tmp_path), "--out", str(tmp_path / "sweep.json"), "--dry-run"])
        assert says in capsys.readouterr().err


def test_a_stopped_sweep_writes_the_points_it_finished(tmp_path, monkeypatch, capsys):
    """Ctrl-C, or a SIGTERM (a plain `timeout`, a lease's limit), during the third point: the JSON
    was written only after the last point, so every finished point was lost with it. Now the
    finished ones are written with "stopped", the report says so, and the exit status is the
    signal's (130 / 143). The points are stand-ins: the records run_point would return."""
    import signal

    from benchmarks.report import sweep_section

    handler = signal.getsignal(signal.SIGTERM)
    for sig, status in ((signal.SIGINT, 130), (signal.SIGTERM, 143)):
        done = []

        def run_point(point, extra, dry, timeout):
            if len(done) == 2:
                os.kill(os.getpid(), sig)     # SIGINT: Python's KeyboardInterrupt; SIGTERM: StopSignals'
            done.append(point["q"])
            return {"optimizer": point["optimizer"], "q": point["q"], "dir": point["dir"], "avg": 50.0 + point["q"]}

        monkeypatch.setattr(S, "run_point", run_point)
        out = tmp_path / f"sweep_{sig.name}.json"
        rc = S.main(["--qs", "1,2,4,8", "--optimizers", "zo_sgd", "--workdir", str(tmp_path / sig.name),
                     "--out", str(out)])
        assert rc == status, sig.name
        with open(out) as f:
            written = json.load(f)
        assert [r["q"] for r in written["results"]] == [1, 2]
        assert written["stopped"] == f"stopped ({sig.name}) after 2 of 4 points"
        assert f"sweep: stopped ({sig.name}) after 2 of 4 points" in capsys.readouterr().err
        assert f"The sweep was stopped ({sig.name}) after 2 of 4 points" in sweep_section(written, {})
    assert signal.getsignal(signal.SIGTERM) == handler       # put back after the sweep


def test_a_stopped_dry_run_exits_with_the_signals_status_and_writes_nothing(tmp_path, monkeypatch):
    """--dry-run stopped by Ctrl-C: exit 130 (it said 0, as if every command had been printed)."""
    import signal

    def run_point(point, extra, dry, timeout):
        os.kill(os.getpid(), signal.SIGINT)
        return {}

    monkeypatch.setattr(S, "run_point", run_point)
    out = tmp_path / "sweep.json"
    assert S.main(["--qs", "1,2", "--optimizers", "zo_sgd", "--workdir", str(tmp_path / "w"), "--out", str(out),
                   "--dry-run"]) == 130
    assert not out.exists()
