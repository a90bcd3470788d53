"""Batched SimCLR augmentation: per-sample randomness, crop-sampling distribution, exact ops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from episodic.data.augment import AugmentConfig, BatchAugment, affine, multi_view, pil_transform
from episodic.errors import EpisodicError

IDENTITY = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0)


def _images(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, c, h, w), dtype=torch.uint8, generator=g)


def _smooth_images(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Low-frequency images (bicubic overshoot stays inside [0, 1] so clamping does not matter)."""
    g = torch.Generator().manual_seed(seed)
    small = torch.rand(b, c, 4, 4, generator=g) * 0.6 + 0.2
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="bilinear")
    return (big * 255).round().to(torch.uint8)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ks_uniform(samples: torch.Tensor, lo: float, hi: float) -> float:
    """One-sample Kolmogorov-Smirnov statistic against U(lo, hi)."""
    x = np.sort(samples.double().numpy())
    cdf = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
    n = len(x)
    return float(max((np.arange(1, n + 1) / n - cdf).max(), (cdf - np.arange(n) / n).max()))


def _ks_two(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (ties handled by evaluating both ECDFs on all values)."""
    a, b = np.sort(a.double().numpy()), np.sort(b.double().numpy())
    grid = np.concatenate([a, b])
    fa = np.searchsorted(a, grid, side="right") / len(a)
    fb = np.searchsorted(b, grid, side="right") / len(b)
    return float(np.abs(fa - fb).max())


# --- configuration ------------------------------------------------------------------------------


def test_config_defaults_from_dict_and_validation():
    cfg = AugmentConfig()
    assert (cfg.size, cfg.scale, cfg.hflip) == (32, (0.08, 1.0), 0.5)
    assert (cfg.jitter_p, cfg.gray_p, cfg.blur_p, cfg.solarize_p, cfg.mean) == (0.8, 0.2, 0.0, 0.0, None)
    assert cfg.brightness == pytest.approx(0.4) and cfg.hue == pytest.approx(0.1)
    cfg = AugmentConfig.from_dict({"size": 96, "scale": [0.2, 1.0], "mean": [0.5], "std": [0.25]})
    assert cfg.size == 96 and cfg.scale == (0.2, 1.0) and cfg.mean == (0.5,)
    imagenet = AugmentConfig.simclr(size=224, s=1.0, blur_p=0.5)
    assert imagenet.brightness == pytest.approx(0.8) and imagenet.hue == pytest.approx(0.2)
    bad_blocks = (
        {"sise": 32},
        {"hflip": 1.5},
        {"scale": [0.5, 0.1]},
        {"mean": [0.5]},
        {"interpolation": "nearest"},
        {"blur_kernel": 4},
    )
    for bad in bad_blocks:
        with pytest.raises(EpisodicError):
            AugmentConfig.from_dict(bad)


def test_bad_input_and_cuda_generator_rejected():
    aug = BatchAugment(AugmentConfig())
    with pytest.raises(EpisodicError):
        aug(torch.zeros(2, 2, 32, 32, dtype=torch.uint8))
    with pytest.raises(EpisodicError):
        aug(torch.zeros(32, 32, dtype=torch.uint8))


# --- output contract ----------------------------------------------------------------------------


@pytest.mark.parametrize("c,h,w", [(3, 32, 32), (1, 28, 28), (3, 40, 24), (1, 20, 50)])
def test_output_shape_dtype_range(c, h, w):
    cfg = AugmentConfig(size=24, blur_p=0.5, solarize_p=0.3)
    out = BatchAugment(cfg)(_images(16, c, h, w), _gen())
    assert out.shape == (16, c, 24, 24) and out.dtype == torch.float32
    assert out.min() >= 0.0 and out.max() <= 1.0 and torch.isfinite(out).all()


def test_normalisation():
    x = _images(8, 3, 32, 32)
    cfg = AugmentConfig(**IDENTITY, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.5))
    out = BatchAugment(cfg)(x, _gen())
    mean = torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)
    std = torch.tensor([0.2, 0.25, 0.5]).view(1, 3, 1, 1)
    expected = (x / 255.0 - mean) / std
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("c,size", [(3, 32), (1, 28), (3, 28)])
def test_identity_config_is_exact(c, size):
    x = _images(32, c, size, size)
    out = BatchAugment(AugmentConfig(size=size, **IDENTITY))(x, _gen())
    assert torch.equal(out, x.float() / 255.0)


# --- crop sampling: per-sample, within range, torchvision's scheme --------------------------------


def test_per_sample_parameters_differ():
    aug = BatchAugment(AugmentConfig())
    p = aug.sample_params(256, 32, 32, _gen(1))
    crops = set(zip(p["top"].tolist(), p["left"].tolist(), p["height"].tolist(), p["width"].tolist()))
    assert len(crops) > 150
    assert 0.35 < p["flip"].float().mean() < 0.65 and 0.7 < p["jitter"].float().mean() < 0.9
    assert 0.1 < p["gray"].float().mean() < 0.3
    jit = p["jitter"]
    for name in ("brightness", "contrast", "saturation", "hue"):
        assert p[name][jit].unique().numel() == int(jit.sum())  # every jittered sample its own factor
    perms = {tuple(o) for o in p["order"].tolist()}
    assert len(perms) == 24 and all(sorted(o) == [0, 1, 2, 3] for o in perms)
    # The same image 64 times gives 64 different views.
    out = aug(_images(1, 3, 32, 32).expand(64, -1, -1, -1), _gen(2)).flatten(1)
    assert (torch.cdist(out, out) + torch.eye(64)).min() > 1e-3


def test_crop_scale_and_log_ratio_are_uniform_in_configured_ranges():
    # A 1000x1000 image with scale <= 0.5 never needs torchvision's fallback, so the accepted crop is
    # the first attempt: area fraction ~ U(scale), log(w/h) ~ U(log ratio), up to integer rounding.
    cfg = AugmentConfig(scale=(0.08, 0.5), ratio=(3 / 4, 4 / 3))
    p = BatchAugment(cfg).sample_params(20000, 1000, 1000, _gen(3))
    h, w = p["height"].double(), p["width"].double()
    area, log_ratio = h * w / 1e6, torch.log(w / h)
    assert area.min() >= 0.08 - 2e-3 and area.max() <= 0.5 + 2e-3
    assert log_ratio.min() >= math.log(3 / 4) - 5e-3 and log_ratio.max() <= math.log(4 / 3) + 5e-3
    assert (p["top"] >= 0).all() and (p["top"] + p["height"] <= 1000).all()
    assert (p["left"] >= 0).all() and (p["left"] + p["width"] <= 1000).all()
    crit = 1.95 / math.sqrt(20000)  # KS critical value at alpha = 0.001
    assert _ks_uniform(area, 0.08, 0.5) < crit
    assert _ks_uniform(log_ratio, math.log(3 / 4), math.log(4 / 3)) < crit
    # Offsets are uniform over the free range.
    assert _ks_uniform((p["top"].double() + 0.5) / (1001 - h), 0.0, 1.0) < crit


@pytest.mark.parametrize("h,w,scale", [(32, 32, (0.08, 1.0)), (40, 12, (0.3, 1.0)), (12, 40, (0.5, 1.0))])
def test_crop_distribution_matches_torchvision_sampler(h, w, scale):
    # Small and very non-square images exercise rounding, rejected attempts and the centre fallback.
    n = 4000
    cfg = AugmentConfig(scale=scale)
    p = BatchAugment(cfg).sample_params(n, h, w, _gen(4))
    torch.manual_seed(5)
    img = torch.zeros(1, h, w)
    ref = torch.tensor([RandomResizedCrop.get_params(img, list(scale), list(cfg.ratio)) for _ in range(n)])
    crit = 1.95 * math.sqrt(2 / n)
    ours = {"top": p["top"], "left": p["left"], "height": p["height"], "width": p["width"]}
    for k, name in enumerate(("top", "left", "height", "width")):
        assert _ks_two(ours[name], ref[:, k]) < crit, name
    assert _ks_two(p["height"] * p["width"], ref[:, 2] * ref[:, 3]) < crit


# --- the ops ------------------------------------------------------------------------------------


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("h,w,size", [(32, 32, 32), (48, 40, 24)])
def test_crop_resize_matches_torchvision_antialiased(interpolation, h, w, size):
    x = _smooth_images(12, 3, h, w)
    cfg = AugmentConfig(size=size, interpolation=interpolation, hflip=0.5, jitter_p=0.0, gray_p=0.0)
    aug = BatchAugment(cfg)
    out = aug(x, _gen(6))
    p = aug.sample_params(12, h, w, _gen(6))
    mode = InterpolationMode.BICUBIC if interpolation == "bicubic" else InterpolationMode.BILINEAR
    for b in range(12):
        top, left, ch, cw = (int(p[k][b]) for k in ("top", "left", "height", "width"))
        ref = TF.resized_crop(x[b].float() / 255, top, left, ch, cw, [size, size], mode, antialias=True)
        ref = ref.flip(-1) if p["flip"][b] else ref
        torch.testing.assert_close(out[b], ref.clamp(0, 1), atol=2e-5, rtol=0)


def test_flip_really_mirrors():
    x = _images(16, 3, 32, 32)
    out = BatchAugment(AugmentConfig(**{**IDENTITY, "hflip": 1.0}))(x, _gen())
    assert torch.equal(out, x.flip(-1).float() / 255.0)
    aug = BatchAugment(AugmentConfig(**{**IDENTITY, "hflip": 0.5}))
    out, p = aug(x, _gen(7)), aug.sample_params(16, 32, 32, _gen(7))
    assert 0 < p["flip"].sum() < 16
    for b in range(16):
        assert torch.equal(out[b], (x[b].flip(-1) if p["flip"][b] else x[b]).float() / 255.0)


def test_grayscale_is_itu_r_601_luma():
    x = _images(16, 3, 32, 32)
    out = BatchAugment(AugmentConfig(**{**IDENTITY, "gray_p": 1.0}))(x, _gen())
    f = x.float() / 255.0
    luma = 0.299 * f[:, 0] + 0.587 * f[:, 1] + 0.114 * f[:, 2]
    for c in range(3):
        torch.testing.assert_close(out[:, c], luma, atol=1e-6, rtol=0)
    one = _images(4, 1, 32, 32)  # a no-op on single-channel images
    assert torch.equal(BatchAugment(AugmentConfig(**{**IDENTITY, "gray_p": 1.0}))(one), one.float() / 255.0)


def test_solarize_inverts_above_threshold():
    x = _images(16, 3, 32, 32)
    out = BatchAugment(AugmentConfig(**{**IDENTITY, "solarize_p": 1.0}))(x, _gen())
    f = x.float() / 255.0
    torch.testing.assert_close(out, torch.where(f >= 0.5, 1.0 - f, f), atol=1e-6, rtol=0)


@pytest.mark.parametrize("c", [3, 1])
def test_colour_jitter_matches_torchvision_in_the_sampled_order(c):
    x = _smooth_images(24, c, 32, 32)
    strong = {"jitter_p": 0.75, "brightness": 0.8, "contrast": 0.8, "saturation": 0.8, "hue": 0.4}
    cfg = AugmentConfig(**{**IDENTITY, **strong})
    aug = BatchAugment(cfg)
    out, p = aug(x, _gen(8)), aug.sample_params(24, 32, 32, _gen(8))
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    names = ["brightness", "contrast", "saturation", "hue"]
    for b in range(24):
        ref = x[b].float() / 255.0
        if p["jitter"][b]:
            for j in p["order"][b].tolist():
                if c == 3 or j < 2:
                    ref = ops[j](ref, float(p[names[j]][b]))
        # torchvision's tensor grayscale uses 0.2989 for red, we use ITU-R 601's 0.299.
        torch.testing.assert_close(out[b], ref, atol=2e-3, rtol=0)


def test_hue_alone_matches_torchvision_closely():
    x = _images(16, 3, 16, 16)
    x[:4, 1] = x[:4, 0]  # ties between channels
    x[4:6] = x[4:6, :1]  # gray pixels
    aug = BatchAugment(
        AugmentConfig(
            **{
                **IDENTITY,
                "size": 16,
                "jitter_p": 1.0,
                "brightness": 0.0,
                "contrast": 0.0,
                "saturation": 0.0,
                "hue": 0.5,
            }
        )
    )
    out, p = aug(x, _gen(9)), aug.sample_params(16, 16, 16, _gen(9))
    for b in range(16):
        ref = TF.adjust_hue(x[b].float() / 255.0, float(p["hue"][b]))
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", [None, 7])
def test_gaussian_blur_matches_torchvision(kernel):
    x = _images(8, 3, 32, 32)
    aug = BatchAugment(AugmentConfig(**{**IDENTITY, "blur_p": 1.0, "blur_kernel": kernel}))
    out, p = aug(x, _gen(10)), aug.sample_params(8, 32, 32, _gen(10))
    k = kernel or 3
    assert aug.ksize == k
    for b in range(8):
        s = float(p["sigma"][b])
        assert 0.1 <= s <= 2.0
        ref = TF.gaussian_blur(x[b].float() / 255.0, [k, k], [s, s])
        torch.testing.assert_close(out[b], ref, atol=1e-5, rtol=0)


# --- reproducibility, views, PIL path, devices ----------------------------------------------------


def test_same_seed_same_output_and_multi_view():
    x = _images(16, 3, 32, 32)
    aug = BatchAugment(AugmentConfig(blur_p=0.5, solarize_p=0.2))
    a, b, c = aug(x, _gen(11)), aug(x, _gen(11)), aug(x, _gen(12))
    assert torch.equal(a, b) and not torch.equal(a, c)
    v = multi_view(aug, x, 3, _gen(13))
    assert v.shape == (3, 16, 3, 32, 32)
    assert torch.equal(v, multi_view(aug, x, 3, _gen(13)))
    assert (v[0] - v[1]).flatten(1).abs().amax(1).min() > 0  # views of one image differ


def test_channels_last_output_has_the_same_values():
    """``channels_last=True`` (the trainer's layout): every op on, with normalisation; the views are NHWC
    and equal the NCHW pipeline's (the same parameters, the same arithmetic, another memory order)."""
    x = _images(12, 3, 32, 32)
    cfg = AugmentConfig(blur_p=0.5, solarize_p=0.3, affine_p=0.5, degrees=20.0, mean=(0.5, 0.4, 0.3), std=(0.2,) * 3)
    nchw, nhwc = BatchAugment(cfg), BatchAugment(cfg, channels_last=True)
    a, b = multi_view(nchw, x, 2, _gen(3)), multi_view(nhwc, x, 2, _gen(3))
    assert a.is_contiguous() and not b.is_contiguous()
    assert b.flatten(0, 1).is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(b, a, atol=1e-6, rtol=0)


def test_pil_transform_same_pipeline():
    for mode, c in (("RGB", 3), ("L", 1)):
        arr = _images(1, c, 40, 36)[0].permute(1, 2, 0).squeeze(-1).numpy()
        t = pil_transform(AugmentConfig(size=24, blur_p=0.5, solarize_p=0.5, mean=(0.5,), std=(0.5,)))
        torch.manual_seed(0)
        out = t(Image.fromarray(arr, mode))
        torch.manual_seed(0)
        again = t(Image.fromarray(arr, mode))
        assert out.shape == (c, 24, 24) and out.dtype == torch.float32 and torch.equal(out, again)
        assert out.min() >= -1.0 and out.max() <= 1.0


# --- random affine ------------------------------------------------------------------------------------


def test_affine_turns_and_shifts_exactly():
    x = torch.rand(3, 2, 7, 7, generator=_gen(4))
    zero = torch.zeros(3)
    torch.testing.assert_close(
        affine(x, torch.full((3,), 90.0), zero, torch.zeros(3, 2)), torch.rot90(x, 1, (2, 3)), atol=1e-6, rtol=0
    )  # counter-clockwise
    torch.testing.assert_close(affine(x, zero, zero, torch.zeros(3, 2)), x, atol=1e-6, rtol=0)
    # +1 pixel right, +2 pixels down, zero fill where nothing comes in
    moved = affine(x, zero, zero, torch.tensor([[1 / 7, 2 / 7]]).expand(3, 2))
    want = torch.zeros_like(x)
    want[..., 2:, 1:] = x[..., :-2, :-1]
    torch.testing.assert_close(moved, want, atol=1e-6, rtol=0)
    # a 45-degree x-shear keeps the centre row and slides the row k pixels below it by k pixels:
    # output (x, y) reads input (x - y, y), y counted from the centre row
    sheared = affine(x, zero, torch.full((3,), 45.0), torch.zeros(3, 2))
    torch.testing.assert_close(sheared[..., 3, :], x[..., 3, :], atol=1e-6, rtol=0)
    torch.testing.assert_close(sheared[..., 0, :4], x[..., 0, 3:], atol=1e-6, rtol=0)  # 3 rows up: +3
    torch.testing.assert_close(sheared[..., 6, 3:], x[..., 6, :4], atol=1e-6, rtol=0)  # 3 rows down: -3


def test_affine_draws_only_when_on_and_an_identity_affine_changes_nothing():
    x = _images(16, 1, 28, 28)
    base = BatchAugment(AugmentConfig(size=20, hflip=0.5, jitter_p=0.0, gray_p=0.0))
    assert "affine" not in base.sample_params(4, 28, 28, _gen(0))
    ident = BatchAugment(AugmentConfig(size=20, hflip=0.5, jitter_p=0.0, gray_p=0.0, affine_p=1.0))
    torch.testing.assert_close(ident(x, _gen(5)), base(x, _gen(5)), atol=1e-6, rtol=0)
    on = AugmentConfig(size=20, jitter_p=0.0, gray_p=0.0, affine_p=0.5, degrees=15, shear=10, translate=0.1)
    p = BatchAugment(on).sample_params(4000, 28, 28, _gen(6))
    assert 0.45 < p["affine"].float().mean() < 0.55
    assert p["angle"].abs().max() <= 15 and p["angle"].abs().max() > 14.5 and abs(p["angle"].mean()) < 0.5
    assert p["shear"].abs().max() <= 10 and p["shift"].abs().max() <= 0.1 and p["shift"].abs().max() > 0.099
    views = BatchAugment(on)(x, _gen(7))
    assert views.shape == (16, 1, 20, 20) and views.min() >= 0 and views.max() <= 1
    with pytest.raises(EpisodicError, match="augment.affine_p is a probability"):
        AugmentConfig(affine_p=1.5)
    with pytest.raises(EpisodicError, match="augment.shear must be below 90"):
        AugmentConfig(shear=95)
    t = pil_transform(on)  # the torchvision path has the same step
    assert "RandomAffine" in repr(t) and t(Image.fromarray(x[0, 0].numpy(), "L")).shape == (1, 20, 20)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    x = _images(64, 3, 32, 32)
    aug = BatchAugment(AugmentConfig(blur_p=0.5, solarize_p=0.2))
    cpu = aug(x, _gen(14))
    gpu = aug(x.cuda(), _gen(14))
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-4, rtol=0)
    with pytest.raises(EpisodicError):
        aug(x.cuda(), torch.Generator(device="cuda"))
