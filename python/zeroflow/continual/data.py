"""Datasets and class-incremental splits.

* ``digits``: scikit-learn's ``load_digits`` (8x8 grey images, 10 classes, 1797 samples,
  ships with scikit-learn), split 75/25 stratified with ``random_state=0``; pixels scaled
  to [0, 1]; training augmentation = random 1-pixel shift.
* ``cifar100``: torchvision ``CIFAR100`` from ``DATA/cifar-100-python`` (downloaded only
  with ``download=True``).
* ``cub``, ``imagenet-a``, ``omnibenchmark``: torchvision ``ImageFolder`` from
  ``DATA/<name>/{train,test}/<class>/`` (the LAMDA-PILOT layout).

Class order: ``numpy.random.RandomState(class_order_seed).permutation(n_classes)``
(``--class-order-seed``, default 1993: PILOT's seed, which PILOT ties to the run seed; here
``--seed`` leaves the order alone); labels are remapped to their position in that order, so
task ``t`` holds the remapped labels ``[start_t, start_t + size_t)``. Real-data transforms
are the reference ones and apply **no Normalize** (inputs are ``ToTensor()`` in [0, 1]).
"""
from __future__ import annotations

import copy
import hashlib
import os
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, Subset

from .defaults import FIXED_CLASSES, init_cls_refusal
from .errors import ZeroflowError

CLASS_ORDER_SEED = 1993
IMAGEFOLDER_DATASETS = ("cub", "imagenet-a", "omnibenchmark")
ALL_DATASETS = ("digits", "cifar100") + IMAGEFOLDER_DATASETS


def class_order(n_classes: int, seed: int = CLASS_ORDER_SEED) -> List[int]:
    """PILOT's class order: ``np.random.seed(seed); np.random.permutation(n)``."""
    return np.random.RandomState(seed).permutation(n_classes).tolist()


class InitClsAboveClasses(ZeroflowError):
    """``init_cls`` above the ``n_classes`` of ``dataset`` (a folder dataset counts its classes
    when loaded); the message names the option ``init_cls``, a run's names it as it was given."""

    def __init__(self, init_cls: int, n_classes: int, dataset: str):
        super().__init__(init_cls_refusal("init_cls", init_cls, n_classes, dataset))
        self.init_cls, self.n_classes, self.dataset = init_cls, n_classes, dataset


def task_sizes(n_classes: int, init_cls: int, increment: int, dataset: str = "the dataset") -> List[int]:
    """``[init_cls, inc, inc, ...]``; a remainder that does not fill ``inc`` is a last, smaller task."""
    if init_cls <= 0 or increment <= 0:
        raise ZeroflowError(f"--init-cls and --increment must be >= 1 (got {init_cls}, {increment})")
    if init_cls > n_classes:
        # the option, not the flag: the value may come from --init-cls, a --config file or a run's config.json
        # (a run names it as the user gave it: runner.load_run_data)
        raise InitClsAboveClasses(init_cls, n_classes, dataset)
    sizes = [init_cls]
    while sum(sizes) + increment <= n_classes:
        sizes.append(increment)
    rest = n_classes - sum(sizes)
    if rest > 0:
        sizes.append(rest)
    return sizes


def task_classes(n_classes: int, init_cls: int, increment: int, dataset: str = "the dataset") -> List[List[int]]:
    """Remapped labels of each task: disjoint, consecutive, covering ``range(n_classes)``."""
    out, start = [], 0
    for size in task_sizes(n_classes, init_cls, increment, dataset):
        out.append(list(range(start, start + size)))
        start += size
    return out


class UnreadableImage(ZeroflowError):
    """An image file of an ImageFolder dataset that cannot be decoded, found when a run reads
    it. One line also when a DataLoader worker raised it: torch re-raises it in the main process
    with the worker's traceback as the message, whose last line is the original one."""

    def __init__(self, message: str):
        if message.startswith("Caught ") and "\n" in message:
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[1] if ": " in last else last
        super().__init__(message)


