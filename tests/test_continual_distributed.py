"""``zeroflow run`` under torchrun (issue 6): the continual runner launched as 2 gloo ranks
(spawned here with the environment torchrun sets) equals the same run as 1 rank, only rank 0
writes the run folder, and first-order optimizers are refused under torchrun."""
from __future__ import annotations

import json
import os
import traceback
import warnings

import numpy as np
import pytest
import torch

from conftest import run_ranks

# Short: 1 epoch per task, a briefly pretrained small backbone (cached in a tmp ZEROFLOW_CACHE).
CFG = dict(method="ease", optimizer="zo_sgd", epochs=1, pretrain_epochs=2, batch_size=32, perturbation="rademacher",
           backend="cpu")


def _agent_store():
    """The rendezvous store, hosted here as torchrun's agent hosts it (TORCHELASTIC_USE_AGENT_STORE):
    bound to a port the system picks and held from then on. A port found free and closed again
    for rank 0 to bind seconds later (a spawned interpreter importing torch) could be taken
    in between, failing the run with EADDRINUSE."""
    import torch.distributed as dist
    return dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)


def _worker(rank, world, port, out, cache, cfg_over, result_dir):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0",
                      ZEROFLOW_CACHE=cache)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.runner import run

    try:
        m = run(resolve(dict(CFG, **cfg_over)), out, progress=False, log=lambda *a: None)
        res = {"curve": m["accuracy_curve"], "avg": m.get("avg")}
    except Exception as e:  # noqa: BLE001
        res = {"error": f"{type(e).__name__}: {e}", "tb": traceback.format_exc()}
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    if dist.is_initialized():
        # leave without gloo's teardown, which can abort after a clean run (see
        # tests/test_distributed.py::_exit_after_barrier)
        dist.barrier()
        os._exit(0)


def _launch(world, out, cache, result_dir, **cfg_over):
    os.makedirs(result_dir, exist_ok=True)
    store = _agent_store()
    run_ranks(_worker, (world, store.port, str(out), str(cache), cfg_over, str(result_dir)), world)
    del store
    out = []
    for r in range(world):
        with open(os.path.join(result_dir, f"rank{r}.json")) as f:
            out.append(json.load(f))
    return out


