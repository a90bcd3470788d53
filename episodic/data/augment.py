"""SimCLR-style augmentation, batched on the training device with an independent draw per image.

Two paths share one :class:`AugmentConfig`:

* :class:`BatchAugment` (an ``nn.Module``) takes a whole ``uint8 [B, C, H, W]`` batch already on the
  training device and returns ``float32 [B, C, size, size]``. Every image gets its own crop, flip,
  jitter factors and order, grayscale/blur/solarize coin flips. There is no Python loop over samples:

  - random resized crop + horizontal flip + resize is one separable resampling per sample, done as
    two batched matmuls ``Wy @ img @ Wx^T`` with per-sample interpolation matrices built with
    PIL's algorithm (bicubic a=-0.5, or bilinear; antialiased when shrinking, window clipped to the
    crop). This is what torchvision's ``resized_crop(..., antialias=True)`` computes, so a crop with
    no scaling is an exact copy and a flip is an exact mirror. The matrices are read from a cached
    table of every crop window when it fits in 32 MiB (to ~128 px), else computed directly. On CUDA
    the matmuls follow ``torch.backends.cuda.matmul.allow_tf32`` (off by default);
  - colour jitter follows ``torchvision.transforms.ColorJitter``: factors brightness/contrast/
    saturation ~ U(max(0, 1-v), 1+v), hue ~ U(-v, v), the four ops applied in a random order drawn
    per sample (like torchvision, which draws one per call, i.e. per image). Each of the 4 steps
    applies each op to the sub-batch whose permutation puts that op at that step;
  - grayscale uses ITU-R 601 luma (0.299, 0.587, 0.114), as PIL's ``convert("L")``;
  - Gaussian blur is separable, per-sample sigma, reflect padding (``torchvision`` semantics);
  - solarize maps ``x >= threshold`` to ``1 - x``;
  - random affine (``affine_p``, right after the crop, before the colour ops): rotation by
    ``U(-degrees, degrees)``, x-shear by ``U(-shear, shear)`` degrees and a translation of
    ``U(-translate, translate)`` of the side in x and y, as ``torchvision.transforms.RandomAffine``
    with zero fill; one batched ``affine_grid`` + bilinear ``grid_sample``. Its parameters are drawn
    only when ``affine_p > 0``, so configurations without it draw exactly the same numbers as before.

  All random parameters are drawn on the CPU (from ``generator``, a CPU ``torch.Generator``, or the
  global CPU RNG) and then moved to the input's device, so a seed gives the same augmentation on
  CPU and CUDA and resuming a run only needs the generator state. :meth:`BatchAugment.sample_params`
  exposes the draw.

* :func:`pil_transform` is the per-image torchvision pipeline with the same parameters, for datasets
  that go through a ``DataLoader`` one image at a time.

Differences between the two paths (same distributions, not bit-equal): the batched path works in
float32 throughout (PIL rounds to uint8 after each resampling pass and converts to 8-bit HSV for hue),
and uses luma 0.299 for red everywhere (PIL does too; torchvision's tensor ops use 0.2989).

Single-channel images (digits, Omniglot) are supported: saturation, hue and grayscale are no-ops.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from episodic.errors import EpisodicError, check
from episodic.profiling import host_side

__all__ = ["AugmentConfig", "BatchAugment", "affine", "blur_kernel_size", "multi_view", "pil_transform"]

_LUMA = (0.299, 0.587, 0.114)  # ITU-R 601-2, as PIL's convert("L")
_N_ATTEMPTS = 10  # torchvision RandomResizedCrop tries 10 times before its fallback
_JITTER_OPS = ("brightness", "contrast", "saturation", "hue")


def _pair(value: Any, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)
    except (TypeError, ValueError):
        raise EpisodicError(f"augment.{name} must be a pair [low, high], got {value!r}") from None
    return lo, hi


@dataclass
class AugmentConfig:
    """Parameters of the SimCLR augmentation; defaults are the SimCLR CIFAR recipe (s = 0.5).

    Probabilities are in [0, 1]; jitter strengths follow ``torchvision.transforms.ColorJitter``.
    ``blur_kernel=None`` means an odd kernel of about 10% of ``size`` (``2 * (size // 20) + 1``,
    e.g. 23 px at 224, 3 px at 32). ``mean``/``std`` (both or neither) normalise the output;
    by default pixels stay in [0, 1].
    """

    size: int = 32
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    blur_kernel: int | None = None
    solarize_p: float = 0.0
    solarize_threshold: float = 0.5
    affine_p: float = 0.0
    degrees: float = 0.0
    shear: float = 0.0
    translate: float = 0.0
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        self.scale = _pair(self.scale, "scale")
        self.ratio = _pair(self.ratio, "ratio")
        self.blur_sigma = _pair(self.blur_sigma, "blur_sigma")
        check(isinstance(self.size, int) and self.size > 0, f"augment.size must be a positive int, got {self.size!r}")
        check(0 < self.scale[0] <= self.scale[1], f"augment.scale must satisfy 0 < low <= high, got {self.scale}")
        check(0 < self.ratio[0] <= self.ratio[1], f"augment.ratio must satisfy 0 < low <= high, got {self.ratio}")
        check(
            0 < self.blur_sigma[0] <= self.blur_sigma[1],
            f"augment.blur_sigma must satisfy 0 < low <= high, got {self.blur_sigma}",
        )
        check(
            self.interpolation in ("bicubic", "bilinear"),
            f"augment.interpolation must be 'bicubic' or 'bilinear', got {self.interpolation!r}",
        )
        for name in ("degrees", "shear", "translate"):
            check(getattr(self, name) >= 0, f"augment.{name} must be >= 0, got {getattr(self, name)!r}")
        check(
            self.shear < 90 and self.translate <= 1,
            f"augment.shear must be below 90 degrees and augment.translate at most 1 (a fraction of the "
            f"side), got {self.shear!r}, {self.translate!r}",
        )
        for name in ("hflip", "jitter_p", "gray_p", "blur_p", "solarize_p", "affine_p"):
            p = getattr(self, name)
            check(0.0 <= p <= 1.0, f"augment.{name} is a probability in [0, 1], got {p!r}")
        for name in ("brightness", "contrast", "saturation"):
            check(getattr(self, name) >= 0, f"augment.{name} must be >= 0, got {getattr(self, name)!r}")
        check(0.0 <= self.hue <= 0.5, f"augment.hue must be in [0, 0.5], got {self.hue!r}")
        if self.blur_kernel is not None:
            check(
                isinstance(self.blur_kernel, int)
                and self.blur_kernel > 0
                and self.blur_kernel % 2 == 1
                and self.blur_kernel // 2 < self.size,
                f"augment.blur_kernel must be a positive odd int below 2 * size, or null; got {self.blur_kernel!r}",
            )
        check((self.mean is None) == (self.std is None), "augment.mean and augment.std must be given together")
        if self.mean is not None and self.std is not None:
            self.mean = tuple(float(m) for m in self.mean)
            self.std = tuple(float(s) for s in self.std)
            check(
                len(self.mean) == len(self.std) and len(self.mean) in (1, 3),
                f"augment.mean/std must have 1 or 3 equal-length entries, got {self.mean}, {self.std}",
            )
            check(all(s > 0 for s in self.std), f"augment.std must be positive, got {self.std}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> AugmentConfig:
        """Build from a plain or Hydra/OmegaConf mapping (the ``augment: {...}`` YAML block)."""
        d = dict(d or {})
        allowed = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(allowed))
        check(not unknown, f"unknown augment key(s) {unknown}; allowed: {', '.join(allowed)}")
        for key in ("mean", "std"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def simclr(cls, size: int = 32, s: float = 0.5, blur_p: float = 0.0, **overrides: Any) -> AugmentConfig:
        """The SimCLR recipe at strength ``s`` (0.5 CIFAR; 1.0 and ``blur_p=0.5`` for ImageNet)."""
        base: dict[str, Any] = dict(
            size=size, brightness=0.8 * s, contrast=0.8 * s, saturation=0.8 * s, hue=0.2 * s, blur_p=blur_p
        )
        base.update(overrides)
        return cls(**base)


def blur_kernel_size(cfg: AugmentConfig) -> int:
    """Odd Gaussian kernel size: ``cfg.blur_kernel`` or about 10% of ``cfg.size``."""
    return cfg.blur_kernel if cfg.blur_kernel is not None else 2 * (cfg.size // 20) + 1


# ----------------------------------------------------------------------------------------------
# Resampling matrices (PIL / torchvision antialiased resize, restricted to a crop window)
# ----------------------------------------------------------------------------------------------


def _bicubic(t: Tensor) -> Tensor:
    a = -0.5  # PIL's and torchvision-antialias's cubic coefficient
    t = t.abs()
    near = ((a + 2.0) * t - (a + 3.0)) * t * t + 1.0
    far = (((t - 5.0) * t + 8.0) * t - 4.0) * a
    return torch.where(t < 1.0, near, torch.where(t < 2.0, far, torch.zeros_like(t)))


def _bilinear(t: Tensor) -> Tensor:
    return (1.0 - t.abs()).clamp_(min=0.0)


_FILTERS = {"bicubic": (_bicubic, 2.0), "bilinear": (_bilinear, 1.0)}


def _resample_matrix(
    start: Tensor, length: Tensor, in_size: int, out_size: int, kind: str, flip: Tensor | None = None
) -> Tensor:
    """Per-sample ``[B, out_size, in_size]`` weights mapping pixels ``start .. start+length-1`` to
    ``out_size`` outputs with PIL's convolution resampling: support widened by the scale when
    shrinking (antialias), taps outside the crop dropped and the rest renormalised. ``flip``
    (bool ``[B]``) reverses the output order."""
    filt, _support = _FILTERS[kind]
    start = start.to(torch.float32).view(-1, 1, 1)
    length = length.to(torch.float32).view(-1, 1, 1)
    dev = start.device
    scale = length / out_size
    fscale = scale.clamp(min=1.0)
    o = torch.arange(out_size, device=dev, dtype=torch.float32).view(1, -1, 1)
    if flip is not None:
        o = o + flip.to(device=dev, dtype=torch.float32).view(-1, 1, 1) * (out_size - 1 - 2 * o)
    centre = start + (o + 0.5) * scale
    pix = torch.arange(in_size, device=dev, dtype=torch.float32).view(1, 1, -1)
    w = filt((pix + 0.5 - centre) / fscale)
    w = w * ((pix >= start) & (pix < start + length))
    return w / w.sum(dim=2, keepdim=True)


_TABLE_MAX_ELEMENTS = 1 << 23  # 32 MiB of float32 per (input size, output size, device)


@functools.lru_cache(maxsize=16)
def _resample_table(in_size: int, out_size: int, kind: str, device: torch.device) -> Tensor:
    """All crop windows starting at 0, by (flip, length): ``[2 * (in_size + 1), out_size, 2 * in_size]``
    with the window's weights in the right half, so a crop at ``start`` is a shifted read."""
    lengths = torch.arange(1, in_size + 1, device=device)
    m = _resample_matrix(torch.zeros_like(lengths), lengths, in_size, out_size, kind)
    table = torch.zeros(2, in_size + 1, out_size, 2 * in_size, device=device)
    table[0, 1:, :, in_size:] = m
    table[1] = table[0].flip(1)
    return table.view(2 * (in_size + 1), out_size, 2 * in_size)


def _crop_weights(start: Tensor, length: Tensor, flip: Tensor, in_size: int, out_size: int, kind: str) -> Tensor:
    """``_resample_matrix`` for a batch, read from the cached table when it is small enough."""
    if 2 * (in_size + 1) * out_size * 2 * in_size > _TABLE_MAX_ELEMENTS:
        return _resample_matrix(start, length, in_size, out_size, kind, flip)
    table = _resample_table(in_size, out_size, kind, start.device)
    rows = table.index_select(0, length + flip.long() * (in_size + 1))  # [B, out, 2 * in]
    cols = in_size + torch.arange(in_size, device=start.device).view(1, 1, -1) - start.view(-1, 1, 1)
    return rows.gather(2, cols.expand(-1, out_size, -1))


# ----------------------------------------------------------------------------------------------
# Colour ops on float images in [0, 1], shape [n, C, H, W], per-sample factors of shape [n]
# ----------------------------------------------------------------------------------------------


def _gray(x: Tensor) -> Tensor:
    """ITU-R 601 luma, ``[n, 1, H, W]`` (identity for 1-channel input)."""
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(1)


def _blend(img: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    f = factor.view(-1, 1, 1, 1)
    return torch.addcmul((1.0 - f) * other, f, img).clamp_(0.0, 1.0)


def _brightness(x: Tensor, f: Tensor) -> Tensor:
    return (x * f.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)


def _contrast(x: Tensor, f: Tensor) -> Tensor:
    mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(x, mean, f)


def _saturation(x: Tensor, f: Tensor) -> Tensor:
    if x.shape[1] == 1:
        return x
    return _blend(x, _gray(x), f)


def _hue(x: Tensor, f: Tensor) -> Tensor:
    """Rotate the HSV hue by ``f`` turns (torchvision ``adjust_hue``) without an HSV round trip.

    Value ``v = max`` and chroma ``c = max - min`` are kept; with the hue in sixths ``h6`` (red first,
    then green, on ties, as torchvision) the output is ``v - c * clamp(2 - |k - 2|, 0, 1)`` with
    ``k = (n + h6 + 6 f) mod 6`` and ``n = 5, 3, 1`` for R, G, B. Branch-free arithmetic only:
    ``torch.where`` and ``remainder`` are an order of magnitude slower on CPU.
    """
    if x.shape[1] == 1:
        return x
    r, g, b = x.unbind(1)
    maxc = x.amax(dim=1)
    chroma = maxc - x.amin(dim=1)
    is_r = (r - maxc).sign_().add_(1.0)  # 1 where r is the max, else 0
    is_g = (g - maxc).sign_().add_(1.0).mul_(1.0 - is_r)
    is_b = (1.0 - is_r).sub_(is_g)
    h6 = (g - b).mul_(is_r).addcmul_(b - r, is_g).addcmul_(r - g, is_b).div_(chroma.clamp_min(1e-12))
    h6.add_(is_g, alpha=2.0).add_(is_b, alpha=4.0).add_(6.0 * f.view(-1, 1, 1).to(x.dtype))
    n = torch.arange(5.0, 0.0, -2.0, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)  # 5, 3, 1
    k = h6.unsqueeze(1) + n
    k.sub_(torch.mul(k, 1.0 / 6.0).floor_(), alpha=6.0)
    k.sub_(2.0).abs_().neg_().add_(2.0).clamp_(0.0, 1.0)
    return torch.addcmul(maxc.unsqueeze(1), chroma.unsqueeze(1), k, value=-1.0)


_JITTER_FNS = (_brightness, _contrast, _saturation, _hue)


def _jitter(op: int, factors: Tensor, x: Tensor) -> Tensor:
    return _JITTER_FNS[op](x, factors)


def _channel_stats(values: Any) -> Tensor:
    """Per-channel normalisation values as ``[1, C, 1, 1]`` float32."""
    return torch.tensor(list(values), dtype=torch.float32).view(1, -1, 1, 1)


def _gaussian_blur(x: Tensor, sigma: Tensor, ksize: int) -> Tensor:
    """Separable Gaussian blur with a per-sample sigma, reflect padding (torchvision semantics)."""
    n, c, h, w = x.shape
    r = ksize // 2
    t = torch.linspace(-r, r, ksize, device=x.device, dtype=x.dtype).view(1, -1)
    k = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    k = (k / k.sum(dim=1, keepdim=True)).unsqueeze(1).expand(n, c, ksize).reshape(n * c, ksize)
    if r >= h or r >= w:  # reflect padding needs r < size
        return x
    y = F.pad(x.reshape(1, n * c, h, w), (r, r, r, r), mode="reflect")
    y = F.conv2d(y, k.view(n * c, 1, 1, ksize), groups=n * c)
    y = F.conv2d(y, k.view(n * c, 1, ksize, 1), groups=n * c)
    return y.view(n, c, h, w)


# ----------------------------------------------------------------------------------------------
# The batched module
# ----------------------------------------------------------------------------------------------


class BatchAugment(nn.Module):
    """Augment a ``uint8 [B, C, H, W]`` batch on its device, independently per sample.

    ``forward(x, generator)`` returns ``float32 [B, C, size, size]``, stored channels-last (NHWC) when
    ``channels_last`` (the layout the trainer's encoder reads: the step then converts nothing).
    ``generator`` must be a CPU ``torch.Generator`` (or ``None`` for the global CPU RNG): parameters are
    drawn on the CPU and moved to ``x.device``. Float input already in [0, 1] is accepted too.
    """

    mean: Tensor  # buffers [1, C, 1, 1], when cfg.mean is set
    std: Tensor

    def __init__(self, cfg: AugmentConfig | None = None, channels_last: bool = False) -> None:
        super().__init__()
        self.cfg = cfg if cfg is not None else AugmentConfig()
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        self.ksize = blur_kernel_size(self.cfg)
        if self.cfg.mean is not None:  # buffers: they move with the module, no copy per batch
            self.register_buffer("mean", _channel_stats(self.cfg.mean), persistent=False)
            self.register_buffer("std", _channel_stats(self.cfg.std), persistent=False)

    def extra_repr(self) -> str:
        return repr(self.cfg)

    # -- parameters ------------------------------------------------------------------------------

    def sample_params(
        self, batch: int, height: int, width: int, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """Draw every per-sample parameter on the CPU, in a fixed order.

        Returns CPU tensors of length ``batch``: crop ``top``/``left``/``height``/``width`` (int64),
        ``flip``, ``jitter``, ``gray``, ``blur``, ``solarize`` (bool), jitter factors
        ``brightness``/``contrast``/``saturation``/``hue`` (float; identity values where the op is
        off), ``order`` (int64 ``[batch, 4]``, a permutation of brightness, contrast, saturation,
        hue per sample) and ``sigma`` (float).
        """
        cfg = self.cfg
        check(
            generator is None or generator.device.type == "cpu",
            f"BatchAugment draws its parameters on the CPU: pass a CPU torch.Generator, "
            f"got one on {generator.device if generator is not None else None}",
        )
        B, H, W = int(batch), int(height), int(width)

        def rand(*shape: int) -> Tensor:
            return torch.rand(*shape, generator=generator, dtype=torch.float64)

        # Random resized crop, torchvision's scheme: up to 10 attempts of (scale, log-ratio), the
        # first one that fits wins, else a centre crop clamped to the ratio range.
        area = H * W
        log_lo, log_hi = math.log(cfg.ratio[0]), math.log(cfg.ratio[1])
        target = area * (cfg.scale[0] + (cfg.scale[1] - cfg.scale[0]) * rand(B, _N_ATTEMPTS))
        aspect = torch.exp(log_lo + (log_hi - log_lo) * rand(B, _N_ATTEMPTS))
        cw = torch.round(torch.sqrt(target * aspect)).long()
        ch = torch.round(torch.sqrt(target / aspect)).long()
        ok = (cw > 0) & (cw <= W) & (ch > 0) & (ch <= H)
        first = ok.to(torch.int8).argmax(dim=1, keepdim=True)
        found = ok.any(dim=1)
        u_top, u_left = rand(B), rand(B)
        in_ratio = W / H
        if in_ratio < cfg.ratio[0]:
            fw, fh = W, round(W / cfg.ratio[0])
        elif in_ratio > cfg.ratio[1]:
            fw, fh = round(H * cfg.ratio[1]), H
        else:
            fw, fh = W, H
        cw = torch.where(found, cw.gather(1, first).squeeze(1), torch.full((B,), fw))
        ch = torch.where(found, ch.gather(1, first).squeeze(1), torch.full((B,), fh))
        top = torch.where(found, (u_top * (H - ch + 1)).long().clamp_max(H - ch), (H - ch) // 2)
        left = torch.where(found, (u_left * (W - cw + 1)).long().clamp_max(W - cw), (W - cw) // 2)

        flip = rand(B) < cfg.hflip

        jitter = rand(B) < cfg.jitter_p
        factors = {}
        for name in ("brightness", "contrast", "saturation"):
            v = getattr(cfg, name)
            lo, hi = max(0.0, 1.0 - v), 1.0 + v
            f = lo + (hi - lo) * rand(B)
            factors[name] = torch.where(jitter, f, torch.ones_like(f)).float()
        f = cfg.hue * (2.0 * rand(B) - 1.0)
        factors["hue"] = torch.where(jitter, f, torch.zeros_like(f)).float()
        order = torch.argsort(rand(B, 4), dim=1)

        gray = rand(B) < cfg.gray_p
        blur = rand(B) < cfg.blur_p
        lo, hi = cfg.blur_sigma
        sigma = (lo + (hi - lo) * rand(B)).float()
        solarize = rand(B) < cfg.solarize_p
        extra = {}
        if cfg.affine_p > 0:  # drawn last and only when on: other configurations keep their streams
            extra["affine"] = rand(B) < cfg.affine_p
            extra["angle"] = (cfg.degrees * (2.0 * rand(B) - 1.0)).float()
            extra["shear"] = (cfg.shear * (2.0 * rand(B) - 1.0)).float()
            extra["shift"] = (cfg.translate * (2.0 * rand(B, 2) - 1.0)).float()

        return dict(
            top=top,
            left=left,
            height=ch,
            width=cw,
            flip=flip,
            jitter=jitter,
            order=order,
            gray=gray,
            blur=blur,
            sigma=sigma,
            solarize=solarize,
            **factors,
            **extra,
        )

    # -- forward -----------------------------------------------------------------------------------

    @torch.no_grad()
    def forward(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        check(x.dim() == 4, f"BatchAugment expects [B, C, H, W], got shape {tuple(x.shape)}")
        B, C, H, W = x.shape
        check(C in (1, 3), f"BatchAugment expects 1 or 3 channels, got {C}")
        cfg, S, dev = self.cfg, self.cfg.size, x.device
        with host_side():
            plan, jitter = self.plan(self.sample_params(B, H, W, generator), C)
        if B == 0:
            return torch.empty(0, C, S, S, device=dev)
        d = _to_device(plan, dev)  # one asynchronous copy per dtype: the device never waits for the host

        img = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        # Crop + flip + resize: out = Wy @ img @ Wx^T, flip = reversed output columns of Wx.
        crop = d["crop"]
        no_flip = torch.zeros_like(crop[:, 4])
        wy = _crop_weights(crop[:, 0], crop[:, 2], no_flip, H, S, cfg.interpolation)
        wx = _crop_weights(crop[:, 1], crop[:, 3], crop[:, 4], W, S, cfg.interpolation)
        out = torch.einsum("bth,bchs->bcts", wy, torch.einsum("bchw,bsw->bchs", img, wx))
        out = out.clamp_(0.0, 1.0).contiguous(memory_format=self.layout)  # later steps keep the layout

        def apply(key: str, fn: Callable[[Tensor], Tensor]) -> None:
            if key in d:
                out.index_copy_(0, d[key], fn(out.index_select(0, d[key])))

        apply("affine", lambda sub: warp(sub, d["theta"]))
        # Colour jitter: at step k, op j runs on the samples whose permutation has j at position k.
        for key, j in jitter:
            apply(key, functools.partial(_jitter, j, d[f"{key}_f"]))
        if C == 3:
            apply("gray", lambda sub: _gray(sub).expand(-1, 3, -1, -1))
        apply("blur", lambda sub: _gaussian_blur(sub, d["sigma"], self.ksize))
        apply("solarize", lambda sub: sub.addcmul_((sub >= cfg.solarize_threshold).to(sub.dtype), 1.0 - 2.0 * sub))
        if cfg.mean is not None:
            check(len(cfg.mean) in (1, C), f"augment.mean has {len(cfg.mean)} entries for {C}-channel images")
            out = (out - self.mean) / self.std
        return out

    def plan(self, p: dict[str, Tensor], channels: int) -> tuple[dict[str, Tensor], list[tuple[str, int]]]:
        """On the host, from the drawn parameters: the crop table and, per op, the indices of the samples
        it changes (and their factors), so that the device only gathers and scatters. Also the jitter
        steps in order, as (key of the indices, op number)."""
        cfg = self.cfg
        plan = {"crop": torch.stack([p["top"], p["left"], p["height"], p["width"], p["flip"].long()], 1)}

        def where(key: str, mask: Tensor) -> Tensor | None:
            idx = mask.nonzero().squeeze(1)
            if idx.numel():
                plan[key] = idx
                return idx
            return None

        if "affine" in p and (idx := where("affine", p["affine"])) is not None:
            plan["theta"] = affine_theta(p["angle"][idx], p["shear"][idx], p["shift"][idx]).float()
        jitter = []
        for k in range(4):
            for j, name in enumerate(_JITTER_OPS):
                if getattr(cfg, name) <= 0 or (channels == 1 and name in ("saturation", "hue")):
                    continue
                key = f"jitter{k}{j}"
                if (idx := where(key, p["jitter"] & (p["order"][:, k] == j))) is not None:
                    plan[f"{key}_f"] = p[name][idx]
                    jitter.append((key, j))
        if channels == 3:
            where("gray", p["gray"])
        if self.ksize > 1 and (idx := where("blur", p["blur"])) is not None:
            plan["sigma"] = p["sigma"][idx]
        where("solarize", p["solarize"])
        return plan, jitter


def _to_device(tensors: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    """The CPU ``tensors`` on ``device``: packed into one buffer per dtype, copied without blocking (pinned
    memory on CUDA), unpacked as views."""
    if device.type == "cpu":
        return tensors
    out = {}
    for dtype in {t.dtype for t in tensors.values()}:
        keys = [k for k, t in tensors.items() if t.dtype == dtype]
        flat = torch.cat([tensors[k].flatten() for k in keys])
        flat = flat.pin_memory() if device.type == "cuda" else flat
        flat = flat.to(device, non_blocking=True)
        parts = flat.split([tensors[k].numel() for k in keys])
        out.update({k: part.view(tensors[k].shape) for k, part in zip(keys, parts)})
    return out


def affine_theta(angle: Tensor, shear: Tensor, shift: Tensor) -> Tensor:
    """``affine_grid``'s ``[B, 2, 3]`` matrices (float64) for :func:`affine`'s transform."""
    a = torch.deg2rad(angle.double())
    sh = torch.deg2rad(shear.double())
    cos, sin, tan = torch.cos(a), torch.sin(a), torch.tan(sh)
    # M = R @ Sh with R = [[cos, sin], [-sin, cos]] (counter-clockwise on screen, y down) and Sh = [[1, tan], [0, 1]]
    m = torch.stack([torch.stack([cos, cos * tan + sin], -1), torch.stack([-sin, -sin * tan + cos], -1)], -2)
    inv = torch.linalg.inv(m)  # [B, 2, 2]
    t = 2.0 * shift.double()  # fractions of the side -> normalised [-1, 1] coordinates
    return torch.cat([inv, -(inv @ t.unsqueeze(-1))], -1)


def warp(img: Tensor, theta: Tensor) -> Tensor:
    """Resample ``img [B, C, S, S]`` at ``affine_grid(theta)``: zero fill, bilinear."""
    grid = F.affine_grid(theta.to(img.device, img.dtype), list(img.shape), align_corners=False)
    return F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def affine(img: Tensor, angle: Tensor, shear: Tensor, shift: Tensor) -> Tensor:
    """Rotate ``img [B, C, S, S]`` by ``angle`` degrees (counter-clockwise), x-shear by ``shear`` degrees
    and shift by ``shift [B, 2]`` (x, y, fractions of the side) about the centre; zero fill, bilinear.

    The output pixel at centred coordinates ``u`` reads the input at ``M^-1 (u - t)`` with
    ``M = R(angle) Sh(shear)`` (torchvision's ``RandomAffine`` convention, y pointing down), computed
    as one ``affine_grid`` + ``grid_sample`` for the batch. Pixel centres map to pixel centres
    (``align_corners=False``), so a 90-degree turn or a whole-pixel shift is exact.
    """
    return warp(img, affine_theta(angle, shear, shift))


def multi_view(aug: BatchAugment, x: Tensor, n_views: int, generator: torch.Generator | None = None) -> Tensor:
    """``n_views`` independent augmentations of the batch ``x``: ``[n_views, B, C, size, size]``,
    view-major (view ``v`` of image ``b`` is ``out[v, b]``). Runs as one batch of ``n_views * B``."""
    check(isinstance(n_views, int) and n_views >= 1, f"n_views must be a positive int, got {n_views!r}")
    B = x.shape[0]
    out = aug(x.repeat(n_views, *([1] * (x.dim() - 1))), generator)
    return out.view(n_views, B, *out.shape[1:])


# ----------------------------------------------------------------------------------------------
# Per-image torchvision path
# ----------------------------------------------------------------------------------------------


def pil_transform(cfg: AugmentConfig | None = None) -> Callable[[Any], Tensor]:
    """The same pipeline as :class:`BatchAugment`, per PIL image with ``torchvision.transforms``:
    crop, flip, jitter (random order), grayscale on the PIL image; blur, solarize and normalisation
    on the float tensor. Returns ``float32 [C, size, size]``."""
    from torchvision import transforms as T

    cfg = cfg if cfg is not None else AugmentConfig()
    interp = {"bicubic": T.InterpolationMode.BICUBIC, "bilinear": T.InterpolationMode.BILINEAR}
    steps: list[Any] = [
        T.RandomResizedCrop(cfg.size, scale=cfg.scale, ratio=cfg.ratio, interpolation=interp[cfg.interpolation])
    ]
    if cfg.hflip > 0:
        steps.append(T.RandomHorizontalFlip(cfg.hflip))
    if cfg.affine_p > 0:
        shift = (cfg.translate, cfg.translate) if cfg.translate > 0 else None
        steps.append(T.RandomApply([T.RandomAffine(cfg.degrees, shift, shear=cfg.shear or None)], p=cfg.affine_p))
    if cfg.jitter_p > 0 and any(getattr(cfg, n) > 0 for n in _JITTER_OPS):
        jitter = T.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)
        steps.append(T.RandomApply([jitter], p=cfg.jitter_p))
    if cfg.gray_p > 0:
        steps.append(T.RandomGrayscale(cfg.gray_p))
    steps.append(T.ToTensor())
    ksize = blur_kernel_size(cfg)
    if cfg.blur_p > 0 and ksize > 1:
        steps.append(T.RandomApply([T.GaussianBlur(ksize, sigma=cfg.blur_sigma)], p=cfg.blur_p))
    if cfg.solarize_p > 0:
        steps.append(T.RandomSolarize(cfg.solarize_threshold, p=cfg.solarize_p))
    if cfg.mean is not None:
        steps.append(T.Normalize(cfg.mean, cfg.std))
    return T.Compose(steps)
