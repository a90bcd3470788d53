"""Where and in which number formats the model runs: the device, autocast precision, memory format."""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch
from torch import Tensor, nn

from episodic.errors import EpisodicError, check

log = logging.getLogger(__name__)

PRECISIONS: dict[str, torch.dtype | None] = {"32": None, "fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    """``auto`` (CUDA when available), ``cpu``, ``cuda`` or ``cuda:N``; an unavailable one is one line."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise EpisodicError(f"device={name!r} is not available on this machine; use device=cpu or device=auto")
    return torch.device(name)


def keep_freed_memory() -> bool:
    """Ask glibc's allocator to keep freed memory in the process (``M_MMAP_MAX = 0``: no ``mmap`` per large
    block; ``M_TRIM_THRESHOLD`` at its maximum: no return to the system). By default every buffer above
    a threshold is mapped fresh and unmapped when freed, so each step page-faults (and zeroes) every
    activation and gradient again: on the CPU that is a large share of a step. The process's resident
    memory then stays at its peak, as a GPU's caching allocator does. ``False`` where the C library is
    not glibc (nothing changes)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, 2**31 - 1))


def resolve_precision(value: Any, device: torch.device) -> torch.dtype | None:
    """``precision`` -> the autocast dtype (``None``: float32). Mixed precision needs CUDA; on CPU the
    run trains in float32 and says so."""
    key = str(value).lower()
    check(key in PRECISIONS, f"precision={value!r} is not allowed; use 32, bf16 or fp16")
    dtype = PRECISIONS[key]
    if dtype is None:
        return None
    if device.type != "cuda":
        log.warning("precision=%s needs a CUDA device; training in float32 on %s", key, device)
        return None
    if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise EpisodicError(f"precision=bf16 is not supported by {torch.cuda.get_device_name(device)}; use fp16")
    return dtype


def autocast(dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast on CUDA; a no-op in float32 (and on CPU)."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type="cuda", dtype=dtype)


def use_channels_last(model: nn.Module) -> None:
    """NHWC memory format for 4-D weights, and for the input of every backbone (a forward pre-hook)."""
    from episodic.models.backbones import Backbone

    model.to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, Backbone):
            m.register_forward_pre_hook(
                lambda _m, args: (
                    (args[0].contiguous(memory_format=torch.channels_last), *args[1:])
                    if args and isinstance(args[0], Tensor) and args[0].dim() == 4
                    else args
                )
            )
