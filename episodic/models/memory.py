"""A ring buffer of past embeddings: MoCo's queue, SNCLR's neighbour bank, PsCo's support pool.

``rows [size, d]`` starts from the rows it is given (random vectors: the references' choice), and
:meth:`RingBuffer.push` writes a batch first in, first out: the newest ``size`` rows of a batch
larger than the buffer, wrapping around the end. ``ptr`` (the next row written) and ``written`` (rows
written so far) are buffers too, so the whole state travels in the model's state dict and checkpoints.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RingBuffer(nn.Module):
    """First-in-first-out rows; ``rows``, ``ptr`` and ``written`` are buffers (no gradient)."""

    rows: Tensor
    ptr: Tensor
    written: Tensor

    def __init__(self, rows: Tensor) -> None:
        super().__init__()
        self.register_buffer("rows", rows)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("written", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.rows.shape[0]

    @torch.no_grad()
    def push(self, x: Tensor) -> None:
        """Write the rows of ``x [..., d]`` (flattened; the newest ``size`` if there are more)."""
        if not self.size:
            return
        x = x.detach().reshape(-1, self.rows.shape[1]).to(self.rows.dtype)[-self.size :]
        idx = (self.ptr + torch.arange(len(x), device=x.device)) % self.size
        self.rows[idx] = x
        self.ptr.copy_((self.ptr + len(x)) % self.size)
        self.written.add_(len(x))

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.rows.shape[1]}"
