"""Variants against hand-written float64 references: neutral settings, 3-4 example episodes, gradcheck,
refusals, and the score histograms in TensorBoard."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from episodic.cli import validate_overrides
from episodic.errors import EpisodicError
from episodic.heads import HEADS
from episodic.heads.base import Head
from episodic.heads.histograms import score_stats
from episodic.heads.variants import attach_variants
from episodic.methods import METHODS
from episodic.models import build_encoder
from episodic.tasks import ViewSampler
from helpers import TINY, make_cfg, run_cli

HEAD_PARAMS = {
    "contrastive": {"temperature": 0.5},
    "contrastive_asym": {"temperature": 0.5, "symmetric": False},
    "protonet": {"temperature": 0.7},
    "protonet_cos": {"temperature": 0.7, "metric": "cosine"},
    "r2d2": {"lam": 0.7, "learn_scale": False, "scale": 3.0},
    "svm": {"C": 0.1, "learn_scale": False},
}


def head(kind: str, variants: dict | None = None, dim: int = 4) -> Head:
    name = kind.split("_")[0]
    h = HEADS.build(name, **HEAD_PARAMS[kind]).double()
    attach_variants(h, variants or {}, dim=dim)
    return h.double()


def episode(n_supp: int = 1, n_query: int = 1, b: int = 4, d: int = 4, mixed: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ep = ViewSampler(n_supp, n_query)(torch.randn(n_supp + n_query, b, d, generator=g, dtype=torch.float64))
    if mixed:
        ep = ep.replace(
            query_labels_mix=ep.query_labels.roll(1, -1),
            mix_weight=torch.rand(ep.query_labels.shape, generator=g, dtype=torch.float64),
        )
    return ep


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def bn(x: np.ndarray) -> np.ndarray:
    return (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-5)


def ce(logits: np.ndarray, target: int) -> float:
    return float(np.log(np.exp(logits).sum()) - logits[target])


ALL_HEADS = ["contrastive", "contrastive_asym", "protonet", "protonet_cos", "r2d2"]


# ----------------------------------------------------------------- neutral settings = the base head
NEUTRAL = [
    ("debiased", {"tau_plus": 0.0}),
    ("soft_neighbors", {"k": 0}),
    ("feature_transform", {"positive": False, "negative": False}),
    ("feature_transform", {"lambda_pos": 1.0, "lambda_neg": 1.0}),
]


@pytest.mark.parametrize(
    "kind, variant, params", [(k, v, p) for k in ALL_HEADS for v, p in NEUTRAL] + [("svm", *NEUTRAL[0])]
)  # the other variants are refused for svm (test_refusals)
def test_neutral_setting_is_the_base_head(kind: str, variant: str, params: dict) -> None:
    ep = episode(2, 2, b=4, mixed=True)
    base, var = head(kind), head(kind, {variant: params})
    torch.manual_seed(1)
    a = base(ep)
    torch.manual_seed(1)
    b = var(ep)
    assert abs(a.loss.item() - b.loss.item()) < 1e-12
    assert torch.allclose(a.logits, b.logits, atol=1e-12, rtol=0)
    if variant == "soft_neighbors":
        assert int(var.variants[variant].bank.written) == 0  # k = 0 writes nothing


@pytest.mark.parametrize("kind", ["contrastive", "contrastive_asym", "protonet", "protonet_cos"])
def test_t_kernel_limit_is_the_base_head(kind: str) -> None:
    ep = episode(2, 1, b=4, mixed=True)
    base = head(kind)(ep)
    exact = head(kind, {"t_kernel": {"dof": "inf", "standardize": "l2"}})(ep)
    near = head(kind, {"t_kernel": {"dof": 1e7, "standardize": "l2"}})(ep)
    assert abs(exact.loss.item() - base.loss.item()) < 1e-12
    assert abs(near.loss.item() - base.loss.item()) < 1e-5
    shift = exact.logits - base.logits  # the same loss: logits differ by a per-query constant at most
    assert torch.allclose(shift, shift[..., :1].expand_as(shift), atol=1e-12)
    if kind == "protonet":  # -d^2 / tau exactly
        assert torch.allclose(shift, torch.zeros_like(shift), atol=1e-12)


# ----------------------------------------------------------------- debiased (DCL)
def dcl_reference(z: np.ndarray, b: int, t: float, tau_plus: float) -> tuple[float, float]:
    """chingyaoc/DCL main.py on 2B rows (two views), written as a loop."""
    z = unit(z)
    n = 2 * b - 2
    losses, clamped = [], 0
    for i in range(2 * b):
        j = (i + b) % (2 * b)
        pos = math.exp(z[i] @ z[j] / t)
        neg = sum(math.exp(z[i] @ z[k] / t) for k in range(2 * b) if k not in (i, j))
        ng = (neg - tau_plus * n * pos) / (1 - tau_plus)
        floor = n * math.exp(-1 / t)
        clamped += ng < floor
        losses.append(-math.log(pos / (pos + max(ng, floor))))
    return float(np.mean(losses)), clamped / (2 * b)


@pytest.mark.parametrize("tau_plus, close", [(0.1, False), (0.5, False), (0.5, True)])
def test_debiased_matches_the_official_formula(tau_plus: float, close: bool) -> None:
    ep = episode(1, 1, b=2, d=3, seed=3)  # 4 views, N = 2 negatives per anchor
    if close:  # views of an image nearly equal: the corrected negative term falls below the floor
        ep = ep.replace(query=ep.support + 0.05 * ep.query)
    out = head("contrastive", {"debiased": {"tau_plus": tau_plus}})(ep)
    z = torch.cat([ep.support[0], ep.query[0]]).numpy()
    ref, rate = dcl_reference(z, 2, 0.5, tau_plus)
    assert out.loss.item() == pytest.approx(ref, abs=1e-12)
    assert out.extras["dcl/clamped"].item() == pytest.approx(rate)
    assert (rate > 0) == close


def test_debiased_protonet_uses_the_geometric_floor() -> None:
    ep = episode(1, 1, b=3, d=3, seed=5)
    tau, tp = 0.7, 0.6
    out = head("protonet", {"debiased": {"tau_plus": tp}})(ep)
    s, q = unit(ep.support[0].numpy()), unit(ep.query[0].numpy())
    total = 0.0
    for i in range(3):
        lg = np.array([-((q[i] - s[c]) ** 2).sum() / tau for c in range(3)])
        neg = sum(np.exp(lg[c]) for c in range(3) if c != i)
        ng = max((neg - tp * 2 * np.exp(lg[i])) / (1 - tp), 2 * np.exp(-4 / tau))
        total += -np.log(np.exp(lg[i]) / (np.exp(lg[i]) + ng))
    assert out.loss.item() == pytest.approx(total / 3, abs=1e-12)


# ----------------------------------------------------------------- Student-t kernel
def test_t_kernel_is_the_official_t_moco_loss() -> None:
    """Contrastive head, queries vs keys + queue, batch-standardised features: MoCo_tSNE's loss."""
    g = torch.Generator().manual_seed(7)
    q, k, queue = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (4, 4, 3))
    h = head("contrastive_asym", {"t_kernel": {"dof": 5, "standardize": "bn"}})
    ep = ViewSampler(1, 1)(
        torch.stack([h.transform_embeddings(k), h.transform_embeddings(q)])
    )  # each pass standardised on its own
    out = h(ep, memory=queue)
    qn, kn, T, nu = bn(q.numpy()), bn(k.numpy()), 0.5, 5.0
    total = 0.0
    for i in range(4):
        cols = np.concatenate([kn, queue.numpy()])
        kappa = (1 + ((qn[i] - cols) ** 2).sum(1) / (T * nu)) ** (-(nu + 1) / 2)
        total += -np.log(kappa[i] / kappa.sum())
    assert out.loss.item() == pytest.approx(total / 4, abs=1e-10)


