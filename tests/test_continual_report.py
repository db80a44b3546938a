"""zeroflow report (issue 10): runs are found recursively, unfinished or damaged ones are skipped
with their file and reason, and different runs are never merged into one cell."""
import json
import os

import pytest

from zeroflow.continual.defaults import resolve
from zeroflow.continual.errors import ZeroflowError
from zeroflow.continual.report import find_runs, render, render_runs
from zeroflow.continual.runfolder import RunFolder


def write_run(folder, avg, **config):
    """A finished run folder holding a minimal metrics.json (what the report reads)."""
    os.makedirs(folder, exist_ok=True)
    cfg = dict(method="ease", optimizer="zo_adam", dataset="digits", seed=1993, epochs=10, lr=0.005) | config
    with open(os.path.join(folder, "metrics.json"), "w") as f:
        json.dump({"avg": avg, "last": avg - 10, "fgt": 5.0, "peak_memory_bytes": 1e9, "forward_passes": 900,
                   "seconds_per_iteration": 0.01, "peak_memory_kind": "cpu_peak_rss", "config": cfg}, f)
    return str(folder)


def table1(text):
    """The Table-1 lines (header and rows) of a report."""
    block = text.split("### Efficiency")[0]
    return [line for line in block.splitlines() if line.startswith("| ")]


def test_runs_of_one_cell_with_other_options_get_rows_of_their_own(tmp_path):
    a = write_run(tmp_path / "a", 80.0, epochs=10)
    b = write_run(tmp_path / "b", 60.0, epochs=1, lr=0.5)
    for order in ([a, b], [b, a]):
        rows = table1(render(order))
        assert rows[0] == "| Method | Optimizer | epochs | lr | digits Avg | digits Last | digits Fgt |"
        assert "| EASE | zo_adam | 1 | 0.5 | 60.00 | 50.00 | 5.00 |" in rows
        assert "| EASE | zo_adam | 10 | 0.005 | 80.00 | 70.00 | 5.00 |" in rows
        assert len(rows) == 3             # the header and one row per run


def test_seeds_of_one_configuration_are_mean_and_std(tmp_path):
    runs = [write_run(tmp_path / f"s{s}", avg, seed=s) for s, avg in ((1, 80.0), (2, 82.0), (3, 84.0))]
    text = render([str(tmp_path)])
    rows = table1(text)
    assert rows[0].startswith("| Method | Optimizer | seed | digits Avg |")
    assert rows[1] == "| EASE | zo_adam | 1, 2, 3 | 82.00 ± 2.00 | 72.00 ± 2.00 | 5.00 ± 0.00 |"
    assert "mean ± sample standard deviation" in text
    assert all(r in text for r in runs)
    # another configuration in the same cell is not averaged in: its own row
    write_run(tmp_path / "other", 10.0, seed=4, epochs=1)
    rows = table1(render([str(tmp_path)]))
    assert rows[0].startswith("| Method | Optimizer | seed | epochs | digits Avg |")
    assert "| EASE | zo_adam | 1, 2, 3 | 10 | 82.00 ± 2.00 | 72.00 ± 2.00 | 5.00 ± 0.00 |" in rows
    assert "| EASE | zo_adam | 4 | 1 | 10.00 | 0.00 | 5.00 |" in rows
    assert len(rows) == 3


def test_the_same_run_twice_is_two_rows_not_two_seeds(tmp_path):
    write_run(tmp_path / "x", 80.0)
    write_run(tmp_path / "y", 81.0)
    rows = table1(render([str(tmp_path)]))
    assert rows[0] == "| Method | Optimizer | run | digits Avg | digits Last | digits Fgt |"
    assert f"| EASE | zo_adam | {tmp_path / 'x'} | 80.00 | 70.00 | 5.00 |" in rows
    assert f"| EASE | zo_adam | {tmp_path / 'y'} | 81.00 | 71.00 | 5.00 |" in rows
    # one folder reached twice is one run
    assert len(find_runs([str(tmp_path), str(tmp_path / "x")])[0]) == 2