# PIL modes of one channel of integers wider than 8 bits: 16-bit greyscale PNG / TIFF open as
# "I;16" (older Pillow: "I"), whose convert("RGB") clips every value above 255 to 255.
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _rgb(img):
    """``img.convert("RGB")`` (torchvision's ``pil_loader``), except that a 16-bit greyscale
    image is scaled to 8 bits first (``v / 257``, so 65535 -> 255) instead of clipped: its
    convert made nearly every pixel 255, a white image."""
    if img.mode in _WIDE_GREY:
        from PIL import Image

        wide = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), mode="L")
    return img.convert("RGB")


def load_image(path: str):
    """torchvision's PIL ``default_loader`` (an RGB PIL image; 16-bit greyscale scaled to 8
    bits, not clipped: :func:`_rgb`); a file it cannot decode is an :class:`UnreadableImage`
    naming the file."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return _rgb(Image.open(f))
    except Exception as e:      # PIL raises OSError, ValueError, DecompressionBombError, ...
        reason = " ".join(f"{type(e).__name__}: {e}".split())[:200]
        raise UnreadableImage(f"cannot read image {path} ({reason}); replace or delete that file") from e


def check_splits(data: "CLData", train_where: str, test_where: str, fix: str) -> "CLData":
    """Every class has training images (its prototype is their mean feature) and every task
    test images (it is tested after it is learned): else a ``ZeroflowError`` naming the split,
    the class and ``fix``, before a run has written anything."""
    n = data.n_classes
    per_train = np.bincount(data.train_targets, minlength=n)
    per_test = np.bincount(data.test_targets, minlength=n)

    def named(classes) -> str:
        names = [data.class_names[data.order[c]] if data.class_names else str(data.order[c]) for c in classes]
        return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")

    empty = [c for c in range(n) if per_train[c] == 0]
    if empty:
        raise ZeroflowError(f"{train_where} has no training image of class {named(empty)}: every class needs "
                            f"training images (its prototype is their mean feature); {fix}")
    for t, classes in enumerate(data.tasks):
        if per_test[classes].sum() == 0:
            raise ZeroflowError(f"{test_where} has no test image of task {t + 1}'s classes ({named(classes)}): every "
                                f"task is tested after it is learned; {fix}")
    return data


class _Remap:
    """target_transform: original label -> position in the class order (picklable)."""

    def __init__(self, order: Sequence[int]):
        self.lut = {int(c): i for i, c in enumerate(order)}

    def __call__(self, y):
        return self.lut[int(y)]


class TensorImages(Dataset):
    """In-memory images ``x[N, C, H, W]`` in [0, 1] with remapped integer labels."""

    def __init__(self, x: torch.Tensor, y: np.ndarray, shift: int = 0):
        self.x, self.targets, self.shift = x, np.asarray(y, dtype=np.int64), int(shift)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self.x[i]
        if self.shift:
            s = self.shift
            padded = torch.nn.functional.pad(img, (s, s, s, s))
            dy, dx = torch.randint(0, 2 * s + 1, (2,)).tolist()
            img = padded[:, dy:dy + img.shape[1], dx:dx + img.shape[2]]
        return img, int(self.targets[i])


def draw_seed(seed: int, epoch: int, index: int) -> int:
    """The seed of the random augmentation of training sample ``index`` at ``epoch`` of a run
    with ``seed``: a hash, so that neighbouring triples (seed 1 epoch 0, seed 0 epoch 1, ...)
    do not share a stream as a sum would."""
    digest = hashlib.blake2b(f"{int(seed)}/{int(epoch)}/{int(index)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class SeededDraws(Dataset):
    """A training subset whose random augmentation is a function of (seed, epoch, index) only.

    The training transforms (the digits shift, torchvision's RandomResizedCrop and flip) draw
    from torch's global CPU RNG inside ``__getitem__``: with ``num_workers=0`` that is the main
    process's stream, with workers each worker's own, so the data (and a run's results) depended
    on ``num_workers``, an operational option. Here every sample is read under the CPU RNG
    seeded by :func:`draw_seed` of the run's seed, the loader's epoch and the sample's index
    in the training split, so worker count and assignment, batch composition, the rank that
    reads it (torchrun) and the process's RNG state do not matter, and the process's RNG state
    is left as it was. Only the CPU generator is saved, seeded and restored: ``torch.manual_seed``
    would also reseed CUDA's generators (the main process's, with ``num_workers=0``), and
    ``torch.random.fork_rng(devices=[])`` does the same save/restore at about four times the
    cost (~20 us against ~5 us a sample; a digits sample costs ~20 us to read, a decoded and
    cropped JPEG milliseconds). Python's ``random`` and NumPy are not saved: the transforms
    used here do not draw from them.

    Indexed by the ``(epoch, position)`` keys of :class:`EpochKeys`."""

    def __init__(self, subset: Subset, seed: int):
        self.subset, self.seed = subset, int(seed)

    def __len__(self):
        return len(self.subset)

    def __getitem__(self, key):
        epoch, pos = key
        index = self.subset.indices[pos]     # the split's index: the same in every task's loader
        cpu = torch.default_generator
        state = cpu.get_state()
        try:
            cpu.manual_seed(draw_seed(self.seed, epoch, index))
            return self.subset[pos]
        finally:
            cpu.set_state(state)


class EpochKeys:
    """The batch sampler of a training loader, yielding ``(epoch, position)`` for each sample
    (read by :class:`SeededDraws`): the epoch travels with the index to whichever worker reads
    it. The epoch advances as the shuffling does: a
    :class:`zeroflow.distributed.ShardedBatchSampler`'s own (``set_epoch``, which this wrapper
    then offers too, so the training loop sets it as before), else one per pass over the loader
    (the seeded ``RandomSampler`` draws a new permutation per pass)."""

    def __init__(self, batches):
        self.batches, self.passes = batches, 0
        if hasattr(batches, "set_epoch"):
            self.set_epoch = batches.set_epoch

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        epoch = self.batches.epoch if hasattr(self.batches, "set_epoch") else self.passes
        self.passes += 1
        for batch in self.batches:
            yield [(epoch, i) for i in batch]


@dataclass
class CLData:
    """A dataset prepared for class-incremental learning (labels already remapped)."""

    name: str
    n_classes: int
    order: List[int]
    tasks: List[List[int]]
    train: Dataset            # training split, training transform
    train_eval: Dataset       # training split, test transform (prototypes)
    test: Dataset
    train_targets: np.ndarray
    test_targets: np.ndarray
    in_chans: int = 3
    img_size: int = 224
    class_names: Optional[List[str]] = field(default=None)

    def subset(self, split: str, classes: Sequence[int]) -> Subset:
        ds = {"train": self.train, "train_eval": self.train_eval, "test": self.test}[split]
        targets = self.test_targets if split == "test" else self.train_targets
        idx = np.flatnonzero(np.isin(targets, np.asarray(list(classes)))).tolist()
        return Subset(ds, idx)

    def loader(self, split: str, classes: Sequence[int], batch_size: int, *, shuffle: bool = False,
               seed: int = 0, num_workers: int = 0, shard: Optional[Tuple[int, int]] = None) -> DataLoader:
        """Batches of ``split`` restricted to ``classes``.

        ``shard=(rank, world)`` (data-parallel ZO under torchrun): this rank
        gets its slice of every *global* batch of ``batch_size`` samples
        (:class:`zeroflow.distributed.ShardedBatchSampler`, one permutation per epoch from
        ``seed + epoch``; call ``loader.batch_sampler.set_epoch(e)``), so the ranks' batches of
        step k together are one global batch.

        ``split="train"``: the random augmentation of a sample depends on ``seed``, the epoch
        and the sample only (:class:`SeededDraws`), not on ``num_workers`` or ``shard``."""
        subset = self.subset(split, classes)
        # the shuffle and the workers' base seeds draw from this generator, never from the process's
        # RNG (a sharded loader without it took its base seed from there, one draw an epoch)
        gen = torch.Generator().manual_seed(int(seed))
        if shard is not None:
            from zeroflow.distributed import ShardedBatchSampler
            rank, world = shard
            batches = ShardedBatchSampler(len(subset), batch_size, rank, world, shuffle=shuffle, seed=int(seed))
        else:
            order = RandomSampler(subset, generator=gen) if shuffle else SequentialSampler(subset)
            batches = BatchSampler(order, batch_size, drop_last=False)
        dataset: Dataset = subset
        if split == "train":    # random transforms: seeded per sample (the evaluation splits have none)
            dataset, batches = SeededDraws(subset, seed), EpochKeys(batches)
        return DataLoader(dataset, batch_sampler=batches, generator=gen, num_workers=num_workers,
                          persistent_workers=False)


def _remapped(targets, order) -> np.ndarray:
    remap = _Remap(order)
    return np.asarray([remap(t) for t in targets], dtype=np.int64)


# ---------------------------------------------------------------- digits
def load_digits_data(init_cls: int, increment: int, class_order_seed: int = CLASS_ORDER_SEED) -> CLData:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8] in [0, 1]
    y = d.target.astype(np.int64)
    idx_tr, idx_te = train_test_split(np.arange(len(y)), test_size=0.25, random_state=0, stratify=y)
    n = FIXED_CLASSES["digits"]
    order = class_order(n, class_order_seed)
    ytr, yte = _remapped(y[idx_tr], order), _remapped(y[idx_te], order)
    return CLData(
        name="digits", n_classes=n, order=order, tasks=task_classes(n, init_cls, increment, "digits"),
        train=TensorImages(x[idx_tr], ytr, shift=1), train_eval=TensorImages(x[idx_tr], ytr),
        test=TensorImages(x[idx_te], yte), train_targets=ytr, test_targets=yte,
        in_chans=1, img_size=8, class_names=[str(c) for c in range(10)],
    )


# ---------------------------------------------------------------- real data
def reference_transforms(img_size: int = 224):
    """The reference code's transforms (no Normalize)."""
    from torchvision import transforms as T

    train = T.Compose([
        T.RandomResizedCrop(img_size, scale=(0.05, 1.0), ratio=(3.0 / 4.0, 4.0 / 3.0)),
        T.RandomHorizontalFlip(),
        T.ToTensor(),
    ])
    test = T.Compose([
        T.Resize(int(round(img_size * 256 / 224)), interpolation=T.InterpolationMode.BICUBIC),
        T.CenterCrop(img_size),
        T.ToTensor(),
    ])
    return train, test


