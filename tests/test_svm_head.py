"""SVM head: the three QP backends against each other, KKT conditions, gradcheck, bad input."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from episodic.errors import EpisodicError
from episodic.heads import HEADS
from episodic.heads.svm import SVMHead
from episodic.solvers import kkt_residual, project_rows
from episodic.solvers.base import simplex_rows
from episodic.solvers.fast import FastSolver
from episodic.tasks import ViewSampler
from helpers import TINY, make_cfg

pytestmark = [
    pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning"),
    pytest.mark.usefixtures("one_thread"),
]  # cvxpylayers


def random_task(
    n_way: int, n_supp: int, d: int, episodes: int = 2, n_query: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Float64 support [E, n_way * n_supp, d], labels [E, n_way * n_supp], query [E, n_way * n_query, d]."""
    support = torch.randn(episodes, n_way * n_supp, d, dtype=torch.float64)
    query = torch.randn(episodes, n_way * n_query, d, dtype=torch.float64)
    labels = torch.arange(n_way).repeat(n_supp).expand(episodes, -1)
    return support, labels, query


def logits_and_grads(
    head: SVMHead, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, n_way: int, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits and the gradients of ``sum(logits * weights)`` w.r.t. support and query."""
    s = support.clone().requires_grad_()
    q = query.clone().requires_grad_()
    logits = head.scores(s, labels, q, n_way)
    (logits * weights).sum().backward()
    return logits.detach(), s.grad, q.grad


def kkt_violation(alpha: torch.Tensor, support: torch.Tensor, onehot: torch.Tensor, C: float) -> float:
    """Largest violation of the KKT conditions, from the multipliers (independent of the solvers)."""
    upper = C * onehot
    grad = support @ (support.transpose(1, 2) @ alpha) + alpha - onehot
    free = alpha < upper - 1e-9
    # stationarity on free entries: grad + nu_i = 0, so nu_i is minus their mean gradient
    nu = -(torch.where(free, grad, 0).sum(-1, keepdim=True) / free.sum(-1, keepdim=True))
    stationarity = torch.where(free, grad + nu, 0).abs().max()
    multiplier = (-(grad + nu)).clamp_max(0).abs().where(~free, 0).max()  # mu = -(grad + nu) >= 0
    feasibility = max((alpha - upper).clamp_min(0).max(), alpha.sum(-1).abs().max())
    return float(max(stationarity, multiplier, feasibility))


@pytest.mark.parametrize("normalize", [True, False], ids=["unit", "raw"])
# (5, 4, 6): 20 support rows of width 6, so the fast solver computes K v as X (X^T v)
@pytest.mark.parametrize("n_way,n_supp,d", [(5, 1, 16), (5, 5, 16), (16, 1, 32), (5, 4, 6)])
def test_backends_agree_on_logits_and_gradients(n_way: int, n_supp: int, d: int, normalize: bool) -> None:
    support, labels, query = random_task(n_way, n_supp, d)
    weights = torch.randn(2, 2 * n_way, n_way, dtype=torch.float64)
    results = {
        backend: logits_and_grads(
            HEADS.build("svm", backend=backend, normalize=normalize), support, labels, query, n_way, weights
        )
        for backend in ("fast", "qpth", "cvxpylayers")
    }
    ref_logits, ref_gs, ref_gq = results["cvxpylayers"]  # exact derivatives (diffcp's dense mode)
    assert ref_logits.abs().max() > 1e-2  # a non-trivial classifier
    # what the solvers' tolerances allow: fast to 1e-7 KKT residual, qpth's interior point a little looser
    for backend, rel in (("fast", 2e-5), ("qpth", 1e-3)):
        logits, gs, gq = results[backend]
        assert (logits - ref_logits).abs().max() <= 1e-5, backend
        assert (gs - ref_gs).norm() <= rel * ref_gs.norm(), backend
        assert (gq - ref_gq).norm() <= rel * ref_gq.norm(), backend
    # the training path: float32 embeddings through the fast backend
    logits32 = HEADS.build("svm", normalize=normalize).scores(support.float(), labels, query.float(), n_way)
    assert logits32.dtype == torch.float32
    assert (logits32.double() - ref_logits).abs().max() <= 1e-4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("normalize", [True, False], ids=["unit", "raw"])
def test_fast_backward_of_a_loss_flat_along_the_row_sums_is_zero_not_an_error(
    normalize: bool, dtype: torch.dtype
) -> None:
    # every row of alpha sums to 0, so the logits sum to 0 over classes: logits.sum() is identically 0,
    # and its gradient (projected on the free set) is rounding noise, which CG cannot reduce 1e10-fold
    torch.manual_seed(0)
    for n_way, n_supp, d in [(16, 1, 32), (5, 2, 8), (3, 2, 4)] * 3:
        support, labels, query = random_task(n_way, n_supp, d)
        s, q = support.to(dtype).requires_grad_(), query.to(dtype).requires_grad_()
        HEADS.build("svm", normalize=normalize).scores(s, labels, q, n_way).sum().backward()
        assert s.grad is not None and q.grad is not None
        assert s.grad.abs().max() < 1e-4 and q.grad.abs().max() < 1e-4


def test_gradcheck_fast_backend() -> None:
    support, labels, _ = random_task(3, 2, 4, episodes=2)
    solver = FastSolver(C=0.1, tol=1e-13, warm_start=False)
    support.requires_grad_()
    assert torch.autograd.gradcheck(lambda x: solver(x, labels, 3), (support,), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_gradcheck_head_through_queries_and_scale() -> None:
    support, labels, query = random_task(3, 1, 4, episodes=1, n_query=1)
    head = SVMHead(C=0.5, tol=1e-13, warm_start=False, normalize=True).double()
    support.requires_grad_()
    query.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s, q: head.scores(s, labels, q, 3), (support, query), eps=1e-6, atol=1e-6, rtol=1e-4
    )


@pytest.mark.parametrize("collapsed", [False, True])
def test_fast_satisfies_kkt_at_64_way(collapsed: bool) -> None:
    support, labels, _ = random_task(64, 1, 32, episodes=2)
    shared = torch.randn(1, 1, 32, dtype=torch.float64)  # a common direction: K ~ 11^T, L ~ n
    support = F.normalize(support + (5.0 if collapsed else 0.0) * shared, dim=-1)
    onehot = F.one_hot(labels, 64).double()
    solver = FastSolver(C=0.1, tol=1e-10)
    alpha = solver(support, labels, 64)
    assert kkt_violation(alpha, support, onehot, 0.1) < 1e-8
    assert float(kkt_residual(alpha, support, onehot, 0.1).max()) <= 1e-10
    # the positives sit at the cap and a few hard negatives carry the rest: not a trivial solution
    assert 0 < (alpha < -1e-9).sum(-1).float().mean() < 63


def test_warm_start_is_faster_and_gives_the_same_solution() -> None:
    support, labels, _ = random_task(32, 1, 16, episodes=1)
    support = F.normalize(support, dim=-1)
    nearby = F.normalize(support + 0.01 * torch.randn_like(support), dim=-1)
    warm = FastSolver(tol=1e-9)
    cold = FastSolver(tol=1e-9, warm_start=False)
    warm(support, labels, 32)
    a_warm = warm(nearby, labels, 32)
    a_cold = cold(nearby, labels, 32)
    assert warm.last_iters < cold.last_iters
    assert (a_warm - a_cold).abs().max() < 1e-7


def test_projection_matches_bisection_and_is_the_nearest_feasible_point() -> None:
    v = torch.randn(50, 7, dtype=torch.float64) * torch.logspace(-3, 1, 50, dtype=torch.float64)[:, None]
    labels = torch.randint(0, 7, (50,))
    C = 0.3
    upper = C * F.one_hot(labels, 7).double()
    got = project_rows(v, upper, C)
    # reference: the root theta of sum(max(w - theta, 0)) = C by bisection (w = upper - v)
    w = upper - v
    lo, hi = w.min(-1, keepdim=True).values - C, w.max(-1, keepdim=True).values
    for _ in range(200):
        mid = (lo + hi) / 2
        over = (w - mid).clamp_min(0).sum(-1, keepdim=True) > C
        lo, hi = torch.where(over, mid, lo), torch.where(over, hi, mid)
    expected = upper - (w - (lo + hi) / 2).clamp_min(0)
    assert torch.allclose(got, expected, atol=1e-12)
    assert (got <= upper + 1e-15).all() and got.sum(-1).abs().max() < 1e-12
    # the projection is the nearest feasible point: <v - p, q - p> <= 0 for every feasible q
    beta = torch.distributions.Dirichlet(torch.ones(7, dtype=torch.float64)).sample((200, 50)) * C
    q = upper - beta  # [200, 50, 7] feasible points
    assert ((v - got) * (q - got)).sum(-1).max() < 1e-12


def test_projection_of_the_largest_entries_is_exact_below_its_width_and_flags_longer_supports() -> None:
    w = torch.randn(200, 12, dtype=torch.float64) * torch.logspace(-2, 1, 200, dtype=torch.float64)[:, None]
    C = 0.5
    full, _ = simplex_rows(w, C)
    support = (full > 0).sum(-1)
    assert support.min() == 1 and support.max() > 4  # short and long supports
    top, margin = simplex_rows(w, C, width=4)
    assert margin.shape == (200, 4)
    flagged = margin[:, -1] > 0
    assert torch.equal(flagged, support >= 4)  # the last sorted entry is in the support exactly then
    assert torch.allclose(top[~flagged], full[~flagged], atol=1e-14)
    assert not torch.allclose(top[flagged], full[flagged])  # too narrow: the flag is needed


def test_backward_system_condition_bound_holds() -> None:
    """The backward's CG runs a number of iterations fixed by a bound on its system's largest eigenvalue,
    ``1 + max_c ||K[F_c, F_c]||_F``: checked against the system's eigenvalues, built densely."""
    for collapse in (0.0, 1.0, 4.0):
        support, labels, _ = random_task(6, 3, 5, episodes=1)
        support = F.normalize(support + collapse * torch.randn(1, 1, 5, dtype=torch.float64), dim=-1)
        solver = FastSolver(C=0.1, warm_start=False)
        alpha = solver(support, labels, 6)[0]
        x, size = support[0], alpha.numel()  # 18 rows x 6 classes
        free = (alpha < 0.1 * F.one_hot(labels[0], 6).double()).flatten()  # (i, c) row-major, as alpha.flatten()
        # the Hessian kron(K, I_k) + I on the free entries, and the row sums' constraint removed
        hessian = torch.kron(x @ x.T, torch.eye(6, dtype=torch.float64)) + torch.eye(size, dtype=torch.float64)
        rows = torch.arange(size) // 6
        same_row = (rows[:, None] == rows[None, :]) & free[:, None] & free[None, :]
        proj = torch.diag(free.double()) - same_row.double() / same_row.sum(1, keepdim=True).clamp_min(1)
        top = torch.linalg.eigvalsh(proj @ hessian @ proj).max()
        big_l = torch.linalg.eigvalsh(x @ x.T).max() + 1
        assert 1 < top <= solver.condition <= big_l * (1 + 1e-4), (collapse, top, solver.condition, big_l)
    assert solver.condition < 0.9 * big_l  # collapsed embeddings: the free set's bound is below L


@pytest.mark.parametrize("spread", [0.0, 1.0, 3.0])
def test_restart_tested_with_the_stopping_test_costs_fewer_operators(spread: float) -> None:
    """FISTA's restart test runs every 8th iteration (``restart_every``), with the stopping test: on unit-norm
    embeddings (the head's default) it needs exactly the iterations the test at every iteration does; on raw
    ones a few more at most, yet fewer operators; the same solution either way."""
    from episodic.profiling import profile_step

    support, labels, _ = random_task(64, 1, 32, episodes=3)
    support = support + spread * torch.randn(3, 1, 32, dtype=torch.float64)
    onehot = F.one_hot(labels, 64).double()
    for x in (F.normalize(support, dim=-1), support):
        solvers = [FastSolver(warm_start=False, max_iter=4000), FastSolver(warm_start=False, max_iter=4000)]
        solvers[0].restart_every = 1
        every, eighth = (s.solve_numeric(x, onehot) for s in solvers)
        assert (every - eighth).abs().max() < 4 * 64**0.5 * solvers[0].tol  # each within 2 sqrt(n) tol of alpha*
        iters = [s.last_iters for s in solvers]
        if x is not support:
            assert iters[1] == iters[0], (spread, iters)
            continue
        assert iters[1] <= 1.25 * iters[0], (spread, iters)
        ops = [profile_step(lambda s=s, x=x: s.solve_numeric(x, onehot)).n_ops for s in solvers]  # budgets now set
        assert ops[1] < 0.9 * ops[0], (spread, iters, ops)


def test_solver_launches_few_operators_per_iteration() -> None:
    """What a GPU pays for: each FISTA iteration is one fused gradient step, the projection and the momentum
    (9 operators; the stopping test and the restart test every 8th); each CG iteration about 15."""
    from episodic.profiling import profile_step

    support, labels, query = random_task(64, 1, 32, episodes=1)
    support = support + 3.0 * torch.randn(1, 1, 32, dtype=torch.float64)  # collapsed: about 100 iterations
    head = SVMHead(warm_start=False).double()

    def step() -> None:
        s = support.clone().requires_grad_()
        head.scores(s, labels, query, 64).logsumexp(-1).sum().backward()

    step()
    prof = profile_step(step)
    solver = head.solver
    assert solver.ran >= 60 and solver.cg_iters >= 60 and prof.n_syncs == 1
    assert prof.n_ops <= 11 * solver.ran + 15 * solver.cg_iters + 500, (prof.n_ops, solver.ran, solver.cg_iters)


def test_training_logs_the_solvers_iterations(tmp_path: Path) -> None:
    """Every ``train.log_every`` steps, history.jsonl and TensorBoard get the last step's solver figures."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from episodic.engine import Trainer

    trainer = Trainer(make_cfg(*TINY, "head=svm", "train.steps=4", "train.log_every=2"), tmp_path)
    trainer.fit()
    solver = trainer.model.head.solver
    last = json.loads((tmp_path / "history.jsonl").read_text().splitlines()[-1])
    assert last["step"] == 4 and last["solver_iters"] == solver.last_iters > 0
    assert last["solver_ran"] >= last["solver_iters"] and last["solver_reads"] >= 1
    # the backward ran the CG iterations CG's bound gives for the logged condition number
    bound = int(0.5 * math.sqrt(last["solver_condition"]) * math.log(2 / solver.cg_tol)) + 10
    assert last["solver_condition"] >= 1 and last["solver_cg_iters"] == min(solver.cg_max_iter, bound)
    tb = EventAccumulator(str(tmp_path / "tb"), size_guidance={"scalars": 0}).Reload()
    assert [e.step for e in tb.Scalars("train/solver_iters")] == [2, 4]
    assert tb.Scalars("train/solver_cg_iters")[-1].value == last["solver_cg_iters"]


def test_config_builds_the_head_and_forward_trains_the_scale() -> None:
    cfg = make_cfg("head=svm").head
    head = HEADS.build(cfg.name, **cfg.params)
    assert isinstance(head, SVMHead) and head.solver.C == 0.1 and head.backend == "fast"
    z = torch.randn(2, 8, 16)  # 2 views (support, query) of 8 images
    out = head(ViewSampler(1, 1, 4)(z))
    assert out.logits.shape == (2, 4, 4) and torch.isfinite(out.loss)
    out.loss.backward()
    assert head.scale.log_gain.grad is not None and head.scale.log_gain.grad != 0


@pytest.mark.parametrize("C", [0.0, -1.0, float("nan")])
def test_bad_C_is_rejected(C: float) -> None:
    with pytest.raises(EpisodicError, match=r"head.params.C=.* is not allowed.*> 0"):
        SVMHead(C=C)


def test_unknown_backend_lists_the_allowed_ones() -> None:
    allowed = "unknown QP backend 'qptj'.*did you mean 'qpth'.*cvxpylayers, fast, qpth"
    with pytest.raises(EpisodicError, match=allowed):
        SVMHead(backend="qptj")


@pytest.mark.parametrize("backend,module", [("qpth", "qpth"), ("cvxpylayers", "cvxpylayers")])
def test_missing_backend_package_says_how_to_fix(monkeypatch: pytest.MonkeyPatch, backend: str, module: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # makes `import module` raise ImportError
    message = f"backend={backend} needs .*'{module}'.*pip install {module}.*backend=fast"
    with pytest.raises(EpisodicError, match=message):
        SVMHead(backend=backend)


@pytest.mark.parametrize("backend", ["fast", "qpth"])
def test_non_convergence_names_size_backend_and_fix(backend: str) -> None:
    support, labels, query = random_task(16, 1, 8)
    head = SVMHead(backend=backend, max_iter=2)
    message = rf"did not converge on 2 episodes of 16-way x 1-shot .*backend={backend}.*max_iter \(now 2\)"
    with pytest.raises(EpisodicError, match=message):
        head.scores(support, labels, query, 16)


def test_nan_embeddings_give_nan_logits_for_the_guard() -> None:
    """A diverged run's NaN embeddings are not a solver error: the logits are NaN, so the non-finite
    guard reports the step and the head (tests/test_faults.py)."""
    support, labels, query = random_task(5, 1, 8)
    support[0, 3, 2] = float("nan")
    logits = SVMHead().scores(support, labels, query, 5)
    assert torch.isnan(logits).all()


def test_importing_the_backends_does_not_import_qpth_or_cvxpy() -> None:
    import subprocess

    code = (
        "import sys, episodic.heads.svm, episodic.solvers as s; s.SOLVERS.names(); "
        "print(any(m in sys.modules for m in ('qpth', 'cvxpy', 'cvxpylayers')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