def test_different_datasets_share_a_row(tmp_path):
    write_run(tmp_path / "d", 80.0)
    write_run(tmp_path / "c", 70.0, dataset="cifar100")
    rows = table1(render([str(tmp_path)]))
    assert rows == ["| Method | Optimizer | digits Avg | digits Last | digits Fgt | cifar100 Avg | cifar100 Last | "
                    "cifar100 Fgt |", "| EASE | zo_adam | 80.00 | 70.00 | 5.00 | 70.00 | 60.00 | 5.00 |"]


def test_recursive_search_skips_unfinished_and_corrupt_runs_with_a_reason(tmp_path):
    good = write_run(tmp_path / "sweep_1" / "ease_zo_adam_digits", 80.0)
    unfinished = tmp_path / "sweep_1" / "ease_zo_sgd_digits"
    unfinished.mkdir()
    (unfinished / "config.json").write_text(json.dumps(resolve({})))
    bad = {"truncated": '{"avg": 1,', "empty": "{}", "list": "[1, 2]",
           "nan": json.dumps({"avg": "x", "last": 1, "fgt": 1, "forward_passes": 1, "peak_memory_bytes": 1,
                              "config": {"method": "ease", "optimizer": "zo_sgd", "dataset": "digits"}})}
    for name, text in bad.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(text)
    (tmp_path / "not_a_run").mkdir()                        # no run file at all: not mentioned
    runs, skipped = find_runs([str(tmp_path)])
    assert [m["_dir"] for m in runs] == [good]
    assert len(skipped) == 5
    reasons = dict(zip(sorted(bad), sorted(s for s in skipped if "metrics.json:" in s)))
    assert "JSONDecodeError" in reasons["truncated"]
    assert str(tmp_path / "truncated" / "metrics.json") in reasons["truncated"]
    assert "no config, avg" in reasons["empty"]
    assert "not a mapping" in reasons["list"]
    assert "not a finite number: avg" in reasons["nan"]
    assert [s for s in skipped if str(unfinished) in s][0].endswith(
        f"unfinished (no metrics.json; continue it with zeroflow run --resume --out {unfinished})")
    assert "not_a_run" not in " ".join(skipped)
    text, _ = render_runs(runs, skipped)
    assert "| EASE | zo_adam | 80.00 |" in text


def test_a_run_in_progress_is_named_as_such(tmp_path):
    folder = RunFolder(str(tmp_path / "live")).claim(warn=print)
    try:
        (tmp_path / "live" / "config.json").write_text("{}")
        _, skipped = find_runs([str(tmp_path)])
        assert f"in progress: pid {os.getpid()}" in skipped[0]
    finally:
        folder.release()


def test_an_unfinished_run_on_a_filesystem_without_flock_is_skipped_not_a_traceback(tmp_path, monkeypatch):
    """zeroflow report asks an unfinished run's .lock whether a process holds it; where the
    filesystem has no flock (ENOLCK, e.g. NFS without a lock daemon) that OSError ended the
    report with a traceback. Guards: no holder can be named there, the run is skipped as unfinished."""
    import errno
    import fcntl

    def no_locks(*args):
        raise OSError(errno.ENOLCK, "No locks available")
    good = write_run(tmp_path / "done", 80.0)
    (tmp_path / "left").mkdir()
    (tmp_path / "left" / "config.json").write_text(json.dumps(resolve({})))
    (tmp_path / "left" / ".lock").write_text('{"pid": 1, "host": "h", "since": "then"}')
    monkeypatch.setattr(fcntl, "flock", no_locks)
    runs, skipped = find_runs([str(tmp_path)])
    assert [m["_dir"] for m in runs] == [good]
    assert skipped == [f"{tmp_path / 'left'}: unfinished (no metrics.json; continue it with zeroflow run --resume "
                       f"--out {tmp_path / 'left'})"]