def test_t_kernel_student_t_prototypes() -> None:
    ep = episode(2, 1, b=3, d=3, seed=2)
    out = head("protonet", {"t_kernel": {"dof": 3, "standardize": "l2"}})(ep)
    s, q, tau, nu = unit(ep.support[0].numpy()), unit(ep.query[0].numpy()), 0.7, 3.0
    protos = np.stack([s[ep.support_labels[0].numpy() == c].mean(0) for c in range(3)])
    ref = np.array([[-(nu + 1) / 2 * np.log1p(((qi - p) ** 2).sum() / (tau / 2 * nu)) for p in protos] for qi in q])
    assert np.allclose(out.logits[0].detach().numpy(), ref, atol=1e-12)


@pytest.mark.parametrize("dof", [2.0, "inf"])
def test_t_kernel_ridge_is_kernel_ridge(dof: float | str) -> None:
    ep = episode(2, 1, b=3, d=3, seed=4)
    out = head("r2d2", {"t_kernel": {"dof": dof, "standardize": "l2", "bandwidth": 0.8}})(ep)
    s, q = unit(ep.support[0].numpy()), unit(ep.query[0].numpy())
    nu = float(dof)

    def k(a: np.ndarray, c: np.ndarray) -> np.ndarray:
        d2 = ((a[:, None] - c[None]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * 0.8)) if math.isinf(nu) else (1 + d2 / (0.8 * nu)) ** (-(nu + 1) / 2)

    y = np.eye(3)[ep.support_labels[0].numpy()]
    ref = 3.0 * k(q, s) @ np.linalg.solve(k(s, s) + 0.7 * np.eye(6), y)
    assert np.allclose(out.logits[0].detach().numpy(), ref, atol=1e-10)


