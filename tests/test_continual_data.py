"""Loaders on tiny fixtures in the real on-disk formats; a timm ViT from a local checkpoint."""
import gc
import json
import os
import pickle
import re
import warnings

import numpy as np
import pytest
import torch

from zeroflow.continual.errors import ZeroflowError


def _write_cifar100(root, per_class_train=2, per_class_test=1):
    """cifar-100-python/{train,test,meta} pickles as in the official archive; every image
    is filled with its (original) fine label so the remapping can be checked."""
    folder = os.path.join(root, "cifar-100-python")
    os.makedirs(folder)
    for name, k in (("train", per_class_train), ("test", per_class_test)):
        labels = [c for c in range(100) for _ in range(k)]
        data = np.stack([np.full(3072, c, dtype=np.uint8) for c in labels])
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"filenames": [f"{i}.png" for i in range(len(labels))], "batch_label": name,
                         "fine_labels": labels, "coarse_labels": [c // 5 for c in labels], "data": data}, f)
    with open(os.path.join(folder, "meta"), "wb") as f:
        pickle.dump({"fine_label_names": [f"class{c:03d}" for c in range(100)],
                     "coarse_label_names": [f"super{c}" for c in range(20)]}, f)


def test_cifar100_pickle_folder(tmp_path):
    from zeroflow.continual.data import load_cifar100
    _write_cifar100(str(tmp_path))
    d = load_cifar100(str(tmp_path), 10, 10, img_size=32)
    assert d.n_classes == 100 and len(d.tasks) == 10
    assert d.order[:5] == [68, 56, 78, 8, 23]
    assert len(d.train) == 200 and len(d.test) == 100
    # remapped label 0 is original class 68: its image is filled with 68/255
    sub = d.subset("test", [0])
    x, y = sub[0]
    assert y == 0 and x.shape == (3, 32, 32)
    assert float(x.mean()) == pytest.approx(68 / 255, abs=2e-3)
    assert float(x.max()) <= 1.0  # ToTensor only, no Normalize
    ld = d.loader("train", d.tasks[1], batch_size=8)
    ys = torch.cat([b[1] for b in ld])
    assert sorted(set(ys.tolist())) == list(range(10, 20))


def test_cifar100_missing_and_corrupt(tmp_path):
    from zeroflow.continual.data import load_cifar100
    with pytest.raises(ZeroflowError, match="--download"):
        load_cifar100(str(tmp_path / "nope"), 10, 10)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for n in ("train", "test", "meta"):
        (folder / n).write_bytes(b"not a pickle")
    with pytest.raises(ZeroflowError, match="could not read CIFAR-100"):
        load_cifar100(str(tmp_path), 10, 10)


@pytest.mark.parametrize("damaged", ["train", "test", "meta"])
def test_cifar100_damaged_pickle_is_named(tmp_path, damaged):
    """docs/continual.md: a damaged pickle is an error naming the file (torchvision's own error,
    an UnpicklingError, does not say which of the three files it was reading)."""
    from zeroflow.continual.data import load_cifar100
    _write_cifar100(str(tmp_path))
    path = os.path.join(str(tmp_path), "cifar-100-python", damaged)
    with open(path, "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(ZeroflowError, match=re.escape(path + " is not a readable pickle")):
        load_cifar100(str(tmp_path), 10, 10, img_size=32)


def test_cifar100_damaged_pickles_are_all_named(tmp_path):
    # an empty file (EOFError, not an UnpicklingError) is named as well, and two damaged files both
    from zeroflow.continual.data import load_cifar100
    _write_cifar100(str(tmp_path))
    train, meta = (os.path.join(str(tmp_path), "cifar-100-python", n) for n in ("train", "meta"))
    open(train, "wb").close()
    with pytest.raises(ZeroflowError, match=re.escape(train + " is not a readable pickle (EOFError")):
        load_cifar100(str(tmp_path), 10, 10, img_size=32)
    with open(meta, "wb") as f:
        f.write(b"not a pickle")
    with pytest.raises(ZeroflowError, match=re.escape(f"{train}, {meta} are not a readable pickle")):
        load_cifar100(str(tmp_path), 10, 10, img_size=32)


def _write_imagefolder(root, name, n_classes=4, per_split=2):
    from PIL import Image
    for split in ("train", "test"):
        for c in range(n_classes):
            d = os.path.join(root, name, split, f"n{c:04d}")
            os.makedirs(d)
            for i in range(per_split):
                Image.fromarray(np.full((40, 30, 3), 40 * c + i, dtype=np.uint8)).save(os.path.join(d, f"{i}.png"))


def test_imagefolder_layout(tmp_path):
    from zeroflow.continual.data import class_order, load_dataset
    _write_imagefolder(str(tmp_path), "cub")
    with pytest.warns(UserWarning, match="has 4 class folders, the published dataset 200"):
        d = load_dataset("cub", str(tmp_path), 2, 2, img_size=32)
    assert d.n_classes == 4 and d.tasks == [[0, 1], [2, 3]]
    assert d.order == class_order(4)
    x, y = d.test[0]
    assert x.shape == (3, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # label y is the position of the image's folder class in the order
    assert y == d.order.index(0)
    xt, _ = d.train[0]
    assert xt.shape == (3, 32, 32)


def test_a_hidden_folder_holding_images_is_refused_not_made_a_class(tmp_path):
    # .ipynb_checkpoints (or any hidden folder) in train/ and test/ became class 0 and shifted
    # the whole class order without a word
    from PIL import Image

    from zeroflow.continual.data import load_dataset
    _write_imagefolder(str(tmp_path), "cub")
    for split in ("train", "test"):
        d = tmp_path / "cub" / split / ".ipynb_checkpoints"
        d.mkdir()
        Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(d / "0.png")
    with pytest.raises(ZeroflowError, match=r"cub/train holds the hidden folder\(s\) \.ipynb_checkpoints, which"):
        load_dataset("cub", str(tmp_path), 2, 2, img_size=32)
    import shutil
    shutil.rmtree(tmp_path / "cub" / "test" / ".ipynb_checkpoints")     # in train/ only (Jupyter's usual case)
    with pytest.raises(ZeroflowError, match=r"cub/train holds the hidden folder"):
        load_dataset("cub", str(tmp_path), 2, 2, img_size=32)


def test_imagefolder_missing_root(tmp_path):
    from zeroflow.continual.data import load_dataset
    with pytest.raises(ZeroflowError, match=r"imagenet-a.*train.*not found"):
        load_dataset("imagenet-a", str(tmp_path), 20, 20)
    with pytest.raises(ZeroflowError, match="valid: digits, cifar100, cub"):
        load_dataset("mnist", str(tmp_path), 2, 2)


def test_digits_split_fixed():
    from zeroflow.continual.data import load_digits_data
    a, b = load_digits_data(2, 2), load_digits_data(2, 2)
    assert len(a.train) == 1347 and len(a.test) == 450
    assert np.array_equal(a.test_targets, b.test_targets)
    assert torch.equal(a.test.x, b.test.x)
    assert a.order == [4, 2, 7, 6, 0, 3, 5, 8, 9, 1]


# ---------------------------------------------------------------- backbone checkpoints
TINY = dict(img_size=32, patch_size=16, embed_dim=48, depth=2, num_heads=2)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_timm_vit_from_local_checkpoint(tmp_path, fmt):
    import timm
    from zeroflow.continual.backbones import VIT_B_IN21K, AdaptedViT, load_timm_vit
    src = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **TINY)
    sd = src.state_dict()
    path = str(tmp_path / f"w.{fmt}")
    if fmt == "safetensors":
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in sd.items()}, path)
    else:
        torch.save({"state_dict": sd}, path)
    vit = load_timm_vit(VIT_B_IN21K, checkpoint=path, model_kwargs=TINY)
    for k, v in vit.state_dict().items():
        assert torch.equal(v, sd[k]), k
    # adapters start as the zero function: adapted == plain features
    net = AdaptedViT(vit, 8)
    net.add_adapter_set()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = vit.forward_features(x)[:, 0]
        assert torch.allclose(net.features(x, None), ref, atol=1e-6)
        assert torch.allclose(net.features(x, 0), ref, atol=1e-6)
    assert sum(p.numel() for p in net.adapters.parameters()) == 2 * (48 * 8 + 8 + 8 * 48 + 48)


