"""Low-precision parameters learn with stochastic rounding and stall without it (issue 13,
item 5; docs/algorithms.md §11, stream §9): a bf16 / fp16 least-squares fit with ZOFusedSGD
where every update lr * c * z is below half an ulp of its weight."""
from __future__ import annotations

import pytest
import torch

from zeroflow.optim import ZOFusedSGD

D = 8          # weights
LR = 0.007     # see _problem: every update stays below 0.42 ulp
STEPS = 400


def _problem(dtype, seed=0):
    """Weights on the grid of [1, 2) (one ulp u: 2^-7 bf16, 2^-10 fp16), each 10..30 ulps from
    its target; loss = mean((w - t)^2). The two-sided difference of a quadratic is exact, so
    c = grad . z with |z_i| = 1 and |c| <= (2 / D) sum |w_i - t_i| <= 60 u while the weights
    stay within 30 ulps: lr |c| <= 0.42 u < u / 2. eps = 4 u keeps w +- eps in [1, 2), so
    every perturbed weight is on the grid and round-to-nearest restores it exactly."""
    u = 2.0 ** (-7 if dtype == torch.bfloat16 else -10)
    g = torch.Generator().manual_seed(seed)
    w0 = 1.5 + u * torch.randint(-16, 17, (D,), generator=g).double()
    sign = torch.randint(0, 2, (D,), generator=g) * 2 - 1
    target = (w0 + u * sign * torch.randint(10, 31, (D,), generator=g)).float()
    w = torch.nn.Parameter(w0.to(dtype))
    return w, target, u


def _fit(dtype, sr, steps, opt_seed=7):
    w, target, u = _problem(dtype)

    def loss():
        return ((w.detach().float() - target) ** 2).mean()

    opt = ZOFusedSGD([w], lr=LR, zo_eps=4 * u, perturbation="rademacher", seed=opt_seed, stochastic_rounding=sr)
    start, l0 = w.detach().clone(), float(loss())
    biggest = 0.0
    for _ in range(steps):
        opt.step(loss)
        biggest = max(biggest, LR * abs(opt.last_projected[0]) / (4 * u))   # c = d / eps, q = 1
    return start, w.detach().clone(), l0, float(loss()), biggest / u


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nearest_stalls_stochastic_learns(dtype):
    start, end, l0, l1, biggest = _fit(dtype, False, STEPS)
    assert biggest < 0.5, f"the regime is off: an update of {biggest:.3f} ulp"
    assert torch.equal(end, start), "round-to-nearest kept a sub-half-ulp update"
    assert l1 == l0

    start, end, l0, l1, biggest = _fit(dtype, True, STEPS)
    assert biggest < 0.5, f"the regime is off: an update of {biggest:.3f} ulp"
    # Over 40 problem/optimizer seeds (bf16) the loss fell to at most 0.40 of l0, mean 0.27;
    # the expected 1 - 2 lr / D contraction per step alone gives 0.25 after 400 steps.
    assert l1 < 0.6 * l0, (l0, l1)
    assert (end != start).sum() >= D - 1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_rounding_is_replayable(dtype):
    """Same optimizer seed -> the same bits, whatever torch's global generator holds; another
    seed -> other bits (the rounding words come from the stream, not from torch.rand)."""
    torch.manual_seed(1)
    a = _fit(dtype, True, 40)[1]
    torch.manual_seed(2)
    torch.rand(100)
    b = _fit(dtype, True, 40)[1]
    c = _fit(dtype, True, 40, opt_seed=8)[1]
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


# ---------------------------------------------------------------- benchmarks/bf16_stochastic_rounding.py
@pytest.mark.parametrize("argv, says", [
    (["--steps", "0"], "--steps must be at least 1 (got 0)"),
    (["--seeds", "0"], "--seeds must be at least 1 (got 0)"),
    (["--seq", "1"], "--seq must be at least 2"),
    (["--batch", "0"], "--batch must be at least 1 (got 0)"),
    (["--threads", "0"], "--threads must be at least 1 (got 0)"),
])
def test_demo_refuses_bad_arguments_before_running(argv, says, capsys, monkeypatch):
    """--steps 0 ended in a ZeroDivisionError after the model was built; --seeds 0 in the summary."""
    from benchmarks import bf16_stochastic_rounding as demo

    monkeypatch.setattr(demo, "run", lambda *a, **k: pytest.fail("ran before the arguments were checked"))
    with pytest.raises(SystemExit):
        demo.main(argv)
    assert says in capsys.readouterr().err


