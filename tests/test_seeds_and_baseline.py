"""Seeds and error bars, and what training added (issue 12): --class-order-seed apart from
--seed, zeroflow sweep --seeds with mean ± std, --baseline untrained and its gains.

Runs are short: B5-Inc5 digits (2 tasks), 1 epoch per task, the small ViT pretrained for 1 epoch."""
import json
import os

import pytest

from zeroflow.cli import main
from zeroflow.continual.errors import ZeroflowError

QUICK = dict(epochs=1, pretrain_epochs=1, init_cls=5, increment=5)


def _run(out, **kw):
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import run
    return run(resolve(dict(QUICK, **kw)), str(out), progress=False, log=lambda *a: None)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, zf_cache):
    """The runs the tests below compare (each a few seconds)."""
    base = tmp_path_factory.mktemp("runs")
    return {name: _run(base / name, **kw) for name, kw in {
        "default": dict(optimizer="zo_sgd"),                                   # baseline on (digits default)
        "no_baseline": dict(optimizer="zo_sgd", baseline="none"),
        "seed": dict(optimizer="zo_sgd", seed=5, baseline="none"),
        "order": dict(optimizer="zo_sgd", class_order_seed=7, baseline="none"),
        "untrained": dict(optimizer="zo_sgd", epochs=0, baseline="none"),
        "one_step": dict(optimizer="zo_sgd", batch_size=4096, baseline="none"),    # one batch per task
    }.items()}


# ---------------------------------------------------------------- class order vs seed
def test_class_order_follows_class_order_seed_not_seed(runs):
    from zeroflow.continual.data import class_order
    assert runs["default"]["class_order"] == class_order(10, 1993) == [4, 2, 7, 6, 0, 3, 5, 8, 9, 1]
    assert runs["seed"]["class_order"] == runs["default"]["class_order"]        # --seed alone: same order
    assert runs["seed"]["accuracy_matrix"] != runs["default"]["accuracy_matrix"]  # ... other training
    assert runs["order"]["class_order"] == class_order(10, 7) != runs["default"]["class_order"]
    assert runs["order"]["config"]["class_order_seed"] == 7 and runs["order"]["config"]["seed"] == 1993


def test_class_order_seed_is_checked():
    from zeroflow.continual.defaults import resolve
    with pytest.raises(ZeroflowError, match=r"--class-order-seed must be in \[0, 2147483647\] \(got -1\)"):
        resolve({"class_order_seed": -1})


# ---------------------------------------------------------------- --baseline untrained
def test_baseline_gains_are_trained_minus_untrained_of_the_same_run(runs):
    m = runs["default"]
    b = m["baseline"]
    assert m["config"]["baseline"] == "untrained" and b["kind"] == "untrained"
    assert m["avg_gain"] == m["avg"] - b["avg"] and m["last_gain"] == m["last"] - b["last"]
    # the baseline is the same protocol with untrained adapters: an --epochs 0 run of it
    u = runs["untrained"]
    for k in ("avg", "last", "fgt", "accuracy_matrix", "accuracy_curve"):
        assert b[k] == u[k], k
    # ... and computing it changes nothing of the trained run
    n = runs["no_baseline"]
    assert "baseline" not in n and "avg_gain" not in n
    for k in ("avg", "last", "fgt", "accuracy_matrix", "forward_passes", "iterations"):
        assert m[k] == n[k], k
    with open(os.path.join(m["run_dir"], "metrics.json")) as f:
        saved = json.load(f)
    assert (saved["avg_gain"], saved["last_gain"]) == (m["avg_gain"], m["last_gain"])


def test_a_run_that_trains_nothing_records_no_training_memory(runs):
    """--epochs 0 takes no step: no task has a training peak (null, as APER's later tasks), so
    Table 2 shows none. It recorded the process's peak RSS so far as its training memory, and
    zeroflow report showed it under "peak memory of training" for a run that trained nothing."""
    from zeroflow.continual.report import render_runs
    u = runs["untrained"]
    assert u["forward_passes"] == u["iterations"] == 0
    assert [t["train_peak_memory_bytes"] for t in u["tasks"]] == [None, None]
    assert u["train_peak_memory_bytes"] is None and u["peak_memory_bytes"] > 0
    text, _ = render_runs([dict(u, _dir="runs/untrained")], [])
    assert "| EASE | zo_sgd | - | - | 0 |" in text.split("### Efficiency")[1], text
    assert "whole-task peak" not in text        # not taken for a run written before the peak was recorded


def test_a_task_of_one_step_records_its_training_memory(runs):
    """A task whose loop took one step (a batch as large as its data) trained: it records its
    training peak, as a longer one does; only a loop of no step records none."""
    one = runs["one_step"]
    assert one["iterations"] == len(one["tasks"]) == 2         # one step per task
    assert None not in [t["train_peak_memory_bytes"] for t in one["tasks"]]
    assert one["train_peak_memory_bytes"] is not None


