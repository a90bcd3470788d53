"""Two gloo processes on CPU against one process on the concatenated global batch.

One launch of 2 ranks with ``torch.multiprocessing`` (module fixture) runs every case and saves its
numbers; the tests assert on them. Each rank gets a DIFFERENT slice of the global batch (a symmetric test,
identical data on every rank, passes with a wrong backward).

BatchNorm: per-rank BN statistics in train mode differ from global-batch statistics, and
SyncBatchNorm does not run on CPU, so the gradient comparisons put the model in eval mode (BN
normalises with fixed running statistics, set to random values so it is not an identity): the
comparison is then exact up to float32 rounding. Dropout-free models, so eval mode changes nothing else.

A negative control swaps the gather for one whose backward returns only the local gradient (the
lightly#1528 bug): the same comparison must then fail.
"""

from __future__ import annotations

import logging
import math
import os
import re
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor

from episodic import checkpoint, distributed
from episodic.device import resolve_precision
from episodic.engine import Trainer
from episodic.errors import EpisodicError
from episodic.heads.base import HEADS
from episodic.methods import METHODS
from episodic.model import EpisodicModel
from episodic.models import build_encoder
from episodic.tasks.samplers import SAMPLERS
from episodic.tasks.scope import ScopePlan, _interleave, plan_scope
from helpers import TINY, make_cfg

WORLD = 2
B = 16  # global batch: 8 images per rank

# name: (head, head params, n_supp, n_query, n_way, scope[, method, method params[, sampler, sampler params]])
CASES: dict[str, tuple[Any, ...]] = {
    "contrastive_global": ("contrastive", {"temperature": 0.2}, 1, 2, None, "global"),
    "r2d2_global": ("r2d2", {"lam": 1.0, "scale": 10.0, "learn_scale": True}, 2, 1, None, "global"),
    "protonet_global": ("protonet", {"temperature": 0.4}, 1, 1, None, "global"),
    "r2d2_way4": ("r2d2", {"lam": 1.0, "scale": 10.0, "learn_scale": True}, 1, 1, 4, "global"),
    "contrastive_local": ("contrastive", {"temperature": 0.2}, 1, 1, None, "local"),
    # momentum-encoder support (no gradient through the gather), a queue passed to the head as memory,
    # and the head called twice (symmetric loss)
    "moco_r2d2_global": (
        "r2d2",
        {"lam": 1.0, "scale": 10.0, "learn_scale": True},
        1,
        1,
        None,
        "global",
        "moco",
        {"queue_size": 24, "symmetric": True},
    ),
    # pseudo-shots from the queue: the Sinkhorn assignment over the global batch, the shots' episode gathered
    "psco_contrastive_global": (
        "contrastive",
        {"temperature": 0.5, "symmetric": False},
        1,
        1,
        None,
        "global",
        "moco",
        {"queue_size": 24},
        "psco",
        {"shots": 2},
    ),
}


def _tiny_model(
    plan: ScopePlan,
    ns: int,
    nq: int,
    head: str,
    params: dict[str, Any],
    method: str = "simclr",
    method_params: dict[str, Any] | None = None,
    sampler: str = "views",
    sampler_params: dict[str, Any] | None = None,
) -> EpisodicModel:
    torch.manual_seed(0)
    enc = build_encoder("conv4", 1, {"width": 8, "depth": 2}, {"hidden_dim": 16, "out_dim": 8})
    pairing = METHODS.build(method, encoder=enc, **(method_params or {}))
    episodes = SAMPLERS.build(sampler, n_supp=ns, n_query=nq, n_way=plan.sampler_way, **(sampler_params or {}))
    model = EpisodicModel(episodes, pairing, HEADS.build(head, **params), scope=plan)
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model.eval()


def _grads(model: torch.nn.Module) -> Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])


