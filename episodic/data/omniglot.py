"""Omniglot (Lake et al., 2015) for unsupervised few-shot learning, on the Vinyals split by default.

Two on-disk formats are read, chosen by ``format`` (``auto`` picks whichever ``root`` holds):

- ``npz``: ``root/omniglot_background.npz`` and ``root/omniglot_evaluation.npz``, each with uint8 NHWC
  ``images`` (255 = paper, 0 = ink), int64 ``labels`` and ``classes`` named ``<Alphabet>/characterNN``
  (the format of ``shared/data``);
- ``folder``: the original layout ``root/images_background/<Alphabet>/<characterNN>/*.png`` and
  ``root/images_evaluation/...`` (one PNG per drawing, read in mode ``L``, sorted by file name;
  characters in the order of their official id, the ``<id>_<drawer>.png`` prefix, as in the npz).

Splits (``split``):

- ``vinyals`` (Vinyals et al., 2016; ProtoNets, UMTRA, CACTUs, PsCo): characters listed one per line in
  ``splits_dir/{train,val,test}.txt`` (1,028 / 172 / 423 characters; the train list draws from both
  sets, so a character is looked up in whichever set holds it). Lines in the source's
  ``<Alphabet>/characterNN/rot000`` form are accepted too (the rotation suffix is dropped);
- ``lake``: all 964 background characters for training, all 659 evaluation characters for testing.

Rotations: with ``test_rotations`` (default on, as the literature does) every test character at 0, 90,
180 and 270 degrees (counter-clockwise, ``torch.rot90``) is its own class, ``<name>/rotDDD``, labels
character-major (the four rotations of a character are consecutive). ``train_rotations`` does the same
for the training characters (4x the unlabeled images).

The result is a :class:`~episodic.data.datasets.Splits`: ``train`` holds the training characters
(used without labels), ``test`` the characters of ``eval_split`` (``test``, or ``val`` for model
selection) with labels. Both share one class list (training classes first), so their labels never
collide. Images are resized (antialiased bilinear) to ``image_size`` (28 in the literature) and, with
``invert`` (default), stored as ink = 255 on a black background, so zero padding matches the paper.
``train_image_size`` (default: ``image_size``) stores the training drawings at a higher resolution, so
that the training augmentation crops from sharp strokes and resizes each crop down to its ``size``
(as a PIL pipeline that crops the 105 x 105 originals does); the evaluated split stays at ``image_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from episodic.data.datasets import DATASETS, ArrayDataset, Source, Splits, load_npz, resize_uint8
from episodic.errors import EpisodicError, check

__all__ = [
    "ROTATIONS",
    "SETS",
    "Characters",
    "character_images",
    "load_characters",
    "omniglot",
    "read_split_list",
]

SETS = ("background", "evaluation")
ROTATIONS = (0, 90, 180, 270)
_SPLITS = ("vinyals", "lake")
_FORMATS = ("auto", "npz", "folder")
_RESIZE_CHUNK = 2048


@dataclass
class Characters:
    """All drawings of the Omniglot characters read from disk, as one array with an index per character.

    ``images`` is ``uint8 [N, 1, S, S]``, already inverted/resized; ``index[name]`` holds the rows of
    that character's drawings (in drawer order) and ``set_of[name]`` is ``background`` or ``evaluation``.
    """

    images: Tensor
    index: dict[str, Tensor]
    set_of: dict[str, str]

    def select(self, names: Sequence[str], split_file: str) -> list[Tensor]:
        missing = [n for n in names if n not in self.index]
        check(
            not missing,
            f"{len(missing)} characters of {split_file} are not in the Omniglot files, e.g. "
            f"{missing[:3]}; names must be '<Alphabet>/characterNN'",
        )
        return [self.index[n] for n in names]

    def names(self, which: str) -> list[str]:
        return [n for n, s in self.set_of.items() if s == which]


def _rows_by_class(labels: Tensor, classes: Sequence[str]) -> dict[str, Tensor]:
    """``{class name: row indices}`` for the classes that have rows, in the order of ``classes``."""
    order = torch.argsort(labels, stable=True)
    counts = torch.bincount(labels, minlength=len(classes)).tolist()
    out, start = {}, 0
    for name, n in zip(classes, counts):
        if n:
            out[str(name)] = order[start : start + n]
        start += n
    return out


def _read_npz_set(root: Path, which: str) -> tuple[Tensor, dict[str, Tensor]]:
    data = load_npz(root / f"omniglot_{which}.npz")
    check(
        data.images.shape[1] == 1,
        f"{root / f'omniglot_{which}.npz'} holds {data.images.shape[1]}-channel "
        f"images; Omniglot is grayscale (1 channel)",
    )
    return data.images, _rows_by_class(data.labels, data.classes)


def _character_id(file_name: str) -> int | None:
    """The official character id of a drawing file ``<id>_<drawer>.png`` (``None`` for other names)."""
    head = file_name.split("_", 1)[0]
    return int(head) if head.isdigit() and "_" in file_name else None


def _read_folder_set(root: Path, which: str) -> tuple[Tensor, dict[str, Tensor]]:
    from PIL import Image

    base = root / f"images_{which}"
    arrays: list[np.ndarray] = []
    index: dict[str, Tensor] = {}
    ids: dict[str, int | None] = {}
    for alphabet in sorted(p for p in base.iterdir() if p.is_dir()):
        for char in sorted(p for p in alphabet.iterdir() if p.is_dir()):
            files = sorted(char.glob("*.png"))
            check(len(files) > 0, f"character folder '{char}' holds no .png drawings")
            try:
                drawn = [np.asarray(Image.open(f).convert("L")) for f in files]
            except OSError as e:
                raise EpisodicError(f"cannot read an Omniglot drawing in '{char}': {e}") from None
            index[f"{alphabet.name}/{char.name}"] = torch.arange(len(arrays), len(arrays) + len(drawn))
            ids[f"{alphabet.name}/{char.name}"] = _character_id(files[0].name)
            arrays += drawn
    check(len(index) > 0, f"'{base}' holds no <alphabet>/<character>/ folders")
    # Omniglot's order (the npz order) is by character id, the file-name prefix; alphabetical otherwise
    order = sorted(index, key=lambda n: (ids[n] is None, ids[n] or 0, n))
    index = {n: index[n] for n in order}
    shapes = sorted({a.shape for a in arrays})
    check(len(shapes) == 1, f"drawings in '{base}' have different sizes {shapes}; Omniglot's are all 105x105")
    return torch.from_numpy(np.stack(arrays)).unsqueeze(1), index


def _detect_format(root: Path) -> str:
    if all((root / f"omniglot_{s}.npz").exists() for s in SETS):
        return "npz"
    if all((root / f"images_{s}").is_dir() for s in SETS):
        return "folder"
    raise EpisodicError(
        f"no Omniglot found in '{root}': expected omniglot_background.npz and "
        f"omniglot_evaluation.npz, or the folders images_background/ and images_evaluation/; "
        f"set data.params.root to the folder that holds them"
    )


def _resize(x: Tensor, size: int | None) -> Tensor:
    if size is None or x.shape[-2:] == (size, size):
        return x
    out = torch.empty(len(x), x.shape[1], size, size, dtype=torch.uint8)
    for i in range(0, len(x), _RESIZE_CHUNK):
        out[i : i + _RESIZE_CHUNK] = resize_uint8(x[i : i + _RESIZE_CHUNK], size)
    return out


def load_characters(
    root: str | Path, fmt: str = "auto", image_size: int | None = 28, invert: bool = True
) -> Characters:
    """Every character of both Omniglot sets, inverted (``invert``) and resized to ``image_size``."""
    check(fmt in _FORMATS, f"data.params.format={fmt!r} is not allowed; use one of {', '.join(_FORMATS)}")
    base = Path(root).expanduser()
    if fmt == "auto":
        fmt = _detect_format(base)
    if fmt == "folder":
        for s in SETS:
            if not (base / f"images_{s}").is_dir():
                raise EpisodicError(
                    f"Omniglot folder 'images_{s}' not found at '{base}'; set data.params.root "
                    f"to the folder that holds images_background/ and images_evaluation/"
                )
    reader = _read_npz_set if fmt == "npz" else _read_folder_set
    parts: list[Tensor] = []
    index: dict[str, Tensor] = {}
    set_of: dict[str, str] = {}
    offset = 0
    for s in SETS:
        x, rows = reader(base, s)
        both = set(rows) & set(index)
        check(not both, f"characters {sorted(both)[:3]} appear in both the background and evaluation sets")
        parts.append(_resize(255 - x if invert else x, image_size))
        for name, r in rows.items():
            index[name], set_of[name] = r + offset, s
        offset += len(x)
    out = torch.empty(offset, *parts[0].shape[1:], dtype=torch.uint8)
    out[: len(parts[0])], out[len(parts[0]) :] = parts[0], parts[1]
    return Characters(out, index, set_of)


def read_split_list(path: str | Path) -> list[str]:
    """Character names, one per line; a ``/rotDDD`` suffix is dropped and repeats are kept once, in order."""
    p = Path(path).expanduser()
    if not p.exists():
        raise EpisodicError(
            f"Omniglot split list not found at '{p}'; set data.params.splits_dir to the folder "
            f"holding train.txt, val.txt and test.txt (or use data.params.split=lake)"
        )
    names: list[str] = []
    seen: set[str] = set()
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        head, _, last = line.rpartition("/")
        if head and last.startswith("rot") and last[3:].isdigit():
            line = head
        if line not in seen:
            seen.add(line)
            names.append(line)
    check(len(names) > 0, f"Omniglot split list '{p}' is empty")
    return names


def character_images(
    images: Tensor,
    rows: Sequence[Tensor],
    names: Sequence[str],
    rotations: bool,
    label_offset: int = 0,
    size: int | None = None,
) -> tuple[Tensor, Tensor, list[str]]:
    """Images ``uint8 [N, 1, S, S]``, labels and class names of the characters whose drawings are ``rows``.

    The selected drawings are resized to ``size`` (``None``: as stored) before any rotation. Without
    ``rotations`` character ``i`` is class ``label_offset + i``; with it, character ``i`` at
    ``ROTATIONS[r]`` degrees (counter-clockwise) is class ``label_offset + 4 i + r``, named
    ``<name>/rotDDD``. Rows are class-major, drawings in drawer order.
    """
    counts = torch.tensor([len(r) for r in rows], dtype=torch.long)
    idx = torch.cat(list(rows)) if len(rows) else torch.empty(0, dtype=torch.long)
    x = _resize(images.index_select(0, idx), size)
    char = torch.repeat_interleave(torch.arange(len(rows)), counts)
    if not rotations:
        return x, char + label_offset, list(names)
    images_r = torch.stack([torch.rot90(x, k, dims=(2, 3)) for k in range(4)], 1)  # [N, 4, 1, S, S]
    labels = (4 * char.unsqueeze(1) + torch.arange(4)).reshape(-1) + label_offset
    order = torch.argsort(labels, stable=True)  # class-major: character, rotation, drawing
    classes = [f"{n}/rot{r:03d}" for n in names for r in ROTATIONS]
    return images_r.flatten(0, 1).index_select(0, order), labels[order], classes


@DATASETS.register("omniglot")
class Omniglot(Source):
    """Omniglot as :class:`Splits`: ``train`` = training characters, ``test`` = ``eval_split`` characters.

    ``splits_dir`` defaults to ``root/omniglot_vinyals``. See the module docstring for every option.
    """

    def __init__(
        self,
        root: str = "../shared/data",
        split: str = "vinyals",
        splits_dir: str | None = None,
        eval_split: str = "test",
        image_size: int | None = 28,
        train_rotations: bool = False,
        test_rotations: bool = True,
        invert: bool = True,
        format: str = "auto",
        train_image_size: int | None = None,
    ) -> None:
        check(split in _SPLITS, f"data.params.split={split!r} is not allowed; use one of {', '.join(_SPLITS)}")
        check(eval_split in ("test", "val"), f"data.params.eval_split={eval_split!r} is not allowed; use test or val")
        check(
            image_size is None or (isinstance(image_size, int) and image_size >= 4),
            f"data.params.image_size={image_size!r} is not allowed; use an integer >= 4 (28 in the literature)",
        )
        check(
            train_image_size is None or (isinstance(train_image_size, int) and train_image_size >= 4),
            f"data.params.train_image_size={train_image_size!r} is not allowed; use null or an integer >= 4",
        )
        check(
            format in ("auto", "npz", "folder"),
            f"data.params.format={format!r} is not allowed; use one of auto, npz, folder",
        )
        check(
            split == "vinyals" or eval_split == "test",
            "data.params.eval_split=val needs split=vinyals (the Lake split has no val set)",
        )
        self.params: dict[str, Any] = dict(
            root=root,
            split=split,
            splits_dir=splits_dir,
            eval_split=eval_split,
            image_size=image_size,
            train_rotations=train_rotations,
            test_rotations=test_rotations,
            invert=invert,
            format=format,
            train_image_size=train_image_size,
        )

    def load(self) -> Splits:
        return omniglot(**self.params)


def omniglot(
    root: str,
    split: str,
    splits_dir: str | None,
    eval_split: str,
    image_size: int | None,
    train_rotations: bool,
    test_rotations: bool,
    invert: bool,
    format: str,
    train_image_size: int | None,
) -> Splits:
    """The splits :class:`Omniglot` describes."""
    train_size = train_image_size or image_size
    chars = load_characters(root, format, image_size if train_size == image_size else None, invert)
    if split == "lake":
        check(eval_split == "test", "data.params.eval_split=val needs split=vinyals (the Lake split has no val set)")
        train_names, eval_names = chars.names("background"), chars.names("evaluation")
        train_rows, eval_rows = chars.select(train_names, "background"), chars.select(eval_names, "evaluation")
    else:
        lists = Path(splits_dir).expanduser() if splits_dir else Path(root).expanduser() / "omniglot_vinyals"
        train_names = read_split_list(lists / "train.txt")
        eval_names = read_split_list(lists / f"{eval_split}.txt")
        overlap = set(train_names) & set(eval_names)
        check(not overlap, f"characters {sorted(overlap)[:3]} are in both train.txt and {eval_split}.txt")
        train_rows = chars.select(train_names, "train.txt")
        eval_rows = chars.select(eval_names, f"{eval_split}.txt")
    # each split resized before rotating (no-ops when loaded at that size): every option, same test images
    xtr, ytr, ctr = character_images(chars.images, train_rows, train_names, train_rotations, size=train_size)
    xte, yte, cte = character_images(chars.images, eval_rows, eval_names, test_rotations, len(ctr), image_size)
    classes = ctr + cte
    return Splits(ArrayDataset(xtr, ytr, classes), ArrayDataset(xte, yte, classes))
