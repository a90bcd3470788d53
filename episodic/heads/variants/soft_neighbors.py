"""``soft_neighbors``: Soft Neighbors are Positive Supporters (SNCLR; Ge et al., ICLR 2023).

The official code (``ChongjianGE/SNCLR``, ``builder_snclr_factor.py`` and
``nn_memory_norm_bank_multi_keep.py``) keeps a FIFO bank of past key embeddings. Each key ``k_i``
brings its top-``K`` bank entries by cosine (read before the batch is written) as extra columns;
an anchor's soft target is 1 on its own key plus, on its own key's neighbours,
``w_ij = softmax_j cos(y_i, NN_ij)`` (parameter-free, temperature 1, not detached); every other
sample's key and neighbours are negatives::

    loss_i = -log p(k_i) - sum_j w_ij log p(NN_ij)         (target mass 2, not renormalised)

Here the keys are the episode's support rows (after the head's normalisation). Support row ``s``
of class ``y`` brings its ``K`` nearest bank rows as columns of class ``y``; anchor ``a`` puts mass
``m_a(y) * w_aj`` on them, with ``m_a`` its label mass and ``w_a`` a softmax of
``cos(a, nb_j) / weight_temperature`` over the neighbour columns of class ``y`` (``K`` of them for
one shot: the official weights). The columns are scored by the head's own kernel:

* contrastive: the exact port (columns = [key, K neighbours] per class);
* protonet: each neighbour is an extra column scored ``-||q - nb||^2 / tau`` (the reference's
  faithful option; the Student-t kernel applies when that variant is on);
* r2d2 (extension): neighbours join the support set with soft targets ``w_ij e_{y_i}``; the
  weights cannot depend on the query, so the support row plays the anchor:
  ``w_i = softmax_j cos(s_i, nb_ij) / weight_temperature``;
* svm: refused (per-sample slack weights would need changes to the QP).

Bank: ``bank_size x d``, initialised with random unit vectors as in the official code, written
with the detached support rows in training mode only, as a ring buffer (the official FIFO drops
the part of a batch that would wrap). It is part of the model's state dict. Other differences:
the soft weights use the anchor as the head sees it (after a MoCo-v3 predictor, if any; the
official uses the projector output before the predictor); there is no exclusion of stale copies
of the same image, so keep ``bank_size`` below the dataset size; the paper's log-of-weighted-sum
form (differs from the released code) is not implemented. ``warmup=true`` gives the neighbours no
target mass until the bank has been filled once (the random initial rows are noise); the official
code has no warm-up. ``k = 0`` is the base head exactly (no columns, no bank writes).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from episodic.errors import check
from episodic.heads.base import Pairs, one_hot
from episodic.heads.variants.base import VARIANTS, Variant
from episodic.models.memory import RingBuffer


@VARIANTS.register("soft_neighbors")
class SoftNeighbors(Variant):
    """Bank neighbours of each support row as extra, softly weighted positives."""

    conflicts = ("feature_transform",)
    applies_to = ("kernel", "ridge")
    refusal = "the QP would need per-sample slack weights; use head=contrastive, protonet or r2d2"

    def __init__(
        self,
        k: int = 5,
        bank_size: int = 4096,
        weight_temperature: float = 1.0,
        detach_weights: bool = False,
        warmup: bool = False,
        dim: int = 128,
    ) -> None:
        super().__init__()
        check(isinstance(k, int) and k >= 0, f"variant.soft_neighbors.k={k!r} is not allowed; use an integer >= 0")
        check(
            isinstance(bank_size, int) and bank_size >= max(k, 1),
            f"variant.soft_neighbors.bank_size={bank_size!r} is not allowed; use an integer >= k and >= 1",
        )
        check(
            weight_temperature > 0,
            f"variant.soft_neighbors.weight_temperature={weight_temperature} is not allowed; use a value > 0",
        )
        check(dim >= 1, f"variant=soft_neighbors needs the embedding width, got dim={dim}")
        self.k, self.size, self.temperature = k, bank_size, float(weight_temperature)
        self.detach_weights, self.warmup = detach_weights, warmup
        self.bank = RingBuffer(F.normalize(torch.randn(bank_size, int(dim)), dim=-1))

    # ------------------------------------------------------------- the bank
    @torch.no_grad()
    def neighbours(self, rows: Tensor) -> Tensor:
        """The ``k`` nearest bank rows (cosine) of every row of ``rows [E, N, d]`` -> ``[E, N, k, d]``."""
        bank = self.bank.rows.to(rows.dtype)
        sim = F.normalize(rows, dim=-1) @ F.normalize(bank, dim=-1).T
        return bank[sim.topk(self.k, dim=-1).indices]

    def active(self) -> float:
        return 0.0 if self.warmup and int(self.bank.written) < self.size else 1.0

    def _w(self, w: Tensor) -> Tensor:
        return (w.detach() if self.detach_weights else w) * self.active()

    # ------------------------------------------------------------- hooks
    def add_columns(self, pairs: Pairs) -> Pairs:
        if self.k == 0:
            return pairs
        nb = self.neighbours(pairs.support).flatten(1, 2)  # [E, J, d], J = Ns * k
        self.bank.push(pairs.support)
        labels = pairs.support_labels.repeat_interleave(self.k, dim=1)  # class of each neighbour column
        oh = one_hot(labels, pairs.n_way, nb.dtype)  # [E, J, n_way]
        cos = F.normalize(pairs.anchors, dim=-1) @ F.normalize(nb, dim=-1).transpose(1, 2) / self.temperature
        e = (cos - cos.amax(-1, keepdim=True).detach()).exp()
        w = e / ((e @ oh) @ oh.transpose(1, 2))  # softmax within each class's neighbour columns
        targets = (pairs.anchor_soft @ oh.transpose(1, 2)) * self._w(w)
        valid = (
            None
            if pairs.valid is None
            else torch.cat([pairs.valid, pairs.valid.new_ones(*pairs.valid.shape[:2], nb.shape[1])], -1)
        )
        return pairs.replace(
            cands=torch.cat([pairs.cands, nb], 1), targets=torch.cat([pairs.targets, targets], -1), valid=valid
        )

    def augment_support(self, support: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        if self.k == 0:
            return support, targets
        nb = self.neighbours(support)  # [E, Ns, k, d]
        self.bank.push(support)
        cos = (F.normalize(support, dim=-1).unsqueeze(2) * F.normalize(nb, dim=-1)).sum(-1) / self.temperature
        w = self._w(cos.softmax(-1))  # [E, Ns, k]
        soft = (w.unsqueeze(-1) * targets.unsqueeze(2)).flatten(1, 2)
        return torch.cat([support, nb.flatten(1, 2)], 1), torch.cat([targets, soft], 1)

    def extra_repr(self) -> str:
        return f"k={self.k}, bank_size={self.size}"
