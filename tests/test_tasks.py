"""Task augmentations: exact effect on tiny episodes (images, labels, class count), composition,
seeded randomness, the auxiliary rotation loss inside the model, and config errors."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from episodic.errors import EpisodicError
from episodic.heads.protonet import ProtoNetHead
from episodic.tasks import ViewSampler
from episodic.tasks.augment import Draw, TaskContext, TaskPipeline, build_task_pipeline, cosine_weight, image_views
from episodic.tasks.crop import LargeCrop
from episodic.tasks.invert import Invert
from episodic.tasks.query_mix import QueryMix, box_masks, cyclic_derangement
from episodic.tasks.rotate import Rotate
from episodic.tasks.rotation_loss import RotationLoss
from helpers import TINY, make_cfg

CTX = TaskContext(embed_dim=8)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw(seed: int = 0) -> Draw:
    return Draw(gen(seed), "cpu")


def episode(b: int = 6, ns: int = 2, nq: int = 1, n_way: int | None = 3, c: int = 2, h: int = 5, seed: int = 0):
    views = torch.rand(ns + nq, b, c, h, h, generator=gen(100 + seed))
    return views, ViewSampler(ns, nq, n_way)(views)


def rotation_of(a: torch.Tensor, b: torch.Tensor) -> int | None:
    """k such that b == rot90(a, k), else None."""
    for k in range(4):
        if torch.equal(torch.rot90(a, k, dims=(-2, -1)), b):
            return k
    return None


# ------------------------------------------------------------------ rotate


def test_rotate_replace_turns_all_views_of_an_image_alike() -> None:
    _, ep = episode()
    out = Rotate(CTX, p=1.0)(ep, draw())
    assert out.n_way == 3 and out.support.shape == ep.support.shape and out.query.shape == ep.query.shape
    assert torch.equal(out.support_labels, ep.support_labels) and torch.equal(out.query_labels, ep.query_labels)
    before, after = image_views(ep), image_views(out)  # [E, V, n, ...]
    ks = []
    for e in range(2):
        for i in range(3):
            k = {rotation_of(before[e, v, i], after[e, v, i]) for v in range(3)}
            assert len(k) == 1 and k.pop() in (1, 2, 3)  # one rotation, shared by every view, never 0
            ks.append(rotation_of(before[e, 0, i], after[e, 0, i]))
    assert torch.equal(Rotate(CTX, p=0.0)(ep, draw()).support, ep.support)
    # images are rotated independently: the 6 images do not all get the same k
    assert len(set(ks)) > 1


def test_rotate_probability_and_k_distribution() -> None:
    _, ep = episode(b=600, ns=1, nq=1, n_way=None, c=1, h=3)
    out = Rotate(CTX, p=0.3)(ep, draw(1))
    before, after = image_views(ep)[0, 0], image_views(out)[0, 0]
    ks = torch.tensor([rotation_of(before[i], after[i]) for i in range(600)])
    rotated = (ks > 0).sum().item()
    assert abs(rotated - 180) < 5 * math.sqrt(600 * 0.3 * 0.7)
    counts = torch.bincount(ks[ks > 0], minlength=4)[1:]
    assert counts.min() > rotated / 3 - 5 * math.sqrt(rotated * 2 / 9)


def test_rotate_add_appends_rotated_copies_as_new_classes() -> None:
    _, ep = episode(b=8, ns=1, nq=2, n_way=4)
    out = Rotate(CTX, p=0.5, mode="add")(ep, draw(3))
    assert out.n_way == 6 and out.support.shape[1] == 6 and out.query.shape[1] == 12
    assert out.support_labels.tolist() == [list(range(6))] * 2
    assert out.query_labels.tolist() == [list(range(6)) * 2] * 2
    before, after = image_views(ep), image_views(out)
    assert torch.equal(after[:, :, :4], before)  # the original classes are untouched
    for e in range(2):
        sources = []
        for j in (4, 5):
            found = [(i, rotation_of(before[e, 0, i], after[e, 0, j])) for i in range(4)]
            found = [(i, k) for i, k in found if k in (1, 2, 3)]
            assert len(found) == 1
            i, k = found[0]
            for v in range(3):  # every view of the copy is the same rotation of the source's view
                assert torch.equal(torch.rot90(before[e, v, i], k, dims=(-2, -1)), after[e, v, j])
            sources.append(i)
        assert len(set(sources)) == 2  # two distinct source images
    assert Rotate(CTX, p=0.0, mode="add")(ep, draw()) is ep


def test_rotate_needs_square_views() -> None:
    views = torch.rand(2, 4, 1, 3, 5)
    with pytest.raises(EpisodicError, match=r"need square images, got \(3, 5\)"):
        Rotate(CTX, p=1.0)(ViewSampler(1, 1)(views), draw())


# ------------------------------------------------------------------ invert, crop


def test_invert_in_pixel_and_normalised_space() -> None:
    _, ep = episode()
    out = Invert(CTX, p=1.0)(ep, draw())
    assert torch.allclose(out.support, 1 - ep.support) and torch.allclose(out.query, 1 - ep.query)
    ctx = TaskContext(mean=(0.5, 0.25), std=(0.2, 0.4))
    out = Invert(ctx, p=1.0)(ep, draw())
    m, s = torch.tensor([0.5, 0.25]).view(2, 1, 1), torch.tensor([0.2, 0.4]).view(2, 1, 1)
    assert torch.allclose(out.query * s + m, 1 - (ep.query * s + m), atol=1e-6)
    half = Invert(CTX, p=0.5)(ep, draw(2))
    flipped = [
        torch.allclose(image_views(half)[e, :, i], 1 - image_views(ep)[e, :, i]) for e in range(2) for i in range(3)
    ]
    kept = [torch.equal(image_views(half)[e, :, i], image_views(ep)[e, :, i]) for e in range(2) for i in range(3)]
    assert all(f != k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_crop_zooms_into_the_box_exactly() -> None:
    w = 8
    ramp = torch.arange(w, dtype=torch.float32)
    x = torch.stack([ramp.view(1, w).expand(w, w), ramp.view(w, 1).expand(w, w)])  # channel 0 ~ column, 1 ~ row
    x = x.view(1, 1, 2, w, w).expand(1, 3, 2, w, w)
    params = {"side": torch.tensor([0.5]), "top": torch.tensor([0.25]), "left": torch.tensor([0.5])}
    out = LargeCrop(CTX).transform(x, params)
    # bilinear is exact on a ramp: output pixel j samples input coordinate left*W + side*(j + 0.5) - 0.5
    j = torch.arange(w, dtype=torch.float32)
    cols = (0.5 * w + 0.5 * (j + 0.5) - 0.5).clamp(0, w - 1)
    rows = (0.25 * w + 0.5 * (j + 0.5) - 0.5).clamp(0, w - 1)
    for v in range(3):
        assert torch.allclose(out[0, v, 0], cols.view(1, w).expand(w, w), atol=1e-5)
        assert torch.allclose(out[0, v, 1], rows.view(w, 1).expand(w, w), atol=1e-5)


def test_crop_shares_one_box_per_image() -> None:
    w = 8
    ramp = torch.arange(w, dtype=torch.float32).view(1, w).expand(w, w)
    views = torch.stack([ramp + 10 * i for i in range(4)]).view(1, 4, 1, w, w).expand(3, 4, 1, w, w).contiguous()
    ep = ViewSampler(1, 2)(views)
    out = image_views(LargeCrop(CTX, p=1.0, scale=[0.25, 0.25])(ep, draw()))[0]  # [V, n, 1, w, w]
    for i in range(4):
        assert all(torch.equal(out[0, i], out[v, i]) for v in (1, 2))  # same box on every view
        slope = out[0, i, 0, 0, 5] - out[0, i, 0, 0, 4]
        assert torch.isclose(slope, torch.tensor(0.5))  # side = sqrt(0.25)
    offsets = {round(float(out[0, i, 0, 0, 4] - 10 * i), 4) for i in range(4)}
    assert len(offsets) > 1  # boxes differ between images
    with pytest.raises(EpisodicError, match="task.crop.scale must be"):
        LargeCrop(CTX, scale=[0.5, 0.2])


# ------------------------------------------------------------------ query mix


def test_cyclic_derangement_has_no_fixed_point() -> None:
    order = draw().perm(50, 7)
    pi = cyclic_derangement(order)
    assert (pi != torch.arange(7)).all()
    assert torch.equal(pi.sort(1).values, torch.arange(7).expand(50, 7))  # a permutation
    # one cycle through all 7 classes
    i, seen = torch.zeros(50, dtype=torch.long), []
    for _ in range(7):
        i = pi.gather(1, i.unsqueeze(1)).squeeze(1)
        seen.append(i)
    assert (torch.stack(seen, 1).sort(1).values == torch.arange(7)).all()


def _constant_queries(n_query: int = 2, b: int = 8, n_way: int = 4, h: int = 6):
    """Views whose every pixel of view v of image i is 1 + v * b + i."""
    vals = torch.arange(1 + n_query).view(-1, 1) * b + torch.arange(b).view(1, -1) + 1.0
    views = vals.view(1 + n_query, b, 1, 1, 1).expand(-1, -1, 1, h, h).contiguous()
    return ViewSampler(1, n_query, n_way)(views)


def test_mixup_mixes_with_another_class_of_the_same_view_slot() -> None:
    ep = _constant_queries()
    out = QueryMix(CTX, p=1.0, cutmix_p=0.0, alpha=1.0, keep_clean=False)(ep, draw(4))
    q, qo = ep.query[..., 0, 0, 0], out.query  # [E, Nq] values; out [E, Nq, 1, h, h]
    n = ep.n_way
    assert out.query.shape == ep.query.shape and torch.equal(out.query_labels, ep.query_labels)
    assert (out.query_labels_mix != out.query_labels).all()
    w = out.mix_weight
    assert ((w > 0) & (w < 1)).all()
    for e in range(2):
        for r in range(ep.query.shape[1]):
            partner = (r // n) * n + int(out.query_labels_mix[e, r])  # same view slot, other image
            expect = w[e, r] * q[e, r] + (1 - w[e, r]) * q[e, partner]
            assert torch.allclose(qo[e, r], expect.expand_as(qo[e, r]), atol=1e-5)
        # the partner map is one permutation per episode, shared by both query views
        assert torch.equal(out.query_labels_mix[e, :n], out.query_labels_mix[e, n:])


def test_cutmix_pastes_one_box_and_weights_by_kept_area() -> None:
    ep = _constant_queries(h=10)
    out = QueryMix(CTX, p=1.0, cutmix_p=1.0, keep_clean=False)(ep, draw(5))
    q, n = ep.query[..., 0, 0, 0], ep.n_way
    for e in range(2):
        for r in range(ep.query.shape[1]):
            img = out.query[e, r, 0]
            partner = (r // n) * n + int(out.query_labels_mix[e, r])
            own, other = img == q[e, r], img == q[e, partner]
            assert (own | other).all()  # every pixel comes from one of the two images
            rows, cols = other.any(1).nonzero().squeeze(1), other.any(0).nonzero().squeeze(1)
            if len(rows):  # the pasted region is exactly one axis-aligned box
                box = torch.zeros_like(other)
                box[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1] = True
                assert torch.equal(box, other)
            assert torch.isclose(out.mix_weight[e, r], own.float().mean())


def test_query_mix_keeps_clean_queries_and_probability() -> None:
    ep = _constant_queries()
    out = QueryMix(CTX, p=1.0)(ep, draw(6))
    nq = ep.query.shape[1]
    assert out.query.shape[1] == 2 * nq and torch.equal(out.query[:, :nq], ep.query)
    assert torch.equal(out.query_labels, torch.cat([ep.query_labels, ep.query_labels], 1))
    assert torch.equal(out.query_labels_mix[:, :nq], ep.query_labels) and (out.mix_weight[:, :nq] == 1).all()
    none = QueryMix(CTX, p=0.0, keep_clean=False)(ep, draw(6))
    assert torch.equal(none.query, ep.query) and (none.mix_weight == 1).all()
    _, big = episode(b=400, ns=1, nq=1, n_way=None, c=1, h=4)
    half = QueryMix(CTX, p=0.5, cutmix_p=0.0, keep_clean=False)(big, draw(7))
    mixed = (half.mix_weight < 1).sum().item()
    assert abs(mixed - 200) < 5 * 10
    with pytest.raises(EpisodicError, match="can be applied once"):
        QueryMix(CTX)(out, draw())


def test_box_masks_clip_at_the_border() -> None:
    inside, w = box_masks(torch.tensor([0.75, 0.0]), torch.tensor([0.0, 2.0]), torch.tensor([0.0, 2.0]), 4, 4)
    # lam 0.75: a 2x2 box centred on the corner -> clipped to 1x1; lam 0: the whole image
    assert inside[0, 0].sum() == 1 and inside[0, 0, 0, 0] and torch.isclose(w[0], torch.tensor(15 / 16))
    assert inside[1].all() and w[1] == 0


def test_beta_draws_match_the_distribution() -> None:
    x = draw(8).beta(2.0, 4000).double()
    assert abs(x.mean() - 0.5) < 0.02 and abs(x.var() - 1 / 20) < 0.006  # Beta(a, a): var 1 / (4 (2a + 1))


def test_mixed_loss_uses_both_label_sets() -> None:
    """Episode loss of a mixed episode (ProtoNet head) = mean_j w_j CE(y_j) + (1 - w_j) CE(y'_j)."""
    ep = _constant_queries(n_query=1, b=4, n_way=4)
    ep = ep.replace(support=torch.randn(1, 4, 1, 6, 6, generator=gen(9)))
    out = QueryMix(CTX, p=1.0, cutmix_p=0.5)(ep, draw(9))
    enc = nn.Sequential(nn.Flatten(), nn.Linear(36, 5)).double()
    emb = out.replace(support=out.support.double(), query=out.query.double()).embed(enc)
    head = ProtoNetHead(temperature=0.5, normalize=False)
    res = head(emb)
    logp = res.logits.double().log_softmax(-1)[0]
    y, y2, w = out.query_labels[0], out.query_labels_mix[0], out.mix_weight[0].double()
    manual = -(w * logp[torch.arange(8), y] + (1 - w) * logp[torch.arange(8), y2]).mean()
    assert torch.isclose(res.loss.double(), manual, rtol=1e-6)
    assert (w[4:] < 1).any()  # some queries really carry the second label


# ------------------------------------------------------------------ rotation loss


def test_rotation_loss_batch_and_value() -> None:
    _, ep = episode(b=6, ns=2, nq=2, n_way=3)
    rot = RotationLoss(CTX, weight=0.7, share=0.5)
    batch = rot.aux_batch(ep, draw(10), 0, 10)
    allv = torch.cat([ep.support.flatten(0, 1), ep.query.flatten(0, 1)])  # 24 views
    assert batch.images.shape == (12, 2, 5, 5) and batch.weight == pytest.approx(0.7)
    sources = []
    for img, k in zip(batch.images, batch.targets.tolist()):
        match = [i for i in range(24) if torch.equal(torch.rot90(allv[i], k, dims=(-2, -1)), img)]
        assert match
        sources.append(match[0])
    assert len(set(sources)) == 12  # distinct views
    assert set(batch.targets.tolist()) <= {0, 1, 2, 3}
    enc = nn.Sequential(nn.Flatten(), nn.Linear(50, 8))
    z = F.normalize(enc(batch.images), dim=-1)
    manual = F.cross_entropy(z @ rot.classifier.weight.T + rot.classifier.bias, batch.targets)
    assert torch.isclose(rot.aux_loss(enc, batch), manual)


def test_rotation_weight_decay() -> None:
    assert cosine_weight(0.5, "none", 7, 10) == 0.5
    assert cosine_weight(0.5, "cosine", 0, 10) == pytest.approx(0.5)
    assert cosine_weight(0.5, "cosine", 5, 10) == pytest.approx(0.25)
    assert cosine_weight(0.5, "cosine", 10, 10) == pytest.approx(0.0)


def test_rotation_loss_sees_views_before_task_rotation() -> None:
    _, ep = episode(b=4, ns=1, nq=1, n_way=None)
    pipe = build_task_pipeline(
        {"augment": ["rotate", "rotation_loss"], "rotate": {"p": 1.0}, "rotation_loss": {"share": 1.0}}, CTX
    )
    assert pipe.names == ["rotation_loss", "rotate"]  # auxiliary first whatever the list order
    out, aux = pipe(ep, gen(11))
    allv = torch.cat([ep.support.flatten(0, 1), ep.query.flatten(0, 1)])
    for img, k in zip(aux[0].images, aux[0].targets.tolist()):
        assert any(torch.equal(torch.rot90(v, k, dims=(-2, -1)), img) for v in allv)
    assert not torch.equal(out.support, ep.support)  # the episode itself was task-rotated


# ------------------------------------------------------------------ composition and randomness


@pytest.mark.parametrize("b, ns, nq, n_way", [(6, 1, 1, None), (12, 2, 3, 4), (3, 1, 2, 3), (10, 3, 1, 5)])
def test_all_augmentations_combine_at_any_shape(b: int, ns: int, nq: int, n_way: int | None) -> None:
    cfg = {
        "augment": ["query_mix", "rotation_loss", "crop", "rotate", "invert"],
        "rotate": {"p": 0.5, "mode": "add"},
        "invert": {"p": 0.5},
        "crop": {"p": 0.5},
        "rotation_loss": {"share": 0.5},
    }
    pipe = build_task_pipeline(cfg, CTX)
    assert pipe.names == ["rotation_loss", "crop", "rotate", "invert", "query_mix"]
    _, ep = episode(b=b, ns=ns, nq=nq, n_way=n_way, c=1, h=4)
    out, aux = pipe(ep, gen(12))
    n0 = ep.n_way
    n1 = n0 + round(0.5 * n0)
    assert out.n_way == n1 and out.support.shape[:2] == (ep.n_episodes, n1 * ns)
    assert out.query.shape[:2] == (ep.n_episodes, 2 * n1 * nq)
    assert out.query_labels.max() < n1 and out.query_labels_mix.max() < n1
    assert len(aux) == 1 and len(aux[0].images) == max(1, round(0.5 * b * (ns + nq)))
    again, aux2 = pipe(ep, gen(12))
    assert torch.equal(again.query, out.query) and torch.equal(aux2[0].images, aux[0].images)  # seeded
    other, _ = pipe(ep, gen(13))
    assert not torch.equal(other.query, out.query)
    g = gen(12)
    first, _ = pipe(ep, g)
    second, _ = pipe(ep, g)  # the generator advances: the next step draws anew
    assert not torch.equal(first.query, second.query)


def test_bad_task_configs() -> None:
    with pytest.raises(
        EpisodicError,
        match=r"unknown task augmentation 'rotat' \(did you mean 'rotate'\?\); "
        r"allowed: crop, invert, query_mix, rotate, rotation_loss",
    ):
        build_task_pipeline({"augment": ["rotat"]})
    with pytest.raises(EpisodicError, match=r"task.augment lists \['rotate'\] more than once"):
        build_task_pipeline({"augment": ["rotate", "rotate"]})
    with pytest.raises(EpisodicError, match=r"task.rotate.p must be a probability in \[0, 1\], got 1.5"):
        build_task_pipeline({"augment": ["rotate"], "rotate": {"p": 1.5}})
    with pytest.raises(
        EpisodicError,
        match=r"task.query_mix has unknown parameter\(s\) \['beta'\]; allowed: p, "
        r"cutmix_p, alpha, keep_clean",
    ):
        build_task_pipeline({"augment": ["query_mix"], "query_mix": {"beta": 1}})
    with pytest.raises(EpisodicError, match="task.rotate.mode='both' is not allowed; use replace or add"):
        build_task_pipeline({"augment": ["rotate"], "rotate": {"mode": "both"}})
    with pytest.raises(EpisodicError, match="task.rotation_loss.decay='linear' is not allowed"):
        build_task_pipeline({"augment": ["rotation_loss"], "rotation_loss": {"decay": "linear"}})
    assert isinstance(build_task_pipeline(None), TaskPipeline)


# ------------------------------------------------------------------ inside the trainer


def test_trainer_applies_task_augmentations_and_trains_the_rotation_head(tmp_path: Path) -> None:
    from episodic.engine import Trainer

    cfg = make_cfg(
        *TINY,
        "batch_size=16",
        "head=protonet",
        "task.augment=[rotate,query_mix,rotation_loss]",
        "task.rotation_loss.decay=cosine",
    )
    t = Trainer(cfg, tmp_path)
    clf = t.model.task.augments[0].classifier
    assert clf.weight.shape == (4, 16)  # embed_dim = backbone.projector.out_dim
    in_opt = {id(p) for g in t.optimizer.param_groups for p in g["params"]}
    assert id(clf.weight) in in_opt and id(clf.bias) in in_opt
    assert any(k.startswith("task.") for k in t.model.state_dict())
    w0 = clf.weight.detach().clone()
    stats = t.train_step(t.train_set.images[:16])
    assert torch.isfinite(torch.as_tensor(stats.loss)) and clf.weight.grad is not None
    assert not torch.equal(clf.weight, w0)
    # the same config without the auxiliary loss gives a different loss on the same batch
    plain = Trainer(make_cfg(*TINY, "batch_size=16", "head=protonet", "task.augment=[rotate,query_mix]"), tmp_path)
    assert float(plain.train_step(t.train_set.images[:16]).loss) != pytest.approx(float(stats.loss))


def test_ablation_multirun_override_composes() -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    override = "task.augment=[],[rotate],[query_mix],[rotation_loss],[rotate,query_mix,rotation_loss]"
    (parsed,) = OverridesParser.create().parse_overrides([override])
    choices = list(parsed.sweep_iterator())
    assert choices == [[], ["rotate"], ["query_mix"], ["rotation_loss"], ["rotate", "query_mix", "rotation_loss"]]
    for choice in choices:
        cfg = make_cfg(f"task.augment=[{','.join(choice)}]")
        assert build_task_pipeline(dict(cfg.task), CTX).names == sorted(
            choice, key=["rotation_loss", "rotate", "query_mix"].index
        )
