"""Few-shot benchmark datasets on small files written here in each real on-disk format."""

import importlib.util
import io
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from episodic.data.datasets import build_dataset
from episodic.data.fewshot_datasets import (
    CIFAR100_SUPERCLASSES,
    CIFAR_FS_SPLITS,
    FC100_SUPERCLASS_SPLITS,
    class_order,
    fc100_splits,
    holdout_split,
)
from episodic.errors import EpisodicError
from helpers import make_cfg

FINE = sorted(c for cs in CIFAR100_SUPERCLASSES.values() for c in cs)  # CIFAR-100's fine label order
HAS_L2L = importlib.util.find_spec("learn2learn") is not None


def test_class_lists() -> None:
    assert len(FINE) == len(set(FINE)) == 100 and len(CIFAR100_SUPERCLASSES) == 20
    assert FINE[:3] == ["apple", "aquarium_fish", "baby"] and FINE[-1] == "worm"
    sizes = {s: len(CIFAR_FS_SPLITS[s]) for s in CIFAR_FS_SPLITS}
    assert sizes == {"train": 64, "val": 16, "test": 20}
    assert sorted(class_order(CIFAR_FS_SPLITS)) == FINE  # disjoint and covering
    assert {"whale", "woman", "rocket", "pickup_truck"} <= set(CIFAR_FS_SPLITS["test"])
    assert {"otter", "sea", "maple_tree", "tractor"} <= set(CIFAR_FS_SPLITS["val"])
    fc = fc100_splits()
    assert {s: len(fc[s]) for s in fc} == {"train": 60, "val": 20, "test": 20}
    assert sorted(class_order(fc)) == FINE
    coarse = list(CIFAR100_SUPERCLASSES)  # coarse label order of CIFAR-100
    idx = {s: sorted(coarse.index(c) for c in FC100_SUPERCLASS_SPLITS[s]) for s in FC100_SUPERCLASS_SPLITS}
    assert idx == {"train": [1, 2, 3, 4, 5, 6, 9, 10, 15, 17, 18, 19], "val": [8, 11, 13, 16], "test": [0, 7, 12, 14]}


