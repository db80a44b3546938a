"""--precision (issue 12): the forward's dtype changes, the parameters' does not; the fidelity
script's fast mode; the warning for a zo_eps the study found unsafe; a bf16 run on digits."""
import json
import math

import pytest
import torch

from zeroflow.continual.defaults import OPTIMIZERS
from zeroflow.continual.errors import ZeroflowError

TINY = dict(patch_size=2, embed_dim=16, depth=2, num_heads=2, mlp_ratio=2.0)


def _net(precision):
    from zeroflow.continual.backbones import AdaptedViT, build_small_vit
    net = AdaptedViT(build_small_vit(1, 8, TINY), 4)
    net.add_adapter_set()
    net.precision = precision
    return net.eval()


@pytest.mark.parametrize("precision,dtype", [("fp32", torch.float32), ("tf32", torch.float32),
                                             ("bf16", torch.bfloat16)])
def test_precision_sets_the_forward_dtype_not_the_parameters(precision, dtype):
    net = _net(precision)
    seen = {}
    hooks = [net.vit.blocks[0].mlp.fc1.register_forward_hook(lambda m, i, o: seen.__setitem__("mlp", o.dtype)),
             net.adapters[0][1].down.register_forward_hook(lambda m, i, o: seen.__setitem__("adapter", o.dtype))]
    try:
        f = net.features(torch.rand(3, 1, 8, 8), 0)
    finally:
        for h in hooks:
            h.remove()
    assert seen == {"mlp": dtype, "adapter": dtype}
    assert f.dtype == torch.float32                     # the head, prototypes and loss stay fp32
    assert {p.dtype for p in net.parameters()} == {torch.float32}


def _tf32_state():
    """What the TF32 switches say (new API where this torch has it: reading the legacy
    matmul flag raises once the new one was set)."""
    m, c = torch.backends.cuda.matmul, torch.backends.cudnn
    if hasattr(m, "fp32_precision"):
        return m.fp32_precision, c.conv.fp32_precision, c.rnn.fp32_precision
    return m.allow_tf32, c.allow_tf32


def test_tf32_flags_are_set_in_the_forward_and_restored_after_it():
    from zeroflow.continual.precision import forward_precision
    before = _tf32_state()
    on = ("tf32",) * 3 if hasattr(torch.backends.cuda.matmul, "fp32_precision") else (True, True)
    off = ("ieee",) * 3 if hasattr(torch.backends.cuda.matmul, "fp32_precision") else (False, False)
    with forward_precision("tf32", "cuda"):
        assert _tf32_state() == on
    assert _tf32_state() == before
    with forward_precision("fp32", "cuda"):     # fp32 on CUDA: TF32 off even where the process enabled it
        assert _tf32_state() == off
    assert _tf32_state() == before



@pytest.mark.parametrize("precision", ["tf32", "fp32"])
def test_tf32_flags_are_restored_to_what_the_process_had_not_to_a_default(precision):
    """The switches are put back to the values read before the forward, whatever they were
    (here a mix that is neither all-on nor all-off), not to the values of either mode."""
    from zeroflow.continual.precision import _tf32_settings, forward_precision
    settings = _tf32_settings()
    saved = [getattr(obj, name) for obj, name, _, _ in settings]
    mixed = [on if i % 2 else off for i, (_, _, on, off) in enumerate(settings)]
    try:
        for (obj, name, _, _), v in zip(settings, mixed):
            setattr(obj, name, v)
        with forward_precision(precision, "cuda"):
            pass
        assert [getattr(obj, name) for obj, name, _, _ in settings] == mixed
    finally:
        for (obj, name, _, _), v in zip(settings, saved):
            setattr(obj, name, v)

