"""Tests written by mutation testing of the data checks and the resume plumbing (each kills a
mutant the existing tests let survive)."""
import os

import pytest

from test_continual_data import _write_imagefolder
from zeroflow.continual.errors import ZeroflowError


def _quiet(m):
    pass


def test_a_macosx_folder_inside_a_class_folder_is_skipped(tmp_path):
    """An image-named file under a class's ``__MACOSX/`` (no leading dot) is not one of its images."""
    import shutil

    from zeroflow.continual.data import load_dataset
    _write_imagefolder(str(tmp_path), "cub")
    mac = tmp_path / "cub" / "train" / "n0001" / "__MACOSX"
    mac.mkdir()
    shutil.copy(tmp_path / "cub" / "train" / "n0001" / "0.png", mac / "0.png")
    d = load_dataset("cub", str(tmp_path), 2, 2, img_size=32, warn=_quiet)
    assert len(d.train.samples) == 8
    assert not any("__MACOSX" in p for p, _ in d.train.samples)


def test_hidden_class_folders_are_named_in_sorted_order(tmp_path):
    """The refusal lists the hidden folders as torchvision's find_classes would order them."""
    from zeroflow.continual.data import load_dataset
    _write_imagefolder(str(tmp_path), "cub")
    names = [f".h{i:02d}" for i in range(12)]
    for n in reversed(names[::2]):
        (tmp_path / "cub" / "train" / n).mkdir()
    for n in names[1::2]:
        (tmp_path / "cub" / "train" / n).mkdir()
    with pytest.raises(ZeroflowError) as e:
        load_dataset("cub", str(tmp_path), 2, 2, img_size=32, warn=_quiet)
    assert f"holds the hidden folder(s) {', '.join(names)}, which" in str(e.value), str(e.value)


def test_a_macosx_class_folder_is_refused(tmp_path):
    import shutil

    from zeroflow.continual.data import load_dataset
    _write_imagefolder(str(tmp_path), "cub")
    shutil.copytree(tmp_path / "cub" / "test" / "n0000", tmp_path / "cub" / "test" / "__MACOSX")
    with pytest.raises(ZeroflowError, match=r"cub/test holds the hidden folder\(s\) __MACOSX, which"):
        load_dataset("cub", str(tmp_path), 2, 2, img_size=32, warn=_quiet)


def test_dangling_links_in_both_splits_are_not_shared_files(tmp_path):
    """A dangling link in train/ and one in test/ are no file at all, not the same file."""
    from zeroflow.continual.data import load_dataset
    _write_imagefolder(str(tmp_path), "cub")
    (tmp_path / "cub" / "train" / "n0001" / "9.png").symlink_to(tmp_path / "gone-train.png")
    (tmp_path / "cub" / "test" / "n0002" / "9.png").symlink_to(tmp_path / "gone-test.png")
    d = load_dataset("cub", str(tmp_path), 2, 2, img_size=32, warn=_quiet)
    assert len(d.train.samples) == 9 and len(d.test.samples) == 9


def test_a_symlink_loop_is_left_to_the_reader_not_a_traceback_at_load(tmp_path):
    """os.stat of a link loop raises ELOOP (an OSError, not FileNotFoundError)."""
    from zeroflow.continual.data import load_dataset
    _write_imagefolder(str(tmp_path), "cub")
    loop = tmp_path / "cub" / "test" / "n0001" / "9.png"
    loop.symlink_to(loop)
    d = load_dataset("cub", str(tmp_path), 2, 2, img_size=32, warn=_quiet)
    assert str(loop) in [p for p, _ in d.test.samples]


def test_a_missing_cifar_file_with_download_is_fetched_not_refused(tmp_path, monkeypatch):
    from zeroflow.continual import data as D
    from zeroflow.continual.data import load_cifar100
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for n in ("train", "test"):
        (folder / n).write_bytes(b"x")
    calls = []

    class Fake:
        def __init__(self, root, train=True, download=False, **kw):
            calls.append(download)
            raise RuntimeError("fetching")
    monkeypatch.setattr(D, "_cifar100_class", lambda: Fake)
    with pytest.raises(ZeroflowError, match=r"could not read CIFAR-100 from .*RuntimeError: fetching"):
        load_cifar100(str(tmp_path), 50, 50, download=True)
    assert calls == [True]