# ----------------------------------------------------------------- soft neighbours
def set_bank(h: Head, bank: torch.Tensor) -> None:
    v = h.variants["soft_neighbors"]
    v.bank.rows.copy_(bank)
    v.bank.ptr.zero_()
    v.bank.written.zero_()


def test_soft_neighbors_contrastive_hand_value() -> None:
    ep = episode(1, 1, b=3, d=3, seed=11)
    h = head("contrastive_asym", {"soft_neighbors": {"k": 2, "bank_size": 4}}, dim=3)
    bank = F.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(12), dtype=torch.float64), dim=-1)
    set_bank(h, bank)
    out = h(ep)
    s, q, B, tau = unit(ep.support[0].numpy()), unit(ep.query[0].numpy()), bank.numpy(), 0.5
    nbs = [B[np.argsort(-(B @ s[i]))[:2]] for i in range(3)]  # read before the write
    cols = np.concatenate([s] + nbs)  # keys, then 2 neighbours per key
    total = 0.0
    for a in range(3):
        lg = q[a] @ cols.T / tau
        logp = lg - np.log(np.exp(lg).sum())
        w = np.exp(q[a] @ nbs[a].T)
        w /= w.sum()
        total += -logp[a] - (w * logp[3 + 2 * a : 5 + 2 * a]).sum()
    assert out.loss.item() == pytest.approx(total / 3, abs=1e-12)
    v = h.variants["soft_neighbors"]  # ring buffer: the 3 support rows at 0..2, pointer at 3
    assert torch.allclose(v.bank.rows[:3], torch.from_numpy(s)) and torch.equal(v.bank.rows[3], bank[3])
    assert int(v.bank.ptr) == 3 and int(v.bank.written) == 3
    h(ep)  # wraps: rows 3, 0, 1
    assert int(v.bank.ptr) == 2 and torch.allclose(v.bank.rows[3], torch.from_numpy(s[0]))


