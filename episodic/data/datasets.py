"""Datasets as in-memory uint8 arrays, and the builders that load them from disk.

Every builder returns :class:`Splits` (``train`` and ``test``), each an :class:`ArrayDataset`:
``images`` uint8 ``[N, C, H, W]``, ``labels`` int64 ``[N]`` and ``classes`` (names). Labels are
only used by evaluation; training sees images alone.

Formats read here (the real on-disk formats, no download needed when the files are present):

- ``digits``: scikit-learn's 8x8 handwritten digits (1,797 images, shipped with scikit-learn),
  upsampled to ``image_size``; a fixed stratified 70/30 train/test split.
- ``npz``: ``np.savez`` files with uint8 NHWC ``images``, int64 ``labels`` and ``classes``
  (the format of ``shared/data``).
- ``cifar10`` / ``cifar100``: the python-pickle batches (``cifar-10-batches-py``,
  ``cifar-100-python``); ``download=true`` fetches them with torchvision first.
- ``stl10``: the binary ``stl10_binary`` files (``train``/``test``/``unlabeled``).
- ``imagefolder``: ``root/train/<class>/*.png|jpg`` and ``root/test/<class>/...``, resized.
"""

from __future__ import annotations

import pickle
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from episodic.errors import EpisodicError, check
from episodic.registry import Registry

DATASETS: Registry[type[Source]] = Registry("dataset", "episodic.data")


@dataclass
class ArrayDataset:
    """Images ``uint8 [N, C, H, W]`` with integer labels and class names."""

    images: Tensor
    labels: Tensor
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    def select(self, index: Tensor) -> ArrayDataset:
        return ArrayDataset(self.images[index], self.labels[index], self.classes)

    def with_classes(self, keep: Sequence[int] | None) -> ArrayDataset:
        """The images whose label is in ``keep`` (all of them for ``None``); labels are kept as is."""
        if keep is None:
            return self
        bad = [k for k in keep if not 0 <= int(k) < len(self.classes)]
        check(not bad, f"class indices {bad} do not exist; this dataset has classes 0..{len(self.classes) - 1}")
        mask = torch.isin(self.labels, torch.as_tensor(list(keep), dtype=torch.long))
        return self.select(mask.nonzero().squeeze(1))

    @staticmethod
    def concat(parts: Sequence[ArrayDataset]) -> ArrayDataset:
        return ArrayDataset(
            torch.cat([p.images for p in parts]), torch.cat([p.labels for p in parts]), parts[0].classes
        )


@dataclass
class Splits:
    train: ArrayDataset
    test: ArrayDataset


def from_nhwc(images: np.ndarray, labels: np.ndarray, classes: Sequence[str]) -> ArrayDataset:
    """Wrap NHWC (or NHW) uint8 numpy arrays as an :class:`ArrayDataset`."""
    x = torch.from_numpy(np.ascontiguousarray(images))
    if x.ndim == 3:
        x = x.unsqueeze(-1)
    check(x.dtype == torch.uint8 and x.ndim == 4, f"images must be uint8 NHWC, got {x.dtype} {tuple(x.shape)}")
    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    check(y.ndim == 1 and len(y) == len(x), f"{len(x)} images but {len(y)} labels; every image needs one label")
    names = [str(c) for c in classes]
    bad = y[(y < -1) | (y >= len(names))]
    check(
        not len(bad),
        f"label {int(bad[0]) if len(bad) else 0} is outside the {len(names)} classes "
        f"(0..{len(names) - 1}, or -1 for unlabelled)",
    )
    return ArrayDataset(x.permute(0, 3, 1, 2).contiguous(), y, names)


def check_size(size: int | None, key: str = "data.params.image_size", low: int = 1) -> None:
    """An image size parameter: null (keep the files' size) or an integer >= ``low``."""
    check(
        size is None or (isinstance(size, int) and size >= low),
        f"{key}={size!r} is not allowed; use null or an integer >= {low}",
    )


def resize_uint8(images: Tensor, size: int | None) -> Tensor:
    """Bilinear (antialiased) resize of uint8 ``[N, C, H, W]`` to ``size x size``."""
    if size is None or images.shape[-2:] == (size, size):
        return images
    out = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out.round().clamp(0, 255).to(torch.uint8)


def _need(path: Path, what: str) -> Path:
    if not path.exists():
        raise EpisodicError(
            f"{what} not found at '{path}'; set data.params.root to the folder that holds it "
            f"(or data.params.download=true where the dataset supports it and the machine is online)"
        )
    return path


def fetch(what: str, root: Path, download: Callable[[], object]) -> None:
    """Run torchvision's ``download``; failing (offline, a server error) is one line saying where the
    files should be put instead."""
    try:
        download()
    except Exception as e:
        raise EpisodicError(
            f"data.params.download=true could not fetch {what} into '{root}' ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'no detail'}); put the files there yourself, or point "
            "data.params.root at the folder that holds them"
        ) from None