CIFAR_CLASSES = FIXED_CLASSES["cifar100"]     # the one count validate() checks init_cls against


def _cifar100_class():
    from torchvision.datasets import CIFAR100

    class _CIFAR100(CIFAR100):
        """torchvision's CIFAR100 parser. Without ``download`` the folder is checked for the
        three files only (torchvision's md5 check would reject anything but the official
        archive contents); a damaged pickle still fails loudly while parsing."""

        def _check_integrity(self) -> bool:
            if getattr(self, "_zf_verify_md5", False):
                return super()._check_integrity()
            return not _cifar_missing(type(self), os.path.join(self.root, self.base_folder))

        def _load_meta(self) -> None:
            if not getattr(self, "_zf_verify_md5", False):
                self.meta = dict(type(self).meta, md5=None)   # existence check only
            super()._load_meta()

    return _CIFAR100


def _cifar_missing(cls, folder: str) -> List[str]:
    """The files of torchvision's CIFAR class ``cls`` (train, test, meta) absent from ``folder``."""
    names = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    return [n for n in names if not os.path.isfile(os.path.join(folder, n))]


def _cifar_unreadable(cls, folder: str) -> List[str]:
    """The paths of the files of ``cls`` in ``folder`` that exist but do not unpickle (torchvision's
    own error does not say which of the three it was reading). Only on the error path: it reads
    every file once more."""
    import pickle

    bad = []
    for name in [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, "rb") as f:
                pickle.load(f, encoding="latin1")
        except (pickle.UnpicklingError, EOFError, OSError, ValueError, TypeError, AttributeError, ImportError,
                IndexError, KeyError, UnicodeDecodeError):
            bad.append(path)
    return bad


