"""The Triton kernels' internal variants give the reference's bits (issue 13).

Each Triton program takes one of two memory paths: a *full* tile of a 16-byte-aligned
tensor is loaded and stored unmasked and vectorised, anything else (the tail tile, a
misaligned view) element-wise with a mask. And the update kernels take the restore's ``z``
for the query whose seed is ``restore_seed`` instead of regenerating it. None of this may
change a bit: every case here compares with the pure-PyTorch reference
(zfkernels/reference.py). tests/test_parity.py runs the interpreter with one large block,
where its small tensors never fill a tile, so small blocks here make full tiles, tails and
misaligned views meet in one launch.
"""
from __future__ import annotations

import os

import pytest
import torch

from zfkernels import reference as R

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
DEV = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"
zt = pytest.importorskip("zfkernels.triton")
if DEV == "cpu" and not INTERP:
    pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1", allow_module_level=True)

BLOCK = 512                      # 2 full tiles + a tail of 5 for N below
N = 2 * BLOCK + 5
T_HALF = 1 << 23                 # mask threshold: sparsity 1/2
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def bits(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().cpu().contiguous()
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def views(dtype, n_tensors, seed):
    """Two tensors of N random values: one aligned (its own allocation), one a view at
    element offset 1 of a larger buffer (misaligned for every dtype: the masked path)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n_tensors):
        vals = (torch.rand(2, N, generator=g) * 0.04 - 0.02 + 0.01 * k).to(dtype)
        a = vals[0].clone().to(DEV)
        big = torch.zeros(N + 1, dtype=dtype, device=DEV)
        big[1:] = vals[1].to(DEV)
        out.append((a, big[1:]))
    return out


def ref_copy(ts):
    return [t.detach().cpu().clone() for t in ts]


def assert_same(got, want, what):
    for k, (g, w) in enumerate(zip(got, want)):
        assert torch.equal(bits(g), bits(w)), f"{what}: tensor {k} differs from the reference"


@pytest.mark.parametrize("dist", [0, 1])
@pytest.mark.parametrize("dname", list(DTYPES))
def test_perturb_full_tail_and_misaligned_tiles(dist, dname):
    (a, b), = views(DTYPES[dname], 1, 1)
    params = [a, b]
    want = ref_copy(params)
    R.perturb_(want, [3, 4], 77, 0.5, dist, 9, T_HALF)
    zt.perturb_(params, [3, 4], 77, 0.5, dist, 9, T_HALF, block_size=BLOCK)
    assert_same(params, want, f"perturb_ {dname} dist {dist}")


@pytest.mark.parametrize("dist", [0, 1])
@pytest.mark.parametrize("dname", list(DTYPES))
def test_sgd_update_paths_and_restore_reuse(dist, dname):
    """Momentum and history buffers (read and written on both paths), a mask, and the
    restore seed among the queries twice (the last one's term takes the restore's z)."""
    dt = DTYPES[dname]
    (p0, p1), (m0, m1), (h0, h1) = views(dt, 3, 2)
    params, mom, hist = [p0, p1], [m0, m1], [h0, h1]
    seeds, coeffs = [5, 11, 5], [0.25, -0.5, 0.125]
    args = ([1, 2], seeds, coeffs, dist, 9, T_HALF, 5, -1e-3, 1e-2, 0.01, 0.9, 0.1, True, False, False,
            0.7, False, False, 0)
    want = [ref_copy(params), ref_copy(mom), ref_copy(hist)]
    R.zo_sgd_update_(*want, *args)
    zt.zo_sgd_update_(params, mom, hist, *args, block_size=BLOCK)
    for got, w, name in zip((params, mom, hist), want, ("params", "momentum", "history")):
        assert_same(got, w, f"zo_sgd_update_ {dname} dist {dist} {name}")


@pytest.mark.parametrize("dist", [0, 1])
@pytest.mark.parametrize("restore_seed,restore_scale", [(5, -1e-3), (6, -1e-3), (5, 0.0)])
def test_adam_update_paths_and_restore_reuse(dist, restore_seed, restore_scale):
    """Adam with a history buffer and bf16 stochastic rounding of the parameter; the restore
    seed is one of the queries, none of them, or the restore is off (no reuse either)."""
    dt = torch.bfloat16
    (p0, p1), (m0, m1), (v0, v1), (h0, h1) = views(dt, 4, 3)
    v0.abs_()
    v1.abs_()
    params, ms, vs, hs = [p0, p1], [m0, m1], [v0, v1], [h0, h1]
    args = ([1, 2], [5, 7], [0.5, -0.25], dist, 9, 0, restore_seed, restore_scale, 1e-3, 0.9, 0.999, 1e-8,
            0.01, True, 3, False, 0.9, False, True, 12345)
    want = [ref_copy(t) for t in (params, ms, vs, hs)]
    R.zo_adam_update_(*want, *args)
    zt.zo_adam_update_(params, ms, vs, hs, *args, block_size=BLOCK)
    for got, w, name in zip((params, ms, vs, hs), want, ("params", "m", "v", "history")):
        assert_same(got, w, f"zo_adam_update_ dist {dist} restore {restore_seed}/{restore_scale} {name}")


def test_pointer_table_marks_alignment_and_reuse_index():
    """The host side of the two variants: the table's aligned column and the reuse index."""
    from zfkernels.triton._common import COL_ALIGNED, ROW, build_groups, prepare_update

    buf = torch.zeros(N + 4, device=DEV)
    aligned, misaligned = buf[:N], buf[1:N + 1]
    assert aligned.data_ptr() % 16 == 0
    (_, rows, n_rows, _), = build_groups([aligned, misaligned], [], [0, 1], BLOCK)
    assert n_rows == 2
    assert [rows[r * ROW.value + COL_ALIGNED.value] for r in range(2)] == [1, 0]
    # a misaligned buffer takes its param's row off the fast path too
    (_, rows, _, _), = build_groups([aligned], [[misaligned]], [0], BLOCK)
    assert rows[COL_ALIGNED.value] == 0

    def reuse(seeds, restore_seed, restore_scale):
        return prepare_update("op", INTERP, [aligned], [], [0], seeds, [0.5] * len(seeds), 0, 0, 0,
                              restore_seed, restore_scale, BLOCK)[3]

    assert reuse([3, 5, 3, 8], 3, -1e-3) == 2          # the last query with the restore seed
    assert reuse([3, 5], 4, -1e-3) == -1               # restore seed not queried
    assert reuse([3, 5], 3, 0.0) == -1                 # no restore, nothing to reuse
    assert reuse([3], 3, 1e-50) == -1                  # fp32(restore_scale) == 0: no restore either