def _refusing_worker(rank, world, port, refusing, result_dir, own_text=False):
    """A run whose setup checks (here check_backend) refuse it on the ranks in ``refusing``
    (``own_text``: each rank with a text of its own, as its own node's files would give)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from zeroflow.continual import runner
    from zeroflow.continual.defaults import resolve
    from zeroflow.continual.errors import ZeroflowError

    def check_backend(backend, device):
        if rank in refusing:
            raise ZeroflowError(f"--data-root /data{rank}: no such folder" if own_text
                                else "--backend cpu cannot run here")
    runner.check_backend = check_backend
    try:
        runner.run(resolve(dict(CFG)), os.path.join(result_dir, "out"), progress=False, log=lambda *a: None)
        res = {}
    except ZeroflowError as e:
        res = {"error": str(e), "every_rank": e.every_rank}
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump(res, f)
    if dist.is_initialized():
        dist.barrier()
        os._exit(0)


@pytest.mark.parametrize("refusing", [(0, 1), (1,), (0,)])
def test_a_setup_refusal_is_said_once_when_every_rank_hit_it_and_by_its_ranks_otherwise(tmp_path, refusing):
    """torchrun ... zeroflow run whose backend, device, weights or data every rank refused printed
    the refusal once per rank. The ranks now compare their refusals (one all_gather): the same on
    every rank is every_rank (the CLI prints it on rank 0 only); one that only some ranks hit stays
    theirs to print, and a rank that hit none stops too, rank 0 naming the ranks that refused."""
    os.makedirs(tmp_path, exist_ok=True)
    store = _agent_store()
    run_ranks(_refusing_worker, (2, store.port, refusing, str(tmp_path)))
    del store
    res = []
    for r in range(2):
        with open(tmp_path / f"rank{r}.json") as f:
            res.append(json.load(f))
    for r in range(2):
        if r in refusing:
            assert res[r] == {"error": "--backend cpu cannot run here", "every_rank": len(refusing) == 2}, res
        else:
            assert res[r] == {"error": f"rank(s) {1 - r} of this torchrun job refused the run (their message is "
                                       f"above); every rank stops", "every_rank": True}, res
    assert not (tmp_path / "out").exists()


def test_refusals_that_differ_between_ranks_are_said_by_each_rank(tmp_path):
    """Every rank refused, each for a reason of its own (its node's folder missing): no rank's
    text stands for the others', so each rank says its own (not every_rank, which rank 0 alone
    would print, hiding rank 1's)."""
    os.makedirs(tmp_path, exist_ok=True)
    store = _agent_store()
    run_ranks(_refusing_worker, (2, store.port, (0, 1), str(tmp_path), True))
    del store
    for r in range(2):
        with open(tmp_path / f"rank{r}.json") as f:
            assert json.load(f) == {"error": f"--data-root /data{r}: no such folder", "every_rank": False}
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("cl_dist")
    cache = base / "cache"
    one = _launch(1, base / "w1", cache, base / "res1")
    two = _launch(2, base / "w2", cache, base / "res2")
    return base, one, two


def test_two_ranks_equal_one_rank(runs):
    base, one, two = runs
    for r in one + two:
        assert "error" not in r, r.get("tb")
    # the 2-rank run splits every global batch of 32 into shards of 16; ZO scalars are the
    # batch-weighted mean of the shard losses, so the run equals the 1-rank run up to fp32
    # rounding of the loss (which the 1/2eps of the estimate amplifies): the same accuracy
    # curve, up to a few test images
    c1, c2 = one[0]["curve"], two[0]["curve"]
    assert len(c1) == len(c2) == 5
    assert max(abs(a - b) for a, b in zip(c1, c2)) < 1.5, (c1, c2)
    assert two[0]["curve"] == two[1]["curve"]     # both ranks evaluate the same network
    # far above chance (Avg 22.8 on B2-Inc2) even with a backbone pretrained for 2 epochs only
    assert one[0]["avg"] > 1.5 * 22.8


def test_only_rank0_writes(runs):
    base, one, two = runs
    files = set(os.listdir(base / "w2"))
    for f in ("metrics.json", "config.json", "environment.json", "checkpoint.pt", "accuracy_matrix.csv"):
        assert f in files, f
    with open(base / "w2" / "metrics.json") as f:
        m = json.load(f)
    assert m["world_size"] == 2
    with open(base / "w2" / "environment.json") as f:
        assert json.load(f)["world_size"] == 2
    # each task's ZO traffic: 8-byte batch-size all_gather + 2 scalars of 8 bytes per step
    for t in m["tasks"]:
        assert 0 < t["bytes_communicated"] <= t["iterations"] * (8 + 16) + 4096, t
    assert not [f for f in files if f.startswith(".tmp-") or ".tmp." in f]   # no temporary file left


def _cli_worker(rank, world, port, argv, result_dir, patch=None):
    """``zeroflow ARGV`` as rank ``rank`` of a torchrun job; its exit code and stderr kept.
    ``patch(rank)`` first: what this rank's node sees otherwise."""
    import sys
    if patch is not None:
        patch(rank)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True", TORCHELASTIC_RESTART_COUNT="0")
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import torch.distributed as dist
    from zeroflow.cli import main

    with open(os.path.join(result_dir, f"rank{rank}.err"), "w") as err:
        sys.stderr = err
        try:
            rc = main(argv)
        finally:
            sys.stderr = sys.__stderr__
    with open(os.path.join(result_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"rc": rc}, f)
    if dist.is_initialized():
        dist.barrier()
    # leave without interpreter teardown, also where the CLI destroyed the group: gloo's threads
    # could still abort a rank at exit ('terminate called without an active exception', SIGABRT;
    # 2 of 8 runs of this file under load), after its exit code and stderr were kept
    sys.stdout.flush()
    os._exit(0)


def _launch_cli(world, argv, result_dir, patch=None):
    """``[(exit code, stderr)]`` of each rank of ``torchrun --nproc-per-node WORLD -m zeroflow ARGV``."""
    os.makedirs(result_dir, exist_ok=True)
    store = _agent_store()
    run_ranks(_cli_worker, (world, store.port, argv, str(result_dir), patch), world)
    del store
    out = []
    for r in range(world):
        with open(os.path.join(result_dir, f"rank{r}.json")) as f, open(os.path.join(result_dir, f"rank{r}.err")) as e:
            out.append((json.load(f)["rc"], e.read()))
    return out


@pytest.mark.parametrize("case", ["missing folder", "options of the folder"])
def test_a_resume_refusal_under_torchrun_is_said_by_rank_0_only(tmp_path, case):
    """torchrun --nproc-per-node 2 -m zeroflow run --resume --out DIR printed the refusals and
    warnings of the run folder's configuration once per rank (every rank read it before the
    group existed, with its warnings on): 'run folder DIR does not exist' twice, and 'ignoring
    --epochs 3' then '--checkpoint: the run ... loads no weights file' twice each. The ranks agree
    on them now, and rank 0 alone says them."""
    from zeroflow.continual.defaults import resolve

    out = tmp_path / "run"
    argv = ["run", "--resume", "--out", str(out), "--no-progress"]
    if case == "options of the folder":
        out.mkdir()
        (out / "config.json").write_text(json.dumps(resolve(dict(CFG))))
        argv += ["--epochs", "3", "--checkpoint", str(tmp_path / "vit.safetensors")]
    (rc0, err0), (rc1, err1) = _launch_cli(2, argv, tmp_path / "res")
    assert rc0 == rc1 == 2
    if case == "missing folder":
        assert err0 == f"zeroflow: error: --resume: run folder {out} does not exist\n", err0
    else:
        assert err0.splitlines() == [
            f"zeroflow: warning: --resume continues {out} with the configuration in its config.json; ignoring "
            f"--epochs 3 (the run has 1)",
            f"zeroflow: error: --checkpoint: the run in {out} loads no weights file (its backbone is small, "
            f"pretrained by zeroflow); drop the option"], err0
    assert err1 == "", err1


def test_a_refused_checkpoint_of_a_resume_under_torchrun_is_said_by_rank_0_only(runs, tmp_path):
    """Every rank reads the run's checkpoint.pt on --resume (each loads the learner's state from it):
    a refusal of it (here: config.json edited since the tasks were trained) was said once per rank."""
    import shutil
    base, one, two = runs
    run_dir = tmp_path / "run"
    shutil.copytree(base / "w1", run_dir)
    os.remove(run_dir / "metrics.json")         # the run as it was before its last task finished
    cfg = json.loads((run_dir / "config.json").read_text())
    (run_dir / "config.json").write_text(json.dumps(dict(cfg, epochs=2)))
    (rc0, err0), (rc1, err1) = _launch_cli(2, ["run", "--resume", "--out", str(run_dir), "--no-progress"],
                                           tmp_path / "res")
    assert rc0 == rc1 == 2
    assert err0 == (f"zeroflow: error: cannot resume {run_dir}: its config.json is not the configuration its "
                    f"finished tasks were trained with (epochs: 1 in checkpoint.pt, 2 in config.json); restore "
                    f"config.json, or start a new run (another --out, or --force)\n"), err0
    assert err1 == "", err1


def test_a_resume_of_a_first_order_run_under_torchrun_is_refused_by_rank_0_only(tmp_path):
    """torchrun ... run --resume --out DIR of a first-order run (fo_sgd, trained in a single
    process) is refused as a fresh one is: the configuration is the run folder's, read once the
    group is up, so the refusal comes after it (said by rank 0 only, every rank stopping); left
    out, the ranks went on to train the first-order run data-parallel, which exchanges no
    gradients."""
    from zeroflow.continual.defaults import resolve

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(resolve(dict(CFG, optimizer="fo_sgd", perturbation=None))))
    (rc0, err0), (rc1, err1) = _launch_cli(2, ["run", "--resume", "--out", str(out), "--no-progress"],
                                           tmp_path / "res")
    assert rc0 == rc1 == 2
    assert err0 == ("zeroflow: error: --optimizer fo_sgd under torchrun: data-parallel runs exchange only ZO loss "
                    "scalars, so they need a forward-pass optimizer (zo_* or forward_grad, optionally with "
                    "--hybrid-switch); run first-order baselines in a single process\n"), err0
    assert err1 == "", err1
    assert sorted(os.listdir(out)) == ["config.json"]


