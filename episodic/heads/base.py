"""The head contract, and the hooks through which variants change a head.

A head turns the support set of an episode into a classifier and scores the queries::

    scores(support [E, Ns, d], support_labels [E, Ns], query [E, Nq, d], n_way) -> logits [E, Nq, n_way]

``forward(episode, memory=None)`` returns a :class:`HeadOutput`: the training loss (cross-entropy
of the query logits over the episode's classes, mixed labels included), the logits it came from
and optional diagnostics. Heads run in float32 (or float64 when given it) whatever the autocast
dtype. A head only overrides ``forward`` when its loss is not a cross-entropy over ``scores``.

``memory [K, d]`` (e.g. MoCo's queue of past support embeddings) adds ``K`` classes that have a
support example but no query; only heads with ``supports_memory = True`` accept it.

What a head declares (class attributes, read by the scope, the pairings and the variants; never
its concrete class):

* ``scoring``: how it scores queries, which decides the variants that apply: ``scores`` (a
  cross-entropy over :meth:`Head.scores`: loss-level variants only), ``kernel`` (:class:`KernelHead`:
  anchors scored against candidate columns by a kernel), ``ridge`` (a closed-form ridge solve) or
  ``qp`` (a quadratic program);
* ``gathers``: what an episode spanning processes gathers for it: ``support`` (its queries stay on
  their process) or ``all`` (every view is an anchor: queries too);
* ``supports_memory``: whether it takes ``memory`` rows (a MoCo queue) as extra classes.

Variants (:mod:`episodic.heads.variants`) attach to a head (``head.variants``) and change one
stage each; every hook is the identity by default:

* ``transform_embeddings(z)``: each encoder pass's embeddings, before the head (t-kernel's batch
  standardisation);
* ``replaces_l2``: the head skips its L2 normalisation (the variant standardised instead);
* kernel heads (:class:`KernelHead`: contrastive, protonet) score anchors against candidate
  columns from a kernel of ``(dot, |a|^2, |c|^2)`` and take a soft-target cross-entropy over
  columns; variants add columns (soft neighbours), transform the geometry (feature transformation),
  replace the kernel (Student-t, ``log_kernel``) or the loss (debiased);
* ridge-type heads call ``augment_support`` / ``transform_queries`` / ``gram`` instead
  (see :mod:`episodic.heads.r2d2`); the loss hook applies to every head, the base ``forward``
  included (so the SVM head can be debiased).
"""

from __future__ import annotations

import math
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, ClassVar, Literal, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from episodic.errors import check
from episodic.profiling import host_side
from episodic.registry import Registry
from episodic.tasks.episode import Episode

if TYPE_CHECKING:
    from episodic.heads.variants.base import Variant

HEADS: Registry[type[Head]] = Registry("head", "episodic.heads")

Scoring = Literal["scores", "kernel", "ridge", "qp"]
T = TypeVar("T")
Gathers = Literal["support", "all"]


@dataclass
class HeadOutput:
    """What a head returns for an episode.

    Attributes:
        loss: scalar training loss.
        logits: ``[E, Nq, n_way]`` query scores (used for accuracy and score histograms).
        extras: named diagnostics for TensorBoard: 0-d tensors are logged as scalars, others as
            histograms (e.g. the debiased clamp rate, feature-transformed scores).
    """

    loss: Tensor
    logits: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)


_CONSTANTS: OrderedDict[tuple[Hashable, ...], tuple[list[weakref.ref[Tensor]], tuple[int, ...], Any]] = OrderedDict()


def label_constant(make: Callable[[], T], key: Hashable, *labels: Tensor) -> T:
    """``make()``, a function of the label tensors ``labels`` (and of ``key``) only, computed once while
    the very same tensors, unmodified, come back. A sampler whose labels depend only on the episode's
    shape hands out the same label tensors every step (the views sampler does), so one-hot targets and
    masks cost no kernel launches after the first step; fresh label tensors are simply recomputed.
    Not used while ``torch.compile`` traces (the compiled graph computes, and fuses, them)."""
    if torch.compiler.is_compiling() or any(t.requires_grad for t in labels):
        return make()  # a tensor in an autograd graph is not a constant
    k = (key, *map(id, labels))
    hit = _CONSTANTS.get(k)
    versions = tuple(t._version for t in labels)
    if hit is not None and hit[1] == versions and all(r() is t for r, t in zip(hit[0], labels)):
        _CONSTANTS.move_to_end(k)
        return hit[2]
    value = make()
    _CONSTANTS[k] = ([weakref.ref(t) for t in labels], versions, value)
    if len(_CONSTANTS) > 64:
        _CONSTANTS.popitem(last=False)
    return value


