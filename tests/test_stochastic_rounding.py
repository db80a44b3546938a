"""§9 stochastic rounding (docs/perturbation-stream.md) as the reference states it: exactly
unbiased (checked by enumerating every value of the random bits that matter), the two
neighbours only, representable values unchanged, NaN/inf to nearest, and its own Philox
stream (tag 3)."""
from __future__ import annotations

import struct

import pytest
import torch

from zfkernels import reference as R
from zfkernels import stream as S


def _f32(bits: int) -> float:
    return struct.unpack("<f", struct.pack("<I", bits))[0]


def _ups(x: float, dtype, shift: int, count: int) -> tuple[int, float, float]:
    """Round ``x`` with the words k << shift for every k < count: (#rounded away, lo, hi)."""
    words = torch.arange(count, dtype=torch.int64) << shift
    y = R.stochastic_round(torch.full((count,), x), words, dtype).double()
    lo, hi = y.abs().min().item(), y.abs().max().item()
    return int((y.abs() == hi).sum()) if hi != lo else 0, lo, hi


@pytest.mark.parametrize("bits", [0x3F801234, 0x3F80FFFF, 0x3F800001, 0xC0490FDB, 0x00400000, 0x00000001, 0x7F7FFFFF])
def test_bf16_exactly_unbiased(bits):
    """The low 16 bits decide: of the 2^16 values of the word's top 16 bits, exactly
    `low16` round away from zero, so E[result] = x exactly."""
    x = _f32(bits)
    ups, lo, hi = _ups(x, torch.bfloat16, 16, 1 << 16)
    low16 = bits & 0xFFFF
    assert ups == low16
    assert lo == abs(_f32(bits & 0xFFFF0000))
    if low16:
        assert lo < abs(x) < hi


@pytest.mark.parametrize("x", [1.0 + 2**-12, 1.001, -3.14159, 2.0**-14 * 1.3, 65000.0, -1e-4])
def test_fp16_normal_exactly_unbiased(x):
    """fp16 normals keep 10 of fp32's 23 mantissa bits: exactly `low13` of the 2^13 values of
    the word's top 13 bits round away from zero."""
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    ups, lo, hi = _ups(x, torch.float16, 19, 1 << 13)
    assert ups == bits & 0x1FFF
    lo16 = torch.tensor(lo, dtype=torch.float16)
    assert lo <= abs(x) <= hi and hi == torch.nextafter(lo16, torch.tensor(70000.0, dtype=torch.float16)).item()


@pytest.mark.parametrize("units", [0.3, 1.5, 1023.7, 513.25])
def test_fp16_subnormal_exactly_unbiased(units):
    """Below 2^-14, fp16 is a grid of 2^-24: x = units * 2^-24 with 14 dropped bits when
    units >= 512, so of the 2^s values of the word's top s bits exactly `rem` round up."""
    x = units * 2.0**-24
    bits = struct.unpack("<I", struct.pack("<f", x))[0]
    exp = bits >> 23
    s = 126 - exp
    m = (bits & 0x7FFFFF) | (1 << 23)
    rem = m & ((1 << s) - 1)
    ups, lo, hi = _ups(x, torch.float16, 32 - s, 1 << s) if s <= 16 else (None, None, None)
    if ups is None:   # too many words to enumerate: sample the distribution instead
        g = torch.Generator().manual_seed(0)
        w = torch.randint(0, 2**32, (200_000,), generator=g, dtype=torch.int64)
        y = R.stochastic_round(torch.full((200_000,), x), w, torch.float16).double()
        assert abs(y.mean().item() - x) < 4 * 2.0**-24 / 200_000 ** 0.5
        return
    assert ups == rem
    assert lo == (m >> s) * 2.0**-24 and hi == lo + 2.0**-24


def test_representable_values_never_move_and_specials_round_to_nearest():
    g = torch.Generator().manual_seed(1)
    for dtype in (torch.bfloat16, torch.float16):
        x = (torch.randn(5000, generator=g) * 100).to(dtype).float()
        w = torch.randint(0, 2**32, (5000,), generator=g, dtype=torch.int64)
        assert torch.equal(R.stochastic_round(x, w, dtype), x.to(dtype))
        sp = torch.tensor([float("inf"), -float("inf"), float("nan"), 0.0, -0.0])
        out = R.stochastic_round(sp, torch.full((5,), 2**32 - 1, dtype=torch.int64), dtype)
        assert out[0].item() == float("inf") and out[1].item() == -float("inf") and out[2].isnan()
        assert torch.equal(out[3:].view(torch.int16), torch.tensor([0, -2**15], dtype=torch.int16))
    with pytest.raises(ValueError, match="bfloat16 / float16"):
        R.stochastic_round(torch.zeros(2), torch.zeros(2, dtype=torch.int64), torch.float32)