def test_an_unfinished_run_that_resume_refuses_is_not_told_to_resume(tmp_path):
    """The report told every unfinished run to continue with zeroflow run --resume, also one
    that --resume refuses: a checkpoint.pt without its config.json, or a damaged config.json.
    Guards: those are named as not resumable, with the reason --resume would give."""
    from zeroflow.cli import main
    (tmp_path / "ckpt_only").mkdir()
    (tmp_path / "ckpt_only" / "checkpoint.pt").write_bytes(b"x")
    (tmp_path / "bad_config").mkdir()
    (tmp_path / "bad_config" / "config.json").write_text("{}")
    _, skipped = find_runs([str(tmp_path)])
    assert skipped == [
        f"{tmp_path / 'bad_config'}: unfinished and not resumable (no metrics.json; "
        f"{tmp_path / 'bad_config' / 'config.json'}: corrupt (the configuration has no method)); "
        "run it again in a new --out",
        f"{tmp_path / 'ckpt_only'}: unfinished and not resumable (no metrics.json; "
        f"{tmp_path / 'ckpt_only' / 'checkpoint.pt'} without config.json); run it again in a new --out"]
    for folder in ("ckpt_only", "bad_config"):       # what the old advice led to
        assert main(["run", "--resume", "--out", str(tmp_path / folder), "--no-progress"]) == 2


def test_a_run_linked_into_the_searched_folder_is_found_and_a_link_loop_ends(tmp_path):
    """zeroflow report searched with os.walk, which does not enter symbolic links: a run folder
    linked into a collection (runs/x -> /big/disk/run) was left out without a word, though
    given directly it is a run. Guards: links to folders are followed, no folder is entered
    twice (a link to a folder above ends), and a run reached twice counts once."""
    other = write_run(tmp_path / "elsewhere" / "run", 70.0)
    good = write_run(tmp_path / "runs" / "a", 80.0, seed=1)
    os.symlink(other, tmp_path / "runs" / "linked")
    os.symlink(tmp_path / "runs", tmp_path / "runs" / "loop")
    runs, skipped = find_runs([str(tmp_path / "runs")])
    assert sorted(m["_dir"] for m in runs) == [good, str(tmp_path / "runs" / "linked")] and not skipped
    # and a folder holding only a linked run is a parent of runs, as for zeroflow run --out (it would hide it)
    from zeroflow.continual.runfolder import run_below
    (tmp_path / "col").mkdir()
    os.symlink(other, tmp_path / "col" / "x")
    assert run_below(str(tmp_path / "col")) == str(tmp_path / "col" / "x")


def test_nothing_finished_is_an_error(tmp_path):
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "metrics.json").write_text("{}")
    with pytest.raises(ZeroflowError, match="no finished run.*metrics.json: corrupt"):
        render([str(tmp_path)])
    with pytest.raises(ZeroflowError, match="no such run folder"):
        render([str(tmp_path / "nope")])
    # a file among the paths (runs/* matching a saved report) is skipped, not fatal
    write_run(tmp_path / "ok", 80.0)
    (tmp_path / "report.md").write_text("old report")
    runs, skipped = find_runs([str(tmp_path / "ok"), str(tmp_path / "report.md"),
                               str(tmp_path / "ok" / "metrics.json")])
    assert len(runs) == 1 and skipped == [f"{tmp_path / 'report.md'}: not a run folder (a file)"]


def test_groups_that_differ_only_in_a_float_beyond_six_digits_are_two_rows(tmp_path):
    """Two multi-seed groups with lr 0.005 and 0.0050000001: ':g' shows both as 0.005, the
    ``run`` column read "mean of 2" twice, and one group's row overwrote the other's."""
    for s in (1, 2):
        write_run(tmp_path / f"a{s}", 80.0 + s, seed=s, lr=0.005)
        write_run(tmp_path / f"b{s}", 60.0 + s, seed=s, lr=0.0050000001)
    rows = table1(render([str(tmp_path)]))
    assert rows[0].startswith("| Method | Optimizer | seed | lr | digits Avg |")
    assert "| EASE | zo_adam | 1, 2 | 0.005 | 81.50 ± 0.71 | 71.50 ± 0.71 | 5.00 ± 0.00 |" in rows
    assert "| EASE | zo_adam | 1, 2 | 0.0050000001 | 61.50 ± 0.71 | 51.50 ± 0.71 | 5.00 ± 0.00 |" in rows
    assert len(rows) == 3


