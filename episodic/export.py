"""``python -m episodic.export checkpoint=PATH out=FILE``: the trained encoder as a plain state dict.

For ``resnet18`` / ``resnet50`` the file holds torchvision's parameter names and loads with
``strict=True``::

    model = torchvision.models.resnet18()
    model.load_state_dict(torch.load("encoder.pt"))        # strict by default
    model.fc = torch.nn.Identity()                         # backbone features, as in training

torchvision's model has a classifier ``fc`` that the encoder never trained; with ``fc: zeros`` (the
default) the file carries an all-zero ``fc`` of ``num_classes`` outputs so the strict load succeeds
(replace it, or set ``fc = Identity()``); ``fc: none`` leaves it out (then load into a model whose
``fc`` is ``nn.Identity()``). A backbone trained with the CIFAR stem (3x3 stride-1 ``conv1``, no
max-pool) or on other than 3-channel images has a different ``conv1``; the command prints the two
lines that give torchvision's model that stem before loading.

``conv4`` and ``resnet_tiny`` have no torchvision counterpart: the file is the episodic backbone's
own state dict (``episodic.models.backbones.Conv4`` / ``ResNetTiny``), and the command says so.
``backbone=NAME`` refuses a checkpoint of another backbone (one line, exit code 2).
"""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig
from torch import Tensor

from episodic import checkpoint
from episodic.cli import CONFIG_DIR, run_or_fail, validate_overrides
from episodic.config import as_dict
from episodic.errors import EpisodicError, check
from episodic.files import io_error, writable_file
from episodic.models.backbones import TorchvisionResNet

TORCHVISION_ARCHS = ("resnet18", "resnet50")


def export_state(backbone: torch.nn.Module, name: str, fc: str = "zeros", num_classes: int = 1000) -> dict[str, Tensor]:
    """The state dict to write for ``backbone`` (registry name ``name``); see the module docstring."""
    check(fc in ("zeros", "none"), f"fc={fc!r} is not allowed; use zeros or none")
    check(num_classes >= 1, f"num_classes={num_classes} is not allowed; use an integer >= 1")
    if name in TORCHVISION_ARCHS and isinstance(backbone, TorchvisionResNet):
        sd = {k: v.detach().cpu().clone() for k, v in backbone.torchvision_state_dict().items()}
        if fc == "zeros":
            dim = int(backbone.feat_dim)
            sd["fc.weight"] = torch.zeros(num_classes, dim, dtype=sd["conv1.weight"].dtype)
            sd["fc.bias"] = torch.zeros(num_classes, dtype=sd["conv1.weight"].dtype)
        return sd
    return {k: v.detach().cpu().clone() for k, v in backbone.state_dict().items()}


def load_instructions(name: str, cfg: DictConfig, sd: dict[str, Tensor], out: Path) -> str:
    """How to load the written file, as the lines printed after the export."""
    if name not in TORCHVISION_ARCHS:
        kw = [f"{k}={v!r}" for k, v in as_dict(cfg.backbone.get("params")).items()]
        args = ", ".join([f"in_channels={cfg.data.channels}"] + kw)
        cls = {"conv4": "Conv4", "resnet_tiny": "ResNetTiny"}.get(name, name)
        return (
            f"{name} has no torchvision counterpart: wrote the episodic backbone's own state dict. "
            f"Load it with\n"
            f"  from episodic.models.backbones import {cls}\n"
            f"  net = {cls}({args}); net.load_state_dict(torch.load({str(out)!r}))"
        )
    lines = [f"loads into torchvision.models.{name}() with strict=True:", f"  m = torchvision.models.{name}()"]
    w = sd["conv1.weight"]
    if tuple(w.shape) != (64, 3, 7, 7):
        k = w.shape[-1]
        stride, pad = (1, 1) if k == 3 else (2, 3)
        lines.append(
            f"  m.conv1 = torch.nn.Conv2d({w.shape[1]}, 64, {k}, {stride}, {pad}, bias=False)  # this encoder's stem"
        )
        if bool(cfg.backbone.get("params", {}).get("cifar_stem", False)):
            lines.append("  m.maxpool = torch.nn.Identity()")
    if "fc.weight" not in sd:
        lines.append("  m.fc = torch.nn.Identity()  # before loading: the file has no fc")
    lines.append(f"  m.load_state_dict(torch.load({str(out)!r}))")
    if "fc.weight" in sd:
        lines.append("  m.fc = torch.nn.Identity()  # the fc in the file is all zeros: drop it for features")
    return "\n".join(lines)


def _is_checkpoint(path: Path) -> bool:
    try:
        checkpoint.load(path)
    except EpisodicError:
        return False
    return True


def check_export(cfg: DictConfig) -> Path:
    """The output is safe to write, before anything is read: not a folder, not the checkpoint, not an
    existing file unless ``overwrite=true`` (and never a training checkpoint), in a writable folder."""
    out = Path(str(cfg.out)).expanduser()
    writable_file(out, "out", bool(cfg.overwrite), inputs=(Path(str(cfg.checkpoint)).expanduser(),))
    if out.exists() and checkpoint.intact(out) and _is_checkpoint(out):
        raise EpisodicError(f"out={out} is a training checkpoint; export never replaces one, choose another file")
    return out


def export(cfg: DictConfig) -> Path:
    """Write the backbone of ``cfg.checkpoint`` to ``cfg.out`` (see the module docstring); the path."""
    from episodic.eval.features import load_encoders

    out = check_export(cfg)
    enc = load_encoders(cfg.checkpoint, "cpu", cfg.get("backbone"))
    name = enc.backbone_name
    sd = export_state(enc.trained, name, str(cfg.fc), int(cfg.num_classes))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        torch.save(sd, tmp)
        os.replace(tmp, out)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise EpisodicError(f"cannot write out={out}: {io_error(e)}") from None
    n_params = sum(
        v.numel() for k, v in sd.items() if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )
    print(
        f"wrote the {name} encoder of '{cfg.checkpoint}' (step {enc.step}, {len(sd)} tensors, "
        f"{n_params:,} parameters) to {out}"
    )
    print(load_instructions(name, enc.config, sd, out))
    return out


@hydra.main(config_path=str(CONFIG_DIR), config_name="export", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run_or_fail(lambda: export(cfg))


def main() -> None:
    validate_overrides("export", sys.argv[1:], check_export)
    _hydra_main()


if __name__ == "__main__":
    main()
