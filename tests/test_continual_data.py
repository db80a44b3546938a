"""Loaders on tiny fixtures in the real on-disk formats; a timm ViT from a local checkpoint."""
import os
import pickle

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
    d = load_dataset("cub", str(tmp_path), 2, 2, img_size=32)
    assert d.n_classes == 4 and d.tasks == [[0, 1], [2, 3]]
    assert d.order == class_order(4)
    x, y = d.test[0]
    assert x.shape == (3, 32, 32) and 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    # label y is the position of the image's folder class in the order
    assert y == d.order.index(0)
    xt, _ = d.train[0]
    assert xt.shape == (3, 32, 32)


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
