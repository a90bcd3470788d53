"""Encoder pairings: MoCo v2 and BYOL against hand-written losses, momentum updates, queue, exact resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from episodic.engine import Trainer
from episodic.heads import HEADS
from episodic.methods import METHODS
from episodic.methods.momentum import ema_update, momentum_at
from episodic.models import build_encoder
from episodic.optim import build_optimizer
from episodic.tasks import Episode, ViewSampler
from helpers import TINY, make_cfg, pair


def encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_encoder("conv4", 1, {"width": 8, "depth": 2}, {"hidden_dim": 16, "out_dim": 8})


def images(b: int = 4, n_supp: int = 1, n_query: int = 1, seed: int = 1) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return ViewSampler(n_supp, n_query)(torch.rand(n_supp + n_query, b, 1, 8, 8, generator=g))


def test_momentum_schedules_and_ema() -> None:
    assert momentum_at(0.99, 7, 10, "constant") == 0.99
    assert momentum_at(0.99, 0, 10, "cosine") == pytest.approx(0.99)
    assert momentum_at(0.99, 5, 10, "cosine") == pytest.approx(0.995)
    assert momentum_at(0.99, 10, 10, "cosine") == pytest.approx(1.0)
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    old = a.weight.detach().clone()
    ema_update(a, b, 0.9)
    assert torch.allclose(a.weight, 0.9 * old + 0.1 * b.weight)


# ----------------------------------------------------------------- MoCo
def test_moco_is_infonce_against_keys_and_queue() -> None:
    moco = METHODS.build("moco", encoder=encoder(), queue_size=6).train()
    head = HEADS.build("contrastive", temperature=0.2, symmetric=False)
    ep = images(b=4)
    queue0 = moco.queue.rows.clone()
    out = pair(moco, ep, head)
    with torch.no_grad():  # the same passes again (train-mode BN: each batch's own statistics)
        q = F.normalize(moco.encoder(ep.query[0]), dim=-1)
        k_raw = moco.momentum_encoder(ep.support[0])
        k = F.normalize(k_raw, dim=-1)
    logits = torch.cat([q @ k.T, q @ F.normalize(queue0, dim=-1).T], 1) / 0.2
    assert out.loss.item() == pytest.approx(F.cross_entropy(logits, torch.arange(4)).item(), abs=1e-5)
    assert torch.allclose(moco.queue.rows[:4], k_raw, atol=1e-6) and torch.equal(moco.queue.rows[4:], queue0[4:])
    assert int(moco.queue.ptr) == 4
    pair(moco, ep, head)  # a ring buffer: rows 4, 5, 0, 1
    assert int(moco.queue.ptr) == 2 and torch.allclose(moco.queue.rows[4:], k_raw[:2], atol=1e-6)


def test_moco_momentum_encoder_is_frozen_and_averaged() -> None:
    moco = METHODS.build("moco", encoder=encoder(), momentum=0.9, queue_size=0)
    assert all(not p.requires_grad for p in moco.momentum_encoder.parameters())
    opt = build_optimizer(moco, "sgd", lr=0.5)
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not trained & {id(p) for p in moco.momentum_encoder.parameters()}
    head = HEADS.build("protonet")
    pair(moco, images(), head).loss.backward()
    assert all(p.grad is None for p in moco.momentum_encoder.parameters())
    opt.step()
    before = [p.clone() for p in moco.momentum_encoder.parameters()]
    moco.after_step(0, 10)
    for t, b, o in zip(moco.momentum_encoder.parameters(), before, moco.encoder.parameters()):
        assert torch.allclose(t, 0.9 * b + 0.1 * o)


def test_moco_symmetric_adds_the_swapped_loss() -> None:
    moco = METHODS.build("moco", encoder=encoder(), queue_size=0, symmetric=True, predictor_hidden=16).train()
    head = HEADS.build("contrastive", temperature=0.3, symmetric=False)
    ep = images(b=4, n_supp=1, n_query=2)
    out = pair(moco, ep, head)
    swapped = ep.replace(
        support=ep.query,
        query=ep.support,
        support_labels=ep.query_labels,
        query_labels=ep.support_labels,
        n_supp=2,
        n_query=1,
    )
    ref = (
        head(moco._embed(ep, head.transform_embeddings)).loss
        + head(moco._embed(swapped, head.transform_embeddings)).loss
    )
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-5)


def test_moco_queue_with_ridge_and_protonet_heads() -> None:
    for name in ["r2d2", "protonet"]:
        moco = METHODS.build("moco", encoder=encoder(), queue_size=5).train()
        head = HEADS.build(name)
        out = pair(moco, images(b=4), head)
        assert out.logits.shape == (1, 4, 4) and math.isfinite(out.loss.item())
        out.loss.backward()
        assert moco.encoder.projector.net[0].weight.grad.abs().sum() > 0


def test_moco_queue_is_restored_on_resume(tmp_path: Path) -> None:
    base = [
        "head=contrastive",
        "head.params.symmetric=false",
        "method=moco",
        "method.params.queue_size=40",
        *TINY,
        "train.steps=4",
        "train.log_every=1",
        "train.ckpt_every=2",
        "train.keep_last=0",
    ]
    a = Trainer(make_cfg(*base), tmp_path / "a")
    a.fit()
    ckpt = tmp_path / "a" / "checkpoints" / "step_0000002.pt"
    b = Trainer(make_cfg(*base, f"resume={ckpt}"), tmp_path / "b")
    assert b.step == 2 and int(b.model.method.queue.ptr) == 2 * 32 % 40
    b.fit()
    for key in ["method.queue.rows", "method.queue.ptr", "method.momentum_encoder.projector.net.0.weight"]:
        assert torch.equal(a.model.state_dict()[key], b.model.state_dict()[key]), key
    loss = [json.loads(x)["loss"] for x in (tmp_path / "b" / "history.jsonl").read_text().splitlines()]
    assert loss[-1] == pytest.approx(a.history[-1]["loss"], abs=1e-6)


# ----------------------------------------------------------------- BYOL
def test_byol_symmetric_is_the_byol_loss() -> None:
    byol = METHODS.build("byol", encoder=encoder(), predictor_hidden=16).train()
    ep = images(b=4)
    out = pair(byol, ep, HEADS.build("protonet"))
    x = torch.cat([ep.support[0], ep.query[0]])
    with torch.no_grad():
        p = F.normalize(byol.predictor(byol.encoder(x)), dim=-1)
        t = F.normalize(byol.target(x), dim=-1)
    ref = (2 - 2 * (p[4:] * t[:4]).sum(-1)).mean() + (2 - 2 * (p[:4] * t[4:]).sum(-1)).mean()
    assert out.loss.item() == pytest.approx(ref.item(), abs=1e-5)
    assert out.logits.shape == (1, 4, 4)


def test_byol_mixed_queries_regress_onto_mixed_prototypes() -> None:
    byol = METHODS.build("byol", encoder=encoder(), predictor_hidden=16, symmetric=False).train()
    ep = images(b=3, n_supp=2, n_query=1)
    w = torch.tensor([[0.7, 0.4, 1.0]])
    ep = ep.replace(query_labels_mix=ep.query_labels.roll(1, -1), mix_weight=w)
    out = pair(byol, ep, HEADS.build("r2d2"))
    with torch.no_grad():
        p = F.normalize(byol.predictor(byol.encoder(ep.query[0])), dim=-1)
        t = F.normalize(byol.target(ep.support[0]), dim=-1)  # rows: view 0 of images 0-2, then view 1
    proto = (t[:3] + t[3:]) / 2
    ref = 0.0
    for j in range(3):
        target = w[0, j] * proto[j] + (1 - w[0, j]) * proto[(j - 1) % 3]
        ref += 2 - 2 * (p[j] @ target).item()
    assert out.loss.item() == pytest.approx(ref / 3, abs=1e-5)


def test_byol_trains_online_and_predictor_not_target() -> None:
    byol = METHODS.build("byol", encoder=encoder(), predictor_hidden=16, momentum=0.5, momentum_schedule="constant")
    head = HEADS.build("r2d2")
    pair(byol, images(), head).loss.backward()
    assert byol.predictor.net[0].weight.grad.abs().sum() > 0
    assert byol.encoder.projector.net[0].weight.grad is not None
    assert all(p.grad is None for p in byol.target.parameters())
    assert head.scale.log_gain.grad is None  # the head only scores, it is not in BYOL's loss
    before = [p.clone() for p in byol.target.parameters()]
    byol.after_step(3, 10)
    for t, b, o in zip(byol.target.parameters(), before, byol.encoder.parameters()):
        assert torch.allclose(t, 0.5 * b + 0.5 * o)


@pytest.mark.parametrize("method", ["moco", "byol"])
def test_pairing_trains_end_to_end(tmp_path: Path, method: str) -> None:
    cfg = make_cfg("head=protonet", f"method={method}", "task.augment=[rotate]", *TINY, "train.steps=2")
    t = Trainer(cfg, tmp_path)
    t.fit()
    assert all(math.isfinite(r["loss"]) for r in t.history)
