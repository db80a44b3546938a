"""End-to-end suite (the analogue of the ZeroFlow paper's Table 2): one training iteration
of a timm ViT, all parameters trained, with each forward-pass method of
``zeroflow.optim.METHODS`` and the FO baselines (fo_sgd, fo_adam): time per iteration and
peak memory.

CPU: ``vit_tiny_patch16_224`` (5.7M params), batch 4 at 224 px. GPU: ``vit_base_patch16_224``
(ViT-B/16, 86M), batch 64. Fast mode: a 2-block ViT at 16 px. Override with
BENCH_E2E_MODEL / BENCH_E2E_BATCH / BENCH_E2E_IMG.
Memory: ``peak_total_bytes`` = params + optimizer state + the peak extra memory of the
iteration (activations, gradients, temporaries); on CUDA ``max_memory_allocated``.
BENCH_PRECISION=fp32|tf32|bf16|fp16 (default fp32): the forward passes' precision, as
``zeroflow run --precision`` sets it (autocast / TF32 around the model, the loss in fp32); a
precision other than fp32 is part of the measurement's key.
"""
from __future__ import annotations

import os

import pytest
import torch
from zeroflow.optim import METHODS, create, train_step

from benchmarks import _common as C

PRECISION = os.environ.get("BENCH_PRECISION", "fp32").strip() or "fp32"
FO_METHODS = ("fo_sgd", "fo_adam")


def _methods():
    return [m for m in METHODS if not m.startswith("fo_")] + list(FO_METHODS)


def _config():
    if C.FAST:
        model, batch, img = "tiny-test", 4, 16
    elif C.ON_GPU:
        model, batch, img = "vit_base_patch16_224", 64, 224
    else:
        model, batch, img = "vit_tiny_patch16_224", 4, 224
    model = os.environ.get("BENCH_E2E_MODEL", model)
    batch = int(os.environ.get("BENCH_E2E_BATCH", batch))
    img = int(os.environ.get("BENCH_E2E_IMG", img))
    return model, batch, img


def _build(model_name: str, img: int, num_classes: int = 10) -> torch.nn.Module:
    try:
        import timm
        from timm.models.vision_transformer import VisionTransformer
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"timm is not installed ({exc}); pip install timm")
    torch.manual_seed(0)
    if model_name == "tiny-test":
        m = VisionTransformer(img_size=img, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0,
                              num_classes=num_classes)
    else:
        m = timm.create_model(model_name, pretrained=False, num_classes=num_classes, img_size=img)
    return m.to(C.device()).train()


def _opt_state_bytes(opt) -> int:
    seen, total = set(), 0
    for st in getattr(opt, "state", {}).values():
        if isinstance(st, dict):
            for v in st.values():
                if isinstance(v, torch.Tensor) and v.numel() > 1 and v.data_ptr() not in seen:
                    seen.add(v.data_ptr())
                    total += v.numel() * v.element_size()
    return total


@pytest.mark.slow
@pytest.mark.parametrize("method", _methods())
def test_e2e_iteration(run_bench, benchmark, method):
    if C.ON_GPU and not torch.cuda.is_available():
        pytest.skip(C.NO_CUDA)
    model_name, batch, img = _config()
    model = _build(model_name, img)
    params = [p for p in model.parameters() if p.requires_grad]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 3, img, img, generator=g).to(C.device())
    y = torch.randint(0, 10, (batch,), generator=g).to(C.device())
    loss_fn = torch.nn.CrossEntropyLoss()
    from zeroflow.continual.precision import forward_precision

    def closure():
        with forward_precision(PRECISION, C.device().type):
            out = model(x)
        return loss_fn(out.float(), y)

    lr = 1e-5
    opt = create(method, params, model=model, lr=lr, seed=1234) if not method.startswith("fo_") \
        else create(method, params, lr=lr)

    def step():
        train_step(opt, closure)

    n = C.numel_of(params)
    pbytes = sum(p.numel() * p.element_size() for p in params)
    tag = () if PRECISION == "fp32" else (PRECISION,)
    benchmark.group = f"e2e {model_name} b{batch} {C.DEVICE}" + "".join(f" {t}" for t in tag)
    extra = {
        "suite": "e2e", "key": C.key("e2e", method, C.DEVICE, model_name, batch, *tag), "kind": "fo" if
        method.startswith("fo_") else "zeroflow", "method": method, "model": model_name, "batch": batch,
        "img": img, "numel": n, "elements": n, "params_bytes": pbytes,
        "fo_ref": C.key("e2e", "fo_sgd", C.DEVICE, model_name, batch, *tag),
        "forwards_per_step": None, "precision": PRECISION,
    }
    if method == "forward_grad":
        extra["note"] = "SDPA on its math backend under the jvp (the fused kernels have no forward-AD rule)"
    # An untimed warm-up step (lazy optimizer state, the allocator, cuBLAS / SDPA set-up on a
    # GPU's first iteration), a warm one that sizes the rounds, and one under the memory meter.
    run_bench(step, extra, budget_s=0.5 if C.ON_GPU else 3.0, max_rounds=10, mem=True)
    x = benchmark.extra_info
    x["state_bytes"] = _opt_state_bytes(opt)
    if not C.ON_GPU:
        x["peak_total_bytes"] = pbytes + x["state_bytes"] + x["peak_extra_bytes"]
    x["forwards_per_step"] = getattr(opt, "forwards_last_step", 1 if method.startswith("fo_") else None)
