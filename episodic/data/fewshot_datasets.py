"""Few-shot benchmark datasets: CIFAR-FS, FC100, mini-ImageNet and tiered-ImageNet as :class:`Splits`.

Every builder returns one class list ordered **meta-train classes, then meta-validation, then
meta-test**, shared by both splits, and divides each class's images into ``train`` (used for
self-supervised training and to fit the linear probe) and ``test`` (linear-probe accuracy). The data
configs then select the meta-train classes for training (``ssl_classes``) and the meta-test classes
for the few-shot evaluation (``fewshot_classes``), which uses all images of those classes:

==================  =====================  ===========  ==========================================
dataset             classes (train/val/test) image size  per-class train/test division
==================  =====================  ===========  ==========================================
``cifar_fs``        64 / 16 / 20           32           CIFAR-100's own (500 / 100)
``fc100``           60 / 20 / 20           32           CIFAR-100's own (500 / 100)
``mini_imagenet``   64 / 16 / 20           84           last ``holdout`` share of each class -> test
``tiered_imagenet`` 351 / 97 / 160         84           last ``holdout`` share of each class -> test
==================  =====================  ===========  ==========================================

CIFAR-FS (Bertinetto et al., 2019) and FC100 (Oreshkin et al., 2018) are class splits of CIFAR-100,
built here from a CIFAR-100 copy: the python-pickle folder ``root/cifar-100-python`` (the official
format) or, with ``train_npz``/``test_npz``, two ``.npz`` files read by the same path as a user's
own arrays (:func:`~episodic.data.datasets.load_npz`: uint8 NHWC ``images``, ``labels``,
``classes`` holding CIFAR-100's fine label names). CIFAR-FS uses the class lists of its authors'
release (also torchmeta's); FC100 splits by superclass: 12 / 4 / 4 superclasses of 5 classes.

mini-ImageNet (Vinyals et al., 2016; Ravi & Larochelle split) and tiered-ImageNet (Ren et al.,
2018) are read by learn2learn's dataset classes from a local ``root`` in learn2learn's on-disk
format (nothing is downloaded): ``root/mini-imagenet-cache-{train,validation,test}.pkl`` and
``root/tiered-imagenet/{train,val,test}_{images_png,labels}.pkl``. learn2learn is imported only
when one of these is built; a missing package or file ends in one clear error line.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import pickle
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from episodic.data.datasets import DATASETS, ArrayDataset, Source, Splits, check_size, from_nhwc, load_npz, resize_uint8
from episodic.errors import EpisodicError, check

__all__ = [
    "CIFAR100_SUPERCLASSES",
    "CIFAR_FS_SPLITS",
    "FC100",
    "FC100_SUPERCLASS_SPLITS",
    "CifarFS",
    "class_order",
    "fc100_splits",
    "mini_imagenet",
    "relabel",
    "tiered_imagenet",
]

SPLIT_NAMES = ("train", "val", "test")

#: CIFAR-100's 20 superclasses (coarse labels, in index order) and their 5 fine classes each.
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}

_CIFAR_FS_VAL = (
    "beaver",
    "otter",
    "flatfish",
    "shark",
    "lamp",
    "television",
    "beetle",
    "butterfly",
    "sea",
    "camel",
    "cattle",
    "crab",
    "crocodile",
    "maple_tree",
    "motorcycle",
    "tractor",
)
_CIFAR_FS_TEST = (
    "whale",
    "poppy",
    "rose",
    "sweet_pepper",
    "telephone",
    "bed",
    "table",
    "wardrobe",
    "leopard",
    "plain",
    "chimpanzee",
    "fox",
    "snail",
    "worm",
    "baby",
    "man",
    "woman",
    "bicycle",
    "pickup_truck",
    "rocket",
)

#: CIFAR-FS classes per split (Bertinetto et al., 2019), each in CIFAR-100's alphabetical order.
CIFAR_FS_SPLITS: dict[str, tuple[str, ...]] = {
    "train": tuple(
        sorted(
            c for cs in CIFAR100_SUPERCLASSES.values() for c in cs if c not in _CIFAR_FS_VAL and c not in _CIFAR_FS_TEST
        )
    ),
    "val": tuple(sorted(_CIFAR_FS_VAL)),
    "test": tuple(sorted(_CIFAR_FS_TEST)),
}

#: FC100 superclasses per split (Oreshkin et al., 2018; coarse labels {1,2,3,4,5,6,9,10,15,17,18,19} /
#: {8,11,13,16} / {0,7,12,14}).
FC100_SUPERCLASS_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "fish",
        "flowers",
        "food_containers",
        "fruit_and_vegetables",
        "household_electrical_devices",
        "household_furniture",
        "large_man-made_outdoor_things",
        "large_natural_outdoor_scenes",
        "reptiles",
        "trees",
        "vehicles_1",
        "vehicles_2",
    ),
    "val": ("large_carnivores", "large_omnivores_and_herbivores", "non-insect_invertebrates", "small_mammals"),
    "test": ("aquatic_mammals", "insects", "medium_mammals", "people"),
}


def fc100_splits() -> dict[str, tuple[str, ...]]:
    """FC100's fine classes per split: the 5 classes of each superclass, superclasses in split order."""
    return {s: tuple(c for sc in FC100_SUPERCLASS_SPLITS[s] for c in CIFAR100_SUPERCLASSES[sc]) for s in SPLIT_NAMES}