def test_rounding_words_are_their_own_stream():
    """Tag 3, four words per Philox call, element i = word i & 3 of call i >> 2; independent
    of the perturbation (tag 0) and the mask (tag 1) for the same seed."""
    w = R.rounding_words(77, 10, tensor_id=5)
    ref = R.stream_words(77, 5, S.TAG_ROUNDING, torch.arange(3))
    assert torch.equal(w, ref.reshape(-1)[:10])
    assert not torch.equal(w[:8], R.stream_words(77, 5, S.TAG_MASK, torch.arange(2)).reshape(-1))
    assert S.QUERY_ROUNDING == 2**32 - 3 and S.TAG_ROUNDING == 3


try:
    import triton
    import triton.language as tl

    from zfkernels.triton.philox import _sr_bf16_bits, _sr_fp16_bits
except Exception as exc:  # noqa: BLE001 - Triton missing, or its interpreter cannot run here: the test skips
    triton, _NO_TRITON = None, f"{type(exc).__name__}: {exc}"

if triton is not None:
    @triton.jit
    def _rounder(x_ptr, w_ptr, bf_ptr, fp_ptr, n, BLOCK: tl.constexpr):
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        ok = i < n
        x = tl.load(x_ptr + i, mask=ok, other=0.0)
        w = tl.load(w_ptr + i, mask=ok, other=0).to(tl.uint32)
        tl.store(bf_ptr + i, _sr_bf16_bits(x, w).to(tl.int64), mask=ok)
        tl.store(fp_ptr + i, _sr_fp16_bits(x, w).to(tl.int64), mask=ok)


def test_triton_rounding_bits_equal_the_reference_on_every_binade():
    """zfkernels/triton/philox.py's ``_sr_bf16_bits`` / ``_sr_fp16_bits`` against the reference,
    value by value: every fp32 exponent (fp16: its normal range, its overflow at 2^16 and the
    subnormal shifts k = 14..125 with their wide (k > 32) sums), both signs, mantissas at the
    edges, inf and NaN, each with words at the carry thresholds. Through the ops these paths are
    only reached where a trajectory happens to land (a wrong overflow test passed them)."""
    import os

    import numpy as np

    if triton is None:
        pytest.skip(_NO_TRITON)
    interp = os.environ.get("TRITON_INTERPRET") == "1"
    dev = "cuda" if torch.cuda.is_available() and not interp else "cpu"
    mants = [0, 1, 0x1FFF, 0x2000, 0x7FE000, 0x7FFFFF, 0x400000, 0x123457]
    xs = [(s << 31) | (e << 23) | m for s in (0, 1) for e in range(256) for m in mants]
    words = [0, 1, 0xFFFFFFFF, 0x80000000, 0x7FFFFFFF, 0xFFFF0000, 0x0000FFFF, 0xFFF80000, 0x0007FFFF,
             0xDEADBEEF, 0x12345678, 0xFFFFFF00, 0xFFFFFFFE]
    xb = torch.tensor([x for x in xs for _ in words], dtype=torch.int64)
    wb = torch.tensor([w for _ in xs for w in words], dtype=torch.int64)
    x = torch.from_numpy(xb.numpy().astype(np.uint32).view(np.float32).copy())
    n = x.numel()
    bf, fp = (torch.empty(n, dtype=torch.int64, device=dev) for _ in range(2))
    _rounder[(triton.cdiv(n, 4096),)](x.to(dev), wb.to(dev), bf, fp, n, BLOCK=4096)
    for dtype, got, exp_mask, frac_mask in ((torch.bfloat16, bf, 0x7F80, 0x007F), (torch.float16, fp, 0x7C00, 0x03FF)):
        want = R.stochastic_round(x, wb, dtype)
        nan = want.isnan()                      # §7: a NaN's bits are not specified, only that it is one
        want_bits = want.view(torch.int16).to(torch.int64) & 0xFFFF
        got = got.cpu() & 0xFFFF
        assert torch.equal(got[~nan], want_bits[~nan]), (dtype, int((got != want_bits)[~nan].sum()))
        assert ((got[nan] & exp_mask) == exp_mask).all() and ((got[nan] & frac_mask) != 0).all(), f"{dtype} NaN"