def test_soft_neighbors_ridge_hand_value_and_warmup() -> None:
    ep = episode(1, 1, b=3, d=3, seed=13)
    h = head("r2d2", {"soft_neighbors": {"k": 2, "bank_size": 5}}, dim=3)
    bank = F.normalize(torch.randn(5, 3, generator=torch.Generator().manual_seed(14), dtype=torch.float64), dim=-1)
    set_bank(h, bank)
    out = h(ep)
    s, q, B = unit(ep.support[0].numpy()), unit(ep.query[0].numpy()), bank.numpy()
    rows, targets = [s], [np.eye(3)]
    for i in range(3):
        nb = B[np.argsort(-(B @ s[i]))[:2]]
        w = np.exp(nb @ s[i])
        rows.append(nb)
        targets.append(np.outer(w / w.sum(), np.eye(3)[i]))
    S, Y = np.concatenate(rows), np.concatenate(targets)
    ref = 3.0 * q @ np.linalg.solve(S.T @ S + 0.7 * np.eye(3), S.T @ Y)  # primal: n = 9 > d = 3
    assert np.allclose(out.logits[0].detach().numpy(), ref, atol=1e-10)
    warm = head("r2d2", {"soft_neighbors": {"k": 2, "bank_size": 5, "warmup": True}}, dim=3)
    set_bank(warm, bank)  # bank not filled yet: neighbours join with zero targets
    Y0 = np.concatenate([np.eye(3), np.zeros((6, 3))])
    ref0 = 3.0 * q @ np.linalg.solve(S.T @ S + 0.7 * np.eye(3), S.T @ Y0)
    assert np.allclose(warm(ep).logits[0].detach().numpy(), ref0, atol=1e-10)


# ----------------------------------------------------------------- feature transformation
def test_feature_transform_moco_hand_value() -> None:
    """Contrastive head, queries vs keys + queue: the official q^, k^, n^ at feature level."""
    g = torch.Generator().manual_seed(21)
    q, k, queue = (torch.randn(n, 3, generator=g, dtype=torch.float64) for n in (3, 3, 2))
    lam, mu, tau = 1.4, 0.3, 0.5
    h = head("contrastive_asym", {"feature_transform": {"lambda_pos": lam, "lambda_neg": mu}})
    ep = ViewSampler(1, 1)(torch.stack([k, q]))
    torch.manual_seed(5)
    out = h(ep, memory=queue)
    torch.manual_seed(5)
    perm = torch.randperm(5).numpy()
    qn, cols = unit(q.numpy()), np.concatenate([unit(k.numpy()), unit(queue.numpy())])
    total = 0.0
    for a in range(3):
        qh = lam * qn[a] + (1 - lam) * cols[a]
        kh = lam * cols[a] + (1 - lam) * qn[a]
        lg = []
        for c in range(5):
            if c == a:
                lg.append(qh @ kh / tau)
            else:
                partner = perm[c] if perm[c] != a else c  # a positive never joins a negative
                lg.append(qh @ (mu * cols[c] + (1 - mu) * cols[partner]) / tau)
        total += ce(np.array(lg), a)
    assert out.loss.item() == pytest.approx(total / 3, abs=1e-12)
    base = head("contrastive_asym")(ep, memory=queue)
    assert torch.allclose(out.logits, base.logits, atol=1e-12)  # accuracy from untransformed scores
    assert {"scores/ft_pos", "scores/ft_neg"} <= set(out.extras) and out.extras["scores/ft_pos"].numel() == 3


