"""``zeroflow`` command line: ``run``, ``sweep``, ``report``, ``replay``.

``run`` also works under ``torchrun`` (data-parallel ZO, docs/distributed.md).

Importing this module is light (argparse only); torch/timm load when a command runs.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

RUN_FLAGS = (
    # flag, dest, type, help
    ("--method", "method", str, "ease | aper"),
    ("--optimizer", "optimizer", str, "zo_sgd zo_sgd_sign zo_sgd_conserve zo_adam zo_adam_sign "
                                      "zo_adam_conserve forward_grad fo_sgd fo_adam"),
    ("--dataset", "dataset", str, "digits (embedded) | cifar100 | cub | imagenet-a | omnibenchmark"),
    ("--data-root", "data_root", str, "folder holding cifar-100-python/ or <dataset>/{train,test}/ (default: data)"),
    ("--epochs", "epochs", int, "training epochs per trained task"),
    ("--lr", "lr", float, "learning rate (cosine schedule over the epochs of a task)"),
    ("--batch-size", "batch_size", int, "training batch size"),
    ("--weight-decay", "weight_decay", float, "weight decay"),
    ("--momentum", "momentum", float, "SGD-family momentum"),
    ("--q", "q", int, "ZO queries per step"),
    ("--zo-eps", "zo_eps", float, "ZO perturbation scale"),
    ("--perturbation", "perturbation", str, "gaussian | rademacher"),
    ("--sparsity", "sparsity", float, "ZO sparse-mask ratio in [0, 1)"),
    ("--history", "history", float, "ZO history mixing alpha in [0, 1]"),
    ("--hybrid-switch", "hybrid_switch", int, "hybrid FO->ZO: FO steps per task before switching to ZO"),
    ("--seed", "seed", int, "random seed (the class order always uses PILOT's 1993)"),
    ("--device", "device", str, "auto | cpu | cuda | cuda:N"),
    ("--backend", "backend", str, "zfkernels backend for the ZO kernels (default: auto)"),
    ("--checkpoint", "checkpoint", str, "local ViT weights (.safetensors/.pth/.npz) instead of pretrained=True"),
    ("--init-cls", "init_cls", int, "classes in the first task"),
    ("--increment", "increment", int, "classes per later task"),
    ("--ease-alpha", "ease_alpha", float, "EASE subspace reweighting alpha"),
    ("--num-workers", "num_workers", int, "DataLoader workers"),
    ("--threads", "threads", int, "torch CPU threads"),
)


def _add_run_flags(p: argparse.ArgumentParser, sweep: bool = False):
    for flag, dest, typ, hlp in RUN_FLAGS:
        if sweep and dest == "optimizer":
            continue
        p.add_argument(flag, dest=dest, type=typ, default=None, help=hlp)
    p.add_argument("--config", default=None, help="YAML/JSON file of options (defaults < file < flags)")
    p.add_argument("--download", action="store_true", default=None, help="download CIFAR-100 if missing")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="zeroflow", description="ZeroFlow continual-learning benchmark "
                                "(EASE / APER with forward-pass optimizers). See docs/continual.md.")
    sub = p.add_subparsers(dest="cmd")
    r = sub.add_parser("run", help="one run (no arguments: EASE + ZO-Adam on the embedded digits)")
    _add_run_flags(r)
    r.add_argument("--out", default=None, help="run folder (default: a fresh runs/<time>_...)")
    r.add_argument("--resume", action="store_true", help="continue the unfinished run in --out")
    r.add_argument("--stop-after", type=int, default=None,
                   help="stop after this many finished tasks (continue later with --resume)")
    s = sub.add_parser("sweep", help="run a list of optimizers for one method/dataset")
    _add_run_flags(s, sweep=True)
    s.add_argument("--optimizers", default="zo_sgd,zo_adam,fo_sgd,fo_adam",
                   help="comma-separated optimizer list, or 'all'")
    s.add_argument("--out", default=None, help="parent folder of the runs (default: runs/sweep_<time>)")
    sub.add_parser("replay", help="rebuild trained weights from a base checkpoint and a ZO trajectory log "
                   "(zeroflow replay BASE LOG --out WEIGHTS; see docs/distributed.md)", add_help=False)
    rep = sub.add_parser("report", help="markdown tables (Table 1 / Table 2 style) from run folders")
    rep.add_argument("runs", nargs="+", help="run folders (or parents of run folders)")
    rep.add_argument("--output", default=None, help="also write the markdown to this file")
    return p


def _overrides(a) -> dict:
    return {dest: getattr(a, dest, None) for _, dest, _, _ in RUN_FLAGS} | {"download": a.download}


def _print_table(m: dict, run_dir: str):
    c = m["config"]
    print()
    print(f"| method | optimizer | dataset | Avg | Last | Fgt |")
    print(f"|---|---|---|---|---|---|")
    print(f"| {c['method'].upper()} | {c['optimizer']} | {c['dataset']} | {m['avg']:.2f} | {m['last']:.2f} | "
          f"{m['fgt']:.2f} |")
    print()
    print(f"forward passes (training): {m['forward_passes']}   peak memory: {m['peak_memory_bytes'] / 2**20:.0f} MiB "
          f"({m['peak_memory_kind']})   time: {m['seconds']:.1f}s (+{m.get('setup_seconds', 0):.1f}s setup)")
    print(f"run folder: {run_dir}")


def cmd_run(a) -> int:
    from .continual.defaults import resolve
    from .continual.runner import run

    cfg = resolve(_overrides(a), a.config) if not a.resume else {"device": a.device}
    if a.resume and not a.out:
        from .continual.errors import ZeroflowError
        raise ZeroflowError("--resume needs --out RUN_FOLDER")
    try:
        m = run(cfg, a.out, resume=a.resume, progress=not a.no_progress, stop_after=a.stop_after)
    finally:
        import torch.distributed as dist
        if dist.is_available() and dist.is_initialized():   # torchrun: leave the group cleanly
            dist.destroy_process_group()
    if "stopped_after" in m or m.get("rank", 0) != 0:    # ranks > 0 of a torchrun job print nothing
        return 0
    _print_table(m, m["run_dir"])
    return 0


def cmd_sweep(a) -> int:
    import time
    from .continual.defaults import OPTIMIZERS, check_choice, resolve
    from .continual.runner import run
    from .continual.report import render

    names = list(OPTIMIZERS) if a.optimizers == "all" else [s.strip() for s in a.optimizers.split(",") if s.strip()]
    for n in names:
        check_choice("optimizer", n, OPTIMIZERS)
    parent = a.out or os.path.join("runs", "sweep_" + time.strftime("%Y%m%d-%H%M%S"))
    dirs = []
    for n in names:
        cfg = resolve(_overrides(a) | {"optimizer": n}, a.config)
        d = os.path.join(parent, f"{cfg['method']}_{n}_{cfg['dataset']}")
        print(f"== {n} -> {d}")
        run(cfg, d, resume=os.path.isfile(os.path.join(d, "checkpoint.pt")), progress=not a.no_progress)
        dirs.append(d)
    print(render(dirs))
    print(f"sweep folder: {parent}")
    return 0


def cmd_report(a) -> int:
    from .continual.report import render

    text = render(a.runs)
    print(text)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["replay"]:
        # its own parser (BASE LOG --out WEIGHTS), shared with python -m zeroflow.replay
        from .replay import replay_main
        return replay_main(argv[1:])
    p = build_parser()
    a = p.parse_args(argv)
    if a.cmd is None:
        p.print_help()
        return 2
    from .continual.errors import ZeroflowError
    try:
        return {"run": cmd_run, "sweep": cmd_sweep, "report": cmd_report}[a.cmd](a)
    except ZeroflowError as e:
        print(f"zeroflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zeroflow: interrupted (finished tasks are checkpointed; use --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
