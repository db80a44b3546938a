"""Contracts of the Triton backend's Python glue (zfkernels/triton/*.py) and of
zeroflow.distributed that no other test pinned (found by mutation testing).

Triton cases run in the interpreter on CPU tensors (TRITON_INTERPRET=1, set by conftest) on
tiny tensors; distributed cases need no second process (collectives are faked or the group
is a 1-rank gloo group)."""
from __future__ import annotations

import datetime
import inspect

import pytest
import torch
import torch.distributed as dist

import zfkernels as zk
from conftest import triton_package_or_skip
from zfkernels import opspec
from zfkernels import reference as R

from zeroflow import distributed as zd


def _zt():
    zt, why = zk._triton_module()
    if zt is None or not zk._triton_usable_on("cpu"):
        pytest.skip(why or "Triton not usable on CPU tensors here")
    return zt


def _perturb_args(p, **over):
    return opspec.bind("perturb_", **{"params": p, "tensor_ids": list(range(len(p))), "seed": 1, "scale": 1.0,
                                      "dist": 0, "mask_seed": 0, "mask_threshold": 0, **over})


# ======================================================================================
# Triton: Python glue
# ======================================================================================
@pytest.mark.parametrize("seed", [1 << 31, (7 << 32) | (1 << 31)])   # seeds < 2^63: only k0 can be 2^31
@pytest.mark.parametrize("dist_code", [0, 1])
def test_triton_key_word_of_exactly_2_pow_31_matches_the_reference(seed, dist_code):
    """to_i32 (zfkernels/triton/_common.py) maps a uint32 key word to the int32 of the same
    bits; the word 2^31 is the boundary (``>=``, not ``>``): a seed whose low half is
    exactly 2^31 must give the reference's z, both in perturb_ and as a mask seed."""
    zt = _zt()
    x = torch.zeros(300)
    want = x.clone()
    R.perturb_(**_perturb_args([want], seed=seed, dist=dist_code, mask_seed=seed, mask_threshold=1 << 23))
    got = x.clone()
    zt.perturb_(**_perturb_args([got], seed=seed, dist=dist_code, mask_seed=seed, mask_threshold=1 << 23))
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("block", [64, 0.5, 384, 1000, 129])
def test_triton_block_size_must_be_a_power_of_two_of_at_least_128(block):
    """check_block: the tile layout is [BLOCK // 128, 32, 4] (a power-of-two arange per axis),
    so a smaller or non-power-of-two block must be refused with a ValueError, not launched."""
    zt = _zt()
    p = torch.zeros(10)
    with pytest.raises(ValueError, match="block_size"):
        zt.perturb_(**_perturb_args([p]), block_size=block)
    with pytest.raises(ValueError, match="block_size"):
        zt.zo_sgd_update_(**opspec.bind("zo_sgd_update_", params=[p], tensor_ids=[0], seeds=[1], coeffs=[0.5],
                                        lr=0.1), block_size=block)
    assert torch.equal(p, torch.zeros(10))


@pytest.mark.parametrize("block", [2**21, 100, True])
def test_triton_block_size_beyond_tritons_largest_block_or_not_a_power_of_two_is_refused(block):
    """Triton's blocks hold at most 2^20 elements: a larger block_size failed inside the launch
    (an InterpreterError / CompilationError, after the version counters were bumped), and
    philox4x32_10 took any block_size (100 failed in tl.arange). Refused up front, by name."""
    zt = _zt()
    p = torch.zeros(10)
    version = p._version
    with pytest.raises(ValueError, match="block_size"):
        zt.perturb_(**_perturb_args([p]), block_size=block)
    with pytest.raises(ValueError, match="block_size"):
        zt.philox4x32_10(torch.zeros(3, 4, dtype=torch.int64), 1, 2, block_size=block)
    assert torch.equal(p, torch.zeros(10)) and p._version == version


