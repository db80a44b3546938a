"""The measurement code of the benchmark suites (benchmarks/test_bench_*.py, conftest.py) on
the CPU: each suite times what its name and the report claim (the baselines as faithful as
the recipes they stand for, warm-ups untimed and not counted into the round budget)."""
from __future__ import annotations

import pytest
import torch


def _logged_loss(log):
    class Loss(torch.Tensor):       # a loss that logs each read back to the host
        def item(self):
            log.append("read")
            return super().item()

        def __float__(self):
            log.append("read")
            return super().__float__()

    return Loss


@pytest.mark.parametrize("maker", ["make_mezo_sgd", "make_mezo_adam"])
def test_mezo_style_step_reads_each_query_back_once(maker):
    """The optimizer-step suite's MeZO-style loop reads a query's two losses back once, after
    both forwards (MeZO's ``((loss1 - loss2) / (2 eps)).item()``), not once per forward."""
    from benchmarks import test_bench_optim_step as S

    log = []
    loss_cls = _logged_loss(log)
    params = [torch.randn(8, 4, requires_grad=True), torch.randn(5, requires_grad=True)]
    first = params[0].reshape(-1)

    def closure():
        log.append("forward")
        return (first[0] * 0.5 + first[1] ** 2).as_subclass(loss_cls)

    before = [p.detach().clone() for p in params]
    step = getattr(S, maker)(params, closure, 2, "gaussian")
    step()
    assert log == ["forward", "forward", "read"] * 2
    assert any(not torch.equal(p.detach(), b) for p, b in zip(params, before))   # it did update
