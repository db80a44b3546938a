"""Class-incremental continual learning with forward-pass (zeroth-order) optimizers.

EASE and APER on timm ViTs; see docs/continual.md. Importing this package is light:
timm, torchvision and scikit-learn are imported by the submodules that need them.
"""
from .defaults import DATASETS, METHODS, OPTIMIZERS
from .errors import ZeroflowError

__all__ = ["ZeroflowError", "METHODS", "DATASETS", "OPTIMIZERS", "run"]


def run(*args, **kwargs):
    """``zeroflow.continual.runner.run`` (imported lazily)."""
    from .runner import run as _run

    return _run(*args, **kwargs)