def one_hot(labels: Tensor, n_way: int, dtype: torch.dtype) -> Tensor:
    """``[E, N]`` integer labels -> ``[E, N, n_way]`` one-hot of ``dtype``. Unlike ``F.one_hot`` it does
    not read the labels' range on the host (a GPU sync); a label outside ``[0, n_way)`` gives a zero row
    (samplers make the labels; tests check their range)."""

    def make() -> Tensor:
        return (labels.unsqueeze(-1) == torch.arange(n_way, device=labels.device)).to(dtype)

    return label_constant(make, ("one_hot", n_way, dtype), labels)


def query_targets(episode: Episode, dtype: torch.dtype) -> Tensor:
    """``[E, Nq, n_way]`` label mass of each query: one-hot, or ``w, 1 - w`` over two labels when mixed."""
    t = one_hot(episode.query_labels, episode.n_way, dtype)
    if episode.mix_weight is not None and episode.query_labels_mix is not None:
        w = episode.mix_weight.to(dtype).unsqueeze(-1)
        t = w * t + (1 - w) * one_hot(episode.query_labels_mix, episode.n_way, dtype)
    return t


def episode_cross_entropy(logits: Tensor, episode: Episode) -> Tensor:
    """Mean cross-entropy of ``logits [E, Nq, n_way]`` against the episode's query labels.

    With ``episode.mix_weight`` set (mixup / CutMix queries), the loss of query ``j`` is
    ``w_j * CE(label_j) + (1 - w_j) * CE(mix_label_j)``.
    """
    logp = logits.log_softmax(-1)
    nll = -logp.gather(-1, episode.query_labels.unsqueeze(-1)).squeeze(-1)
    if episode.mix_weight is not None and episode.query_labels_mix is not None:
        nll_mix = -logp.gather(-1, episode.query_labels_mix.unsqueeze(-1)).squeeze(-1)
        w = episode.mix_weight.to(nll.dtype)
        nll = w * nll + (1 - w) * nll_mix
    return nll.mean()


def soft_cross_entropy(
    logits: Tensor, targets: Tensor, valid: Tensor | None = None, positive: Tensor | None = None
) -> Tensor:
    """``mean_a -sum_c t_ac log softmax_c(l_a)`` over valid columns (``valid [.., A, C]`` bool or None;
    targets are 0 off it). An invalid column gets the dtype's lowest finite value, not ``-inf``: its
    probability is still exactly 0, and ``0 * logp`` stays 0 rather than NaN. ``positive [.., A]``: the
    column holding all of each anchor's target mass, when there is one (then the loss is a plain
    cross-entropy, fewer kernels)."""
    if valid is not None:
        invalid = label_constant(lambda: ~valid, "invalid", valid)
        logits = logits.masked_fill(invalid, torch.finfo(logits.dtype).min)
    if positive is not None:
        return F.cross_entropy(logits.flatten(0, -2), positive.flatten())
    return -(targets * logits.log_softmax(-1)).sum(-1).mean()


def prototypes(x: Tensor, weights: Tensor, min_mass: float = 1.0) -> Tensor:
    """Weighted class means ``[E, K, d]``: ``c_k = sum_i w_ik x_i / max(sum_i w_ik, min_mass)`` for rows
    ``x [E, N, d]`` and label mass ``weights [E, N, K]`` (one-hot: ProtoNet's class means). The
    normalised weights are a label constant when the weights are (one-hot labels)."""

    def make() -> Tensor:
        return weights / weights.sum(1, keepdim=True).clamp_min(min_mass)

    return label_constant(make, ("share", min_mass), weights).transpose(1, 2) @ x


