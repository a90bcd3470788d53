"""``python -m episodic.export``: the encoder as a plain state dict that torchvision's model loads strictly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from episodic.cli import run_or_fail
from episodic.engine import Trainer
from episodic.eval.features import load_encoders
from episodic.export import export
from episodic.models.backbones import Conv4
from helpers import TINY, make_cfg, run_cli

pytestmark = pytest.mark.usefixtures("one_thread")


def checkpoint_of(tmp_path: Path, *overrides: str) -> Path:
    """A real run checkpoint (``Trainer.save``) whose backbone has non-trivial BN statistics and affine terms."""
    resnet = any(o.startswith("backbone=resnet") for o in overrides)
    tiny = [o for o in TINY if not (resnet and o.startswith("backbone.params.width"))]
    trainer = Trainer(make_cfg(*tiny, *overrides), tmp_path)
    backbone = trainer.model.backbone
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in backbone.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.1, generator=g)
        backbone.train()
        for _ in range(2):  # moves running_mean / running_var away from 0 / 1
            backbone(torch.rand(4, int(trainer.cfg.data.channels), 32, 32, generator=g))
    trainer.step = 7
    return trainer.save("last.pt")


def export_cfg(ckpt: Path, out: Path, *overrides: str):  # type: ignore[no-untyped-def]
    return make_cfg(f"checkpoint={ckpt}", f"out={out}", *overrides, config="export")


def rgb_npz(folder: Path) -> list[str]:
    """Tiny 3-channel train/test ``.npz`` files (the shared format) and the overrides that read them."""
    g = np.random.default_rng(0)
    for split, n in (("train", 64), ("test", 20)):
        images = g.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        np.savez(folder / f"{split}.npz", images=images, labels=np.arange(n) % 4, classes=np.array(list("abcd")))
    return [
        "data=cifar10_npz",
        f"data.params.root={folder}",
        "data.params.train=train.npz",
        "data.params.test=test.npz",
    ]


def test_resnet18_export_loads_into_torchvision_strictly_with_the_same_features(tmp_path: Path) -> None:
    rgb = rgb_npz(tmp_path)
    ckpt = checkpoint_of(tmp_path / "run", "backbone=resnet18", "backbone.params.cifar_stem=false", *rgb)
    out = export(export_cfg(ckpt, tmp_path / "r18.pt"))
    sd = torch.load(out, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    model = torchvision.models.resnet18()
    model.load_state_dict(sd, strict=True)
    assert torch.count_nonzero(model.fc.weight) == 0 and model.fc.weight.shape == (1000, 512)
    model.fc = nn.Identity()
    ours = load_encoders(ckpt).trained.eval()
    x = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), ours(x), rtol=0, atol=0)
    # fc=none: backbone keys only, strict into a model whose fc is an identity
    sd2 = torch.load(export(export_cfg(ckpt, tmp_path / "r18_nofc.pt", "fc=none")), weights_only=True)
    bare = torchvision.models.resnet18()
    bare.fc = nn.Identity()
    bare.load_state_dict(sd2, strict=True)
    assert set(sd) - set(sd2) == {"fc.weight", "fc.bias"}


def test_cifar_stem_export_loads_after_the_printed_stem_swap(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = checkpoint_of(tmp_path, "backbone=resnet18")  # digits: 1 channel, CIFAR stem
    out = export(export_cfg(ckpt, tmp_path / "r18c.pt"))
    printed = capsys.readouterr().out
    assert "m.conv1 = torch.nn.Conv2d(1, 64, 3, 1, 1, bias=False)" in printed
    assert "m.maxpool = torch.nn.Identity()" in printed
    sd = torch.load(out, weights_only=True)
    with pytest.raises(RuntimeError):
        torchvision.models.resnet18().load_state_dict(sd, strict=True)
    m = torchvision.models.resnet18()
    m.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    m.maxpool = nn.Identity()
    m.load_state_dict(sd, strict=True)
    m.fc = nn.Identity()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(m.eval()(x), load_encoders(ckpt).trained(x), rtol=0, atol=0)


def test_conv4_export_is_the_backbone_state_dict_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = checkpoint_of(tmp_path)
    p = run_cli("episodic.export", f"checkpoint={ckpt}", f"out={tmp_path / 'c4.pt'}")
    assert p.returncode == 0, p.stderr
    assert "conv4 has no torchvision counterpart" in p.stdout
    assert "Conv4(in_channels=1, width=16, depth=4)" in p.stdout
    net = Conv4(in_channels=1, width=16, depth=4)
    net.load_state_dict(torch.load(tmp_path / "c4.pt", weights_only=True), strict=True)
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), load_encoders(ckpt).trained(x), rtol=0, atol=0)
    with pytest.raises(SystemExit) as e:
        run_or_fail(lambda: export(export_cfg(ckpt, tmp_path / "x.pt", "backbone=resnet50")))
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "holds a conv4(" in err[0] and "not resnet50" in err[0]
    assert not (tmp_path / "x.pt").exists()
