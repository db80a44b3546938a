"""LLM-sized end-to-end suite (issue 13, GPU only): one training iteration of a decoder-only
transformer of OPT-1.3B shape, causal-LM loss, batch 16 x 512 tokens (MeZO's scale of batch).

Model: ``transformers`` ``OPTForCausalLM`` from an ``OPTConfig`` of facebook/opt-1.3b's shape
(hidden 2048, 24 layers, 32 heads, FFN 8192, vocab 50272, tied input/output embedding: 1.316B
parameters in 388 tensors), random weights (the config's own init, no download), built in bf16
directly on the device. OPT is the family MeZO (Malladi et al. 2023) fine-tunes. Dropout is
set to 0 so that the FO iteration (train mode) runs the same forward as the ZO ones (eval mode,
as MeZO's ``zo_forward``). The batch is a fixed random token batch; labels = input ids.

Measured in one run, each on the same model and batch (``extra_info['suite'] == 'llm'``):

* ``copy``       - ``dst.copy_(src)`` of a large bf16 tensor (256M elements), calls back to
                   back as in the kernel suite: the bandwidth the roofline uses;
* ``inference``  - plain inference: two forwards under ``torch.no_grad`` (each loss read back
                   as a float, as a ZO step reads it): the forwards of a ZO iteration, and the
                   memory baseline;
* ``zo_sgd`` / ``zo_adam`` - ``zeroflow.optim.create(...).step(closure)`` (fused kernels,
                   q = 1, two-sided, Gaussian z: MeZO's setting);
* ``zo_sgd_rademacher`` - the same ZO-SGD with Rademacher z (one Philox call per 128
                   elements instead of Box-Muller per pair: the issue-13 profile predicts
                   its share at ~0.4x the Gaussian one; the targets are reported for both);
* ``mezo_sgd``   - the MeZO recipe (its trainer's ``zo_step`` + ``zo_update``): per step
                   ``torch.manual_seed(seed)`` and per parameter ``torch.normal`` in the
                   parameter's dtype, perturb +eps, forward, -2 eps, forward, one read back
                   of both losses (``((l1 - l2) / (2 eps)).item()``), +eps (restore),
                   then z regenerated again for ``p -= lr g z`` (benchmarks/_common.py
                   ``mezo_perturb`` / ``mezo_z``, as in the optimizer-step suite);
* ``fo_adamw``   - forward + backward + ``torch.optim.AdamW`` (torch's default fused/foreach
                   implementation on CUDA), last because it allocates gradients and state.

The ZO methods run twice: ``variant="iteration"`` (the real closure: the optimizer's share is
the iteration minus the inference record's two forwards) and ``variant="optimizer_only"`` (the
closure returns precomputed loss tensors, no forward: the optimizer's own time directly).
``roofline_bytes`` is the traffic the method's passes over the parameters (and Adam's
moments) must move at least, each element read and written once per pass: ZO-SGD 3 passes
(perturb +eps, perturb -2 eps, update with the restore fused), ZO-Adam 2 passes over theta plus
one over theta, m, v, the MeZO recipe 4 passes (3 perturbs, 1 update; z counted as free).
Peak memory: ``torch.cuda.max_memory_allocated`` over one iteration after a warm-up one (state
allocated), each method in a fresh optimizer with the previous one's state freed.

GPU only (BENCH_DEVICE=cuda); skipped with the reason without CUDA or without transformers.
``BENCH_LLM_TINY=1`` (or BENCH_FAST=1) runs the same code on a 2-layer config (batch 2 x 32) on
BENCH_DEVICE, the CPU included: the smoke mode of tests/test_bench_llm.py.
Env: BENCH_LLM_ROUNDS (timed iterations per method, default 20; tiny: 2), BENCH_LLM_DTYPE
(bf16 default; fp32 for checks).
"""
from __future__ import annotations

import gc
import itertools
import os
import random

import pytest
import torch

from benchmarks import _common as C
from benchmarks import report as R

TINY = C.FAST or os.environ.get("BENCH_LLM_TINY", "") not in ("", "0")

