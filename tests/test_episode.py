"""The view sampler: which view of which image lands where, and its errors."""

import pytest
import torch

from episodic.errors import EpisodicError
from episodic.tasks import ViewSampler


def test_layout_one_episode() -> None:
    b, v = 4, 3
    # encode (view, image) in the value so positions can be read back
    views = torch.tensor([[10 * vi + i for i in range(b)] for vi in range(v)]).float().unsqueeze(-1)
    ep = ViewSampler(n_supp=2, n_query=1)(views)
    assert (ep.n_way, ep.n_supp, ep.n_query, ep.n_episodes) == (4, 2, 1, 1)
    assert ep.support.squeeze(-1).tolist() == [[0, 1, 2, 3, 10, 11, 12, 13]]
    assert ep.query.squeeze(-1).tolist() == [[20, 21, 22, 23]]
    assert ep.support_labels.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3]]
    assert ep.query_labels.tolist() == [[0, 1, 2, 3]]


def test_n_way_splits_batch_into_episodes() -> None:
    views = torch.arange(2 * 6).float().view(2, 6, 1)  # view 0: 0..5, view 1: 6..11
    ep = ViewSampler(1, 1, n_way=3)(views)
    assert ep.n_episodes == 2 and ep.n_way == 3
    assert ep.support.squeeze(-1).tolist() == [[0, 1, 2], [3, 4, 5]]
    assert ep.query.squeeze(-1).tolist() == [[6, 7, 8], [9, 10, 11]]
    assert ep.query_labels.tolist() == [[0, 1, 2], [0, 1, 2]]


def test_images_keep_their_shape() -> None:
    views = torch.randn(3, 8, 1, 5, 5)
    ep = ViewSampler(1, 2, n_way=4)(views)
    assert ep.support.shape == (2, 4, 1, 5, 5) and ep.query.shape == (2, 8, 1, 5, 5)
    assert torch.equal(ep.query[1, 4], views[2, 4])  # episode 1, query view 2 of its image 0 = image 4


@pytest.mark.parametrize(
    "kwargs, words", [(dict(n_supp=0), "n_supp=0"), (dict(n_query=-1), "n_query=-1"), (dict(n_way=1), "n_way=1")]
)
def test_bad_arguments(kwargs: dict, words: str) -> None:
    with pytest.raises(EpisodicError, match=words):
        ViewSampler(**kwargs)


def test_n_way_must_divide_batch() -> None:
    with pytest.raises(EpisodicError, match="n_way=3 does not divide the batch of 8"):
        ViewSampler(1, 1, n_way=3)(torch.randn(2, 8, 4))


def test_view_count_must_match() -> None:
    with pytest.raises(EpisodicError, match="got 3 views"):
        ViewSampler(1, 1)(torch.randn(3, 8, 4))


def test_joined_support_and_query_of_one_episode_are_a_view_of_the_batch() -> None:
    """One episode's support and query views lie back to back in the batch of views, and their embeddings
    in the encoder's output: joining them copies nothing (a view) and still gives ``torch.cat``'s values;
    anything else is ``torch.cat``. The gradient reaches every row either way."""
    from episodic.tasks.episode import joined

    views = torch.randn(2, 5, 3)
    ep = ViewSampler(1, 1)(views)
    flat = joined([ep.support.flatten(0, 1), ep.query.flatten(0, 1)], 0)
    assert flat.data_ptr() == views.data_ptr() and torch.equal(flat, views.flatten(0, 1))

    z = torch.randn(10, 4, requires_grad=True)
    zz = z * 2
    s, q = zz[:5].view(1, 5, 4), zz[5:].view(1, 5, 4)
    both = joined([s, q], 1)
    assert both.data_ptr() == zz.data_ptr() and torch.equal(both, torch.cat([s, q], 1))
    w = torch.randn(1, 10, 4)
    (both * w).sum().backward()
    assert torch.equal(z.grad, 2 * w[0])
    s1, q2 = zz[:4].view(1, 4, 4), zz[4:].view(1, 6, 4)  # more query rows than support rows
    assert joined([s1, q2], 1).data_ptr() == zz.data_ptr()

    two = ViewSampler(1, 1, n_way=5)(torch.randn(2, 10, 3))  # two episodes: per episode, not back to back
    e = zz.view(2, 5, 4)
    for parts, dim in (([e[:, :2], e[:, 2:]], 1), ([zz[5:], zz[:5]], 0), ([two.support, two.query], 1)):
        out = joined(parts, dim)
        assert torch.equal(out, torch.cat(parts, dim)) and out.data_ptr() != zz.data_ptr()


def test_joined_channels_last_views_are_a_view_too() -> None:
    """Views stored channels-last (``[V, B, C, S, S]`` whose images are NHWC, as the trainer's encoder reads
    them): support and query join without a copy, channels-last, with ``torch.cat``'s values. Slices that
    are not back to back, or parts that need a gradient and are not the whole of a contiguous buffer, are
    ``torch.cat``."""
    from episodic.tasks.episode import joined

    views = torch.randn(2, 5, 4, 4, 3).permute(0, 1, 4, 2, 3)  # [2, 5, 3, 4, 4], NHWC images
    ep = ViewSampler(1, 1)(views)
    parts = [ep.support.flatten(0, 1), ep.query.flatten(0, 1)]
    flat = joined(parts, 0)
    assert flat.data_ptr() == views.data_ptr() and flat.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(flat, torch.cat(parts, 0))
    assert joined([parts[1], parts[0]], 0).data_ptr() != views.data_ptr()  # out of order: a copy
    leaf = views.detach().requires_grad_(True)
    grad_parts = [leaf[0], leaf[1]]
    out = joined(grad_parts, 0)
    (out * torch.arange(out.numel()).view(out.shape)).sum().backward()
    assert torch.equal(out, torch.cat(grad_parts, 0))
    assert torch.equal(leaf.grad.flatten(0, 1), torch.arange(out.numel()).view(out.shape).float())


def test_support_keys_follow_the_support_rows_only() -> None:
    """A sampler's momentum-encoder keys stay with the episode until its support rows change."""
    ep = ViewSampler(n_supp=1, n_query=1)(torch.rand(2, 4, 3))
    keyed = ep.replace(support_keys=torch.ones(4, 2))
    assert keyed.replace(query=ep.support).support_keys is not None
    assert keyed.replace(support=ep.query).support_keys is None
    assert keyed.replace(support=ep.query, support_keys=torch.zeros(4, 2)).support_keys is not None