def class_order(splits: Mapping[str, Sequence[str]]) -> list[str]:
    """One class list: meta-train classes, then meta-val, then meta-test."""
    order = [c for s in SPLIT_NAMES for c in splits[s]]
    check(len(set(order)) == len(order), "a class is listed in more than one split")
    return order


def relabel(data: ArrayDataset, order: Sequence[str], what: str) -> ArrayDataset:
    """Keep the images whose class is in ``order`` and relabel them ``order.index(class)``."""
    have = {name: i for i, name in enumerate(data.classes)}
    missing = [c for c in order if c not in have]
    check(
        not missing,
        f"{what}: classes {missing[:5]}{' ...' if len(missing) > 5 else ''} are not in the "
        f"source's class names (expected CIFAR-100 fine label names such as 'apple')",
    )
    lut = torch.full((len(data.classes),), -1, dtype=torch.long)
    for new, name in enumerate(order):
        lut[have[name]] = new
    new_labels = lut[data.labels]
    keep = (new_labels >= 0).nonzero().squeeze(1)
    return ArrayDataset(data.images[keep], new_labels[keep], list(order))


def _cifar100_source(root: str, download: bool, train_npz: str | None, test_npz: str | None) -> Splits:
    """CIFAR-100 with fine labels: two ``.npz`` files (relative to ``root``) or the pickle folder."""
    if train_npz or test_npz:
        if not (train_npz and test_npz):
            raise EpisodicError("give both data.params.train_npz and data.params.test_npz (or neither)")
        base = Path(root).expanduser()
        return Splits(load_npz(base / train_npz), load_npz(base / test_npz))
    from episodic.data.datasets import cifar100

    return cifar100(root=root, download=download)


def _cifar_split(
    name: str,
    splits: Mapping[str, Sequence[str]],
    root: str,
    download: bool,
    train_npz: str | None,
    test_npz: str | None,
) -> Splits:
    src = _cifar100_source(root, download, train_npz, test_npz)
    order = class_order(splits)
    return Splits(relabel(src.train, order, name), relabel(src.test, order, name))


