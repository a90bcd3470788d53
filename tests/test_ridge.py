"""The fused ridge logits (episodic/heads/ridge.py): finite differences, and the composite ridge's values and
gradients through the whole R2D2 head, in both forms, with and without a learnable scale and a bias."""

import math

import pytest
import torch
import torch.nn.functional as F

from episodic.heads.r2d2 import R2D2Head, ridge_weights
from episodic.heads.ridge import ridge_logits
from episodic.tasks.episode import Episode


@pytest.mark.parametrize("primal", [False, True])
@pytest.mark.parametrize("learn", [False, True])
def test_ridge_logits_gradients_are_finite_differences(primal: bool, learn: bool) -> None:
    """Every input that can carry a gradient (rows, targets, log-gain), two episodes, float64."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 9, 4, dtype=torch.float64, generator=g).requires_grad_(True)  # 5 support + 4 query rows
    y = torch.rand(2, 5, 3, dtype=torch.float64, generator=g).requires_grad_(True)
    gain = torch.tensor(0.3, dtype=torch.float64, requires_grad=True) if learn else None

    def f(x: torch.Tensor, y: torch.Tensor, *gain: torch.Tensor) -> torch.Tensor:
        return ridge_logits(x, 5, y, 0.7, 2.5, gain[0] if gain else None, primal)

    assert torch.autograd.gradcheck(f, (x, y, *([gain] if learn else [])))


@pytest.mark.parametrize("primal", [False, True])
def test_ridge_logits_are_the_ridge_classifier(primal: bool) -> None:
    """``init * exp(g) * Q W`` with ``W`` from :func:`ridge_weights` (float64)."""
    x = torch.randn(2, 9, 4, dtype=torch.float64)
    y = F.one_hot(torch.randint(0, 3, (2, 5)), 3).double()
    gain = torch.tensor(-0.4, dtype=torch.float64)
    w = ridge_weights(x[:, :5], y, 0.7, "dual")
    ref = 2.5 * gain.exp() * x[:, 5:] @ w
    assert torch.allclose(ridge_logits(x, 5, y, 0.7, 2.5, gain, primal), ref, rtol=1e-10, atol=1e-12)


def _episode(e: int, n_way: int, n_query: int, d: int) -> Episode:
    g = torch.Generator().manual_seed(1)
    rows = torch.randn(e, n_way * (1 + n_query), d, dtype=torch.float64, generator=g).requires_grad_(True)
    labels = torch.arange(n_way).expand(e, -1)
    return Episode(
        support=rows[:, :n_way],
        query=rows[:, n_way:],
        support_labels=labels,
        query_labels=labels.repeat(1, n_query),
        n_way=n_way,
        n_supp=1,
        n_query=n_query,
    )


@pytest.mark.parametrize(("e", "n_way", "d"), [(1, 6, 8), (1, 12, 8), (3, 5, 8), (2, 10, 4)])  # dual, primal
@pytest.mark.parametrize("params", [{}, {"learn_scale": False}, {"bias": True}])
def test_fused_head_step_equals_the_composite_head(e: int, n_way: int, d: int, params: dict) -> None:
    """The head's fused training path against its composite classifier (the path memory and variants take):
    loss, logits and the gradients of the rows and the head's parameters."""
    head = R2D2Head(lam=0.3, **params).double()
    for p in head.parameters():
        p.data.fill_(0.2)
    ep = _episode(e, n_way, 2, d)
    rows = ep.support._base
    out = head(ep)
    grads = torch.autograd.grad(out.loss, [rows, *head.parameters()])

    s, q = head.norm(ep.support), head.norm(ep.query)
    y = F.one_hot(ep.support_labels, n_way).to(s.dtype)
    logits = head.fit(s, y)(q)
    ref = F.cross_entropy(logits.flatten(0, 1), ep.query_labels.flatten())
    ref_grads = torch.autograd.grad(ref, [rows, *head.parameters()])
    assert torch.allclose(out.loss, ref, rtol=1e-12)
    assert torch.allclose(out.logits, logits, rtol=1e-10, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


def test_a_failed_factorisation_makes_the_logits_nan() -> None:
    """A Gram matrix that is not positive definite in float32 (rank 2 of 8, a penalty below its rounding):
    the Cholesky factorisation fails, and the logits are -inf, so the loss is NaN (for the non-finite guard),
    not the finite values the partial factor gives."""
    x = torch.randn(1, 12, 2, generator=torch.Generator().manual_seed(0))  # 8 support + 4 query rows, width 2
    y = F.one_hot(torch.arange(8) % 4, 4).float()[None]
    lam = 1e-30
    gram = x[:, :8] @ x[:, :8].transpose(1, 2) + lam * torch.eye(8)
    low, info = torch.linalg.cholesky_ex(gram)
    assert info.item() != 0 and torch.cholesky_solve(y, low).isfinite().all()  # what the guard is for
    logits = ridge_logits(x, 8, y, lam, 1.0, None, primal=False)
    assert (logits == -math.inf).all()
    assert F.cross_entropy(logits[0], torch.arange(4)).isnan()