@pytest.mark.skipif(not hasattr(torch.backends.cuda.matmul, "fp32_precision"), reason="torch < 2.9: no new TF32 API")
@pytest.mark.parametrize("precision,device", [("tf32", "cpu"), ("tf32", "cuda"), ("fp32", "cuda")])
def test_a_process_that_set_tf32_with_torchs_new_api_runs_every_precision(precision, device):
    """torch >= 2.9 advises ``torch.backends.cuda.matmul.fp32_precision = "tf32"``; after it,
    reading the legacy ``matmul.allow_tf32`` raises "you have used mix of the legacy and new
    APIs", and the precision context read it: a tf32 run (and an fp32 run on CUDA) failed at
    its first forward. The context now uses the new switches, and restores them."""
    from zeroflow.continual.precision import forward_precision
    m = torch.backends.cuda.matmul
    saved = m.fp32_precision
    m.fp32_precision = "tf32"
    try:
        with forward_precision(precision, device):
            assert m.fp32_precision == ("tf32" if precision == "tf32" else "ieee")
        assert m.fp32_precision == "tf32"
    finally:
        m.fp32_precision = saved


def test_precision_lists_agree():
    from zeroflow.continual import defaults, precision
    assert defaults.PRECISIONS == precision.PRECISIONS
    assert set(precision.MIN_SAFE_ZO_EPS) == set(precision.PRECISIONS)