# facebook/opt-1.3b's shape (its config.json); "opt-tiny" is the smoke-mode stand-in.
SHAPES = {
    "opt-1.3b": dict(hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
                     vocab_size=50272, max_position_embeddings=2048, word_embed_proj_dim=2048),
    "opt-tiny": dict(hidden_size=64, num_hidden_layers=2, ffn_dim=256, num_attention_heads=4,
                     vocab_size=1024, max_position_embeddings=128, word_embed_proj_dim=64),
}
MODEL = "opt-tiny" if TINY else "opt-1.3b"
BATCH, SEQ = (2, 32) if TINY else (16, 512)
DTYPE_NAME = os.environ.get("BENCH_LLM_DTYPE", "bf16").strip() or "bf16"
DTYPE = {"bf16": torch.bfloat16, "fp32": torch.float32}[DTYPE_NAME]
# 20 rounds: a median stable to ~1 ms of an ~80 ms iteration (the share is a difference of two).
ROUNDS = int(os.environ.get("BENCH_LLM_ROUNDS", "2" if TINY else "20"))
COPY_NUMEL = 1 << 20 if TINY else 1 << 28   # 512 MiB each way in bf16: far past the H200's 50 MB L2
# MeZO's OPT settings (lr 1e-6..1e-7, eps 1e-3); AdamW at a fine-tuning lr.
LR_ZO, EPS, LR_FO = 1e-6, 1e-3, 1e-5

# zeroflow methods: (optimizer name for zeroflow.optim.create, perturbation)
ZEROFLOW = {"zo_sgd": ("zo_sgd", "gaussian"), "zo_sgd_rademacher": ("zo_sgd", "rademacher"),
            "zo_adam": ("zo_adam", "gaussian")}
ZO_METHODS = (*ZEROFLOW, "mezo_sgd")
CASES = [(m, v) for m in ZO_METHODS for v in ("iteration", "optimizer_only")] + [("fo_adamw", "iteration")]
KIND = {**dict.fromkeys(ZEROFLOW, "zeroflow"), "mezo_sgd": "mezo", "fo_adamw": "fo"}
# Bytes per parameter byte the passes move, read + write: the step roofline of the report
# (ZO-SGD 3 passes, ZO-Adam 2 over theta + 1 over theta, m, v) and the MeZO recipe's 4 passes.
PASS_BYTES = {**R.STEP_BYTES_PER_PARAM, "mezo_sgd": 4 * 2}


def skip_reason() -> str | None:
    """None when the suite can run here, else why not (the skip message)."""
    try:
        import transformers  # noqa: F401 - availability probe
    except Exception as exc:  # noqa: BLE001 - the message is the skip reason
        return f"transformers is not installed ({exc}); the LLM suite builds its model from a transformers config"
    if C.ON_GPU and not torch.cuda.is_available():
        return C.NO_CUDA
    if not TINY and not C.ON_GPU:
        return ("GPU only: the OPT-1.3B-shaped suite needs BENCH_DEVICE=cuda (BENCH_LLM_TINY=1 runs its tiny "
                "config on this device)")
    return None


# ----------------------------------------------------------------------------- model, batch, loss
def build_model(shape: str, dtype: torch.dtype, dev) -> torch.nn.Module:
    """OPTForCausalLM of ``SHAPES[shape]`` with the config's random init, allocated and
    initialised in ``dtype`` on ``dev`` (no fp32 copy on the host: 1.3B fp32 params would
    take ~5 GiB and a minute of CPU init). Eval mode, no dropout, no KV cache."""
    from transformers import AutoModelForCausalLM, OPTConfig

    cfg = OPTConfig(**SHAPES[shape], dropout=0.0, attention_dropout=0.0, layerdrop=0.0,
                    use_cache=False, tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(dev):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    bad = {(p.dtype, p.device.type) for p in model.parameters()} - {(dtype, torch.device(dev).type)}
    assert not bad, f"parameters not all {dtype} on {dev}: {bad}"
    return model.eval()


def make_batch(vocab: int, batch: int, seq: int, dev) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (batch, seq), generator=g).to(dev)


def make_closure(model, ids):
    """The causal-LM loss (labels = input ids; transformers shifts them and reduces in fp32)."""

    def closure():
        return model(input_ids=ids, labels=ids).loss

    return closure


def precomputed_closure(loss: torch.Tensor):
    """A closure without a forward: returns ``loss`` and ``loss + 0.01`` in turn (two tensors
    on the device, read back like a real loss), so a two-sided step sees a non-zero
    difference and runs its full update."""
    pair = itertools.cycle((loss.detach().clone(), loss.detach() + 0.01))
    return lambda: next(pair)