@pytest.mark.parametrize("op", ["perturb_", "philox4x32_10"])
def test_triton_block_size_at_either_end_of_its_range_runs_with_the_same_bits(op):
    """The range is inclusive: the least block (128 for perturb_ and the updates, whose tiles
    are [BLOCK // 128, 32, 4]; 1 for philox4x32_10) and Triton's largest (2^20) run, and give
    the bits of the default block."""
    zt = _zt()
    if op == "perturb_":
        def bits(block):
            p = torch.zeros(300)
            zt.perturb_(**_perturb_args([p]), **({} if block is None else {"block_size": block}))
            return p.view(torch.int32)
        ends = (128, 2**20)
    else:
        def bits(block):
            return zt.philox4x32_10(torch.arange(12, dtype=torch.int64).view(3, 4), 1, 2, block_size=block)
        ends = (1, 2**20)
    want = bits(None)
    for block in ends:
        assert torch.equal(bits(block), want), block


# ======================================================================================
# zeroflow.distributed: init_from_env
# ======================================================================================
class _FakeDist:
    """Records what init_from_env hands to torch.distributed (no group is made)."""

    def __init__(self, monkeypatch, initialized=False, rank=3, world=4):
        self.calls, self.devices = [], []
        monkeypatch.setattr(dist, "is_initialized", lambda: initialized)
        monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: self.calls.append((backend, kw)))
        monkeypatch.setattr(dist, "get_rank", lambda group=None: rank)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: world)
        monkeypatch.setattr(torch.cuda, "set_device", lambda d: self.devices.append(d))


def _torchrun_env(monkeypatch, **env):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, str(v))


def test_init_from_env_needs_both_rank_and_world_size(monkeypatch):
    """Only RANK (or only WORLD_SIZE) set: not a torchrun launch, None and no group."""
    fake = _FakeDist(monkeypatch)
    for env in ({"RANK": 0}, {"WORLD_SIZE": 2}):
        _torchrun_env(monkeypatch, **env)
        assert zd.init_from_env() is None
    assert fake.calls == []


def test_init_from_env_returns_the_existing_group_without_making_another(monkeypatch):
    """Already initialised (with or without torchrun's variables): the existing group's rank
    and size; init_process_group would raise ("initialize the default process group twice")."""
    fake = _FakeDist(monkeypatch, initialized=True, rank=1, world=2)
    for env in ({}, {"RANK": 1, "WORLD_SIZE": 2, "LOCAL_RANK": 1}):
        _torchrun_env(monkeypatch, **env)
        assert zd.init_from_env() == (1, 2)
    assert fake.calls == [] and fake.devices == []


