"""Every op's argument list is the table of zfkernels/opspec.py: the compiled schema, the
Triton functions, the reference, the schema block of docs/kernel-ops.md and the defaults of
the Python face (issue 11)."""
from __future__ import annotations

import inspect
import os
import re

import pytest
import torch

import zfkernels as zk
from zfkernels import _compiled, opspec, reference

OPS = list(opspec.OPS)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def positional_names(fn) -> list[str]:
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.POSITIONAL_OR_KEYWORD]


@pytest.mark.skipif(not _compiled.cpu_available(), reason="compiled CPU ops missing")
@pytest.mark.parametrize("op", OPS)
def test_compiled_schema_is_the_table(op):
    """Names, order, types and alias annotations (csrc/ops.cpp's TORCH_LIBRARY strings)."""
    assert str(getattr(torch.ops.zfkernels, op).default._schema) == opspec.schema(op)


@pytest.mark.parametrize("op", OPS)
def test_reference_signature_is_the_table(op):
    assert positional_names(getattr(reference, op)) == opspec.names(op)


@pytest.mark.parametrize("op", OPS)
def test_triton_signature_is_the_table(op):
    zt, why = zk._triton_module()
    if zt is None:
        pytest.skip(why)
    sig = inspect.signature(getattr(zt, op))
    assert positional_names(getattr(zt, op)) == opspec.names(op)
    extra = [p.name for p in sig.parameters.values() if p.kind is not p.POSITIONAL_OR_KEYWORD]
    assert extra == ["block_size"], "the Triton functions add only the keyword-only block_size"


def test_schemas_in_the_docs_are_the_table():
    with open(os.path.join(ROOT, "docs", "kernel-ops.md")) as f:
        text = f.read()
    block = text.split("## Schemas", 1)[1].split("```")[1]
    schemas = re.split(r"\n(?=\S)", block.strip())          # a schema's continuation lines are indented
    written = {s.split("(", 1)[0]: " ".join(s.split()) for s in schemas}
    assert written == {op: opspec.schema(op).removeprefix("zfkernels::") for op in OPS}


# The face's keywords that are not the op's own argument (they are converted first).
FACE_ONLY = {"dist": "a name, not the code", "sparsity": "becomes mask_threshold", "tensor_ids": "None: 0..n-1",
             "betas": "beta1, beta2", "backend": "picks the function"}


@pytest.mark.parametrize("op", ["perturb_", "zo_sgd_update_", "zo_adam_update_"])
def test_face_defaults_are_the_table_defaults(op):
    table = {a.name: a.default for a in opspec.OPS[op]}
    face = inspect.signature(getattr(zk, op)).parameters
    compared = 0
    for name, p in face.items():
        if p.default is p.empty or name in FACE_ONLY:
            continue
        assert name in table, f"zfkernels.{op} has keyword {name!r}, which the op does not take"
        assert p.default == table[name], f"zfkernels.{op}({name}={p.default!r}): the table says {table[name]!r}"
        compared += 1
    assert compared >= 1
    if op == "zo_adam_update_":
        assert face["betas"].default == (table["beta1"], table["beta2"])


def test_bind_completes_orders_and_refuses():
    got = opspec.bind("perturb_", seed=3, scale=0.5, params=[], tensor_ids=[])
    assert list(got) == opspec.names("perturb_") and got["dist"] == 0 and got["mask_threshold"] == 0
    with pytest.raises(TypeError, match="has no argument momentum"):
        opspec.bind("perturb_", params=[], tensor_ids=[], seed=1, scale=1.0, momentum=0.9)
    with pytest.raises(TypeError, match="needs scale"):
        opspec.bind("perturb_", params=[], tensor_ids=[], seed=1)
    sgd = opspec.bind("zo_sgd_update_", params=[], tensor_ids=[], seeds=[], coeffs=[], lr=0.1)
    assert sgd["momentum_buffers"] == [] and sgd["momentum_buffers"] is not sgd["history_buffers"]


def test_call_passes_the_schema_types_in_table_order():
    seen = {}

    def perturb_(params, tensor_ids, seed, scale, dist, mask_seed, mask_threshold):
        seen.update(params=params, tensor_ids=tensor_ids, seed=seed, scale=scale, dist=dist, mask_seed=mask_seed,
                    mask_threshold=mask_threshold)

    opspec.call(perturb_, "perturb_", dict(mask_threshold=2.0, scale=1, seed=True, tensor_ids=(1,), params=()))
    assert seen == dict(params=[], tensor_ids=[1], seed=1, scale=1.0, dist=0, mask_seed=0, mask_threshold=2)
    assert type(seen["seed"]) is int and type(seen["scale"]) is float and type(seen["mask_threshold"]) is int
    with pytest.raises(TypeError, match="has no argument momentum"):
        opspec.call(perturb_, "perturb_", dict(params=[], tensor_ids=[], seed=1, scale=1.0, momentum=0.9))
    with pytest.raises(TypeError, match="needs seed"):
        opspec.call(perturb_, "perturb_", dict(params=[], tensor_ids=[], scale=1.0))