def test_demo_without_transformers_fails(tmp_path, capsys, monkeypatch):
    """Without transformers the demo printed 'skipped' and exited 0, with no --out written."""
    import sys

    from benchmarks import bf16_stochastic_rounding as demo

    monkeypatch.setitem(sys.modules, "transformers", None)      # import transformers -> ImportError
    out = tmp_path / "sr.json"
    assert demo.main(["--out", str(out)]) == 1
    assert "needs the 'transformers' package" in capsys.readouterr().err and not out.exists()


def test_demo_settings_share_their_start(tmp_path):
    """Each seed's settings start from the same weights and batch (the comparison the demo's
    claim rests on): the bf16 settings' unperturbed start is the same loss."""
    import json

    pytest.importorskip("transformers")
    from benchmarks import bf16_stochastic_rounding as demo

    out = tmp_path / "sr.json"
    assert demo.main(["--steps", "2", "--seeds", "1", "--batch", "2", "--seq", "8", "--out", str(out)]) == 0
    runs = {r["setting"]: r for r in json.loads(out.read_text())["runs"]}
    assert len(runs) == 4
    bf16 = [r for name, r in runs.items() if name.startswith("bf16")]
    assert len({r["initial_loss"] for r in bf16}) == 1


def test_demo_stopped_keeps_the_runs_it_finished(tmp_path, monkeypatch, capsys):
    """A SIGINT / SIGTERM during the demo (minutes) lost every finished run: nothing was written
    before the end. The JSON and plot now hold the runs made, marked stopped, exit 130."""
    import json

    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    from benchmarks import bf16_stochastic_rounding as demo

    real, made = demo.run_one, []

    def run_one(*args):
        made.append(1)
        if len(made) == 3:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(demo, "run_one", run_one)
    out, png = tmp_path / "sr.json", tmp_path / "sr.png"
    try:
        rc = demo.main(["--steps", "2", "--seeds", "1", "--batch", "2", "--seq", "8", "--out", str(out),
                        "--plot", str(png)])
    except KeyboardInterrupt:
        pytest.fail("the SIGINT escaped: the finished runs were lost")
    assert rc == 130
    res = json.loads(out.read_text())
    assert res["stopped"] == "stopped (SIGINT) after 2 of 4 runs"
    assert [r["setting"] for r in res["runs"]] == ["fp32", "bf16, round-to-nearest"]
    assert png.exists() and "stopped (SIGINT) after 2 of 4 runs" in capsys.readouterr().out


def test_demo_stopped_before_its_first_run_finished_writes_nothing(tmp_path, monkeypatch, capsys):
    """Stopped in its first run: nothing was measured, so no JSON or plot is written (a table
    and files of no run would read as a result), and it exits 130 saying so."""
    pytest.importorskip("transformers")
    from benchmarks import bf16_stochastic_rounding as demo

    def run_one(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_one", run_one)
    out, png = tmp_path / "sr.json", tmp_path / "sr.png"
    rc = demo.main(["--steps", "2", "--seeds", "1", "--batch", "2", "--seq", "8", "--out", str(out),
                    "--plot", str(png)])
    assert rc == 130
    assert "stopped (SIGINT) after 0 of 4 runs; nothing written" in capsys.readouterr().err
    assert not out.exists() and not png.exists()


def test_demo_run_names_the_signal_that_stopped_it(monkeypatch):
    """Under StopSignals, a SIGTERM's stop is named SIGTERM in ``stopped`` (the JSON's and the
    printed line), not SIGINT."""
    import types

    from benchmarks import bf16_stochastic_rounding as demo

    def run_one(*args):
        raise KeyboardInterrupt

    lines = []
    monkeypatch.setattr(demo, "run_one", run_one)
    res = demo.run("tiny", 0.02, 1, [1e-3], 1e-3, 2, 2, 8, log=lines.append,
                   signals=types.SimpleNamespace(name="SIGTERM"))
    assert res["stopped"] == lines[-1] == f"stopped (SIGTERM) after 0 of {len(demo.SETTINGS)} runs"
