"""Fidelity of reduced-precision forwards for zeroth-order steps (issue 12; docs/algorithms.md section 10).

A ZO step divides a loss difference of order ``eps`` by ``eps``; the rounding noise of a
reduced-precision forward does not shrink with ``eps``. This script measures where that noise
swamps the difference, for the parameters an EASE task trains: one AdaptFormer adapter set
(bottleneck 64, EASE's initialisation: the up-projections are zero, as at the start of every
task) and the task's temporary cosine head, on a timm ViT with random weights (rounding does not
need pretrained weights).

For a fixed batch and D Gaussian directions z over those parameters, the projected gradient
``g(z) = (L(theta + eps z) - L(theta - eps z)) / (2 eps)`` is computed with the forwards in each
precision (zeroflow's own path: ``AdaptedViT.features`` under ``--precision``; parameters,
perturbation and loss in fp32) and, as the reference, with the whole model in fp64. Per
precision and ``eps`` in {1e-4, 1e-3, 1e-2}: the Pearson correlation of g with the fp64 g over
the D directions, the relative error ||g - g_fp64|| / ||g_fp64||, the fraction of directions with
the same sign, and the seconds of one step's two forwards. The fp64 g is also compared with the
exact directional derivative (autograd, fp64): that is the finite difference's own truncation
error, which no precision can beat.

* ``tf32`` on a CPU: torch's TF32 flags act on CUDA only, so it is fp32; the script checks that
  on a few directions (bit-identical) and reports the fp32 numbers for it.
* ``tf32-emulated`` (CPU only): every matmul / linear / convolution input rounded to TF32's
  10-bit mantissa (round to nearest even) and fp32 accumulation, with the attention on its
  explicit matmul path. An estimate of what TF32 tensor cores do, until a GPU measures it.
* ``fp16``: autocast on the device; where this torch cannot autocast to fp16 on it, the
  precision is reported as unsupported with the reason.

Usage (from the repository root, ``PYTHONPATH=python:.``)::

    python -m benchmarks.precision_fidelity                  # CPU: ViT-Tiny/16, 112 px, batch 4, 256 directions
    python -m benchmarks.precision_fidelity --device cuda    # GPU: ViT-B/16, 224 px, batch 64, 256 directions
    python -m benchmarks.precision_fidelity --fast           # CI smoke: a 2-block ViT at 32 px, 32 directions

It writes JSON (``--out``) and a plot (``--plot``), and prints the table and the precision it
would choose for the device: the fastest one whose correlation stays >= 0.99 at the default
``zo_eps`` 1e-3. ``--report JSON`` renders the table, the plot and the summary again from a
saved JSON (e.g. one fetched from a GPU run).

The rounding noise of the loss does not depend on eps, so the relative error of g falls as
1/eps (measured: within a factor 1.5 over the grid). Each precision's ``zo_eps_floor`` is the
eps where that fit, ``relative_error(eps) = c / eps`` with ``c`` the median of
``relative_error * eps`` over the grid, reaches the relative error that leaves a correlation of
0.99 (``sqrt(1 / 0.99^2 - 1) = 0.1425``): below it the precision is unsafe.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.nn.functional as F

EPS = (1e-4, 1e-3, 1e-2)
PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
SAFE_CORRELATION = 0.99
SAFE_RELATIVE_ERROR = math.sqrt(1 / SAFE_CORRELATION ** 2 - 1)     # noise / signal at that correlation
DEFAULT_ZO_EPS = 1e-3
TF32_CHECK_DIRECTIONS = 4
MODES = {
    # mode: model, image size, batch, directions, adapter bottleneck
    "fast": ("tiny", 32, 4, 32, 8),
    # ViT-Tiny/16 at 112 px (50 tokens): 1,536 forwards per precision take 15-30 min on 2 cores
    # (bf16 / fp16 run as software on a CPU without bf16 / fp16 instructions, fp64 is slow too)
    "cpu": ("vit_tiny_patch16_224", 112, 4, 256, 64),
    "cuda": ("vit_base_patch16_224", 224, 64, 256, 64),
}


# ---------------------------------------------------------------- the model and the data
def build(model: str, img: int, adapter_dim: int, classes: int, device: torch.device, seed: int):
    """A random-weight ViT with one EASE adapter set, a cosine head, and their trained parameters."""
    import timm
    from timm.models.vision_transformer import VisionTransformer

    from zeroflow.continual.backbones import AdaptedViT
    from zeroflow.continual.learners import CosineLinear

    torch.manual_seed(seed)
    if model == "tiny":
        vit = VisionTransformer(img_size=img, patch_size=8, embed_dim=48, depth=2, num_heads=2, num_classes=0)
    else:
        vit = timm.create_model(model, pretrained=False, num_classes=0, img_size=img)
    net = AdaptedViT(vit, adapter_dim)
    net.add_adapter_set()
    head = CosineLinear(net.dim, classes)
    net, head = net.to(device).eval(), head.to(device).eval()
    params = list(net.adapters[0].parameters()) + list(head.parameters())
    return net, head, params


def batch(n: int, img: int, classes: int, device: torch.device, seed: int):
    """Images in [0, 1] (ToTensor's range, no Normalize, as the reference transforms) and labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, img, img, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x.to(device), y.to(device)


def loss_of(net, head, x, y, precision: str) -> float:
    if precision == "fp64":
        f = net._features(x, 0)           # the fp64 model: no autocast, no cast back to fp32
    else:
        net.precision = "fp32" if precision == "tf32-emulated" else precision
        f = net.features(x, 0)
    return float(F.cross_entropy(head(f), y))


def direction(params, k: int, seed: int) -> List[torch.Tensor]:
    """Direction ``k``: fp64 Gaussian, the same in every precision (from its own generator)."""
    device = params[0].device
    g = torch.Generator(device=device).manual_seed(seed * 100003 + k)
    return [torch.randn(p.shape, generator=g, dtype=torch.float64, device=device) for p in params]


# ---------------------------------------------------------------- TF32 emulation (CPU)
def round_to_tf32(t: torch.Tensor) -> torch.Tensor:
    """fp32 -> the nearest value with a 10-bit mantissa (ties to even), still stored as fp32."""
    if t.dtype != torch.float32:
        return t
    bits = t.contiguous().view(torch.int32)
    lsb = (bits >> 13) & 1
    return ((bits + 0xFFF + lsb) & ~0x1FFF).view(torch.float32)


class TF32Emulation(torch.overrides.TorchFunctionMode):
    """Rounds the inputs of every matrix product to TF32 (fp32 accumulation is the CPU's own)."""

    FUNCS = {torch.matmul, torch.Tensor.__matmul__, torch.mm, torch.bmm, torch.addmm, torch.baddbmm,
             F.linear, F.conv2d, torch.conv2d}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FUNCS:
            args = tuple(round_to_tf32(a) if isinstance(a, torch.Tensor) else a for a in args)
            kwargs = {k: round_to_tf32(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        return func(*args, **kwargs)


def explicit_attention(net, on: bool):
    """timm attention on its explicit matmul path (``on``) so that the emulation sees q k^T and p v."""
    for m in net.modules():
        if hasattr(m, "fused_attn"):
            if on:
                m._zf_fused, m.fused_attn = m.fused_attn, False
            elif hasattr(m, "_zf_fused"):
                m.fused_attn = m._zf_fused


# ---------------------------------------------------------------- measurements
@torch.no_grad()
def projected_gradients(net, head, params, x, y, precision: str, eps_list, n_dirs: int, seed: int):
    """``{eps: g[n_dirs]}`` and the seconds of one step's two forwards (median over the directions)."""
    base = [p.detach().clone() for p in params]
    out, pair_seconds = {}, []
    emulate = precision == "tf32-emulated"
    if emulate:
        explicit_attention(net, True)
    try:
        for eps in eps_list:
            g = np.empty(n_dirs)
            for k in range(n_dirs):
                z = [zi.to(p.dtype) for zi, p in zip(direction(params, k, seed), params)]
                losses = []
                t0 = time.perf_counter()
                for sign in (1.0, -1.0):
                    for p, b, zi in zip(params, base, z):
                        p.copy_(b + (sign * eps) * zi)       # theta +- eps z, rounded in the parameter's dtype
                    if emulate:
                        with TF32Emulation():
                            losses.append(loss_of(net, head, x, y, precision))
                    else:
                        losses.append(loss_of(net, head, x, y, precision))
                pair_seconds.append(time.perf_counter() - t0)
                g[k] = (losses[0] - losses[1]) / (2 * eps)
            out[eps] = g
    finally:
        for p, b in zip(params, base):
            p.copy_(b)
        if emulate:
            explicit_attention(net, False)
    return out, float(np.median(pair_seconds))


def exact_directional_derivatives(net64, head64, params64, x64, y, n_dirs: int, seed: int) -> np.ndarray:
    """grad L . z in fp64 (autograd): what the finite differences approximate."""
    for p in params64:
        p.requires_grad_(True)
        p.grad = None
    F.cross_entropy(head64(net64._features(x64, 0)), y).backward()
    grads = [p.grad.detach() for p in params64]
    for p in params64:
        p.requires_grad_(False)
    return np.array([sum(float((gi * zi).sum()) for gi, zi in zip(grads, direction(params64, k, seed)))
                     for k in range(n_dirs)])


def compare(g: np.ndarray, ref: np.ndarray) -> Dict:
    corr = float(np.corrcoef(g, ref)[0, 1]) if np.std(g) > 0 and np.std(ref) > 0 else float("nan")
    return {"correlation": corr, "relative_error": float(np.linalg.norm(g - ref) / np.linalg.norm(ref)),
            "sign_agreement": float(np.mean(np.sign(g) == np.sign(ref)))}


def unsupported(precision: str, device: torch.device) -> Optional[str]:
    from zeroflow.continual.precision import autocast_problem

    if precision == "tf32-emulated" and device.type != "cpu":
        return "the emulation stands in for TF32 tensor cores on a CPU; on CUDA measure tf32 itself"
    return autocast_problem(precision, device) if precision in ("bf16", "fp16") else None


def min_safe_eps(by_eps: Dict[str, Dict]) -> Optional[float]:
    """The smallest eps of the grid from which on (all larger eps too) the correlation stays
    >= SAFE_CORRELATION (None: not even the largest)."""
    safe = None
    for eps in sorted((float(e) for e in by_eps), reverse=True):
        if by_eps[f"{eps:g}"]["correlation"] >= SAFE_CORRELATION:
            safe = eps
        else:
            break
    return safe


def zo_eps_floor(by_eps: Dict[str, Dict]) -> float:
    """The eps below which the 1/eps fit of the relative error leaves a correlation < SAFE_CORRELATION."""
    c = float(np.median([s["relative_error"] * float(e) for e, s in by_eps.items()]))
    return c / SAFE_RELATIVE_ERROR


def summarize(res: Dict) -> Dict:
    """Add each measured precision's grid minimum and fitted floor, and the recommendation."""
    for r in res["results"].values():
        if r.get("status") == "measured":
            r["min_safe_eps"] = min_safe_eps(r["by_eps"])
            r["zo_eps_floor"] = zo_eps_floor(r["by_eps"])
    res["recommendation"] = recommend(res["results"], res["device"].split(":")[0])
    return res


def study(args, signals=None) -> Dict:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("precision_fidelity: --device cuda but torch.cuda.is_available() is False")
    net, head, params = build(args.model, args.img, args.adapter_dim, args.classes, device, args.seed)
    x, y = batch(args.batch, args.img, args.classes, device, args.seed)
    eps_list = args.eps

    # the fp64 reference: the same weights, every tensor in fp64
    import copy
    net64, head64 = copy.deepcopy(net).double(), copy.deepcopy(head).double()
    params64 = list(net64.adapters[0].parameters()) + list(head64.parameters())
    t0 = time.perf_counter()
    ref, ref_seconds = projected_gradients(net64, head64, params64, x.double(), y, "fp64", eps_list, args.directions,
                                           args.seed)
    exact = exact_directional_derivatives(net64, head64, params64, x.double(), y, args.directions, args.seed)
    print(f"fp64 reference: {time.perf_counter() - t0:.1f}s", flush=True)
    del net64, head64, params64

    results: Dict[str, Dict] = {"fp64": {"status": "reference", "seconds_per_step_forwards": ref_seconds,
                                         "by_eps": {f"{e:g}": {"vs_exact": compare(ref[e], exact)}
                                                    for e in eps_list}}}
    # A SIGINT or SIGTERM (a lease's limit) during a precision keeps the ones measured before it:
    # the JSON, the plot and the table are written with them and the run marked "stopped" (a run
    # cut off wrote nothing, the fp64 reference and every finished precision lost).
    stopped = None
    try:
        for precision in args.precisions:
            t0 = time.perf_counter()
            why = unsupported(precision, device)
            if why:
                results[precision] = {"status": "unsupported", "reason": why}
                print(f"{precision}: unsupported here ({why})", flush=True)
                continue
            if precision == "tf32" and device.type == "cpu" and "fp32" in results:
                # the TF32 flags do not act on a CPU: check that on a few directions, then reuse fp32
                n = min(TF32_CHECK_DIRECTIONS, args.directions)
                g, _ = projected_gradients(net, head, params, x, y, "tf32", eps_list[:1], n, args.seed)
                g32, _ = projected_gradients(net, head, params, x, y, "fp32", eps_list[:1], n, args.seed)
                if np.array_equal(g[eps_list[0]], g32[eps_list[0]]):
                    results["tf32"] = dict(results["fp32"], status="identical to fp32 on this device",
                                           checked_directions=n)
                    print(f"tf32: bit-identical to fp32 on {device} ({n} directions checked)", flush=True)
                    continue
            g, seconds = projected_gradients(net, head, params, x, y, precision, eps_list, args.directions, args.seed)
            results[precision] = {
                "status": "measured", "seconds_per_step_forwards": seconds,
                "by_eps": {f"{e:g}": dict(compare(g[e], ref[e]), vs_exact=compare(g[e], exact)) for e in eps_list}}
            print(f"{precision}: {time.perf_counter() - t0:.1f}s", flush=True)
    except KeyboardInterrupt:
        done = [q for q in args.precisions if q in results]
        stopped = (f"stopped ({signals.name if signals else 'SIGINT'}) after {', '.join(done) or 'the fp64 reference'}"
                   f" of {', '.join(args.precisions)}")
        print(f"precision_fidelity: {stopped}", file=sys.stderr, flush=True)

    return summarize({
        "schema": 1, "what": "projected ZO gradient (L+ - L-)/(2 eps) per forward precision vs fp64",
        "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                               else platform.processor() or platform.machine()),
        "torch": torch.__version__, "threads": torch.get_num_threads(), "mode": args.mode,
        "model": args.model, "img": args.img, "batch": args.batch, "classes": args.classes,
        "adapter_dim": args.adapter_dim, "directions": args.directions, "eps": list(eps_list), "seed": args.seed,
        "trained_parameters": int(sum(p.numel() for p in params)),
        "safe_correlation": SAFE_CORRELATION, "results": results,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    } | ({"stopped": stopped} if stopped else {}))


def recommend(results: Dict, device_type: str) -> Dict:
    """The fastest precision measured on this device that stays safe at the default zo_eps."""
    key = f"{DEFAULT_ZO_EPS:g}"
    candidates = []
    for p in PRECISIONS:
        r = results.get(p, {})
        if r.get("status") in ("measured", "identical to fp32 on this device") and "by_eps" in r and key in r["by_eps"]:
            if r["by_eps"][key]["correlation"] >= SAFE_CORRELATION:
                candidates.append((r["seconds_per_step_forwards"], p))
    best = min(candidates)[1] if candidates else "fp32"
    measured = {p: r for p, r in results.items() if r.get("status") == "measured"}
    return {"device": device_type, "precision": best, "zo_eps": DEFAULT_ZO_EPS,
            "rule": f"fastest precision with correlation >= {SAFE_CORRELATION} at zo_eps {DEFAULT_ZO_EPS:g}",
            "min_safe_eps": {p: r["min_safe_eps"] for p, r in measured.items()},
            "zo_eps_floor": {p: r["zo_eps_floor"] for p, r in measured.items()}}


# ---------------------------------------------------------------- output
def table(res: Dict) -> str:
    lines = ["| precision | eps | correlation | relative error | sign agreement | corr. vs exact | s / 2 forwards |",
             "|---|---|---|---|---|---|---|"]
    for p, r in res["results"].items():
        if r.get("status") == "unsupported":
            lines.append(f"| {p} | - | unsupported: {r['reason']} | | | | |")
            continue
        for e, s in r["by_eps"].items():
            if p == "fp64":
                lines.append(f"| fp64 (reference) | {e} | 1 | 0 | 1 | {s['vs_exact']['correlation']:.6f} | "
                             f"{r['seconds_per_step_forwards']:.3f} |")
            else:
                lines.append(f"| {p} | {e} | {s['correlation']:.6f} | {s['relative_error']:.2e} | "
                             f"{s['sign_agreement']:.3f} | {s['vs_exact']['correlation']:.6f} | "
                             f"{r['seconds_per_step_forwards']:.3f} |")
    return "\n".join(lines)


def plot(res: Dict, path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    for p, r in res["results"].items():
        if p == "fp64" or r.get("status") not in ("measured",):
            continue
        eps = [float(e) for e in r["by_eps"]]
        a1.plot(eps, [max(1 - s["correlation"], 1e-12) for s in r["by_eps"].values()], "o-", label=p)
        a2.plot(eps, [s["relative_error"] for s in r["by_eps"].values()], "o-", label=p)
    a1.axhline(1 - SAFE_CORRELATION, color="r", ls="--", lw=1, label=f"correlation {SAFE_CORRELATION}")
    a2.axhline(SAFE_RELATIVE_ERROR, color="r", ls="--", lw=1,
               label=f"{SAFE_RELATIVE_ERROR:.3f} (= correlation {SAFE_CORRELATION})")
    for a, title in ((a1, "1 - correlation with fp64"), (a2, "relative error vs fp64")):
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel("zo_eps")
        a.set_title(title, fontsize=9)
        a.legend(fontsize=7)
    fig.suptitle(f"projected ZO gradient per forward precision: {res['model']} ({res['img']} px, batch "
                 f"{res['batch']}), {res['directions']} directions, {res['device']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.precision_fidelity", description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N (default: cpu)")
    p.add_argument("--fast", action="store_true", help="CI smoke mode: a 2-block ViT at 32 px, 32 directions")
    p.add_argument("--model", default=None, help="timm model name, or 'tiny' (default: per mode)")
    p.add_argument("--img", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--directions", type=int, default=None, help="directions z (default 256; fast: 32)")
    p.add_argument("--adapter-dim", type=int, default=None)
    p.add_argument("--classes", type=int, default=10, help="classes of the task's head (default 10)")
    p.add_argument("--eps", default=",".join(f"{e:g}" for e in EPS), help="comma-separated zo_eps values")
    p.add_argument("--precisions", default=None, help="comma-separated (default: fp32,tf32,bf16,fp16, and "
                   "tf32-emulated on a CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", default=None, help="JSON output (default: results/precision_fidelity_<mode>.json)")
    p.add_argument("--plot", default=None, help="PNG output (default: next to the JSON)")
    p.add_argument("--report", default=None, metavar="JSON", help="no measurement: render the table, plot and "
                   "summary of a saved JSON again (updated in place)")
    a = p.parse_args(argv)
    if a.report:
        a.out, a.plot = a.report, a.plot or os.path.splitext(a.report)[0] + ".png"
        return a
    a.mode = "fast" if a.fast else ("cuda" if a.device.startswith("cuda") else "cpu")
    model, img, bs, dirs, adim = MODES[a.mode]
    a.model, a.img, a.batch = a.model or model, a.img or img, a.batch or bs
    a.directions, a.adapter_dim = a.directions or dirs, a.adapter_dim or adim
    # checked here, before the fp64 reference (minutes on a GPU): a misspelt precision used to
    # fail only when its turn came, after the reference and the precisions before it
    try:
        a.eps = tuple(sorted(float(e) for e in a.eps.split(",") if e.strip()))
    except ValueError:
        p.error(f"--eps takes comma-separated numbers, e.g. 1e-4,1e-3,1e-2 (got {a.eps!r})")
    if not a.eps or min(a.eps) <= 0 or not all(map(math.isfinite, a.eps)):
        p.error(f"--eps needs at least one value, each finite and > 0 (got {','.join(map(str, a.eps)) or 'none'})")
    if a.directions < 2:
        p.error(f"--directions must be at least 2 (a correlation over {a.directions} direction(s) is undefined)")
    default = PRECISIONS + (("tf32-emulated",) if a.mode != "cuda" else ())
    a.precisions = tuple(q.strip() for q in a.precisions.split(",") if q.strip()) if a.precisions else default
    unknown = [q for q in a.precisions if q not in PRECISIONS + ("tf32-emulated",)]
    if unknown or not a.precisions:
        p.error(f"--precisions: unknown {', '.join(unknown) or '(none given)'}; valid: "
                f"{', '.join(PRECISIONS + ('tf32-emulated',))} (fp64 is the reference, always measured)")
    # fp32 first: the CPU's tf32 check compares with it
    a.precisions = tuple(sorted(a.precisions, key=lambda q: q != "fp32"))
    a.out = a.out or os.path.join("results", f"precision_fidelity_{a.mode}.json")
    a.plot = a.plot or os.path.splitext(a.out)[0] + ".png"
    return a


def main(argv=None) -> int:
    a = parse(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.report:
        with open(a.report) as f:
            res = summarize(json.load(f))
    else:
        from benchmarks._common import StopSignals

        with StopSignals() as signals:
            try:
                res = study(a, signals)
            except KeyboardInterrupt:      # during the fp64 reference: nothing measured to write
                print(f"precision_fidelity: stopped ({signals.name}) during the fp64 reference; nothing written",
                      file=sys.stderr)
                return signals.exit_status
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(res, f, indent=2)
    plot(res, a.plot)
    print(table(res))
    rec = res["recommendation"]
    floors = ", ".join(f"{p} {e:.2g}" for p, e in rec["zo_eps_floor"].items())
    print(f"\nchosen for {rec['device']}: {rec['precision']} ({rec['rule']}); zo_eps floors (fit): {floors}")
    print(f"wrote {a.out} and {a.plot}")
    if res.get("stopped"):
        print(f"{res['stopped']}: the precisions not in the table were not measured")
        if not a.report:      # this run was cut off (a saved one rendered again is no failure)
            return signals.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