def _grad_case(
    rank: int,
    head: str,
    params: dict[str, Any],
    ns: int,
    nq: int,
    n_way: int | None,
    scope: str,
    method: str = "simclr",
    method_params: dict[str, Any] | None = None,
    sampler: str = "views",
    sampler_params: dict[str, Any] | None = None,
) -> dict[str, float]:
    views = torch.rand(ns + nq, B, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    b = B // WORLD
    # one process, the whole batch (scope=local: the episodes each process would build on its own)
    ref = _tiny_model(
        plan_scope("global", n_way if scope == "global" else (n_way or b), B),
        ns,
        nq,
        head,
        params,
        method,
        method_params,
        sampler,
        sampler_params,
    )
    out = ref(views)
    out.loss.backward()
    ref_loss, ref_grads = float(out.loss.detach()), _grads(ref)
    # two processes, each its own slice
    plan = plan_scope(scope, n_way, B, WORLD, rank)
    model = _tiny_model(plan, ns, nq, head, params, method, method_params, sampler, sampler_params)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    out = ddp(views[:, rank * b : (rank + 1) * b])
    out.loss.backward()
    grads = _grads(model)
    res = {
        "loss": float(distributed.reduce_mean(out.loss.detach())),
        "ref_loss": ref_loss,
        "grad_diff": float((grads - ref_grads).abs().max()),
        "grad_max": float(ref_grads.abs().max()),
        "spans": float(model.scope.spans),
    }
    if method == "moco":  # a training forward enqueues: every rank's queue = the one-process queue
        for m in (ref, model):
            m.train()
            for bn in m.modules():  # fixed BN statistics, so keys do not depend on the batch split
                if isinstance(bn, torch.nn.modules.batchnorm._BatchNorm):
                    bn.eval()
        with torch.no_grad():
            ref(views)
            ddp(views[:, rank * b : (rank + 1) * b])
        res["queue_diff"] = float((model.method.queue.rows - ref.method.queue.rows).abs().max())
        res["queue_ptr"] = float(model.method.queue.ptr)
    return res


def _local_only_gather(x: Tensor) -> Tensor:
    """The wrong gather: forward right, backward keeps only this rank's own gradient (no SUM)."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    parts[dist.get_rank()] = x
    return torch.stack(parts)


def _trainer_case(rank: int, run_dir: Path) -> dict[str, Any]:
    cfg = make_cfg(*TINY, "head=r2d2", "train.steps=2", "train.ckpt_every=1", "train.log_every=1", "eval.knn_every=0")
    trainer = Trainer(cfg, run_dir)
    trainer.fit()
    flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    both = distributed.gather_no_grad(flat)
    # resume=auto under DDP: every rank gets the model and ITS OWN random streams back
    again = Trainer(make_cfg(*TINY, "head=r2d2", "train.steps=2", "resume=auto"), run_dir)
    flat_again = torch.cat([p.detach().flatten() for p in again.model.parameters()])
    # BYOL's loss never reaches the head (r2d2 has a learnable scale): DDP must not wait for its gradient,
    # and its accuracy (queries scored by the head, not through the scoped head) uses the local labels
    byol = Trainer(
        make_cfg(*TINY, "head=r2d2", "method=byol", "train.steps=2", "train.log_every=2", "eval.knn_every=0"),
        run_dir.parent / "byol",
    )
    byol.fit()
    return {
        "byol": byol.history,
        "params_equal": bool(torch.equal(both[0], both[1])),
        "history": trainer.history,
        "local_batch": trainer.scope.local_batch,
        "ddp": isinstance(trainer.train_model, torch.nn.parallel.DistributedDataParallel),
        "resumed_step": again.step,
        "resumed_params": bool(torch.equal(flat_again, flat)),
        "resumed_generator": torch.equal(again.generator.get_state(), trainer.generator.get_state()),
    }


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120))
    res: dict[str, Any] = {}
    try:
        for name, case in CASES.items():
            res[name] = _grad_case(rank, *case)
        real = distributed.gather_with_grad
        distributed.gather_with_grad = _local_only_gather
        try:
            res["wrong_gather"] = _grad_case(rank, *CASES["r2d2_global"])
        finally:
            distributed.gather_with_grad = real
        res["trainer"] = _trainer_case(rank, Path(out_dir) / "run")
    finally:
        torch.save(res, Path(out_dir) / f"rank{rank}.pt")
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    out = tmp_path_factory.mktemp("ddp")
    # fork (Linux): the children inherit the imported modules, where spawn re-imports torch and episodic
    # (seconds each); they set one intra-op thread first, as DataLoader workers do
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    mp.start_processes(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True, start_method=method)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)], out


@pytest.mark.parametrize("case", ["contrastive_global", "r2d2_global"])
def test_two_processes_equal_one_process_on_the_global_batch(ranks: Any, case: str) -> None:
    """The issue's criterion: loss and gradients within 1e-5 for the contrastive and r2d2 heads."""
    for res in ranks[0]:
        r = res[case]
        assert r["spans"] == 1.0  # the episode really is split over the two processes
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5, r
        assert r["grad_diff"] <= 1e-5 and r["grad_diff"] <= 1e-3 * r["grad_max"], r


@pytest.mark.parametrize(
    "case", ["protonet_global", "r2d2_way4", "contrastive_local", "moco_r2d2_global", "psco_contrastive_global"]
)
def test_other_layouts_equal_one_process(ranks: Any, case: str) -> None:
    """protonet across processes; n_way dividing the local batch (nothing gathered); scope=local
    (each process's own episodes = one process with n_way = local batch); MoCo with a queue; PsCo's
    pseudo-shots (Sinkhorn marginals reduced over the processes, the shots' episode gathered)."""
    for res in ranks[0]:
        r = res[case]
        assert r["spans"] == (1.0 if case.endswith("_global") else 0.0)
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5 and r["grad_diff"] <= 1e-5, r
        if CASES[case][6:7] == ("moco",):  # the keys of both processes were enqueued, in one-process order
            assert r["queue_diff"] <= 1e-5 and r["queue_ptr"] == B, r


def test_a_gather_without_summed_backward_is_caught(ranks: Any) -> None:
    for res in ranks[0]:
        r = res["wrong_gather"]
        assert abs(r["loss"] - r["ref_loss"]) <= 1e-5  # the forward is right ...
        assert r["grad_diff"] > 1e-4, r  # ... the gradient is not, and the comparison sees it


def test_trainer_under_ddp_stays_in_sync_and_only_rank0_writes(ranks: Any) -> None:
    results, out = ranks
    for res in results:
        t = res["trainer"]
        assert t["ddp"] and t["params_equal"] and t["local_batch"] == 16
        assert t["resumed_step"] == 2 and t["resumed_params"] and t["resumed_generator"]
        assert [h["step"] for h in t["history"]] == [1, 2]
    for res in results:
        (rec,) = res["trainer"]["byol"]
        assert rec["step"] == 2 and math.isfinite(rec["loss"]) and 0.0 <= rec["acc"] <= 1.0
    # the logged loss is the mean over ranks, so both ranks log the same numbers
    assert results[0]["trainer"]["history"][1]["loss"] == results[1]["trainer"]["history"][1]["loss"]
    run = out / "run"
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["last.pt", "step_0000001.pt", "step_0000002.pt"]
    state = checkpoint.load(run / "checkpoints" / "last.pt")
    assert state["world_size"] == 2 and state["step"] == 2 and len(state["rng"]) == 2
    g0, g1 = (torch.Generator().set_state(s["generator"]) for s in state["rng"])
    assert not torch.equal(torch.rand(4, generator=g0), torch.rand(4, generator=g1))  # per-rank streams
    assert len((run / "history.jsonl").read_text().splitlines()) == 2


def test_interleave_restores_single_process_order() -> None:
    # 2 processes x 1 episode x (2 views x 3 classes): row v*3+c of process j -> row v*6 + j*3 + c
    parts = torch.arange(12).view(2, 1, 6)
    assert _interleave(parts, 2).tolist() == [[0, 1, 2, 6, 7, 8, 3, 4, 5, 9, 10, 11]]
    assert _interleave(parts, 4).tolist() == [list(range(12))]  # 6 rows are not 4 whole views: concatenated


def test_gather_is_identity_in_one_process() -> None:
    x = torch.randn(3, 2, requires_grad=True)
    y = distributed.gather_with_grad(x)
    assert y.shape == (1, 3, 2) and torch.equal(y[0], x)
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3, 2))