def test_unsafe_zo_eps_warning():
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.precision import MIN_SAFE_ZO_EPS, zo_eps_warning
    floor = MIN_SAFE_ZO_EPS["bf16"]
    assert floor == 7e-4           # the CPU study: correlation 0.811 at 1e-4, 0.9963 at 1e-3 (fit: 6.0e-4)
    low = resolve({"precision": "bf16", "zo_eps": floor / 10})
    msg = zo_eps_warning(low, "cpu")
    assert msg.startswith(f"--precision bf16 with --zo-eps {floor / 10:g}") and f"--zo-eps {floor:g}" in msg
    assert zo_eps_warning(resolve({"precision": "bf16", "zo_eps": floor}), "cpu") is None
    assert zo_eps_warning(resolve({"precision": "fp32", "zo_eps": 1e-6}), "cuda") is None
    assert zo_eps_warning(resolve({"precision": "fp32", "zo_eps": 1e-8}), "cpu").endswith("use --zo-eps 6e-07 or more")
    # tf32 is fp32 on a CPU; on CUDA the emulation's floor applies
    tf32 = resolve({"precision": "tf32", "zo_eps": MIN_SAFE_ZO_EPS["tf32"] / 10})
    assert zo_eps_warning(tf32, "cpu") is None and zo_eps_warning(tf32, "cuda").startswith("--precision tf32")
    # first-order and jvp steps divide no loss difference by eps
    for optimizer in ("fo_sgd", "forward_grad"):
        assert zo_eps_warning(resolve({"precision": "bf16", "zo_eps": floor / 10, "optimizer": optimizer}), "cpu") \
            is None


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_every_finite_difference_optimizer_is_warned_and_no_other(optimizer):
    """The unsafe-zo_eps warning is for every method whose step is (L+ - L-) / (2 eps): each
    method create() builds from the ZO registry without the jvp estimator (the _sign and
    _conserve variants included); forward_grad (jvps) and fo_* (backward) are never warned."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.precision import MIN_SAFE_ZO_EPS, zo_eps_warning
    from zeroflow.optim import _ZO
    cfg = resolve({"precision": "bf16", "zo_eps": MIN_SAFE_ZO_EPS["bf16"] / 10, "optimizer": optimizer})
    msg = zo_eps_warning(cfg, "cpu")
    if optimizer in _ZO:
        assert msg is not None and msg.startswith("--precision bf16 with --zo-eps"), optimizer
    else:
        assert msg is None, optimizer


def test_bad_precision_is_named():
    from zeroflow.continual.defaults import resolve
    with pytest.raises(ZeroflowError, match="unknown precision 'fp8'; valid: fp32, tf32, bf16, fp16"):
        resolve({"precision": "fp8"})


# ---------------------------------------------------------------- the fidelity study (fast mode)
def test_fidelity_script_fast_mode(tmp_path):
    from benchmarks import precision_fidelity as pf
    out = tmp_path / "fid.json"
    assert pf.main(["--fast", "--out", str(out), "--threads", "1"]) == 0
    res = json.loads(out.read_text())
    assert (tmp_path / "fid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    r = res["results"]
    assert res["directions"] == 32 and res["eps"] == [1e-4, 1e-3, 1e-2]
    for eps in ("0.0001", "0.001", "0.01"):
        assert r["fp32"]["by_eps"][eps]["correlation"] >= 0.999, (eps, r["fp32"]["by_eps"][eps])
        assert math.isfinite(r["fp64"]["by_eps"][eps]["vs_exact"]["correlation"])
        for p in ("bf16", "tf32-emulated"):
            stats = r[p]["by_eps"][eps]
            assert all(math.isfinite(stats[k]) for k in ("correlation", "relative_error", "sign_agreement")), p
    assert r["tf32"]["status"] == "identical to fp32 on this device"
    assert r["fp16"]["status"] in ("measured", "unsupported")
    # the reduced precisions are measurably worse than fp32 at the smallest eps
    assert r["bf16"]["by_eps"]["0.0001"]["relative_error"] > r["fp32"]["by_eps"]["0.0001"]["relative_error"]
    assert res["recommendation"]["precision"] in ("fp32", "tf32", "bf16", "fp16")


def test_tf32_emulation_rounds_to_ten_mantissa_bits():
    from benchmarks.precision_fidelity import round_to_tf32
    x = torch.tensor([1.0 + 2 ** -10, 1.0 + 2 ** -11, 1.0 + 3 * 2 ** -11, -(1.0 + 2 ** -12), 3.0], dtype=torch.float32)
    # ties to even: 1 + 2^-11 is halfway between 1 and 1 + 2^-10 -> 1; 1 + 3*2^-11 -> 1 + 2^-9
    assert round_to_tf32(x).tolist() == [1.0 + 2 ** -10, 1.0, 1.0 + 2 ** -9, -1.0, 3.0]


# ---------------------------------------------------------------- runs
QUICK = dict(epochs=1, pretrain_epochs=1, init_cls=5, increment=5, baseline="none")


def test_bf16_run_on_digits_completes_and_is_its_own_run(tmp_path, zf_cache):
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import run
    warnings = []
    cfg = resolve(dict(QUICK, precision="bf16", zo_eps=1e-4))
    m = run(cfg, str(tmp_path / "r"), progress=False, log=lambda *a: None, warn=warnings.append)
    assert m["precision"] == "bf16" and m["config"]["precision"] == "bf16"
    assert math.isfinite(m["avg"]) and m["avg"] > 30
    assert any(w.startswith("--precision bf16 with --zo-eps 0.0001") for w in warnings), warnings
    with open(tmp_path / "r" / "config.json") as f:
        assert json.load(f)["precision"] == "bf16"
    # the precision is part of the run's identity: an fp32 request is another run
    with pytest.raises(ZeroflowError, match="precision: 'bf16' there, 'fp32' requested"):
        run(resolve(dict(QUICK, zo_eps=1e-4)), str(tmp_path / "r"), progress=False, log=lambda *a: None)


def test_a_precision_this_torch_cannot_run_fails_before_writing(tmp_path, zf_cache, monkeypatch):
    """fp16 autocasts on this CPU with torch 2.14; where a torch cannot, the run stops at once."""
    from zeroflow.continual import precision
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import run
    assert precision.autocast_problem("bf16", torch.device("cpu")) is None
    monkeypatch.setattr(precision, "autocast_problem", lambda p, d: "RuntimeError: no fp16 kernels" if p == "fp16"
                        else None)
    with pytest.raises(ZeroflowError, match=r"--precision fp16 cannot run on cpu with torch .* \(RuntimeError: no fp16 "
                                            r"kernels\); use --precision fp32 or bf16"):
        run(resolve(dict(QUICK, precision="fp16")), str(tmp_path / "r"), progress=False, log=lambda *a: None)
    assert not (tmp_path / "r").exists()


def test_an_autocast_that_leaves_fp32_is_a_problem_not_a_silent_fp32_run(monkeypatch):
    """A torch whose autocast runs but computes in fp32 would make a bf16 run an fp32 one
    under the bf16 name: autocast_problem checks the dtype the layer came out in."""
    import contextlib

    from zeroflow.continual import precision
    cpu = torch.device("cpu")
    assert precision.autocast_problem("bf16", cpu) is None
    monkeypatch.setattr(precision, "forward_precision", lambda p, d: contextlib.nullcontext())
    assert precision.autocast_problem("bf16", cpu) == "autocast on cpu left a linear layer in torch.float32"
    assert precision.autocast_problem("fp32", cpu) is None


@pytest.mark.parametrize("fails, hint", [(("bf16",), "fp32 or fp16"), (("bf16", "fp16"), "fp32"),
                                         (("fp16",), "fp32 or bf16")])
def test_a_precision_that_cannot_run_suggests_one_that_can(monkeypatch, fails, hint):
    """A bf16 run where bf16 cannot autocast was told to use "--precision fp32 or bf16":
    the fix named the precision that had just failed. Now: fp32, and the other reduced
    precision when it runs here."""
    from zeroflow.continual import precision
    monkeypatch.setattr(precision, "autocast_problem", lambda p, d: "RuntimeError: no kernels" if p in fails
                        else None)
    with pytest.raises(ZeroflowError) as e:
        precision.check_run_precision({"precision": fails[0], "optimizer": "zo_adam", "zo_eps": 1e-3},
                                      torch.device("cpu"), warn=lambda m: None)
    assert str(e.value).endswith(f"(RuntimeError: no kernels); use --precision {hint}"), str(e.value)


# ---------------------------------------------------------------- fp16 loss scaling
def _first_step_grads(precision, scaler, tiny=1e-7):
    """The gradients the optimizer steps with, after one fo_sgd train_step of an adapter set
    and a cosine head on a loss ``tiny`` times cross-entropy: gradients of order 1e-9, below
    fp16's smallest subnormal (6e-8)."""
    import torch.nn.functional as F

    from zeroflow.continual.learners import CosineLinear
    from zeroflow.optim import create, train_step
    torch.manual_seed(0)
    net = _net(precision)
    head = CosineLinear(net.dim, 3)
    params = list(net.adapters[0].parameters()) + list(head.parameters())
    opt = create("fo_sgd", params, lr=0.1)
    seen = []
    opt.register_step_pre_hook(lambda o, a, k: seen.append([p.grad.clone() for p in params]))
    x, y = torch.rand(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    train_step(opt, lambda: tiny * F.cross_entropy(head(net.features(x, 0)), y),
               *([scaler] if scaler is not None else []))
    assert len(seen) == 1
    return seen[0]


def test_fp16_first_order_gradients_are_scaled_not_flushed_to_zero():
    """Without loss scaling, fp16 backward flushed every small adapter gradient to 0 (the
    optimizer stepped with zeros); train_step with a GradScaler hands it the fp32 gradient."""
    ref = _first_step_grads("fp32", None)
    unscaled = _first_step_grads("fp16", None)
    scaled = _first_step_grads("fp16", torch.amp.GradScaler("cpu"))
    moving = [i for i, g in enumerate(ref) if float(g.abs().max()) > 0]
    adapters = [i for i in moving if i < len(ref) - 2]          # the last two: the head's weight and sigma
    assert adapters
    assert all(float(unscaled[i].abs().max()) == 0 for i in adapters)    # what fp16 did before
    for i in moving:
        assert float((scaled[i] - ref[i]).norm() / ref[i].norm()) < 5e-2, i      # fp16 rounding: ~1e-2


def test_grad_scaler_only_for_fp16_backward():
    from zeroflow.continual.precision import grad_scaler
    cpu = torch.device("cpu")
    assert isinstance(grad_scaler({"precision": "fp16", "optimizer": "fo_adam"}, cpu), torch.amp.GradScaler)
    assert isinstance(grad_scaler({"precision": "fp16", "optimizer": "zo_sgd", "hybrid_switch": 5}, cpu),
                      torch.amp.GradScaler)
    for cfg in ({"precision": "fp16", "optimizer": "zo_adam"}, {"precision": "fp16", "optimizer": "forward_grad"},
                {"precision": "bf16", "optimizer": "fo_sgd"}, {"precision": "fp32", "optimizer": "fo_sgd"},
                {"precision": "tf32", "optimizer": "fo_adam", "hybrid_switch": 3}):
        assert grad_scaler(cfg, cpu) is None, cfg


@pytest.mark.parametrize("kw", [dict(optimizer="fo_sgd", lr=0.05), dict(optimizer="zo_sgd", hybrid_switch=3)],
                         ids=["fo_sgd", "hybrid"])
def test_fp16_first_order_run_resumes_as_it_would_have_gone_on(tmp_path, zf_cache, kw):
    """The loss scaler's state (its scale, its growth tracker) is in the run checkpoint: a
    resumed fp16 run scales as the uninterrupted one did, and ends with the same results."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import load_checkpoint, run
    quiet = dict(progress=False, log=lambda *a: None, warn=lambda *a: None)
    cfg = resolve(dict(QUICK, precision="fp16", zo_eps=1e-3, **kw))
    full = run(cfg, str(tmp_path / "full"), **quiet)
    assert run(cfg, str(tmp_path / "part"), stop_after=1, **quiet)["stopped_after"] == 1
    saved = load_checkpoint(str(tmp_path / "part" / "checkpoint.pt"))["grad_scaler"]
    assert saved["scale"] > 0 and "_growth_tracker" in saved
    part = run({}, str(tmp_path / "part"), resume=True, **quiet)
    for k in ("avg", "last", "accuracy_matrix", "accuracy_curve", "forward_passes", "iterations"):
        assert part[k] == full[k], k
    assert (load_checkpoint(str(tmp_path / "part" / "checkpoint.pt"))["grad_scaler"]
            == load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))["grad_scaler"])
    # every step's forward is counted, those the scaler skipped (inf/nan gradients) too
    if kw["optimizer"].startswith("fo_"):
        assert full["forward_passes"] == full["iterations"]


def test_runs_without_fp16_backward_checkpoint_no_scaler(tmp_path, zf_cache):
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import load_checkpoint, run
    run(resolve(dict(QUICK, precision="bf16", optimizer="fo_sgd", lr=0.05)), str(tmp_path / "r"), stop_after=1,
        progress=False, log=lambda *a: None, warn=lambda *a: None)
    assert load_checkpoint(str(tmp_path / "r" / "checkpoint.pt"))["grad_scaler"] is None


def test_a_step_the_loss_scaler_skips_still_counts_its_forward_pass():
    """A first-order step whose scaled gradients overflow is skipped by the scaler (no
    optimizer.step, so the optimizer does not count its forward): the task's and the run's
    forward-pass counts still hold it, one forward per step. The run-level test above skips no
    step; here the first scale (3e38) overflows for certain."""
    import time

    from zeroflow.continual.learners import Counters, train_subspace
    torch.manual_seed(0)
    net = torch.nn.Identity()
    head = torch.nn.Linear(4, 3)
    data = torch.utils.data.TensorDataset(100 * torch.randn(8, 4), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]))
    loader = torch.utils.data.DataLoader(data, batch_size=2)
    cfg = {"optimizer": "fo_sgd", "lr": 0.01, "weight_decay": 0.0, "momentum": 0.0, "epochs": 1,
           "schedule": "constant"}
    scaler = torch.amp.GradScaler("cpu", init_scale=3e38)
    counters = Counters()
    timer = type("T", (), {"now": staticmethod(time.perf_counter)})()
    info = train_subspace(net, lambda x: head(net(x)), {"head": head}, loader, cfg, label_offset=0, seed=0,
                          device=torch.device("cpu"), counters=counters, timer=timer, progress_desc="t",
                          progress=False, scaler=scaler)
    assert scaler.get_scale() < 3e38                        # at least one step was skipped
    assert info["steps"] == counters.iterations == 4
    assert info["forward_passes"] == counters.train_forward_passes == 4


@pytest.mark.parametrize("method", ["ease", "aper"])
def test_each_method_trains_its_fp16_first_order_steps_through_the_runs_scaler(tmp_path, zf_cache, method):
    """The run's scaler reaches the training of both methods: after a task of first-order fp16
    steps its state is one that stepped (growth tracker counted, or the scale moved), not the
    untouched scaler's (65536, 0), which an unscaled task leaves."""
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import load_checkpoint, run
    run(resolve(dict(QUICK, method=method, precision="fp16", optimizer="fo_sgd", lr=0.05)), str(tmp_path / "r"),
        stop_after=1, progress=False, log=lambda *a: None, warn=lambda *a: None)
    saved = load_checkpoint(str(tmp_path / "r" / "checkpoint.pt"))["grad_scaler"]
    assert (saved["scale"], saved["_growth_tracker"]) != (65536.0, 0), saved


@pytest.mark.parametrize("argv, says", [
    (["--precisions", "fp32,bf61"], "--precisions: unknown bf61; valid: fp32, tf32, bf16, fp16, tf32-emulated"),
    (["--precisions", ","], "--precisions: unknown (none given)"),
    (["--eps", "1e-3,"], None),
    (["--eps", "1e-3,x"], "--eps takes comma-separated numbers"),
    (["--eps", "0,1e-3"], "--eps needs at least one value, each finite and > 0"),
    (["--eps", "1e-3,inf"], "--eps needs at least one value, each finite and > 0"),
    (["--eps", "nan"], "--eps needs at least one value, each finite and > 0"),
    (["--directions", "1"], "--directions must be at least 2"),
])
def test_fidelity_script_refuses_bad_arguments_before_measuring(argv, says, capsys, monkeypatch):
    """A misspelt precision failed only when its turn came, after the fp64 reference (minutes of
    a GPU lease); a zero eps divided by zero, one direction gave NaN correlations."""
    from benchmarks import precision_fidelity as pf

    monkeypatch.setattr(pf, "study", lambda a: pytest.fail("measured before the arguments were checked"))
    if says is None:       # a trailing comma is no value
        assert pf.parse(["--fast"] + argv).eps == (1e-3,)
        return
    with pytest.raises(SystemExit):
        pf.main(["--fast"] + argv)
    assert says in capsys.readouterr().err


def test_fidelity_script_takes_precisions_with_spaces_after_the_commas():
    """--precisions "fp32, bf16" (a space after the comma, as in prose) names fp32 and bf16,
    not an unknown " bf16"; fp32 comes first (the CPU's tf32 check compares with it)."""
    from benchmarks import precision_fidelity as pf

    assert pf.parse(["--fast", "--precisions", "bf16 , fp32"]).precisions == ("fp32", "bf16")

def test_fidelity_script_stopped_keeps_the_precisions_it_measured(tmp_path, monkeypatch, capsys):
    """A SIGINT / SIGTERM (a lease's limit) during a precision lost the whole run, the fp64
    reference and every finished precision: nothing was written before the end. Now the JSON,
    plot and table hold what was measured, marked stopped, and the exit status says it."""
    from benchmarks import precision_fidelity as pf

    real = pf.projected_gradients

    def projected_gradients(net, head, params, x, y, precision, *args):
        if precision == "bf16":
            raise KeyboardInterrupt
        return real(net, head, params, x, y, precision, *args)

    monkeypatch.setattr(pf, "projected_gradients", projected_gradients)
    out = tmp_path / "fid.json"
    try:
        rc = pf.main(["--fast", "--directions", "4", "--precisions", "fp32,bf16,fp16", "--out", str(out),
                      "--threads", "1"])
    except KeyboardInterrupt:
        pytest.fail("the SIGINT escaped: the fp64 reference and fp32 were lost")
    assert rc == 130
    res = json.loads(out.read_text())
    assert res["stopped"] == "stopped (SIGINT) after fp32 of fp32, bf16, fp16"
    assert sorted(res["results"]) == ["fp32", "fp64"] and res["results"]["fp32"]["status"] == "measured"
    assert (tmp_path / "fid.png").exists()
    assert "stopped (SIGINT) after fp32 of fp32, bf16, fp16" in capsys.readouterr().out
    # the saved JSON rendered again is no failure
    assert pf.main(["--report", str(out)]) == 0