def test_vit_b_adapter_param_count():
    from zeroflow.continual.backbones import AdapterSet
    s = AdapterSet(12, 768, 64)
    assert sum(p.numel() for p in s[0].parameters()) == 99136


def test_corrupt_and_mismatched_checkpoint(tmp_path):
    import timm
    from zeroflow.continual.backbones import VIT_B_IN21K, load_timm_vit
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ZeroflowError, match="could not load backbone weights"):
        load_timm_vit(VIT_B_IN21K, checkpoint=str(bad), model_kwargs=TINY)
    other = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                              **dict(TINY, embed_dim=64))
    p = tmp_path / "other.pth"
    torch.save(other.state_dict(), p)
    with pytest.raises(ZeroflowError):
        load_timm_vit(VIT_B_IN21K, checkpoint=str(p), model_kwargs=TINY)
    partial = {k: v for k, v in timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0,
                                                  **TINY).state_dict().items() if not k.startswith("blocks.1")}
    p2 = tmp_path / "partial.pth"
    torch.save(partial, p2)
    with pytest.raises(ZeroflowError, match="does not match"):
        load_timm_vit(VIT_B_IN21K, checkpoint=str(p2), model_kwargs=TINY)
    with pytest.raises(ZeroflowError, match="no such file"):
        load_timm_vit(VIT_B_IN21K, checkpoint=str(tmp_path / "missing.safetensors"), model_kwargs=TINY)


# ---------------------------------------------------------------- bad data: one line, exit 2, no folder
def _rewrite_pickle(path, change):
    with open(path, "rb") as f:
        d = pickle.load(f)
    change(d)
    with open(path, "wb") as f:
        pickle.dump(d, f)


def _run_cli(capsys, *args):
    from zeroflow.cli import main
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cifar100_label_out_of_range_and_task_without_test_images(tmp_path, capsys):
    """A fine label of 100 gave a KeyError traceback (exit 1); a test batch without task 1's
    classes crashed in evaluate (torch.cat of nothing) after the run folder was written."""
    from zeroflow.continual.data import load_cifar100
    bad_label, no_test = tmp_path / "bad_label", tmp_path / "no_test"
    for root in (bad_label, no_test):
        _write_cifar100(str(root))
    _rewrite_pickle(bad_label / "cifar-100-python" / "train", lambda d: d["fine_labels"].__setitem__(3, 100))
    first = [68, 56, 78, 8, 23]            # the class order starts here; task 1 = the first 50 of it

    def drop_task1(d):
        from zeroflow.continual.data import class_order
        gone = set(class_order(100)[:50])
        keep = [i for i, y in enumerate(d["fine_labels"]) if y not in gone]
        d["fine_labels"] = [d["fine_labels"][i] for i in keep]
        d["data"] = d["data"][keep]

    _rewrite_pickle(no_test / "cifar-100-python" / "test", drop_task1)
    with pytest.raises(ZeroflowError, match=r"cifar-100-python/train: fine label 100 is not a CIFAR-100 class"):
        load_cifar100(str(bad_label), 50, 50)
    with pytest.raises(ZeroflowError, match=r"cifar-100-python/test has no test image of task 1's classes "
                                            rf"\(class{first[0]:03d}, class{first[1]:03d}"):
        load_cifar100(str(no_test), 50, 50)
    load_cifar100(str(no_test), 100, 100)          # one task of all classes: it has test images
    for root, needle in ((bad_label, f"{bad_label / 'cifar-100-python' / 'train'}: fine label 100"),
                         (no_test, f"{no_test / 'cifar-100-python' / 'test'} has no test image of task 1's")):
        rc, out, err = _run_cli(capsys, "run", "--dataset", "cifar100", "--data-root", root, "--init-cls", 50,
                                "--increment", 50, "--out", tmp_path / "r")
        assert rc == 2 and err.startswith(f"zeroflow: error: {needle}") and err.count("\n") == 1, err
        assert "--download" in err and not (tmp_path / "r").exists()


def test_an_undecodable_image_is_named_by_a_dataloader_worker_too(tmp_path):
    from zeroflow.continual.data import UnreadableImage, load_dataset
    _write_imagefolder(str(tmp_path), "cub")
    bad = tmp_path / "cub" / "test" / "n0002" / "1.png"
    bad.write_bytes(b"garbage")
    d = load_dataset("cub", str(tmp_path), 2, 2, img_size=32, warn=lambda m: None)   # 4 classes, not 200: known
    for workers in (0, 1):
        with pytest.raises(UnreadableImage) as e:
            list(d.loader("test", range(4), 8, num_workers=workers))
        assert str(e.value).startswith(f"cannot read image {bad} (UnidentifiedImageError: ")
        assert str(e.value).endswith("; replace or delete that file") and "\n" not in str(e.value)


