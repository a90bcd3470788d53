"""``t_kernel``: Student-t similarity (t-SimCLR / t-MoCo-v2; Hu et al., ICLR 2023).

The official code (``Capricious-Liu/t-MoCo-v2``, ``MoCo_tSNE``) does not L2-normalise: one shared
``BatchNorm1d(affine=False)`` standardises the query batch and the key batch (each pass on its
own), and the exponential kernel becomes a Student-t kernel of the squared distance with ``nu``
degrees of freedom and distance scale ``T``::

    kappa(d^2) = (1 + d^2 / (T nu))^(-(nu + 1) / 2),   p = kappa(q, k+) / sum_{k in {k+} u queue} kappa(q, k)

Here every kernel head scores through its *energy* ``u`` (its logit is ``-u`` up to a per-anchor
constant), and the variant replaces the logit by the log-kernel, computed stably::

    logit = -((nu + 1) / 2) * log1p(2 u / nu)          (-> -u as nu -> infinity)

* contrastive: ``u = d^2 / (2 tau)`` -- the official kernel with ``T = tau`` (t-SimCLR; with
  ``method=moco`` and ``head.params.symmetric=false``, t-MoCo-v2);
* protonet: ``u = d^2 / tau`` -- "Student-t prototypes", ``T = tau / 2``; prototypes are means of
  the standardised embeddings;
* r2d2 (an extension, not the paper's): kernel ridge with the Student-t Gram matrix
  ``K(x, x') = (1 + ||x - x'||^2 / (bandwidth nu))^(-(nu + 1) / 2)`` (a generalised inverse
  multiquadric kernel, positive definite for every ``nu > 0``) in dual form,
  ``logits = K(Q, S) (K(S, S) + lam I)^{-1} Y``. Its ``nu -> infinity`` limit is Gaussian-kernel
  ridge, not the linear base head: no setting of this variant recovers linear ridge. The dual is
  an ``n x n`` solve, so a MoCo queue (``n`` = queue size) is refused. ``bandwidth`` should be of the order
  of the squared distances: with ``standardize=bn`` about twice the embedding width (at the default 1 the
  Gram matrix is nearly the identity and Omniglot accuracy drops 18 points; docs/benchmarks.md);
* svm: refused (the QP head's dual is built on a linear Gram matrix).

``standardize``: ``bn`` (official) standardises each encoder pass's batch (no affine, batch
statistics only: the official BN's running statistics are never used for features) and the head
skips its L2 normalisation; ``l2`` keeps the head's L2 normalisation, so ``nu -> infinity`` gives
the base head's loss exactly (on the unit sphere the limit logits differ from the base ones by a
per-anchor constant only). With ``bn`` the limit is SNE's Gaussian kernel on standardised features.

Defaults: ``dof = 5``: the argparse default, and what the released script runs (it passes no
``--t_df``; its file name says ``tdf10``). ``T`` is the head's temperature (the script uses
``--moco-t 0.2``; here it scales distances, it is not a softmax temperature). Not implemented: the
``pena`` penalty on ``||q||`` (its weight is 0 in the released script).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from episodic.errors import check
from episodic.heads.base import Head, full_precision
from episodic.heads.variants.base import VARIANTS, Pairing, Variant


def student_t_log_kernel(energy: Tensor, dof: float) -> Tensor:
    """``-((nu + 1) / 2) log1p(2 u / nu)``; ``-u`` for ``nu = inf``."""
    if math.isinf(dof):
        return -energy
    return -(dof + 1) / 2 * torch.log1p(2 * energy / dof)


@VARIANTS.register("t_kernel")
class StudentTKernel(Variant):
    """Student-t kernel of squared distances in place of the exponential kernel."""

    replaces_kernel = True
    applies_to = ("kernel", "ridge")
    refusal = "its dual is built on a linear Gram matrix; use head=contrastive, protonet or r2d2"

    def __init__(
        self,
        dof: float | str = 5,
        standardize: str = "bn",
        bandwidth: float = 1.0,
    ) -> None:
        super().__init__()
        try:
            nu = float(dof)
        except (TypeError, ValueError):
            nu = float("nan")
        check(nu > 0, f"variant.t_kernel.dof={dof!r} is not allowed; use a number > 0 or inf")
        check(standardize in ("bn", "l2"), f"variant.t_kernel.standardize={standardize!r} is not allowed; use bn or l2")
        check(bandwidth > 0, f"variant.t_kernel.bandwidth={bandwidth} is not allowed; use a value > 0")
        self.dof, self.standardize, self.bandwidth = nu, standardize, float(bandwidth)
        self.replaces_l2 = standardize == "bn"

    def validate(self, head: Head, method: Pairing | None = None) -> None:
        super().validate(head, method)
        if head.scoring == "ridge" and method is not None:
            check(
                not method.queue_size,
                f"variant=t_kernel with head={head.name} solves an n x n kernel system; method={method.name}'s "
                "queue makes n the queue size; set method.params.queue_size=0 or use head=contrastive/protonet",
            )

    def transform_embeddings(self, z: Tensor) -> Tensor:
        if self.standardize != "bn":
            return z
        check(z.shape[0] > 1, "variant.t_kernel.standardize=bn needs more than one embedding per encoder pass")
        z = full_precision(z)  # BatchNorm1d(affine=False) in training mode: biased batch variance, eps 1e-5
        return (z - z.mean(0)) / (z.var(0, unbiased=False) + 1e-5).sqrt()

    def log_kernel(self, energy: Tensor) -> Tensor:
        return student_t_log_kernel(energy, self.dof)

    def gram(self, a: Tensor, c: Tensor) -> Tensor:
        d2 = a.pow(2).sum(-1, keepdim=True) + c.pow(2).sum(-1).unsqueeze(-2) - 2 * a @ c.transpose(-1, -2)
        return student_t_log_kernel(d2.clamp_min(0) / (2 * self.bandwidth), self.dof).exp()

    def extra_repr(self) -> str:
        return f"dof={self.dof}, standardize={self.standardize}"
