"""Frozen-encoder features, and what every evaluation needs from a checkpoint.

* :func:`extract_features`: backbone output ``[N, d]`` of uint8 images (eval mode, no augmentation).
* :func:`cached_features`: the same, stored once per (checkpoint, weights, images) under a cache folder.
* :func:`load_encoders`: the trained backbone of a checkpoint and its random-init twin (built from the
  checkpoint's own config and seed, i.e. exactly the trained encoder's starting point), with one-line
  errors for a missing or foreign checkpoint and for a backbone other than the one expected.
* :func:`get_split` / :func:`labelled`: a named split of a dataset (one-line error naming the splits that
  exist) and its labelled images (unlabelled images carry label ``-1``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from episodic import checkpoint
from episodic.config import as_dict
from episodic.data.datasets import ArrayDataset, Splits
from episodic.errors import EpisodicError, check

BACKBONE_PREFIX = "method.encoder.backbone."


@torch.no_grad()
def extract_features(
    backbone: nn.Module,
    images: Tensor,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    mean: list[float] | None = None,
    std: list[float] | None = None,
    on_device: bool = False,
) -> Tensor:
    """Backbone features ``[N, d]`` of uint8 ``images [N, C, H, W]`` (pixels scaled to [0, 1]), float32 on the
    CPU (``on_device``: on ``device``)."""
    was_training = backbone.training
    backbone.eval()
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i : i + batch_size].to(device).float().div_(255)
        if mean is not None and std is not None:
            m = torch.tensor(list(mean), device=device).view(1, -1, 1, 1)
            s = torch.tensor(list(std), device=device).view(1, -1, 1, 1)
            x = (x - m) / s
        if x.dim() == 4:  # NHWC, as the trainer runs (channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        z = backbone(x).float()
        out.append(z if on_device else z.cpu())
    backbone.train(was_training)
    return torch.cat(out) if out else torch.empty(0)


def _digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, Tensor):
            t = p.detach().cpu().contiguous()
            h.update(str((tuple(t.shape), str(t.dtype))).encode())
            flat = t.reshape(-1)
            flat = flat[:: max(1, flat.numel() >> 24)].contiguous()  # at most ~16M elements per tensor
            h.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def cached_features(
    backbone: nn.Module,
    images: Tensor,
    cache_dir: str | Path | None,
    device: str | torch.device = "cpu",
    mean: list[float] | None = None,
    std: list[float] | None = None,
    batch_size: int = 512,
) -> Tensor:
    """:func:`extract_features`, read from / written to ``cache_dir`` (no cache for ``None``).

    The file name hashes the backbone's weights and buffers, the images and the normalisation, so a
    changed checkpoint or dataset never reads stale features.
    """
    if cache_dir is None:
        return extract_features(backbone, images, batch_size, device, mean, std)
    key = _digest(*backbone.state_dict().values(), images, [list(mean or []), list(std or [])])
    path = Path(cache_dir) / f"features_{key}.pt"
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:
            pass
    feats = extract_features(backbone, images, batch_size, device, mean, std)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(feats, tmp)
    tmp.replace(path)
    return feats


def labelled(ds: ArrayDataset) -> ArrayDataset:
    """The images of ``ds`` with a label ``>= 0`` (drops STL-10's unlabelled ``-1`` images)."""
    keep = ds.labels >= 0
    return ds if bool(keep.all()) else ds.select(keep.nonzero().squeeze(1))


def split_names(data: Splits) -> list[str]:
    """The names of the dataset splits ``data`` holds (``train``, ``test``, and any others a loader adds)."""
    return [f.name for f in dataclasses.fields(data) if isinstance(getattr(data, f.name), ArrayDataset)]


def get_split(data: Splits, name: str, data_name: str = "this dataset") -> ArrayDataset:
    """Split ``name`` of ``data`` (``both`` = train + test); a one-line error naming the splits that exist."""
    names = split_names(data)
    if name == "both":
        return ArrayDataset.concat([data.train, data.test])
    ds = getattr(data, name, None) if name in names else None
    if ds is None or len(ds) == 0:
        raise EpisodicError(
            f"data {data_name!r} has no {'non-empty ' if name in names else ''}split {name!r}; "
            f"allowed: {', '.join(n for n in names if len(getattr(data, n)) > 0)}, both"
        )
    return ds


@dataclass
class Encoders:
    """A checkpoint's trained backbone, its random-init twin and where the run lives."""

    trained: nn.Module
    random_init: nn.Module
    config: DictConfig
    step: int
    path: Path

    @property
    def run_dir(self) -> Path:
        """``<run>/checkpoints/x.pt`` -> ``<run>``; a checkpoint elsewhere -> its own folder."""
        parent = self.path.resolve().parent
        return parent.parent if parent.name == "checkpoints" else parent

    @property
    def backbone_name(self) -> str:
        return str(self.config.backbone.name)


def backbone_state(model_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The backbone's entries of a model state dict, prefix removed (``module.`` wrappers too)."""
    out = {}
    for k, v in model_state.items():
        k = k[len("module.") :] if k.startswith("module.") else k
        if k.startswith(BACKBONE_PREFIX):
            out[k[len(BACKBONE_PREFIX) :]] = v
    return out


def describe_backbone(cfg: DictConfig) -> str:
    """``conv4(width=64, depth=4; 1-channel input)``: a run config's backbone in one phrase."""
    extra = ", ".join(f"{k}={v}" for k, v in as_dict(cfg.backbone.get("params")).items())
    return f"{cfg.backbone.name}({extra}; {cfg.data.channels}-channel input)"


def checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file as given, or for a run folder (or its ``checkpoints/``) its newest valid one."""
    path = Path(path).expanduser()
    if path.is_dir():
        found = checkpoint.newest_valid(path)
        if found is None:
            raise EpisodicError(
                f"checkpoint={path} is a folder with no valid checkpoint; give a .pt file a run "
                "wrote, or a run folder that holds checkpoints/"
            )
        return found[0]
    return path


def load_encoders(path: str | Path, device: str | torch.device = "cpu", expect: DictConfig | None = None) -> Encoders:
    """Trained and random-init backbones of checkpoint ``path`` (eval mode, on ``device``).

    ``expect`` (a ``backbone`` config node, optional) names the backbone the caller wants; a
    checkpoint holding another architecture is refused with one line.
    """
    from episodic.model import build_model

    path = checkpoint_path(path)
    state = checkpoint.load(path)
    check(
        "config" in state and "model" in state,
        f"checkpoint '{path}' has no model config; give a checkpoint written by episodic.train",
    )
    cfg = OmegaConf.create(state["config"])
    if expect is not None:
        check(
            expect.name == cfg.backbone.name,
            f"checkpoint '{path}' holds a {describe_backbone(cfg)} backbone, not {expect.name}; "
            f"give a {expect.name} checkpoint or drop backbone={expect.name}",
        )
    trained = build_model(cfg).backbone
    random_init = build_model(cfg).backbone
    weights = backbone_state(state["model"])
    check(bool(weights), f"checkpoint '{path}' holds no encoder backbone weights")
    try:
        trained.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        detail = first[1].strip() if len(first) > 1 else first[0]
        raise EpisodicError(f"checkpoint '{path}' does not fit a {describe_backbone(cfg)} backbone: {detail}") from None
    return Encoders(trained.to(device).eval(), random_init.to(device).eval(), cfg, int(state.get("step", 0)), path)
