"""Constants and host-side helpers of the perturbation stream (docs/perturbation-stream.md).

Everything here is plain Python on integers: it is shared by all backends and by the
optimizers (seed schedule, §8), so that the host side of the spec lives in one place.
"""
from __future__ import annotations

import operator
import struct

STREAM_VERSION = "v1"

# §1 Philox4x32-10 constants (Random123).
PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
MASK32 = 0xFFFFFFFF

# §2 stream tags (counter word 3).
TAG_PERTURBATION = 0
TAG_MASK = 1
TAG_SEED_SCHEDULE = 2
TAG_ROUNDING = 3

# §4/§5 distributions, as the compiled ops encode them.
DISTS = {"gaussian": 0, "rademacher": 1}

# §6 mask threshold resolution.
MASK_BITS = 24
MASK_ONE = 1 << MASK_BITS

# §8 reserved query slots of the seed schedule.
QUERY_MASK_PER_STEP = MASK32
QUERY_MASK_PER_TASK = MASK32 - 1
QUERY_ROUNDING = MASK32 - 2

# §5 fp32 constants of the Gaussian lane math, as IEEE-754 binary32 bit patterns: the one
# table the Triton kernels and the reference read (csrc/philox.h spells the same values as
# decimal literals; tests/test_parity.py checks that they round to exactly these bits).
TWO_M24_BITS = 0x33800000                      # 2^-24 (§3)
PI_F32_BITS = 0x40490FDB                       # float32(pi) = 3.14159274
LOG_SQRT_HALF_BITS = 0x3F3504F3                # sqrt(1/2): mantissa split point of log
LOG_POLY_BITS = (                              # P(f), Horner order (highest power first)
    0x3D9021BB, 0xBDEBD1B8, 0x3DEF251A, 0xBDFE5D4F, 0x3E11E9BF,
    0xBE2AAE50, 0x3E4CCEAC, 0xBE7FFFFC, 0x3EAAAAAA,
)
LN2_HI_BITS = 0x3F318000                       # 0.693359375 (exact, 9 bits)
LN2_LO_BITS = 0xB95E8083                       # -2.12194440e-4 = ln 2 - LN2_HI
TWO_OVER_PI_BITS = 0x3F22F983                  # 2/pi
PIO2_PARTS_BITS = (0x3FC90000, 0x39FDA000, 0x33A22169)   # pi/2 = DP1 + DP2 + DP3
SIN_POLY_BITS = (0xB94CA1F9, 0x3C08839E, 0xBE2AAAA3)     # sin(y) = y + y z P(z), z = y^2
COS_POLY_BITS = (0x37CCF5CE, 0xBAB6061A, 0x3D2AAAA5)     # cos(y) = 1 - z/2 + z^2 Q(z)


def f32_from_bits(bits: int) -> float:
    """The float32 with IEEE bit pattern ``bits``, as a Python float (exact)."""
    return struct.unpack("<f", struct.pack("<I", bits & MASK32))[0]


SEED_LIMIT = 1 << 63
TENSOR_ID_LIMIT = 1 << 32


def dist_code(dist: str | int) -> int:
    """Map ``"gaussian"``/``"rademacher"`` (or 0/1) to the ops' integer code."""
    if isinstance(dist, str):
        try:
            return DISTS[dist.lower()]
        except KeyError:
            raise ValueError(
                f"dist={dist!r} is not a perturbation distribution; use one of {sorted(DISTS)}"
            ) from None
    if not _is_bool(dist) and dist in (0, 1):     # True == 1 picked Rademacher
        return int(dist)
    raise ValueError(f"dist={dist!r} must be 'gaussian' (0) or 'rademacher' (1)")