def _cifar100_arrays(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random images whose pixel (0, 0) holds (fine label, row // 256, row % 256)."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(100), per_class)
    rng.shuffle(y)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    rows = np.arange(len(y))
    x[:, 0, 0] = np.stack([y, rows // 256, rows % 256], 1)
    return x, y


def _write_cifar100_pickles(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    out = {}
    for split, per_class in [("train", 3), ("test", 1)]:
        x, y = _cifar100_arrays(per_class, seed=len(split))
        out[split] = (x, y)
        with open(base / split, "wb") as f:  # the official layout: rows of 1024 R, 1024 G, 1024 B
            pickle.dump(
                {
                    "data": x.transpose(0, 3, 1, 2).reshape(len(x), -1),
                    "fine_labels": y.tolist(),
                    "coarse_labels": [0] * len(y),
                },
                f,
            )
    with open(base / "meta", "wb") as f:
        pickle.dump({"fine_label_names": FINE, "coarse_label_names": list(CIFAR100_SUPERCLASSES)}, f)
    return out


def _check_split(s, order: list[str], src: dict[str, tuple[np.ndarray, np.ndarray]], names: list[str]) -> None:
    assert s.train.classes == order and s.test.classes == order
    for part, (x, y) in [(s.train, src["train"]), (s.test, src["test"])]:
        assert len(part) == len(y) and part.images.shape[1:] == (3, 32, 32)
        # every image keeps its pixels and its class name: pixel (0,0,0) holds the source label
        rows = (part.images[:, 1, 0, 0].long() * 256 + part.images[:, 2, 0, 0].long()).numpy()
        assert sorted(rows.tolist()) == list(range(len(y)))  # every source image once
        assert np.array_equal(part.images.permute(0, 2, 3, 1).numpy(), x[rows])  # pixels untouched
        assert [order[k] for k in part.labels.tolist()] == [names[k] for k in y[rows]]


@pytest.mark.parametrize("name", ["cifar_fs", "fc100"])
def test_cifar_splits_from_pickles(tmp_path: Path, name: str) -> None:
    src = _write_cifar100_pickles(tmp_path)
    s = build_dataset(name, root=str(tmp_path))
    order = class_order(CIFAR_FS_SPLITS if name == "cifar_fs" else fc100_splits())
    _check_split(s, order, src, FINE)
    ntr = 64 if name == "cifar_fs" else 60
    assert int(s.train.labels.max()) == 99 and s.train.labels.bincount().tolist() == [3] * 100
    assert set(order[:ntr]) == set(CIFAR_FS_SPLITS["train"] if name == "cifar_fs" else fc100_splits()["train"])


def test_cifar_fs_from_npz_uses_names_not_indices(tmp_path: Path) -> None:
    # a user's own arrays with the classes listed in another order: mapping goes by name
    names = FINE[::-1]
    src = {}
    for split, per_class in [("train", 2), ("test", 1)]:
        x, y = _cifar100_arrays(per_class, seed=7 + per_class)
        src[split] = (x, y)
        np.savez(tmp_path / f"{split}.npz", images=x, labels=y, classes=np.array(names))
    s = build_dataset("cifar_fs", root=str(tmp_path), train_npz="train.npz", test_npz="test.npz")
    _check_split(s, class_order(CIFAR_FS_SPLITS), src, names)
    cfg = make_cfg("data=cifar_fs")
    assert list(cfg.data.ssl_classes) == list(range(64)) and list(cfg.data.fewshot_classes) == list(range(80, 100))
    test_names = {s.train.classes[k] for k in cfg.data.fewshot_classes}
    assert test_names == set(CIFAR_FS_SPLITS["test"])


def test_cifar_split_errors(tmp_path: Path) -> None:
    with pytest.raises(EpisodicError, match="cifar-100-python/ folder not found at"):
        build_dataset("fc100", root=str(tmp_path / "nowhere"))
    x, y = _cifar100_arrays(1, 0)
    np.savez(tmp_path / "a.npz", images=x, labels=y, classes=np.array([f"c{i}" for i in range(100)]))
    with pytest.raises(EpisodicError, match=r"cifar_fs: classes \['apple', 'aquarium_fish'.* are not in the source"):
        build_dataset("cifar_fs", root=str(tmp_path), train_npz="a.npz", test_npz="a.npz")
    with pytest.raises(EpisodicError, match="give both data.params.train_npz and data.params.test_npz"):
        build_dataset("cifar_fs", root=str(tmp_path), train_npz="a.npz")


def test_holdout_split_is_per_class_and_in_file_order() -> None:
    labels = np.array([0, 1, 0, 0, 1, 0, 0, 1, 0, 2])
    tr, te = holdout_split(labels, 1 / 3)
    # class 0 has 6 images -> last 2 to test; class 1 has 3 -> last 1; class 2 has 1 -> kept in train
    assert te.tolist() == [6, 7, 8] and tr.tolist() == [0, 1, 2, 3, 4, 5, 9]
    with pytest.raises(EpisodicError, match="holdout=0 is not allowed"):
        holdout_split(labels, 0)


# ------------------------------------------------------------------ learn2learn formats


def _write_mini(root: Path, per_class: int = 3, classes: tuple[int, ...] = (2, 1, 2)) -> list[tuple[int, str]]:
    """mini-imagenet-cache-<mode>.pkl files; pixel (0,0,0) of each image is its running id.
    Returns (global label, class name) per running id."""
    truth, rid = [], 0
    for mode, k in zip(["train", "validation", "test"], classes):
        n = k * per_class
        x = np.zeros((n, 84, 84, 3), dtype=np.uint8)
        order = np.random.default_rng(k).permutation(n)  # class members scattered in the file
        class_dict = {}
        for c in range(k):
            name = f"n{mode[:2]}{c:05d}"
            idxs = order[c * per_class : (c + 1) * per_class]
            class_dict[name] = idxs.tolist()
        labels = np.empty(n, dtype=np.int64)
        for c, idxs in enumerate(class_dict.values()):
            labels[idxs] = c
        offset = len({t[1] for t in truth})
        names = list(class_dict)
        for i in range(n):
            x[i, :, :, 0] = rid
            truth.append((offset + labels[i], names[labels[i]]))
            rid += 1
        with open(root / f"mini-imagenet-cache-{mode}.pkl", "wb") as f:
            pickle.dump({"image_data": x, "class_dict": class_dict}, f)
    return truth


def _write_tiered(root: Path) -> list[tuple[int, str]]:
    from PIL import Image

    base = root / "tiered-imagenet"
    base.mkdir(parents=True)
    truth, rid, offset = [], 0, 0
    for short, k in [("train", 2), ("val", 1), ("test", 2)]:
        labels = np.array([c for c in range(k) for _ in range(2)])[::-1].copy()
        pngs = []
        for _ in labels:
            buf = io.BytesIO()
            img = np.full((12, 12, 3), rid, dtype=np.uint8)
            Image.fromarray(img).save(buf, format="PNG")
            pngs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))  # Ren et al.'s list of byte arrays
            rid += 1
        names = [f"{short}-class{c}".encode() for c in range(k)]
        with open(base / f"{short}_images_png.pkl", "wb") as f:
            pickle.dump(pngs, f)
        with open(base / f"{short}_labels.pkl", "wb") as f:
            pickle.dump(
                {
                    "label_specific": labels,
                    "label_general": labels * 0,
                    "label_specific_str": names,
                    "label_general_str": [b"all"],
                },
                f,
            )
        truth += [(offset + int(c), names[c].decode()) for c in labels]
        offset += k
    return truth


def test_learn2learn_missing_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(
        EpisodicError,
        match=r"mini-ImageNet file not found at '.*mini-imagenet-cache-train\.pkl'; "
        r"set data.params.root",
    ):
        build_dataset("mini_imagenet", root=str(tmp_path))
    with pytest.raises(EpisodicError, match=r"tiered-ImageNet file not found at '.*tiered-imagenet/train_images_png"):
        build_dataset("tiered_imagenet", root=str(tmp_path))


def test_learn2learn_not_installed_is_one_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write_mini(tmp_path)
    _write_tiered(tmp_path)
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # import learn2learn -> ImportError
    for name, what in [("mini_imagenet", "mini-ImageNet"), ("tiered_imagenet", "tiered-ImageNet")]:
        with pytest.raises(
            EpisodicError, match=f"{what} is read with learn2learn, which is not installed .*pip install learn2learn"
        ):
            build_dataset(name, root=str(tmp_path))


def _check_l2l(s, truth: list[tuple[int, str]], test_ids: list[int]) -> None:
    n_classes = len({t[1] for t in truth})
    assert len(s.train.classes) == n_classes and s.train.classes == s.test.classes
    for part in (s.train, s.test):
        ids = part.images[:, 0, 0, 0].long().tolist()
        assert part.labels.tolist() == [truth[i][0] for i in ids]
        assert [part.classes[k] for k in part.labels.tolist()] == [truth[i][1] for i in ids]
    assert sorted(s.test.images[:, 0, 0, 0].long().tolist()) == sorted(test_ids)
    assert len(s.train) + len(s.test) == len(truth)


@pytest.mark.skipif(not HAS_L2L, reason="learn2learn is not installed")
def test_mini_imagenet_through_learn2learn(tmp_path: Path) -> None:
    truth = _write_mini(tmp_path)
    s = build_dataset("mini_imagenet", root=str(tmp_path), holdout=1 / 3)
    assert s.train.images.shape[1:] == (3, 84, 84) and s.train.images.dtype == torch.uint8
    # holdout 1/3 of 3 images per class: the last image of each class in file order goes to test
    last = {}
    for rid, (label, _) in enumerate(truth):
        last[label] = rid
    _check_l2l(s, truth, list(last.values()))
    assert s.train.classes[:2] == ["ntr00000", "ntr00001"] and s.train.classes[2] == "nva00000"
    small = build_dataset("mini_imagenet", root=str(tmp_path), holdout=1 / 3, image_size=21)
    assert small.train.images.shape[1:] == (3, 21, 21)


@pytest.mark.skipif(not HAS_L2L, reason="learn2learn is not installed")
def test_tiered_imagenet_through_learn2learn(tmp_path: Path) -> None:
    truth = _write_tiered(tmp_path)
    s = build_dataset("tiered_imagenet", root=str(tmp_path), holdout=0.5, decode_threads=2)
    assert s.train.images.shape[1:] == (3, 12, 12)
    assert s.train.classes == ["train-class0", "train-class1", "val-class0", "test-class0", "test-class1"]
    last = {}
    for rid, (label, _) in enumerate(truth):
        last[label] = rid
    _check_l2l(s, truth, list(last.values()))