def _rank_1_reads_the_config_of(folder, rank):
    """Rank 1's node holds another config.json: the one in ``folder``."""
    if rank == 1:
        from zeroflow.continual import runner
        read = runner.read_run_config
        runner.read_run_config = lambda out: read(folder)


def test_a_resume_that_only_one_node_sees_as_first_order_stops_every_rank(tmp_path):
    """torchrun ... run --resume --out DIR whose config.json is a ZO run's on rank 0's node and a
    first-order run's on rank 1's: rank 1 refused it alone, after the ranks had agreed on the
    folder, its refusal marked as every rank's (for rank 0 to say, which never did), while rank 0
    went on into the next collective and ended in gloo's 'Connection closed by peer'. The refusal
    is now part of the ranks' agreement on the folder: rank 1 says it, rank 0 names rank 1, both
    exit 2, nothing written."""
    import functools

    from zeroflow.continual.defaults import resolve

    out, other = tmp_path / "run", tmp_path / "node1"
    for folder, over in ((out, {}), (other, dict(optimizer="fo_sgd", perturbation=None))):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(resolve(dict(CFG, **over))))
    (rc0, err0), (rc1, err1) = _launch_cli(2, ["run", "--resume", "--out", str(out), "--no-progress"],
                                           tmp_path / "res", functools.partial(_rank_1_reads_the_config_of, str(other)))
    assert rc0 == rc1 == 2
    assert err1 == ("zeroflow: error: --optimizer fo_sgd under torchrun: data-parallel runs exchange only ZO loss "
                    "scalars, so they need a forward-pass optimizer (zo_* or forward_grad, optionally with "
                    "--hybrid-switch); run first-order baselines in a single process\n"), err1
    assert err0 == ("zeroflow: error: rank(s) 1 of this torchrun job refused the run (their message is above); "
                    "every rank stops\n"), err0
    assert sorted(os.listdir(out)) == ["config.json"]


