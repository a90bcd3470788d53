"""Shared test settings: deterministic, single-threaded-friendly, float64 references."""

from collections.abc import Iterator

import pytest
import torch

# A shape-only forward on the meta device (what the config check runs) imports torch modules that bind
# logging handlers to the sys.stderr of the moment; import them now, not inside a test's captured stderr.
torch.nn.Conv2d(1, 1, 3, device="meta")(torch.empty(1, 1, 4, 4, device="meta"))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread for tests of many tiny tensor ops (thread hand-off dominates them); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
