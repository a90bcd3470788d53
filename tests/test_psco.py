"""The ``psco`` sampler: Sinkhorn marginals, the shot selection against brute force, its loss against
PsCo's formula in float64 (and finite differences), the model's step with it, and its config errors.
The two-process run against one process on the global batch is a case of tests/test_distributed.py."""

from __future__ import annotations

import math

import pytest
import torch

from episodic.errors import EpisodicError
from episodic.heads.base import HEADS
from episodic.methods import METHODS
from episodic.model import EpisodicModel
from episodic.models import build_encoder
from episodic.tasks.augment import TaskContext, TaskPipeline, build_task_pipeline
from episodic.tasks.episode import Episode
from episodic.tasks.samplers import SAMPLERS
from episodic.tasks.samplers.psco import sinkhorn


def psco_reference(scores: torch.Tensor, eps: float, iterations: int) -> torch.Tensor:
    """PsCo's ``distributed_sinkhorn(normalization='row')`` in one process, literally, in float64."""
    q = torch.exp(scores.double() / eps)
    b, k = q.shape
    q = q / q.sum()
    for _ in range(iterations):
        q = q / q.sum(0, keepdim=True) / k
        q = q / q.sum(1, keepdim=True) / b
    return q * b


def test_sinkhorn_marginals_and_the_reference() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.nn.functional.normalize(torch.randn(12, 8, generator=g), dim=1)
    queue = torch.nn.functional.normalize(torch.randn(30, 8, generator=g), dim=1)
    s = (scores @ queue.T).double()
    a = sinkhorn(s, 0.05, 3)
    assert torch.allclose(a.sum(1), torch.ones(12, dtype=torch.float64), atol=1e-12)  # rows: distributions
    assert torch.allclose(a, psco_reference(s, 0.05, 3), rtol=1e-10, atol=1e-14)
    converged = sinkhorn(s, 0.5, 500)  # both marginals uniform at convergence: columns carry B / Q each
    assert torch.allclose(converged.sum(1), torch.ones(12, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(converged.sum(0), torch.full((30,), 12 / 30, dtype=torch.float64), atol=1e-8)
    # the column step spreads mass: no queue entry takes much more than its share, unlike a plain softmax
    soft = torch.softmax(s / 0.05, dim=1)
    assert converged.sum(0).max() < soft.sum(0).max()


def test_topk_selection_matches_brute_force() -> None:
    g = torch.Generator().manual_seed(1)
    sampler = SAMPLERS.build("psco", n_supp=1, n_query=1, shots=3)
    keys, queue = torch.randn(7, 5, generator=g), torch.randn(20, 5, generator=g)
    idx = sampler.select(keys, queue)
    s = torch.nn.functional.normalize(keys, dim=1) @ torch.nn.functional.normalize(queue, dim=1).T
    a = psco_reference(s, 0.05, 3)
    for i in range(7):
        brute = sorted(range(20), key=lambda j: -float(a[i, j]))[:3]
        assert sorted(idx[i].tolist()) == sorted(brute)


def test_neighbors_takes_the_nearest_queue_rows() -> None:
    g = torch.Generator().manual_seed(5)
    sampler = SAMPLERS.build("neighbors", n_supp=1, n_query=1, shots=2)
    keys, queue = torch.randn(6, 4, generator=g), torch.randn(15, 4, generator=g)
    idx = sampler.select(keys, queue)
    cos = torch.nn.functional.cosine_similarity(keys[:, None], queue[None], dim=-1)
    for i in range(6):
        assert sorted(idx[i].tolist()) == sorted(sorted(range(15), key=lambda j: -float(cos[i, j]))[:2])


def _shots_episode(q: torch.Tensor, shots: torch.Tensor) -> Episode:
    b, k = q.shape[0], shots.shape[1]
    return Episode(
        support=shots.transpose(0, 1).reshape(1, k * b, -1),  # view-major: shot j of class c at j * b + c
        query=q.unsqueeze(0),
        support_labels=torch.arange(b).repeat(k).unsqueeze(0),
        query_labels=torch.arange(b).unsqueeze(0),
        n_way=b,
        n_supp=k,
        n_query=1,
    )


def test_pseudo_term_is_psco_supervised_contrastive_loss_and_its_gradient() -> None:
    """With head=contrastive (one-directional), the pseudo episode's loss is PsCo's
    ``logsumexp_s(q.s / T) - q.mean(own shots) / T`` on normalised rows; gradcheck in float64."""
    g = torch.Generator().manual_seed(2)
    b, k, d, t = 5, 3, 6, 0.7
    q = torch.randn(b, d, generator=g, dtype=torch.float64, requires_grad=True)
    shots = torch.randn(b, k, d, generator=g, dtype=torch.float64)
    head = HEADS.build("contrastive", temperature=t, symmetric=False).double()
    loss = head(_shots_episode(q, shots)).loss
    qn = torch.nn.functional.normalize(q, dim=1)
    sn = torch.nn.functional.normalize(shots, dim=2)
    all_logits = qn @ sn.reshape(b * k, d).T / t
    own = (qn * sn.mean(1)).sum(1) / t
    assert torch.allclose(loss, (all_logits.logsumexp(1) - own).mean(), rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: head(_shots_episode(x, shots)).loss, (q,), eps=1e-6, atol=1e-8)


def _psco_model(task: list[str] | None = None, queue: int = 40, name: str = "psco", **sampler: object) -> EpisodicModel:
    torch.manual_seed(0)
    enc = build_encoder("conv4", 1, {"width": 8, "depth": 2}, {"hidden_dim": 16, "out_dim": 8})
    moco = METHODS.build("moco", encoder=enc, queue_size=queue, momentum=0.9)
    head = HEADS.build("contrastive", temperature=0.5, symmetric=False)
    pipeline = build_task_pipeline({"augment": task or []}, TaskContext(embed_dim=8)) if task else TaskPipeline()
    return EpisodicModel(SAMPLERS.build(name, n_supp=1, n_query=1, **sampler), moco, head, pipeline)


@pytest.mark.parametrize("name", ["psco", "neighbors"])
def test_the_step_adds_the_pseudo_episode_and_enqueues_only_the_keys(name: str) -> None:
    model = _psco_model(name=name, shots=2)
    for m in model.modules():  # training mode (the queue follows the batch), BatchNorm on fixed statistics
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.eval()
    views = torch.rand(2, 6, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    rows_before = model.method.queue.rows.clone()
    passes: list[int] = []
    model.method.momentum_encoder.register_forward_hook(lambda *_: passes.append(1))
    out = model(views)
    assert len(passes) == 1  # the sampler's keys are the pairing's: one momentum-encoder pass a step
    # the same loss by hand: the instance episode with the queue, plus the shots' episode without it
    head, moco = model.head, model.method
    keys = moco.key(views[0])
    idx = model.sampler.select(keys, rows_before)
    q = moco.online(views[1])
    inst = Episode(keys.unsqueeze(0), q.unsqueeze(0), torch.arange(6)[None], torch.arange(6)[None], 6, 1, 1)
    expected = head(inst, memory=rows_before).loss + head(_shots_episode(q, rows_before[idx])).loss
    assert torch.allclose(out.loss, expected, rtol=1e-6, atol=1e-6)
    # the queue received the 6 keys (and nothing of the shots)
    assert torch.allclose(model.method.queue.rows[:6], keys, atol=1e-6)
    assert torch.equal(model.method.queue.rows[6:], rows_before[6:])


def test_query_mixing_and_auxiliary_losses_follow_the_pseudo_episode() -> None:
    model = _psco_model(task=["query_mix", "rotation_loss"], shots=2)
    views = torch.rand(2, 8, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    out = model(views, torch.Generator().manual_seed(0))
    out.loss.backward()
    assert math.isfinite(float(out.loss.detach()))
    assert all(p.grad is not None for p in model.method.encoder.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: _psco_model(task=["rotate"]), "task augmentations that change the classes"),
        (lambda: _psco_model(name="neighbors", queue=1), "sampler=neighbors takes its 4 shots per class"),
        (lambda: _psco_model(queue=3, shots=4), "method.params.queue_size >= 4"),
        (lambda: SAMPLERS.build("psco", n_supp=2), "got n_supp=2, use 1"),
        (lambda: SAMPLERS.build("psco", epsilon=0.001), "sampler.params.epsilon=0.001 is not allowed"),
        (lambda: SAMPLERS.build("psco", selection="argmax"), "sampler.params.selection='argmax' is not allowed"),
    ],
)
def test_psco_errors_are_one_line(build: object, message: str) -> None:
    with pytest.raises(EpisodicError, match=message.replace("(", r"\(").replace("[", r"\[")):
        build()  # type: ignore[operator]