class Source:
    """A dataset: the constructor checks the parameters (``data.params``) and reads nothing; :meth:`load`
    reads the files. So a run's data settings are checked before anything is read."""

    name: ClassVar[str] = ""  # the registry name, set by ``DATASETS.register``

    def load(self) -> Splits:
        raise NotImplementedError


@DATASETS.register("digits")
class Digits(Source):
    """scikit-learn's digits: 1,797 8x8 images (0..16) -> uint8, upsampled; fixed 70/30 split.
    ``channels=3`` repeats the gray channel (RGB backbones and pipelines, offline)."""

    def __init__(self, image_size: int = 32, channels: int = 1) -> None:
        check(
            isinstance(image_size, int) and image_size >= 8,
            f"data.params.image_size={image_size!r} is not allowed; use an integer >= 8 (the digits are 8x8)",
        )
        check(channels in (1, 3), f"data.params.channels={channels!r} is not allowed; use 1 or 3")
        self.image_size, self.channels = image_size, channels

    def load(self) -> Splits:
        return digits(self.image_size, self.channels)


def digits(image_size: int = 32, channels: int = 1) -> Splits:
    """The digits at ``image_size`` with ``channels`` (see :class:`Digits`)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round().astype(np.uint8)).unsqueeze(1)
    x = resize_uint8(x, image_size).expand(-1, channels, -1, -1).contiguous()
    y = torch.from_numpy(d.target).long()
    idx_train, idx_test = train_test_split(np.arange(len(y)), test_size=0.3, random_state=0, stratify=d.target)
    names = [str(i) for i in range(10)]
    full = ArrayDataset(x, y, names)
    return Splits(full.select(torch.from_numpy(idx_train)), full.select(torch.from_numpy(idx_test)))


def load_npz(path: str | Path) -> ArrayDataset:
    """Read an ``.npz`` with uint8 NHWC ``images``, ``labels`` and ``classes``."""
    p = _need(Path(path).expanduser(), "npz file")
    try:
        with np.load(p, allow_pickle=False) as f:
            missing = {"images", "labels", "classes"} - set(f.files)
            check(not missing, f"{p} lacks arrays {sorted(missing)}; expected images, labels, classes")
            return from_nhwc(f["images"], f["labels"], f["classes"])
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        if isinstance(e, EpisodicError):
            raise
        raise EpisodicError(f"cannot read npz file '{p}': {e}") from None


@DATASETS.register("npz")
class Npz(Source):
    """Two ``.npz`` files (paths relative to ``root`` if given)."""

    def __init__(self, train: str, test: str, image_size: int | None = None, root: str | None = None) -> None:
        check_size(image_size)
        self.train, self.test, self.image_size, self.root = train, test, image_size, root

    def load(self) -> Splits:
        base = Path(self.root).expanduser() if self.root else Path(".")
        tr, te = load_npz(base / self.train), load_npz(base / self.test)
        return Splits(
            ArrayDataset(resize_uint8(tr.images, self.image_size), tr.labels, tr.classes),
            ArrayDataset(resize_uint8(te.images, self.image_size), te.labels, te.classes),
        )


def _unpickle(path: Path) -> dict[str, Any]:
    with open(_need(path, "CIFAR batch file"), "rb") as f:
        d = pickle.load(f, encoding="latin1")
    return d


def _cifar(
    root: str,
    folder: str,
    train_files: list[str],
    test_files: list[str],
    meta: str,
    key: str,
    names_key: str,
    download: bool,
    tv_class: str,
) -> Splits:
    base = Path(root).expanduser()
    if download and not (base / folder).exists():
        import torchvision

        fetch(tv_class, base, lambda: getattr(torchvision.datasets, tv_class)(str(base), train=True, download=True))
    base = _need(base / folder, f"{folder}/ folder")

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [_unpickle(base / f) for f in files]
        x = np.concatenate([p["data"] for p in parts]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        return x, np.concatenate([np.asarray(p[key]) for p in parts])

    names = _unpickle(base / meta)[names_key]
    (xtr, ytr), (xte, yte) = read(train_files), read(test_files)
    return Splits(from_nhwc(xtr, ytr, names), from_nhwc(xte, yte, names))


@DATASETS.register("cifar10")
class Cifar10(Source):
    """CIFAR-10 from ``root/cifar-10-batches-py`` (50,000 / 10,000 images)."""

    def __init__(self, root: str = "data", download: bool = False) -> None:
        self.root, self.download = root, download

    def load(self) -> Splits:
        return _cifar(
            self.root,
            "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)],
            ["test_batch"],
            "batches.meta",
            "labels",
            "label_names",
            self.download,
            "CIFAR10",
        )


@DATASETS.register("cifar100")
class Cifar100(Source):
    """CIFAR-100 (fine labels) from ``root/cifar-100-python``."""

    def __init__(self, root: str = "data", download: bool = False) -> None:
        self.root, self.download = root, download

    def load(self) -> Splits:
        return cifar100(self.root, self.download)


def cifar100(root: str = "data", download: bool = False) -> Splits:
    """CIFAR-100's train and test splits with fine labels (see :class:`Cifar100`)."""
    return _cifar(
        root, "cifar-100-python", ["train"], ["test"], "meta", "fine_labels", "fine_label_names", download, "CIFAR100"
    )