def test_first_order_refused_under_torchrun(tmp_path):
    res = _launch(1, tmp_path / "fo", tmp_path / "cache", tmp_path / "res", optimizer="fo_sgd")
    assert "error" in res[0]
    assert "fo_sgd" in res[0]["error"] and "torchrun" in res[0]["error"]


# ---------------------------------------------------------------- the training loop's data-parallel plumbing
def test_too_small_a_batch_for_the_ranks_is_an_error_before_the_run_folder(tmp_path):
    """--batch-size 1 on 2 ranks: ShardedBatchSampler's ValueError (some rank would get an empty
    batch) reached the user as a traceback from inside the first task, after the run folder was
    claimed and the backbone pretrained. Now a ZeroflowError (the CLI's one-line error) on every
    rank, naming --batch-size, before anything is written."""
    res = _launch(2, tmp_path / "out", tmp_path / "cache", tmp_path / "res", batch_size=1)
    for r in res:
        assert r.get("error", "").startswith("ZeroflowError: --batch-size 1 under torchrun with 2 ranks"), r
    assert not os.path.exists(tmp_path / "out")


def test_the_cli_prints_a_shard_refusal_as_one_line(tmp_path, monkeypatch, capsys):
    """zeroflow run under torchrun with a task smaller than the job: one line, exit 2 (rank and
    world stand in for torchrun's; the refusal comes before any collective)."""
    from zeroflow.cli import main
    from zeroflow.continual import runner

    monkeypatch.setattr(runner, "distributed_setup", lambda cfg: (0, 4))
    monkeypatch.setattr(runner, "load_run_data", lambda cfg, warn: _Tasks([[0, 1], [2, 3]], [0, 0, 1, 1, 2, 3, 2]))
    out = tmp_path / "out"
    assert main(["run", "--dataset", "digits", "--method", "ease", "--optimizer", "zo_sgd", "--batch-size", "8",
                 "--backend", "cpu", "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["zeroflow: error: task 2 of --dataset digits has 3 training image(s), fewer than the 4 ranks of "
                   "this torchrun job: some rank would get no sample and the task would train nothing; run on fewer "
                   "ranks (torchrun --nproc-per-node), or give the task at least 4 training images"], err
    assert not out.exists()


def test_a_batch_too_small_for_the_ranks_is_named_where_it_was_given_and_a_resume_told_what_helps(
        tmp_path, monkeypatch, capsys):
    """The refusal of a batch smaller than the ranks named --batch-size whatever gave it, and told a
    resumed run to 'give --batch-size 4 or more', which a resume ignores (it keeps its config.json's,
    with a warning): a batch size of a --config file is named as the file's, a resumed run's as its
    config.json's, with the one fix a resume has: fewer ranks (rank and world stand in for torchrun's)."""
    from zeroflow.cli import main
    from zeroflow.continual import runner
    from zeroflow.continual.defaults import resolve

    monkeypatch.setattr(runner, "distributed_setup", lambda cfg: (0, 4))
    monkeypatch.setattr("zeroflow.distributed.init_from_env", lambda: (0, 4))
    monkeypatch.setattr(runner, "load_run_data", lambda cfg, warn: _Tasks([[0, 1], [2, 3]], [0, 0, 1, 1, 2, 3, 2, 3]))
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: 2\n")
    out = tmp_path / "out"
    assert main(["run", "--config", str(config), "--optimizer", "zo_sgd", "--backend", "cpu", "--out", str(out),
                 "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"zeroflow: error: batch_size in {config} (2) under torchrun with 4 ranks: every global batch is split over "
        f"the ranks, so some rank would get no sample; give --batch-size 4 or more, or run on fewer ranks (torchrun "
        f"--nproc-per-node)\n")
    assert not out.exists()
    out.mkdir()
    (out / "config.json").write_text(json.dumps(resolve({"optimizer": "zo_sgd", "batch_size": 2, "backend": "cpu"})))
    assert main(["run", "--resume", "--out", str(out), "--batch-size", "8", "--no-progress"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1] == (f"zeroflow: error: batch_size in {out / 'config.json'} (2) under torchrun with 4 ranks: every "
                       f"global batch is split over the ranks, so some rank would get no sample; a resumed run keeps "
                       f"its batch size: resume it on 2 rank(s) or fewer (torchrun --nproc-per-node)"), err
    assert os.listdir(out) == ["config.json"]


class _Tasks:
    def __init__(self, tasks, train_targets):
        import numpy as np
        self.tasks, self.train_targets = tasks, np.asarray(train_targets)


def test_a_batch_and_tasks_of_exactly_the_ranks_are_taken():
    """What ShardedBatchSampler takes (one sample per rank: a global batch of world samples, a
    task of world images) is not refused; one less is, in the options' words."""
    from zeroflow.continual.errors import ZeroflowError
    from zeroflow.continual.runner import check_shards

    cfg = {"batch_size": 4, "dataset": "digits"}
    check_shards(cfg, _Tasks([[0, 1], [2, 3]], [0, 0, 1, 1, 2, 3, 2, 3]), 4)
    check_shards(cfg, _Tasks([range(0, 2), np.int64(2) + np.arange(2)], [0, 0, 1, 1, 2, 3, 2, 3]), 4)
    with pytest.raises(ZeroflowError, match="--batch-size 3 under torchrun with 4 ranks"):
        check_shards(dict(cfg, batch_size=3), _Tasks([[0, 1], [2, 3]], [0, 0, 1, 1, 2, 3, 2, 3]), 4)
    with pytest.raises(ZeroflowError, match="task 1 of --dataset digits has 3 training image"):
        check_shards(cfg, _Tasks([[0, 1], [2, 3]], [0, 0, 1, 2, 3, 2, 3]), 4)


def test_the_training_loop_reshuffles_sharded_batches_each_epoch_and_weights_by_shard_size():
    """Under torchrun each rank's loader is a ShardedBatchSampler (docs/distributed.md, "The
    continual CLI under torchrun"): the loop must call set_epoch(e) every epoch (one permutation
    per epoch from seed + epoch, as the single-process loader reshuffles; without it every epoch
    repeated epoch 0's order on every rank, and the 1-rank vs 2-rank comparison above cannot see
    it: both repeat it), and hand DataParallelZO this rank's batch size every step (without it a short last shard counts
    as much as a full one in the mean of the ranks' losses). A fake optimizer records both."""
    from types import SimpleNamespace

    from zeroflow.continual.learners import Counters, _train_loop
    from zeroflow.distributed import ShardedBatchSampler

    class Opt:
        zeroth_order, forward_passes = True, 0

        def __init__(self):
            self.param_groups, self.sizes = [{"lr": 0.0}], []

        def set_batch_size(self, n):
            self.sizes.append(n)

        def step(self, closure):
            return closure()

    seen = []

    def forward(x):
        seen.append(x[:, 0].long().tolist())
        return torch.zeros(len(x), 2)

    ds = torch.utils.data.TensorDataset(torch.arange(10.0).unsqueeze(1), torch.zeros(10, dtype=torch.long))
    sampler = ShardedBatchSampler(10, 4, 0, 1, seed=3)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler)
    opt = Opt()
    _train_loop(torch.nn.Linear(1, 1), forward, [], opt, loader, {"optimizer": "zo_sgd", "lr": 0.1, "epochs": 2},
                0, torch.device("cpu"), Counters(), SimpleNamespace(now=lambda: 0.0), "task 1/1", False)
    want = []
    for e in range(2):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(3 + e)).tolist()
        want += [order[0:4], order[4:8], order[8:10]]
    assert seen == want
    assert opt.sizes == [4, 4, 2, 4, 4, 2]


def test_run_device_under_torchrun_refuses_one_gpu_index_for_every_rank(monkeypatch):
    """Every rank gets the same options: --device cuda:0 (or a resumed run's saved cuda:0)
    put every rank's network on GPU 0 while each rank's NCCL communicator is on
    cuda:LOCAL_RANK; refused before anything is claimed. auto / cuda (the current device,
    cuda:LOCAL_RANK after init_from_env) and a single process are unchanged. CUDA emulated."""
    from zeroflow import distributed as zd
    from zeroflow.continual import runner
    from zeroflow.continual.errors import ZeroflowError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(zd, "local_device", lambda: torch.device("cuda", 1))
    for name in ("cuda:0", "cuda:1"):
        with pytest.raises(ZeroflowError, match="under torchrun"):
            runner._run_device(name, 2)
        assert runner._run_device(name, 1) == torch.device(name)
    assert runner._run_device("auto", 2) == torch.device("cuda", 1)
    assert runner._run_device("cuda", 2) == torch.device("cuda")
    assert runner._run_device("cpu", 2) == torch.device("cpu")


def _rank_1_cannot_read(paths, garbage, rank):
    """Rank 1's node holds undecodable copies of the images at ``paths`` (the file ``garbage``)."""
    if rank == 1:
        from zeroflow.continual import data
        load = data.load_image
        data.load_image = lambda path: load(garbage if path in paths else path)


@pytest.mark.usefixtures("zf_cache")
@pytest.mark.parametrize("split", ["train", "test"])
def test_an_image_only_rank_1_cannot_read_mid_run_is_said_once_with_the_resume_command(tmp_path, split):
    """torchrun ... run where rank 1 alone cannot read task 2's images (its node's copies are
    corrupt). train: rank 1 said the error without the resume command (it writes nothing, so it
    took the run for unwritten) and rank 0, left waiting in the step's exchange of batch sizes,
    warned with the resume command over gloo's 'Connection closed by peer' traceback. test
    (read in the evaluation, after the task's last collective): rank 1 said its error, and rank 0
    finished the run (exit 0). Now every rank stops on one error, said once by rank 0, naming
    rank 1's image, with the resume command; no traceback, no finished run."""
    import functools

    from test_continual_data import _tiny_cub_run

    from zeroflow.continual.data import class_order

    argv = [str(a) for a in _tiny_cub_run(tmp_path)] + ["--data-root", str(tmp_path / "data"), "--checkpoint",
                                                         str(tmp_path / "vit.pth")]
    paths = sorted(str(p) for c in class_order(4)[2:]                  # the classes of task 2
                   for p in (tmp_path / "data" / "cub" / split / f"n{c:04d}").iterdir())
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"garbage")
    out = tmp_path / "r"
    (rc0, err0), (rc1, err1) = _launch_cli(2, argv, tmp_path / "res",
                                           functools.partial(_rank_1_cannot_read, paths, str(garbage)))
    assert rc0 == rc1 == 2, (err0, err1)
    warned, said = err0.splitlines(keepends=True)      # the class-count warning (4 folders, not 200), the error
    assert warned.startswith("zeroflow: warning: cub under "), err0
    assert said.startswith(f"zeroflow: error: rank 1: cannot read image {garbage} (UnidentifiedImageError: "), err0
    # the checkpoint of task 2 is written once rank 0 evaluated it (its results are every rank's)
    kept = 1 if split == "train" else 2
    assert said.endswith(f"; replace or delete that file, then continue the run with: zeroflow run --resume --out "
                         f"{out} (its {kept} finished task(s) are kept)\n"), err0
    assert err1 == "", err1
    assert not (out / ".lock").exists() and not (out / "metrics.json").exists()