@pytest.mark.parametrize("options, error", [
    ("model_kwargs: {bogus: 1}", "model_kwargs {'bogus': 1} do not build timm's vit_base_patch16_224.augreg_in21k "
                                 "(TypeError: "),
    ("model_kwargs: {embed_dim: 30, num_heads: 4}", "model_kwargs {'embed_dim': 30, 'num_heads': 4} do not build "),
    ("model_kwargs: {img_size: 32}", "backbone vit_base_patch16_224.augreg_in21k with model_kwargs {'img_size': 32} "
                                     "does not run on the 224x224 images of this run (img_size) with adapters"),
    ("model_kwargs: {num_classes: 10}", "model_kwargs in {cfg}: num_classes is zeroflow's"),
    ("backbone: resnet18", "backbone resnet18 is not a ViT"),
    ("backbone: nonesuch_vit", "backbone 'nonesuch_vit' is not a timm model (RuntimeError: "),
    ("small_vit: {depth: 1}", "small_vit in {cfg} sets the small ViT of the digits runs; this run's backbone"),
])
def test_a_backbone_option_that_cannot_build_is_refused_before_the_run_starts(tmp_path, capsys, options, error):
    """model_kwargs went unchecked: a TypeError after the folder was claimed, reported as "pretrained
    weights ... are not available"; small_vit on a ViT-B run was ignored. Now one error (exit 2)
    naming the option, before the data is read or --out is created."""
    (tmp_path / "c.yaml").write_text(options + "\n")
    out = tmp_path / "r"
    rc, stdout, err = _run_cli(capsys, "run", "--config", tmp_path / "c.yaml", "--dataset", "cub", "--data-root",
                               tmp_path / "no-data", "--no-progress", "--out", out)
    assert rc == 2 and stdout == "" and err.count("\n") == 1, err
    assert err.startswith("zeroflow: error: " + error.replace("{cfg}", str(tmp_path / "c.yaml"))), err
    assert not out.exists()


def test_digits_runs_refuse_model_kwargs():
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.errors import ZeroflowError
    with pytest.raises(ZeroflowError, match="model_kwargs sets the timm ViT backbone of the real datasets; the digits "
                                            "runs use the small ViT that zeroflow pretrains itself"):
        resolve({"model_kwargs": {"depth": 1}}, None)


def test_the_small_vit_s_pretraining_given_for_a_timm_backbone_is_refused_not_ignored(tmp_path, capsys):
    """pretrain_epochs / pretrain_lr / pretrain_batch_size in the --config file of a run on a timm
    ViT (pretrained already: only the small ViT is pretrained by zeroflow) were ignored without a
    word. They are refused as small_vit is there, naming the options as given, before the data is
    read or --out is created; the digits defaults' pretraining (a digits config on a timm backbone)
    and the options on the small ViT are not."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.errors import ZeroflowError
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pretrain_epochs: 5\n")
    out = tmp_path / "r"
    rc, stdout, err = _run_cli(capsys, "run", "--config", cfg, "--dataset", "cub", "--data-root",
                               tmp_path / "no-data", "--no-progress", "--out", out)
    assert rc == 2 and stdout == "" and err.count("\n") == 1, err
    assert err == (f"zeroflow: error: pretrain_epochs in {cfg} sets the pretraining of the small ViT (backbone: "
                   f"small), which zeroflow pretrains itself; this run's backbone is "
                   f"vit_base_patch16_224.augreg_in21k, pretrained already (drop it)\n"), err
    assert not out.exists()
    cfg.write_text("pretrain_lr: 0.01\npretrain_batch_size: 8\n")
    with pytest.raises(ZeroflowError, match=rf"^pretrain_lr in {re.escape(str(cfg))} and pretrain_batch_size in "
                                            rf"{re.escape(str(cfg))} set the pretraining of the small ViT .* \(drop "
                                            rf"them\)$"):
        resolve({"dataset": "cifar100", "method": "aper"}, str(cfg))
    # the digits defaults carry the small ViT's pretraining: on a timm backbone (refused for its own
    # sake) they are not the user's, nor named
    cfg.write_text("backbone: vit_tiny_patch16_224\n")
    with pytest.raises(ZeroflowError, match=r"^backbone in .* \(vit_tiny_patch16_224\): the digits images") as e:
        resolve({}, str(cfg))
    assert "pretrain_" not in str(e.value)
    # on the small ViT the options act (a real dataset's quick test on its own files)
    cfg.write_text("backbone: small\npretrain_epochs: 5\n")
    assert resolve({"dataset": "cub"}, str(cfg))["pretrain_epochs"] == 5


def _tiny_cub_run(tmp_path, n_classes=4):
    """DATA/cub of ``n_classes``, a tiny timm ViT in vit.pth and its tiny.yaml; the run's CLI arguments
    (--out tmp_path/r; --data-root and --checkpoint left to the caller)."""
    import timm
    _write_imagefolder(str(tmp_path / "data"), "cub", n_classes=n_classes)
    torch.save(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **TINY).state_dict(),
               tmp_path / "vit.pth")
    (tmp_path / "tiny.yaml").write_text(
        "model_kwargs: {img_size: 32, patch_size: 16, embed_dim: 48, depth: 2, num_heads: 2}\nimg_size: 32\n"
        "adapter_dim: 4\nepochs: 1\nbatch_size: 4\nnum_workers: 0\ndevice: cpu\n")
    return ["run", "--config", tmp_path / "tiny.yaml", "--dataset", "cub", "--init-cls", 2, "--increment", 2,
            "--no-progress", "--out", tmp_path / "r"]


@pytest.mark.usefixtures("zf_cache")
def test_an_undecodable_image_mid_run_is_one_line_and_the_run_resumes(tmp_path, capsys):
    """PIL's UnidentifiedImageError was a traceback (exit 1) in the middle of a run."""
    from zeroflow.continual.data import class_order
    args = _tiny_cub_run(tmp_path) + ["--data-root", tmp_path / "data", "--checkpoint", tmp_path / "vit.pth"]
    task2_class = class_order(4)[2]                  # remapped label 2: the first class of task 2
    bad = tmp_path / "data" / "cub" / "train" / f"n{task2_class:04d}" / "0.png"
    good = bad.read_bytes()
    bad.write_bytes(b"garbage")
    out = tmp_path / "r"
    rc, stdout, all_err = _run_cli(capsys, *args)
    warned, err = all_err.splitlines(keepends=True)     # the class-count warning (4 folders, not 200), the error
    assert rc == 2 and "task 1/2" in stdout and warned.startswith("zeroflow: warning: cub under "), all_err
    assert err.startswith(f"zeroflow: error: cannot read image {bad} (UnidentifiedImageError: ")
    assert err.endswith(f"; replace or delete that file, then continue the run with: zeroflow run --resume --out {out} "
                        f"(its 1 finished task(s) are kept)\n")
    assert not (out / ".lock").exists() and not (out / "metrics.json").exists()
    bad.write_bytes(good)
    rc, stdout, err = _run_cli(capsys, "run", "--resume", "--out", out, "--no-progress")
    assert rc == 0 and f"resuming {out} after task 1/2" in stdout, err
    assert (out / "metrics.json").exists()