class _Cifar100Split(Source):
    """A few-shot split of CIFAR-100: the pickle folder under ``root``, or two ``.npz`` files."""

    def __init__(
        self, root: str = "data", download: bool = False, train_npz: str | None = None, test_npz: str | None = None
    ) -> None:
        check(
            bool(train_npz) == bool(test_npz),
            "give both data.params.train_npz and data.params.test_npz (or neither)",
        )
        self.root, self.download, self.train_npz, self.test_npz = root, download, train_npz, test_npz

    def splits(self) -> Mapping[str, Sequence[str]]:
        raise NotImplementedError

    def load(self) -> Splits:
        return _cifar_split(self.name, self.splits(), self.root, self.download, self.train_npz, self.test_npz)


@DATASETS.register("cifar_fs")
class CifarFS(_Cifar100Split):
    """CIFAR-FS: classes 0-63 meta-train, 64-79 meta-val, 80-99 meta-test; CIFAR-100's train/test images."""

    def splits(self) -> Mapping[str, Sequence[str]]:
        return CIFAR_FS_SPLITS


@DATASETS.register("fc100")
class FC100(_Cifar100Split):
    """FC100: classes 0-59 meta-train, 60-79 meta-val, 80-99 meta-test; CIFAR-100's train/test images."""

    def splits(self) -> Mapping[str, Sequence[str]]:
        return fc100_splits()


# ----------------------------------------------------------------------------------------------
# learn2learn-format benchmarks
# ----------------------------------------------------------------------------------------------

_L2L_MODES = ("train", "validation", "test")


