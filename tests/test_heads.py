"""Heads against float64 references written independently, plus gradcheck."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from episodic.heads import HEADS
from episodic.heads.base import LogitScale
from episodic.heads.contrastive import ContrastiveHead
from episodic.heads.protonet import ProtoNetHead
from episodic.heads.r2d2 import R2D2Head, ridge_weights
from episodic.tasks import ViewSampler


def episode(n_supp: int = 1, n_query: int = 1, b: int = 6, d: int = 5, n_way: int | None = None):
    z = torch.randn(n_supp + n_query, b, d, dtype=torch.float64)
    return z, ViewSampler(n_supp, n_query, n_way)(z)


def test_registry_names_and_unknown() -> None:
    assert {"contrastive", "protonet", "r2d2"} <= set(HEADS.names())
    with pytest.raises(Exception, match="unknown head 'r2d3'.*did you mean 'r2d2'"):
        HEADS.get("r2d3")


def test_contrastive_is_ntxent_for_two_views() -> None:
    z, ep = episode(b=8)
    tau = 0.3
    loss = ContrastiveHead(temperature=tau).double()(ep).loss
    # NT-Xent over the 2N rows, written directly
    x = F.normalize(torch.cat([z[0], z[1]]), dim=-1)
    n = len(z[0])
    total = 0.0
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = [(x[i] @ x[j]).item() / tau for j in range(2 * n) if j != i]
        total += -((x[i] @ x[pos]).item() / tau - np.log(np.sum(np.exp(sims))))
    assert loss.item() == pytest.approx(total / (2 * n), abs=1e-10)


def test_contrastive_multi_view_positives() -> None:
    z, ep = episode(n_supp=2, n_query=1, b=3, d=4)
    tau = 0.5
    loss = ContrastiveHead(temperature=tau).double()(ep).loss
    x = F.normalize(z.reshape(-1, 4), dim=-1)  # rows: view-major, image = row % 3
    img = torch.arange(9) % 3
    total = 0.0
    for a in range(9):
        others = [b for b in range(9) if b != a]
        lse = torch.logsumexp(torch.stack([x[a] @ x[b] / tau for b in others]), 0)
        pos = [b for b in others if img[b] == img[a]]
        total += -sum((x[a] @ x[p] / tau - lse) for p in pos) / len(pos)
    assert loss.item() == pytest.approx(total.item() / 9, abs=1e-10)


def test_contrastive_scores_are_class_logsumexp() -> None:
    _, ep = episode(n_supp=2, n_query=1, b=4)
    h = ContrastiveHead(temperature=0.5).double()
    logits = h.scores(ep.support, ep.support_labels, ep.query, ep.n_way)
    s, q = F.normalize(ep.support[0], dim=-1), F.normalize(ep.query[0], dim=-1)
    for j, k in itertools.product(range(4), range(4)):
        ref = torch.logsumexp(torch.stack([q[j] @ s[i] / 0.5 for i in range(8) if ep.support_labels[0, i] == k]), 0)
        assert logits[0, j, k].item() == pytest.approx(ref.item(), abs=1e-10)


@pytest.mark.parametrize("n_supp", [1, 3])  # one shot: prototypes on the unit sphere (Geometry.unit)
@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_protonet_against_loop(metric: str, n_supp: int) -> None:
    _, ep = episode(n_supp=n_supp, n_query=2, b=4, d=6)
    tau = 0.7
    out = ProtoNetHead(temperature=tau, metric=metric).double()(ep)
    s, q = F.normalize(ep.support[0], dim=-1), F.normalize(ep.query[0], dim=-1)
    protos = torch.stack([s[ep.support_labels[0] == k].mean(0) for k in range(4)])
    ref = torch.empty(len(q), 4, dtype=torch.float64)
    for j in range(len(q)):
        for k in range(4):
            ref[j, k] = (
                -(q[j] - protos[k]).pow(2).sum()
                if metric == "euclidean"
                else F.cosine_similarity(q[j], protos[k], dim=0)
            ) / tau
    assert torch.allclose(out.logits[0], ref, atol=1e-12)
    ce = -ref.log_softmax(-1)[torch.arange(len(q)), ep.query_labels[0]].mean()
    assert out.loss.item() == pytest.approx(ce.item(), abs=1e-12)


def test_unit_rows_is_normalize_with_its_gradient() -> None:
    """The hand-written backward of the head's L2 normalisation against autograd's of ``F.normalize``, in
    float64, on ordinary rows, a zero row and a row shorter than ``eps`` (the clamp: no radial term)."""
    from episodic.heads.base import unit_rows

    x = torch.randn(2, 5, 7, dtype=torch.float64)
    x[0, 0], x[0, 1] = 0.0, 1e-13
    g = torch.randn_like(x)
    a, b = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (unit_rows(a) * g).sum().backward()
    (F.normalize(b, dim=-1) * g).sum().backward()
    assert torch.equal(unit_rows(x), F.normalize(x, dim=-1))
    assert torch.allclose(a.grad, b.grad, rtol=1e-12, atol=0)
    assert torch.autograd.gradcheck(unit_rows, (x[1:].clone().requires_grad_(True),))


def test_one_shot_class_logits_are_the_class_logsumexp() -> None:
    """One support example per class, labels in any order: each class's logit is its column (a scatter)."""
    from episodic.heads.contrastive import class_logits, class_logsumexp

    sim = torch.randn(2, 3, 4, dtype=torch.float64)
    labels = torch.stack([torch.randperm(4), torch.randperm(4)])
    assert torch.allclose(class_logits(sim, labels, 4), class_logsumexp(sim, labels, 4), atol=1e-12)
    two = torch.tensor([[0, 1, 0, 1], [1, 0, 0, 1]])  # two shots: the log-sum-exp
    assert torch.allclose(class_logits(sim, two, 2), class_logsumexp(sim, two, 2), atol=1e-12)


