"""The kernels' index math above 2^31: z, the mask and the rounding words at element indices
up to 2^62, bit for bit against the reference (docs/perturbation-stream.md §2: the block
index is 64-bit, counter ``(b mod 2^32, b >> 32, tensor_id, tag)``).

What it protects: the 64-bit tile / task index math of the Triton kernels (perturb_ and
zo_sgd_update_, Gaussian and Rademacher, sparse mask, bf16 parameter with stochastic
rounding) and of the CUDA kernels (the same two ops, run on the host through the CUDA
emulation of tests/cuda_emu/cuda_emu.cpp). An index held in 32 bits anywhere between the
program / warp-task id and the Philox counter (``tile * BLOCK`` in an int32, the task base
in an ``int``, ``b >> 32`` of a 32-bit block) makes z, m or the rounding words differ from
the reference at the bases below, or makes the kernel read at a wild address (a crash:
that is why the Triton launches run in a child process and the CUDA ones in a driver
executable, so that a crash fails these tests and not the whole session).

How, without a tensor of 2^31+ elements: a *crafted launch table*. A buffer of N ~ 2K
elements stands for elements ``[base, base + N)`` of a tensor of ``base + N`` elements:
its table entry holds the data pointer minus ``base * element_size`` (the kernels add the
element index to it, so they touch exactly the buffer), ``numel = base + N``, and a first
tile / task of ``-base / BLOCK``, so that the launch's programs 0, 1, ... get the tiles of
elements base, base + BLOCK, ... (``base`` is a multiple of the tile). The tables are
internal layouts; when one changes, follow it here:

- Triton: one int64 row per tensor, built by ``build_groups`` (zfkernels/triton/_common.py;
  perturb_ takes it as is, zo_sgd_update_ through ``prepare_update``, which appends the
  seeds and coefficients). The public ops run unchanged, with ``build_groups`` /
  ``prepare_update`` wrapped so that the real row is shifted (:func:`shift_row`, which
  reads the column constants ``ROW``, ``COL_NUMEL``, ``COL_START`` of _common.py).
- CUDA: the ``zf_cuda::Entry`` / ``Common`` that ``zf_cuda::launch`` and
  ``launch_update`` (csrc/multi_tensor_ops.h) fill, filled by hand in the driver below
  (``DRIVER``), which is the prelude of tests/cuda_emu/cuda_emu.cpp (the CUDA keywords and
  the warp emulation, taken from that file up to its ``#include "multi_tensor_ops.h"``)
  followed by ``EmuLauncher::run``'s grid loop without torch, compiled with the emulation's
  flags (tests/conftest.py, ``load_cuda_emulation``). The emulation library itself cannot
  take such a table: it only runs through the ops, which build the table from real tensors.

Base 0 is the control: there the crafted table is the real one. The bases straddle 2^31
(int32 element index), 2^32 (uint32), 2^34 (the Gaussian / mask / rounding block index
``i >> 2`` needs the counter's high word), 2^39 (so does the Rademacher one, ``i >> 7``),
and lie near 2^62 (element byte offsets beyond 2^64 wrap: pointer arithmetic mod 2^64).

The expected values come from zfkernels.reference's stream primitives (``stream_words`` at
explicit block indices, ``u_open``, ``log_f32``, ``sqrt_rn``, ``sincos_f32``,
``stochastic_round``) following §4-§6 and §9, never from a kernel under test; at small
indices they are checked against the reference's own ``perturbation``, ``keep_mask`` and
``rounding_words``, and ``stream_words`` at large blocks against the scalar Philox.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import CUDA_INCLUDE, ROOT, child_env

import zfkernels as zk
from zfkernels import reference as R
from zfkernels import stream as S

TID = 0xFFFFFFF0                        # a tensor id with its high bits set
SEED = 0x123456789ABCDEF                # both key words non-zero
SEEDS = (SEED, 0x0FEDCBA987654321)      # the update's q = 2 queries; the restore is query 0's z (MeZO)
COEFFS = (0.375, -1.25)                 # exact in fp32, as every scalar below
MASK_SEED = 0x2545F4914F6CDD1D
T = 5_000_000                           # mask threshold: ~30 % of the coordinates zeroed
ROUND_SEED = 0x5851F42D4C957F2D
SCALE = 0.125                           # perturb_
RESTORE_SCALE = -(2.0 ** -10)           # zo_sgd_update_
LR = 2.0 ** -6
BLOCK = 1024                            # Triton tile (block_size); a multiple of the CUDA task (512)
N = 2 * BLOCK + 100                     # two full tiles / four full tasks and a partial one

BASES = [
    ("0", 0),
    ("2^31-2^10", 2 ** 31 - 2 ** 10),
    ("2^32-2^10", 2 ** 32 - 2 ** 10),
    ("2^34-2^10", 2 ** 34 - 2 ** 10),
    ("2^39-2^10", 2 ** 39 - 2 ** 10),
    ("2^39+5*2^20", 2 ** 39 + 5 * 2 ** 20),
    ("2^62-2^10", 2 ** 62 - 2 ** 10),
]
BASE_PARAMS = [pytest.param(b, id=label) for label, b in BASES]
DIST_PARAMS = [pytest.param(0, id="gaussian"), pytest.param(1, id="rademacher")]
OPS = ["perturb_", "zo_sgd_update_"]
# The parameter of each op: fp32 for perturb_, bf16 (stochastic rounding) for the update.
_g = torch.Generator().manual_seed(1234)
THETA = {"perturb_": torch.randn(N, generator=_g), "zo_sgd_update_": torch.randn(N, generator=_g).bfloat16()}
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16}

INTERP = os.environ.get("TRITON_INTERPRET") == "1"
TRITON_DEV = "cuda" if torch.cuda.is_available() and not INTERP else "cpu"


# ----------------------------------------------------------------------------- the reference
def _words(seed: int, tag: int, idx: torch.Tensor, shift: int) -> torch.Tensor:
    """§2: the Philox words ``[len(idx), 4]`` of the blocks ``idx >> shift``."""
    return R.stream_words(seed, TID, tag, idx >> shift)


def _pick(words: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    return words.gather(1, col[:, None])[:, 0]


def ref_z(seed: int, idx: torch.Tensor, dist: int) -> torch.Tensor:
    """z at the element indices ``idx`` (int64): §4 (Rademacher) or §5 (Gaussian), as
    ``reference.rademacher`` / ``reference.gaussian`` compute it from index 0."""
    if dist == 1:
        j = idx & 127
        x = _pick(_words(seed, S.TAG_PERTURBATION, idx, 7), j >> 5)
        return ((x >> (j & 31)) & 1).to(torch.float32) * 2 - 1
    w = _words(seed, S.TAG_PERTURBATION, idx, 2)
    lane = idx & 3
    pair = (lane >> 1) * 2
    u = R.u_open(_pick(w, pair))
    s = R.u_closed(_pick(w, pair + 1)) * 2 - 1
    r = R.sqrt_rn(R.log_f32(u) * -2.0)
    sin, cos = R.sincos_f32(s * S.f32_from_bits(S.PI_F32_BITS))
    return torch.where((lane & 1).bool(), r * sin, r * cos)


def ref_quad_word(seed: int, tag: int, idx: torch.Tensor) -> torch.Tensor:
    """Word ``i & 3`` of the call for block ``i >> 2`` (§6 mask, §9 rounding)."""
    return _pick(_words(seed, tag, idx, 2), idx & 3)


def ref_keep(idx: torch.Tensor) -> torch.Tensor:
    """§6: the mask m (fp32 0/1) of MASK_SEED and T."""
    return ((ref_quad_word(MASK_SEED, S.TAG_MASK, idx) >> 8) >= T).to(torch.float32)


def expected(op: str, dist: int, base: int) -> torch.Tensor:
    """The op's result on THETA[op] standing at elements [base, base + N), in the fp32
    operation order of reference.perturb_ / reference.zo_sgd_update_."""
    idx = torch.arange(base, base + N, dtype=torch.int64)
    keep = ref_keep(idx)
    theta = THETA[op].float()
    if op == "perturb_":
        return theta + (ref_z(SEED, idx, dist) * keep) * SCALE
    x = theta + (ref_z(SEEDS[0], idx, dist) * keep) * RESTORE_SCALE
    g = torch.zeros(N)
    for s, c in zip(SEEDS, COEFFS):
        g = g + ref_z(s, idx, dist) * c
    g = g * keep
    return R.stochastic_round(x - g * LR, ref_quad_word(ROUND_SEED, S.TAG_ROUNDING, idx), torch.bfloat16)


def assert_bits_equal(got: torch.Tensor, want: torch.Tensor, base: int) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape, (got.dtype, got.shape, want.dtype, want.shape)
    gb, wb = got.view(BITS[got.dtype]), want.view(BITS[want.dtype])
    if not torch.equal(gb, wb):
        bad = (gb != wb).nonzero()[:, 0]
        k = int(bad[0])
        pytest.fail(f"{bad.numel()} of {N} elements differ from the reference; the first at element index "
                    f"{base + k} (= base + {k}): got {got[k].item()!r}, want {want[k].item()!r}")


def test_reference_helpers_are_the_reference():
    """The expected values' helpers equal the reference's own functions at indices [0, n),
    and its stream_words at large block indices equals the scalar Philox of zfkernels.stream."""
    n = 3000
    idx = torch.arange(n, dtype=torch.int64)
    for dist in (0, 1):
        want = R.perturbation(SEED, n, dist, TID)
        assert torch.equal(ref_z(SEED, idx, dist).view(torch.int32), want.view(torch.int32))
    assert torch.equal(ref_keep(idx), R.keep_mask(MASK_SEED, n, TID, T).to(torch.float32))
    assert torch.equal(ref_quad_word(ROUND_SEED, S.TAG_ROUNDING, idx), R.rounding_words(ROUND_SEED, n, TID))
    blocks = [(base + k) >> sh for _, base in BASES for k in (0, N - 1) for sh in (2, 7)]
    words = R.stream_words(SEED, TID, S.TAG_MASK, torch.tensor(blocks, dtype=torch.int64))
    for b, w in zip(blocks, words.tolist()):
        assert tuple(w) == S.philox4x32_10_scalar((b, b >> 32, TID, S.TAG_MASK), S.split_seed(SEED)), b


# ----------------------------------------------------------------------------- Triton
def _s64(v: int) -> int:
    """An address as the int64 with the same bits (the table is int64)."""
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >= 1 << 63 else v


def shift_row(row: list[int], base: int, elem_size: int, block: int) -> list[int]:
    """A tensor's row of the Triton pointer table (build_groups, zfkernels/triton/_common.py:
    ``[slot 0..3 data pointers, numel, tensor_id, first_tile, 0]``), rewritten so that the
    tensor's programs work on elements ``[base, base + numel)`` of a tensor of ``base + numel``
    elements whose data starts ``base`` elements before the real buffer. Every slot is shifted
    by the param's element size: the ops here pass no buffers, so slots 1-3 hold the param's
    pointer as placeholders."""
    from zfkernels.triton._common import COL_NUMEL, COL_START, ROW

    assert len(row) == ROW.value and COL_NUMEL.value == 4 and base % block == 0, "the table layout changed"
    out = [_s64(p - base * elem_size) for p in row[:COL_NUMEL.value]] + list(row[COL_NUMEL.value:])
    out[COL_NUMEL.value] += base
    out[COL_START.value] -= base // block
    return out


def run_triton_case(op: str, dist: int, base: int, x: torch.Tensor) -> None:
    """The public Triton op on the one tensor ``x`` (in place), its table shifted by ``base``."""
    from zfkernels import triton as zt
    from zfkernels.triton import perturb as tp
    from zfkernels.triton import sgd_update as ts

    real_groups, real_prepare = tp.build_groups, ts.prepare_update

    def groups(params, buffer_lists, tensor_ids, block):
        out = real_groups(params, buffer_lists, tensor_ids, block)
        assert len(out) == 1 and out[0][2] == 1
        dtypes, rows, n_rows, tiles = out[0]
        return [(dtypes, shift_row(rows, base, params[0].element_size(), block), n_rows, tiles)]

    def prepare(op, interp, params, *args):
        d, thr, block, out = real_prepare(op, interp, params, *args)
        assert len(out) == 1 and out[0][2] == 1
        dtypes, meta, n_rows, seed_off, tiles = out[0]
        row = shift_row(meta[:seed_off].tolist(), base, params[0].element_size(), block)
        meta = torch.cat([torch.tensor(row, dtype=torch.int64, device=meta.device), meta[seed_off:]])
        return d, thr, block, [(dtypes, meta, n_rows, seed_off, tiles)]

    tp.build_groups, ts.prepare_update = groups, prepare
    try:
        if op == "perturb_":
            zt.perturb_([x], [TID], seed=SEED, scale=SCALE, dist=dist, mask_seed=MASK_SEED, mask_threshold=T,
                        block_size=BLOCK)
        else:
            zt.zo_sgd_update_([x], [], [], [TID], seeds=list(SEEDS), coeffs=list(COEFFS), dist=dist,
                              mask_seed=MASK_SEED, mask_threshold=T, restore_seed=SEEDS[0],
                              restore_scale=RESTORE_SCALE, lr=LR, weight_decay=0.0, momentum=0.0, dampening=0.0,
                              nesterov=False, momentum_init=False, sign=False, history_alpha=0.0,
                              history_init=False, stochastic_rounding=True, round_seed=ROUND_SEED,
                              block_size=BLOCK)
    finally:
        tp.build_groups, ts.prepare_update = real_groups, real_prepare


def _case_name(op: str, dist: int, base: int) -> str:
    return f"{op}{dist}_{base:x}"


def triton_child(workdir: str) -> None:
    """Runs in a child process (see triton_results): every case, one output file each, so
    that a crash leaves the cases before it answered (and a marker of the case it died in)."""
    for op in OPS:
        for dist in (0, 1):
            for _, base in BASES:
                open(os.path.join(workdir, _case_name(op, dist, base) + ".started"), "w").close()
                x = THETA[op].clone().to(TRITON_DEV)
                try:
                    run_triton_case(op, dist, base, x)
                    result = x.cpu()
                except Exception as exc:  # noqa: BLE001 - reported by the case's test
                    result = f"{type(exc).__name__}: {exc}"
                torch.save(result, os.path.join(workdir, _case_name(op, dist, base) + ".pt"))


@pytest.fixture(scope="module")
def triton_results(tmp_path_factory):
    """All Triton cases, run in one child process (one import of Triton); returns a function
    of (op, dist, base) giving the result. The child imports the zfkernels this process has."""
    work = tmp_path_factory.mktemp("triton_large_index")
    env = child_env(without=("ZF_EMULATE_CUDA_KERNELS", "ZF_EMULATION_REPORT"))   # the real kernels
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(zk.__file__)),
                                         os.path.dirname(os.path.abspath(__file__)), env["PYTHONPATH"]])
    code = "import sys, test_large_index as t; t.triton_child(sys.argv[1])"
    run = subprocess.run([sys.executable, "-c", code, str(work)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=600)

    def result(op, dist, base):
        path = work / (_case_name(op, dist, base) + ".pt")
        if not path.exists():
            where = "in this case" if path.with_suffix(".started").exists() else "before this case"
            pytest.fail(f"no result: the Triton child process exited with {run.returncode} {where} (a negative "
                        f"code is a signal, e.g. a wild address from a truncated index):\n"
                        f"{(run.stdout + run.stderr)[-3000:]}")
        got = torch.load(path, weights_only=True)
        if isinstance(got, str):
            pytest.fail(got)
        return got

    return result


def _triton_unusable() -> str:
    """Why the Triton kernels cannot run here ("" where they can): the package's own import error
    where it has one (e.g. Triton 3.6's interpreter with numpy >= 2.4), not only that they cannot."""
    if zk._triton_usable_on(TRITON_DEV):
        return ""
    if TRITON_DEV == "cpu" and not INTERP:
        return "Triton kernels need a GPU or the interpreter (TRITON_INTERPRET=1)"
    return f"Triton kernels not usable on {TRITON_DEV}: {zk._triton_module()[1]}"


@pytest.mark.skipif(bool(_triton_unusable()), reason=_triton_unusable())
@pytest.mark.parametrize("base", BASE_PARAMS)
@pytest.mark.parametrize("dist", DIST_PARAMS)
@pytest.mark.parametrize("op", OPS)
def test_triton_kernels_at_large_element_indices(triton_results, op, dist, base):
    assert_bits_equal(triton_results(op, dist, base), expected(op, dist, base), base)


# ----------------------------------------------------------------------------- CUDA (emulated)
# Appended to the prelude of tests/cuda_emu/cuda_emu.cpp. Arguments:
#   perturb_       dist base n tid mask_seed T seed scale
#   zo_sgd_update_ dist base n tid mask_seed T restore_seed restore_scale lr round_seed (seed coeff)...
# (floats in C99 hex); the param's n elements (fp32 / bf16) on stdin, the result on stdout.
DRIVER = r"""
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

using namespace zf_cuda;

// EmuLauncher::run (tests/cuda_emu/cuda_emu.cpp) without torch: 2 resident blocks, each warp
// of the grid run by 32 lane threads.
template <class F, typename P, int DIST>
static void run_grid(const Common& c, const typename F::Args& a) {
  const int blocks = grid_blocks(c.total_tasks, 2);
  zf_emu::Warp w;
  std::vector<std::thread> lanes;
  for (int l = 0; l < 32; ++l) {
    lanes.emplace_back([&, l] {
      zf_emu::warp = &w;
      zf_emu::lane = l;
      gridDim = dim3(blocks, 1, 1);
      for (int b = 0; b < blocks; ++b)
        for (int k = 0; k < kThreads / 32; ++k) {
          blockIdx = make_uint3(b, 0, 0);
          threadIdx = make_uint3(32 * k + l, 0, 0);
          multi_tensor_kernel<F, P, DIST>(c, a);
        }
    });
  }
  for (auto& t : lanes) t.join();
}

template <class F, typename P>
static void run(int dist, const Common& c, const typename F::Args& a) {
  if (dist == zf::DIST_RADEMACHER) run_grid<F, P, zf::DIST_RADEMACHER>(c, a);
  else run_grid<F, P, zf::DIST_GAUSSIAN>(c, a);
}

int main(int argc, char** argv) {
  if (argc < 10) return 2;
  const std::string op = argv[1];
  const int dist = atoi(argv[2]);
  const int64_t base = strtoll(argv[3], nullptr, 10), n = strtoll(argv[4], nullptr, 10);
  const uint32_t tid = (uint32_t)strtoull(argv[5], nullptr, 10);
  const int64_t mask_seed = strtoll(argv[6], nullptr, 10), T = strtoll(argv[7], nullptr, 10);
  const bool perturb = op == "perturb_";
  const size_t esize = perturb ? 4 : 2;
  std::vector<uint8_t> store(n * esize + 64);
  uint8_t* buf = (uint8_t*)(((uintptr_t)store.data() + 15) & ~(uintptr_t)15);   // vector-aligned
  if (fread(buf, esize, n, stdin) != (size_t)n) return 3;

  // The crafted entry (zf_cuda::launch fills it from a tensor): the buffer stands for
  // elements [base, base + n) of a tensor of base + n elements; its tasks start at -base / 512.
  Entry e;
  memset(&e, 0, sizeof e);
  e.ptr[0] = (void*)((uintptr_t)buf - (uintptr_t)base * esize);
  e.dt[0] = perturb ? F32 : BF16;
  e.vec[0] = 1;
  e.all_vec = 1;
  e.numel = base + n;
  e.task_start = -(base / kTaskElems);
  e.tid = tid;
  Common c = make_common(mask_seed, T);
  c.entries = &e;
  c.ntensors = 1;
  c.total_tasks = (n + kTaskElems - 1) / kTaskElems;
  if (perturb) {
    PerturbFunctor::Args a{strtoull(argv[8], nullptr, 10), zf_ops::f32(strtod(argv[9], nullptr))};
    run<PerturbFunctor, float>(dist, c, a);
  } else {  // launch_update: restore, q seeds inline (fill_queries), rounding; sgd_op: the scalars
    const int64_t restore_seed = strtoll(argv[8], nullptr, 10);
    const double restore_scale = strtod(argv[9], nullptr), lr = strtod(argv[10], nullptr);
    const int64_t round_seed = strtoll(argv[11], nullptr, 10);
    std::vector<int64_t> seeds;
    for (int j = 12; j + 1 < argc; j += 2) {
      c.seeds[seeds.size()] = strtoull(argv[j], nullptr, 10);
      c.coeffs[seeds.size()] = zf_ops::f32(strtod(argv[j + 1], nullptr));
      seeds.push_back(strtoll(argv[j], nullptr, 10));
    }
    c.q = (int32_t)seeds.size();
    SgdFunctor::Args a;
    memset(&a, 0, sizeof a);
    a.s = zf_ops::sgd_scalars(restore_scale, lr, 0.0, 0.0, 0.0, 0.0);
    a.h = HistArgs{false, false, false, a.s.alpha, a.s.one_minus_alpha};
    fill_restore(c, seeds, restore_seed, a.s.restore_scale);
    fill_rounding(c, true, round_seed);
    run<SgdFunctor, __nv_bfloat16>(dist, c, a);
  }
  if (fwrite(buf, esize, n, stdout) != (size_t)n) return 4;
  return 0;
}
"""
EMU_MARKER = '#include "multi_tensor_ops.h"\n'
CXX = os.environ.get("CXX", "g++")


@pytest.fixture(scope="module")
def emu_driver(tmp_path_factory):
    """The driver executable: cuda_emu.cpp's prelude + DRIVER, built with the emulation's flags."""
    from torch.utils.cpp_extension import include_paths

    with open(os.path.join(ROOT, "tests", "cuda_emu", "cuda_emu.cpp")) as f:
        emu = f.read()
    assert EMU_MARKER in emu, f"tests/cuda_emu/cuda_emu.cpp no longer has the line {EMU_MARKER!r}: update DRIVER"
    work = tmp_path_factory.mktemp("emu_large_index")
    src, exe = work / "driver.cpp", work / "driver"
    src.write_text(emu[:emu.index(EMU_MARKER) + len(EMU_MARKER)] + DRIVER)
    cmd = [CXX, "-O2", "-std=c++20", "-ffp-contract=off", "-fno-fast-math", "-pthread",
           "-I", os.path.join(ROOT, "csrc"), "-I", CUDA_INCLUDE, *[f"-I{p}" for p in include_paths()],
           str(src), "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, f"{' '.join(cmd)}\n{build.stderr[-6000:]}"
    return str(exe)


@pytest.mark.skipif(not os.path.exists(os.path.join(CUDA_INCLUDE, "cuda_bf16.h")),
                    reason=f"no CUDA headers at {CUDA_INCLUDE} (set CUDA_HOME): the emulation compiles them")
@pytest.mark.skipif(shutil.which(CXX) is None, reason=f"no C++ compiler {CXX!r}")
@pytest.mark.parametrize("base", BASE_PARAMS)
@pytest.mark.parametrize("dist", DIST_PARAMS)
@pytest.mark.parametrize("op", OPS)
def test_emulated_cuda_kernels_at_large_element_indices(emu_driver, op, dist, base):
    theta = THETA[op]
    args = [op, dist, base, N, TID, MASK_SEED, T]
    if op == "perturb_":
        args += [SEED, SCALE.hex()]
    else:
        args += [SEEDS[0], RESTORE_SCALE.hex(), LR.hex(), ROUND_SEED]
        args += [v for s, c in zip(SEEDS, COEFFS) for v in (s, c.hex())]
    run = subprocess.run([emu_driver, *map(str, args)], input=theta.view(BITS[theta.dtype]).numpy().tobytes(),
                         capture_output=True, timeout=120)
    assert run.returncode == 0, (f"the emulated kernel exited with {run.returncode} (a negative code is a signal, "
                                 f"e.g. a wild address from a truncated index): {run.stderr[-2000:]!r}")
    got = torch.frombuffer(bytearray(run.stdout), dtype=BITS[theta.dtype]).view(theta.dtype)
    assert_bits_equal(got, expected(op, dist, base), base)