def test_the_digits_shift_moves_up_to_one_pixel_either_way():
    """docs/continual.md: digits training augmentation is a random shift of up to 1 pixel (pad +
    crop). An offset drawn from [0, 2s) instead of [0, 2s] shifts one way only on each axis."""
    from zeroflow.continual.data import TensorImages
    x = torch.zeros(1, 1, 3, 3)
    x[0, 0, 1, 1] = 1.0
    ds = TensorImages(x, [0], shift=1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        seen = {tuple(torch.nonzero(ds[0][0][0])[0].tolist()) for _ in range(300)}
    assert seen == {(r, c) for r in range(3) for c in range(3)}
    assert torch.equal(TensorImages(x, [0])[0][0], x[0])                # no shift: the image itself


# ---------------------------------------------------------------- data in the real formats, as users have it
def test_hidden_files_inside_class_folders_are_not_images(tmp_path):
    """A macOS archive's AppleDouble ``._0.png`` beside every image stopped the run at the first one
    it read (once per such file); Jupyter's ``.ipynb_checkpoints/`` inside a class folder added
    copies of that class's images to it without a word."""
    from zeroflow.continual.data import load_dataset
    _write_imagefolder(str(tmp_path), "cub")
    for split in ("train", "test"):
        for c in range(4):
            (tmp_path / "cub" / split / f"n{c:04d}" / "._0.png").write_bytes(b"\x00\x05\x16\x07Mac OS X" + bytes(60))
    cp = tmp_path / "cub" / "train" / "n0000" / ".ipynb_checkpoints"
    cp.mkdir()
    (cp / "0-checkpoint.png").write_bytes((tmp_path / "cub" / "train" / "n0000" / "0.png").read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")          # hidden files are skipped silently: no warning
        d = load_dataset("cub", str(tmp_path), 2, 2, img_size=32, warn=lambda m: None)
    for ds in (d.train, d.train_eval, d.test):
        names = sorted(os.path.relpath(p, ds.root) for p, _ in ds.samples)
        assert names == [f"n{c:04d}/{i}.png" for c in range(4) for i in range(2)], names
    assert len(d.train_targets) == 8 and len(d.test_targets) == 8


def test_files_that_are_not_images_are_skipped_with_a_warning(tmp_path):
    from zeroflow.continual.data import load_dataset
    _write_imagefolder(str(tmp_path), "cub")
    (tmp_path / "cub" / "train" / "n0001" / "2.gif").write_bytes(b"GIF89a")
    (tmp_path / "cub" / "train" / "n0003" / "notes.txt").write_text("x")
    said = []
    d = load_dataset("cub", str(tmp_path), 2, 2, img_size=32, warn=said.append)
    assert said[0] == (f"{tmp_path / 'cub' / 'train'}: skipped 2 file(s) that are not images by their extension "
                       f"(e.g. n0001/2.gif); the images read are .jpg, .jpeg, .png, .ppm, .bmp, .pgm, .tif, .tiff, "
                       f".webp"), said
    assert len(said) == 2 and "has 4 class folders, the published dataset 200" in said[1]
    assert len(d.train) == 8


def test_a_test_split_sharing_files_with_train_is_refused(tmp_path):
    """test/ as a link to train/ (or class folders or files linked into both) loaded without a
    word: the run was tested on its own training images."""
    from zeroflow.continual.data import load_dataset
    _write_imagefolder(str(tmp_path), "imagenet-a")
    test = tmp_path / "imagenet-a" / "test"
    import shutil
    shutil.rmtree(test / "n0002")
    (test / "n0002").symlink_to(tmp_path / "imagenet-a" / "train" / "n0002")
    (test / "n0001" / "1.png").unlink()
    os.link(tmp_path / "imagenet-a" / "train" / "n0001" / "0.png", test / "n0001" / "1.png")     # a hard link too
    train = tmp_path / "imagenet-a" / "train"
    with pytest.raises(ZeroflowError, match=r"imagenet-a: 3 of the 8 test images are also training images \(e\.g\. "
                                            rf"{re.escape(str(test / 'n0001' / '1.png'))} and "
                                            rf"{re.escape(str(train / 'n0001' / '0.png'))} are the same file\)"):
        load_dataset("imagenet-a", str(tmp_path), 2, 2, img_size=32, warn=lambda m: None)


def test_an_empty_class_folder_is_named_with_its_split(tmp_path):
    from zeroflow.continual.data import load_dataset
    _write_imagefolder(str(tmp_path), "omnibenchmark")
    empty = tmp_path / "omnibenchmark" / "test" / "n0003"
    for f in empty.iterdir():
        f.unlink()
    (empty / "._0.png").write_bytes(b"\x00")     # holds only a hidden file: no image either
    with pytest.raises(ZeroflowError, match=rf"omnibenchmark: the class folder\(s\) {re.escape(str(empty))} hold no "
                                            r"image \(\.jpg, .*\); add its images, or remove the class from both "):
        load_dataset("omnibenchmark", str(tmp_path), 2, 2, img_size=32, warn=lambda m: None)
    (tmp_path / "omnibenchmark" / "train" / ".ipynb_checkpoints").mkdir()     # empty: still named as hidden
    with pytest.raises(ZeroflowError, match=r"train holds the hidden folder\(s\) \.ipynb_checkpoints, which"):
        load_dataset("omnibenchmark", str(tmp_path), 2, 2, img_size=32, warn=lambda m: None)


def test_data_extracted_one_level_too_deep_is_refused_with_the_layout(tmp_path):
    """cub/train/CUB_200_2011/<class>/... was one class of every image; the error then advised
    --init-cls 1, which the loader accepted."""
    from zeroflow.continual.data import load_dataset
    _write_imagefolder(str(tmp_path / "flat"), "cub")
    for split in ("train", "test"):
        (tmp_path / "data" / "cub" / split).mkdir(parents=True)
        (tmp_path / "flat" / "cub" / split).rename(tmp_path / "data" / "cub" / split / "CUB_200_2011")
    train = tmp_path / "data" / "cub" / "train"
    for init in (1, 2):
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            with pytest.raises(ZeroflowError, match=rf"cub: {re.escape(str(train))} holds 1 class folder\(s\): "
                                                    r"CUB_200_2011; a class-incremental run needs at least 2 "
                                                    r"classes, .* the data looks extracted one level too deep; "
                                                    r"move the class folders inside it up"):
                load_dataset("cub", str(tmp_path / "data"), init, 1, img_size=32, warn=lambda m: None)
            gc.collect()
        # the check's os.scandir, which any() left at the first folder, was never closed
        assert [str(w.message) for w in said if issubclass(w.category, ResourceWarning)] == []


def test_a_missing_cifar_file_is_named_with_the_flag_that_fetches_it(tmp_path):
    from zeroflow.continual.data import load_cifar100
    _write_cifar100(str(tmp_path))
    (tmp_path / "cifar-100-python" / "meta").unlink()
    with pytest.raises(ZeroflowError, match=r"CIFAR-100 under .*cifar-100-python/ lacks meta \(it needs train, test "
                                            r"and meta\); restore the file\(s\), or add --download"):
        load_cifar100(str(tmp_path), 50, 50)


def test_a_config_files_home_relative_paths_are_expanded(tmp_path, monkeypatch):
    from zeroflow.continual.defaults import resolve
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "c.yaml").write_text("data_root: ~/data\ndataset: cub\ncheckpoint: ~/vit.pth\n")
    cfg = resolve({}, str(tmp_path / "c.yaml"))
    assert cfg["data_root"] == str(tmp_path / "data") and cfg["checkpoint"] == str(tmp_path / "vit.pth")


# ---------------------------------------------------------------- a resumed run's data and weights
@pytest.mark.usefixtures("zf_cache")
def test_a_resume_on_changed_data_or_weights_is_refused_and_may_name_where_they_moved(tmp_path, capsys, monkeypatch):
    """The resumed run reloaded the data: a renamed class folder moved every class one place under
    the finished tasks' adapters and prototypes (exit 0, normal metrics), an added one crashed
    at the end (IndexError). A relative --data-root or --checkpoint could not be resumed from
    another directory: both options were ignored on --resume, the error said to pass them."""
    import shutil
    out = tmp_path / "r"
    monkeypatch.chdir(tmp_path)
    args = _tiny_cub_run(tmp_path)
    rc, stdout, err = _run_cli(capsys, *args, "--data-root", "data", "--checkpoint", "vit.pth", "--stop-after", 1)
    assert rc == 0, err
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["identity"]["class_names"] == [f"n{c:04d}" for c in range(4)]
    assert ck["identity"]["weights"]["bytes"] == os.path.getsize(tmp_path / "vit.pth")
    before = (out / "checkpoint.pt").read_bytes(), (out / "environment.json").read_bytes()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    rc, _, err = _run_cli(capsys, "run", "--resume", "--out", out, "--no-progress")
    assert rc == 2 and err == "zeroflow: error: --checkpoint vit.pth: no such file\n", err
    rc, _, err = _run_cli(capsys, "run", "--resume", "--out", out, "--no-progress", "--checkpoint",
                          tmp_path / "vit.pth")
    assert rc == 2 and "data folder data/cub/train/ not found" in err and "pass --data-root DIR" in err, err

    def refused(needle, *more):
        rc, _, all_err = _run_cli(capsys, "run", "--resume", "--out", out, "--no-progress", *more)
        err = all_err.splitlines()[-1]      # after the class-count warning (4 folders, not 200)
        assert rc == 2 and err.startswith(f"zeroflow: error: cannot resume {out}: "), all_err
        assert needle in err, err
        assert ((out / "checkpoint.pt").read_bytes(), (out / "environment.json").read_bytes()) == before

    # the same class names in another folder: fine below; renamed / added classes: refused
    shutil.copytree(tmp_path / "data", elsewhere / "moved")
    (elsewhere / "moved" / "cub" / "train" / "n0000").rename(elsewhere / "moved" / "cub" / "train" / "n0009")
    (elsewhere / "moved" / "cub" / "test" / "n0000").rename(elsewhere / "moved" / "cub" / "test" / "n0009")
    refused("its data changed since the run started (class 0 of its 4 was 'n0000', the data now has 'n0001' there)",
            "--data-root", "moved", "--checkpoint", tmp_path / "vit.pth")
    shutil.copytree(elsewhere / "moved" / "cub" / "train" / "n0009", elsewhere / "moved" / "cub" / "train" / "n0000")
    shutil.copytree(elsewhere / "moved" / "cub" / "test" / "n0009", elsewhere / "moved" / "cub" / "test" / "n0000")
    refused("(it had 4 classes, the data now has 5 (gone: none; added: 'n0009'))",
            "--data-root", "moved", "--checkpoint", tmp_path / "vit.pth")
    # other weights in the file the run names
    other = elsewhere / "vit.pth"
    import timm
    torch.save(timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **TINY).state_dict(), other)
    refused("its backbone weights file is not the one the run started with (vit.pth, ",
            "--data-root", tmp_path / "data", "--checkpoint", other)
    rc, stdout, err = _run_cli(capsys, "run", "--resume", "--out", out, "--no-progress", "--data-root",
                               tmp_path / "data", "--checkpoint", tmp_path / "vit.pth")
    assert rc == 0 and "resuming" in stdout and "task 2/2" in stdout, err
    m = json.loads((out / "metrics.json").read_text())
    assert m["config"]["data_root"] == "data" and m["config"]["checkpoint"] == "vit.pth"     # the run's own
    assert m["class_names"] == [f"n{c:04d}" for c in range(4)]