def check_seed(seed: int, name: str = "seed") -> int:
    """Seeds are integers in [0, 2^63) (§2); bool and floats are refused."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        try:
            import numpy as np

            if isinstance(seed, np.integer):
                seed = int(seed)
            else:
                raise TypeError
        except (ImportError, TypeError):
            raise TypeError(f"{name} must be a Python int in [0, 2**63), got {type(seed).__name__}") from None
    if not 0 <= seed < SEED_LIMIT:
        raise ValueError(f"{name}={seed} is outside [0, 2**63); reduce it modulo 2**63")
    return seed


def check_adam_step(step: int, prefix: str = "") -> int:
    """Adam's step count after the update: in [1, 2^63). From 1, as its bias correction counts;
    below 2^63, an int64 as the compiled schema takes it (2^63 was an opaque RuntimeError
    there, and the reference and Triton ran with it). One bound for the face and every backend."""
    if not 1 <= step < SEED_LIMIT:
        raise ValueError(f"{prefix}step={step!r} must be >= 1 (the Adam step count after this update: its bias "
                         "correction counts from 1) and < 2**63 (an int64, as the compiled ops take it)")
    return step


def mask_threshold(sparsity: float) -> int:
    """§6: the integer threshold T = round(sparsity * 2^24) for a fraction zeroed."""
    try:
        if isinstance(sparsity, (str, bytes)) or _is_bool(sparsity):     # float("0.5") took a string, np.True_ 1.0
            raise TypeError
        s = float(sparsity)
    except (TypeError, ValueError):          # float()'s "could not convert string to float: 'x'"
        raise ValueError(f"sparsity={sparsity!r} must be a number, the fraction of coordinates zeroed in [0, 1]") \
            from None
    if not 0.0 <= s <= 1.0 or s != s:
        raise ValueError(f"sparsity={sparsity!r} must be a fraction of coordinates zeroed in [0, 1]")
    return int(round(s * MASK_ONE))


def philox4x32_10_scalar(counter: tuple[int, int, int, int], key: tuple[int, int]) -> tuple[int, int, int, int]:
    """One Philox4x32-10 call on Python ints (§1); used for the seed schedule and as a
    readable statement of the round function."""
    c0, c1, c2, c3 = (int(c) & MASK32 for c in counter)
    k0, k1 = (int(k) & MASK32 for k in key)
    for _ in range(10):
        p0 = PHILOX_M0 * c0
        p1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = ((p1 >> 32) ^ c1 ^ k0, p1 & MASK32, (p0 >> 32) ^ c3 ^ k1, p0 & MASK32)
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def _is_bool(v) -> bool:
    """A Python, numpy or torch bool (a one-element bool tensor too), which compares equal
    to 0 / 1 and which ``operator.index`` takes (torch's bool tensors) as one."""
    return isinstance(v, bool) or str(getattr(v, "dtype", "")) in ("bool", "torch.bool")


def integer_arg(v, name: str, must: str = "an integer") -> int:
    """``v`` as an int: a Python or numpy integer (not a bool, a float or a string), as the
    registered ops take it, else a TypeError naming ``name``; ``int(v)`` truncated 0.9 to the
    id 0 and step=1.9 to 1, where the ops themselves refuse a float."""
    if type(v) is int:
        return v
    if not _is_bool(v):     # operator.index(torch.tensor(True)) is 1
        try:
            return operator.index(v)
        except TypeError:
            pass
    raise TypeError(f"{name}={v!r} must be {must}, got {type(v).__name__}")


def split_seed(seed: int) -> tuple[int, int]:
    """Key words (k0, k1) = (seed mod 2^32, seed >> 32) (§2)."""
    return seed & MASK32, (seed >> 32) & MASK32


def derive_seed(base_seed: int, step: int, query: int) -> int:
    """§8 seed schedule: the seed of query ``query`` at step ``step`` of a run with
    base seed ``base_seed``. Deterministic, platform independent, in [0, 2^63)."""
    check_seed(base_seed, "base_seed")
    if type(step) is not int or type(query) is not int:     # "'<' not supported", "unsupported operand &"
        step, query = integer_arg(step, "step"), integer_arg(query, "query")
    if step < 0 or step >= 1 << 64:
        raise ValueError(f"step={step} must be in [0, 2**64)")
    if not 0 <= query <= MASK32:
        raise ValueError(f"query={query} must be in [0, 2**32)")
    x0, x1, _, _ = philox4x32_10_scalar(
        (step & MASK32, step >> 32, query, TAG_SEED_SCHEDULE), split_seed(base_seed)
    )
    return (x0 | (x1 << 32)) & (SEED_LIMIT - 1)