def test_an_option_null_in_one_run_and_absent_in_another_is_one_configuration(tmp_path):
    """As runfolder.config_differences: small_vit null == no small_vit (both the default)."""
    write_run(tmp_path / "s1", 80.0, seed=1)
    write_run(tmp_path / "s2", 82.0, seed=2, small_vit=None, model_kwargs=None, threads=None)
    write_run(tmp_path / "s3", 84.0, seed=3, hybrid_switch=None, epochs=10.0)   # 10.0 == 10
    rows = table1(render([str(tmp_path)]))
    assert rows[1:] == ["| EASE | zo_adam | 1, 2, 3 | 82.00 ± 2.00 | 72.00 ± 2.00 | 5.00 ± 0.00 |"]
    # the audit's case: the same two seeds in both groups are four runs, none of them hidden
    for s in (1, 2):
        write_run(tmp_path / f"t{s}", 50.0, seed=s, small_vit=None)
    text = render([str(tmp_path)])
    rows = table1(text)
    assert rows[0].startswith("| Method | Optimizer | seed | run | digits Avg |")
    for name in ("s1", "s2", "s3", "t1", "t2"):
        assert sum(f"| {tmp_path / name} |" in r for r in rows) == 1, name
    assert len(rows) == 6


def test_two_averaged_rows_that_read_the_same_list_their_folders(tmp_path):
    """Last guard: groups whose option values print alike (the string 'none' and null) are
    still two rows, the run cell naming the folders averaged."""
    from zeroflow.continual.report import distinguishing_columns, group_runs, row_labels
    for s in (1, 2):
        write_run(tmp_path / f"a{s}", 80.0, seed=s, backend="none")
        write_run(tmp_path / f"b{s}", 60.0, seed=s, backend=None)
    runs, _ = find_runs([str(tmp_path)])
    rows = group_runs(runs)
    assert len(rows) == 2 and all(r.aggregated for r in rows)
    cols = distinguishing_columns(rows)
    assert cols == ["seed", "backend", "run"]
    labels = sorted(row_labels(rows, cols).values())
    assert labels == [("1, 2", "none", f"mean of 2: {tmp_path / 'a1'}, {tmp_path / 'a2'}"),
                      ("1, 2", "none", f"mean of 2: {tmp_path / 'b1'}, {tmp_path / 'b2'}")]
    rows = table1(render([str(tmp_path)]))
    assert len(rows) == 3 and any("80.00 ± 0.00" in r for r in rows) and any("60.00 ± 0.00" in r for r in rows)


def test_fgt_is_recomputed_from_the_matrix_and_a_changed_value_is_named(tmp_path):
    """A run written when Fgt left the last stage out of the best (here -5: task 0 rose from
    80 to 85) reads PILOT's Fgt (0) in the table, and the report names it; a run whose stored
    value already agrees is not named; a matrix that cannot be read skips the run as corrupt."""
    old = write_run(tmp_path / "old", 80.0, seed=1)
    same = write_run(tmp_path / "same", 70.0, seed=2, epochs=1)
    bad = write_run(tmp_path / "bad", 60.0, seed=3, epochs=2)
    for folder, fgt, matrix in ((old, -5.0, [[80.0, 85.0], [None, 70.0]]),
                                (same, 10.0, [[80.0, 70.0], [None, 70.0]]),
                                (bad, 1.0, [[80.0, "x"], [None, 70.0]])):
        path = os.path.join(folder, "metrics.json")
        with open(path) as f:
            m = json.load(f) | {"fgt": fgt, "accuracy_matrix": matrix}
        with open(path, "w") as f:
            json.dump(m, f)
    runs, skipped = find_runs([str(tmp_path)])
    assert sorted(m["fgt"] for m in runs) == [0.0, 10.0]
    bad_json = os.path.join(bad, "metrics.json")
    assert len(skipped) == 1 and skipped[0].startswith(f"{bad_json}: corrupt (accuracy_matrix: ")
    text = render([str(tmp_path)])
    rows = table1(text)
    assert any(r.endswith("| 80.00 | 70.00 | 0.00 |") for r in rows), rows
    assert any(r.endswith("| 70.00 | 60.00 | 10.00 |") for r in rows), rows
    assert ("Fgt recomputed from the accuracy matrix (PILOT's Fgt, the best accuracy over all stages, the last "
            f"included) for runs that stored the older value (the last stage left out of the best): {old}\n") in text