def test_resume_refuses_a_weights_file_for_a_run_that_loads_none(tmp_path):
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import resumed_config
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(resolve({}, None)))
    with pytest.raises(ZeroflowError, match=r"--checkpoint: the run in .* loads no weights file \(its backbone is "
                                            r"small, pretrained by zeroflow\); drop the option"):
        resumed_config(str(out), {"checkpoint": "w.pth"}, print)
    (out / "config.json").write_text(json.dumps(resolve({"dataset": "cub"}, None)))
    cfg, where = resumed_config(str(out), {"data_root": "~/d"}, print)
    assert where == {"device": cfg["device"], "data_root": os.path.expanduser("~/d"), "checkpoint": None}


def test_a_dangling_link_is_named_when_read_and_each_split_is_walked_once(tmp_path, monkeypatch):
    """The overlap check's os.stat of a dangling x.png link (torchvision lists it by name) was a
    FileNotFoundError traceback at load; the file is named when the run reads it, as any
    unreadable image. The three datasets share their split's one walk, each with its transform."""
    from torchvision.datasets import folder

    from zeroflow.continual.data import UnreadableImage, load_dataset
    _write_imagefolder(str(tmp_path), "cub")
    link = tmp_path / "cub" / "test" / "n0001" / "2.png"
    link.symlink_to(tmp_path / "gone.png")
    walks = []
    make_dataset = folder.make_dataset
    monkeypatch.setattr(folder, "make_dataset", lambda d, *a, **k: walks.append(d) or make_dataset(d, *a, **k))
    d = load_dataset("cub", str(tmp_path), 2, 2, img_size=32, warn=lambda m: None)
    assert sorted(walks) == [str(tmp_path / "cub" / "test"), str(tmp_path / "cub" / "train")]
    assert d.train.samples == d.train_eval.samples and str(link) in [p for p, _ in d.test.samples]
    train_tf, test_tf = (type(t).__name__ for t in d.train.transform.transforms[:1] + d.test.transform.transforms[:1])
    assert (train_tf, test_tf) == ("RandomResizedCrop", "Resize") and d.train_eval.transform is d.test.transform
    assert d.train.target_transform is d.test.target_transform and d.train.loader is d.test.loader
    with pytest.raises(UnreadableImage, match=rf"cannot read image {re.escape(str(link))} "):
        list(d.loader("test", range(4), 8))


