"""The zeroflow CLI: light import, bad inputs, config files, report."""
import io
import json
import os
import subprocess
import sys

import pytest

from zeroflow.cli import main
from zeroflow.continual.errors import ZeroflowError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "python"), ROOT]))


def test_cli_import_is_light():
    code = "import sys, zeroflow.cli; print(any(m in sys.modules for m in ('timm', 'torch', 'sklearn')))"
    out = subprocess.run([sys.executable, "-c", code], env=ENV, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_python_m_help():
    out = subprocess.run([sys.executable, "-m", "zeroflow", "run", "--help"], env=ENV, capture_output=True,
                         text=True, check=True)
    for flag in ("--method", "--optimizer", "--dataset", "--data-root", "--epochs", "--lr", "--batch-size", "--q",
                 "--zo-eps", "--perturbation", "--sparsity", "--history", "--hybrid-switch", "--seed", "--device",
                 "--backend", "--checkpoint", "--config", "--out", "--resume", "--download"):
        assert flag in out.stdout, flag


@pytest.mark.parametrize("args,needle", [
    (["--dataset", "mnist"], "unknown dataset 'mnist'; valid: digits, cifar100, cub, imagenet-a, omnibenchmark"),
    (["--method", "l2p"], "unknown method 'l2p'; valid: ease, aper"),
    (["--optimizer", "zo_lion"], "valid: zo_sgd, zo_sgd_sign, zo_sgd_conserve, zo_adam"),
    (["--perturbation", "uniform"], "valid: gaussian, rademacher"),
    (["--sparsity", "1.5"], "--sparsity"),
])
def test_bad_names(args, needle, tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path / "r"), *args]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_missing_data_root(tmp_path, capsys):
    for ds, needle in (("cifar100", "cifar-100-python"), ("cub", "cub/train")):
        assert main(["run", "--dataset", ds, "--data-root", str(tmp_path / "nodata"), "--out",
                     str(tmp_path / ds)]) == 2
        err = capsys.readouterr().err
        assert needle in err and "--data-root" in err
        assert not (tmp_path / ds / "metrics.json").exists()


