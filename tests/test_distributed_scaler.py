"""A GradScaler (fp16 first-order steps) with DataParallelZO: the hybrid's FO phase under two
gloo ranks on CPU, where one rank's shard overflows. Every rank must skip that step, keep the
same scale and stay bit-identical (each rank's scaler saw only its own shard's gradients: the
overflowing rank skipped the step and its collectives while the other stepped)."""
from __future__ import annotations

import os
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

from conftest import gloo_rank_with_shard, make_mlp, run_ranks

SPLIT = (10, 14)
STEPS = 6
BAD_STEP = 1          # rank 1's loss overflows at this step (FO phase)


def _worker(rank, world, init_file, out_dir):
    _, _, Xr, Yr = gloo_rank_with_shard(rank, world, init_file, SPLIT, timeout_s=20)
    res = {}
    try:
        from zeroflow.distributed import DataParallelZO, param_checksum
        from zeroflow.optim import create, train_step

        model = make_mlp(6, 8, 1, 0)
        hyb = create("zo_sgd", list(model.parameters()), hybrid_switch=4, seed=3, backend="cpu", lr=1e-2,
                     zo_eps=1e-2, momentum=0.9)
        dp = DataParallelZO(hyb)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
        for k in range(STEPS):
            def closure(k=k):
                loss = F.mse_loss(model(Xr), Yr)
                return loss * 1e38 if (rank == 1 and k == BAD_STEP) else loss
            dp.set_batch_size(len(Xr))
            train_step(dp, closure, scaler)
        res["scale"] = scaler.get_scale()
        res["hybrid_steps"] = hyb._steps
        res["params"] = param_checksum(list(model.parameters()))
        dp.check_params(where="at the end")
    except Exception:  # noqa: BLE001
        res["error"] = traceback.format_exc()
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    try:
        dist.barrier()
    finally:
        os._exit(0)


def test_ranks_skip_the_same_scaled_fo_steps_and_stay_identical(tmp_path):
    run_ranks(_worker, (2, str(tmp_path / "pg_init"), str(tmp_path)))
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for r in res:
        assert "error" not in r, r["error"]
    assert res[0]["scale"] == res[1]["scale"] == 2.0 ** 9     # one overflow seen by both: halved once
    assert res[0]["hybrid_steps"] == res[1]["hybrid_steps"] == STEPS - 1    # both skipped it
    assert res[0]["params"] == res[1]["params"]