def test_identity_refusals_give_the_advice_of_their_command_and_old_checkpoints_are_named(tmp_path):
    """A sweep resumes a run of its configuration even with --force, and its --data-root is part
    of that configuration: the refusal told it to add --force or pass --data-root, neither of
    which helps there. A checkpoint written before identities were recorded resumed without a
    word that nothing was checked."""
    from zeroflow.continual.runner import check_identity, resumed_config
    was = {"class_names": ["a", "b"], "weights": {"file": "w.pth", "bytes": 3, "sha256": "0" * 64}}
    now = dict(was, class_names=["a", "c"])
    with pytest.raises(ZeroflowError) as run_err:
        check_identity("R", was, now)
    assert str(run_err.value).endswith("restore the data (or pass --data-root DIR where it is), or start a new run "
                                       "(zeroflow run with another --out, or --force to replace this one)")
    with pytest.raises(ZeroflowError) as sweep_err:
        check_identity("R", was, now, in_sweep=True)
    assert str(sweep_err.value).endswith("restore the data, or move R away to run it again on the data as it is now")
    with pytest.raises(ZeroflowError, match=r"restore that file, or move R away"):
        check_identity("R", was, dict(was, weights=dict(was["weights"], sha256="1" * 64)), in_sweep=True)
    said = []
    check_identity("R", None, now, warn=said.append)
    assert said == [f"{os.path.join('R', 'checkpoint.pt')} was written before checkpoints recorded the data's class "
                    f"names and the weights file: whether they changed since the run started is not checked"]
    check_identity("R", was, was, warn=said.append)
    assert len(said) == 1
    # a digits run reads no --data-root: given on --resume, it is ignored with a word, not taken silently
    from zeroflow.continual.defaults import resolve
    out = tmp_path / "r"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(resolve({}, None)))
    warned = []
    _, where = resumed_config(str(out), {"data_root": "/elsewhere"}, warned.append)
    assert where["data_root"] == "data" and "ignoring --data-root /elsewhere (the run has data)" in warned[0]


def test_16_bit_greyscale_png_decodes_to_its_grey_not_white(tmp_path):
    """A 16-bit greyscale PNG opens in PIL as mode I;16, whose convert("RGB") clipped every
    value above 255 to 255: the image reached the network (nearly) white. 8-bit greyscale,
    RGBA and palette images decode as torchvision's loader decodes them."""
    from PIL import Image

    from zeroflow.continual.data import load_dataset, load_image
    _write_imagefolder(str(tmp_path), "cub")
    folder = tmp_path / "cub" / "test" / "n0001"
    grey16 = (np.arange(40 * 30, dtype=np.float64).reshape(40, 30) / (40 * 30 - 1) * 65535).astype(np.uint16)
    Image.fromarray(grey16).save(folder / "g16.png")
    with Image.open(folder / "g16.png") as opened:
        assert opened.mode.startswith("I")
    rgb = np.asarray(load_image(str(folder / "g16.png")))
    assert rgb.shape == (40, 30, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], np.rint(grey16 / 257.0).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all() and 120 < rgb.mean() < 135
    Image.fromarray(np.full((40, 30), 7000, dtype=np.uint16)).save(folder / "dark16.png")   # dark, not white
    assert int(np.asarray(load_image(str(folder / "dark16.png"))).max()) == round(7000 / 257)
    for mode, img in (("L", Image.fromarray(np.full((40, 30), 90, dtype=np.uint8))),
                      ("RGBA", Image.fromarray(np.full((40, 30, 4), 90, dtype=np.uint8))),
                      ("P", Image.fromarray(np.full((40, 30, 3), 90, dtype=np.uint8)).convert("P"))):
        img.save(folder / f"x_{mode}.png")
        out = load_image(str(folder / f"x_{mode}.png"))
        assert out.mode == "RGB" and np.asarray(out).tolist() == np.asarray(img.convert("RGB")).tolist(), mode
    d = load_dataset("cub", str(tmp_path), 2, 2, img_size=32, warn=lambda m: None)
    x, _ = d.test[[p for p, _ in d.test.samples].index(str(folder / "dark16.png"))]
    assert float(x.max()) == pytest.approx(round(7000 / 257) / 255, abs=1e-6)


def _cifar100_with_one_file_changed(root: str, name: str, change) -> str:
    """A CIFAR-100 folder under ``root`` (_write_cifar100) whose file ``name`` holds
    ``change(its unpickled dict)``; the file's path."""
    _write_cifar100(root)
    path = os.path.join(root, "cifar-100-python", name)
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="latin1")
    with open(path, "wb") as f:
        pickle.dump(change(entry), f)
    return path


@pytest.mark.parametrize("damaged, why", [
    ("train", "no key 'data', 'fine_labels' (it has b'data', b'fine_labels': bytes keys, from a pickle read with "
              "encoding='bytes' and written again; the official files have str keys)"),
    ("meta", "no key 'fine_label_names' (its keys: 'coarse_label_names')"),
    ("test", "data of shape (100, 3000), not rows of 3072 bytes (32x32 RGB) per image"),
    ("train-list", "a list, not the dict of a CIFAR-100 file"),
    ("meta-and-labels", "no key 'fine_label_names' (its keys: 'coarse_label_names')"),
])
def test_a_cifar100_pickle_without_what_torchvision_reads_is_named(tmp_path, damaged, why):
    """A CIFAR-100 file that unpickles but lacks what torchvision reads (re-pickled from the CIFAR
    page's unpickle snippet, encoding='bytes': bytes keys; a meta without fine_label_names; image
    rows cut short) stopped the run with 'could not read CIFAR-100 from DIR: KeyError: 'data'' (or
    numpy's reshape error): which file, and what to do, unsaid. Now the file, what it lacks and the fix."""
    from zeroflow.continual.data import load_cifar100
    def damage(entry):
        if damaged == "train":
            return {k.encode(): v for k, v in entry.items()}
        if damaged == "train-list":
            return list(entry.values())
        if damaged.startswith("meta"):
            del entry["fine_label_names"]
        else:
            entry["data"] = entry["data"][:, :3000]
        return entry
    path = _cifar100_with_one_file_changed(str(tmp_path), damaged.split("-")[0], damage)
    if damaged == "meta-and-labels":       # train's labels under 'labels', which torchvision reads too: only meta
        train = tmp_path / "cifar-100-python" / "train"
        entry = pickle.loads(train.read_bytes(), encoding="latin1")
        train.write_bytes(pickle.dumps({("labels" if k == "fine_labels" else k): v for k, v in entry.items()}))
    with pytest.raises(ZeroflowError) as e:
        load_cifar100(str(tmp_path), 10, 10, img_size=32)
    assert str(e.value) == (f"could not read CIFAR-100 from {tmp_path / 'cifar-100-python'}: {path}: {why}; replace "
                            f"the file with the official one (--download into an empty --data-root fetches it)")


