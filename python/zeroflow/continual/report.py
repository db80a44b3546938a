"""Markdown tables from run folders: Table-1 style (Avg/Last/Fgt per method x optimizer x
dataset) and Table-2 style (peak memory, seconds per iteration, forward passes).

* The paths are searched recursively (``report runs/`` finds ``runs/sweep_*/...`` too). A run
  folder without a readable, complete ``metrics.json`` is skipped with one line naming the
  file and the reason; a run reached twice (``report runs runs/x``) counts once.
* Different runs are never merged into one cell. Runs whose configurations agree on every
  option but the seed are one row of mean ± sample std over their seeds (configurations are
  compared as the run folder compares them: an option a run lacks counts at its default, so
  ``small_vit: null`` and no ``small_vit`` agree); every other run is its own row, and the
  options that tell the rows of one method x optimizer x dataset apart become columns (a
  float in full where its short form would hide a difference). Runs that agree on
  everything, seed included, get a ``run`` column.
* Runs computed by different zeroflow results versions (runfolder.RESULTS_VERSION: what one
  configuration computes changed, e.g. the augmentation draws of 2026-12-02) are never one row:
  the version is compared as an option (``results_version``, "unrecorded" for a run that does
  not record it), and the runs that are not this version's are named under the tables.
* Runs with an untrained baseline (``--baseline untrained``) add a third table: what training
  added, ``avg_gain`` / ``last_gain`` (trained minus untrained, percentage points).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

from .defaults import DATASETS, OPTIMIZERS, canonical_value
from .errors import ZeroflowError, refuse_empty_path
from .runfolder import (METRICS, OPERATIONAL_KEYS, RESULTS_VERSION, UNRECORDED, comparable, describe_results_version,
                        inspect, is_run_folder, load_metrics, lock_holder, results_version, walk_folders)

CELL_KEYS = ("method", "optimizer", "dataset")   # a table cell: row (method, optimizer) x dataset


# ---------------------------------------------------------------- finding runs
def _train_peak(m: Dict) -> Optional[float]:
    """A run's Table 2 memory: the training loops' peak; None for a run that trained nothing
    (``null``: --epochs 0); for a run written before that was recorded (no entry) its whole-task
    peak (the report names those runs)."""
    if "train_peak_memory_bytes" not in m:
        return m["peak_memory_bytes"]
    return m["train_peak_memory_bytes"]


def _why_unfinished(folder: str) -> str:
    holder = lock_holder(folder)
    if holder:
        return f"{folder}: unfinished (no {METRICS}; in progress: {holder})"
    state = inspect(folder)
    if state.kind == "corrupt":     # --resume refuses it (no config.json, or a damaged one): not suggested
        return f"{folder}: unfinished and not resumable (no {METRICS}; {state.problem}); run it again in a new --out"
    return f"{folder}: unfinished (no {METRICS}; continue it with zeroflow run --resume --out {folder})"


def _run_folders(path: str) -> List[str]:
    """``path`` and the folders below it that hold a run (not looking inside a run folder)."""
    found = []
    for folder, subdirs in walk_folders(path):      # a run linked into the folder is found too
        if is_run_folder(folder):
            found.append(folder)
            subdirs[:] = []
    return found


def find_runs(paths: Sequence[str]) -> Tuple[List[Dict], List[str]]:
    """``(runs, skipped)``: the finished runs' metrics (``_dir`` added) and one line per run
    folder (or other file given) that was skipped. ``ZeroflowError`` for a path that does
    not exist."""
    runs, skipped, seen = [], [], set()
    for p in paths:
        if os.path.isfile(p) and os.path.basename(p) == METRICS:
            p = os.path.dirname(p) or "."
        refuse_empty_path(p, "a run folder path", "give run folders, or folders holding runs (e.g. runs)")
        if not os.path.exists(p):
            raise ZeroflowError(f"{p}: no such run folder")
        if not os.path.isdir(p):
            skipped.append(f"{p}: not a run folder (a file)")     # e.g. a report.md matched by runs/*
            continue
        for folder in _run_folders(p):
            real = os.path.realpath(folder)
            if real in seen:
                continue
            seen.add(real)
            if not os.path.exists(os.path.join(folder, METRICS)):
                skipped.append(_why_unfinished(folder))
                continue
            try:
                m = _restated_fgt(load_metrics(os.path.join(folder, METRICS)), os.path.join(folder, METRICS))
            except ZeroflowError as e:
                skipped.append(str(e))
                continue
            m["_dir"] = folder
            runs.append(m)
    return runs, skipped


def _restated_fgt(m: Dict, path: str) -> Dict:
    """A copy of the run's metrics ``m`` (read from ``path``) whose ``fgt`` is as
    metrics.forgetting defines it now (PILOT's: the best accuracy over all stages, the last
    included), from the run's accuracy matrix; the value the run stored is kept in
    ``_stored_fgt`` (it differs for runs written before that definition, named under the
    tables). A metrics.json without a matrix keeps its Fgt."""
    from .metrics import forgetting

    matrix = m.get("accuracy_matrix")
    if matrix is None:
        return m
    try:
        fgt = forgetting(matrix)
    except (TypeError, ValueError, IndexError, KeyError) as e:
        raise ZeroflowError(f"{path}: corrupt (accuracy_matrix: {type(e).__name__}: {e})") from e
    return dict(m, fgt=fgt, _stored_fgt=m["fgt"])


# ---------------------------------------------------------------- rows
@dataclass
class Row:
    runs: List[Dict]            # one run, or the runs of one configuration over several seeds
    config: Dict                # the (first) run's configuration

    @property
    def aggregated(self) -> bool:
        return len(self.runs) > 1

    def value(self, key: str):
        if key == "seed" and self.aggregated:
            return ", ".join(str(m["config"].get("seed")) for m in self.runs)
        if key == "run":
            return f"mean of {len(self.runs)}" if self.aggregated else self.runs[0]["_dir"]
        return self.config.get(key)


def _by_value(v):
    """``v`` with every number a float (1 and 1.0 are one value, as ``==`` says)."""
    if isinstance(v, dict):
        return {k: _by_value(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_by_value(x) for x in v]
    return canonical_value(v)


def _key(config: Dict, drop: Sequence[str]) -> str:
    """Equal for two configurations that the run folder calls the same run (runfolder.comparable:
    an option a run lacks, or has as null without a default, counts at its default), ``drop``
    left out."""
    return json.dumps({k: _by_value(v) for k, v in comparable(config).items() if k not in drop}, sort_keys=True)


def group_runs(runs: List[Dict]) -> List[Row]:
    """Runs equal in every option but the seed, with distinct seeds, form one row; any
    other run is a row of its own (the same seed twice is two runs, not two seeds)."""
    by_config: Dict[str, List[Dict]] = {}
    for m in runs:
        by_config.setdefault(_key(m["config"], ("seed",) + OPERATIONAL_KEYS), []).append(m)
    rows = []
    for ms in by_config.values():
        seeds = [json.dumps(_by_value(m["config"].get("seed"))) for m in ms]
        if len(ms) > 1 and len(set(seeds)) == len(seeds):
            ms = sorted(ms, key=lambda m: str(m["config"].get("seed")))
            rows.append(Row(ms, comparable(ms[0]["config"])))
        else:
            rows += [Row([m], comparable(m["config"])) for m in ms]
    return rows


def distinguishing_columns(rows: List[Row]) -> List[str]:
    """The options that differ between rows of the same method x optimizer x dataset (the
    seed among them when rows are per seed or averaged), then ``run`` if rows still tie."""
    cols = set()
    for cell in _cells(rows):
        for r in cell[1:]:
            a, b = cell[0].config, r.config
            cols |= {k for k in set(a) | set(b)
                     if k not in CELL_KEYS + OPERATIONAL_KEYS and a.get(k) != b.get(k)}
    if any(r.aggregated for r in rows):
        cols.add("seed")
    cols = sorted(cols, key=lambda k: (k != "seed", k))
    for cell in _cells(rows):
        labels = [tuple(_show(r.value(k)) for k in cols) for r in cell]
        if len(set(labels)) < len(labels):
            return cols + ["run"]
    return cols


def _cells(rows: List[Row]) -> List[List[Row]]:
    """The rows grouped by method x optimizer x dataset."""
    by_cell: Dict[tuple, List[Row]] = {}
    for r in rows:
        by_cell.setdefault(tuple(r.config.get(k) for k in CELL_KEYS), []).append(r)
    return list(by_cell.values())


def row_labels(rows: List[Row], cols: Sequence[str]) -> Dict[int, tuple]:
    """``id(row) -> `` the row's cells in ``cols``, distinct within every method x optimizer x
    dataset: where two rows would still read the same (a ``run`` column reading "mean of N"
    twice), the run cell of an averaged row lists its run folders, so no row hides another."""
    labels = {id(r): tuple(_show(r.value(k)) for k in cols) for r in rows}
    for cell in _cells(rows):
        seen: Dict[tuple, int] = {}
        for r in cell:
            seen[labels[id(r)]] = seen.get(labels[id(r)], 0) + 1
        for r in cell:
            if seen[labels[id(r)]] > 1 and "run" in cols and r.aggregated:
                i = list(cols).index("run")
                folders = ", ".join(m["_dir"] for m in r.runs)
                labels[id(r)] = labels[id(r)][:i] + (f"mean of {len(r.runs)}: {folders}",) + labels[id(r)][i + 1:]
    return labels


def _show(v) -> str:
    """A table cell. A float is shown short (``:g``) when that is exact, else in full
    (``repr``): lr 0.005 and 0.0050000001 are two rows and must read differently."""
    if v is None:
        return "none"
    if isinstance(v, (dict, list)):
        return json.dumps(v, separators=(",", ":"), sort_keys=True)
    if isinstance(v, float):
        short = f"{v:g}"
        return short if float(short) == v else repr(v)
    return str(v)


def _stat(values: List[float], fmt: str, signed: bool = False) -> str:
    """One run: the value. Several seeds: mean ± sample standard deviation. ``signed``: the
    value (mean) with its sign, as a difference is shown."""
    head = "+" + fmt if signed else fmt
    if len(values) == 1:
        return format(values[0], head)
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return f"{format(mean, head)} ± {format(std, fmt)}"


def _order(names, ref):
    return sorted(names, key=lambda n: (ref.index(n) if n in ref else len(ref), n))


# ---------------------------------------------------------------- tables
def render(paths: Sequence[str]) -> str:
    return render_runs(*find_runs(paths))[0]


def render_runs(runs: List[Dict], skipped: List[str]) -> Tuple[str, List[str]]:
    """``(markdown, skipped)``; ``ZeroflowError`` when there is no finished run at all."""
    if not runs:
        raise ZeroflowError("no finished run (metrics.json) found" + (": " + "; ".join(skipped) if skipped else ""))
    # runs not read by find_runs (zeroflow sweep's table, which reuses finished runs) get their
    # Fgt from the matrix too, on a copy
    runs = [m if "_stored_fgt" in m else _restated_fgt(m, os.path.join(m["_dir"], METRICS)) for m in runs]
    # the results version is compared as an option: runs of two versions are two rows
    versions = [results_version(m, os.path.join(m["_dir"], METRICS)) for m in runs]
    runs = [dict(m, config=dict(m["config"], results_version="unrecorded" if v is None else v))
            for m, v in zip(runs, versions)]
    rows = group_runs(runs)
    cols = distinguishing_columns(rows)
    datasets = _order({r.config["dataset"] for r in rows}, list(DATASETS))
    labels = row_labels(rows, cols)
    table_rows: Dict[tuple, Dict[str, Row]] = {}     # (method, optimizer, *column values) -> dataset -> row
    for r in rows:
        key = (r.config["method"], r.config["optimizer"]) + labels[id(r)]
        cell = table_rows.setdefault(key, {})
        if r.config["dataset"] in cell:      # row_labels makes the labels of one cell distinct
            raise AssertionError(f"report: two rows read {key} for {r.config['dataset']}")
        cell[r.config["dataset"]] = r
    order = sorted(table_rows, key=lambda k: (k[0], OPTIMIZERS.index(k[1]) if k[1] in OPTIMIZERS else 99, k[1:]))

    def table(title: str, columns: Sequence[str], cells_of) -> List[str]:
        """One line per row key, ``len(columns)`` cells per dataset from ``cells_of(row)``."""
        head = ["Method", "Optimizer"] + cols + [f"{d} {c}" for d in datasets for c in columns]
        lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for key in order:
            cells = []
            for d in datasets:
                r = table_rows[key].get(d)
                cells += cells_of(r) if r else ["-"] * len(columns)
            lines.append(f"| {key[0].upper()} | {key[1]} | " + " | ".join(list(key[2:]) + cells) + " |")
        return lines

    def accuracy(r: Row):
        return [_stat([m[k] for m in r.runs], ".2f") for k in ("avg", "last", "fgt")]

    def efficiency(r: Row):
        spi = [m.get("seconds_per_iteration") for m in r.runs]
        peaks = [_train_peak(m) for m in r.runs]
        return [_stat([v / 1e9 for v in peaks], ".2f") if None not in peaks else "-",
                _stat(spi, ".4f") if all(spi) else "-",
                _stat([m["forward_passes"] for m in r.runs], ".0f")]

    def gains(r: Row):
        if not all(m.get("avg_gain") is not None for m in r.runs):
            return ["-", "-"]
        return [_stat([m[k] for m in r.runs], ".2f", signed=True) for k in ("avg_gain", "last_gain")]

    out = table("### Accuracy (Table 1 style): Avg / Last / Fgt (%)", ("Avg", "Last", "Fgt"), accuracy)
    if any(m.get("avg_gain") is not None for m in runs):
        out += [""] + table("### What training added: Avg / Last minus those of untrained adapters (percentage "
                            "points; `--baseline untrained`)", ("Avg gain", "Last gain"), gains)
    out += [""] + table("### Efficiency (Table 2 style): peak memory of training (GB) / seconds per iteration / "
                        "training forward passes", ("Mem GB", "s/iter", "queries"), efficiency)
    kinds = sorted({m.get("peak_memory_kind", "?") for m in runs})
    out += [""]
    if any(r.aggregated for r in rows):
        out += ["Cells with ± are mean ± sample standard deviation over the seeds listed."]
    restated = [m["_dir"] for m in runs if m.get("_stored_fgt", m["fgt"]) != m["fgt"]]
    if restated:
        out += ["Fgt recomputed from the accuracy matrix (PILOT's Fgt, the best accuracy over all stages, the last "
                "included) for runs that stored the older value (the last stage left out of the best): "
                + ", ".join(restated)]
    whole_task = [m["_dir"] for m in runs if "train_peak_memory_bytes" not in m]
    if whole_task:
        out += ["Mem GB of runs written before the training peak was recorded (2026-12-02) is their whole-task "
                "peak (training, prototypes and tests): " + ", ".join(whole_task)]
    for v in sorted({v for v in versions if v not in (None, RESULTS_VERSION)}):
        out += [f"Computed by {describe_results_version(v)}, not this zeroflow's "
                f"{describe_results_version(RESULTS_VERSION)}; never averaged with other versions' runs: "
                + ", ".join(m["_dir"] for m, w in zip(runs, versions) if w == v)]
    if None in versions:
        out += [f"results_version 'unrecorded' (never averaged with runs that record one): the run's metrics.json "
                f"records {UNRECORDED}: " + ", ".join(m["_dir"] for m, w in zip(runs, versions) if w is None)]
    if "cpu_peak_rss" in kinds:
        out += ["cpu_peak_rss is the process's running peak (never reset): a CPU run's training peak includes the "
                "earlier tasks' prototype and test passes; only CUDA peaks are per phase."]
    out += [f"Memory: {', '.join(kinds)}. Runs: " + ", ".join(m["_dir"] for m in runs), ""]
    return "\n".join(out), skipped
