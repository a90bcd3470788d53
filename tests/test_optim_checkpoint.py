"""Optimisers, the schedule and checkpoint files."""

import math
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from episodic import checkpoint
from episodic.errors import EpisodicError
from episodic.optim import LARS, build_optimizer, build_scheduler, param_groups, warmup_cosine


def test_param_groups_exclude_bias_and_norm_from_decay() -> None:
    m = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    decay, plain = param_groups(m, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(plain["params"]) == 3 and plain["weight_decay"] == 0.0


def test_lars_step_by_hand() -> None:
    w = nn.Parameter(torch.tensor([3.0, 4.0]))
    b = nn.Parameter(torch.tensor([1.0]))
    opt = LARS(
        [dict(params=[w], weight_decay=0.5), dict(params=[b], weight_decay=0.0, lars=False)],
        lr=0.1,
        momentum=0.9,
        eta=0.01,
    )
    w.grad, b.grad = torch.tensor([1.0, 0.0]), torch.tensor([2.0])
    opt.step()
    u = torch.tensor([1.0, 0.0]) + 0.5 * torch.tensor([3.0, 4.0])  # g + wd w
    u = u * 0.01 * 5.0 / u.norm()
    assert torch.allclose(w.detach(), torch.tensor([3.0, 4.0]) - 0.1 * u)
    assert torch.allclose(b.detach(), torch.tensor([1.0 - 0.2]))
    # second step: momentum buffer accumulates
    w.grad, b.grad = torch.tensor([1.0, 0.0]), torch.tensor([2.0])
    opt.step()
    assert torch.allclose(b.detach(), torch.tensor([0.8 - 0.1 * (2.0 * 0.9 + 2.0)]))


def test_warmup_cosine_values() -> None:
    assert warmup_cosine(0, 100, 4) == pytest.approx(1 / 5)
    assert warmup_cosine(3, 100, 4) == pytest.approx(4 / 5)
    assert warmup_cosine(4, 100, 4) == pytest.approx(1.0)
    assert warmup_cosine(52, 100, 4) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 4, final_ratio=0.1) == pytest.approx(0.1)
    opt = build_optimizer(nn.Linear(2, 2), "sgd", lr=2.0)
    sched = build_scheduler(opt, 10, warmup_steps=0)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_unknown_optimizer() -> None:
    message = re.escape("unknown optimizer 'sgdd' (did you mean 'sgd'?); allowed: adam, adamw, lars, sgd")
    with pytest.raises(EpisodicError, match=message):
        build_optimizer(nn.Linear(2, 2), "sgdd", lr=0.1)


def test_checkpoint_roundtrip_atomic_and_corrupt(tmp_path: Path) -> None:
    p = checkpoint.save({"step": 3, "x": torch.arange(4)}, tmp_path / "c" / "a.pt")
    assert not (tmp_path / "c" / "a.pt.tmp").exists()
    s = checkpoint.load(p)
    assert s["step"] == 3 and torch.equal(s["x"], torch.arange(4))
    data = p.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(EpisodicError, match="cut.pt' is corrupt or truncated"):
        checkpoint.load(tmp_path / "cut.pt")
    torch.save({"model": 1}, tmp_path / "foreign.pt")
    with pytest.raises(EpisodicError, match="not an episodic checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")
    with pytest.raises(EpisodicError, match="does not exist"):
        checkpoint.load(tmp_path / "none.pt")