def test_a_real_dataset_on_the_small_vit_takes_its_pretraining_defaults(tmp_path, monkeypatch, capsys):
    """backbone: small in a config file (a quick test of an ImageFolder set in its own format, the
    small ViT pretrained on it) stopped with a KeyError: 'pretrain_lr' traceback once the data was
    read: the pretraining options are in the digits defaults only. A real dataset's run on the small
    ViT takes them (those the file gives win) and runs."""
    from zeroflow.cli import main

    monkeypatch.setenv("ZEROFLOW_CACHE", str(tmp_path / "cache"))
    _write_imagefolder(str(tmp_path / "data"), "cub", n_classes=4, per_split=4)
    cfg = tmp_path / "small.yaml"
    cfg.write_text("backbone: small\nimg_size: 16\nadapter_dim: 4\nsmall_vit: {patch_size: 4, embed_dim: 16, depth: 1, "
                   "num_heads: 2}\npretrain_epochs: 1\nepochs: 1\nbatch_size: 8\nnum_workers: 0\n")
    out = tmp_path / "run"
    assert main(["run", "--config", str(cfg), "--dataset", "cub", "--data-root", str(tmp_path / "data"),
                 "--init-cls", "2", "--increment", "2", "--optimizer", "zo_sgd", "--out", str(out),
                 "--no-progress"]) == 0, capsys.readouterr().err
    saved = json.loads((out / "config.json").read_text())
    # the digits' pretraining lr and batch (docs/continual.md), the file's epochs
    assert (saved["pretrain_epochs"], saved["pretrain_lr"], saved["pretrain_batch_size"]) == (1, 3e-3, 64)
    assert (out / "metrics.json").is_file()


@pytest.mark.parametrize("dataset", ["cifar100", "cub", "imagenet-a", "omnibenchmark"])
def test_the_small_vit_s_pretraining_defaults_leave_a_timm_vit_run_s_configuration_alone(dataset):
    """validate gives a run on the small ViT its pretraining defaults; a real dataset's run on its
    timm ViT (every run folder of one written so far) gains none: its configuration, and so the
    comparison of a resumed or swept run with its config.json, is what it was."""
    from zeroflow.continual.defaults import SMALL_PRETRAINING, resolve, validate
    from zeroflow.continual.runfolder import config_differences

    cfg = resolve(dict(dataset=dataset, method="ease", optimizer="zo_sgd"))
    assert cfg["backbone"] != "small"
    saved = {k: v for k, v in validate(cfg).items() if k not in SMALL_PRETRAINING}
    assert set(validate(cfg)) == set(saved)
    assert config_differences(saved, validate(dict(saved))) == []


@pytest.mark.parametrize("split", ["train", "test"])
def test_a_cifar100_file_of_other_than_uint8_pixels_is_refused_when_loaded(tmp_path, split):
    """A CIFAR-100 train or test file whose data is int64 (written again from numpy arithmetic) loaded, and
    the run then stopped in its first task with PIL's 'TypeError: Cannot handle this data type'
    traceback, its folder claimed. Refused when the data is loaded now, naming the file and the fix."""
    from zeroflow.continual.data import load_cifar100
    path = _cifar100_with_one_file_changed(str(tmp_path), split,
                                           lambda entry: dict(entry, data=entry["data"].astype(np.int64)))
    with pytest.raises(ZeroflowError) as e:
        load_cifar100(str(tmp_path), 10, 10, img_size=32)
    assert str(e.value) == (f"{path}: its data is int64, not the uint8 pixels of a CIFAR-100 file; replace the file "
                            f"with the official one (--download into an empty --data-root fetches it)")