def test_missing_backbone_checkpoint(tmp_path, capsys):
    from PIL import Image
    import numpy as np
    for split in ("train", "test"):
        for c in range(2):
            d = tmp_path / "data" / "cub" / split / f"c{c}"
            d.mkdir(parents=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(d / "0.png")
    assert main(["run", "--dataset", "cub", "--data-root", str(tmp_path / "data"), "--init-cls", "2",
                 "--increment", "2", "--checkpoint", str(tmp_path / "nope.safetensors"),
                 "--out", str(tmp_path / "r")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_config_file_and_unknown_key(tmp_path):
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.errors import ZeroflowError
    p = tmp_path / "c.yaml"
    p.write_text("method: aper\nepochs: 3\nlr: 0.5\n")
    cfg = resolve({"epochs": 4}, str(p))
    assert (cfg["method"], cfg["epochs"], cfg["lr"]) == ("aper", 4, 0.5)   # flags beat the file
    p.write_text("epoch: 3\n")
    with pytest.raises(ZeroflowError, match="unknown option"):
        resolve({}, str(p))


def test_shipped_configs_match_defaults():
    import yaml
    from zeroflow.continual.defaults import DATASETS, METHODS, defaults_for
    for ds in DATASETS:
        for me in METHODS:
            path = os.path.join(ROOT, "configs", f"{me}_{ds}.yaml")
            with open(path) as f:
                data = yaml.safe_load(f)
            assert data == defaults_for(ds, me), path


def test_report_tables(tmp_path, capsys):
    for opt, avg in (("zo_sgd", 80.0), ("fo_sgd", 90.0)):
        d = tmp_path / opt
        d.mkdir()
        (d / "metrics.json").write_text(json.dumps({
            "avg": avg, "last": avg - 10, "fgt": 5.0, "accuracy_matrix": [[avg, avg - 5], [None, avg - 10]],
            "peak_memory_bytes": 2e9,
            "forward_passes": 100, "seconds": 1.0, "seconds_per_iteration": 0.01,
            "config": {"method": "ease", "optimizer": opt, "dataset": "cifar100"}}))
    (tmp_path / "unfinished").mkdir()
    assert main(["report", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "| EASE | zo_sgd | 80.00 | 70.00 | 5.00 |" in out
    assert "| EASE | fo_sgd | 90.00 | 80.00 | 5.00 |" in out
    assert "| EASE | zo_sgd | 2.00 | 0.0100 | 100 |" in out
    assert out.index("zo_sgd") < out.index("fo_sgd")
    assert main(["report", str(tmp_path / "unfinished")]) == 2


# ---------------------------------------------------------------- option checks (issue 10)
@pytest.mark.parametrize("text,needle", [
    ("epochs: ten\n", "epochs in {path} must be an integer (got 'ten')"),
    ("epochs: [1\n", "{path}: cannot parse it: line 2, column 1: expected ',' or ']'"),
    ("lr: {sgd: 0.1}\n", "lr in {path} has no 'adam' entry, which --optimizer zo_adam uses"),
    ("lr: {sgd: 0.1, adma: 1}\n", "lr in {path}: unknown key(s) adma"),
    ("1: 2\n", "{path}: option names must be strings"),
    ("- epochs\n", "{path}: expected a mapping of option: value, got a list"),
    ("history: 1.0\n", "history in {path} must be in [0, 1)"),
    ("record: yes please\n", "record in {path} must be true or false"),
    # small_vit: checked with the other options, not a timm traceback after the folder was claimed
    ("small_vit: {embed_dim: 30, num_heads: 4}\n", "small_vit in {path}: embed_dim 30 is not divisible by "
                                                    "num_heads 4"),
    ("small_vit: {foo: 1}\n", "small_vit in {path}: unknown key(s) foo; small_vit may set patch_size, embed_dim, "
                               "depth, num_heads, mlp_ratio"),
    ("small_vit: {patch_size: 3}\n", "small_vit in {path}: patch_size 3 does not tile the 8x8 images of digits"),
    ("small_vit: {depth: 0}\n", "small_vit in {path}: depth must be >= 1 (got 0)"),
    ("small_vit: {mlp_ratio: fast}\n", "small_vit in {path}: mlp_ratio must be a number (got 'fast')"),
    ("small_vit: 4\n", "small_vit in {path} must be a mapping"),
])
def test_config_file_values_are_checked(tmp_path, text, needle):
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.errors import ZeroflowError
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ZeroflowError) as e:
        resolve({}, str(p))
    assert needle.format(path=p) in str(e.value)
    assert "\n" not in str(e.value)                  # one line, also for YAML syntax errors


@pytest.mark.parametrize("dataset,method,optimizer,lr", [
    # the ZO SGD family's one-query estimate is ~sqrt(d) times the gradient: at the learners'
    # first-order rate (EASE CIFAR 0.025, the default before) a ZO-SGD step moved the adapters
    # hundreds of times further than an SGD step; the reference ZO code ran ZO-SGD at 1e-4
    ("cifar100", "ease", "zo_sgd", 1e-4), ("cifar100", "ease", "zo_sgd_conserve", 1e-4),
    ("cifar100", "ease", "forward_grad", 1e-4), ("cifar100", "ease", "fo_sgd", 0.025),
    ("cub", "aper", "zo_sgd", 1e-4), ("cub", "aper", "fo_sgd", 0.01), ("cub", "aper", "zo_sgd_sign", 1e-3),
    ("imagenet-a", "ease", "zo_adam", 1e-3), ("digits", "ease", "zo_sgd", 0.05)])     # digits: no zo_sgd entry
def test_the_zo_sgd_family_has_its_own_default_rate_on_real_data(dataset, method, optimizer, lr):
    from zeroflow.continual.defaults import resolve
    assert resolve({"dataset": dataset, "method": method, "optimizer": optimizer})["lr"] == lr


def test_an_lr_mapping_without_zo_sgd_gives_the_zo_sgd_family_its_sgd_rate(tmp_path):
    from zeroflow.continual.defaults import resolve
    p = tmp_path / "c.yaml"
    p.write_text("dataset: cifar100\nlr: {sgd: 0.2, adam: 0.003}\n")
    assert [resolve({"optimizer": o}, str(p))["lr"] for o in ("zo_sgd", "fo_sgd", "zo_adam")] == [0.2, 0.2, 0.003]
    p.write_text("dataset: cifar100\nlr: {zo_sgd: 0.2}\n")
    with pytest.raises(Exception, match="has no 'sgd' entry, which --optimizer fo_sgd uses"):
        resolve({"optimizer": "fo_sgd"}, str(p))


def test_a_bad_small_vit_is_one_line_and_no_folder(tmp_path, capsys):
    from zeroflow.continual.defaults import resolve
    p = tmp_path / "c.yaml"
    p.write_text("small_vit: {embed_dim: 30, num_heads: 4}\n")
    assert main(["run", "--config", str(p), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err == f"zeroflow: error: small_vit in {p}: embed_dim 30 is not divisible by num_heads 4 (every " \
                  f"attention head takes embed_dim / num_heads dimensions)\n"
    assert not (tmp_path / "r").exists()
    p.write_text("small_vit: {embed_dim: '32', depth: 2}\n")
    assert resolve({}, str(p))["small_vit"] == {"embed_dim": 32, "depth": 2}     # a good one is kept


def test_config_numbers_given_as_strings_are_read():
    """YAML reads 1e-3 (no dot) as a string; a number is still a number."""
    from zeroflow.continual.defaults import resolve
    cfg = resolve({"lr": "1e-3", "epochs": "3", "zo_eps": 1})
    assert (cfg["lr"], cfg["epochs"], cfg["zo_eps"]) == (1e-3, 3, 1.0)
    assert isinstance(cfg["zo_eps"], float)


def test_sign_sgd_takes_the_adam_rate():
    """A sign step moves every coordinate by lr, like Adam: the SGD rate (0.05 on digits)
    left zo_sgd_sign near chance (Avg 42.8); the Adam rate 0.005 gives Avg 86.0."""
    from zeroflow.continual.defaults import resolve
    assert resolve({"optimizer": "zo_sgd_sign"})["lr"] == resolve({"optimizer": "zo_adam"})["lr"] == 0.005
    assert resolve({"optimizer": "zo_sgd"})["lr"] == resolve({"optimizer": "zo_sgd_conserve"})["lr"] == 0.05
    assert resolve({"optimizer": "zo_sgd_sign", "dataset": "cifar100"})["lr"] == 1e-3


def test_version_and_defaults_in_help():
    from zeroflow import __version__
    out = subprocess.run([sys.executable, "-m", "zeroflow", "--version"], env=ENV, capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == f"zeroflow {__version__}"
    out = subprocess.run([sys.executable, "-m", "zeroflow", "run", "--help"], env=ENV, capture_output=True, text=True,
                         check=True)
    text = " ".join(out.stdout.split())          # argparse wraps lines
    for needle in ("ZO queries per step (default: 1)", "(default: zo_adam)", "(default: digits)",
                   "(default: 10 on digits; see configs/<method>_<dataset>.yaml)", "(default: sgd 0.05, adam 0.005 "
                   "on digits", "--hybrid-switch HYBRID_SWITCH hybrid FO->ZO: FO steps per task before switching to "
                   "ZO (default: off)", "--record", "--force"):
        assert needle in text, needle


def test_sweep_help_says_what_force_does_in_a_sweep():
    """zeroflow sweep --help described --force as zeroflow run's ("replace a run (finished or not)
    that the output folder already holds"), but a sweep keeps a run of the same configuration,
    --force or not: it reuses a finished one and resumes an unfinished one (docs/continual.md)."""
    out = subprocess.run([sys.executable, "-m", "zeroflow", "sweep", "--help"], env=ENV, capture_output=True,
                         text=True, check=True)
    text = " ".join(out.stdout.split())          # argparse wraps lines
    assert "replace a run (finished or not)" not in text
    assert ("--force replace what an optimizer's folder holds when it is not a run of the same configuration: a run "
            "of another configuration, a damaged one, or a finished one of another results version; a run of the "
            "same configuration is kept, --force or not (reused if finished, resumed if not)") in text
    out = subprocess.run([sys.executable, "-m", "zeroflow", "run", "--help"], env=ENV, capture_output=True, text=True,
                         check=True)
    assert "--force replace a run (finished or not) that the output folder already holds" in " ".join(
        out.stdout.split())


def write_finished_run(folder) -> None:
    """A finished run's ``metrics.json`` in ``folder``: what ``zeroflow report`` tabulates."""
    (folder / "metrics.json").write_text(json.dumps({
        "avg": 80.0, "last": 70.0, "fgt": 5.0, "peak_memory_bytes": 2e9, "forward_passes": 100,
        "seconds_per_iteration": 0.01, "config": {"method": "ease", "optimizer": "zo_sgd", "dataset": "digits"}}))


def test_report_cli_prints_skipped_runs_and_writes_output_by_umask(tmp_path, capsys):
    d = tmp_path / "ok"
    d.mkdir()
    write_finished_run(d)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.json").write_text('{"avg": 1,')
    old = os.umask(0o022)
    try:
        assert main(["report", str(tmp_path), "--output", str(tmp_path / "r.md")]) == 0
    finally:
        os.umask(old)
    out = capsys.readouterr()
    assert f"zeroflow: skipped {tmp_path / 'bad' / 'metrics.json'}: corrupt (JSONDecodeError" in out.err
    assert "| EASE | zo_sgd | 80.00 | 70.00 | 5.00 |" in out.out
    assert (tmp_path / "r.md").read_text() + "\n" == out.out       # the same markdown as printed
    assert oct(os.stat(tmp_path / "r.md").st_mode & 0o777) == oct(0o644)


def test_readme_optimizer_snippet_runs():
    """The README's "Using the optimizers" block, executed as written."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    block = readme.split("## Using the optimizers", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    assert scope["opt"].forward_passes == 5 and float(scope["loss"]) > 0   # conserve, two-sided: 2 + 3


def test_a_hybrid_run_of_the_zo_sgd_family_takes_the_sgd_rate_for_its_first_order_phase():
    # one lr serves a hybrid's FO phase first (and its ZO phase, times zo_lr_scale): with the
    # zo_sgd entry a --hybrid-switch run trained its FO steps at 1e-4
    from zeroflow.continual.defaults import resolve
    for hs, lr in ((None, 1e-4), (0, 1e-4), (5, 0.025), ("5", 0.025)):
        cfg = resolve({"dataset": "cifar100", "method": "ease", "optimizer": "zo_sgd", "hybrid_switch": hs})
        assert cfg["lr"] == lr, (hs, cfg["lr"])


def test_download_reaches_the_run_configuration(tmp_path, monkeypatch):
    """--download is not one of the RUN_FLAGS: dropped from the overrides, a CIFAR-100 run
    never fetched the data it was told to (docs/continual.md: `--download` fetches it)."""
    import zeroflow.continual.runner as runner
    seen = []

    def fake_run(cfg, out, **kw):
        seen.append(cfg)
        return {"stopped_after": 0}

    monkeypatch.setattr(runner, "run", fake_run)
    for flags, want in ((["--download"], True), ([], False)):
        assert main(["run", "--dataset", "cifar100", *flags, "--out", str(tmp_path / "r")]) == 0
        assert seen.pop()["download"] is want, flags


def test_report_output_that_is_a_folder_is_refused_before_the_runs_are_read(tmp_path, capsys):
    # a folder as --output used to read (and here: fail to find) every run first, then fail to write
    (tmp_path / "out").mkdir()
    (tmp_path / "runs").mkdir()              # nothing finished in it: reading the runs would fail
    assert main(["report", str(tmp_path / "runs"), "--output", str(tmp_path / "out")]) == 2
    assert f"cannot write {tmp_path / 'out'}: it is a folder" in capsys.readouterr().err
    assert os.listdir(tmp_path / "out") == []


def test_force_removes_the_run_files_and_the_old_trajectory_logs_only(tmp_path):
    """--force deletes that run's files (only those; docs/continual.md), the trajectory/ folder
    of --record included: left behind, the old logs sat beside a new run (without --record, or
    recording fewer tasks) as if they were its own."""
    from zeroflow.continual.runfolder import RUN_FILES, TRAJECTORY, remove_run_files
    for name in RUN_FILES:
        (tmp_path / name).write_bytes(b"old")
    (tmp_path / TRAJECTORY).mkdir()
    (tmp_path / TRAJECTORY / "task1.zft").write_bytes(b"old")
    (tmp_path / TRAJECTORY / "task1.base.pt").write_bytes(b"old")
    (tmp_path / "notes.txt").write_text("mine")
    remove_run_files(str(tmp_path))
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize("output", ["", "  ", "new/"])
def test_report_output_that_names_no_file_is_refused_before_the_runs_are_read(tmp_path, capsys, monkeypatch,
                                                                               output):
    """``--output ""`` (an unset shell variable) printed the tables and wrote no file, exit 0;
    ``--output new/`` read every run, then failed to write. Both refused first (exit 2)."""
    from zeroflow.continual import report
    monkeypatch.chdir(tmp_path)
    read = []
    monkeypatch.setattr(report, "find_runs", lambda paths: read.append(paths) or ([], []))
    assert main(["report", str(tmp_path), "--output", output]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zeroflow: error: ") and err.count("\n") == 1, err
    assert ("--output is empty" if not output.strip() else "new/report.md") in err, err
    assert read == [] and os.listdir(tmp_path) == []


def test_report_of_an_empty_path_says_so(tmp_path, capsys, monkeypatch):
    """``zeroflow report "$RUNS"`` with RUNS unset said "zeroflow: error: : no such run folder"."""
    monkeypatch.chdir(tmp_path)
    for path in ("", "  "):      # "$RUNS" unset, or " $RUNS"
        assert main(["report", path]) == 2
        err = capsys.readouterr().err
        assert err.startswith("zeroflow: error: a run folder path is empty") and err.count("\n") == 1


@pytest.mark.parametrize("cmd", ["run", "sweep"])
@pytest.mark.parametrize("out", ["", "  "])
def test_run_and_sweep_refuse_an_empty_out(cmd, out, tmp_path, capsys, monkeypatch):
    """``zeroflow run --out "$DIR"`` with DIR unset ran into a fresh runs/<time>_... folder (a
    sweep: runs/sweep_<time>) as if --out had been left out, so the results were not where the
    script looked for them. Refused first: exit 2, one line, nothing written."""
    monkeypatch.chdir(tmp_path)
    assert main([cmd, "--out", out, "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zeroflow: error: --out is empty (an unset shell variable?); give the ") \
        and err.count("\n") == 1, err
    assert os.listdir(tmp_path) == []


def test_run_resume_with_an_empty_out_names_the_empty_out(tmp_path, capsys, monkeypatch):
    """``zeroflow run --resume --out "$DIR"`` with DIR unset: --out was given, it is empty;
    the error says so (not "--resume needs --out", which reads as if --out were missing)."""
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--resume", "--out", "", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zeroflow: error: --out is empty (an unset shell variable?)"), err
    assert os.listdir(tmp_path) == []


def test_python_run_refuses_an_empty_out(tmp_path, monkeypatch):
    """The same for the Python API: ``run(cfg, out="")``."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.errors import ZeroflowError
    from zeroflow.continual.runner import run
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ZeroflowError, match="--out is empty"):
        run(resolve({}), "")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("optimizer,fo_lr,zo_lr", [
    ("zo_sgd", 0.025, 1e-4), ("zo_sgd_conserve", 0.025, 1e-4), ("forward_grad", 0.025, 1e-4),
    ("zo_sgd_sign", 0.025, 1e-3), ("zo_adam", 1e-3, 1e-3)])
def test_a_hybrid_run_steps_its_zo_phase_at_the_zo_methods_rate_not_the_fo_rate(optimizer, fo_lr, zo_lr):
    """docs/continual.md: a hybrid's FO phase takes its first-order twin's rate and its ZO phase the
    ZO method's own (the lr mapping's zo_sgd / adam entry). The ZO phase stepped at the FO rate
    (zo_lr_scale 1): ZO-SGD at 0.025 on CIFAR-100, 250x the rate the defaults give ZO-SGD, whose
    one-query estimate is ~sqrt(d) times the gradient; zo_sgd_sign's FO-SGD phase ran at the Adam rate."""
    import torch

    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.learners import make_optimizer
    from zeroflow.optim import train_step
    cfg = resolve({"dataset": "cifar100", "method": "ease", "optimizer": optimizer, "hybrid_switch": 1})
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(cfg, list(model.parameters()), model, seed=0)
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])

    def closure():
        return torch.nn.functional.cross_entropy(model(x), y)

    train_step(opt, closure)                            # the FO step
    assert opt.fo.param_groups[0]["lr"] == pytest.approx(fo_lr)
    train_step(opt, closure)                            # the first ZO step
    assert opt.zeroth_order and opt.zo.param_groups[0]["lr"] == pytest.approx(zo_lr)
    # a single --lr (no mapping) serves both phases, unless --hybrid-zo-lr says otherwise
    one = resolve({"dataset": "cifar100", "optimizer": optimizer, "hybrid_switch": 1, "lr": 0.01})
    assert one["lr"] == 0.01 and one["hybrid_zo_lr"] is None
    own = resolve({"dataset": "cifar100", "optimizer": optimizer, "hybrid_switch": 1, "lr": 0.01,
                   "hybrid_zo_lr": 2e-4})
    opt = make_optimizer(own, list(model.parameters()), model, seed=0)
    assert opt.param_groups[0]["lr"] == 0.01 and opt.zo.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_a_first_order_baseline_in_a_hybrid_sweep_records_no_zo_phase_rate():
    """A sweep gives --hybrid-switch to its fo_* baselines too, which have no ZO phase: their
    configuration (config.json) takes no rate for one from the lr mapping."""
    from zeroflow.continual.defaults import resolve
    for optimizer in ("fo_sgd", "fo_adam"):
        cfg = resolve({"dataset": "cifar100", "optimizer": optimizer, "hybrid_switch": 2})
        assert cfg["hybrid_zo_lr"] is None, optimizer


@pytest.mark.parametrize("over,needle", [
    ({"hybrid_zo_lr": 1e-4}, "no --hybrid-switch"),
    ({"hybrid_switch": 0, "hybrid_zo_lr": 1e-4}, "no --hybrid-switch"),     # 0: off, as None
    ({"hybrid_switch": 2, "lr": 0, "hybrid_zo_lr": 1e-4}, "--lr is 0 and --hybrid-zo-lr 0.0001"),
    ({"hybrid_switch": 2, "hybrid_zo_lr": -1}, "--hybrid-zo-lr must be >= 0")])
def test_a_hybrid_zo_lr_that_cannot_act_is_refused_before_the_run(over, needle):
    from zeroflow.continual.defaults import resolve
    with pytest.raises(ZeroflowError, match=needle):
        resolve(dict({"optimizer": "zo_sgd"}, **over))


@pytest.mark.parametrize("name", ["metrics.json", "checkpoint.pt", "config.json", "trajectory/task1.zft"])
def test_report_output_never_replaces_a_file_of_a_run(tmp_path, capsys, name):
    """``zeroflow report runs --output runs/r/metrics.json`` replaced the run's result with the
    markdown, without a word: the run was lost, and damaged for report, sweep and --resume."""
    run_dir = tmp_path / "runs" / "r"
    (run_dir / "trajectory").mkdir(parents=True)
    for f in ("config.json", "checkpoint.pt", "trajectory/task1.zft"):
        (run_dir / f).write_bytes(b"the run's")
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert main(["report", str(tmp_path / "runs"), "--output", str(run_dir / name)]) == 2
    err = capsys.readouterr().err
    assert f"it is a file of the run in {run_dir}" in err and str(tmp_path / "runs" / "report.md") in err, err
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name", ["notes/accuracy_matrix.csv", "notes/trajectory/report.md"])
def test_report_output_named_like_a_run_file_outside_any_run_is_written(tmp_path, capsys, name):
    """The refusal above is for the files of a run: a run file's name (one that does not make a
    folder a run, see below), or a trajectory folder, in a folder that holds no run is an
    ordinary place for the markdown."""
    d = tmp_path / "runs" / "ok"
    d.mkdir(parents=True)
    write_finished_run(d)
    out = tmp_path / name
    out.parent.mkdir(parents=True)
    assert main(["report", str(tmp_path / "runs"), "--output", str(out)]) == 0, capsys.readouterr().err
    assert "| EASE | zo_sgd |" in out.read_text()


@pytest.mark.parametrize("name", ["environment.json", "accuracy_matrix.csv", "backbone.pt"])
def test_report_output_named_like_a_run_file_that_marks_no_run_is_written_among_the_runs(tmp_path, capsys, name):
    """Only metrics.json, config.json and checkpoint.pt make a folder a run folder: the other
    files a run writes (environment.json, the accuracy matrix, ...) are ordinary names beside
    the runs, and the folder of runs stays one (its runs are still found afterwards)."""
    d = tmp_path / "runs" / "ok"
    d.mkdir(parents=True)
    write_finished_run(d)
    out = tmp_path / "runs" / name
    assert main(["report", str(tmp_path / "runs"), "--output", str(out)]) == 0, capsys.readouterr().err
    assert "| EASE | zo_sgd |" in out.read_text()
    capsys.readouterr()
    assert main(["report", str(tmp_path / "runs")]) == 0, capsys.readouterr().err
    assert "| EASE | zo_sgd |" in capsys.readouterr().out


@pytest.mark.parametrize("name", ["metrics.json", "config.json", "checkpoint.pt"])
def test_report_output_never_makes_a_folder_of_runs_read_as_a_run(tmp_path, capsys, name):
    """``zeroflow report runs --output runs/metrics.json`` wrote the markdown there: runs/ then
    read as one damaged run folder, and the next ``zeroflow report runs`` found none of the runs
    in it ("no finished run found"). A name that makes its folder a run folder is refused, before
    anything is read or written."""
    d = tmp_path / "runs" / "ok"
    d.mkdir(parents=True)
    write_finished_run(d)
    out = tmp_path / "runs" / name
    assert main(["report", str(tmp_path / "runs"), "--output", str(out)]) == 2
    err = capsys.readouterr().err
    assert (f"cannot write {out}: a file named {name} makes {tmp_path / 'runs'} read as a run folder" in err
            and str(tmp_path / "runs" / "report.md") in err), err
    assert not out.exists()
    assert main(["report", str(tmp_path / "runs")]) == 0
    assert "| EASE | zo_sgd |" in capsys.readouterr().out


def test_resume_names_the_options_of_a_config_file_as_the_file_s(tmp_path, capsys):
    """zeroflow run --resume --config FILE named the file's options as flags the user never gave:
    'ignoring --epochs 2 (the run has 1)' for epochs: 2 in FILE, and '--num-workers must be >= 0'
    for its num_workers: -1. They are named as in a fresh run's messages now ('epochs in FILE');
    a flag given beside the file is still named as the flag."""
    from zeroflow.continual.defaults import resolve
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(resolve({"epochs": 1})))
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 2\nnum_workers: -1\nlr: 0.3\n")
    assert main(["run", "--resume", "--out", str(out), "--config", str(config), "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert f"ignoring epochs in {config} 2 (the run has 1), --lr 0.5 (the run has 0.005)" in err, err
    assert f"zeroflow: error: num_workers in {config} must be >= 0 (got -1)" in err, err
    assert "--epochs" not in err and "--num-workers" not in err
    assert sorted(os.listdir(out)) == ["config.json"]           # nothing written


def test_resume_names_a_bad_location_of_a_config_file_as_the_file_s(tmp_path, capsys):
    """A location the resume takes from --config FILE (device, data_root, checkpoint) that is no
    non-empty string is named as the file's option ('device in FILE'), not as a flag never given."""
    from zeroflow.continual.defaults import resolve
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(resolve({"epochs": 1})))
    config = tmp_path / "c.yaml"
    config.write_text("device: 5\n")
    assert main(["run", "--resume", "--out", str(out), "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert err == f"zeroflow: error: device in {config} must be a non-empty string (got 5)\n", err
    assert sorted(os.listdir(out)) == ["config.json"]           # nothing written


def test_a_digits_config_file_s_download_is_named_as_the_file_s(tmp_path):
    """download: true in a --config file of a digits run is named as the file's option, as its
    data_root is, not as the --download flag the user never gave."""
    from zeroflow.continual.defaults import resolve
    config = tmp_path / "c.yaml"
    config.write_text("download: true\n")
    warned = []
    resolve({}, str(config), warn=warned.append)
    assert warned == [f"ignoring download in {config}: the digits data ships with scikit-learn (drop it)"]


def test_a_fresh_digits_run_names_the_data_options_it_ignores(tmp_path, capsys):
    """zeroflow run --data-root /data (or --download) on the embedded digits ran without a word:
    its data ships with scikit-learn, so neither acts (a --resume said so, a fresh run did not).
    Named in a warning now, flags and config-file options alike; nothing for the real datasets."""
    from zeroflow.continual.defaults import resolve
    warned = []
    resolve({"data_root": "/data", "download": True}, warn=warned.append)
    assert warned == ["ignoring --data-root /data and --download: the digits data ships with scikit-learn "
                      "(drop them)"]
    config = tmp_path / "c.yaml"
    config.write_text("data_root: /mnt/data\n")
    warned.clear()
    resolve({}, str(config), warn=warned.append)
    assert warned == [f"ignoring data_root in {config} /mnt/data: the digits data ships with scikit-learn (drop it)"]
    warned.clear()
    resolve({}, warn=warned.append)                              # the default data_root: nothing to say
    resolve({"dataset": "cifar100", "data_root": "/data", "download": True}, warn=warned.append)
    assert warned == []
    # the command: the warning, before the run (here refused: --stop-after 0)
    assert main(["run", "--data-root", "/data", "--stop-after", "0", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "zeroflow: warning: ignoring --data-root /data: the digits data ships with scikit-learn" in err, err


def test_a_sweep_whose_stdout_is_closed_before_its_first_line_stops_as_a_closed_pipe(tmp_path, monkeypatch,
                                                                                     capsys):
    """`zeroflow sweep ... | true` (the reader gone before the sweep's first line): the "== run ->
    folder" line it prints first stops the sweep as a closed stdout does within a run (one stderr
    line saying how to continue, exit 141), not with a BrokenPipeError traceback."""
    from zeroflow.continual import runner

    class Closed(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

    def not_reached(*a, **kw):
        raise AssertionError("the run started after its line could not be printed")
    monkeypatch.setattr(runner, "run", not_reached)
    monkeypatch.setattr(sys, "stdout", Closed())
    out = tmp_path / "sweep"
    assert main(["sweep", "--method", "aper", "--optimizers", "zo_sgd", "--epochs", "1", "--out", str(out)]) == 141
    assert capsys.readouterr().err == (f"zeroflow: sweep stopped: stdout was closed by its reader; run the same "
                                       f"command with --out {out} to continue (finished runs are kept, the stopped "
                                       f"one resumes)\n")



class _HeadPipe(io.StringIO):
    """stdout and stderr as one pipe (`zeroflow sweep ... 2>&1 | head -N`) whose reader exits after
    ``lines`` lines: every write after those raises BrokenPipeError."""

    def __init__(self, lines):
        super().__init__()
        self.left = lines

    def write(self, text):
        if self.left <= 0:
            raise BrokenPipeError(32, "Broken pipe")
        self.left -= text.count("\n")
        return super().write(text)


@pytest.mark.parametrize("stop, lines", [
    ("failed", 1),        # the run's error line ('zeroflow: error: zo_sgd: ...'), right after '== zo_sgd -> DIR'
    ("failed", 2),        # the failures listed after the sweep ('zeroflow: zo_sgd failed: ...')
    ("interrupted", 1),   # Ctrl-C's advice ('zeroflow: sweep interrupted; run the same command ...')
])
def test_a_sweep_whose_stdout_and_stderr_reader_went_away_exits_141_wherever_it_stops(tmp_path, monkeypatch, stop,
                                                                                       lines):
    """`zeroflow sweep ... 2>&1 | head -N`: the reader gone after N lines, the sweep's next stderr
    line (a run's failure, the list of failures, Ctrl-C's advice) meets the closed pipe. It ends
    as any write to a closed output does (exit 141), not with a BrokenPipeError traceback nor the
    exit code of a sweep whose lines were read (1, 130)."""
    from zeroflow.continual import runner

    def run(cfg, out, **kw):
        if stop == "failed":
            raise ZeroflowError("--data-root x: no such folder")
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "run", run)
    pipe = _HeadPipe(lines)
    monkeypatch.setattr(sys, "stdout", pipe)
    monkeypatch.setattr(sys, "stderr", pipe)
    out = tmp_path / "sweep"
    assert main(["sweep", "--method", "aper", "--optimizers", "zo_sgd", "--epochs", "1", "--out", str(out)]) == 141
    assert pipe.getvalue().startswith(f"== zo_sgd -> {out / 'aper_zo_sgd_digits'}\n"), pipe.getvalue()

@pytest.mark.parametrize("rank", [0, 1])
def test_sweep_under_torchrun_with_several_processes_is_refused_before_anything(tmp_path, monkeypatch, capsys,
                                                                                 rank):
    """torchrun --nproc-per-node 2 -m zeroflow sweep: every rank claimed the sweep folder, all but
    one were refused as 'in use by pid ...' (their sibling), and the last waited in its first
    collective until torchrun killed it, leaving a stale lock. Refused on every rank now, before
    any folder, lock or process group, saying how to run the optimizers data-parallel (rank 0
    says it; the other ranks exit alike, silently)."""
    import torch.distributed as dist
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "sweep"
    assert main(["sweep", "--method", "aper", "--optimizers", "zo_sgd", "--epochs", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    if rank == 0:
        assert "zeroflow: error: zeroflow sweep does not run under torchrun with several processes (WORLD_SIZE=2)" \
            in err
        assert "-m zeroflow run --optimizer NAME" in err, err
    else:
        assert err == ""
    assert not out.exists() and not dist.is_initialized()


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("argv, said", [
    (["--epochs=-1"], "zeroflow: error: --epochs must be >= 0 (got -1)"),      # defaults.resolve
    (["--resume"], "zeroflow: error: --resume needs --out RUN_FOLDER"),      # runner._check_run_flags
])
def test_a_refused_option_under_torchrun_is_said_by_rank_0_only(tmp_path, monkeypatch, capsys, rank, argv, said):
    """torchrun --nproc-per-node 8 -m zeroflow run --epochs 0 printed the same refusal 8 times:
    every rank gets the same command line, so every rank refuses it alike. Rank 0 says it; the
    others exit 2 without a word (before any process group: none is made)."""
    import torch.distributed as dist
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["run", "--dataset", "digits", *argv]) == 2
    err = capsys.readouterr().err
    if rank == 0:
        assert err.startswith(said) and len(err.splitlines()) == 1, err
    else:
        assert err == ""
    assert not dist.is_initialized()



@pytest.mark.parametrize("rank", [0, 1])
def test_a_first_order_optimizer_under_torchrun_is_refused_by_rank_0_only(tmp_path, monkeypatch, capsys, rank):
    """torchrun --nproc-per-node 8 -m zeroflow run --optimizer fo_sgd: every rank has the same
    option and refuses it alike; rank 0 says why (data-parallel runs need a forward-pass
    optimizer), the other ranks exit 2 without a word."""
    import zeroflow.distributed as zd
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(zd, "init_from_env", lambda: (rank, 2))      # the group torchrun's ranks would make
    assert main(["run", "--optimizer", "fo_sgd", "--device", "cpu", "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    if rank == 0:
        assert err.startswith("zeroflow: error: --optimizer fo_sgd under torchrun: data-parallel runs exchange only "
                              "ZO loss scalars"), err
    else:
        assert err == ""
    assert not (tmp_path / "r").exists()

@pytest.mark.parametrize("rank", [0, 1])
def test_a_command_line_argparse_refuses_under_torchrun_is_said_by_rank_0_only(monkeypatch, capsys, rank):
    """torchrun ... -m zeroflow run --epochs x: argparse's usage and error, once per rank."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as e:
        main(["run", "--epochs", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    if rank == 0:
        assert "error: argument --epochs: invalid int value: 'x'" in err, err
    else:
        assert err == ""


@pytest.mark.parametrize("rank", [0, 1])
def test_a_warning_of_the_options_under_torchrun_is_said_by_rank_0_only(monkeypatch, capsys, rank):
    """torchrun ... zeroflow run --dataset digits --data-root X said 'ignoring --data-root X' once
    per rank (resolve's warnings came before the run silenced ranks > 0)."""
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    # --stop-after 0 is refused after the options are resolved, before any process group
    assert main(["run", "--dataset", "digits", "--data-root", "elsewhere", "--stop-after", "0"]) == 2
    err = capsys.readouterr().err
    if rank == 0:
        assert "zeroflow: warning: ignoring --data-root elsewhere" in err, err
    else:
        assert err == ""



def test_a_rank_variable_that_is_no_number_is_a_single_process_that_says_its_errors(monkeypatch, capsys):
    """RANK set to no number (`export RANK=` in a job script, outside torchrun) is no torchrun
    rank: the process is rank 0 of its own and says a refused option, not a silent exit 2."""
    monkeypatch.setenv("RANK", "")
    assert main(["run", "--dataset", "digits", "--epochs=-1"]) == 2
    assert capsys.readouterr().err.startswith("zeroflow: error: --epochs must be >= 0 (got -1)")

def test_an_error_of_this_rank_s_own_files_is_said_by_every_rank(tmp_path, monkeypatch, capsys):
    """A --config file that a rank does not find (another node's disk) is that rank's error: it
    is said there, not left to rank 0, which may have found its own."""
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    missing = tmp_path / "missing.yaml"
    assert main(["run", "--config", str(missing)]) == 2
    assert capsys.readouterr().err == f"zeroflow: error: --config {missing}: no such file\n"


@pytest.mark.parametrize("rank", [0, 1])
def test_an_interrupted_torchrun_job_is_described_by_rank_0_only(tmp_path, monkeypatch, capsys, rank):
    """^C / SIGTERM of torchrun ... zeroflow run after task 2: rank 0 said 'continue with: zeroflow
    run --resume', and rank 1, which writes nothing (so its run had written nothing), said
    'interrupted during setup; nothing was kept' beside it. Rank 0 alone describes the stop now."""
    from zeroflow.continual import runner

    def interrupted(cfg, out, **kw):
        raise runner.RunInterrupted(out, 2, 5, resumable=rank == 0, rank=rank)
    monkeypatch.setattr(runner, "run", interrupted)
    assert main(["run", "--out", str(tmp_path / "r")]) == 130
    err = capsys.readouterr().err
    if rank == 0:
        assert f"interrupted after task 2/5 (finished tasks are checkpointed in {tmp_path / 'r'})" in err, err
    else:
        assert err == ""


@pytest.mark.parametrize("stop, rc", [(KeyboardInterrupt, 130), ("output closed", 141)])
def test_a_run_stopped_on_a_later_torchrun_rank_says_nothing(tmp_path, monkeypatch, capsys, stop, rc):
    """The runner gives a stop on rank 1 (Ctrl-C / SIGTERM, or its stdout closed) that rank, so
    that the CLI leaves the description to rank 0: without it rank 1 said 'interrupted during
    setup; nothing was kept (no run in DIR)' beside rank 0's resume advice. A two-process job
    stands in here: this process is rank 1 of 2 and stops as it builds the network."""
    from zeroflow.continual import runner
    from zeroflow.continual.errors import OutputClosed

    def stopped(*a, **kw):
        raise KeyboardInterrupt if stop is KeyboardInterrupt else OutputClosed()
    monkeypatch.setattr(runner, "distributed_setup", lambda cfg: (1, 2))
    monkeypatch.setattr(runner, "check_shards", lambda *a: None)
    monkeypatch.setattr(runner, "_on_rank0", lambda world, main, claim: (str(tmp_path / "r"), "fresh", None))
    monkeypatch.setattr(runner, "_shared_network", stopped)
    assert main(["run", "--device", "cpu", "--out", str(tmp_path / "r")]) == rc
    assert capsys.readouterr().err == ""



def test_a_refusal_rank_0_broadcast_is_not_said_again_by_the_other_ranks(tmp_path, monkeypatch, capsys):
    """Rank 0 claims the run folder and broadcasts its refusal (the folder in use, a finished
    run): rank 0 says it, and rank 1, which raises the same text, exits 2 without repeating it.
    A two-process job stands in here: this process is rank 1 of 2 and gets rank 0's refusal."""
    import torch.distributed as dist
    from zeroflow.continual import runner
    said = f"{tmp_path / 'r'} is in use by pid 1 on host h"

    def broadcast(box, src):
        box[:] = [None, said]
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(runner, "distributed_setup", lambda cfg: (1, 2))
    monkeypatch.setattr(runner, "check_shards", lambda *a: None)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast)
    assert main(["run", "--device", "cpu", "--out", str(tmp_path / "r")]) == 2
    assert capsys.readouterr().err == ""

def test_an_interrupt_before_the_run_s_folder_is_still_said(tmp_path, monkeypatch, capsys):
    """Ctrl-C while the data loads (before the run has a folder: a plain KeyboardInterrupt, no
    rank) is said as before ('zeroflow: interrupted', exit 130): only a later rank keeps quiet."""
    from zeroflow.continual import runner

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(runner, "load_run_data", interrupted)
    assert main(["run", "--out", str(tmp_path / "r")]) == 130
    assert capsys.readouterr().err == "zeroflow: interrupted\n"
    assert not (tmp_path / "r").exists()


def test_a_sweep_whose_stdout_reader_went_away_says_how_to_continue_it(tmp_path, monkeypatch, capsys):
    """`zeroflow sweep ... | head -1`: the running run's next line raised BrokenPipeError, a
    traceback out of the sweep. It stops as on Ctrl-C now: one stderr line, exit 141."""
    from zeroflow.continual import runner
    from zeroflow.continual.errors import OutputClosed

    def closed(cfg, out, **kw):
        raise OutputClosed(out, 1, 5, resumable=True)
    monkeypatch.setattr(runner, "run", closed)
    out = tmp_path / "sweep"
    assert main(["sweep", "--method", "aper", "--optimizers", "zo_sgd", "--epochs", "1", "--out", str(out)]) == 141
    err = capsys.readouterr().err
    assert err == (f"zeroflow: sweep stopped in {out / 'aper_zo_sgd_digits'}: stdout was closed by its reader; run "
                   f"the same command with --out {out} to continue (finished runs are kept, the stopped one "
                   f"resumes)\n"), err
