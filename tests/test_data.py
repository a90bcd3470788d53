"""Dataset readers on small files written here in each real on-disk format."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from episodic.data.datasets import build_dataset, load_npz
from episodic.errors import EpisodicError


def _images(n: int, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_digits_split_is_fixed() -> None:
    s = build_dataset("digits", image_size=32)
    assert s.train.images.shape == (1257, 1, 32, 32) and s.test.images.shape == (540, 1, 32, 32)
    assert s.train.images.dtype == torch.uint8 and int(s.train.images.max()) == 255
    again = build_dataset("digits", image_size=32)
    assert torch.equal(s.train.labels, again.train.labels)
    assert set(s.train.labels.tolist()) == set(range(10))


def test_npz_roundtrip(tmp_path: Path) -> None:
    x = _images(6, 5, 4, 1)
    np.savez(tmp_path / "a.npz", images=x, labels=np.arange(6) % 2, classes=np.array(["u", "v"]))
    d = load_npz(tmp_path / "a.npz")
    assert d.images.shape == (6, 1, 5, 4) and d.classes == ["u", "v"]
    assert torch.equal(d.images[3, 0], torch.from_numpy(x[3, :, :, 0]))
    s = build_dataset("npz", root=str(tmp_path), train="a.npz", test="a.npz", image_size=8)
    assert s.train.images.shape == (6, 1, 8, 8)


def test_npz_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(EpisodicError, match="npz file not found at .*nope.npz"):
        load_npz(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(EpisodicError, match="cannot read npz file"):
        load_npz(tmp_path / "bad.npz")
    np.savez(tmp_path / "partial.npz", images=_images(2, 3, 3))
    with pytest.raises(EpisodicError, match=r"lacks arrays \['classes', 'labels'\]"):
        load_npz(tmp_path / "partial.npz")


def test_cifar10_pickle_batches(tmp_path: Path) -> None:
    base = tmp_path / "cifar-10-batches-py"
    base.mkdir()
    expect = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x = _images(3, 32, 32, seed=i)
        expect.append(x)
        flat = x.transpose(0, 3, 1, 2).reshape(3, -1)  # the official layout: 1024 R, 1024 G, 1024 B
        with open(base / name, "wb") as f:
            pickle.dump({"data": flat, "labels": [i % 10, (i + 1) % 10, (i + 2) % 10]}, f)
    with open(base / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{k}" for k in range(10)]}, f)
    s = build_dataset("cifar10", root=str(tmp_path))
    assert s.train.images.shape == (15, 3, 32, 32) and s.test.images.shape == (3, 3, 32, 32)
    assert torch.equal(s.train.images[4].permute(1, 2, 0), torch.from_numpy(expect[1][1]))
    assert s.train.labels[:4].tolist() == [0, 1, 2, 1] and s.train.classes[3] == "c3"


def test_cifar100_pickle(tmp_path: Path) -> None:
    base = tmp_path / "cifar-100-python"
    base.mkdir()
    for name in ["train", "test"]:
        with open(base / name, "wb") as f:
            pickle.dump(
                {
                    "data": _images(2, 32, 32).transpose(0, 3, 1, 2).reshape(2, -1),
                    "fine_labels": [5, 99],
                    "coarse_labels": [0, 1],
                },
                f,
            )
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [str(k) for k in range(100)]}, f)
    s = build_dataset("cifar100", root=str(tmp_path))
    assert s.train.labels.tolist() == [5, 99] and len(s.train.classes) == 100


def test_stl10_binary(tmp_path: Path) -> None:
    base = tmp_path / "stl10_binary"
    base.mkdir()
    x = _images(2, 96, 96)
    # STL-10 stores each image channel-first and column-major
    x.transpose(0, 3, 2, 1).tofile(base / "train_X.bin")
    np.array([1, 10], dtype=np.uint8).tofile(base / "train_y.bin")
    x.transpose(0, 3, 2, 1).tofile(base / "test_X.bin")
    np.array([3, 4], dtype=np.uint8).tofile(base / "test_y.bin")
    _images(3, 96, 96).transpose(0, 3, 2, 1).tofile(base / "unlabeled_X.bin")
    s = build_dataset("stl10", root=str(tmp_path))
    assert s.train.images.shape == (5, 3, 96, 96)
    assert s.train.labels.tolist() == [0, 9, -1, -1, -1]
    assert torch.equal(s.test.images[1].permute(1, 2, 0), torch.from_numpy(x[1]))


def test_imagefolder(tmp_path: Path) -> None:
    from PIL import Image

    for split in ["train", "test"]:
        for cls in ["cat", "dog"]:
            (tmp_path / split / cls).mkdir(parents=True)
            for k in range(2):
                Image.fromarray(_images(1, 20, 20, seed=k)[0]).save(tmp_path / split / cls / f"{k}.png")
    s = build_dataset("imagefolder", root=str(tmp_path), image_size=16)
    assert s.train.images.shape == (4, 3, 16, 16) and s.train.classes == ["cat", "dog"]
    assert s.test.labels.tolist() == [0, 0, 1, 1]


def test_missing_dataset_path_names_it(tmp_path: Path) -> None:
    with pytest.raises(EpisodicError, match="cifar-10-batches-py/ folder not found at"):
        build_dataset("cifar10", root=str(tmp_path / "missing"))
    with pytest.raises(EpisodicError, match="unknown dataset 'cifar11'"):
        build_dataset("cifar11")


def test_class_selection() -> None:
    s = build_dataset("digits")
    sub = s.train.with_classes([0, 3])
    assert set(sub.labels.tolist()) == {0, 3} and len(sub) == int(
        (s.train.labels == 0).sum() + (s.train.labels == 3).sum()
    )
    with pytest.raises(EpisodicError, match="class indices \\[12\\] do not exist"):
        s.train.with_classes([12])
