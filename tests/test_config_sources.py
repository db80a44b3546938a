"""configs/*.yaml are the built-in defaults, one option per line with its source (issue 12)."""
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_config_files_are_the_defaults_with_a_source_on_every_line():
    from zeroflow.continual.defaults import DATASETS, METHODS
    from zeroflow.continual.sources import config_yaml
    for ds in DATASETS:
        for me in METHODS:
            path = os.path.join(ROOT, "configs", f"{me}_{ds}.yaml")
            with open(path) as f:
                text = f.read()
            assert text == config_yaml(ds, me), f"{path} is stale: run python -m zeroflow.continual.sources"
            for line in text.splitlines():
                if not line.startswith("#"):
                    assert "  # " in line and line.split("  # ", 1)[1].strip(), line



def test_download_is_operational_not_part_of_the_run():
    """docs/continual.md (defaults table): download is operational, like data_root or device.
    A run started with --download and the same run resumed or swept without it are one run;
    counting download as an option refused the run folder as another configuration and split
    zeroflow report's rows by it."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.report import group_runs
    from zeroflow.continual.runfolder import OPERATIONAL_KEYS, config_differences
    assert "download" in OPERATIONAL_KEYS
    cfg = resolve({})
    assert config_differences(dict(cfg, download=True), dict(cfg, download=False)) == []
    assert config_differences(dict(cfg, download=True), dict(cfg, download=False, lr=0.5)) == [
        f"lr: {cfg['lr']!r} there, 0.5 requested"]
    rows = group_runs([{"config": dict(cfg, seed=1, download=True)}, {"config": dict(cfg, seed=2, download=False)}])
    assert len(rows) == 1 and len(rows[0].runs) == 2          # two seeds of one configuration


def test_num_workers_is_operational_not_part_of_the_run():
    """docs/continual.md ("Seeds and error bars"): num_workers does not change the data or the
    results (tests/test_augmentation_seeds.py). A sweep rerun with --num-workers 8 over runs made
    with 4 refused every folder as another configuration, and zeroflow report split their seeds
    into rows by the worker count."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.report import group_runs
    from zeroflow.continual.runfolder import config_differences
    cfg = resolve({})
    assert config_differences(dict(cfg, num_workers=4), dict(cfg, num_workers=8)) == []
    rows = group_runs([{"config": dict(cfg, seed=1, num_workers=0)}, {"config": dict(cfg, seed=2, num_workers=4)}])
    assert len(rows) == 1 and len(rows[0].runs) == 2          # two seeds of one configuration


def test_the_writer_takes_a_folder_and_help(tmp_path, monkeypatch, capsys):
    # `--help` was taken for a folder name (open('--help/aper_cifar100.yaml') raised)
    from zeroflow.continual.sources import config_yaml, main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "configs/<method>_<dataset>.yaml" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["nowhere"])
    assert e.value.code == 2 and "'nowhere' does not exist" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    main([str(tmp_path)])
    assert (tmp_path / "ease_digits.yaml").read_text() == config_yaml("digits", "ease")
    assert len(os.listdir(tmp_path)) == 10


def test_the_writer_writes_into_configs_when_given_no_folder(tmp_path, monkeypatch):
    # `python -m zeroflow.continual.sources` from the repository root: configs/ is the default
    from zeroflow.continual.sources import config_yaml, main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "configs").mkdir()
    main([])
    assert sorted(os.listdir(tmp_path)) == ["configs"] and len(os.listdir(tmp_path / "configs")) == 10
    assert (tmp_path / "configs" / "aper_digits.yaml").read_text() == config_yaml("digits", "aper")


@pytest.mark.parametrize("name", ["c.YAML", "c.Yml", "settings", "c.cfg"])
def test_a_yaml_config_file_without_a_lowercase_yaml_extension_is_read_as_yaml(tmp_path, name):
    """--config my.YAML (or a YAML file named without .yaml/.yml) was parsed as JSON: the run
    stopped with "cannot parse it: Expecting value: line 1 column 1 (char 0)"."""
    from zeroflow.continual.defaults import load_config_file, resolve
    p = tmp_path / name
    p.write_text("epochs: 3\nlr: 1e-3\n")
    assert load_config_file(str(p)) == {"epochs": 3, "lr": "1e-3"}
    cfg = resolve({}, str(p))
    assert (cfg["epochs"], cfg["lr"]) == (3, 1e-3)


