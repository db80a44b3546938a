"""The random augmentation of a training sample is a function of (seed, epoch, sample) only.

docs/continual.md and sources._OPERATIONAL call ``num_workers`` operational (it must not change
results), but the training transforms drew from torch's global RNG inside ``__getitem__``: the
main process's stream with ``num_workers=0``, each worker's own with workers, so every batch of
a run differed between worker counts (same order, other augmentations). data.SeededDraws reads
each sample under the CPU RNG seeded by (seed, epoch, index in the split)."""
import os

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from test_continual_data import _write_imagefolder


@pytest.fixture(scope="module")
def digits():
    from zeroflow.continual.data import load_digits_data
    return load_digits_data(2, 2)


def _epochs(data, classes, epochs, **kw):
    """``epochs`` passes over one training loader, as the training loop makes them (the
    sharded loader's epoch is set each pass, the single-process one advances by itself)."""
    kw.setdefault("seed", 1993)
    loader = data.loader("train", classes, kw.pop("batch_size", 32), shuffle=kw.pop("shuffle", True), **kw)
    out = []
    for e in range(epochs):
        if hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(e)
        out.append([(x.clone(), y.clone()) for x, y in loader])
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(len(ea) == len(eb) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                                                for (xa, ya), (xb, yb) in zip(ea, eb))
                                    for ea, eb in zip(a, b))


def test_digits_training_batches_do_not_depend_on_num_workers(digits):
    """Several epochs of two tasks: the same tensors and labels with 0, 1 and 2 workers."""
    for classes in digits.tasks[:2]:
        ref = _epochs(digits, classes, 3, num_workers=0)
        assert sum(len(b) for b in ref) == 3 * 9                 # 269 / 32 -> 9 batches an epoch
        for workers in (1, 2):
            assert _same(_epochs(digits, classes, 3, num_workers=workers), ref), f"num_workers={workers}"


def _textured_imagefolder(root):
    """The ImageFolder fixture of test_continual_data with noise instead of flat training
    images (a random crop or flip of a flat image is the image itself)."""
    from PIL import Image
    _write_imagefolder(root, "cub", n_classes=4, per_split=3)
    rng = np.random.RandomState(0)
    train = os.path.join(root, "cub", "train")
    for c in sorted(os.listdir(train)):
        for f in sorted(os.listdir(os.path.join(train, c))):
            Image.fromarray(rng.randint(0, 256, (40, 30, 3), dtype=np.uint8)).save(os.path.join(train, c, f))


def test_imagefolder_training_batches_do_not_depend_on_num_workers(tmp_path):
    """The real training transform (RandomResizedCrop, flip, ToTensor) on decoded images."""
    from zeroflow.continual.data import load_dataset
    _textured_imagefolder(str(tmp_path))
    with pytest.warns(UserWarning, match="has 4 class folders"):
        d = load_dataset("cub", str(tmp_path), 2, 2, img_size=16)
    for classes in d.tasks:
        ref = _epochs(d, classes, 2, batch_size=4, num_workers=0)
        assert _same(_epochs(d, classes, 2, batch_size=4, num_workers=2), ref)


def test_draws_are_a_function_of_seed_epoch_and_sample_and_still_random(digits):
    """In order (shuffle off), so that position k is the same sample in every pass: a pass is
    the same whatever the process's RNG holds, epochs differ from each other, seeds differ."""
    classes = digits.tasks[0]
    torch.manual_seed(0)
    a = _epochs(digits, classes, 3, shuffle=False)
    torch.manual_seed(12345)
    torch.rand(7)
    assert _same(_epochs(digits, classes, 3, shuffle=False), a)

    def images(epoch):
        return torch.cat([x for x, _ in epoch])
    for e in range(3):
        for f in range(e + 1, 3):
            assert not torch.equal(images(a[e]), images(a[f])), (e, f)
    other = _epochs(digits, classes, 3, shuffle=False, seed=7)
    assert all(torch.equal(ya, yb) for (_, ya), (_, yb) in zip(a[0], other[0]))     # the same samples ...
    assert not any(torch.equal(images(a[e]), images(other[e])) for e in range(3))   # ... other draws
    # keyed by the image's index in the training split, not its place in this loader's subset
    wider = classes + digits.tasks[1]
    both = torch.cat([x for x, _ in digits.loader("train", wider, 1000, seed=1993)])
    where = [digits.subset("train", wider).indices.index(i) for i in digits.subset("train", classes).indices]
    assert torch.equal(both[where], images(a[0]))
    unshifted = torch.cat([x for x, _ in digits.loader("train_eval", classes, 32)])
    assert (images(a[0]) != unshifted).flatten(1).any(1).float().mean() > 0.5        # most are shifted