def test_the_errors_ranks_stop_on_mid_run_make_one_error_naming_each_rank(monkeypatch):
    """runner._stop_together (the ranks' texts faked, as one all_gather would give them): the
    text alone when every rank hit the same, else each text once with the ranks that hit it; a
    checkpoint rank 0 could not write makes it a WriteFailed; every_rank (rank 0 says it)."""
    from zeroflow.continual import runner
    from zeroflow.continual.data import UnreadableImage
    from zeroflow.continual.errors import WriteFailed

    def gathered(texts):
        def all_gather_object(out, mine):
            out[:] = texts
        monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)

    gathered([None, None, None])
    runner._stop_together((0, 3), None)                # nobody stopped: the task goes on
    gathered([[False, "cannot read image a"]] * 3)
    with pytest.raises(UnreadableImage) as e:
        runner._stop_together((2, 3), UnreadableImage("cannot read image a"))
    assert str(e.value) == "cannot read image a" and e.value.every_rank
    gathered([[True, "cannot write c"], [False, "cannot read image b"], [False, "cannot read image b"]])
    with pytest.raises(WriteFailed) as e:
        runner._stop_together((1, 3), UnreadableImage("cannot read image b"))
    assert str(e.value) == "rank 0: cannot write c; rank 1, 2: cannot read image b" and e.value.every_rank
    gathered([None, [False, "cannot read image b"]])
    with pytest.raises(UnreadableImage, match=r"^rank 1: cannot read image b$"):
        runner._stop_together((0, 2), None)


@pytest.mark.parametrize("world", [1, 2])
def test_a_batch_that_fails_to_load_abandons_the_step_only_where_other_ranks_wait(world):
    """learners._batches: under DataParallelZO of several ranks an unreadable image abandons
    the step (the others wait in its exchange); alone (torchrun with one process) it is raised
    as it is, as in a single process, not as 'rank 0: cannot read image ...'."""
    from zeroflow.continual.data import UnreadableImage
    from zeroflow.continual.learners import _batches

    class Loader:
        def __iter__(self):
            yield 1
            raise UnreadableImage("cannot read image a.png (OSError: x); replace or delete that file")

    class DP:
        abandoned = []

        def __init__(self):
            self.world = world

        def abandon_step(self, message):
            self.abandoned.append(message)
            raise RuntimeError("abandoned")

    dp = DP()
    batches = _batches(Loader(), dp)
    assert next(batches) == 1
    with pytest.raises(RuntimeError if world == 2 else UnreadableImage):
        next(batches)
    assert dp.abandoned == (["cannot read image a.png (OSError: x); replace or delete that file"] if world == 2 else [])
