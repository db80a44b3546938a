"""configs/*.yaml are the built-in defaults, one option per line with its source (issue 12)."""
import os

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