def _learn2learn_datasets(what: str) -> Any:
    """``learn2learn.vision.datasets``, imported on first use (its gym import's deprecation banner on
    stderr is swallowed)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return importlib.import_module("learn2learn.vision.datasets")
    except ImportError as e:
        raise EpisodicError(
            f"{what} is read with learn2learn, which is not installed ({e}); install it with "
            f"'pip install learn2learn' (or scripts/install_learn2learn.sh on Python 3.11+)"
        ) from None


def _need_files(paths: Sequence[Path], what: str, layout: str) -> None:
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise EpisodicError(
            f"{what} file not found at '{missing[0]}'; set data.params.root to the folder that "
            f"holds {layout} (learn2learn's format)"
        )


def holdout_split(labels: np.ndarray, holdout: float) -> tuple[np.ndarray, np.ndarray]:
    """Per class (in file order), the last ``round(holdout * n)`` images (at least 1 if ``n > 1``) go to
    test, the rest to train; returns the two index arrays, each in file order."""
    check(0.0 < holdout < 1.0, f"holdout={holdout!r} is not allowed; use a share in (0, 1), e.g. 0.1667")
    test_mask = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = min(len(idx) - 1, max(1, round(holdout * len(idx)))) if len(idx) > 1 else 0
        if k:
            test_mask[idx[len(idx) - k :]] = True
    return np.flatnonzero(~test_mask), np.flatnonzero(test_mask)


def _assemble(parts: list[tuple[np.ndarray, np.ndarray, list[str]]], holdout: float, image_size: int | None) -> Splits:
    """Stack per-mode ``(images NHWC, labels 0..K-1, names)`` with offsets, then divide per class."""
    images: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    names: list[str] = []
    for x, y, n in parts:
        labels.append(np.asarray(y, dtype=np.int64) + len(names))
        images.append(x)
        names += n
    x_all, y_all = np.concatenate(images), np.concatenate(labels)
    tr, te = holdout_split(y_all, holdout)
    full = from_nhwc(x_all, y_all, names)
    full = ArrayDataset(resize_uint8(full.images, image_size), full.labels, full.classes)
    return Splits(full.select(torch.from_numpy(tr)), full.select(torch.from_numpy(te)))


def _check_holdout(holdout: float, image_size: int | None) -> None:
    check(0.0 < holdout < 1.0, f"data.params.holdout={holdout!r} is not allowed; use a share in (0, 1), e.g. 0.1667")
    check_size(image_size)


@DATASETS.register("mini_imagenet")
class MiniImagenet(Source):
    """mini-ImageNet through ``learn2learn.vision.datasets.MiniImagenet`` (100 classes x 600, 84x84)."""

    def __init__(self, root: str = "data", holdout: float = 1 / 6, image_size: int | None = None) -> None:
        _check_holdout(holdout, image_size)
        self.root, self.holdout, self.image_size = root, holdout, image_size

    def load(self) -> Splits:
        return mini_imagenet(self.root, self.holdout, self.image_size)


def mini_imagenet(root: str, holdout: float, image_size: int | None) -> Splits:
    """The splits :class:`MiniImagenet` describes."""
    base = Path(root).expanduser()
    files = [base / f"mini-imagenet-cache-{m}.pkl" for m in _L2L_MODES]
    _need_files(files, "mini-ImageNet", "mini-imagenet-cache-{train,validation,test}.pkl")
    l2l = _learn2learn_datasets("mini-ImageNet")
    parts = []
    for mode in _L2L_MODES:
        ds = l2l.MiniImagenet(root=str(base), mode=mode)
        x = np.asarray(ds.data["image_data"], dtype=np.uint8)
        del ds.x  # learn2learn's float32 copy; the uint8 array above is what we keep
        names = [str(c) for c in ds.data["class_dict"]]  # learn2learn's class index = key order
        y = np.full(len(x), -1, dtype=np.int64)
        for i, idxs in enumerate(ds.data["class_dict"].values()):
            y[np.asarray(idxs, dtype=np.int64)] = i
        check(bool((y >= 0).all()), f"mini-imagenet-cache-{mode}.pkl: some images belong to no class in class_dict")
        parts.append((x, y, names))
    return _assemble(parts, holdout, image_size)


def _decode_png(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))


@DATASETS.register("tiered_imagenet")
class TieredImagenet(Source):
    """tiered-ImageNet through ``learn2learn.vision.datasets.TieredImagenet`` (608 classes, 84x84 PNGs
    decoded once into memory: about 16.5 GB for the three splits)."""

    def __init__(
        self, root: str = "data", holdout: float = 1 / 6, image_size: int | None = None, decode_threads: int = 4
    ) -> None:
        _check_holdout(holdout, image_size)
        check(decode_threads >= 1, f"data.params.decode_threads={decode_threads} is not allowed; use an integer >= 1")
        self.root, self.holdout, self.image_size, self.decode_threads = root, holdout, image_size, decode_threads

    def load(self) -> Splits:
        return tiered_imagenet(self.root, self.holdout, self.image_size, self.decode_threads)


def tiered_imagenet(root: str, holdout: float, image_size: int | None, decode_threads: int) -> Splits:
    """The splits :class:`TieredImagenet` describes."""
    base = Path(root).expanduser()
    short = {"train": "train", "validation": "val", "test": "test"}
    files = [
        base / "tiered-imagenet" / f"{short[m]}_{kind}.pkl" for m in _L2L_MODES for kind in ("images_png", "labels")
    ]
    _need_files(files, "tiered-ImageNet", "tiered-imagenet/{train,val,test}_{images_png,labels}.pkl")
    l2l = _learn2learn_datasets("tiered-ImageNet")
    parts = []
    for mode in _L2L_MODES:
        ds = l2l.TieredImagenet(root=str(base), mode=mode)
        with ThreadPoolExecutor(max(1, int(decode_threads))) as pool:
            x = np.stack(list(pool.map(_decode_png, ds.images, chunksize=256)))
        y = np.asarray(ds.labels, dtype=np.int64)
        with open(base / "tiered-imagenet" / f"{short[mode]}_labels.pkl", "rb") as f:
            meta = pickle.load(f, encoding="latin1")
        k = int(y.max()) + 1 if len(y) else 0
        strs = meta.get("label_specific_str") if isinstance(meta, dict) else None
        if strs is not None and len(strs) == k:
            names = [s.decode() if isinstance(s, bytes) else str(s) for s in strs]
        else:
            names = [f"{mode}_{i}" for i in range(k)]
        parts.append((x, y, names))
    return _assemble(parts, holdout, image_size)