class _UnitRows(torch.autograd.Function):
    """``y = x / max(||x||, eps)`` over the last dimension, as :func:`torch.nn.functional.normalize` computes
    it, with a hand-written backward: ``dx = (g - y (g . y) [||x|| > eps]) / max(||x||, eps)``. Autograd's
    backward of the composite launches about fifteen kernels (the norm's backward alone is ten); this is
    five, and the forward three."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, eps: float) -> Tensor:
        n = torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(eps)
        y = x / n
        ctx.save_for_backward(y, n)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None]:
        y, n = ctx.saved_tensors
        d = y.shape[-1]
        # each row's g . y as one batched product (one kernel, not a product and a sum); below eps the norm
        # is a constant (the clamp): no radial term
        along = torch.bmm(g.reshape(-1, 1, d), y.reshape(-1, d, 1)).view(n.shape) * (n > ctx.eps)
        return torch.addcmul(g, y, along, value=-1) / n, None


def unit_rows(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm (``F.normalize(x, dim=-1)``, fewer kernels forward and backward)."""
    return _UnitRows.apply(x, eps)


def full_precision(x: Tensor) -> Tensor:
    """Half-precision tensors (autocast output) -> float32; float32/float64 pass through."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def pad_columns(x: Tensor, k: int) -> Tensor:
    """Append ``k`` zero columns to the last dimension."""
    return F.pad(x, (0, k)) if k else x


def expand_memory(memory: Tensor, like: Tensor) -> Tensor:
    """``[K, d]`` memory -> ``[E, K, d]`` in ``like``'s dtype/device (a view, no copy when possible)."""
    return memory.to(like.dtype).unsqueeze(0).expand(like.shape[0], -1, -1)