def _cifar_malformed(cls, folder: str) -> List[str]:
    """``PATH: what is wrong`` for each file of ``cls`` in ``folder`` that unpickles but does not
    hold what torchvision reads from it (a dict with ``data`` and ``fine_labels``, ``meta`` one with
    ``fine_label_names``): torchvision's own error (``KeyError: 'data'``) names neither the file
    nor the key's place. Only on the error path: it reads every file once more."""
    import pickle

    bad = []
    needs = {name: ("data", "fine_labels") for name, _ in cls.train_list + cls.test_list}
    needs[cls.meta["filename"]] = (cls.meta["key"],)
    for name, keys in needs.items():
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
        except Exception:  # noqa: BLE001 (absent or unreadable: _cifar_missing / _cifar_unreadable name those)
            continue
        if not isinstance(entry, dict):
            bad.append(f"{path}: a {type(entry).__name__}, not the dict of a CIFAR-100 file")
            continue
        lacking = [k for k in keys if k not in entry and not (k == "fine_labels" and "labels" in entry)]
        if lacking:
            as_bytes = [k for k in lacking if k.encode() in entry]
            bad.append(f"{path}: no key {', '.join(map(repr, lacking))}" + (
                f" (it has {', '.join(repr(k.encode()) for k in as_bytes)}: bytes keys, from a pickle read with "
                f"encoding='bytes' and written again; the official files have str keys)" if as_bytes else
                f" (its keys: {', '.join(map(repr, sorted(map(str, entry))[:8]))})"))
            continue
        if "data" in keys:
            data = np.asarray(entry["data"])
            if data.size % 3072:
                bad.append(f"{path}: data of shape {tuple(data.shape)}, not rows of 3072 bytes (32x32 RGB) per image")
    return bad