@pytest.mark.parametrize("key", ["device", "data_root", "checkpoint"])
def test_an_empty_location_on_resume_is_refused(tmp_path, key):
    import json

    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import resumed_config
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(resolve({"dataset": "cub", "backbone": "vit_base_patch16_224",
                                                         "checkpoint": "w.pth"}, None)))
    with pytest.raises(ZeroflowError, match=r"must be a non-empty string \(got ''\)"):
        resumed_config(str(out), {key: ""}, _quiet)


def test_a_run_that_loaded_weights_is_refused_when_none_are_loaded_now():
    from zeroflow.continual.runner import check_identity
    was = {"class_names": ["a", "b"], "weights": {"file": "w.pth", "bytes": 3, "sha256": "0" * 64}}
    with pytest.raises(ZeroflowError, match=r"its backbone weights file is not the one .*; now none\)"):
        check_identity("R", was, dict(was, weights=None))


def test_a_checkpoint_without_identity_is_named_and_the_resumed_run_records_it(tmp_path):
    """Resuming an old checkpoint warns that nothing was checked, and the run's later
    checkpoints record the identity of now (not the old checkpoint's none)."""
    import sys
    sys.path.insert(0, os.path.dirname(__file__))
    import test_continual_e2e as e2e

    from zeroflow.continual.runner import _restore_results
    e2e._train_tasks_with_fakes(tmp_path, stop_after=1)         # its results' identity: None
    now = {"class_names": ["a", "b"], "weights": None}
    said = []
    back = _restore_results(str(tmp_path), e2e._FakeLearner(), resume=True, n_tasks=3, log=_quiet,
                            identity=now, warn=said.append)
    assert back.completed == 1 and back.identity == now
    assert len(said) == 1 and "was written before checkpoints recorded" in said[0]
    assert back.checkpoint(e2e._FakeLearner(), 1)["identity"] == now


def test_each_dataset_describes_its_own_transforms(tmp_path):
    """``transforms`` (what repr() shows, and what VisionDataset subclasses apply) is each dataset's own."""
    from zeroflow.continual.data import load_dataset
    _write_imagefolder(str(tmp_path), "cub")
    d = load_dataset("cub", str(tmp_path), 2, 2, img_size=32, warn=_quiet)
    for ds in (d.train, d.train_eval, d.test):
        assert ds.transforms.transform is ds.transform and ds.transforms.target_transform is ds.target_transform
    assert "RandomResizedCrop" in repr(d.train) and "RandomResizedCrop" not in repr(d.test)


@pytest.mark.usefixtures("zf_cache")
def test_a_sweep_resuming_a_run_on_changed_data_gives_the_sweeps_advice(tmp_path):
    """_run passes continue_existing (a sweep) on to the identity check: its refusal advises
    moving the run away, not --force or --data-root (neither helps a sweep)."""
    from test_continual_data import TINY, _tiny_cub_run
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import run
    _tiny_cub_run(tmp_path)
    cfg = resolve({"dataset": "cub", "data_root": str(tmp_path / "data"), "checkpoint": str(tmp_path / "vit.pth"),
                   "backbone": "vit_base_patch16_224", "model_kwargs": TINY, "img_size": 32, "adapter_dim": 4,
                   "epochs": 1, "batch_size": 4, "num_workers": 0, "device": "cpu", "init_cls": 2, "increment": 2})
    out = str(tmp_path / "r")
    run(cfg, out, continue_existing=True, progress=False, stop_after=1, log=_quiet, warn=_quiet)
    for split in ("train", "test"):
        (tmp_path / "data" / "cub" / split / "n0000").rename(tmp_path / "data" / "cub" / split / "n0009")
    with pytest.raises(ZeroflowError) as e:
        run(cfg, out, continue_existing=True, progress=False, log=_quiet, warn=_quiet)
    assert str(e.value).startswith(f"cannot resume {out}: its data changed"), str(e.value)
    assert str(e.value).endswith(f"restore the data, or move {out} away to run it again on the data as it is now")