def test_an_unsolvable_ridge_system_is_non_finite_not_an_error() -> None:
    """A zero pivot (here ``gram = -lam I``) gives inf/NaN for the guard to catch, no exception, no host read."""
    from episodic.heads.r2d2 import _ridge_solve

    out = _ridge_solve(-0.5 * torch.eye(3).expand(2, 3, 3), torch.ones(2, 3, 1), 0.5)
    assert not torch.isfinite(out).all()


def test_r2d2_primal_equals_dual_equals_numpy() -> None:
    s = torch.randn(2, 7, 4, dtype=torch.float64)
    y = F.one_hot(torch.randint(0, 3, (2, 7)), 3).double()
    lam = 0.8
    wp, wd = ridge_weights(s, y, lam, "primal"), ridge_weights(s, y, lam, "dual")
    for e in range(2):
        S, Y = s[e].numpy(), y[e].numpy()
        ref = np.linalg.inv(S.T @ S + lam * np.eye(4)) @ S.T @ Y
        assert np.allclose(wp[e].numpy(), ref, atol=1e-12) and np.allclose(wd[e].numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("n", [3, 12])  # auto picks dual for n < d, primal for n > d
def test_r2d2_logits_reference(n: int) -> None:
    d = 8
    _, ep = episode(n_supp=n // 3, n_query=2, b=3, d=d)
    head = R2D2Head(lam=0.5, scale=2.0, learn_scale=False).double()
    logits = head(ep).logits[0]
    S, Q = F.normalize(ep.support[0], dim=-1).numpy(), F.normalize(ep.query[0], dim=-1).numpy()
    Y = np.eye(3)[ep.support_labels[0].numpy()]
    ref = 2.0 * Q @ S.T @ np.linalg.solve(S @ S.T + 0.5 * np.eye(len(S)), Y)
    assert np.allclose(logits.detach().numpy(), ref, atol=1e-10)


@pytest.mark.parametrize(
    "name, params",
    [
        ("contrastive", {"temperature": 0.5}),
        ("protonet", {"temperature": 0.5}),
        ("r2d2", {"lam": 0.7, "learn_scale": False, "scale": 3.0}),
    ],
)
@pytest.mark.parametrize("n_supp, n_query", [(1, 1), (2, 3)])
def test_gradcheck(name: str, params: dict, n_supp: int, n_query: int) -> None:
    head = HEADS.build(name, **params).double()
    _, ep = episode(n_supp, n_query, b=3, d=4)
    s = ep.support.clone().requires_grad_(True)
    q = ep.query.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s, q: head(ep.replace(support=s, query=q)).loss, (s, q))


@pytest.mark.parametrize("name", ["contrastive", "protonet", "r2d2"])
def test_several_episodes_are_independent(name: str) -> None:
    head = HEADS.build(name).double()
    _, ep = episode(2, 3, b=8, n_way=4)
    both = head(ep).logits
    for e in range(2):
        one = ep.replace(
            support=ep.support[e : e + 1],
            query=ep.query[e : e + 1],
            support_labels=ep.support_labels[e : e + 1],
            query_labels=ep.query_labels[e : e + 1],
        )
        assert torch.allclose(head(one).logits[0], both[e], atol=1e-12)


def test_learnable_scale_gets_gradient() -> None:
    head = R2D2Head(learn_scale=True).double()
    _, ep = episode()
    head(ep).loss.backward()
    assert head.scale.log_gain.grad is not None and head.scale.log_gain.grad.abs() > 0


@pytest.mark.parametrize("init", [1 / 0.07, 1 / 0.2, 10.0, 2.5])
def test_a_learnable_logit_scale_starts_exactly_at_its_value_in_float64(init: float) -> None:
    scale = LogitScale(init, learn=True).double()
    one = torch.ones((), dtype=torch.float64)
    assert scale(one).item() == init and scale.value == init
    assert LogitScale(init, learn=True)(torch.ones(())).item() == torch.tensor(init).item()  # float32: rounded once