def test_a_sweep_says_a_warning_of_its_data_once(tmp_path, monkeypatch, capsys):
    """zeroflow sweep on an ImageFolder set of another class count than the study's said 'cub under
    ... has 4 class folders, the published dataset 200' once per run (8 optimizers x 3 seeds: 24
    times), burying the other warnings; its runs share the data, so it is said once now."""
    from zeroflow.cli import main

    monkeypatch.setenv("ZEROFLOW_CACHE", str(tmp_path / "cache"))
    _write_imagefolder(str(tmp_path / "data"), "cub", n_classes=4, per_split=4)
    cfg = tmp_path / "small.yaml"
    cfg.write_text("backbone: small\nimg_size: 16\nadapter_dim: 4\nsmall_vit: {patch_size: 4, embed_dim: 16, depth: 1, "
                   "num_heads: 2}\npretrain_epochs: 1\npretrain_lr: 0.003\npretrain_batch_size: 64\nepochs: 1\n"
                   "batch_size: 8\nnum_workers: 0\n")
    assert main(["sweep", "--config", str(cfg), "--dataset", "cub", "--data-root", str(tmp_path / "data"),
                 "--init-cls", "2", "--increment", "2", "--method", "aper", "--optimizers", "zo_sgd,zo_adam",
                 "--out", str(tmp_path / "sweep"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    said = f"zeroflow: warning: cub under {tmp_path / 'data' / 'cub'} has 4 class folders, the published dataset 200"
    assert err.count(said) == 1, err


@pytest.mark.parametrize("options", ["backbone: vit_base_patch16_224.augreg_in21k\n",
                                     "backbone: vit_base_patch16_224.augreg_in21k\nimg_size: 32\n"
                                     "model_kwargs: {img_size: 32, patch_size: 16, embed_dim: 48, depth: 2, "
                                     "num_heads: 2}\n"])
def test_a_digits_run_on_a_timm_vit_is_refused_before_anything(tmp_path, capsys, options):
    """The digits images are 8x8 and grey, which a timm ViT (3-channel images of img_size) cannot
    take: a digits run given one stopped with a KeyError: 'img_size' traceback, or, given an
    img_size, with timm's AssertionError 'Input height (8) doesn't match model (32)' after the run
    folder was written. Refused with the options, naming the backbone as given."""
    from zeroflow.continual.defaults import resolve
    cfg = tmp_path / "c.yaml"
    cfg.write_text(options)
    out = tmp_path / "r"
    rc, stdout, err = _run_cli(capsys, "run", "--config", cfg, "--out", out, "--no-progress")
    assert rc == 2 and stdout == "" and err == (
        f"zeroflow: error: backbone in {cfg} (vit_base_patch16_224.augreg_in21k): the digits images (8x8, grey) run "
        f"on the small ViT only (backbone: small, pretrained by zeroflow); drop the option, or run the timm ViT on a "
        f"real dataset\n"), err
    assert not out.exists()
    with pytest.raises(ZeroflowError, match=r"^config option backbone \(vit_tiny_patch16_224\): the digits images"):
        resolve({"backbone": "vit_tiny_patch16_224"})
    assert resolve({"backbone": "small"})["backbone"] == "small"


def test_an_img_size_given_to_a_digits_run_is_refused_not_ignored(tmp_path, capsys):
    """img_size: 32 in the config file of a digits run (the small ViT on the embedded 8x8 images) did
    nothing: the loader gives 8x8 images whatever it says, and the small ViT is built for them; yet
    the run recorded img_size 32 in its configuration. Refused before anything, as given; a real
    dataset's run on the small ViT takes it (its images are resized to img_size)."""
    from zeroflow.continual.defaults import resolve
    cfg = tmp_path / "c.yaml"
    cfg.write_text("img_size: 32\n")
    out = tmp_path / "r"
    rc, stdout, err = _run_cli(capsys, "run", "--config", cfg, "--out", out, "--no-progress")
    assert rc == 2 and stdout == "" and err == (f"zeroflow: error: img_size in {cfg} sizes the images of the real "
                                                f"datasets; the digits images are 8x8, as scikit-learn ships them "
                                                f"(drop it)\n"), err
    assert not out.exists()
    cfg.write_text("backbone: small\nimg_size: 32\n")
    assert resolve({"dataset": "cub"}, str(cfg))["img_size"] == 32


def test_download_of_a_folder_dataset_is_refused_naming_the_option(tmp_path, capsys):
    """--download on CUB (or download: true in the file) was refused by the loader in words that
    named no option ('cub cannot be downloaded automatically'), after the device and backbone
    checks; refused with the options now, naming it as given; CIFAR-100 and digits as before."""
    from zeroflow.continual.defaults import resolve
    out = tmp_path / "r"
    rc, stdout, err = _run_cli(capsys, "run", "--dataset", "cub", "--data-root", tmp_path / "d", "--download",
                               "--out", out)
    assert rc == 2 and stdout == "" and err == (f"zeroflow: error: --download: cub cannot be downloaded "
                                                f"automatically; place it under {tmp_path / 'd' / 'cub'}/{{train,test}}"
                                                f"/<class>/<image> and drop the option\n"), err
    assert not out.exists()
    cfg = tmp_path / "c.yaml"
    cfg.write_text("download: true\n")
    with pytest.raises(ZeroflowError, match=rf"^download in {re.escape(str(cfg))}: omnibenchmark cannot be "):
        resolve({"dataset": "omnibenchmark"}, str(cfg))
    assert resolve({"dataset": "cifar100", "download": True})["download"] is True
    assert resolve({"download": True})["download"] is True       # digits: a warning (test_cli)


def test_a_folder_dataset_s_init_cls_above_its_classes_is_named_as_the_user_gave_it(tmp_path, capsys):
    """A folder dataset counts its classes when it is loaded, and its loader, which knows no flags,
    said 'init_cls 6 exceeds the 4 classes of cub' to a user who gave --init-cls 6 (validate names
    the option as given for digits and cifar100: --init-cls 6, init_cls in FILE (6)). zeroflow run
    and sweep name it so now (a resumed run: init_cls in its config.json), before anything is
    written; the loader alone still says init_cls."""
    from zeroflow.continual.data import load_dataset
    _write_imagefolder(str(tmp_path / "data"), "cub", n_classes=4, per_split=1)
    small = "backbone: small\nimg_size: 16\nsmall_vit: {patch_size: 4, embed_dim: 16, depth: 1, num_heads: 2}\n"
    cfg = tmp_path / "small.yaml"
    cfg.write_text(small)
    common = ("--dataset", "cub", "--data-root", tmp_path / "data", "--no-progress")
    said = "exceeds the 4 classes of cub; give at most 4\n"
    for cmd in ("run", "sweep"):
        out = tmp_path / cmd
        rc, stdout, err = _run_cli(capsys, cmd, "--config", cfg, *common, "--init-cls", 6, "--out", out)
        # after the data's own warning in a run (4 class folders, not the published 200)
        assert rc == 2 and stdout == "" and err.splitlines(True)[-1] == f"zeroflow: error: --init-cls 6 {said}", err
        assert not out.exists()
    given = tmp_path / "given.yaml"
    given.write_text(small + "init_cls: 6\n")
    for cmd in ("run", "sweep"):
        out = tmp_path / cmd
        rc, stdout, err = _run_cli(capsys, cmd, "--config", given, *common, "--out", out)
        assert rc == 2 and err.splitlines(True)[-1] == f"zeroflow: error: init_cls in {given} (6) {said}", err
        assert not out.exists()
    # a resumed run's init_cls is its config.json's (a --init-cls given is ignored, with a warning)
    from zeroflow.continual.defaults import resolve
    run_dir = tmp_path / "resumed"
    run_dir.mkdir()
    (run_dir / "config.json").write_text(json.dumps(resolve({"dataset": "cub", "data_root": str(tmp_path / "data")},
                                                            str(given))))
    rc, stdout, err = _run_cli(capsys, "run", "--resume", "--out", run_dir, "--init-cls", 2, "--no-progress")
    assert rc == 2 and err.splitlines(True)[-1] == (f"zeroflow: error: init_cls in {run_dir / 'config.json'} (6) "
                                                    f"{said}"), err
    assert os.listdir(run_dir) == ["config.json"]
    with pytest.raises(ZeroflowError) as e:
        load_dataset("cub", str(tmp_path / "data"), 6, 2, img_size=16, warn=lambda m: None)
    assert str(e.value) == "init_cls 6 exceeds the 4 classes of cub; give at most 4"


def test_a_sweep_says_its_data_s_warning_once_and_a_run_s_own_warning_under_each_run(tmp_path, monkeypatch, capsys):
    """zeroflow sweep said every warning text once (the first run's), meant for the warnings of the
    data its runs share: a run's own warning that another run says alike (zo_eps 1e-8 below the
    floor of fp32 forwards, a warning of each ZO run) was said under the first run only, as if
    the second had none. The data's warning is said once, the runs' own under each run."""
    from zeroflow.cli import main

    monkeypatch.setenv("ZEROFLOW_CACHE", str(tmp_path / "cache"))
    _write_imagefolder(str(tmp_path / "data"), "cub", n_classes=4, per_split=4)
    cfg = tmp_path / "small.yaml"
    cfg.write_text("backbone: small\nimg_size: 16\nadapter_dim: 4\nsmall_vit: {patch_size: 4, embed_dim: 16, depth: 1, "
                   "num_heads: 2}\npretrain_epochs: 1\nepochs: 1\nbatch_size: 8\nnum_workers: 0\n")
    assert main(["sweep", "--config", str(cfg), "--dataset", "cub", "--data-root", str(tmp_path / "data"),
                 "--init-cls", "2", "--increment", "2", "--method", "aper", "--optimizers", "zo_sgd,zo_adam",
                 "--zo-eps", "1e-8", "--out", str(tmp_path / "sweep"), "--no-progress"]) == 0
    err = capsys.readouterr().err
    data = f"zeroflow: warning: cub under {tmp_path / 'data' / 'cub'} has 4 class folders, the published dataset 200"
    own = "zeroflow: warning: --precision fp32 with --zo-eps 1e-08: by the fidelity study"
    assert err.count(data) == 1 and err.count(own) == 2, err