def test_a_config_file_that_parses_as_nothing_names_the_yaml_error(tmp_path):
    from zeroflow.continual.defaults import load_config_file
    from zeroflow.continual.errors import ZeroflowError
    for name, text, needle in (("c.json", '{"epochs": 3,}', "cannot parse it: Expecting property name"),
                               ("c.JSON", '{"epochs": 3}', None),
                               # the extension in any case decides: a broken .JSON is a JSON error (YAML
                               # would read this one), a broken .YML a YAML error without "as YAML"
                               ("d.JSON", '{"epochs": 3,}', "cannot parse it: Expecting property name"),
                               ("d.YML", "epochs: [1\n", "cannot parse it: line 2, column 1"),
                               ("settings", "epochs: [1\n", "cannot parse it as YAML: line 2, column 1")):
        p = tmp_path / name
        p.write_text(text)
        if needle is None:
            assert load_config_file(str(p)) == {"epochs": 3}
            continue
        with pytest.raises(ZeroflowError, match=needle):
            load_config_file(str(p))


@pytest.mark.parametrize("text, needle", [
    ("precision: null\n", "precision in {path}: unknown precision None; valid: fp32, tf32, bf16, fp16"),
    ("perturbation: gausian\n", "perturbation in {path}: unknown perturbation 'gausian'; valid: gaussian, "),
    ("dataset: cifar-100\n", "dataset in {path}: unknown dataset 'cifar-100'; valid: digits, cifar100, "),
    ("method: l2p\n", "method in {path}: unknown method 'l2p'; valid: ease, aper"),
])
def test_a_bad_choice_in_a_config_file_names_the_file(tmp_path, text, needle):
    """A choice option from --config FILE was refused without saying where it came from
    ("unknown precision None"), unlike every other option of the file."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.errors import ZeroflowError
    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ZeroflowError) as e:
        resolve({}, str(p))
    assert str(e.value).startswith(needle.format(path=p)), str(e.value)
    with pytest.raises(ZeroflowError) as e:      # a flag's value: the message is as it was
        resolve({"precision": "fp8"})
    assert str(e.value) == "unknown precision 'fp8'; valid: fp32, tf32, bf16, fp16"


def test_a_flag_naming_another_dataset_than_the_config_file_warns_of_what_the_file_still_sets(tmp_path):
    """--config configs/ease_cifar100.yaml --dataset cub ran CUB with CIFAR's init_cls, lr and
    batch_size without a word (flags win over the file for dataset, the file over the defaults
    for the rest): now a warning names the file's options that replace the CUB defaults."""
    from zeroflow.continual.defaults import defaults_for, resolve
    cifar = os.path.join(ROOT, "configs", "ease_cifar100.yaml")
    said = []
    cfg = resolve({"dataset": "cub"}, cifar, warn=said.append)
    assert cfg["init_cls"] == 10 and cfg["batch_size"] == 48      # precedence unchanged: the file's values
    assert len(said) == 1, said
    assert said[0].startswith(f"--dataset cub overrides dataset: cifar100 in {cifar}, but the file's other cifar100 "
                              "options still apply to this ease cub run: "), said[0]
    cub = defaults_for("cub", "ease")
    for k in ("init_cls", "increment", "lr", "batch_size", "ease_alpha"):
        assert f" {k} " in said[0] and cub[k] != cfg[k], k
    assert "weight_decay" not in said[0] and "seed" not in said[0]    # the same for both datasets
    said.clear()         # a file option the flags also give is the flag's: not carried over, not named
    resolve({"dataset": "cub", "init_cls": 20, "lr": 0.01}, cifar, warn=said.append)
    assert len(said) == 1 and " increment " in said[0], said
    assert " init_cls " not in said[0] and " lr " not in said[0], said[0]
    assert said[0].endswith("give them as flags, or start from configs/ease_cub.yaml")
    # a method flag against the file's method: the same
    said.clear()
    resolve({"method": "aper"}, os.path.join(ROOT, "configs", "aper_cub.yaml"), warn=said.append)
    resolve({"method": "ease", "ease_alpha": 0.05}, os.path.join(ROOT, "configs", "aper_cub.yaml"),
            warn=said.append)
    assert len(said) == 1 and said[0].startswith("--method ease overrides method: aper in "), said
    # no warning: the flag names the file's dataset, no flag, or nothing of the file's is dataset-specific
    said.clear()
    resolve({"dataset": "cifar100"}, cifar, warn=said.append)
    resolve({}, cifar, warn=said.append)
    (tmp_path / "c.yaml").write_text("dataset: cifar100\nseed: 7\nepochs: 10\n")   # digits: 10 epochs too
    resolve({"dataset": "digits"}, str(tmp_path / "c.yaml"), warn=said.append)
    assert said == []


