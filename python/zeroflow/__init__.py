"""zeroflow: fused zeroth-order (forward-pass-only) optimizers for PyTorch.

Kept light on purpose: importing ``zeroflow`` imports nothing heavy; the optimizer
classes are loaded on first attribute access (``from zeroflow import ZOFusedAdam``).
"""
__version__ = "0.1.0"

__all__ = ["ZOFusedSGD", "ZOFusedAdam", "create", "__version__"]


def __getattr__(name):  # PEP 562 lazy exports
    if name in ("ZOFusedSGD", "ZOFusedAdam", "create"):
        from . import optim

        return getattr(optim, name)
    raise AttributeError(f"module 'zeroflow' has no attribute {name!r}")
