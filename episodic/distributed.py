"""Distributed plumbing: process-group init from the launcher's environment, rank helpers,
an autograd-aware all-gather, metric reduction, SyncBatchNorm conversion and rank-zero helpers.

Every helper is a no-op in a single process, so the training loop has one code path.

Launchers. ``torchrun`` (single node or multi-node rendezvous) exports ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; :func:`init_from_env` reads them (``env://``).
Under SLURM through Hydra's submitit launcher (``hydra/launcher=submitit_slurm``, one task per GPU)
nothing exports them, so submitit's own ``TorchDistributedEnvironment`` fills them in from the job.
The backend is NCCL when the process owns a GPU and gloo on CPU.

Gather with gradient (:func:`gather_with_grad`). The forward is an ``all_gather``; the backward
*sums* the gradient that every rank computed for the gathered tensor and hands each rank the slice
of its own input. With per-rank losses ``L_r`` and DDP averaging parameter gradients over ``W``
ranks, the objective is ``L = (1/W) sum_r L_r``; an embedding ``z_s`` of rank ``s`` reaches every
``L_r`` through the gathered copy, so its true gradient is ``(1/W) sum_r dL_r/dz_s``: the SUM in
the backward supplies ``sum_r``, DDP the ``1/W``. (A gather whose backward only returns the local
slice, or a raw ``all_reduce`` inside a loss, is silently off by these factors.) On NCCL the
backward is one ``reduce_scatter``; elsewhere (gloo) an ``all_reduce`` of the stacked gradient.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from episodic.errors import EpisodicError

log = logging.getLogger(__name__)
T = TypeVar("T")
M = TypeVar("M", bound=nn.Module)

_OWNED_GROUP = False  # True when init_from_env created the process group (and cleanup may destroy it)


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, ``local_rank`` on its node, its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def enabled() -> bool:
    """True when a process group with more than one rank is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process)."""
    return rank() == 0


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise EpisodicError(f"environment variable {name}={value!r} is not an integer") from None


def _export_submitit_env() -> None:
    """Inside a multi-task SLURM job started by submitit, export torchrun-style variables."""
    if "RANK" in os.environ or os.environ.get("SUBMITIT_EXECUTOR") != "slurm":
        return
    if _env_int("SLURM_NTASKS", 1) <= 1:
        return
    try:
        from submitit.helpers import TorchDistributedEnvironment
    except ImportError:
        raise EpisodicError(
            "a multi-task SLURM job needs submitit to set up torch.distributed; "
            "pip install hydra-submitit-launcher (or launch with torchrun)"
        ) from None
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_from_env(device: torch.device) -> DistInfo:
    """Join the process group described by the environment (torchrun or submitit); idempotent.

    ``device`` is the configured device; under several processes a CUDA device becomes
    ``cuda:LOCAL_RANK``. Returns a single-process :class:`DistInfo` when ``WORLD_SIZE`` is unset or 1.
    """
    global _OWNED_GROUP
    if dist.is_available() and dist.is_initialized():  # already running (tests, or a second Trainer)
        r, w = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", r)
        if device.type == "cuda" and w > 1:
            device = torch.device("cuda", local)
        return DistInfo(r, w, local, device, str(dist.get_backend()))
    _export_submitit_env()
    w = _env_int("WORLD_SIZE", 1)
    if w <= 1:
        return DistInfo(0, 1, 0, device, None)
    r, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if not dist.is_available():
        raise EpisodicError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        n_gpu = torch.cuda.device_count()
        if local >= n_gpu:
            raise EpisodicError(
                f"LOCAL_RANK={local} but this node has {n_gpu} GPU(s); start at most "
                f"{n_gpu} processes per node (torchrun --nproc_per_node={n_gpu})"
            )
        if device.index is not None and device.index != local:
            log.warning(
                "device=%s ignored under %d processes: rank %d uses cuda:%d (its LOCAL_RANK)", device, w, r, local
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        backend = "gloo"
    dist.init_process_group(backend, init_method="env://", rank=r, world_size=w)
    _OWNED_GROUP = True
    return DistInfo(r, w, local, device, backend)


def cleanup() -> None:
    """Destroy the process group if :func:`init_from_env` created it."""
    global _OWNED_GROUP, _CPU_GROUP
    if _OWNED_GROUP and dist.is_initialized():
        dist.destroy_process_group()
    _OWNED_GROUP = False
    _CPU_GROUP = None


def barrier() -> None:
    if enabled():
        dist.barrier()


# --------------------------------------------------------------------------------------- gathers
class _GatherWithGrad(torch.autograd.Function):
    """``[n, ...]`` on every rank -> ``[W, n, ...]``; backward: sum over ranks, own slice back."""

    @staticmethod
    def forward(ctx: Any, x: Tensor) -> Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        return torch.stack(parts)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        if dist.get_backend() == "nccl":
            out = torch.empty_like(grad[0])
            dist.reduce_scatter_tensor(out, grad, op=dist.ReduceOp.SUM)
            return out
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[dist.get_rank()]


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` stacked ``[W, *x.shape]``, differentiable (gradients flow back to the owner).

    Every rank must call it with the same shape (drop-last batches guarantee this). In a single
    process it returns ``x.unsqueeze(0)``.
    """
    if not enabled():
        return x.unsqueeze(0)
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather_no_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` stacked ``[W, *x.shape]`` without autograd (labels, momentum keys, queues)."""
    if not enabled():
        return x.unsqueeze(0)
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    return torch.stack(parts)


# --------------------------------------------------------------------------------------- reductions
@torch.no_grad()
def reduce_mean(values: Tensor) -> Tensor:
    """Element-wise mean over ranks of a float tensor (gloo has no AVG: SUM, then divide)."""
    if not enabled():
        return values
    out = values.detach().float().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def reduce_metrics(metrics: dict[str, Tensor | float], device: torch.device) -> dict[str, float]:
    """Mean of each scalar metric over ranks, in one collective; returns Python floats."""
    keys = list(metrics)
    if not keys:
        return {}
    t = torch.stack(
        [torch.as_tensor(metrics[k], dtype=torch.float32, device=device).detach().reshape(()) for k in keys]
    )
    t = reduce_mean(t).cpu()
    return {k: float(v) for k, v in zip(keys, t)}


@torch.no_grad()
def any_rank(flags: Tensor) -> Tensor:
    """Element-wise logical OR over ranks of a 0/1 tensor (``MAX`` all-reduce)."""
    if not enabled():
        return flags
    out = flags.detach().float().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX)
    return out


_CPU_GROUP: Any = None  # a gloo group for host-side flags when the default backend is NCCL


def _cpu_group() -> Any:
    global _CPU_GROUP
    if dist.get_backend() == "gloo":
        return None  # the default group already runs on the host
    if _CPU_GROUP is None:  # collective: every rank gets here at the same step
        _CPU_GROUP = dist.new_group(backend="gloo")
    return _CPU_GROUP


def any_rank_flag(value: str | None) -> str | None:
    """``value`` if this process has one, else a word for another process's, else ``None``: agreed by
    every process through a host-side all-reduce (no device synchronisation)."""
    if not enabled():
        return value
    flag = torch.tensor([0 if value is None else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_cpu_group())
    if value is None and int(flag) == 0:
        return None
    return value or "a signal to another process"


def all_gather_object(obj: T) -> list[T]:
    """Every rank's picklable ``obj``, in rank order (``[obj]`` in a single process)."""
    if not enabled():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not enabled():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# --------------------------------------------------------------------------------------- models
def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def convert_sync_batchnorm(model: M, mode: bool | str, info: DistInfo) -> tuple[M, bool]:
    """Apply the ``sync_bn`` setting: ``auto`` converts BatchNorm to SyncBatchNorm when several
    CUDA processes train; ``true`` requires that; ``false`` keeps per-process statistics.

    Returns the (possibly converted) model and whether it was converted. Call before the DDP wrap.
    SyncBatchNorm synchronises only in train mode, so evaluation (``model.eval()``) on rank 0 alone
    is safe; a train-mode forward on a subset of ranks would hang.
    """
    if isinstance(mode, str):
        m = mode.lower()
        if m not in ("auto", "true", "false"):
            raise EpisodicError(f"sync_bn={mode!r} is not allowed; use auto, true or false")
        mode = "auto" if m == "auto" else m == "true"
    if mode is False or info.world_size <= 1 or not has_batchnorm(model):
        return model, False
    if info.device.type != "cuda":
        if mode == "auto":
            return model, False
        raise EpisodicError(
            "sync_bn=true needs CUDA: SyncBatchNorm does not run on CPU; use sync_bn=auto "
            "or false (BatchNorm statistics per process)"
        )
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert converted is model  # converted in place (a bare BatchNorm is never the whole model here)
    return model, True


def rank_zero_only(fn: Callable[..., T]) -> Callable[..., T | None]:
    """Decorator: run ``fn`` on rank 0 only; other ranks get ``None``."""

    @functools.wraps(fn)
    def wrapped(*args: Any, **kwargs: Any) -> T | None:
        return fn(*args, **kwargs) if is_main() else None

    return wrapped


def rank_seed(seed: int, rank_: int) -> int:
    """Per-rank seed: ``seed`` on rank 0 (a single process is unchanged), offset by a prime elsewhere."""
    return int(seed) + 1_000_003 * int(rank_)


__all__ = [
    "DistInfo",
    "all_gather_object",
    "any_rank",
    "any_rank_flag",
    "barrier",
    "broadcast_object",
    "cleanup",
    "convert_sync_batchnorm",
    "enabled",
    "gather_no_grad",
    "gather_with_grad",
    "has_batchnorm",
    "init_from_env",
    "is_main",
    "rank",
    "rank_seed",
    "rank_zero_only",
    "reduce_mean",
    "reduce_metrics",
    "world_size",
]