def test_feature_transform_protonet_hand_value() -> None:
    ep = episode(2, 1, b=3, d=3, seed=22)
    lam, mu, tau = 1.7, 0.6, 0.7
    h = head("protonet", {"feature_transform": {"lambda_pos": lam, "lambda_neg": mu}})
    torch.manual_seed(9)
    out = h(ep)
    torch.manual_seed(9)
    perm = torch.randperm(3).numpy()
    s, q = unit(ep.support[0].numpy()), unit(ep.query[0].numpy())
    p = np.stack([s[ep.support_labels[0].numpy() == c].mean(0) for c in range(3)])
    total = 0.0
    for a, y in enumerate(ep.query_labels[0].numpy()):
        qh = lam * q[a] + (1 - lam) * p[y]
        lg = []
        for c in range(3):
            if c == y:
                ph = lam * p[y] + (1 - lam) * q[a]
            else:
                ph = mu * p[c] + (1 - mu) * p[perm[c] if perm[c] != y else c]
            lg.append(-((qh - ph) ** 2).sum() / tau)
        total += ce(np.array(lg), y)
    assert out.loss.item() == pytest.approx(total / 3, abs=1e-12)


def test_feature_transform_ridge_extrapolates_queries_only() -> None:
    ep = episode(2, 1, b=3, d=3, seed=23)
    out = head("r2d2", {"feature_transform": {"lambda_pos": 1.5, "lambda_neg": 0.2}})(ep)
    s, q = unit(ep.support[0].numpy()), unit(ep.query[0].numpy())
    y_s, y_q = np.eye(3)[ep.support_labels[0].numpy()], ep.query_labels[0].numpy()
    w = np.linalg.solve(s @ s.T + 0.7 * np.eye(6), y_s)  # dual: n = 6 > d = 3 either way
    p = np.stack([s[ep.support_labels[0].numpy() == c].mean(0) for c in range(3)])
    qh = 1.5 * q + (1 - 1.5) * p[y_q]
    lg = 3.0 * qh @ s.T @ w
    assert out.loss.item() == pytest.approx(np.mean([ce(lg[i], y_q[i]) for i in range(3)]), abs=1e-10)


@pytest.mark.parametrize("kind", ["contrastive_asym", "protonet", "r2d2"])
def test_feature_transform_detached_partner_is_moco_gradient(kind: str) -> None:
    """Same loss either way; with keys that carry no gradient (MoCo) the same query gradient too, while
    with end-to-end keys the detached partner changes the support gradient."""
    ep = episode(1, 1, b=4, d=3, seed=24)
    grads = {}
    for detach in (True, False):
        h = head(kind, {"feature_transform": {"lambda_pos": 1.6, "lambda_neg": 0.5, "detach_partner": detach}})
        for keys_grad in (False, True):
            s = ep.support.clone().requires_grad_(keys_grad)
            q = ep.query.clone().requires_grad_(True)
            torch.manual_seed(3)
            out = h(ep.replace(support=s, query=q))
            out.loss.backward()
            grads[detach, keys_grad] = (out.loss.item(), q.grad.clone(), s.grad)
    assert grads[True, False][0] == pytest.approx(grads[False, False][0], abs=1e-12)
    assert torch.allclose(grads[True, False][1], grads[False, False][1], atol=1e-12)
    assert not torch.allclose(grads[True, True][2], grads[False, True][2], atol=1e-6)


def test_feature_transform_coefficients_follow_the_official_betas() -> None:
    v = head("contrastive", {"feature_transform": {}}).variants["feature_transform"]
    torch.manual_seed(0)
    like = torch.zeros(1)  # the coefficients are drawn on this tensor's device, as 0-d tensors
    lam = np.array([float(v.sample_pos(like)) for _ in range(4000)])
    mu = np.array([float(v.sample_neg(like)) for _ in range(4000)])
    assert lam.min() >= 1 and lam.max() <= 2 and abs(lam.mean() - 1.5) < 0.015
    assert mu.min() >= 0 and mu.max() <= 1 and abs(mu.mean() - 0.5) < 0.015
    # the variance of Beta(a, a) is 1 / (4 (2a + 1))
    assert abs(lam.var() - 1 / 20) < 0.004 and abs(mu.var() - 1 / 16.8) < 0.004