def read_stl10(base: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """STL-10 binary split -> (NHWC uint8 images, labels 0..9, or -1 for ``unlabeled``)."""
    raw = np.fromfile(_need(base / f"{split}_X.bin", f"STL-10 {split}_X.bin"), dtype=np.uint8)
    check(raw.size % (3 * 96 * 96) == 0, f"{base / f'{split}_X.bin'} is truncated (size {raw.size})")
    x = raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1)  # stored column-major per channel
    if split == "unlabeled":
        return x, np.full(len(x), -1)
    y = np.fromfile(_need(base / f"{split}_y.bin", f"STL-10 {split}_y.bin"), dtype=np.uint8).astype(np.int64) - 1
    return x, y


@DATASETS.register("stl10")
class Stl10(Source):
    """STL-10 from ``root/stl10_binary``; ``train`` = labeled train (+ the 100k unlabeled split)."""

    def __init__(
        self, root: str = "data", download: bool = False, image_size: int | None = None, unlabeled: bool = True
    ) -> None:
        check_size(image_size)
        self.root, self.download, self.image_size, self.unlabeled = root, download, image_size, unlabeled

    def load(self) -> Splits:
        return stl10(self.root, self.download, self.image_size, self.unlabeled)


def stl10(root: str, download: bool, image_size: int | None, unlabeled: bool) -> Splits:
    """STL-10's splits (see :class:`Stl10`)."""
    base = Path(root).expanduser()
    if download and not (base / "stl10_binary").exists():
        import torchvision

        fetch("STL10", base, lambda: torchvision.datasets.STL10(str(base), split="train+unlabeled", download=True))
    base = _need(base / "stl10_binary", "stl10_binary/ folder")
    names_file = base / "class_names.txt"
    names = names_file.read_text().split() if names_file.exists() else [str(i) for i in range(10)]
    xtr, ytr = read_stl10(base, "train")
    if unlabeled:
        xu, yu = read_stl10(base, "unlabeled")
        xtr, ytr = np.concatenate([xtr, xu]), np.concatenate([ytr, yu])
    xte, yte = read_stl10(base, "test")
    tr, te = from_nhwc(xtr, ytr, names), from_nhwc(xte, yte, names)
    return Splits(
        ArrayDataset(resize_uint8(tr.images, image_size), tr.labels, names),
        ArrayDataset(resize_uint8(te.images, image_size), te.labels, names),
    )


@DATASETS.register("imagefolder")
class ImageFolderSource(Source):
    """``root/{train,test}/<class>/<image>`` read with torchvision's ImageFolder, resized to a square."""

    def __init__(self, root: str, image_size: int = 32, channels: int = 3) -> None:
        check_size(image_size)
        check(channels in (1, 3), f"data.params.channels={channels!r} is not allowed; use 1 or 3")
        self.root, self.image_size, self.channels = root, image_size, channels

    def load(self) -> Splits:
        return imagefolder(self.root, self.image_size, self.channels)


def imagefolder(root: str, image_size: int, channels: int) -> Splits:
    """The train and test folders (see :class:`ImageFolderSource`)."""
    from PIL import Image
    from torchvision.datasets import ImageFolder

    mode = "L" if channels == 1 else "RGB"

    def image(path: str) -> np.ndarray:
        try:
            with Image.open(path) as im:
                return np.asarray(im.convert(mode).resize((image_size, image_size), Image.Resampling.BILINEAR))
        except OSError as e:  # PIL's UnidentifiedImageError and truncated files are OSErrors
            raise EpisodicError(f"cannot decode image '{path}' ({e}); remove or replace the file") from None

    def read(split: str) -> ArrayDataset:
        base = _need(Path(root).expanduser() / split, f"image folder '{split}'")
        try:
            folder = ImageFolder(str(base))
        except FileNotFoundError as e:  # no class folders, or class folders without images
            raise EpisodicError(
                f"image folder '{base}' holds no images in class folders ({str(e).splitlines()[0]}); expected "
                f"{base}/<class>/<image>.png|jpg"
            ) from None
        xs = [image(p) for p, _ in folder.samples]
        return from_nhwc(np.stack(xs), np.asarray(folder.targets), folder.classes)

    return Splits(read("train"), read("test"))


def dataset_source(name: str, **params: Any) -> Source:
    """The registered dataset ``name`` with ``params`` checked; nothing is read yet."""
    source: Source = DATASETS.build(name, **params)
    return source


def build_dataset(name: str, **params: Any) -> Splits:
    """Check ``params``, then read the registered dataset (missing files are one clear error line)."""
    return dataset_source(name, **params).load()
