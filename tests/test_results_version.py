"""Run folders written by an older zeroflow, whose configuration computed other numbers (the
2026-12-02 augmentation draws, 44287c8): checkpoint.pt and metrics.json record the results
version (runfolder.RESULTS_VERSION), and a resume never combines two versions' results without
a word. Before, a checkpoint of the older draws resumed silently (metrics.json: task 1 of one
version, tasks 2-5 of the other)."""
import os

import pytest
import torch
from test_continual_e2e import _FakeLearner, _train_tasks_with_fakes

from zeroflow.continual.errors import ZeroflowError
from zeroflow.continual.runfolder import RESULTS_VERSION
from zeroflow.continual.runner import _restore_results

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