# ----------------------------------------------------------------- gradcheck
VARIANT_PARAMS = {
    "debiased": {"tau_plus": 0.3},
    "t_kernel": {"dof": 3},
    "soft_neighbors": {"k": 2, "bank_size": 6},  # gradcheck needs the fully differentiable FT:
    "feature_transform": {"lambda_pos": 1.3, "lambda_neg": 0.4, "detach_partner": False},
}


@pytest.mark.parametrize("kind", ALL_HEADS)
@pytest.mark.parametrize("variant", list(VARIANT_PARAMS))
def test_gradcheck(variant: str, kind: str) -> None:
    h = head(kind, {variant: VARIANT_PARAMS[variant]})
    ep = episode(1, 2, b=3, d=4, seed=31)
    state = {k: v.clone() for k, v in h.state_dict().items()}
    s = ep.support.clone().requires_grad_(True)
    q = ep.query.clone().requires_grad_(True)

    def loss(s: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        h.load_state_dict(state)  # the soft-neighbour bank is written by every forward
        torch.manual_seed(0)  # the same FT permutation every time
        s, q = h.transform_embeddings(s.flatten(0, 1)).view_as(s), h.transform_embeddings(q.flatten(0, 1)).view_as(q)
        return h(ep.replace(support=s, query=q)).loss

    assert torch.autograd.gradcheck(loss, (s, q))


# ----------------------------------------------------------------- refusals and composition
@pytest.mark.parametrize(
    "kind, variants, message",
    [
        ("svm", {"t_kernel": {}}, "variant=t_kernel does not apply to head=svm: its dual is built on a linear"),
        ("svm", {"soft_neighbors": {}}, "variant=soft_neighbors does not apply to head=svm"),
        ("svm", {"feature_transform": {}}, "variant=feature_transform does not apply to head=svm"),
        (
            "contrastive",
            {"soft_neighbors": {}, "feature_transform": {}},
            "variant=feature_transform cannot be combined with variant=soft_neighbors",
        ),
        (
            "contrastive",
            {"debiased": {"tau_plus": 1.0}},
            "variant.debiased.tau_plus=1.0 is not allowed; use 0 <= tau_plus < 1",
        ),
        ("contrastive", {"t_kernel": {"dof": 0}}, "variant.t_kernel.dof=0 is not allowed; use a number > 0 or inf"),
        ("contrastive", {"t_kernel": {"standardize": "ln"}}, "variant.t_kernel.standardize='ln' is not allowed"),
        ("contrastive", {"soft_neighbors": {"k": -1}}, "variant.soft_neighbors.k=-1 is not allowed"),
        (
            "contrastive",
            {"feature_transform": {"lambda_pos": 0.5}},
            "variant.feature_transform.lambda_pos=0.5 is not allowed",
        ),
        (
            "contrastive",
            {"dcl": {}},
            "unknown variant 'dcl'; allowed: debiased, feature_transform, soft_neighbors, t_kernel",
        ),
    ],
)
def test_refusals(kind: str, variants: dict, message: str) -> None:
    with pytest.raises(EpisodicError) as e:
        head(kind, variants)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_pairing_refusals() -> None:
    enc = build_encoder("conv4", 1, {"width": 8}, {"hidden_dim": 8, "out_dim": 4})
    byol = METHODS.build("byol", encoder=enc)
    with pytest.raises(EpisodicError, match="^variant=debiased acts on negatives, but method=byol has none"):
        attach_variants(HEADS.build("contrastive"), {"debiased": {}}, byol, 4)
    moco = METHODS.build("moco", encoder=enc, queue_size=16)
    with pytest.raises(
        EpisodicError,
        match="^method=moco with queue_size=16 adds that many classes to the head, which head=svm cannot take",
    ):
        moco.validate_head(HEADS.build("svm"))
    with pytest.raises(EpisodicError, match="^variant=t_kernel with head=r2d2 solves an n x n kernel system"):
        attach_variants(HEADS.build("r2d2"), {"t_kernel": {}}, moco, 4)


def test_variant_config_group_composes_lists() -> None:
    cfg = make_cfg("variant=[debiased,t_kernel]", "variant.t_kernel.dof=3")
    assert dict(cfg.variant.debiased) == {"tau_plus": 0.1, "eps": 1e-6} and cfg.variant.t_kernel.dof == 3
    assert dict(make_cfg().variant) == {} and dict(make_cfg("+experiment=dcl", "variant=none").variant) == {}
    validate_overrides("train", ["variant=[debiased, t_kernel]", "head=contrastive"])  # no SystemExit
    with pytest.raises(SystemExit):
        validate_overrides("train", ["variant=[debiased,tkernel]"])


def test_cli_refusal_is_one_line() -> None:
    p = run_cli("episodic.train", "head=svm", "variant=t_kernel", "train.steps=1", "train.progress=false")
    assert p.returncode == 2 and p.stderr.strip().splitlines() == [
        (
            "error: variant=t_kernel does not apply to head=svm: its dual is built on a linear Gram matrix; "
            "use head=contrastive, protonet or r2d2"
        )
    ]


# ----------------------------------------------------------------- score histograms (the FT visualisation)
def test_score_stats_hand_value() -> None:
    logits = torch.tensor([[[2.0, 0.0, -1.0], [1.0, 3.0, 0.0]]])
    pos, neg, m = score_stats(logits, torch.tensor([[0, 2]]))
    assert pos.tolist() == [2.0, 0.0] and neg.tolist() == [[0.0, -1.0], [1.0, 3.0]]
    assert m["scores/pos_mean"] == 1.0 and m["scores/pos_var"] == 1.0
    assert m["scores/neg_mean"] == pytest.approx(0.75) and m["scores/neg_var"] == pytest.approx(0.625)
    assert m["scores/gap"] == pytest.approx(0.25)


def test_histograms_reach_tensorboard(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from episodic.engine import Trainer

    cfg = make_cfg(
        "head=contrastive",
        "variant=[feature_transform]",
        *TINY,
        "train.steps=2",
        "train.hist_every=1",
        "train.ckpt_every=0",
    )
    Trainer(cfg, tmp_path).fit()
    acc = EventAccumulator(str(tmp_path / "tb"), size_guidance={"histograms": 0, "scalars": 0}).Reload()
    hist = set(acc.Tags()["histograms"])
    assert {"scores/pos", "scores/neg", "scores/ft_pos", "scores/ft_neg"} <= hist
    assert {"scores/pos_mean", "scores/neg_var", "scores/gap"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Histograms("scores/pos")] == [1, 2]


def test_debiased_svm_is_dcl_on_the_svm_scores() -> None:
    ep = episode(1, 1, b=3, d=4, seed=41)
    h = head("svm", {"debiased": {"tau_plus": 0.3, "eps": 0.05}})
    out = h(ep)
    lg = h.scores(ep.support, ep.support_labels, ep.query, 3)[0].detach().numpy()
    total = 0.0
    for i in range(3):  # no geometric bound on SVM scores: the floor is N * eps
        neg = sum(np.exp(lg[i, c]) for c in range(3) if c != i)
        ng = max((neg - 0.3 * 2 * np.exp(lg[i, i])) / 0.7, 2 * 0.05)
        total += -np.log(np.exp(lg[i, i]) / (np.exp(lg[i, i]) + ng))
    assert out.loss.item() == pytest.approx(total / 3, abs=1e-8)


def test_t_kernel_standardisation_is_batchnorm_without_affine() -> None:
    h = head("contrastive", {"t_kernel": {}})
    z = torch.randn(7, 5, dtype=torch.float64)
    ref = torch.nn.BatchNorm1d(5, affine=False).double().train()(z)
    assert torch.allclose(h.transform_embeddings(z), ref, atol=1e-12) and h.replaces_l2
    with pytest.raises(EpisodicError, match="needs more than one embedding per encoder pass"):
        h.transform_embeddings(z[:1])