# ----------------------------------------------------------------------------- methods
class MezoRecipe:
    """MeZO's trainer loop (``zo_step`` + ``zo_update``, weight decay 0): a random seed per
    step, perturb +eps / forward / -2 eps / forward with z drawn per parameter after
    ``torch.manual_seed(seed)`` in the parameter's dtype, ``g = ((l1 - l2) / (2 eps)).item()``
    (the losses' only read back of the step, after both forwards, as in MeZO), +eps (restore),
    then the same z regenerated for ``p -= lr g z``. In-place adds, as the other suites' MeZO-style
    baseline (MeZO itself assigns ``param.data = param.data + ...``, one more temporary)."""

    def __init__(self, params, closure, lr: float, eps: float, seed: int = 0):
        self.params, self.closure, self.lr, self.eps = list(params), closure, lr, eps
        self.rng = random.Random(seed)      # MeZO: np.random.randint(1000000000) per step
        self.last: dict = {}

    @torch.no_grad()
    def step(self) -> torch.Tensor:
        s = self.rng.randrange(1_000_000_000)
        C.mezo_perturb(self.params, s, self.eps, "gaussian")
        l1 = self.closure()
        # no read of l1 here: MeZO issues perturb(-2 eps) while forward 1 runs on the device
        C.mezo_perturb(self.params, s, -2 * self.eps, "gaussian")
        l2 = self.closure()
        g = ((l1 - l2) / (2 * self.eps)).item()     # MeZO's one read back per step
        C.mezo_perturb(self.params, s, self.eps, "gaussian")
        torch.manual_seed(s)
        for p in self.params:
            p.add_(C.mezo_z(p, "gaussian"), alpha=-self.lr * g)
        self.last = {"seed": s, "g": g}
        return l1


def make_method(method: str, params, closure, *, lr: float | None = None, eps: float = EPS):
    """``(step, optimizer)`` of one method; ``step()`` runs one training iteration."""
    if method in ZEROFLOW:
        from zeroflow.optim import create

        name, dist = ZEROFLOW[method]
        opt = create(name, params, lr=LR_ZO if lr is None else lr, zo_eps=eps, perturbation=dist, seed=1234)
        return (lambda: opt.step(closure)), opt
    if method == "mezo_sgd":
        rec = MezoRecipe(params, closure, LR_ZO if lr is None else lr, eps)
        return rec.step, rec
    if method == "fo_adamw":
        opt = torch.optim.AdamW(params, lr=LR_FO if lr is None else lr)

        def step():
            opt.zero_grad(set_to_none=True)
            with torch.enable_grad():
                closure().backward()
            opt.step()

        return step, opt
    raise ValueError(f"unknown method {method!r}")


def roofline_bytes(method: str, params_bytes: int) -> int | None:
    """Bytes the method's passes must move at least (module docstring), read + write."""
    per = PASS_BYTES.get(ZEROFLOW[method][0] if method in ZEROFLOW else method)
    return per * params_bytes if per else None


def state_bytes(opt) -> int:
    seen, total = set(), 0
    for st in getattr(opt, "state", {}).values():
        for v in (st.values() if isinstance(st, dict) else ()):
            if isinstance(v, torch.Tensor) and v.numel() > 1 and v.data_ptr() not in seen:
                seen.add(v.data_ptr())
                total += v.numel() * v.element_size()
    return total


def _key(method: str, variant: str = "iteration") -> str:
    return C.key("llm", method, variant, C.DEVICE, MODEL, BATCH, SEQ, DTYPE_NAME)


def _free():
    gc.collect()
    if C.ON_GPU:
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the suite
@pytest.fixture(scope="module")
def llm():
    why = skip_reason()
    if why:
        pytest.skip(why)
    dev = C.device()
    model = build_model(MODEL, DTYPE, dev)
    params = list(model.parameters())        # deduplicated: the tied embedding is one tensor
    ids = make_batch(model.config.vocab_size, BATCH, SEQ, dev)
    n = C.numel_of(params)
    info = {"suite": "llm", "model": MODEL, "arch": type(model).__name__, "dtype": DTYPE_NAME, "batch": BATCH,
            "seq": SEQ, "numel": n, "elements": n, "n_tensors": len(params),
            "params_bytes": sum(p.numel() * p.element_size() for p in params),
            "copy_ref": _key("copy"), "inference_ref": _key("inference"), "tiny": TINY}
    yield {"model": model, "params": params, "ids": ids, "closure": make_closure(model, ids), "info": info}
    del model, params, ids
    _free()


