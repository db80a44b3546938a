"""Run folders written by an older zeroflow, whose configuration computed other numbers (the
2026-12-02 augmentation draws, 44287c8): checkpoint.pt and metrics.json record the results
version (runfolder.RESULTS_VERSION), and a resume, a sweep's reuse and zeroflow report never
combine two versions' results without a word. Before, HEAD resumed a checkpoint of the older
draws silently (metrics.json: task 1 of one version, tasks 2-5 of the other), a sweep reused
older finished runs beside new seeds, and the report averaged them into one row."""
import json
import os
import re

import pytest
import torch
from test_continual_e2e import _FakeLearner, _train_tasks_with_fakes

from zeroflow.continual.errors import ZeroflowError
from zeroflow.continual.report import render
from zeroflow.continual.runfolder import RESULTS_VERSION, conflict, load_metrics
from zeroflow.continual.runner import _restore_results, decide

NOW = {"class_names": ["a", "b"], "weights": None}


def _checkpoint_as_written_by(folder, *, identity: bool, version):
    """Rewrite folder's checkpoint.pt as an older zeroflow wrote it: without ``identity``
    (before 2026-12-02 15:01), without ``results_version`` (``version="absent"``: before it
    was recorded) or with another one."""
    path = os.path.join(folder, "checkpoint.pt")
    ck = torch.load(path, weights_only=True)
    if identity:
        ck["identity"] = NOW
    else:
        del ck["identity"]
    if version == "absent":
        del ck["results_version"]
    else:
        ck["results_version"] = version
    torch.save(ck, path)


def _resume(folder, said, **kw):
    return _restore_results(str(folder), _FakeLearner(), resume=True, n_tasks=3, log=lambda *a: None,
                            identity=NOW, warn=said.append, **kw)


def test_a_checkpoint_of_the_older_augmentation_draws_is_refused_naming_both_versions(tmp_path):
    _train_tasks_with_fakes(tmp_path, stop_after=1)
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=True)["results_version"] == RESULTS_VERSION == 2
    _checkpoint_as_written_by(tmp_path, identity=False, version="absent")    # before 2026-12-02 15:01
    before = (tmp_path / "checkpoint.pt").read_bytes()
    said = []
    with pytest.raises(ZeroflowError) as e:
        _resume(tmp_path, said)
    msg = str(e.value)
    assert msg.startswith(f"cannot resume {tmp_path}: its finished tasks were trained by results version 1 "
                          f"(zeroflow before commit 44287c8"), msg
    assert "this zeroflow computes results version 2" in msg and "metrics.json would combine" in msg
    assert msg.endswith(f"Finish the run with the zeroflow that started it, or run it again from scratch with this "
                        f"zeroflow (zeroflow run --force --out {tmp_path}, or another --out)")
    assert said == [] and (tmp_path / "checkpoint.pt").read_bytes() == before
    with pytest.raises(ZeroflowError, match=rf"or move {tmp_path} away to run it again with this zeroflow$"):
        _resume(tmp_path, said, in_sweep=True)
    # a version recorded by another zeroflow (a newer one here) is refused the same way
    _train_tasks_with_fakes(tmp_path / "new", stop_after=1)
    _checkpoint_as_written_by(tmp_path / "new", identity=True, version=RESULTS_VERSION + 1)
    with pytest.raises(ZeroflowError, match=r"trained by results version 3 \(a zeroflow newer than this one\)"):
        _resume(tmp_path / "new", said)
    _checkpoint_as_written_by(tmp_path / "new", identity=True, version="2")
    with pytest.raises(ZeroflowError, match=r"corrupt \(results_version '2' is not a version number\)"):
        _resume(tmp_path / "new", said)


def test_a_checkpoint_that_records_no_version_resumes_with_a_warning_and_its_results_keep_none(tmp_path):
    """Checkpoints of 2026-12-02 15:01 to the version's recording hold the identity but no
    version: the older draws or this one's, by the run's start. The run resumes (this
    zeroflow's own folders of that time must), says so, and records no version either."""
    _train_tasks_with_fakes(tmp_path, stop_after=1)
    _checkpoint_as_written_by(tmp_path, identity=True, version="absent")
    said = []
    back = _resume(tmp_path, said)
    assert back.completed == 1 and back.results_version is None
    assert len(said) == 1 and said[0].startswith(f"{tmp_path / 'checkpoint.pt'} records no results version: ")
    assert "44287c8" in said[0] and said[0].endswith(f"(zeroflow run --force --out {tmp_path})")
    assert back.checkpoint(_FakeLearner(), 1)["results_version"] is None
    # this zeroflow's own checkpoint resumes without a word
    _train_tasks_with_fakes(tmp_path / "now", stop_after=1)
    _checkpoint_as_written_by(tmp_path / "now", identity=True, version=RESULTS_VERSION)
    said = []
    assert _resume(tmp_path / "now", said).results_version == RESULTS_VERSION and said == []


def _finished(folder, *, seed=1993, version="absent", class_names=True, avg=80.0):
    """A finished run's folder (minimal metrics.json) as the zeroflow of ``version`` wrote it."""
    from zeroflow.continual.defaults import resolve
    os.makedirs(folder, exist_ok=True)
    cfg = resolve({"seed": seed})
    m = {"avg": avg, "last": avg - 10, "fgt": 5.0, "peak_memory_bytes": 1e9, "forward_passes": 900,
         "accuracy_matrix": [[avg]], "config": cfg}
    if class_names:
        m["class_names"] = ["0", "1"]
    if version != "absent":
        m["results_version"] = version
    (folder / "config.json").write_text(json.dumps(cfg))
    (folder / "metrics.json").write_text(json.dumps(m))
    return cfg


