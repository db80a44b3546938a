"""Markdown tables from run folders: Table-1 style (Avg/Last/Fgt per method x optimizer x
dataset) and Table-2 style (peak memory, seconds per iteration, forward passes)."""
from __future__ import annotations

import json
import os
from typing import Dict, List, Sequence

from .defaults import DATASETS, OPTIMIZERS
from .errors import ZeroflowError


def find_runs(paths: Sequence[str]) -> List[Dict]:
    runs = []
    for p in paths:
        if os.path.isfile(os.path.join(p, "metrics.json")):
            cands = [p]
        elif os.path.isdir(p):
            cands = sorted(os.path.join(p, d) for d in os.listdir(p)
                           if os.path.isfile(os.path.join(p, d, "metrics.json")))
        else:
            raise ZeroflowError(f"{p}: no such run folder")
        if not cands:
            raise ZeroflowError(f"{p}: no finished run (metrics.json) in it or below it")
        for c in cands:
            with open(os.path.join(c, "metrics.json")) as f:
                m = json.load(f)
            m["_dir"] = c
            runs.append(m)
    return runs


def _order(names, ref):
    return sorted(names, key=lambda n: (ref.index(n) if n in ref else len(ref), n))


def render(paths: Sequence[str]) -> str:
    runs = find_runs(paths)
    by = {}
    for m in runs:
        c = m["config"]
        by[(c["method"], c["optimizer"], c["dataset"])] = m   # the last given wins
    datasets = _order({k[2] for k in by}, list(DATASETS))
    rows = sorted({(k[0], k[1]) for k in by}, key=lambda r: (r[0], OPTIMIZERS.index(r[1]) if r[1] in OPTIMIZERS else 99))

    def table(title: str, columns: Sequence[str], cells_of) -> List[str]:
        """One row per (method, optimizer), three cells per dataset from ``cells_of(metrics)``."""
        lines = [title, "", "| Method | Optimizer | " + " | ".join(f"{d} {c}" for d in datasets for c in columns) + " |",
                 "|---|---|" + "---|---|---|" * len(datasets)]
        for meth, opt in rows:
            cells = []
            for d in datasets:
                m = by.get((meth, opt, d))
                cells += cells_of(m) if m else ["-", "-", "-"]
            lines.append(f"| {meth.upper()} | {opt} | " + " | ".join(cells) + " |")
        return lines

    def efficiency(m):
        spi = m.get("seconds_per_iteration")
        return [f"{m['peak_memory_bytes'] / 1e9:.2f}", f"{spi:.4f}" if spi else "-", str(m["forward_passes"])]

    out = table("### Accuracy (Table 1 style): Avg / Last / Fgt (%)", ("Avg", "Last", "Fgt"),
                lambda m: [f"{m['avg']:.2f}", f"{m['last']:.2f}", f"{m['fgt']:.2f}"])
    out += [""] + table("### Efficiency (Table 2 style): peak memory (GB) / seconds per iteration / training "
                        "forward passes", ("Mem GB", "s/iter", "queries"), efficiency)
    kinds = sorted({m.get("peak_memory_kind", "?") for m in runs})
    out += ["", f"Memory: {', '.join(kinds)}. Runs: " + ", ".join(m["_dir"] for m in runs), ""]
    return "\n".join(out)
