"""The zeroflow CLI: light import, bad inputs, config files, report."""
import json
import os
import subprocess
import sys

import pytest

from zeroflow.cli import main

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
            "avg": avg, "last": avg - 10, "fgt": 5.0, "accuracy_matrix": [[avg]], "peak_memory_bytes": 2e9,
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