def test_iterating_a_training_loader_leaves_the_global_rng_alone(digits):
    """With num_workers=0 the samples are read in this process: their draws must not consume
    (or reseed) its RNG, nor may the sharded loader's worker seed. The evaluation loaders have
    no random transform and read their subset directly."""
    torch.manual_seed(3)
    before = torch.get_rng_state()
    for shard in (None, (0, 2)):
        loader = digits.loader("train", digits.tasks[0], 32, shuffle=True, seed=1993, shard=shard)
        for _ in range(2):
            for _ in loader:
                pass
        assert torch.equal(torch.get_rng_state(), before), f"shard={shard}"
    for split in ("train_eval", "test"):
        assert type(digits.loader(split, digits.tasks[0], 32).dataset) is Subset


def test_a_sharded_step_is_the_global_batch_bit_for_bit(digits):
    """torchrun, world 2: the ranks' step-k batches together are the one-process global batch
    of step k, with the same draw for each sample whichever rank (and worker) reads it."""
    classes = digits.tasks[1]
    world1 = _epochs(digits, classes, 2, shard=(0, 1))
    ranks = [_epochs(digits, classes, 2, shard=(r, 2), num_workers=w) for r, w in ((0, 0), (1, 2))]
    assert len(world1[0]) == 9 and not torch.equal(world1[0][0][1], world1[1][0][1])    # reshuffled
    for e in range(2):
        for k, (x, y) in enumerate(world1[e]):
            for r in range(2):
                xr, yr = ranks[r][e][k]
                assert torch.equal(xr, x[r::2]) and torch.equal(yr, y[r::2]), (e, k, r)


def test_draw_seed_separates_neighbouring_triples():
    """draw_seed is a hash, not a sum: seed 1 epoch 0 and seed 0 epoch 1 (or index 1 and
    epoch 1) are other streams."""
    from zeroflow.continual.data import draw_seed
    triples = [(s, e, i) for s in range(3) for e in range(3) for i in range(3)]
    assert len({draw_seed(*t) for t in triples}) == len(triples)


def _drawn(subset, seed, epoch, positions):
    """The documented draw of each sample: read under the CPU RNG seeded by draw_seed(seed,
    epoch, index in the training split)."""
    from zeroflow.continual.data import draw_seed
    out = []
    with torch.random.fork_rng(devices=[]):
        for pos in positions:
            torch.default_generator.manual_seed(draw_seed(seed, epoch, subset.indices[pos]))
            out.append(subset[pos][0])
    return torch.stack(out)


def test_the_epoch_of_a_draw_is_the_pass_or_the_sharded_samplers_epoch(digits):
    """A single-process loader's pass k draws epoch k (from 0); a sharded loader draws the
    epoch set on its sampler (set_epoch, as a resumed or restarted training loop sets it),
    whatever pass of the loader this is."""
    classes = digits.tasks[0]
    subset = digits.subset("train", classes)
    loader = digits.loader("train", classes, 8, shuffle=False, seed=1993)
    for epoch in range(2):
        x, _ = next(iter(loader))
        assert torch.equal(x, _drawn(subset, 1993, epoch, range(8))), epoch
    sharded = digits.loader("train", classes, 8, shuffle=False, seed=1993, shard=(0, 1))
    for _ in range(2):                       # two passes, the epoch set once
        sharded.batch_sampler.set_epoch(3)
        x, _ = next(iter(sharded))
        assert torch.equal(x, _drawn(subset, 1993, 3, range(8)))


def test_a_training_loader_has_as_many_batches_as_it_yields(digits):
    """len(loader) (the pretraining schedule's step count, the progress bar) is the number of
    batches a pass yields, sharded or not."""
    for shard in (None, (0, 2), (1, 2)):
        loader = digits.loader("train", digits.tasks[0], 32, shuffle=True, seed=1993, shard=shard)
        assert len(loader) == sum(1 for _ in loader) == len(loader.batch_sampler), shard


def test_a_sample_draw_reseeds_only_the_cpu_generator(digits, monkeypatch):
    """torch.manual_seed would reseed every CUDA generator too (the main process's, with
    num_workers=0): only the CPU generator is seeded and restored per sample."""
    seeded = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda s: seeded.append(s))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda s: seeded.append(s))
    for shard in (None, (0, 2)):
        for _ in digits.loader("train", digits.tasks[0], 64, shuffle=True, seed=1993, shard=shard):
            pass
    assert seeded == []
