"""The R2D2 head's training logits as one autograd function with a hand-written backward.

For support rows ``S [n, d]``, query rows ``Q [m, d]`` (one buffer ``X = [S; Q]``), targets ``Y [n, c]``, the
ridge penalty ``lam`` and the logit scale ``s = init * exp(g)`` (``g``: the learnable log-gain, or none)::

    Y_s = s Y
    dual   (n < d):   A = S S^T + lam I_n,   alpha = A^{-1} Y_s,   W = S^T alpha
    primal (d <= n):  A = S^T S + lam I_d,   W = A^{-1} S^T Y_s
    Z = Q W                                  (both forms: W = S^T (S S^T + lam I)^{-1} Y_s)

and, for the incoming gradient ``G = dL/dZ`` (``A`` is symmetric, so one more solve with it gives the
adjoint)::

    dQ = G W^T                dW = Q^T G                dg = sum(G * Z)       (Z is proportional to exp(g))
    dual:    b = A^{-1} S dW,    dS = alpha (dW - S^T b)^T - b W^T,   dY = s b
    primal:  B = A^{-1} dW,      dS = (Y_s - S W) B^T - (S B) W^T,    dY = s S B

Autograd through the same formula launches about twice the operators (every product's two gradient
products, the views ``@`` adds around them, the scale's own chain, the concatenation of the support's and
the queries' gradients); here the scale rides on the targets, the penalty on the Gram product
(``baddbmm``), and the gradients of support and queries are written into one buffer. The head takes this
path for a plain linear ridge (no memory rows, no variant); the composite one
(:func:`episodic.heads.r2d2.ridge_weights`) stays for the rest and for evaluation, and the tests hold the
two to each other and to finite differences. The products run in float32 (or float64) even under
autocast: a ridge solve in half precision loses the penalty's digits.

``A`` is symmetric positive definite (``lam > 0``), so it is factored once, by Cholesky, and both solves
reuse the factor: on a GPU a factorisation is a chain of small kernels, and Cholesky's is about a third of
LU's time (``benchmarks/linalg_solve.py``). A factorisation that fails (``A`` not positive definite in
floating point, or non-finite embeddings) would leave finite garbage in the factor: that episode's logits
are made -inf instead, on the device, so its loss is NaN and the non-finite guard stops (or skips) the step.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from episodic.heads.base import constant, scalar


def ridge_eye(like: Tensor, lam: float) -> Tensor:
    """``lam I`` of ``like``'s size (last dimension), dtype and device (made once)."""
    n = like.shape[-1]
    return constant(
        lambda: lam * torch.eye(n, dtype=like.dtype, device=like.device), ("ridge", n, lam, like.dtype, like.device)
    )


def uses_primal(rows: int, dim: int, solve: str) -> bool:
    """Whether the ridge is solved in the primal (``d x d``) rather than the dual (``n x n``) form."""
    return dim <= rows if solve == "auto" else solve == "primal"


def _scaled(y: Tensor, gain: Tensor | None, init: float) -> Tensor:
    """``init * gain * y`` in one kernel (``gain``: a 0-d tensor, or ``None`` for 1)."""
    return y * init if gain is None else torch.addcmul(scalar(0.0, y), y, gain, value=init)


class _RidgeLogits(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any, x: Tensor, n: int, y: Tensor, log_gain: Tensor | None, init: float, lam: float, primal: bool
    ) -> Tensor:
        with torch.autocast(x.device.type, enabled=False):
            gain = None if log_gain is None else log_gain.to(x.dtype).exp()
            y_s = _scaled(y.to(x.dtype), gain, init)
            s, q = x[:, :n], x[:, n:]
            st = s.transpose(1, 2)
            if primal:
                low, info = torch.linalg.cholesky_ex(torch.baddbmm(ridge_eye(s, lam), st, s))
                w = torch.cholesky_solve(torch.bmm(st, y_s), low)
                coef = y_s  # what the backward needs besides W: Y_s (primal) or alpha (dual)
            else:
                low, info = torch.linalg.cholesky_ex(torch.baddbmm(ridge_eye(st, lam), s, st))
                coef = torch.cholesky_solve(y_s, low)
                w = torch.bmm(st, coef)
            # + 0 where the factorisation succeeded, -inf where it failed (xlogy(0, 0) = 0, xlogy(k, 0) = -inf):
            # the check rides on the logits' product, and the loss of a failed episode is NaN for the guard
            z = torch.baddbmm(torch.xlogy(info, scalar(0.0, x)).view(-1, 1, 1), q, w)
        ctx.save_for_backward(x, low, w, coef, z, gain)
        ctx.n, ctx.init, ctx.primal = n, init, primal
        return z

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:
        x, low, w, coef, z, gain = ctx.saved_tensors
        n = ctx.n
        s, q = x[:, :n], x[:, n:]
        need_x, _, need_y, need_gain = ctx.needs_input_grad[:4]
        dx = dy = dgain = None
        with torch.autocast(x.device.type, enabled=False):
            g = g.to(x.dtype)
            if need_gain:
                dgain = torch.dot(g.reshape(-1), z.reshape(-1))
            wt = w.transpose(1, 2)
            if need_x or need_y:
                dw = torch.bmm(q.transpose(1, 2), g)
                b = torch.cholesky_solve(dw if ctx.primal else torch.bmm(s, dw), low)
                sb = torch.bmm(s, b) if ctx.primal else b  # dL/dY_s
            if need_x:
                dx = torch.empty_like(x)
                torch.bmm(g, wt, out=dx[:, n:])
                if ctx.primal:  # (Y_s - S W) B^T - (S B) W^T; coef is Y_s
                    d = torch.baddbmm(coef, s, w, alpha=-1)
                    torch.baddbmm(torch.bmm(d, b.transpose(1, 2)), sb, wt, alpha=-1, out=dx[:, :n])
                else:  # alpha (dW - S^T b)^T - b W^T; coef is alpha
                    d = torch.baddbmm(dw, s.transpose(1, 2), b, alpha=-1)
                    torch.baddbmm(torch.bmm(coef, d.transpose(1, 2)), b, wt, alpha=-1, out=dx[:, :n])
            if need_y:
                dy = _scaled(sb, gain, ctx.init)
        return dx, None, dy, dgain, None, None, None


def ridge_logits(
    x: Tensor, n: int, targets: Tensor, lam: float, init: float, log_gain: Tensor | None, primal: bool
) -> Tensor:
    """``init * exp(log_gain) * Q W``: the ridge classifier fitted on the first ``n`` rows of ``x [E, n + m, d]``
    (targets ``[E, n, c]``) scoring the other ``m`` (``[E, m, c]``); see the module docstring."""
    return _RidgeLogits.apply(x, n, targets, log_gain, init, lam, primal)