def load_cifar100(root: str, init_cls: int, increment: int, download: bool = False, img_size: int = 224,
                  class_order_seed: int = CLASS_ORDER_SEED) -> CLData:
    folder = os.path.join(root, "cifar-100-python")
    if not download and not os.path.isdir(folder):
        raise ZeroflowError(
            f"CIFAR-100 not found: expected the python-pickle folder {folder}/ (train, test, meta). "
            f"Pass --data-root DIR pointing at its parent, or add --download to fetch it.")
    cls = _cifar100_class()
    missing = [] if download else _cifar_missing(cls, folder)
    if missing:     # torchvision would say "Dataset not found ... use download=True"
        raise ZeroflowError(f"CIFAR-100 under {folder}/ lacks {', '.join(missing)} (it needs train, test and meta); "
                            f"restore the file(s), or add --download to fetch the official ones")
    tr_tf, te_tf = reference_transforms(img_size)
    try:
        if download:
            os.makedirs(root, exist_ok=True)
            cls._zf_verify_md5 = True
            cls(root, train=True, download=True)
            cls(root, train=False, download=True)
            cls._zf_verify_md5 = False
        order = class_order(CIFAR_CLASSES, class_order_seed)
        remap = _Remap(order)
        train = cls(root, train=True, transform=tr_tf, target_transform=remap)
        train_eval = cls(root, train=True, transform=te_tf, target_transform=remap)
        test = cls(root, train=False, transform=te_tf, target_transform=remap)
    except ZeroflowError:
        raise
    except Exception as e:  # unreadable pickle, missing key, ...
        bad = [] if download else _cifar_unreadable(cls, folder)
        if bad:     # name the damaged file(s), as the label and split checks below do
            raise ZeroflowError(
                f"could not read CIFAR-100 from {folder}: {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} "
                f"not a readable pickle ({type(e).__name__}: {e}); replace the file with the official one "
                f"(--download into an empty --data-root fetches it)") from e
        malformed = [] if download else _cifar_malformed(cls, folder)
        if malformed:
            raise ZeroflowError(
                f"could not read CIFAR-100 from {folder}: {'; '.join(malformed)}; replace the file with the official "
                f"one (--download into an empty --data-root fetches it)") from e
        raise ZeroflowError(f"could not read CIFAR-100 from {folder}: {type(e).__name__}: {e}") from e
    n = len(train.classes)
    if n != CIFAR_CLASSES:
        raise ZeroflowError(f"CIFAR-100 meta lists {n} classes, expected {CIFAR_CLASSES} ({folder}/meta)")
    fix = "replace the file with the official one (--download into an empty --data-root fetches it)"
    for ds, split in ((train, "train"), (test, "test")):
        _check_cifar_labels(ds, os.path.join(folder, split), fix)
        if ds.data.dtype != np.uint8:       # PIL's fromarray refused each image when the run read it
            raise ZeroflowError(f"{os.path.join(folder, split)}: its data is {ds.data.dtype}, not the uint8 pixels "
                                f"of a CIFAR-100 file; {fix}")
    data = CLData(
        name="cifar100", n_classes=CIFAR_CLASSES, order=order,
        tasks=task_classes(CIFAR_CLASSES, init_cls, increment, "cifar100"),
        train=train, train_eval=train_eval, test=test,
        train_targets=_remapped(train.targets, order), test_targets=_remapped(test.targets, order),
        in_chans=3, img_size=img_size, class_names=list(train.classes),
    )
    return check_splits(data, os.path.join(folder, "train"), os.path.join(folder, "test"), fix)


