"""Triton kernels of zeroflow (Liger style: one module per op, shared ``@jit`` helpers in
:mod:`zfkernels.triton.philox`).

Same semantics, argument names and order as the ``torch.ops.zfkernels`` schemas (the table
of zfkernels/opspec.py; docs/kernel-ops.md); ``z`` and ``m`` follow docs/perturbation-stream.md (``stream v1``).
Each op takes an extra keyword-only ``block_size`` (results never depend on it).

The kernels run on CUDA/ROCm tensors, or on CPU tensors in Triton's interpreter when
``TRITON_INTERPRET=1`` is set before this package is imported.
"""
from ._common import check_interpreter, interpreting  # noqa: F401 - read by zfkernels._triton_interprets
from .adam_update import zo_adam_update_
from .perturb import perturb_
from .philox import philox4x32_10
from .sgd_update import zo_sgd_update_

__all__ = ["philox4x32_10", "perturb_", "zo_sgd_update_", "zo_adam_update_"]

check_interpreter()   # under TRITON_INTERPRET=1: an interpreter that cannot run the kernels is an import error