def test_a_table_of_runs_given_directly_restates_their_fgt_too():
    """zeroflow sweep prints render_runs of the runs it ran or reused, not read by find_runs: a
    reused older run showed its stored Fgt there while zeroflow report showed PILOT's."""
    old = {"avg": 80.0, "last": 70.0, "fgt": -5.0, "accuracy_matrix": [[80.0, 85.0], [None, 70.0]],
           "peak_memory_bytes": 1e9, "forward_passes": 9, "_dir": "runs/old",
           "config": {"method": "ease", "optimizer": "zo_sgd", "dataset": "digits"}}
    text, _ = render_runs([old], [])
    assert any(r.endswith("| 80.00 | 70.00 | 0.00 |") for r in table1(text)), text
    assert "the last stage left out of the best): runs/old\n" in text
    assert old["fgt"] == -5.0 and "_stored_fgt" not in old          # the caller's dict is left as it was


def test_table_2_memory_is_the_training_peak_and_older_runs_are_named():
    cfg = {"method": "ease", "optimizer": "zo_sgd", "dataset": "digits"}
    new = {"avg": 80.0, "last": 70.0, "fgt": 0.0, "peak_memory_bytes": 3e9, "train_peak_memory_bytes": 1e9,
           "forward_passes": 9, "_dir": "runs/new", "config": cfg}
    old = dict(new, config=dict(cfg, optimizer="fo_sgd"), _dir="runs/old")
    del old["train_peak_memory_bytes"]
    text, _ = render_runs([new, old], [])
    assert "| EASE | zo_sgd | 1.00 |" in text and "| EASE | fo_sgd | 3.00 |" in text, text
    assert "is their whole-task peak (training, prototypes and tests): runs/old\n" in text


def test_table_2_shows_no_memory_for_a_run_that_trained_nothing():
    """A run with train_peak_memory_bytes null (--epochs 0: no step) has no training peak: its
    cell is "-", and it is not named as a run written before the peak was recorded (no entry)."""
    cfg = {"method": "ease", "optimizer": "zo_sgd", "dataset": "digits"}
    none = {"avg": 80.0, "last": 70.0, "fgt": 0.0, "peak_memory_bytes": 3e9, "train_peak_memory_bytes": None,
            "forward_passes": 0, "_dir": "runs/none", "config": cfg}
    text, _ = render_runs([none], [])
    assert "| EASE | zo_sgd | - | - | 0 |" in text, text
    assert "whole-task peak" not in text
    # over seeds: one seed without a training peak makes the cell "-", not a mean of the others
    seeds = [dict(none, config=dict(cfg, seed=1), _dir="runs/a"),
             dict(none, config=dict(cfg, seed=2), _dir="runs/b", train_peak_memory_bytes=1e9)]
    text, _ = render_runs(seeds, [])
    assert "| EASE | zo_sgd | 1, 2 | - | - | 0 ± 0 |" in text, text
    seeds = [dict(seeds[0], train_peak_memory_bytes=1e9), dict(seeds[1], train_peak_memory_bytes=None)]
    text, _ = render_runs(seeds, [])                # whichever seed lacks it
    assert "| EASE | zo_sgd | 1, 2 | - | - | 0 ± 0 |" in text, text