def _check_cifar_labels(ds, path: str, fix: str) -> None:
    """One integer fine label in 0..99 per image of a CIFAR-100 pickle."""
    try:
        labels = np.asarray(ds.targets, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise ZeroflowError(f"{path}: its fine_labels are not integers ({e}); {fix}") from e
    if labels.ndim != 1 or len(labels) != len(ds.data):
        raise ZeroflowError(f"{path}: {labels.size} fine_labels for {len(ds.data)} images; {fix}")
    bad = labels[(labels < 0) | (labels >= CIFAR_CLASSES)]
    if bad.size:
        raise ZeroflowError(f"{path}: fine label {int(bad[0])} is not a CIFAR-100 class (0..99; {bad.size} such "
                            f"label(s)); {fix}")


# The class counts of the ImageFolder datasets as the study (and LAMDA-PILOT) use them.
PUBLISHED_CLASSES = {"cub": 200, "imagenet-a": 200, "omnibenchmark": 300}


def _warn_python(message: str) -> None:
    warnings.warn(f"zeroflow: {message}", UserWarning, stacklevel=3)


def _hidden(name: str) -> bool:
    """A file or folder name that is not data: dot-files (macOS, Jupyter, editors) and the
    ``__MACOSX`` folder of a zip made on a Mac."""
    return name.startswith(".") or name == "__MACOSX"


class _ImageFiles:
    """``is_valid_file`` of one split's ImageFolder: a file with one of torchvision's image
    extensions and no hidden part in its path below the split folder. macOS archives hold an
    AppleDouble companion ``._x.jpg`` of every image (not an image: the run stopped at the
    first one it read, once per such file) and Jupyter a ``.ipynb_checkpoints/`` copy of what
    it showed (duplicates of that class's images). Lists the other files it skips, for a
    warning. Called once a file: the path below the split folder is a slice of the path
    torchvision joined onto it (``os.path.relpath`` cost 7 us a file, 0.7 s a 100k-image set)."""

    def __init__(self, split_dir: str):
        self.prefix = os.path.join(os.path.expanduser(split_dir), "")    # torchvision expands ~ too
        self.not_images: List[str] = []

    def __call__(self, path: str) -> bool:
        from torchvision.datasets.folder import IMG_EXTENSIONS, has_file_allowed_extension

        rel = path[len(self.prefix):] if path.startswith(self.prefix) else os.path.relpath(path, self.prefix)
        if any(_hidden(part) for part in rel.split(os.sep)):
            return False
        if not has_file_allowed_extension(path, IMG_EXTENSIONS):
            self.not_images.append(rel)
            return False
        return True


def _class_folders(split_dir: str) -> List[str]:
    """The class folders of ``split_dir`` as torchvision's ``find_classes`` lists them (every
    folder, sorted), hidden ones included: those are refused, not skipped (see below)."""
    with os.scandir(split_dir) as entries:
        return sorted(e.name for e in entries if e.is_dir())


def _scan_split(name: str, base: str, split: str, warn):
    """``ImageFolder(base/split)`` without transforms, checked: no hidden or ``__MACOSX``
    class folder, at least two classes, no empty class folder; files that are not images by
    extension are skipped with a warning, hidden files silently."""
    from torchvision.datasets import ImageFolder
    from torchvision.datasets.folder import IMG_EXTENSIONS

    split_dir = os.path.join(base, split)
    classes = _class_folders(split_dir)
    hidden = [c for c in classes if _hidden(c)]
    if hidden:      # torchvision's ImageFolder takes every folder as a class
        raise ZeroflowError(f"{name}: {split_dir} holds the hidden folder(s) {', '.join(hidden)}, which would become "
                            "classes and shift the class order; move them out of the data folder")
    if len(classes) < 2:
        inner = os.path.join(split_dir, classes[0]) if classes else None
        deeper = False
        if inner is not None:
            with os.scandir(inner) as entries:     # any() stops at the first folder: close what it left
                deeper = any(e.is_dir() for e in entries)
        raise ZeroflowError(
            f"{name}: {split_dir} holds {len(classes)} class folder(s){': ' + classes[0] if classes else ''}; a "
            f"class-incremental run needs at least 2 classes, each a folder {split_dir}/<class>/<image>"
            + (f". {inner} holds folders itself: the data looks extracted one level too deep; move the class "
               f"folders inside it up into {split_dir} (and likewise in the other split)" if deeper else ""))
    files = _ImageFiles(split_dir)
    try:
        probe = ImageFolder(split_dir, is_valid_file=files, allow_empty=True)
    except Exception as e:
        raise ZeroflowError(f"{name}: could not read the image folders under {split_dir}: {e}") from e
    per_class = np.bincount(np.asarray(probe.targets, dtype=np.int64), minlength=len(probe.classes))
    empty = [c for c, k in zip(probe.classes, per_class) if k == 0]
    if empty:
        raise ZeroflowError(
            f"{name}: the class folder(s) {', '.join(os.path.join(split_dir, c) for c in empty[:5])}"
            f"{f' and {len(empty) - 5} more' if len(empty) > 5 else ''} hold no image ({', '.join(IMG_EXTENSIONS)}); "
            f"add its images, or remove the class from both {base}/train and {base}/test")
    if files.not_images:
        k = len(files.not_images)
        warn(f"{split_dir}: skipped {k} file(s) that are not images by their extension (e.g. {files.not_images[0]}); "
             f"the images read are {', '.join(IMG_EXTENSIONS)}")
    return probe


def _with_transforms(probe, transform, target_transform):
    """The scanned split ``probe`` (an ImageFolder) with these transforms and :func:`load_image`,
    sharing its sample list: each split's folders are walked once, not once a dataset (a
    100k-image set's walk is seconds, on a network filesystem more)."""
    from torchvision.datasets.vision import StandardTransform

    ds = copy.copy(probe)
    ds.transform, ds.target_transform, ds.loader = transform, target_transform, load_image
    ds.transforms = StandardTransform(transform, target_transform)
    return ds


def load_imagefolder(name: str, root: str, init_cls: int, increment: int, img_size: int = 224,
                     class_order_seed: int = CLASS_ORDER_SEED, warn=None) -> CLData:
    warn = warn or _warn_python
    base = os.path.join(root, name)
    for split in ("train", "test"):
        if not os.path.isdir(os.path.join(base, split)):
            raise ZeroflowError(
                f"{name}: data folder {os.path.join(base, split)}/ not found. Expected the ImageFolder "
                f"layout {base}/{{train,test}}/<class>/<image> (as in LAMDA-PILOT); pass --data-root DIR "
                f"so that DIR/{name}/train exists.")
    tr_tf, te_tf = reference_transforms(img_size)
    probe_tr = _scan_split(name, base, "train", warn)
    probe_te = _scan_split(name, base, "test", warn)
    if probe_tr.classes != probe_te.classes:
        only_tr = sorted(set(probe_tr.classes) - set(probe_te.classes))
        only_te = sorted(set(probe_te.classes) - set(probe_tr.classes))
        raise ZeroflowError(f"{name}: train/ and test/ have different class folders (only in train/: "
                            f"{', '.join(map(ascii, only_tr[:5])) or 'none'}; only in test/: "
                            f"{', '.join(map(ascii, only_te[:5])) or 'none'})")
    # a test/ linked to train/ (or class folders, files linked or hard-linked into both) tested a
    # run on its own training images; one stat a file (a symlink's target), no path resolving
    def file_id(path: str):
        try:
            st = os.stat(path)
        except OSError:     # a dangling link: load_image names it when the run reads it
            return None
        return st.st_dev, st.st_ino

    train_files = {file_id(p): p for p, _ in probe_tr.samples}
    train_files.pop(None, None)
    shared = [(p, train_files[i]) for p, _ in probe_te.samples if (i := file_id(p)) in train_files]
    if shared:
        raise ZeroflowError(f"{name}: {len(shared)} of the {len(probe_te.samples)} test images are also training "
                            f"images (e.g. {shared[0][0]} and {shared[0][1]} are the same file): a run would be "
                            f"tested on what it trained on; give {base}/test images of its own")
    n = len(probe_tr.classes)
    if n != PUBLISHED_CLASSES.get(name, n):
        warn(f"{name} under {base} has {n} class folders, the published dataset {PUBLISHED_CLASSES[name]}: the class "
             f"order and tasks are not the study's")
    order = class_order(n, class_order_seed)
    remap = _Remap(order)
    # an image that cannot be decoded is found when it is read (a mid-run error naming the file;
    # the finished tasks stay checkpointed): decoding every image up front would cost minutes
    train, train_eval = _with_transforms(probe_tr, tr_tf, remap), _with_transforms(probe_tr, te_tf, remap)
    test = _with_transforms(probe_te, te_tf, remap)
    data = CLData(
        name=name, n_classes=n, order=order, tasks=task_classes(n, init_cls, increment, name),
        train=train, train_eval=train_eval, test=test,
        train_targets=_remapped(train.targets, order), test_targets=_remapped(test.targets, order),
        in_chans=3, img_size=img_size, class_names=list(probe_tr.classes),
    )
    return check_splits(data, os.path.join(base, "train"), os.path.join(base, "test"),
                        f"every class folder needs images in both {base}/train and {base}/test")


def load_dataset(name: str, root: str, init_cls: int, increment: int, *, download: bool = False,
                 img_size: int = 224, class_order_seed: int = CLASS_ORDER_SEED, warn=None) -> CLData:
    """The dataset ``name`` prepared and checked; ``warn(message)`` says what the data has that
    a run should know of (files skipped, a class count unlike the study's); default: a Python
    ``UserWarning``."""
    name = name.lower()
    if name == "digits":
        return load_digits_data(init_cls, increment, class_order_seed=class_order_seed)
    if name == "cifar100":
        return load_cifar100(root, init_cls, increment, download=download, img_size=img_size,
                             class_order_seed=class_order_seed)
    if name in IMAGEFOLDER_DATASETS:
        if download:
            raise ZeroflowError(f"{name} cannot be downloaded automatically; place it under "
                                f"{root}/{name}/{{train,test}}")
        return load_imagefolder(name, root, init_cls, increment, img_size=img_size,
                                class_order_seed=class_order_seed, warn=warn)
    raise ZeroflowError(f"unknown dataset {name!r}; valid: {', '.join(ALL_DATASETS)}")