class Head(nn.Module):
    """Base class: subclasses implement :meth:`scores`; the loss is cross-entropy over it."""

    name: ClassVar[str] = ""  # the registry name (``head=...``), set by ``HEADS.register``
    scoring: ClassVar[Scoring] = "scores"
    gathers: ClassVar[Gathers] = "support"
    supports_memory: ClassVar[bool] = False

    def __init__(self) -> None:
        super().__init__()
        self.variants = nn.ModuleDict()

    # ------------------------------------------------------------- variant hooks
    @property
    def active_variants(self) -> list[Variant]:
        """The attached variants, in the order they were attached."""
        return list(self.variants.values())  # type: ignore[arg-type]  # ModuleDict holds Variant modules

    def transform_embeddings(self, z: Tensor) -> Tensor:
        """Embeddings of one encoder pass ``[B, d]`` before the head (pairings call this)."""
        for v in self.active_variants:
            z = v.transform_embeddings(z)
        return z

    @property
    def replaces_l2(self) -> bool:
        return any(v.replaces_l2 for v in self.active_variants)

    def l2(self, x: Tensor) -> Tensor:
        """The head's L2 normalisation, unless a variant standardises embeddings instead."""
        return x if self.replaces_l2 else unit_rows(x)

    def min_logit(self) -> float | None:
        """A lower bound of every logit the head can produce (``None``: unbounded); DCL's floor."""
        return None

    def target_loss(
        self, logits: Tensor, targets: Tensor, valid: Tensor | None = None, positive: Tensor | None = None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Soft-target cross-entropy over columns, or a variant's replacement (debiased); ``positive``
        as for :func:`soft_cross_entropy`."""
        for v in self.active_variants:
            out = v.loss(logits, targets, valid, self.min_logit())
            if out is not None:
                return out
        return soft_cross_entropy(logits, targets, valid, positive), {}

    def check_memory(self, memory: Tensor | None) -> None:
        check(
            memory is None or self.supports_memory,
            f"head={self.name} cannot take a memory queue of extra classes; use method.params."
            "queue_size=0 or a head that can (contrastive, protonet, r2d2)",
        )

    def diagnostics(self) -> dict[str, float]:
        """Numbers about the last forward that the host already holds (no device read), logged with the
        loss every ``train.log_every`` steps; a solver's iterations, say. Empty by default."""
        return {}

    # ------------------------------------------------------------- contract
    def scores(self, support: Tensor, support_labels: Tensor, query: Tensor, n_way: int) -> Tensor:
        raise NotImplementedError

    def forward(self, episode: Episode, memory: Tensor | None = None) -> HeadOutput:
        self.check_memory(memory)
        s, q = full_precision(episode.support), full_precision(episode.query)
        logits = self.scores(s, episode.support_labels, q, episode.n_way)
        if not any(v.replaces_loss for v in self.active_variants):
            return HeadOutput(loss=episode_cross_entropy(logits, episode), logits=logits)
        loss, extras = self.target_loss(logits, query_targets(episode, logits.dtype))
        return HeadOutput(loss=loss, logits=logits, extras=extras)


def thin(x: Tensor, n: int = 4096) -> Tensor:
    """At most about ``n`` evenly strided entries of ``x`` (flattened, detached): a cheap histogram sample."""
    x = x.detach().flatten()
    return x[:: max(1, x.numel() // n)]


class LogitScale(nn.Module):
    """A positive logit multiplier ``init * exp(log_gain)``: learnable ``log_gain`` (starting at 0), or the
    constant ``init``. Written as a gain on ``init`` (not ``exp(log(init))``), the scale is exactly
    ``init`` at the start in every dtype; the gradient is the same as a learnable log-scale's (0-d, so
    no weight decay either way)."""

    def __init__(self, init: float = 1.0, learn: bool = False) -> None:
        super().__init__()
        check(math.isfinite(init) and init > 0, f"head.params.scale={init!r} is not allowed; use a number > 0")
        self.init = float(init)
        self.log_gain = nn.Parameter(torch.zeros(())) if learn else None

    @property
    def value(self) -> float:
        """The current scale (a host read when learnable: for messages and evaluation, not the step)."""
        return self.init if self.log_gain is None else self.init * float(self.log_gain.detach().exp())

    def forward(self, logits: Tensor) -> Tensor:
        return logits * self.init if self.log_gain is None else logits * (self.init * self.log_gain.exp())

    def affine(self, x: Tensor, a: float, b: float) -> Tensor:
        """``scale * (a x + b)``; a constant scale folds into two kernels, whose backward is one."""
        if self.log_gain is None:
            return x.mul(a * self.init).add_(b * self.init)
        return self(x * a + b)


# ================================================================= kernel heads
@dataclass
class Pairs:
    """The anchor x candidate problem of a kernel head (what variants see and change).

    Attributes:
        anchors: ``[E, A, d]`` rows that are classified (after the head's normalisation).
        cands: ``[E, C, d]`` candidate columns (support views or prototypes, then memory rows).
        targets: ``[E, A, C]`` target mass of each anchor on each column (0: a negative).
        valid: ``[E, A, C]`` bool, ``False`` where a column is not a candidate (an anchor itself);
            ``None``: all valid.
        anchor_soft: ``[E, A, n_way]`` label distribution of each anchor.
        support: ``[E, Ns, d]`` the normalised support rows (soft neighbours look theirs up).
        support_labels: ``[E, Ns]``.
        n_way: classes in the episode.
        positive: ``[E, A]`` the column holding all of each anchor's target mass, when every anchor
            has a single positive (``None`` otherwise; dropped when a variant adds columns).
        unit: every anchor and candidate row has unit L2 norm (the head normalised them; one-example
            prototypes); dropped when a variant adds columns.
    """

    anchors: Tensor
    cands: Tensor
    targets: Tensor
    valid: Tensor | None
    anchor_soft: Tensor
    support: Tensor
    support_labels: Tensor
    n_way: int
    positive: Tensor | None = None
    unit: bool = False

    def replace(self, **changes: Any) -> Pairs:
        return replace(self, **changes)

    def valid_mask(self) -> Tensor:
        if self.valid is not None:
            return self.valid
        return torch.ones(self.targets.shape, dtype=torch.bool, device=self.targets.device)


_CONSTANT_TENSORS: dict[Hashable, Tensor] = {}


def constant(make: Callable[[], Tensor], key: Hashable) -> Tensor:
    """``make()``, a tensor determined by ``key`` alone (its shape, values, dtype and device): made once, so
    a step launches no kernel for it; made afresh while ``torch.compile`` traces (the graph holds it)."""
    if torch.compiler.is_compiling():
        return make()
    if key not in _CONSTANT_TENSORS:
        _CONSTANT_TENSORS[key] = make()
    return _CONSTANT_TENSORS[key]


def scalar(value: float, like: Tensor) -> Tensor:
    """A 0-d ``value`` of ``like``'s dtype and device (a :func:`constant`)."""
    return constant(
        lambda: torch.full((), value, dtype=like.dtype, device=like.device), ("scalar", value, like.dtype, like.device)
    )


class Geometry:
    """Dot products and squared norms of anchor/candidate pairs (every kernel is a function of them).

    ``dot [E, A, C]``, ``na`` broadcastable to it (``[E, A, 1]``), ``nc`` (``[E, 1, C]``). Built from
    rows (:meth:`of`), the norms are computed when first read: the plain dot-product kernels never do.
    ``unit``: the rows have unit norm, so both norms are the constant 1. Their gradient would be radial,
    which the normalisation's backward removes: a kernel reads 1 instead and launches nothing for them.
    """

    def __init__(
        self,
        dot: Tensor,
        na: Tensor | None = None,
        nc: Tensor | None = None,
        rows: tuple[Tensor, Tensor] | None = None,
        unit: bool = False,
    ) -> None:
        self.dot, self._na, self._nc, self._rows, self.unit = dot, na, nc, rows, unit
        if unit:
            self._na = self._nc = scalar(1.0, dot)

    @staticmethod
    def of(a: Tensor, c: Tensor, unit: bool = False) -> Geometry:
        return Geometry(a @ c.transpose(-1, -2), rows=(a, c), unit=unit)

    @property
    def na(self) -> Tensor:
        if self._na is None:
            assert self._rows is not None
            self._na = self._rows[0].pow(2).sum(-1, keepdim=True)
        return self._na

    @property
    def nc(self) -> Tensor:
        if self._nc is None:
            assert self._rows is not None
            self._nc = self._rows[1].pow(2).sum(-1).unsqueeze(-2)
        return self._nc

    def sq_dist(self) -> Tensor:
        """``||a - c||^2`` (clamped at 0 against rounding)."""
        return (self.na + self.nc - 2 * self.dot).clamp_min(0)


class KernelHead(Head):
    """A head whose logits are a kernel ``k(dot, |a|^2, |c|^2)`` between anchors and candidates.

    Subclasses implement :meth:`base_kernel` (the head's own logits) and :meth:`energy` (``u >= 0``
    with ``base_kernel = -u + c(anchor)`` on the unit sphere: the Gaussian-kernel reading that the
    Student-t variant generalises), and build :class:`Pairs` in ``forward``.
    """

    scoring: ClassVar[Scoring] = "kernel"
    supports_memory: ClassVar[bool] = True

    def base_kernel(self, geo: Geometry) -> Tensor:
        raise NotImplementedError

    def energy(self, geo: Geometry) -> Tensor:
        raise NotImplementedError

    def max_energy(self) -> float | None:
        """Largest energy on the unit sphere (``None`` if embeddings are not L2-normalised)."""
        return None

    def base_min_logit(self) -> float | None:
        return None

    def _variant_kernel(self, energy: Tensor) -> Tensor | None:
        for v in self.active_variants:
            out = v.log_kernel(energy)
            if out is not None:
                return out
        return None

    def has_variant_kernel(self) -> bool:
        return any(v.replaces_kernel for v in self.active_variants)

    def kernel(self, geo: Geometry) -> Tensor:
        """Logits of every pair: the head's kernel, or a variant's (Student-t) of its energy."""
        out = self._variant_kernel(self.energy(geo)) if self.has_variant_kernel() else None
        return out if out is not None else self.base_kernel(geo)

    def min_logit(self) -> float | None:
        if self.replaces_l2:
            return None
        if self.has_variant_kernel():
            u = self.max_energy()
            if u is None:
                return None
            with host_side():  # a number through the variant's kernel on the CPU, no device tensor read
                low = self._variant_kernel(torch.tensor(u, dtype=torch.float64))
                return None if low is None else float(low)
        return self.base_min_logit()

    def pair_loss(self, pairs: Pairs) -> tuple[Tensor, dict[str, Tensor], Tensor, bool]:
        """Run the variant stages on ``pairs``; return loss, extras, training logits and whether the
        geometry was transformed (then the training logits are not the head's plain scores)."""
        if self.training:
            targets = pairs.targets
            for v in self.active_variants:
                pairs = v.add_columns(pairs)
            if pairs.targets is not targets:  # new columns with target mass: no single positive any more
                pairs = pairs.replace(positive=None, unit=False)
        geo = Geometry.of(pairs.anchors, pairs.cands, pairs.unit)
        transformed = False
        extras: dict[str, Tensor] = {}
        if self.training:
            for v in self.active_variants:
                new = v.transform_geometry(geo, pairs)
                transformed |= new is not geo
                geo = new
        logits = self.kernel(geo)
        loss, more = self.target_loss(logits, pairs.targets, pairs.valid, pairs.positive)
        extras.update(more)
        if transformed:
            with torch.no_grad():
                valid = pairs.valid_mask()
                extras["scores/ft_pos"] = thin(logits[valid & (pairs.targets > 0)])
                extras["scores/ft_neg"] = thin(logits[valid & (pairs.targets == 0)])
        return loss, extras, logits, transformed