def test_init_from_env_picks_nccl_on_local_rank_with_cuda_else_gloo(monkeypatch):
    """backend=None: nccl when CUDA is available, on cuda:LOCAL_RANK (not RANK: rank 5 of a
    2-node run is GPU 1 of its node); gloo otherwise, no device selected; the timeout in
    seconds."""
    fake = _FakeDist(monkeypatch, rank=5, world=8)
    _torchrun_env(monkeypatch, RANK=5, WORLD_SIZE=8, LOCAL_RANK=1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert zd.init_from_env(timeout_s=42.0) == (5, 8)
    assert fake.calls == [("nccl", {"timeout": datetime.timedelta(seconds=42)})]
    assert fake.devices == [1]
    fake.calls.clear(), fake.devices.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert zd.init_from_env() == (5, 8)
    assert fake.calls == [("gloo", {"timeout": datetime.timedelta(seconds=1800)})]
    assert fake.devices == []


def test_triton_refuses_a_bool_tensor_id_like_the_face():
    """check_ids: ``True`` is an int to isinstance but not a tensor id; the Triton op refuses
    it as the face (zk.perturb_) does. (The reference and the compiled ops take it as id 1.)"""
    zt = _zt()
    p = torch.zeros(8)
    with pytest.raises(ValueError, match=r"tensor_ids\[0\]"):
        zt.perturb_(**_perturb_args([p], tensor_ids=[True]))
    with pytest.raises(ValueError, match=r"tensor_ids\[0\]"):
        zt.zo_sgd_update_(**opspec.bind("zo_sgd_update_", params=[p], tensor_ids=[False], seeds=[1], coeffs=[0.5],
                                        lr=0.1))
    with pytest.raises(TypeError, match=r"tensor_ids\[0\]"):
        zk.perturb_([p], 1, 1.0, 0, tensor_ids=[True])
    assert torch.equal(p, torch.zeros(8))


# ======================================================================================
# zeroflow.distributed: rank-0 helpers and broadcasts (collectives faked)
# ======================================================================================
def test_is_main_process_is_rank_0_or_not_distributed(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    assert zd.is_main_process()
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    for rank, main in ((0, True), (1, False), (2, False)):
        monkeypatch.setattr(dist, "get_rank", lambda group=None, r=rank: r)
        assert zd.is_main_process() is main, rank


def test_broadcast_module_sends_every_nonempty_state_entry_from_src(monkeypatch):
    """broadcast_module_(m, src): each non-empty state_dict tensor (buffers included) is
    broadcast from ``src``, not from rank 0; an empty one is skipped (gloo refuses it)."""
    sent = []
    monkeypatch.setattr(dist, "broadcast", lambda t, src, group=None: sent.append((t.shape, src)))
    m = torch.nn.Linear(3, 2)
    m.register_buffer("empty", torch.zeros(0))
    m.register_buffer("running", torch.ones(4))
    zd.broadcast_module_(m, src=2)
    assert sorted(sent, key=str) == sorted([(torch.Size([2, 3]), 2), (torch.Size([2]), 2), (torch.Size([4]), 2)],
                                           key=str)


@pytest.mark.parametrize("be", ["triton", "torch"])
def test_a_buffer_of_another_shape_but_equal_numel_is_refused(be):
    """check_buffers compares shapes, not element counts: a [2, 4] momentum buffer for an [8]
    param is refused (as by the reference), not silently used as a flat view."""
    if be == "triton":
        _zt()
    p, b = torch.zeros(8), torch.zeros(2, 4)
    with pytest.raises(ValueError, match=r"momentum_buffers\[0\].*shape"):
        zk.call_op(be, "zo_sgd_update_", **opspec.bind("zo_sgd_update_", params=[p], momentum_buffers=[b],
                                                          tensor_ids=[0], seeds=[1], coeffs=[0.5], lr=0.1,
                                                          momentum=0.9))
    assert torch.equal(p, torch.zeros(8)) and torch.equal(b, torch.zeros(2, 4))


def test_shard_refuses_a_rank_outside_the_world():
    for rank in (3, 4, -1):
        with pytest.raises(ValueError, match="rank"):
            zd.shard(list(range(10)), rank, 3)
    with pytest.raises(ValueError, match="rank"):
        zd.ShardedBatchSampler(10, 4, 2, 2)


# ======================================================================================
# zeroflow.distributed: Comm and DataParallelZO on a simulated 2-rank group
# ======================================================================================
class _TwoRanks:
    """torch.distributed replaced so that this process is rank ``rank`` of a 2-rank gloo
    group whose other rank holds what ``peer(x)`` returns for each all_gather input ``x``
    (default: the same tensor, i.e. an identical rank). Broadcasts are recorded, all_reduce
    doubles (the peer holds the same tensor)."""

    def __init__(self, monkeypatch, rank=0, peer=None):
        self.rank, self.peer, self.broadcasts = rank, peer or (lambda x: x.clone()), []
        for name, fn in (("is_initialized", lambda: True), ("get_rank", lambda group=None: rank),
                         ("get_world_size", lambda group=None: 2), ("get_backend", lambda group=None: "gloo"),
                         ("all_gather", self.all_gather), ("broadcast", self.broadcast),
                         ("all_reduce", lambda x, op=None, group=None: x.mul_(2))):
            monkeypatch.setattr(dist, name, fn)

    def all_gather(self, outs, x, group=None):
        mine, theirs = x, self.peer(x)
        outs[self.rank].copy_(mine)
        outs[1 - self.rank].copy_(theirs)

    def broadcast(self, t, src, group=None):
        self.broadcasts.append((tuple(t.shape), src))


def _sgd_opt(seed=7, lr=1e-2, **kw):
    from zeroflow.optim import create

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    return model, create("zo_sgd", list(model.parameters()), lr=lr, seed=seed, backend="cpu", **kw)


def test_comm_broadcast_uses_src_and_counts_bytes_on_src_only(monkeypatch):
    fake = _TwoRanks(monkeypatch, rank=1)
    comm = zd.Comm()
    t = torch.zeros(5, dtype=torch.float64)
    comm.broadcast_(t, src=1)
    assert fake.broadcasts == [((5,), 1)] and comm.bytes_sent == 40 and comm.bytes_received == 40
    comm.reset()
    comm.broadcast_(t, src=0)
    assert fake.broadcasts[-1] == ((5,), 0) and comm.bytes_sent == 0 and comm.bytes_received == 40
    assert comm.snapshot()["by_op"] == {"broadcast": {"calls": 1, "bytes_sent": 0}}


def test_a_wrapped_optimizer_cannot_be_wrapped_again_until_detached(monkeypatch):
    """The scalar hook is the wrapper's _combine; a second DataParallelZO over the same
    optimizer would combine every loss twice (world^2 weighting): refused, until detach()."""
    _TwoRanks(monkeypatch)
    _, opt = _sgd_opt()
    dp = zd.DataParallelZO(opt)
    assert opt.scalar_hook == dp._combine
    with pytest.raises(RuntimeError, match="scalar hook"):
        zd.DataParallelZO(opt)
    dp.detach()
    assert opt.scalar_hook is None
    dp2 = zd.DataParallelZO(opt)
    dp.detach()                                    # another wrapper's detach leaves dp2's hook
    assert opt.scalar_hook == dp2._combine


def test_setup_traffic_is_not_counted_and_broadcast_params_sends_from_rank_0(monkeypatch):
    fake = _TwoRanks(monkeypatch, rank=1)
    model, opt = _sgd_opt()
    dp = zd.DataParallelZO(opt, broadcast_params=True)
    assert sorted(fake.broadcasts) == sorted([((1, 4), 0), ((1,), 0)])
    assert dp.comm.snapshot() == {"bytes_sent": 0, "bytes_received": 0, "calls": 0, "by_op": {}}


@pytest.mark.parametrize("rank", [0, 1])
def test_all_gather_object_pads_to_the_longest_rank(monkeypatch, rank):
    """Objects of different JSON lengths (what a mismatch report gathers): each rank's bytes are
    padded to the longest, whichever rank holds it, and cut back to its own length."""
    import json

    theirs = {"seed": 8, "groups": [{"lr": 0.01, "momentum": 0.9}], "note": "x" * 40}
    raw = json.dumps(theirs, sort_keys=True).encode()

    def peer(x):
        if x.dtype == torch.int64:
            return torch.tensor([len(raw)], dtype=torch.int64)
        return torch.frombuffer(bytearray(raw + b"\0" * (x.numel() - len(raw))), dtype=torch.uint8)

    _TwoRanks(monkeypatch, rank=rank, peer=peer)
    mine = {"seed": 7}
    got = zd.Comm().all_gather_object(mine)
    assert got == ([mine, theirs] if rank == 0 else [theirs, mine])


def test_sgd_update_refuses_a_mask_seed_outside_63_bits_on_triton():
    """prepare_update checks mask_seed like every seed (it is split into key words only after):
    the Triton update ops refuse what the reference refuses, before writing anything."""
    zt = _zt()
    p = torch.zeros(8)
    for bad in (-1, 1 << 63):
        args = opspec.bind("zo_sgd_update_", params=[p], tensor_ids=[0], seeds=[1], coeffs=[0.5], lr=0.1,
                           mask_seed=bad, mask_threshold=1 << 23)
        for op in (R.zo_sgd_update_, zt.zo_sgd_update_):
            with pytest.raises(ValueError, match="mask_seed"):
                op(**args)
    assert torch.equal(p, torch.zeros(8))


def test_checksums_tell_positions_dtypes_and_shapes_apart():
    """param_checksum hashes dtype and shape with the bytes; state_checksum names each entry by
    its parameter position: a buffer held by another parameter, or bytes reinterpreted,
    is a different checksum (what check_params compares across ranks)."""
    z = torch.zeros(4)
    assert zd.param_checksum([z]) != zd.param_checksum([torch.zeros(2, dtype=torch.float64)])
    assert zd.param_checksum([z]) != zd.param_checksum([torch.zeros(2, 2)])
    from zeroflow.optim import create

    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(3))
    opt = create("zo_sgd", [a, b], lr=1e-2, momentum=0.9, seed=1, backend="cpu")
    opt.state[a]["momentum_buffer"] = torch.ones(3)       # rank 0: a's buffer; rank 1: the same on b
    before = zd.state_checksum(opt)
    opt.state[b]["momentum_buffer"] = opt.state[a].pop("momentum_buffer")
    assert zd.state_checksum(opt) != before


def _bits(ts):
    return [t.view(torch.int32 if t.dtype == torch.float32 else torch.int16).clone() for t in ts]


def _run_both(op, make, **kw):
    """``op`` on the reference and on Triton from the same fresh tensors; bits of every tensor."""
    zt = _zt()
    out = []
    for fn in (getattr(R, op), getattr(zt, op)):
        tensors = make()
        fn(**opspec.bind(op, **tensors, **kw))
        out.append(_bits([t for v in tensors.values() for t in v]))
    return out


# Scalars whose derived value differs when computed from the fp32-rounded scalar instead of the
# argument (round32(1 - d) != round32(1 - round32(d)) for d = 0.058, 0.067, ...; likewise
# round32(1 - 0.7 * 0.049)):
# the Triton glue must derive 1 - dampening, 1 - alpha, 1 - beta and 1 - lr*wd from the
# unrounded arguments, as torch.optim and the reference do.
def test_sgd_derived_scalars_come_from_the_unrounded_arguments():
    def make():
        return {"params": [torch.randn(300, generator=torch.Generator().manual_seed(2))],
                "momentum_buffers": [torch.randn(300, generator=torch.Generator().manual_seed(3))],
                "history_buffers": [torch.randn(300, generator=torch.Generator().manual_seed(4))]}
    ref, tri = _run_both("zo_sgd_update_", make, tensor_ids=[0], seeds=[5, 6], coeffs=[0.75, -1.25], dist=1,
                         lr=0.5, momentum=0.9, dampening=0.058, history_alpha=0.067, weight_decay=0.0)
    assert all(torch.equal(a, b) for a, b in zip(ref, tri))


@pytest.mark.parametrize("decoupled", [False, True])
def test_adam_derived_scalars_come_from_the_unrounded_arguments(decoupled):
    def make():
        return {"params": [torch.randn(300, generator=torch.Generator().manual_seed(2))],
                "exp_avgs": [torch.randn(300, generator=torch.Generator().manual_seed(3))],
                "exp_avg_sqs": [torch.rand(300, generator=torch.Generator().manual_seed(4))],
                "history_buffers": [torch.randn(300, generator=torch.Generator().manual_seed(5))]}
    ref, tri = _run_both("zo_adam_update_", make, tensor_ids=[0], seeds=[5, 6], coeffs=[0.75, -1.25], dist=1,
                         lr=0.7, beta1=0.058, beta2=0.067, eps=1e-3, weight_decay=0.049,
                         decoupled_weight_decay=decoupled, step=3, history_alpha=0.118)
    assert all(torch.equal(a, b) for a, b in zip(ref, tri))


@pytest.mark.parametrize("op", ["zo_sgd_update_", "zo_adam_update_"])
def test_weight_decay_zero_leaves_non_finite_params_as_the_reference_does(op):
    """weight_decay == 0 skips the decay term (g + p * 0 would turn an inf param's g into NaN)."""
    def make():
        p = [torch.tensor([float("inf"), -float("inf"), 1.0, -0.0] * 40)]
        if op == "zo_sgd_update_":
            return {"params": p}
        return {"params": p, "exp_avgs": [torch.zeros(160)], "exp_avg_sqs": [torch.zeros(160)]}
    kw = dict(tensor_ids=[0], seeds=[5], coeffs=[0.5], dist=1, lr=0.1, weight_decay=0.0)
    if op == "zo_adam_update_":
        kw["step"] = 1
    ref, tri = _run_both(op, make, **kw)
    assert all(torch.equal(a, b) for a, b in zip(ref, tri))


@pytest.mark.parametrize("momentum,with_buffers", [(0.0, True), (0.9, False)])
def test_sgd_momentum_is_on_when_buffers_are_given_whatever_its_value(momentum, with_buffers):
    """The momentum step runs iff momentum_buffers is non-empty (the schema's switch), not iff
    momentum != 0: momentum=0 with buffers still writes buf = (1 - dampening) g; momentum=0.9
    without buffers is plain SGD (the absent buffer's slot holds the param's pointer)."""
    def make():
        d = {"params": [torch.randn(300, generator=torch.Generator().manual_seed(2))]}
        if with_buffers:
            d["momentum_buffers"] = [torch.randn(300, generator=torch.Generator().manual_seed(3))]
        return d
    ref, tri = _run_both("zo_sgd_update_", make, tensor_ids=[0], seeds=[5], coeffs=[0.5], dist=1, lr=0.1,
                         momentum=momentum, dampening=0.25)
    assert all(torch.equal(a, b) for a, b in zip(ref, tri))


@pytest.mark.parametrize("op", ["zo_sgd_update_", "zo_adam_update_"])
def test_update_refuses_a_round_seed_outside_63_bits_on_triton(op):
    zt = _zt()
    p = torch.zeros(8, dtype=torch.bfloat16)
    bufs = {} if op == "zo_sgd_update_" else {"exp_avgs": [torch.zeros(8)], "exp_avg_sqs": [torch.zeros(8)], "step": 1}
    for bad in (-1, 1 << 63):
        args = opspec.bind(op, params=[p], tensor_ids=[0], seeds=[1], coeffs=[0.5], lr=0.1,
                           stochastic_rounding=True, round_seed=bad, **bufs)
        for fn in (getattr(R, op), getattr(zt, op)):
            with pytest.raises(ValueError, match="round_seed"):
                fn(**args)
    assert torch.equal(p, torch.zeros(8, dtype=torch.bfloat16))


def test_a_half_built_or_copied_wrapper_raises_attribute_error_not_recursion(monkeypatch):
    """__getattr__ delegates to the wrapped optimizer, except for its own slots: on an instance
    without them (copy/pickle protocols make one with __new__) a lookup is an AttributeError."""
    import copy

    obj = zd.DataParallelZO.__new__(zd.DataParallelZO)
    assert not hasattr(obj, "step_count")
    _TwoRanks(monkeypatch)
    _, opt = _sgd_opt()
    dp = zd.DataParallelZO(opt)
    assert copy.copy(dp).optimizer is opt


def test_triton_adam_refuses_missing_second_moments():
    """zo_adam_update_ needs exp_avg_sqs (not optional like history): [] must be refused, not
    read and written through the placeholder slot, which holds the param's pointer."""
    zt = _zt()
    p, m = torch.ones(8), torch.zeros(8)
    args = opspec.bind("zo_adam_update_", params=[p], exp_avgs=[m], exp_avg_sqs=[], tensor_ids=[0], seeds=[1],
                       coeffs=[0.5], lr=1e-3, step=1)
    with pytest.raises(ValueError, match="exp_avg_sqs"):
        zt.zo_adam_update_(**args)
    assert torch.equal(p, torch.ones(8)) and torch.equal(m, torch.zeros(8))


def test_triton_adam_moments_of_different_dtypes_go_to_their_own_slots():
    """A bf16 param with an fp32 exp_avg and a bf16 exp_avg_sq: each buffer is read and stored
    with its own dtype (M_DTYPE = slot 1, V_DTYPE = slot 2), bit-identical to the reference."""
    def make():
        g = torch.Generator().manual_seed(9)
        return {"params": [torch.randn(300, generator=g).bfloat16()],
                "exp_avgs": [torch.randn(300, generator=g)],
                "exp_avg_sqs": [torch.rand(300, generator=g).bfloat16()]}
    ref, tri = _run_both("zo_adam_update_", make, tensor_ids=[0], seeds=[5], coeffs=[0.5], dist=1, lr=1e-2, step=2)
    assert all(torch.equal(a, b) for a, b in zip(ref, tri))


def test_triton_perturb_of_an_empty_list_is_a_no_op():
    zt = _zt()
    zt.perturb_(**_perturb_args([]))
    zt.zo_sgd_update_(**opspec.bind("zo_sgd_update_", params=[], tensor_ids=[], seeds=[1], coeffs=[0.5], lr=0.1))


def test_triton_philox_of_non_contiguous_counters_and_several_programs():
    """philox4x32_10 reads row-major [N, 4] counters: a transposed view is made contiguous
    first; with N > block_size the grid covers every row (ceil, not floor)."""
    zt = _zt()
    g = torch.Generator().manual_seed(3)
    base = torch.randint(0, 2**32, (4, 300), dtype=torch.int64, generator=g)
    counters = base.t()                               # [300, 4], not contiguous
    assert not counters.is_contiguous()
    want = R.philox4x32_10(counters.contiguous(), 123, 2**32 - 1)
    assert torch.equal(zt.philox4x32_10(counters, 123, 2**32 - 1), want)
    assert torch.equal(zt.philox4x32_10(counters.contiguous(), 123, 2**32 - 1, block_size=128), want)


def test_ranks_on_their_own_gpus_describe_the_same_setup():
    """Under NCCL rank r's parameters are on cuda:LOCAL_RANK. zo_options keyed the resolved
    backend by the device's string, so rank 0 described {"cuda:0": ...} and rank 1
    {"cuda:1": ...}: verify_same_setup refused every multi-GPU DataParallelZO as a mismatch."""
    import types

    def zo_on(*devices):
        return types.SimpleNamespace(param_groups=[{"params": [types.SimpleNamespace(device=d) for d in devices]}],
                                     q=1, estimator="two_side", conserve=False, sparse_resample=False, backend="torch")

    rank0, rank1 = (zd.zo_options(zo_on(torch.device("cuda", r))) for r in (0, 1))
    assert rank0 == rank1 and zd._digest(rank0) == zd._digest(rank1)
    assert rank0["resolved_backend"] == {"cuda": "torch"}
    assert zd.zo_options(zo_on(torch.device("cpu")))["resolved_backend"] == {"cpu": "torch"}


# ======================================================================================
# Triton: the launch runs on the tensors' CUDA device (emulated on the CPU)
# The update kernels' DIST, RESTORE, SPARSE and ONE_QUERY are tl.constexpr (zfkernels/triton/
# _update.py): as runtime scalars the Rademacher sgd kernel held the Gaussian path's registers
# (165 against 40 with them constant, 26.8 % against 63.6 % of copy_ on an H200).
_CONSTANTS = ("DIST", "RESTORE", "SPARSE", "ONE_QUERY")


@pytest.mark.parametrize("op,opts,want", [
    # Gaussian, q = 2, sparse, a pending restore
    ("zo_sgd_update_", dict(dist=0, seeds=[5, 6], coeffs=[0.75, -1.25], mask_seed=9, mask_threshold=1 << 23,
                            restore_seed=3, restore_scale=-0.5), (0, 1, 1, 0)),
    # Rademacher, q = 1, no restore, dense; c = -0: g = 0 + z * c is +0 where z * c is -0, and
    # theta = -0 - g * lr tells them apart (-0 - +0 = -0, -0 - -0 = +0)
    ("zo_sgd_update_", dict(dist=1, seeds=[5], coeffs=[-0.0]), (1, 0, 0, 1)),
    ("zo_sgd_update_", dict(dist=1, seeds=[], coeffs=[], restore_seed=4, restore_scale=0.25), (1, 1, 0, 0)),
    ("zo_adam_update_", dict(dist=1, seeds=[5], coeffs=[0.5], restore_seed=3, restore_scale=0.25, step=2),
     (1, 1, 0, 1)),
    ("zo_adam_update_", dict(dist=0, seeds=[5, 6, 7], coeffs=[0.5, -0.25, 2.0], mask_seed=2, mask_threshold=1 << 22,
                             step=1), (0, 0, 1, 0)),
])
def test_update_kernels_take_dist_restore_sparse_and_one_query_as_compile_time_constants(
        monkeypatch, op, opts, want):
    """Each launch passes DIST, RESTORE, SPARSE and ONE_QUERY as the kernel's constexprs with
    the values of its options, and the results stay the reference's, bit for bit."""
    _zt()          # skips where Triton cannot run here
    from zfkernels.triton import adam_update, sgd_update

    mod, name = (sgd_update, "_sgd_kernel") if op == "zo_sgd_update_" else (adam_update, "_adam_kernel")
    real = getattr(mod, name)
    params = inspect.signature(real.fn).parameters
    runtime = [n for n in _CONSTANTS if n not in params or "constexpr" not in str(params[n].annotation)]
    assert not runtime, f"{name}: {runtime} are not compile-time constants"
    launches = []

    class InterpretedFunction:     # the name the glue checks (interpreted()): a recorder that launches
        def __getitem__(self, grid):
            def launch(*args, **kw):
                launches.append(kw)
                return real[grid](*args, **kw)
            return launch

    monkeypatch.setattr(mod, name, InterpretedFunction())

    def make():
        p = torch.randn(300, generator=torch.Generator().manual_seed(2))
        p[::3] = -0.0
        if op == "zo_sgd_update_":
            return {"params": [p]}
        return {"params": [p], "exp_avgs": [torch.zeros(300)], "exp_avg_sqs": [torch.zeros(300)]}
    ref, tri = _run_both(op, make, tensor_ids=[0], lr=0.1, **opts)
    assert [tuple(kw[n] for n in _CONSTANTS) for kw in launches] == [want]
    assert all(torch.equal(a, b) for a, b in zip(ref, tri))


# ======================================================================================
class _OnCuda1(torch.Tensor):
    """A CPU tensor that says it lives on cuda:1 (what the Triton glue reads of it)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


@pytest.mark.parametrize("op", ["perturb_", "zo_sgd_update_", "zo_adam_update_", "philox4x32_10"])
def test_triton_launches_on_the_params_cuda_device_not_the_current_one(monkeypatch, op):
    """Triton's JITFunction.run launches on the *current* CUDA device and its current stream,
    whatever device the tensors are on; the compiled CUDA ops enter the params' device
    (CUDAGuard), the Triton glue must too: params on cuda:1 with cuda:0 current (--device
    cuda:1, a model split over GPUs: one fused call per device) ran cuda:0's kernel on cuda:1's
    memory. Emulated: tensors that report cuda:1, torch.cuda.device recorded, the kernels
    replaced by a recorder of the device current at each launch."""
    triton_package_or_skip()         # no kernel runs here, but the package must import
    from zfkernels.triton import adam_update, perturb, philox, sgd_update

    current = [0]

    class _Device:                 # torch.cuda.device: makes its device the current one
        def __init__(self, d):
            self.d = torch.device(d)

        def __enter__(self):
            self.prev, current[0] = current[0], self.d.index
            return self

        def __exit__(self, *exc):
            current[0] = self.prev
            return False

    launches = []

    class JITFunction:             # not "InterpretedFunction": the compiled launch (the interpreter refuses GPUs)
        def __getitem__(self, grid):
            return lambda *a, **k: launches.append(current[0])

    monkeypatch.setattr(torch.cuda, "device", _Device)
    real_to = torch.Tensor.to

    def to(self, *a, **k):         # the pointer table's upload to "cuda:1" stays where it is
        if a and isinstance(a[0], torch.device) and a[0].type == "cuda":
            return self
        return real_to(self, *a, **k)

    monkeypatch.setattr(torch.Tensor, "to", to)
    for mod, name in ((perturb, "_perturb_kernel"), (sgd_update, "_sgd_kernel"), (adam_update, "_adam_kernel"),
                      (philox, "_philox_kernel")):
        monkeypatch.setattr(mod, name, JITFunction())
    p = [torch.zeros(300).as_subclass(_OnCuda1), torch.zeros(7).as_subclass(_OnCuda1)]
    assert p[0].device == torch.device("cuda", 1)
    if op == "perturb_":
        perturb.perturb_(**_perturb_args(p))
    elif op == "zo_sgd_update_":
        sgd_update.zo_sgd_update_(**opspec.bind(op, params=p, tensor_ids=[0, 1], seeds=[1], coeffs=[0.5], lr=0.1))
    elif op == "zo_adam_update_":
        m = [torch.zeros_like(t).as_subclass(_OnCuda1) for t in p]
        v = [torch.zeros_like(t).as_subclass(_OnCuda1) for t in p]
        adam_update.zo_adam_update_(**opspec.bind(op, params=p, exp_avgs=m, exp_avg_sqs=v, tensor_ids=[0, 1],
                                                  seeds=[1], coeffs=[0.5], lr=0.1, step=1))
    else:
        philox.philox4x32_10(torch.zeros(5, 4, dtype=torch.int64).as_subclass(_OnCuda1), 1, 2)
    assert launches and all(d == 1 for d in launches), f"launched with cuda:{launches} current, params on cuda:1"
    assert current[0] == 0                # the caller's current device is back