def test_a_sweep_does_not_reuse_a_finished_run_of_another_version(tmp_path):
    old = tmp_path / "old"
    cfg = _finished(old, class_names=False)                 # before 2026-12-02 15:01: version 1
    state, why = conflict(str(old), cfg)
    assert state.kind == "finished" and why.startswith(f"{old} holds a finished run of this configuration computed "
                                                       f"by results version 1 (zeroflow before commit 44287c8")
    logs, said = [], []
    with pytest.raises(ZeroflowError, match=r"this zeroflow computes results version 2 .*; move it away, or add "
                                            r"--force to run it again$"):
        decide(str(old), cfg, resume=False, force=False, continue_existing=True, log=logs.append, warn=said.append)
    assert decide(str(old), cfg, resume=False, force=True, continue_existing=True, log=logs.append,
                  warn=said.append) == ("fresh", None)
    assert not (old / "metrics.json").exists()
    # this version's finished run is reused; one that records none is reused with a word
    for name, version, words in (("now", RESULTS_VERSION, 0), ("unrecorded", "absent", 1)):
        cfg = _finished(tmp_path / name, version=version)
        assert conflict(str(tmp_path / name), cfg)[1] == ""
        said = []
        mode, m = decide(str(tmp_path / name), cfg, resume=False, force=False, continue_existing=True,
                         log=logs.append, warn=said.append)
        assert mode == "finished" and m["avg"] == 80.0 and len(said) == words
    assert said[0].startswith(f"reusing the finished run in {tmp_path / 'unrecorded'}, whose metrics.json records no "
                              f"results version")
    m = json.loads((tmp_path / "now" / "metrics.json").read_text())
    for bad in (True, 0, -1, 1.5, "2"):         # versions count from 1
        (tmp_path / "now" / "metrics.json").write_text(json.dumps(dict(m, results_version=bad)))
        with pytest.raises(ZeroflowError, match=rf"corrupt \(results_version {re.escape(repr(bad))} is not a version "
                                                r"number\)"):
            load_metrics(str(tmp_path / "now" / "metrics.json"))


def test_a_sweep_does_not_reuse_a_finished_run_of_a_newer_version(tmp_path):
    """A newer zeroflow's run (a results version above this one's) is not this version's
    either: a sweep reusing it put numbers this zeroflow does not compute beside its own."""
    folder = tmp_path / "newer"
    cfg = _finished(folder, version=RESULTS_VERSION + 1)
    state, why = conflict(str(folder), cfg)
    assert state.kind == "finished" and why.startswith(
        f"{folder} holds a finished run of this configuration computed by results version {RESULTS_VERSION + 1} "
        f"(a zeroflow newer than this one)")
    with pytest.raises(ZeroflowError, match=r"a zeroflow newer than this one\).*; move it away, or add --force"):
        decide(str(folder), cfg, resume=False, force=False, continue_existing=True, log=lambda *a: None,
               warn=lambda *a: None)


def test_a_finished_run_of_another_version_and_another_configuration_is_refused_for_its_configuration(tmp_path):
    """decide(): the configuration is compared first (runner.decide, docs/continual.md: a folder
    of another configuration is refused naming the differing options); the version matters only
    for a run of this configuration. An older run of other options was refused for its version
    alone, and the sweep's message hid which options differed."""
    folder = tmp_path / "old"
    cfg = _finished(folder, class_names=False)              # version 1
    asked = dict(cfg, epochs=cfg["epochs"] + 1)
    with pytest.raises(ZeroflowError) as e:
        decide(str(folder), asked, resume=False, force=False, continue_existing=True, log=lambda *a: None,
               warn=lambda *a: None)
    assert str(e.value).startswith(f"{folder} already holds a finished run with another configuration (epochs: "
                                   f"{cfg['epochs']} there, {cfg['epochs'] + 1} requested)"), str(e.value)
    assert "results version" not in str(e.value)


def test_the_report_never_averages_runs_of_two_versions(tmp_path):
    _finished(tmp_path / "s1", seed=1, class_names=False, avg=60.0)        # version 1
    _finished(tmp_path / "s2", seed=2, version=RESULTS_VERSION, avg=80.0)
    _finished(tmp_path / "s3", seed=3, version=RESULTS_VERSION, avg=82.0)
    _finished(tmp_path / "s4", seed=4, avg=70.0)                             # unrecorded
    text = render([str(tmp_path)])
    rows = [line for line in text.split("### Efficiency")[0].splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| Method | Optimizer | seed | results_version | digits Avg |"), rows
    assert "| EASE | zo_adam | 2, 3 | 2 | 81.00 ± 1.41 | 71.00 ± 1.41 | 0.00 ± 0.00 |" in rows
    assert any(r.startswith("| EASE | zo_adam | 1 | 1 | 60.00 |") for r in rows)
    assert any(r.startswith("| EASE | zo_adam | 4 | unrecorded | 70.00 |") for r in rows)
    assert len(rows) == 4
    # one note per version other than this one, naming its runs and no others; one for the runs
    # that record none (this version's runs are named in neither)
    notes = [line for line in text.splitlines() if line.startswith(("Computed by results version",
                                                                     "results_version 'unrecorded'"))]
    assert len(notes) == 2, notes
    assert notes[0].startswith("Computed by results version 1 (zeroflow before commit 44287c8")
    assert notes[0].endswith(f"never averaged with other versions' runs: {tmp_path / 's1'}")
    assert "records no results version: a zeroflow of 2026-12-02" in notes[1]
    assert notes[1].endswith(f"random augmentation: {tmp_path / 's4'}")