def test_the_accuracy_plot_shows_both_curves(runs, monkeypatch):
    from zeroflow.continual import runner
    labels = []
    monkeypatch.setattr(runner, "_atomic_fig", lambda fig, path: labels.append(
        [line.get_label() for ax in fig.axes for line in ax.get_lines()]))
    runner.plot_results(runs["default"]["run_dir"], runs["default"])
    assert {"all seen classes", "all seen classes, untrained adapters"} <= set(labels[0])
    labels.clear()
    runner.plot_results(runs["no_baseline"]["run_dir"], runs["no_baseline"])
    assert "all seen classes, untrained adapters" not in labels[0]


def test_baseline_is_on_for_the_embedded_data_only():
    from zeroflow.continual.defaults import defaults_for
    assert defaults_for("digits", "ease")["baseline"] == defaults_for("digits", "aper")["baseline"] == "untrained"
    assert {defaults_for(d, m)["baseline"] for d in ("cifar100", "cub", "imagenet-a", "omnibenchmark")
            for m in ("ease", "aper")} == {"none"}


# ---------------------------------------------------------------- sweeps over seeds and the report
def _write_run(folder, seed, avg, last, avg_gain=None, **config):
    os.makedirs(folder)
    cfg = dict(method="ease", optimizer="zo_adam", dataset="digits", seed=seed, epochs=10) | config
    m = {"avg": avg, "last": last, "fgt": 5.0, "peak_memory_bytes": 1e9, "forward_passes": 900,
         "seconds_per_iteration": 0.01, "peak_memory_kind": "cpu_peak_rss", "config": cfg}
    if avg_gain is not None:
        m |= {"avg_gain": avg_gain, "last_gain": avg_gain - 1, "baseline": {"avg": avg - avg_gain}}
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump(m, f)


def test_report_aggregates_seeds_with_mean_and_std_and_the_gains(tmp_path):
    from zeroflow.continual.report import render
    for seed, avg, last, gain in ((1993, 80.0, 70.0, 1.0), (1, 84.0, 72.0, 3.0), (2, 88.0, 77.0, 5.0)):
        _write_run(tmp_path / "sweep" / f"ease_zo_adam_digits_seed{seed}", seed, avg, last, gain)
    # another class order is another experiment: its own row, not a fourth seed
    _write_run(tmp_path / "sweep" / "order7", 3, 60.0, 50.0, 0.0, class_order_seed=7)
    text = render([str(tmp_path)])
    # mean 84, sample std 4; Last 73 ± 3.61; gains 3 ± 2 and 2 ± 2
    assert "| EASE | zo_adam | 1, 1993, 2 | 1993 | 84.00 ± 4.00 | 73.00 ± 3.61 | 5.00 ± 0.00 |" in text
    assert "| EASE | zo_adam | 3 | 7 | 60.00 | 50.00 | 5.00 |" in text
    gains = text.split("### What training added")[1].split("###")[0]
    assert "| EASE | zo_adam | 1, 1993, 2 | 1993 | +3.00 ± 2.00 | +2.00 ± 2.00 |" in gains
    assert "| EASE | zo_adam | 3 | 7 | +0.00 | -1.00 |" in gains
    assert "mean ± sample standard deviation over the seeds listed" in text


@pytest.mark.parametrize("args,needle", [
    (["--seeds", "1,x"], "--seeds '1,x': 'x' is not an integer"),
    (["--seeds", "1,1"], "--seeds lists 1 more than once"),
    (["--seeds", "1", "--seed", "2"], "--seed and --seeds both given"),
    (["--seeds", "-3"], "--seeds: -3 is not in [0, 2147483647]"),
])
def test_sweep_seeds_are_checked_before_anything_runs(tmp_path, capsys, args, needle):
    assert main(["sweep", "--optimizers", "zo_sgd", "--out", str(tmp_path / "s"), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "s").exists()


def test_sweep_over_seeds_runs_each_seed_and_reports_mean_and_std(tmp_path, capsys, zf_cache):
    cfg = tmp_path / "quick.yaml"
    cfg.write_text("".join(f"{k}: {v}\n" for k, v in QUICK.items()) + "baseline: none\n")
    out = tmp_path / "s"
    assert main(["sweep", "--optimizers", "zo_sgd", "--seeds", "1993,1", "--config", str(cfg), "--out", str(out),
                 "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert sorted(os.listdir(out)) == ["ease_zo_sgd_digits_seed1", "ease_zo_sgd_digits_seed1993"]
    seeds = [json.loads((out / d / "metrics.json").read_text())["config"]["seed"] for d in sorted(os.listdir(out))]
    assert seeds == [1, 1993]
    assert "| EASE | zo_sgd | 1, 1993 | " in printed and " ± " in printed
