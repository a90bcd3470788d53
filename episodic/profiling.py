"""What one training step dispatches: operator count and host synchronisations.

:func:`profile_step` runs a function under a dispatch mode that sees every ATen operator the step runs,
forward and backward, after autograd and composite decompositions (so roughly one operator per kernel
launch). It counts:

* **ops**: operators that launch work: every operator except views and allocations, which only make
  metadata (``view``, ``t``, ``expand``, ``empty``, ...); ``dispatched`` counts those too;
* **syncs**: operators whose result the host must wait for on an accelerator: a tensor read as a
  Python number or bool (``_local_scalar_dense``, from ``.item()``, ``float()``, ``int()``, ``bool()``),
  data-dependent shapes (``nonzero``, ``masked_select``, ``unique``...), and ``equal``; plus
  ``Tensor.tolist()`` and ``Tensor.numpy()``, which read memory without dispatching on the CPU (the
  functions are wrapped while the step runs).

On the CPU nothing waits, but every counted sync is one on a GPU: a step that counts zero here does not
stall a GPU on a host read. Code that plans on host tensors by design (random parameters drawn from a CPU
generator, index lists built from them) runs inside :func:`host_side`: its reads of CPU tensors are not
counted (a read of a tensor on another device still is, so a GPU profile checks the claim).
Host-to-device copies are not counted: the step's copies are ``non_blocking``, which never waits for the
device's queue (the host stages pageable memory itself). ``peak_memory``: ``torch.cuda.max_memory_allocated``
on CUDA, else the process's peak resident set (``ru_maxrss``; a high-water mark over the whole process's life).
"""

from __future__ import annotations

import dataclasses
import resource
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = frozenset(
    {
        "_local_scalar_dense",
        "item",
        "is_nonzero",
        "equal",
        "nonzero",
        "nonzero_static",
        "masked_select",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
        "repeat_interleave",
        "_assert_async",
        "allclose",
    }
)
FREE_OPS = frozenset(
    {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh", "alias"}
)


_PLANNING = [0]  # > 0 inside host_side()


@contextmanager
def host_side() -> Iterator[None]:
    """Mark host-side planning on CPU tensors (see the module docstring); free when nothing profiles."""
    _PLANNING[0] += 1
    try:
        yield
    finally:
        _PLANNING[0] -= 1


def _on_host(args: Any) -> bool:
    """Inside :func:`host_side` and every tensor argument on the CPU."""
    if not _PLANNING[0]:
        return False
    flat = args if isinstance(args, (tuple, list)) else (args,)
    return all(t.device.type == "cpu" for t in flat if isinstance(t, torch.Tensor))


@dataclasses.dataclass
class StepProfile:
    """Counts of one call: ``ops`` (launching operators), ``syncs`` (host reads), by name."""

    ops: Counter[str]
    syncs: Counter[str]
    peak_memory: int
    dispatched: int

    @property
    def n_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def n_syncs(self) -> int:
        return sum(self.syncs.values())


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.dispatched = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        self.dispatched += 1
        if name in SYNC_OPS and not _on_host(args):
            self.syncs[name] += 1
        if not (func.is_view or name in FREE_OPS):
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


@contextmanager
def _host_reads(counter: Counter[str]) -> Iterator[None]:
    """Count ``Tensor.tolist`` / ``Tensor.numpy`` calls (host reads the dispatcher does not see on a CPU)."""
    saved = {name: getattr(torch.Tensor, name) for name in ("tolist", "numpy")}

    def wrap(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def counted(self: torch.Tensor, *a: Any, **k: Any) -> Any:
            if not _on_host(self):
                counter[name] += 1
            return fn(self, *a, **k)

        return counted

    try:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, wrap(name, fn))
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def profile_step(fn: Callable[[], Any], device: torch.device | str = "cpu") -> StepProfile:
    """Run ``fn()`` once and count what it dispatched (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    mode = _Count()
    with _host_reads(mode.syncs), mode:
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = int(torch.cuda.max_memory_allocated(device))
    else:
        peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024
    return StepProfile(mode.ops, mode.syncs, peak, mode.dispatched)


def bare_step_fn(trainer: Any, views: torch.Tensor) -> Callable[[], None]:
    """A step of ``trainer``'s encoder alone on ``views [2, B, ...]``: a plain dot-product loss and the same
    optimizer type, in the trainer's memory format; what the trainer's step is measured against (its
    operators and time beyond this are the step's overhead)."""
    import copy

    from episodic.optim import build_optimizer

    encoder = copy.deepcopy(trainer.model.encoder)
    opt = build_optimizer(encoder, **dict(trainer.cfg.optim.optimizer))
    flat = views.flatten(0, 1)
    if trainer.channels_last:  # the trainer's encoder runs NHWC (channels_last=true): the bare step does too
        flat = flat.contiguous(memory_format=torch.channels_last)
    b = views.shape[1]

    def step() -> None:
        z = encoder(flat)
        loss = -(z[:b] * z[b:]).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step