def _finish(benchmark, extra, opt=None):
    """CPU: peak total = params + state + the iteration's peak extra (CUDA measures it)."""
    sb = state_bytes(opt) if opt is not None else 0
    benchmark.extra_info["state_bytes"] = sb
    if not C.ON_GPU:
        benchmark.extra_info["peak_total_bytes"] = extra["params_bytes"] + sb + benchmark.extra_info[
            "peak_extra_bytes"]


def test_llm_copy_bandwidth(run_bench, benchmark, llm):
    """The copy bandwidth of this device in this run (bf16, read + write)."""
    src = torch.empty(COPY_NUMEL, dtype=DTYPE, device=C.device()).normal_()
    buf = {"src": src, "dst": torch.empty_like(src)}   # cleared below: 1 GiB the methods must not see

    def copy():
        buf["dst"].copy_(buf["src"])

    benchmark.group = f"llm copy {C.DEVICE}"
    extra = {**llm["info"], "key": _key("copy"), "kind": "copy", "method": "copy", "variant": "copy",
             "numel": COPY_NUMEL, "elements": COPY_NUMEL, "bytes": 2 * COPY_NUMEL * src.element_size()}
    del src
    # back to back as the kernel suite's copy_ (calls_per_round: the report's time is per call):
    # one call per round on a GPU also timed its launch and the sync's wake-up, which would
    # lengthen the roofline every share here is divided by
    run_bench(copy, extra, rounds=3 * ROUNDS, back_to_back=C.KERNEL_BACK_TO_BACK)
    buf.clear()
    _free()


def test_llm_inference(run_bench, benchmark, llm):
    """Plain inference: the two forwards a ZO iteration runs, without the optimizer."""
    closure = llm["closure"]

    @torch.no_grad()
    def two_forwards():
        for _ in range(2):
            float(closure())

    benchmark.group = f"llm {MODEL} b{BATCH}x{SEQ} {C.DEVICE}"
    extra = {**llm["info"], "key": _key("inference"), "kind": "inference", "method": "inference",
             "variant": "iteration", "forwards_per_step": 2}
    run_bench(two_forwards, extra, rounds=ROUNDS, mem=True)
    _finish(benchmark, extra)


@pytest.mark.parametrize("method,variant", CASES, ids=[f"{m}-{v}" for m, v in CASES])
def test_llm_method(run_bench, benchmark, llm, method, variant):
    model, params, closure = llm["model"], llm["params"], llm["closure"]
    if variant == "optimizer_only":
        with torch.no_grad():
            closure = precomputed_closure(closure())
    if method == "fo_adamw":
        model.train()     # dropout is 0: the same forward as the ZO methods', plus autograd
    step, opt = make_method(method, params, closure)
    extra = {**llm["info"], "key": _key(method, variant), "kind": KIND[method], "method": method,
             "variant": variant, "forwards_per_step": 1 if method == "fo_adamw" else 2,
             "roofline_bytes": roofline_bytes(method, llm["info"]["params_bytes"]),
             "lr": LR_FO if method == "fo_adamw" else LR_ZO, "zo_eps": None if method == "fo_adamw" else EPS}
    if variant == "iteration" and method in ZO_METHODS:
        extra["optimizer_only_ref"] = _key(method, "optimizer_only")
    if method in ZEROFLOW:
        extra["perturbation"] = ZEROFLOW[method][1]
    if method in ("zo_sgd", "zo_sgd_rademacher"):
        extra["mezo_ref"] = _key("mezo_sgd", variant)
    if KIND[method] == "zeroflow":
        import zfkernels as zk

        extra["backend"] = zk.resolve_backend(opt.backend, C.device())
    benchmark.group = f"llm {MODEL} b{BATCH}x{SEQ} {C.DEVICE}" + ("" if variant == "iteration" else " opt-only")
    try:
        run_bench(step, extra, rounds=ROUNDS, mem=(variant == "iteration"))
        if variant == "iteration":
            _finish(benchmark, extra, opt)
    finally:   # the next method starts from a fresh state: no gradients, no optimizer state
        model.eval()
        for p in params:
            p.grad = None
        del step, opt
        _free()