def test_the_gains_table_is_kept_when_only_some_runs_have_a_baseline():
    """Runs with `--baseline untrained` (the embedded digits) beside runs without one (real data,
    where it is off by default): the gains table shows the first and "-" for the others. Kept
    only when every run had a baseline, it vanished from such a report altogether."""
    base = {"avg": 80.0, "last": 70.0, "fgt": 0.0, "peak_memory_bytes": 1e9, "forward_passes": 9}
    with_gain = dict(base, avg_gain=2.0, last_gain=-1.0, _dir="runs/a",
                     config={"method": "ease", "optimizer": "zo_sgd", "dataset": "digits"})
    without = dict(base, _dir="runs/b", config={"method": "ease", "optimizer": "zo_sgd", "dataset": "cifar100"})
    text, _ = render_runs([with_gain, without], [])
    assert "### What training added" in text, text
    gains = text.split("### What training added")[1].split("###")[0]
    assert "| EASE | zo_sgd | +2.00 | -1.00 | - | - |" in gains


def test_a_null_or_half_baseline_gain_is_no_traceback(tmp_path):
    """load_metrics accepts avg_gain / last_gain null (a run without a baseline), and the report
    counted a run as having gains when the key was there at all: a null crashed it with a
    TypeError, and an avg_gain without last_gain with a KeyError. Guards: null gains are no
    gains ("-"), and one gain without the other is a damaged metrics.json, skipped with its reason."""
    def rewrite(folder, **keys):
        path = os.path.join(folder, "metrics.json")
        with open(path) as f:
            m = json.load(f)
        with open(path, "w") as f:
            json.dump(dict(m, **keys), f)

    a = write_run(tmp_path / "a", 80.0)
    rewrite(a, avg_gain=None, last_gain=None)
    text = render([a])
    assert "### What training added" not in text and "| EASE | zo_adam | 80.00 | 70.00 | 5.00 |" in text
    b = write_run(tmp_path / "b", 70.0, seed=2)
    rewrite(b, avg_gain=1.0)
    runs, skipped = find_runs([str(tmp_path)])
    assert [r["_dir"] for r in runs] == [a]
    assert skipped == [f"{os.path.join(b, 'metrics.json')}: corrupt (avg_gain without last_gain)"]


def test_a_digits_run_s_data_root_counts_at_its_default_beside_another_dataset():
    """Against a run of another dataset (``zeroflow run --dataset cifar100 --out DIR`` where DIR
    holds a digits run given --data-root /x), a digits run's data_root is its default, not absent:
    no 'data_root: None there, 'data' requested' beside the dataset that really differs."""
    from zeroflow.continual.runfolder import config_differences
    differences = config_differences(resolve({"data_root": "/x"}), resolve({"dataset": "cifar100"}))
    assert "dataset: 'digits' there, 'cifar100' requested" in differences
    assert not [d for d in differences if d.startswith("data_root")], differences


def test_a_digits_run_s_data_root_does_not_make_it_another_configuration():
    """The digits data ships with scikit-learn, so --data-root never acts on a digits run (it is
    ignored with a warning); a run given one was still another configuration: a sweep refused the
    folder of the same run ('data_root: 'data' there, '/x' requested'), and zeroflow report kept
    two seeds of one experiment apart in a data_root column. It counts at its default now (the
    real datasets' data_root is compared as before)."""
    from zeroflow.continual.runfolder import config_differences
    assert config_differences(resolve({}), resolve({"data_root": "/x"})) == []
    real = config_differences(resolve({"dataset": "cifar100"}), resolve({"dataset": "cifar100", "data_root": "/x"}))
    assert real == ["data_root: 'data' there, '/x' requested"]
    base = {"avg": 80.0, "last": 70.0, "fgt": 0.0, "peak_memory_bytes": 1e9, "forward_passes": 9}
    runs = [dict(base, _dir="runs/a", config=resolve({"seed": 1})),
            dict(base, _dir="runs/b", avg=82.0, config=resolve({"seed": 2, "data_root": "/x"}))]
    text, _ = render_runs(runs, [])
    assert "| EASE | zo_adam | 1, 2 | 81.00 ± 1.41 |" in text, text
    assert "data_root" not in text