def test_the_cli_prints_the_carried_over_warning(tmp_path, capsys):
    """--dataset digits with the CIFAR file went on to fetch ViT-B weights for digits: the
    warning names the backbone (here the run then stops at a bad --epochs, before any fetch)."""
    from zeroflow.cli import main
    rc = main(["run", "--config", os.path.join(ROOT, "configs", "ease_cifar100.yaml"), "--dataset", "digits",
               "--epochs", "-1", "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "--epochs must be >= 0" in err
    assert "zeroflow: warning: --dataset digits overrides dataset: cifar100 in " in err
    assert 'backbone "vit_base_patch16_224.augreg_in21k" (default "small")' in err


def test_a_sweep_prints_the_carried_over_warning_once(tmp_path, capsys, monkeypatch):
    """Each run of a sweep resolves the same file and flags: the warning is said once, not once
    per optimizer and seed (the sweep is stopped here at its setup check, after the plan)."""
    from zeroflow.cli import main
    from zeroflow.continual import runner
    from zeroflow.continual.errors import ZeroflowError

    def stop(cfgs):
        list(cfgs)
        raise ZeroflowError("stopped at the setup check")

    monkeypatch.setattr(runner, "check_setup", stop)
    rc = main(["sweep", "--config", os.path.join(ROOT, "configs", "ease_cifar100.yaml"), "--dataset", "cub",
               "--optimizers", "zo_sgd,zo_adam", "--seeds", "1,2", "--out", str(tmp_path / "s")])
    err = capsys.readouterr().err
    assert rc == 2 and "stopped at the setup check" in err, err
    assert err.count("overrides dataset: cifar100 in ") == 1, err


def test_an_init_cls_above_the_classes_names_where_it_was_given(tmp_path, capsys):
    """"--init-cls 20 exceeds the 10 classes of digits" was said of init_cls: 20 in a config
    file too (from the loader, which knows no flags): now checked with the other options, and
    named as they are (the flag, or the option in the file)."""
    from zeroflow.cli import main
    from zeroflow.continual.data import task_sizes
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.errors import ZeroflowError
    p = tmp_path / "c.yaml"
    p.write_text("init_cls: 20\n")
    with pytest.raises(ZeroflowError) as e:
        resolve({}, str(p))
    assert str(e.value) == f"init_cls in {p} (20) exceeds the 10 classes of digits; give at most 10"
    with pytest.raises(ZeroflowError) as e:
        resolve({"init_cls": 20}, str(p))
    assert str(e.value) == "--init-cls 20 exceeds the 10 classes of digits; give at most 10"
    with pytest.raises(ZeroflowError, match=r"^--init-cls 101 exceeds the 100 classes of cifar100; give at most 100$"):
        resolve({"dataset": "cifar100", "init_cls": 101})
    # all the classes in the first task (one task) is allowed: only above them is refused
    assert resolve({"init_cls": 10})["init_cls"] == 10
    assert resolve({"dataset": "cifar100", "init_cls": 100})["init_cls"] == 100
    assert main(["run", "--config", str(p), "--out", str(tmp_path / "r")]) == 2
    assert f"zeroflow: error: init_cls in {p} (20) exceeds the 10 classes of digits" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
    # the folder datasets count their classes when loaded: the loader names the option, not a flag
    with pytest.raises(ZeroflowError) as e:
        task_sizes(200, 250, 20, "cub")
    assert str(e.value) == "init_cls 250 exceeds the 200 classes of cub; give at most 200"