# ------------------------------------------------------------------ single process: accumulation, plans


def _one_step(tmp_path: Path, views: Tensor, *overrides: str) -> tuple[float, Tensor]:
    """Loss and parameter gradients of one optimizer step on pre-augmented views (no augmentation draws)."""
    small = ["backbone.params.width=8", "backbone.params.depth=2", "data.params.image_size=16"]
    trainer = Trainer(make_cfg(*TINY, *small, *overrides), tmp_path / "_".join(overrides or ("plain",)))
    g = torch.Generator().manual_seed(3)
    for m in trainer.model.modules():  # eval-mode BN (train-mode statistics differ per micro-batch),
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):  # with non-trivial fixed statistics
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.05 + 0.1 * torch.rand(m.num_features, generator=g))
    trainer.model.eval()
    stats = trainer.train_step(views)  # views [V, B, C, S, S]
    return float(stats.loss), _grads(trainer.model)


def test_accumulation_equals_the_larger_batch_when_episodes_fit_micro_batches(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, one_thread: None
) -> None:
    views = torch.rand(2, 32, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    loss1, g1 = _one_step(tmp_path, views, "n_way=8")
    loss2, g2 = _one_step(tmp_path, views, "n_way=8", "optim.accu_iter=2")
    assert abs(loss1 - loss2) <= 1e-6 and g1.abs().max() > 1e-3
    assert (g1 - g2).abs().max() <= 1e-4 * g1.abs().max()
    # n_way=null: two 16-way micro-episodes are not the 32-way episode (a different, easier task)
    with caplog.at_level(logging.WARNING, logger="episodic.engine"):
        loss3, _ = _one_step(tmp_path, views, "optim.accu_iter=2")
    loss4, _ = _one_step(tmp_path, views)
    assert loss4 - loss3 > 0.3  # about log(32) - log(16)
    assert any("a different task from the 32-way episode" in r.getMessage() for r in caplog.records)


def test_scope_plans_and_their_errors() -> None:
    p = plan_scope("global", None, 16, 2, rank=1)
    assert (p.n_way, p.n_way_local, p.spans, p.sampler_way, p.ranks_per_episode) == (16, 8, True, None, 2)
    p = plan_scope("global", 4, 16, 2)
    assert (p.n_way, p.spans, p.sampler_way) == (4, False, 4)
    p = plan_scope("global", 16, 64, 4, accu_iter=2)  # 32 images per micro-batch, 8 per process
    assert (p.local_batch, p.n_way_local, p.ranks_per_episode) == (8, 8, 2)
    assert plan_scope("local", None, 16, 2).n_way == 8
    cases = [
        (("global", 8, 24, 2), "n_way=8 would split an episode unevenly over processes holding 12 images"),
        (("global", None, 30, 4), "batch_size=30 is not divisible by optim.accu_iter x processes = 1 x 4"),
        (("local", 3, 16, 2), "n_way=3 does not divide the 8 images each process holds per micro-batch"),
        (("glob", None, 16, 1), "task.scope='glob' is not allowed; use global or local"),
        (("global", 8, 30, 1), "n_way=8 does not divide the batch of 30 images"),
    ]
    for args, message in cases:
        with pytest.raises(EpisodicError, match=re.escape(message)):
            plan_scope(*args)
    with pytest.raises(EpisodicError, match="optim.accu_iter=0 is not allowed"):
        plan_scope("global", None, 16, 1, accu_iter=0)


def test_precision_and_sync_bn_on_cpu(caplog: pytest.LogCaptureFixture) -> None:
    cpu = torch.device("cpu")
    with caplog.at_level(logging.WARNING, logger="episodic.device"):
        assert resolve_precision("bf16", cpu) is None and resolve_precision(32, cpu) is None
    assert "precision=bf16 needs a CUDA device; training in float32 on cpu" in caplog.text
    with pytest.raises(EpisodicError, match="precision='fp8' is not allowed; use 32, bf16 or fp16"):
        resolve_precision("fp8", cpu)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    two = distributed.DistInfo(0, 2, 0, cpu)
    assert distributed.convert_sync_batchnorm(model, "auto", two) == (model, False)
    with pytest.raises(EpisodicError, match="sync_bn=true needs CUDA"):
        distributed.convert_sync_batchnorm(model, True, two)
    with pytest.raises(EpisodicError, match="sync_bn='maybe' is not allowed; use auto, true or false"):
        distributed.convert_sync_batchnorm(model, "maybe", two)
